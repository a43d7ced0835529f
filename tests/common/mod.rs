//! Helpers shared by the end-to-end tests of the `cogvx` binary (each test crate uses some).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A path as a command-line argument (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Runs the `cogvx` binary in the repository root with warnings-only logging.
pub fn cogvx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cogvx"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// Writes `path`, a run of the tiny 2B model on the four mini clips at 9x64x96 (LoRA rank 4,
/// alpha 8, learning rate 1e-3, 2 warm-up steps, batch 1), its cache in `cache`, its output in
/// `out`, with `data_extra` and `train_extra` appended to `[data]` and `[train]`.
pub fn tiny_run_config(
    path: &Path,
    cache: &Path,
    out: &Path,
    data_extra: &str,
    train_extra: &str,
) -> PathBuf {
    let repo = repo();
    let text = format!(
        r#"
[model]
path = "{model}"

[data]
root = "{data}"
resolution = "9x64x96"
cache_dir = "{cache}"
{data_extra}

[train]
output_dir = "{out}"
rank = 4
alpha = 8
learning_rate = 1e-3
lr_warmup_steps = 2
{train_extra}
"#,
        model = repo.join("examples/models/cogvideox-2b-tiny").display(),
        data = repo.join("examples/datasets/mini").display(),
        cache = cache.display(),
        out = out.display(),
    );
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// (stdout, stderr) as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The first-party plugin files, built by `plugins/build.sh` (CI runs it before the tests;
/// here it runs once if they are missing).
pub fn plugin_file(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = repo().join("plugins").join(name);
    BUILT.get_or_init(|| {
        if !path.exists() {
            let status = Command::new("bash")
                .arg("plugins/build.sh")
                .current_dir(repo())
                .status()
                .unwrap();
            assert!(status.success(), "plugins/build.sh failed");
        }
    });
    assert!(
        path.exists(),
        "{} missing after plugins/build.sh",
        path.display()
    );
    path
}
