//! The built-in, native `.so` and WASM `frame_skip` answer identically (plans and errors).
//! The `.so` and `.wasm` are built by the test (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::{ClipInfo, Plugin, Resolution, TransformPlan, TransformRequest};

#[test]
fn builtin_native_and_wasm_frame_skip_plan_identically() {
    let artifacts = support::build("cogvx-plugin-frame-skip", "cogvx_plugin_frame_skip");
    let builtin = cogvx_plugin_frame_skip::builtin;
    let configs = [
        "{}",
        r#"{"mode":"stride","fps":8}"#,
        r#"{"short_clip":"reject"}"#,
        r#"{"mode":"stride","fps":12.5,"short_clip":"reject"}"#,
    ];
    let mut plans = 0;
    let mut errors = 0;
    for params in configs {
        let mut plugins = support::configured_all(builtin, &artifacts, params);
        let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
        assert_eq!(info.name, "frame_skip");
        for (frame_count, fps) in [
            (30, 30.0),
            (49, 24.0),
            (100, 29.97),
            (300, 60.0),
            (1000, 23.976),
            (5, 0.0),
        ] {
            for frames in [1, 9, 49, 48] {
                let clip = ClipInfo {
                    width: 640,
                    height: 360,
                    frame_count,
                    fps,
                };
                let mut request = TransformRequest {
                    clip,
                    target: Resolution {
                        frames,
                        height: 480,
                        width: 720,
                    },
                    plan: TransformPlan::identity(&clip),
                    seed: 5,
                };
                let what = format!("{params}, {frame_count} frames at {fps} fps -> {frames}");
                match support::assert_same(&mut plugins, &what, |p| p.plan_transform(&request)) {
                    Ok(plan) => {
                        assert_eq!(plan.frames.len(), frames as usize);
                        plans += 1;
                    }
                    Err(_) => errors += 1,
                }
                // A narrowed incoming plan (every other frame).
                request.plan.frames = (0..frame_count).step_by(2).collect();
                if support::assert_same(&mut plugins, &what, |p| p.plan_transform(&request)).is_ok()
                {
                    plans += 1;
                }
            }
        }
    }
    assert!(plans > 50 && errors > 20, "{plans} plans, {errors} errors");
    let e =
        support::assert_same_config_error(builtin, &artifacts, r#"{"mode":"uniform","frames":49}"#);
    assert!(e.contains("unknown field `frames`"), "{e}");
}
