//! The built-in, native `.so` and WASM `timestep_sampling` give the same tables, bit for bit,
//! and the same configuration errors. The `.so` and `.wasm` are built by the test
//! (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::Plugin;

#[test]
fn builtin_native_and_wasm_timestep_sampling_weigh_identically() {
    let artifacts = support::build(
        "cogvx-plugin-timestep-sampling",
        "cogvx_plugin_timestep_sampling",
    );
    let builtin = cogvx_plugin_timestep_sampling::builtin;
    for params in [
        "{}",
        r#"{"distribution":"logit_normal","mean":1.5,"std":0.5}"#,
        r#"{"distribution":"shifted","shift":3}"#,
        r#"{"distribution":"uniform"}"#,
    ] {
        let mut plugins = support::configured_all(builtin, &artifacts, params);
        let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
        assert_eq!(info.name, "timestep_sampling");
        for n in [1, 10, 1000] {
            let json = format!(r#"{{"num_train_timesteps": {n}, "snr_shift_scale": 3.0}}"#);
            let tables = support::assert_same(&mut plugins, &format!("{params}, {n}"), |p| {
                p.scheduler_tables(&json)
            })
            .unwrap();
            let w = tables.timestep_weights.unwrap();
            assert_eq!(w.len(), n);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let e = support::assert_same(&mut plugins, "no timesteps", |p| p.scheduler_tables("{}"))
            .unwrap_err();
        assert!(e.contains("num_train_timesteps"), "{e}");
    }
    let e = support::assert_same_config_error(
        builtin,
        &artifacts,
        r#"{"distribution":"shifted","std":2}"#,
    );
    assert!(e.contains("`std` does not apply"), "{e}");
}
