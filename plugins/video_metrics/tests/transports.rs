//! The built-in, native `.so` and WASM `video_metrics` answer identically: same info, the same
//! metrics (bit for bit) for several clips and configs, the same errors.
//! The `.so` and `.wasm` are built by the test (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::{Frames, Plugin, ValidateRequest};

/// Deterministic pseudo-random bytes (splitmix64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn requests() -> Vec<ValidateRequest> {
    let mut out = Vec::new();
    for (i, &(width, height, count)) in [(1, 1, 1), (3, 3, 2), (17, 9, 5), (64, 48, 9), (7, 1, 3)]
        .iter()
        .enumerate()
    {
        let rgb = noise((width * height * count * 3) as usize, i as u64);
        let frames = Frames {
            width,
            height,
            count,
            rgb,
        };
        out.push(ValidateRequest {
            prompt: format!("clip {i}"),
            frames,
            fps: 8.0,
        });
    }
    // Black/white flicker.
    let frames: Vec<u8> = (0..6)
        .flat_map(|t| vec![if t % 2 == 0 { 0u8 } else { 255 }; 16 * 16 * 3])
        .collect();
    out.push(ValidateRequest {
        prompt: "flashing".into(),
        frames: Frames {
            width: 16,
            height: 16,
            count: 6,
            rgb: frames,
        },
        fps: 8.0,
    });
    out
}

#[test]
fn builtin_native_and_wasm_video_metrics_measure_identically() {
    let artifacts = support::build("cogvx-plugin-video-metrics", "cogvx_plugin_video_metrics");
    let builtin = cogvx_plugin_video_metrics::builtin;
    let requests = requests();
    for params in ["{}", r#"{"luma":"bt709"}"#] {
        let mut plugins = support::configured_all(builtin, &artifacts, params);
        assert_eq!(plugins.len(), 3);
        let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
        assert_eq!(
            (info.name.as_str(), info.version.as_str()),
            ("video_metrics", "0.1.0")
        );
        for request in &requests {
            let what = format!("{params} and {}", request.prompt);
            let metrics =
                support::assert_same(&mut plugins, &what, |p| p.validate(request)).unwrap();
            assert_eq!(
                metrics.len(),
                if request.frames.count > 1 { 4 } else { 2 },
                "{what}: {metrics:?}"
            );
        }
        let flashing = support::assert_same(&mut plugins, "flashing", |p| {
            p.validate(&requests[requests.len() - 1])
        })
        .unwrap();
        assert_eq!(flashing[1].value, 1.0);
        assert_eq!(flashing[2].value, 1.0);

        // Frames of the wrong size fail on every transport (the host may refuse them first).
        let bad = ValidateRequest {
            prompt: "bad".into(),
            frames: Frames {
                width: 2,
                height: 2,
                count: 1,
                rgb: vec![0; 5],
            },
            fps: 8.0,
        };
        let e = support::assert_same(&mut plugins, "bad frames", |p| p.validate(&bad)).unwrap_err();
        assert!(e.contains("need 12 bytes, got 5"), "{e}");
    }
    let e = support::assert_same_config_error(builtin, &artifacts, r#"{"luma":"srgb"}"#);
    assert!(e.contains("unknown variant `srgb`"), "{e}");
    let e = support::assert_same_config_error(builtin, &artifacts, r#"{"threshold":1}"#);
    assert!(e.contains("unknown field `threshold`"), "{e}");
}
