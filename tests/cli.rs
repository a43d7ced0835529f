//! End-to-end tests of the `cogvx` binary: the commands a user types, on the project's
//! example dataset (`examples/datasets/mini`) and on broken inputs.

use std::path::PathBuf;

mod common;
use common::{cogvx, plugin_file, repo, s, text};

fn mini() -> PathBuf {
    repo().join("examples/datasets/mini")
}

#[test]
fn plugins_lists_builtins_and_a_loaded_wasm_replaces_its_builtin() {
    let out = cogvx(&["plugins"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for name in ["finetune-layout", "frame_skip", "crop_resize", "id_token"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{stdout}"));
        assert!(line.contains("built-in"), "{line}");
        assert!(line.contains("0.1.0"), "{line}");
    }
    let wasm = plugin_file("crop_resize.wasm");
    let out = cogvx(&["--plugin", wasm.to_str().unwrap(), "plugins"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("crop_resize"))
        .collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(
        rows[0].contains("wasm")
            && rows[0].contains("crop_resize.wasm")
            && rows[0].contains("video-transform"),
        "{}",
        rows[0]
    );
}

#[test]
fn preview_with_the_wasm_crop_resize_writes_four_49x480x720_clips_and_a_contact_sheet() {
    let wasm = plugin_file("crop_resize.wasm");
    let out_dir = tempfile::tempdir().unwrap();
    let out = cogvx(&[
        "--plugin",
        wasm.to_str().unwrap(),
        "dataset",
        "preview",
        mini().to_str().unwrap(),
        "--out",
        out_dir.path().to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let mut clips: Vec<PathBuf> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "mp4"))
        .collect();
    clips.sort();
    assert_eq!(clips.len(), 4, "{clips:?}");
    for clip in &clips {
        let info = cogvx_video::probe(clip).unwrap();
        assert_eq!(
            (info.width, info.height, info.frame_count),
            (720, 480, 49),
            "{}",
            clip.display()
        );
    }
    let sheet = image::open(out_dir.path().join("contact_sheet.png")).unwrap();
    // One row per clip, 8 thumbnails of at most 240 px wide with 4 px gaps.
    assert_eq!(
        (sheet.width(), sheet.height()),
        (4 + 8 * (240 + 4), 4 + 4 * (160 + 4))
    );
    let captions = std::fs::read_to_string(out_dir.path().join("captions.txt")).unwrap();
    assert_eq!(captions.lines().count(), 4);
}

#[test]
fn unknown_config_key_is_named_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[data]\nroot = \"x\"\nresolutoin = \"49x480x720\"\n",
    )
    .unwrap();
    let out = cogvx(&["--config", config.to_str().unwrap(), "dataset", "check"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml") && stderr.contains("resolutoin"),
        "{stderr}"
    );
}

#[test]
fn a_gpu_in_a_cpu_build_is_refused_naming_the_build_flag() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = cogvx(&[
        "--device",
        "cuda:0",
        "dataset",
        "check",
        mini().to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains("--features cuda") && stdout.is_empty(),
        "{stderr}"
    );
    let out = cogvx(&[
        "--device",
        "npu",
        "dataset",
        "check",
        mini().to_str().unwrap(),
    ]);
    assert!(
        text(&out).1.contains("`npu` is not a device"),
        "{}",
        text(&out).1
    );
}

#[test]
fn bad_resolution_flag_is_refused() {
    let out = cogvx(&[
        "--resolution",
        "48x480x720",
        "dataset",
        "check",
        mini().to_str().unwrap(),
    ]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("8N+1"), "{stderr}");
}

#[test]
fn check_reports_every_problem_with_file_and_line_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prompts.txt"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(
        dir.path().join("videos.txt"),
        "missing.mp4\n../escape.mp4\n",
    )
    .unwrap();
    let out = cogvx(&["dataset", "check", dir.path().to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("prompts.txt") && stdout.contains("videos.txt"),
        "{stdout}"
    );
    assert!(stdout.contains("missing.mp4"), "{stdout}");
    assert!(stdout.contains("escape.mp4"), "{stdout}");
}

#[test]
fn check_passes_on_the_example_dataset() {
    let out = cogvx(&["dataset", "check", mini().to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("4 samples, no problems"), "{stdout}");
}

#[test]
fn parity_runs_the_shared_transformer_cases_and_fails_on_a_wrong_output() {
    let cases = cogvx_fixtures::case("");
    let out = cogvx(&["parity", cases.to_str().unwrap(), "--filter", "transformer"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" transformer "))
        .collect();
    assert_eq!(rows.len(), 9, "{stdout}");
    assert!(
        rows.iter().all(|r| r.trim_end().ends_with("ok")),
        "{stdout}"
    );

    // The LoRA training step (loss, grad norm, every gradient, the weights after AdamW).
    let out = cogvx(&[
        "parity",
        cases.to_str().unwrap(),
        "--filter",
        "train_step_lora",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" train_step_lora "))
        .collect();
    assert_eq!(rows.len(), 5 * 34, "{stdout}");
    assert!(
        rows.iter().all(|r| r.trim_end().ends_with("ok")),
        "{stdout}"
    );

    // A case whose expected output was tampered with must fail the run.
    let dir = tempfile::tempdir().unwrap();
    let bad_cases = dir.path().join("cases");
    std::fs::create_dir(&bad_cases).unwrap();
    std::os::unix::fs::symlink(
        cogvx_fixtures::reference("models"),
        dir.path().join("models"),
    )
    .unwrap();
    let src = std::fs::read(cases.join("cogvideox-2b.transformer.0.safetensors")).unwrap();
    let n = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let mut bad = src.clone();
    let last = bad.len() - 4; // last f32 of the data section belongs to the last tensor (an output)
    assert!(last > 8 + n);
    bad[last..].copy_from_slice(&1.0e6f32.to_le_bytes());
    std::fs::write(
        bad_cases.join("cogvideox-2b.transformer.0.safetensors"),
        bad,
    )
    .unwrap();
    let out = cogvx(&["parity", bad_cases.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn builtin_native_and_wasm_crop_resize_produce_identical_frames() {
    use cogvx_plugin_api::{Plugin, Resolution};
    use cogvx_plugin_host::{LoadedPlugin, WasmLimits};
    let target = Resolution {
        frames: 17,
        height: 480,
        width: 720,
    };
    let so = plugin_file("crop_resize.so");
    let wasm = plugin_file("crop_resize.wasm");
    let transports: Vec<LoadedPlugin> = vec![
        LoadedPlugin::builtin(cogvx_plugin_crop_resize::builtin()),
        LoadedPlugin::load_native(&so).unwrap(),
        LoadedPlugin::load_wasm(&wasm, &WasmLimits::default()).unwrap(),
    ];
    let mut outputs: Vec<Vec<cogvx_plugin_api::Frames>> = Vec::new();
    for mut crop_resize in transports {
        crop_resize
            .configure(r#"{"crop":"random","seed":7}"#)
            .unwrap();
        let mut frame_skip = LoadedPlugin::builtin(cogvx_plugin_frame_skip::builtin());
        let mut frames = Vec::new();
        for clip in ["carphone.mp4", "bikes.mp4", "testsrc.mp4", "mandelbrot.mp4"] {
            let chain: Vec<&mut dyn Plugin> = vec![&mut frame_skip, &mut crop_resize];
            let mut transforms = cogvx_video::VideoTransforms::new(chain);
            let path = mini().join("videos").join(clip);
            let pre =
                cogvx_video::preprocess_clip(&path, None, &mut transforms, target, 11).unwrap();
            assert_eq!(
                (pre.frames.count, pre.frames.height, pre.frames.width),
                (17, 480, 720),
                "{clip}"
            );
            frames.push(pre.frames);
        }
        outputs.push(frames);
    }
    assert!(outputs[0] == outputs[1], "built-in and .so frames differ");
    assert!(outputs[0] == outputs[2], "built-in and .wasm frames differ");
}

/// `cogvx plan` on a shipped preset: the released model's configs, the three phases, JSON with a
/// verdict per phase, exit 1 when a phase does not fit the budget.
/// With `[data] buckets` the plan is for the largest bucket (the run's peak), and a bad bucket
/// list is named before any work.
#[test]
fn plan_sizes_the_largest_bucket_and_bad_buckets_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = |buckets: &str| {
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            format!(
                "[model]\npath = \"{}\"\n[data]\nresolution = \"9x64x64\"\nbuckets = {buckets}\n",
                repo().join("examples/models/cogvideox-2b-tiny").display()
            ),
        )
        .unwrap();
        path
    };
    let out = cogvx(&[
        "--config",
        s(&config(r#"["9x64x64", "17x64x96"]"#)),
        "plan",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // 16 text tokens + 5 latent frames x (64/16) x (96/16) video tokens.
    assert_eq!(plan["tokens"]["total"], 16 + 5 * 4 * 6, "{plan}");
    for (buckets, want) in [
        (
            r#"["9x64x64", "10x64x64"]"#,
            "[data] buckets[1]: resolution `10x64x64`: the frame count must be 8N+1",
        ),
        (r#""big""#, "[data] buckets: write \"auto\" or a list"),
        (
            r#"["9x64x64", "9x64x64"]"#,
            "[data] buckets lists 9x64x64 twice",
        ),
        (r#"[]"#, "[data] buckets is empty"),
    ] {
        let out = cogvx(&["--config", s(&config(buckets)), "plan"]);
        let (_, stderr) = text(&out);
        assert!(!out.status.success());
        assert!(stderr.contains(want), "{buckets}: {stderr}");
    }
}

#[test]
fn plan_prints_every_phase_and_the_verdict_for_a_budget() {
    let out = cogvx(&[
        "--config",
        "configs/cogvideox-5b-lora.toml",
        "plan",
        "--json",
        "--gpu-memory",
        "80",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["model"], "released:cogvideox-5b");
    assert_eq!(plan["tokens"]["total"], 17_776);
    let names: Vec<&str> = plan["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["prepare-latents", "prepare-prompts", "train"],
        "validation is off in the preset"
    );
    for p in plan["phases"].as_array().unwrap() {
        assert!(
            p["peak_gib"].as_f64().unwrap() > 1.0 && p["fits"] == true,
            "{p}"
        );
    }
    // The same config with a 16 GiB card: the table names what does not fit, exit 1.
    let out = cogvx(&[
        "--config",
        "configs/cogvideox-5b-lora.toml",
        "plan",
        "--gpu-memory",
        "16",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("DOES NOT FIT") && stdout.contains("does not fit in 16 GiB"),
        "{stdout}"
    );
    // The preset's mixed precision keeps the frozen weights in bf16.
    assert!(
        stdout.contains("transformer weights (5.57B parameters, bf16)")
            && stdout.contains("mixed precision bf16"),
        "{stdout}"
    );
    // A model folder wins over the name; no model at all is an error saying what to pass.
    let out = cogvx(&[
        "--model",
        repo()
            .join("examples/models/cogvideox-2b-tiny")
            .to_str()
            .unwrap(),
        "plan",
        "--resolution",
        "9x64x96",
    ]);
    assert!(
        out.status.success() && text(&out).0.contains("cogvideox-2b-tiny"),
        "{:?}",
        text(&out)
    );
    let out = cogvx(&["plan"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("--model-name") && stderr.contains("cogvideox1.5-5b"),
        "{stderr}"
    );
    let out = cogvx(&["plan", "--model-name", "cogvideox-2b", "--gpu-memory=0"]);
    assert!(text(&out).1.contains("--gpu-memory"), "{:?}", text(&out));
}

/// `[wasm]` limits that panicked (a negative, NaN or infinite time cap), wrapped (a memory cap
/// shifted past 64 bits) or gave an unclear message (0 MiB): each is an error naming the key.
#[test]
fn wasm_limits_out_of_range_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (table, key) in [
        ("call_timeout_secs = -1.0", "call_timeout_secs"),
        ("call_timeout_secs = nan", "call_timeout_secs"),
        ("call_timeout_secs = inf", "call_timeout_secs"),
        ("call_timeout_secs = 0.0", "call_timeout_secs"),
        ("memory_limit_mib = 17592186044417", "memory_limit_mib"),
        ("memory_limit_mib = 0", "memory_limit_mib"),
    ] {
        let config = dir.path().join("limits.toml");
        std::fs::write(&config, format!("[wasm]\n{table}\n")).unwrap();
        let out = cogvx(&["--config", config.to_str().unwrap(), "plugins"]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{table}: {stdout}{stderr}");
        assert!(
            stderr.contains(key) && stderr.contains("limits.toml") && !stderr.contains("panicked"),
            "{table}: {stderr}"
        );
    }
}

/// A plugin file named like a built-in (here the `.wasm` build of `crop_resize`, same name,
/// version and parameters) does not reuse the built-in's cache entries: the keys hold the
/// file's digest. The same file again reuses its own.
#[test]
fn a_file_plugin_named_like_a_builtin_does_not_reuse_its_cache_entries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let prepare = |extra: &[&str]| {
        let mut args = vec!["--config", "configs/quickstart.toml"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["prepare", "--cache-dir", cache.to_str().unwrap()]);
        let out = cogvx(&args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}{stderr}");
        stdout
    };
    assert!(prepare(&[]).contains("latents 4 encoded, 0 reused"));
    assert!(prepare(&[]).contains("latents 0 encoded, 4 reused"));
    let wasm = plugin_file("crop_resize.wasm");
    assert!(prepare(&["--plugin", wasm.to_str().unwrap()]).contains("latents 4 encoded, 0 reused"));
    assert!(prepare(&["--plugin", wasm.to_str().unwrap()]).contains("latents 0 encoded, 4 reused"));
}

/// A caption with escape sequences (it could clear the terminal or forge lines) is printed
/// escaped by `dataset preview`; the cache and the tokenizer get it as written.
#[test]
fn captions_reach_the_terminal_escaped() {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("videos")).unwrap();
    std::fs::copy(
        mini().join("videos/testsrc.mp4"),
        data.path().join("videos/testsrc.mp4"),
    )
    .unwrap();
    std::fs::write(data.path().join("videos.txt"), "videos/testsrc.mp4\n").unwrap();
    std::fs::write(
        data.path().join("prompts.txt"),
        "a test \u{1b}[2J\u{1b}[H pattern\n",
    )
    .unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = cogvx(&[
        "--config",
        "configs/quickstart.toml",
        "dataset",
        "preview",
        data.path().to_str().unwrap(),
        "--out",
        out_dir.path().to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        !stdout.contains('\u{1b}') && stdout.contains("a test \\u{1b}[2J"),
        "{stdout}"
    );
}

/// `[data] caption_column` / `video_column` (the official finetune's flags) name the list files
/// the built-in reader reads; the same key set differently in `[plugin.finetune-layout]` is
/// refused naming both, and a list file outside the root is refused naming the key.
#[test]
fn data_columns_name_the_list_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("videos")).unwrap();
    let src = mini();
    for entry in std::fs::read_dir(src.join("videos")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, root.join("videos").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(src.join("prompts.txt"), root.join("captions.txt")).unwrap();
    std::fs::copy(src.join("videos.txt"), root.join("clips.txt")).unwrap();
    let config = |extra: &str| {
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            format!(
                "[data]\nroot = \"{}\"\ncaption_column = \"captions.txt\"\nvideo_column = \"clips.txt\"\n{extra}",
                root.display()
            ),
        )
        .unwrap();
        path
    };
    let out = cogvx(&["--config", s(&config("")), "dataset", "check"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("4 samples, no problems"), "{stdout}");

    let out = cogvx(&[
        "--config",
        s(&config(
            "[plugin.finetune-layout]\ncaption_column = \"prompts.txt\"\n",
        )),
        "dataset",
        "check",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("[data] caption_column = \"captions.txt\"")
            && stderr.contains("[plugin.finetune-layout] caption_column = \"prompts.txt\""),
        "{stderr}"
    );

    let out = cogvx(&[
        "--config",
        s(&config("image_column = \"../images.txt\"\n")),
        "dataset",
        "check",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}")
            .contains("`image_column`: path `../images.txt` leaves the dataset root"),
        "{stdout}{stderr}"
    );
}

/// `[data] reader = "folder_reader"`: the example clips, each with a same-name caption file,
/// pass `dataset check`; a clip without its caption is named.
#[test]
fn folder_reader_checks_a_folder_of_captioned_clips() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("clips");
    std::fs::create_dir_all(&root).unwrap();
    let src = mini();
    let prompts = std::fs::read_to_string(src.join("prompts.txt")).unwrap();
    let videos = std::fs::read_to_string(src.join("videos.txt")).unwrap();
    for (caption, video) in prompts.lines().zip(videos.lines()) {
        let name = std::path::Path::new(video).file_name().unwrap();
        std::fs::copy(src.join(video), root.join(name)).unwrap();
        std::fs::write(root.join(name).with_extension("txt"), caption).unwrap();
    }
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\nroot = \"{}\"\nreader = \"folder_reader\"\n",
            root.display()
        ),
    )
    .unwrap();
    let out = cogvx(&["--config", s(&config), "dataset", "check"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("4 samples, no problems"), "{stdout}");

    std::fs::copy(
        root.join(
            videos
                .lines()
                .next()
                .map(|v| std::path::Path::new(v).file_name().unwrap())
                .unwrap(),
        ),
        root.join("extra.mp4"),
    )
    .unwrap();
    let out = cogvx(&["--config", s(&config), "dataset", "check"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("extra.mp4: no caption file extra.txt"),
        "{stdout}{stderr}"
    );
}

/// `[data] reader = "metadata_reader"` with the `[data]` column keys: a CSV listing the example
/// clips passes `dataset check`; a row whose clip leaves the root is named with its line.
#[test]
fn metadata_reader_checks_a_csv_with_named_columns() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("set");
    std::fs::create_dir_all(root.join("videos")).unwrap();
    let src = mini();
    let prompts = std::fs::read_to_string(src.join("prompts.txt")).unwrap();
    let videos = std::fs::read_to_string(src.join("videos.txt")).unwrap();
    let mut csv = String::from("clip,description\n");
    for (caption, video) in prompts.lines().zip(videos.lines()) {
        std::fs::copy(src.join(video), root.join(video)).unwrap();
        csv.push_str(&format!("{video},\"{}\"\n", caption.replace('"', "\"\"")));
    }
    std::fs::write(root.join("metadata.csv"), &csv).unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\nroot = \"{}\"\nreader = \"metadata_reader\"\ncaption_column = \"description\"\nvideo_column = \"clip\"\n",
            root.display()
        ),
    )
    .unwrap();
    let out = cogvx(&["--config", s(&config), "dataset", "check"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("4 samples, no problems"), "{stdout}");

    csv.push_str("../outside.mp4,a caption\n");
    std::fs::write(root.join("metadata.csv"), &csv).unwrap();
    let out = cogvx(&["--config", s(&config), "dataset", "check"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains(
            "metadata.csv:6: column `clip`: path `../outside.mp4` leaves the dataset root"
        ),
        "{stdout}{stderr}"
    );
}
