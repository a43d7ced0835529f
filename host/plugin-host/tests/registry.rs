//! The registry: built-ins, loaded files replacing them, listing for `cogvx plugins`.

mod common;

use cogvx_plugin_api::{Plugin, PluginInfo, PluginKind, PluginResult};
use cogvx_plugin_host::{PluginRow, Registry, Transport};

/// A built-in with the fixture's name.
struct BuiltinMisbehave;

impl Plugin for BuiltinMisbehave {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "misbehave".into(),
            version: "0.0.1".into(),
            kinds: vec![PluginKind::PromptRewriter],
            description: "built-in stand-in".into(),
        }
    }
    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        Ok(format!("builtin:{caption}"))
    }
}

struct Other;

impl Plugin for Other {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "other".into(),
            version: "1.0.0".into(),
            kinds: vec![PluginKind::Validator],
            description: String::new(),
        }
    }
}

#[test]
fn loaded_plugins_replace_built_ins_and_are_listed() {
    let mut reg = Registry::new();
    reg.register_builtin(Box::new(BuiltinMisbehave));
    reg.register_builtin(Box::new(Other));
    assert_eq!(
        reg.get_mut("misbehave")
            .unwrap()
            .rewrite_prompt("x")
            .unwrap(),
        "builtin:x"
    );
    assert_eq!(reg.by_kind(PluginKind::PromptRewriter).count(), 1);

    let wasm = common::misbehave_wasm();
    reg.load(wasm).unwrap();
    let p = reg.get_mut("misbehave").unwrap();
    assert_eq!(p.transport(), Transport::Wasm);
    assert_eq!(p.rewrite_prompt("x").unwrap(), "x");
    // A later built-in of the same name does not shadow the loaded plugin.
    reg.register_builtin(Box::new(BuiltinMisbehave));
    assert_eq!(reg.get("misbehave").unwrap().transport(), Transport::Wasm);

    let rows = reg.list();
    assert_eq!(
        rows,
        vec![
            PluginRow {
                name: "misbehave".into(),
                version: "0.3.1".into(),
                kinds: vec![
                    PluginKind::DatasetReader,
                    PluginKind::VideoTransform,
                    PluginKind::PromptRewriter
                ],
                transport: Transport::Wasm,
                api_version: "0.1.0".into(),
                source: wasm.display().to_string(),
            },
            PluginRow {
                name: "other".into(),
                version: "1.0.0".into(),
                kinds: vec![PluginKind::Validator],
                transport: Transport::BuiltIn,
                api_version: "0.1.0".into(),
                source: "built-in".into(),
            },
        ]
    );
    assert_eq!(
        rows[1].to_string(),
        "other\t1.0.0\tvalidator\tbuilt-in\t0.1.0\tbuilt-in"
    );
    assert_eq!(
        reg.by_kind(PluginKind::VideoTransform)
            .map(|p| p.name().to_string())
            .collect::<Vec<_>>(),
        ["misbehave"]
    );

    // The same plugin name from a second file is an error naming both files.
    let so = common::misbehave_so();
    let e = reg.load(so).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "plugin `misbehave` is loaded twice: from {} and from {}; pass only one of them",
            wasm.display(),
            so.display()
        )
    );
    assert!(reg.take("other").is_some());
    assert!(reg.get("other").is_none());
}
