//! Native transport: a panicking plugin is an error, not an abort; another API version and
//! files that are not plugins are refused with clear messages.

mod common;

use std::path::PathBuf;

use cogvx_plugin_api::{Plugin, PluginError};

use cogvx_plugin_host::{LoadedPlugin, Registry, Transport};

fn prefix() -> String {
    format!(
        "plugin `misbehave` 0.3.1 (native, {})",
        common::misbehave_so().display()
    )
}

#[test]
fn native_plugin_answers_and_survives_a_panic() {
    let mut p = LoadedPlugin::load_native(common::misbehave_so()).unwrap();
    assert_eq!(p.name(), "misbehave");
    assert_eq!(p.transport(), Transport::Native);
    assert_eq!(p.api_version(), "0.1.0");
    p.configure(r#"{"prefix": "[cfg] "}"#).unwrap();
    assert_eq!(
        p.plan_transform(&common::request(0)).unwrap(),
        common::good_plan()
    );

    let e = p.plan_transform(&common::request(4)).unwrap_err();
    assert_eq!(
        e,
        PluginError::Failed(format!(
            "{}: `plan-transform` failed: panicked: misbehave: deliberate panic for seed 4 (the instance was recreated)",
            prefix()
        ))
    );
    // Still usable, and re-configured.
    assert_eq!(p.rewrite_prompt("a cat").unwrap(), "[cfg] a cat");
    assert_eq!(
        p.plan_transform(&common::request(0)).unwrap(),
        common::good_plan()
    );

    let e = p.plan_transform(&common::request(6)).unwrap_err();
    assert_eq!(
        e,
        PluginError::Failed(format!(
            "{}: `plan-transform` returned a bad plan: frame index 10 (position 1 of 2) is out of range: the clip has 10 frames (valid: 0..10)",
            prefix()
        ))
    );
}

#[test]
fn native_dataset_reader_paths_become_relative() {
    let dir = common::dataset();
    let root = dir.path().join("data");
    let mut p = LoadedPlugin::load_native(common::misbehave_so()).unwrap();
    let samples = p.list_samples(root.to_str().unwrap()).unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].video, "videos/cat.mp4");
    assert_eq!(samples[1].caption, "a dog");
}

#[test]
fn another_api_version_is_refused() {
    let path = common::old_api_so();
    let e = LoadedPlugin::load_native(path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{} was built for cogvx plugin API 0.0.7, but this host supports API 0.1.0; \
             rebuild the plugin against cogvx-plugin-api 0.1.0",
            path.display()
        )
    );
}

#[test]
fn a_text_file_named_so_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.so");
    std::fs::write(&path, "this is not a library\n").unwrap();
    let e = Registry::new().load(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{} is not a cogvx plugin: not a loadable shared library (",
            path.display()
        )),
        "{e}"
    );
}

/// The C library this process runs on, from `/proc/self/maps`.
fn libc_path() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .map(PathBuf::from)
}

#[test]
fn a_real_library_that_is_not_a_plugin_is_refused() {
    let Some(libc) = libc_path() else {
        eprintln!("SKIPPED: no libc found in /proc/self/maps");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libc.so");
    std::os::unix::fs::symlink(&libc, &path).unwrap();
    let e = Registry::new().load(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{} is not a cogvx plugin: it is a shared library but exports no cogvx/abi_stable root module \
             (build the plugin crate with `--features native-export` and call `export_plugin!`)",
            path.display()
        )
    );
}

#[test]
fn a_missing_file_is_reported() {
    let e = Registry::new()
        .load(std::path::Path::new("/nonexistent/x.so"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot load plugin /nonexistent/x.so: "),
        "{e}"
    );
    let e = Registry::new()
        .load(std::path::Path::new("plugins/x.dat"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "cannot load plugin plugins/x.dat: unknown file type; expected a `.wasm` component or a native `.so`"
    );
}

/// A panic in `configure` is one error per call: recreating the instance re-configures it, which
/// panicked again and recursed until the stack overflowed (11,877 nested panics, then an abort).
#[test]
fn a_panic_in_configure_is_one_error_and_the_plugin_recovers_with_good_parameters() {
    let mut p = LoadedPlugin::load_native(common::misbehave_so()).unwrap();
    let e = p.configure(r#"{"panic": true}"#).unwrap_err().to_string();
    assert!(
        e.contains("deliberate panic in configure")
            && e.contains("re-configuring the recreated instance failed"),
        "{e}"
    );
    // Every later call fails once (the stored parameters still panic), without recursing.
    for _ in 0..3 {
        let e = p.rewrite_prompt("a cat").unwrap_err().to_string();
        assert!(e.contains("deliberate panic in configure"), "{e}");
    }
    // Good parameters give a working instance again.
    p.configure(r#"{"prefix": "[ok] "}"#).unwrap();
    assert_eq!(p.rewrite_prompt("a cat").unwrap(), "[ok] a cat");
}

/// A native plugin's error message is bounded and escaped like a WASM one's.
#[test]
fn a_huge_error_message_is_cut_and_escaped() {
    let mut p = LoadedPlugin::load_native(common::misbehave_so()).unwrap();
    let e = p
        .plan_transform(&common::request(9))
        .unwrap_err()
        .to_string();
    assert!(
        e.len() < 4096
            && !e.contains('\u{1b}')
            && e.contains("\\u{1b}[2J")
            && e.contains("more bytes)"),
        "{}",
        &e[..e.len().min(300)]
    );
}

/// A truncated `.so` killed the host with SIGBUS (the loader touched pages past the end of the
/// file): its segments are checked against the file size before it is opened.
#[test]
fn a_truncated_library_is_refused_before_it_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(common::misbehave_so()).unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 1, 40] {
        let path = dir.path().join(format!("cut-{keep}.so"));
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let e = Registry::new().load(&path).unwrap_err().to_string();
        assert!(
            e.contains("truncated or damaged") && e.contains(&format!("the file has {keep} bytes")),
            "{e}"
        );
    }
}
