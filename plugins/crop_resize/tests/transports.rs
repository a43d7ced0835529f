//! The built-in, native `.so` and WASM `crop_resize` answer identically: same info, same plans
//! for the same requests (several clips, seeds, incoming plans and configs), same errors.
//! The `.so` and `.wasm` are built by the test (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::{
    ClipInfo, CropBox, Plugin, Resolution, Size, TransformPlan, TransformRequest,
};

fn requests() -> Vec<TransformRequest> {
    let target = Resolution {
        frames: 49,
        height: 480,
        width: 720,
    };
    let mut out = Vec::new();
    let sizes = [
        (176, 144),
        (640, 272),
        (320, 240),
        (256, 256),
        (1920, 1080),
        (1080, 1920),
        (7, 5),
        (720, 480),
    ];
    for (i, &(width, height)) in sizes.iter().enumerate() {
        let clip = ClipInfo {
            width,
            height,
            frame_count: 60 + i as u32,
            fps: 23.976 + i as f64,
        };
        for seed in [0, 1, 42, 0x9E37_79B9_7F4A_7C15, u64::MAX] {
            out.push(TransformRequest {
                clip,
                target,
                plan: TransformPlan::identity(&clip),
                seed,
            });
        }
        // An earlier transform chose frames and a crop (the bottom-right three quarters).
        let mut plan = TransformPlan::identity(&clip);
        plan.frames = vec![3, 1, 4, 1, 5, 9, 2, 6];
        plan.crop = Some(CropBox {
            x: width / 4,
            y: height / 4,
            width: width - width / 4,
            height: height - height / 4,
        });
        plan.resize = Some(Size {
            width: 64,
            height: 32,
        });
        out.push(TransformRequest {
            clip,
            target,
            plan,
            seed: 7 + i as u64,
        });
    }
    // Bad requests: an incoming crop outside the frame, an empty target.
    let clip = ClipInfo {
        width: 100,
        height: 100,
        frame_count: 10,
        fps: 30.0,
    };
    let mut plan = TransformPlan::identity(&clip);
    plan.crop = Some(CropBox {
        x: 90,
        y: 0,
        width: 20,
        height: 10,
    });
    out.push(TransformRequest {
        clip,
        target,
        plan,
        seed: 0,
    });
    let plan = TransformPlan::identity(&clip);
    out.push(TransformRequest {
        clip,
        target: Resolution {
            frames: 49,
            height: 0,
            width: 720,
        },
        plan,
        seed: 0,
    });
    out
}

#[test]
fn builtin_native_and_wasm_crop_resize_plan_identically() {
    let artifacts = support::build("cogvx-plugin-crop-resize", "cogvx_plugin_crop_resize");
    let builtin = cogvx_plugin_crop_resize::builtin;
    let configs = [
        "{}",
        r#"{"crop":"random","seed":3}"#,
        r#"{"crop":"random","filter":"bilinear","width":256,"height":256}"#,
        r#"{"crop":"center","filter":"nearest"}"#,
    ];
    let requests = requests();
    let mut plans = 0;
    for params in configs {
        let mut plugins = support::configured_all(builtin, &artifacts, params);
        assert_eq!(plugins.len(), 3);
        let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
        assert_eq!(
            (info.name.as_str(), info.version.as_str()),
            ("crop_resize", "0.1.0")
        );
        for request in &requests {
            let what = format!("{params} and {request:?}");
            if support::assert_same(&mut plugins, &what, |p| p.plan_transform(request)).is_ok() {
                plans += 1;
            }
        }
        // The bad incoming crop fails on every transport, with the same message.
        let bad = support::assert_same(&mut plugins, "bad crop", |p| {
            p.plan_transform(&requests[requests.len() - 2])
        });
        assert!(bad.unwrap_err().contains("not inside the 100x100 frame"));
    }
    // Every good request planned (the empty target only fails without the width/height params).
    assert_eq!(plans, configs.len() * (requests.len() - 2) + 1);

    let e = support::assert_same_config_error(builtin, &artifacts, r#"{"crop":"middle"}"#);
    assert!(e.contains("unknown variant `middle`"), "{e}");
}
