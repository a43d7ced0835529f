//! The built-in, native `.so` and WASM `crop_resize` answer identically: same info, same plans
//! for the same requests (several clips, seeds, incoming plans and configs), same errors.
//!
//! The test builds the `.so` (`--features native-export`) and the `.wasm`
//! (`--target wasm32-wasip2`) of this crate itself with cargo, so it always checks the current
//! sources (after `plugins/build.sh`, which uses the same profile, both builds are no-ops). Only
//! when the `wasm32-wasip2` target is not installed is the WASM part skipped, loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

use cogvx_plugin_api::{
    ClipInfo, CropBox, Plugin, PluginError, PluginResult, Resolution, Size, TransformPlan, TransformRequest,
};
use cogvx_plugin_host::{LoadedPlugin, WasmLimits};

const PACKAGE: &str = "cogvx-plugin-crop-resize";
const LIB: &str = "cogvx_plugin_crop_resize";
/// The cargo profile `plugins/build.sh` builds with, so CI reuses its artifacts.
const PROFILE: &str = "dev";

/// The folder of `PROFILE`'s artifacts under a target directory.
fn profile_dir() -> &'static str {
    if PROFILE == "dev" { "debug" } else { PROFILE }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Runs `cargo build -p crop_resize --profile PROFILE <extra>`; `Err(stderr)` if it fails.
fn cargo_build(root: &Path, extra: &[&str]) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["build", "-p", PACKAGE, "--profile", PROFILE])
        .args(extra)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Builds the native library and copies it to a private file at once: any later build of the
/// crate without `native-export` (e.g. as the CLI's dependency) rewrites the shared path.
fn build_native(root: &Path) -> PathBuf {
    cargo_build(root, &["--features", "native-export"]).unwrap_or_else(|e| panic!("building the .so failed:\n{e}"));
    let built = target_dir(root).join(profile_dir()).join(format!("lib{LIB}.so"));
    let dir = target_dir(root).join("transport-test");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(format!("lib{LIB}-{}.so", std::process::id()));
    std::fs::copy(&built, &copy).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    copy
}

/// Builds the WASM component; `None` (after a loud message) if the target is not installed.
fn build_wasm(root: &Path) -> Option<PathBuf> {
    match cargo_build(root, &["--target", "wasm32-wasip2"]) {
        Ok(()) => Some(target_dir(root).join("wasm32-wasip2").join(profile_dir()).join(format!("{LIB}.wasm"))),
        Err(e) if e.contains("target may not be installed") || e.contains("can't find crate for `std`")
            || e.contains("can't find crate for `core`") =>
        {
            eprintln!(
                "\n**************************************************************************\n\
                 SKIPPING the WASM part of crop_resize's transport test: the wasm32-wasip2\n\
                 target is not installed (run `rustup target add wasm32-wasip2`).\n\
                 **************************************************************************\n"
            );
            None
        }
        Err(e) => panic!("building the .wasm failed:\n{e}"),
    }
}

fn configured(mut p: LoadedPlugin, params: &str) -> LoadedPlugin {
    p.configure(params).unwrap_or_else(|e| panic!("{}: configure({params}) failed: {e}", p.label()));
    p
}

/// A call's result with the host's `plugin … (transport, file): `call`:` prefix removed from
/// errors, so the transports can be compared.
fn normalised<T>(r: PluginResult<T>) -> Result<T, String> {
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

fn requests() -> Vec<TransformRequest> {
    let target = Resolution { frames: 49, height: 480, width: 720 };
    let mut out = Vec::new();
    let sizes = [(176, 144), (640, 272), (320, 240), (256, 256), (1920, 1080), (1080, 1920), (7, 5), (720, 480)];
    for (i, &(width, height)) in sizes.iter().enumerate() {
        let clip = ClipInfo { width, height, frame_count: 60 + i as u32, fps: 23.976 + i as f64 };
        for seed in [0, 1, 42, 0x9E37_79B9_7F4A_7C15, u64::MAX] {
            out.push(TransformRequest { clip, target, plan: TransformPlan::identity(&clip), seed });
        }
        // An earlier transform chose frames and a crop (a quarter of the frame, bottom right).
        let mut plan = TransformPlan::identity(&clip);
        plan.frames = vec![3, 1, 4, 1, 5, 9, 2, 6];
        plan.crop = Some(CropBox { x: width / 4, y: height / 4, width: width - width / 4, height: height - height / 4 });
        plan.resize = Some(Size { width: 64, height: 32 });
        out.push(TransformRequest { clip, target, plan, seed: 7 + i as u64 });
    }
    // Bad requests: a crop outside the frame, an empty target.
    let clip = ClipInfo { width: 100, height: 100, frame_count: 10, fps: 30.0 };
    let mut plan = TransformPlan::identity(&clip);
    plan.crop = Some(CropBox { x: 90, y: 0, width: 20, height: 10 });
    out.push(TransformRequest { clip, target, plan, seed: 0 });
    out.push(TransformRequest {
        clip,
        target: Resolution { frames: 49, height: 0, width: 720 },
        plan: TransformPlan::identity(&clip),
        seed: 0,
    });
    out
}

#[test]
fn builtin_native_and_wasm_crop_resize_plan_identically() {
    let root = workspace_root();
    let so = build_native(&root);
    let wasm = build_wasm(&root);

    let configs = [
        "{}",
        r#"{"crop":"random","seed":3}"#,
        r#"{"crop":"random","filter":"bilinear","width":256,"height":256}"#,
        r#"{"crop":"center","filter":"nearest"}"#,
    ];
    let requests = requests();
    let mut compared = 0;
    for params in configs {
        let mut transports = vec![
            configured(LoadedPlugin::builtin(cogvx_plugin_crop_resize::builtin()), params),
            configured(LoadedPlugin::load_native(&so).expect("load the .so"), params),
        ];
        if let Some(w) = &wasm {
            transports.push(configured(LoadedPlugin::load_wasm(w, &WasmLimits::default()).expect("load the .wasm"), params));
        }
        let info = transports[0].info();
        assert_eq!(info.name, "crop_resize");
        for t in &transports[1..] {
            assert_eq!(t.info(), info, "{}", t.label());
        }
        for request in &requests {
            let want = normalised(transports[0].plan_transform(request));
            for t in &mut transports[1..] {
                let got = normalised(t.plan_transform(request));
                assert_eq!(got, want, "{} differs from the built-in for {params} and {request:?}", t.label());
                compared += 1;
            }
        }
        // The bad requests fail on every transport, with the same message.
        let bad = normalised(transports[0].plan_transform(&requests[requests.len() - 2])).unwrap_err();
        assert!(bad.contains("not inside the 100x100 frame"), "{bad}");
    }
    let transports = if wasm.is_some() { 2 } else { 1 };
    assert_eq!(compared, configs.len() * requests.len() * transports);

    // A bad config is refused with the same message everywhere.
    let bad = r#"{"crop":"middle"}"#;
    let mut results = vec![
        normalised(LoadedPlugin::builtin(cogvx_plugin_crop_resize::builtin()).configure(bad)),
        normalised(LoadedPlugin::load_native(&so).unwrap().configure(bad)),
    ];
    if let Some(w) = &wasm {
        results.push(normalised(LoadedPlugin::load_wasm(w, &WasmLimits::default()).unwrap().configure(bad)));
    }
    let first = results[0].clone().unwrap_err();
    assert!(first.contains("unknown variant `middle`"), "{first}");
    for r in &results[1..] {
        assert_eq!(r, &results[0]);
    }
    let _ = std::fs::remove_file(&so);
}
