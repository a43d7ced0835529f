//! The built-in, native `.so` and WASM `lokr` answer identically: same info, same recipes for
//! several layers, ranks and configs, same errors. The `.so` and `.wasm` are built by the test
//! (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::{AdapterRequest, Plugin, PluginKind};

fn requests() -> Vec<AdapterRequest> {
    let mut out = Vec::new();
    // CogVideoX-2B's attention (1920 -> 1920) and feed-forward (1920 -> 7680, 7680 -> 1920)
    // layers, a tiny model's, and an odd prime-sized one.
    for (layer, i, o) in [
        ("transformer_blocks.0.attn1.to_q", 1920, 1920),
        ("transformer_blocks.0.ff.net.0.proj", 1920, 7680),
        ("transformer_blocks.0.ff.net.2", 7680, 1920),
        ("transformer_blocks.1.attn1.to_out.0", 64, 64),
        ("proj_out", 127, 12),
    ] {
        for (rank, alpha) in [(1, 1.0), (4, 2.0), (128, 64.0)] {
            out.push(AdapterRequest {
                layer: layer.into(),
                in_features: i,
                out_features: o,
                rank,
                alpha,
            });
        }
    }
    out
}

#[test]
fn builtin_native_and_wasm_lokr_answer_identical_recipes() {
    let artifacts = support::build("cogvx-plugin-lokr", "cogvx_plugin_lokr");
    let builtin = cogvx_plugin_lokr::builtin;
    let configs = [
        "{}",
        r#"{"init_weights":"lycoris"}"#,
        r#"{"decompose_both":true,"decompose_factor":8,"init_weights":false}"#,
    ];
    let requests = requests();
    for params in configs {
        let mut plugins = support::configured_all(builtin, &artifacts, params);
        let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
        assert_eq!(
            (info.name.as_str(), info.kinds.as_slice()),
            ("lokr", [PluginKind::Adapter].as_slice())
        );
        let config = cogvx_plugin_lokr::parse_config(params).unwrap();
        for request in &requests {
            let what = format!("{params} and {request:?}");
            let got =
                support::assert_same(&mut plugins, &what, |p| p.adapter_recipe(request)).unwrap();
            assert_eq!(
                got,
                cogvx_plugin_lokr::recipe(&config, request).unwrap(),
                "{what}"
            );
        }
        // A rank of 0 is refused the same way everywhere.
        let zero = AdapterRequest {
            rank: 0,
            ..requests[0].clone()
        };
        let e =
            support::assert_same(&mut plugins, "rank 0", |p| p.adapter_recipe(&zero)).unwrap_err();
        assert!(e.contains("rank must be a positive integer"), "{e}");
    }
    let e = support::assert_same_config_error(builtin, &artifacts, r#"{"decompose_factor":0}"#);
    assert!(e.contains("`decompose_factor`: 0 must be -1"), "{e}");
    let e = support::assert_same_config_error(builtin, &artifacts, r#"{"rank_dropout":0.1}"#);
    assert!(e.contains("unknown field `rank_dropout`"), "{e}");
}
