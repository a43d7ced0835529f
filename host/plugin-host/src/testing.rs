//! Test support for plugin crates (feature `testing`), used by the first-party plugins'
//! `tests/transports.rs`: builds a plugin crate's `.so` and `.wasm` with cargo and loads the
//! plugin through every transport of the host, to check that they answer alike.
//!
//! The builds always check the current sources (after `plugins/build.sh`, which uses the same
//! profile, they are no-ops). A missing `wasm32-wasip2` target fails the test saying how to
//! install it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{LoadedPlugin, WasmLimits};
use cogvx_plugin_api::{Plugin, PluginError, PluginResult};

/// The cargo profile `plugins/build.sh` builds with, so CI reuses its artifacts.
const PROFILE: &str = "dev";

/// The folder of `PROFILE`'s artifacts under a target directory.
fn profile_dir() -> &'static str {
    if PROFILE == "dev" {
        "debug"
    } else {
        PROFILE
    }
}

/// The workspace root (this crate sits two folders below it, as the plugin crates do).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Runs `cargo build -p <package> --profile PROFILE <extra>`; `Err(stderr)` if it fails.
fn cargo_build(root: &Path, package: &str, extra: &[&str]) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["build", "-p", package, "--profile", PROFILE])
        .args(extra)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A plugin crate's native library and WASM component, freshly built.
pub struct Artifacts {
    /// A private copy of the `.so`: any later build of the crate without `native-export` (e.g.
    /// as the CLI's dependency) rewrites the shared path, so it is copied at once.
    pub so: PathBuf,
    /// The WASM component.
    pub wasm: PathBuf,
}

impl Drop for Artifacts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.so);
    }
}

/// Builds `package` (library file stem `lib`) to `.so` and `.wasm`.
pub fn build(package: &str, lib: &str) -> Artifacts {
    let root = workspace_root();
    cargo_build(&root, package, &["--features", "native-export"])
        .unwrap_or_else(|e| panic!("building the .so of {package} failed:\n{e}"));
    let built = target_dir(&root)
        .join(profile_dir())
        .join(format!("lib{lib}.so"));
    let dir = target_dir(&root).join("transport-test");
    std::fs::create_dir_all(&dir).unwrap();
    let so = dir.join(format!("lib{lib}-{}.so", std::process::id()));
    std::fs::copy(&built, &so).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    let wasm = match cargo_build(&root, package, &["--target", "wasm32-wasip2"]) {
        Ok(()) => target_dir(&root)
            .join("wasm32-wasip2")
            .join(profile_dir())
            .join(format!("{lib}.wasm")),
        Err(e)
            if e.contains("target may not be installed")
                || e.contains("can't find crate for `std`")
                || e.contains("can't find crate for `core`") =>
        {
            panic!("building the .wasm of {package} needs the wasm32-wasip2 target: run `rustup target add wasm32-wasip2` (scripts/setup.sh does)\n{e}")
        }
        Err(e) => panic!("building the .wasm of {package} failed:\n{e}"),
    };
    Artifacts { so, wasm }
}

/// The plugin through every transport (built-in first), unconfigured.
pub fn load_all(builtin: fn() -> Box<dyn Plugin>, artifacts: &Artifacts) -> Vec<LoadedPlugin> {
    vec![
        LoadedPlugin::builtin(builtin()),
        LoadedPlugin::load_native(&artifacts.so).unwrap_or_else(|e| panic!("load the .so: {e}")),
        LoadedPlugin::load_wasm(&artifacts.wasm, &WasmLimits::default())
            .unwrap_or_else(|e| panic!("load the .wasm: {e}")),
    ]
}

/// The plugin through every transport, each configured with `params` (which must be accepted).
pub fn configured_all(
    builtin: fn() -> Box<dyn Plugin>,
    artifacts: &Artifacts,
    params: &str,
) -> Vec<LoadedPlugin> {
    let mut all = load_all(builtin, artifacts);
    for p in &mut all {
        let r = p.configure(params);
        r.unwrap_or_else(|e| panic!("{}: configure({params}) failed: {e}", p.label()));
    }
    all
}

/// A call's result with the host's `plugin … (transport, file): `call`:` prefix removed from
/// errors, so the transports can be compared.
pub fn normalised<T>(r: PluginResult<T>) -> Result<T, String> {
    r.map_err(|e| {
        let (kind, m) = match e {
            PluginError::Unsupported(m) => ("unsupported", m),
            PluginError::Invalid(m) => ("invalid", m),
            PluginError::Failed(m) => ("failed", m),
        };
        let tail = m.split_once("`: ").map(|(_, t)| t.to_string()).unwrap_or(m);
        format!("{kind}: {tail}")
    })
}

/// Asserts that every transport gives the built-in's answer to `call`; returns that answer.
pub fn assert_same<T: PartialEq + std::fmt::Debug>(
    plugins: &mut [LoadedPlugin],
    what: &str,
    mut call: impl FnMut(&mut LoadedPlugin) -> PluginResult<T>,
) -> Result<T, String> {
    let want = normalised(call(&mut plugins[0]));
    for p in &mut plugins[1..] {
        let got = normalised(call(p));
        assert_eq!(
            got,
            want,
            "{} differs from the built-in for {what}",
            p.label()
        );
    }
    want
}

/// Asserts that `params` is refused with the same message on every transport; returns it.
pub fn assert_same_config_error(
    builtin: fn() -> Box<dyn Plugin>,
    artifacts: &Artifacts,
    params: &str,
) -> String {
    let mut all = load_all(builtin, artifacts);
    assert_same(&mut all, params, |p| p.configure(params))
        .expect_err("the config should be refused")
}
