//! The built-in, native `.so` and WASM `folder_reader` list the same samples and refuse the same
//! folders (the WASM one sees only the dataset root, read-only). The `.so` and `.wasm` are built
//! by the test (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::Plugin;

#[test]
fn builtin_native_and_wasm_folder_readers_list_identically() {
    let artifacts = support::build("cogvx-plugin-folder-reader", "cogvx_plugin_folder_reader");
    let builtin = cogvx_plugin_folder_reader::builtin;
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    for (rel, bytes) in [
        ("beach/wave.mp4", &b"x"[..]),
        ("beach/wave.txt", b"waves roll onto a beach"),
        ("city.mov", b"x"),
        ("city.txt", b"a city at night, \xc3\xbcnicode"),
    ] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let root_str = root.to_str().unwrap();
    let mut plugins = support::configured_all(builtin, &artifacts, "{}");
    let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
    assert_eq!(info.name, "folder_reader");
    let samples = support::assert_same(&mut plugins, "list", |p| p.list_samples(root_str)).unwrap();
    let got: Vec<_> = samples
        .iter()
        .map(|s| (s.video.as_str(), s.caption.as_str(), s.origin.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "beach/wave.mp4",
                "waves roll onto a beach",
                "beach/wave.txt"
            ),
            ("city.mov", "a city at night, ünicode", "city.txt")
        ]
    );
    // A clip without its caption: the same error, naming the files, everywhere.
    std::fs::write(root.join("lost.mp4"), b"x").unwrap();
    let e = support::assert_same(&mut plugins, "missing caption", |p| {
        p.list_samples(root_str)
    })
    .unwrap_err();
    assert!(e.contains("lost.mp4: no caption file lost.txt"), "{e}");
    let e = support::assert_same_config_error(builtin, &artifacts, r#"{"video_column":"v.txt"}"#);
    assert!(e.contains("`video_column` names a list file"), "{e}");
}
