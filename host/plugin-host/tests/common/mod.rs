//! Builds the test-only plugin crates under `tests/fixtures/` (each its own cargo workspace)
//! into `target/plugin-fixtures/`, once per test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `target/plugin-fixtures` (a target dir apart from the one `cargo test` holds locked).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("plugin-fixtures")
}

fn cargo_build(fixture: &str, extra: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = fixtures_dir().join(fixture).join("Cargo.toml");
    let out = Command::new(&cargo)
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir())
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(
        out.status.success(),
        "building the test fixture {} {extra:?} failed (for wasm: `rustup target add wasm32-wasip2`):\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `misbehave` fixture as a WASM component.
pub fn misbehave_wasm() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        cargo_build("misbehave", &["--target", "wasm32-wasip2"]);
        target_dir().join("wasm32-wasip2/debug/cogvx_fixture_misbehave.wasm")
    })
}

/// The `misbehave` fixture as a native library.
pub fn misbehave_so() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        cargo_build("misbehave", &["--features", "native-export"]);
        target_dir().join("debug/libcogvx_fixture_misbehave.so")
    })
}

/// A native library exporting a cogvx root module of plugin API 0.0.7.
pub fn old_api_so() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        cargo_build("old_api", &[]);
        target_dir().join("debug/libcogvx_fixture_old_api.so")
    })
}

/// A transform request for a 320x240 clip of 10 frames; `seed` picks the fixture's behaviour.
pub fn request(seed: u64) -> cogvx_plugin_api::TransformRequest {
    let clip = cogvx_plugin_api::ClipInfo {
        width: 320,
        height: 240,
        frame_count: 10,
        fps: 8.0,
    };
    cogvx_plugin_api::TransformRequest {
        clip,
        target: cogvx_plugin_api::Resolution {
            frames: 1,
            height: 32,
            width: 64,
        },
        plan: cogvx_plugin_api::TransformPlan::identity(&clip),
        seed,
    }
}

/// The plan the fixture returns for seed 0.
pub fn good_plan() -> cogvx_plugin_api::TransformPlan {
    cogvx_plugin_api::TransformPlan {
        frames: vec![0],
        crop: Some(cogvx_plugin_api::CropBox {
            x: 80,
            y: 60,
            width: 160,
            height: 120,
        }),
        resize: Some(cogvx_plugin_api::Size {
            width: 64,
            height: 32,
        }),
        filter: cogvx_plugin_api::ResizeFilter::Bilinear,
    }
}

/// A dataset root `<tmp>/data` with two samples, and a secret file `<tmp>/secret.txt` beside it.
pub fn dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("videos")).unwrap();
    std::fs::write(root.join("prompts.txt"), "a cat\na dog\n").unwrap();
    std::fs::write(root.join("videos.txt"), "videos/cat.mp4\nvideos/dog.mp4\n").unwrap();
    std::fs::write(root.join("inside.txt"), "readable inside the grant\n").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "SECRET outside the grant\n").unwrap();
    dir
}

/// A WASM component exporting `cogvx:plugin/guest@0.0.7`.
pub fn old_wit_wasm() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        cargo_build("old_wit", &["--target", "wasm32-wasip2"]);
        target_dir().join("wasm32-wasip2/debug/cogvx_fixture_old_wit.wasm")
    })
}
