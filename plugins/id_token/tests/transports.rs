//! The built-in, native `.so` and WASM `id_token` answer identically (captions and errors).
//! The `.so` and `.wasm` are built by the test (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::Plugin;

#[test]
fn builtin_native_and_wasm_id_token_rewrite_identically() {
    let artifacts = support::build("cogvx-plugin-id-token", "cogvx_plugin_id_token");
    let builtin = cogvx_plugin_id_token::builtin;
    let captions = [
        "a man walks a dog.",
        "  BW_STYLE already here ",
        "",
        "ünïcödé — “quotes” \t tab",
        "xBW_STYLE",
    ];
    let mut rewritten = Vec::new();
    for params in [
        r#"{"token":"BW_STYLE"}"#,
        r#"{"token":"BW_STYLE","position":"suffix","separator":", "}"#,
    ] {
        let mut plugins = support::configured_all(builtin, &artifacts, params);
        let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
        assert_eq!(info.name, "id_token");
        for caption in captions {
            rewritten.push(
                support::assert_same(&mut plugins, caption, |p| p.rewrite_prompt(caption)).unwrap(),
            );
        }
    }
    assert_eq!(rewritten[0], "BW_STYLE a man walks a dog.");
    assert_eq!(rewritten[5], "a man walks a dog., BW_STYLE");
    assert_eq!(rewritten[6], "  BW_STYLE already here ");
    // Unconfigured (no token): the same refusal everywhere.
    let mut plugins = support::load_all(builtin, &artifacts);
    let e = support::assert_same(&mut plugins, "unconfigured", |p| p.rewrite_prompt("a cat"))
        .unwrap_err();
    assert!(e.contains("no token configured"), "{e}");
    let e = support::assert_same_config_error(builtin, &artifacts, "{}");
    assert!(e.contains("missing field `token`"), "{e}");
}
