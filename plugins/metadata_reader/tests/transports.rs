//! The built-in, native `.so` and WASM `metadata_reader` list the same samples and report the
//! same problems (the WASM one sees only the dataset root, read-only). The `.so` and `.wasm` are
//! built by the test (`cogvx_plugin_host::testing`).

use cogvx_plugin_host::testing as support;

use cogvx_plugin_api::Plugin;

#[test]
fn builtin_native_and_wasm_metadata_readers_list_identically() {
    let artifacts = support::build(
        "cogvx-plugin-metadata-reader",
        "cogvx_plugin_metadata_reader",
    );
    let builtin = cogvx_plugin_metadata_reader::builtin;
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    std::fs::write(
        root.join("metadata.csv"),
        "caption,video,image\n\"a cat, ünicode\",clips/a.mp4,i/a.png\nb,clips/b.mp4,i/b.png\n",
    )
    .unwrap();
    let root_str = root.to_str().unwrap();
    let mut plugins = support::configured_all(builtin, &artifacts, r#"{"image_column":"image"}"#);
    let info = support::assert_same(&mut plugins, "info", |p| Ok(p.info())).unwrap();
    assert_eq!(info.name, "metadata_reader");
    let samples = support::assert_same(&mut plugins, "list", |p| p.list_samples(root_str)).unwrap();
    let got: Vec<_> = samples
        .iter()
        .map(|s| {
            (
                s.caption.as_str(),
                s.video.as_str(),
                s.image.as_deref(),
                s.origin.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "a cat, ünicode",
                "clips/a.mp4",
                Some("i/a.png"),
                "metadata.csv:2"
            ),
            ("b", "clips/b.mp4", Some("i/b.png"), "metadata.csv:3")
        ]
    );
    std::fs::write(
        root.join("metadata.csv"),
        "caption,video,image\nc,../x.mp4,i.png\n",
    )
    .unwrap();
    let e = support::assert_same(&mut plugins, "escape", |p| p.list_samples(root_str)).unwrap_err();
    assert!(
        e.contains("metadata.csv:2: column `video`: path `../x.mp4` leaves"),
        "{e}"
    );
    let e = support::assert_same_config_error(builtin, &artifacts, r#"{"file":""}"#);
    assert!(e.contains("`file` is empty"), "{e}");
}
