//! `export_plugin!` in two modules of one crate (as when the host links several plugin crates):
//! each gets its own `builtin()`, and the native dispatcher round-trips calls.

// The macro checks the invoking crate's `native-export` feature, which this test crate lacks.
#![allow(unexpected_cfgs)]

use cogvx_plugin_api::*;

mod upper {
    use cogvx_plugin_api::*;

    #[derive(Default)]
    pub struct Upper;

    impl Plugin for Upper {
        fn info(&self) -> PluginInfo {
            PluginInfo {
                name: "upper".into(),
                version: "1.0.0".into(),
                kinds: vec![PluginKind::PromptRewriter, PluginKind::VideoTransform],
                description: "upper-cases captions, inverts pixels".into(),
            }
        }
        fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
            Ok(caption.to_uppercase())
        }
        fn transform_frames(&mut self, mut frames: Frames) -> PluginResult<Frames> {
            frames.rgb.iter_mut().for_each(|b| *b = 255 - *b);
            Ok(frames)
        }
    }

    cogvx_plugin_api::export_plugin!(Upper);
}

mod counter {
    use cogvx_plugin_api::*;

    #[derive(Default)]
    pub struct Counter {
        calls: u32,
    }

    impl Plugin for Counter {
        fn info(&self) -> PluginInfo {
            PluginInfo {
                name: "counter".into(),
                version: "0.0.1".into(),
                kinds: vec![PluginKind::PromptRewriter],
                description: String::new(),
            }
        }
        fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
            self.calls += 1;
            Ok(format!("{caption} #{}", self.calls))
        }
    }

    cogvx_plugin_api::export_plugin!(Counter);
}

#[test]
fn builtins_of_two_plugins_coexist() {
    let mut a = upper::builtin();
    let mut b = counter::builtin();
    assert_eq!(a.info().name, "upper");
    assert_eq!(b.info().name, "counter");
    assert_eq!(a.rewrite_prompt("a cat").unwrap(), "A CAT");
    assert_eq!(b.rewrite_prompt("a cat").unwrap(), "a cat #1");
    assert_eq!(b.rewrite_prompt("a cat").unwrap(), "a cat #2");
    let clip = ClipInfo {
        width: 4,
        height: 4,
        frame_count: 2,
        fps: 8.0,
    };
    let request = TransformRequest {
        clip,
        target: Resolution {
            frames: 1,
            height: 4,
            width: 4,
        },
        plan: TransformPlan::identity(&clip),
        seed: 0,
    };
    assert_eq!(
        b.plan_transform(&request).unwrap_err(),
        PluginError::Unsupported("this plugin does not implement `plan-transform`".into())
    );
}

#[cfg(feature = "native")]
#[test]
fn native_dispatch_round_trips_json_and_pixels() {
    use cogvx_plugin_api::native::dispatch;
    let mut p = upper::builtin();
    let (json, _) = dispatch(p.as_mut(), "info", "", Vec::new()).unwrap();
    assert_eq!(serde_json::from_str::<PluginInfo>(&json).unwrap(), p.info());
    let (json, _) = dispatch(p.as_mut(), "rewrite-prompt", "\"a dog\"", Vec::new()).unwrap();
    assert_eq!(json, "\"A DOG\"");
    let header = r#"{"width":2,"height":1,"count":1,"rgb":[]}"#;
    let (json, rgb) = dispatch(
        p.as_mut(),
        "transform-frames",
        header,
        vec![0, 10, 20, 30, 40, 50],
    )
    .unwrap();
    assert_eq!(json, header);
    assert_eq!(rgb, vec![255, 245, 235, 225, 215, 205]);
    assert_eq!(
        dispatch(p.as_mut(), "rewrite-prompt", "not json", Vec::new()).unwrap_err(),
        PluginError::Invalid(
            "rewrite-prompt: cannot decode the host's arguments: expected ident at line 1 column 2"
                .into()
        )
    );
    assert!(matches!(
        dispatch(p.as_mut(), "frobnicate", "", Vec::new()),
        Err(PluginError::Unsupported(_))
    ));
}
