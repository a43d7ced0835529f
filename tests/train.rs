//! End-to-end tests of `cogvx train` / `cogvx sample`: the quickstart (the README's main job),
//! resume through the CLI, an adapter swapped by loading a plugin, and bad input refused before
//! any work.

use std::path::{Path, PathBuf};

mod common;
use common::{cogvx, plugin_file, repo, s, text};

/// The step records of a run's metrics.jsonl: (step, loss).
fn losses(out_dir: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The `__metadata__` of a safetensors file.
fn safetensors_metadata(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// A config like the quickstart's, with absolute paths and `extra` appended to `[train]`.
fn small_config(dir: &Path, train_extra: &str) -> PathBuf {
    small_config_with(dir, "", train_extra)
}

/// [`small_config`] with `data_extra` appended to `[data]` too.
fn small_config_with(dir: &Path, data_extra: &str, train_extra: &str) -> PathBuf {
    common::tiny_run_config(
        &dir.join("run.toml"),
        &dir.join("cache"),
        &dir.join("out"),
        data_extra,
        &format!("checkpointing_steps = 3\n{train_extra}"),
    )
}

/// `[data] buckets` from the CLI: `dataset check` prints the histogram, the cache places the
/// mini clips by aspect ratio (the 11:9 and 1:1 clips in the square bucket, the 4:3 and 2.35:1
/// ones in the 3:2 bucket), every batch of 2 holds one bucket, and validation samples at the
/// largest bucket.
#[test]
fn buckets_place_clips_by_aspect_and_batch_them_per_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config_with(
        dir.path(),
        r#"buckets = ["9x64x64", "9x64x96"]"#,
        "max_steps = 4\nbatch_size = 2\n\n[validation]\nsteps = 4\nprompts = [\"a test\"]\nnum_inference_steps = 2",
    );
    let out = cogvx(&["--config", s(&config), "dataset", "check"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("buckets (4 of 4 clips placed):"),
        "{stdout}"
    );
    assert!(stdout.contains("9x64x64      2 clips"), "{stdout}");
    assert!(stdout.contains("9x64x96      2 clips"), "{stdout}");
    assert!(stdout.contains("crops 2: videos/bikes.mp4"), "{stdout}");

    let out = cogvx(&["--config", s(&config), "train"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cache/index.json")).unwrap())
            .unwrap();
    let placed: Vec<(String, String)> = index["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["video"].as_str().unwrap().into(),
                s["resolution"].to_string(),
            )
        })
        .collect();
    let want = [
        ("videos/carphone.mp4", "[9,64,64]"),
        ("videos/bikes.mp4", "[9,64,96]"),
        ("videos/testsrc.mp4", "[9,64,96]"),
        ("videos/mandelbrot.mp4", "[9,64,64]"),
    ];
    assert_eq!(placed, want.map(|(v, r)| (v.to_string(), r.to_string())));
    assert_eq!(index["resolution"].to_string(), "[9,64,96]");
    // Two batches of two an epoch.
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let sizes: Vec<usize> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .map(|v| v["timesteps"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [2, 2, 2, 2]);
    let video = dir.path().join("out/validation/step-4/0.mp4");
    let info = cogvx_video::probe(&video).unwrap_or_else(|e| panic!("{}: {e}", video.display()));
    assert_eq!((info.width, info.height, info.frame_count), (96, 64, 9));

    // A bucket list no clip fits: named, before any training.
    let config = small_config_with(dir.path(), r#"buckets = ["9x480x720"]"#, "max_steps = 1");
    let out = cogvx(&["--config", s(&config), "train"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no clip fits any bucket of [data] buckets (9x480x720)"),
        "{stderr}"
    );

    // CogVideoX-5B-I2V's learned positional table has one frame size: other buckets are refused.
    let config = small_config_with(
        dir.path(),
        r#"buckets = ["9x64x96", "9x64x64"]"#,
        "max_steps = 1",
    );
    let out = cogvx(&[
        "--config",
        s(&config),
        "--model",
        s(&shared_model("cogvideox-5b-i2v-tiny")),
        "train",
    ]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("has learned positional embeddings for")
            && stderr.contains("buckets 9x64x64 cannot train on it"),
        "{stderr}"
    );
}

#[test]
fn quickstart_trains_validates_and_exports_a_lora_that_sample_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("quickstart");
    let out = cogvx(&[
        "--config",
        "configs/quickstart.toml",
        "train",
        "--output-dir",
        s(&out_dir),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    // The loss falls: the mean of the last 20 steps is well below that of the first 20.
    let l = losses(&out_dir);
    assert_eq!(l.len(), 200, "one record per step");
    let mean = |xs: &[(u64, f64)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&l[..20]), mean(&l[l.len() - 20..]));
    assert!(
        last < 0.5 * first,
        "loss did not fall: first 20 {first}, last 20 {last}"
    );

    // Validation video at steps 100 and 200: 9 frames of 96x64.
    for step in [100, 200] {
        let video = out_dir.join(format!("validation/step-{step}/0.mp4"));
        let info =
            cogvx_video::probe(&video).unwrap_or_else(|e| panic!("{}: {e}", video.display()));
        assert_eq!(
            (info.width, info.height, info.frame_count),
            (96, 64, 9),
            "{}",
            video.display()
        );
    }
    // Loss curve PNG; the last two checkpoints kept.
    let png = image::open(out_dir.join("loss.png")).unwrap();
    assert!(png.width() > 100 && png.height() > 100);
    let mut checkpoints: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    checkpoints.sort();
    assert_eq!(checkpoints, ["checkpoint-150", "checkpoint-200"]);

    // The LoRA carries rank and alpha in diffusers' metadata, and `cogvx sample` loads it.
    let lora = out_dir.join("pytorch_lora_weights.safetensors");
    let meta = safetensors_metadata(&lora);
    let adapter: serde_json::Value =
        serde_json::from_str(meta["lora_adapter_metadata"].as_str().unwrap()).unwrap();
    // diffusers packs the transformer's PEFT config with a `transformer.` prefix.
    assert_eq!(
        (
            adapter["transformer.r"].as_u64(),
            adapter["transformer.lora_alpha"].as_f64()
        ),
        (Some(8), Some(16.0)),
        "{adapter}"
    );
    let video = dir.path().join("sample.mp4");
    let out = cogvx(&[
        "--config",
        "configs/quickstart.toml",
        "sample",
        "--lora",
        s(&lora),
        "--prompt",
        "BW_STYLE a zoom into a mandelbrot fractal",
        "--steps",
        "4",
        "--out",
        s(&video),
    ]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let info = cogvx_video::probe(&video).unwrap();
    assert_eq!((info.width, info.height, info.frame_count), (96, 64, 9));
}

/// With mixed precision, `prepare` runs T5 with bf16 weights: its prompt entries are keyed apart
/// from the f32 ones (an f32 run on the same cache encodes its own, a second bf16 prepare reuses
/// them), and a bf16 run validates from the bf16 embeddings it computed before training.
#[test]
fn mixed_precision_encodes_prompts_with_bf16_t5_keyed_apart_from_f32() {
    let dir = tempfile::tempdir().unwrap();
    let f32_config = small_config(dir.path(), "");
    let bf16_config = dir.path().join("bf16.toml");
    let body = std::fs::read_to_string(&f32_config).unwrap();
    std::fs::write(
        &bf16_config,
        format!("{body}mixed_precision = \"bf16\"\n\n[validation]\nsteps = 2\nprompts = [\"a red cube\"]\nnum_inference_steps = 2\n"),
    )
    .unwrap();
    let prepare = |config: &Path| {
        let out = cogvx(&["--config", s(config), "prepare"]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
        stdout
    };
    let first = prepare(&bf16_config);
    assert!(
        first.contains("latents 4 encoded, 0 reused; prompts 4 encoded, 0 reused"),
        "{first}"
    );
    let f32 = prepare(&f32_config);
    assert!(
        f32.contains("latents 0 encoded, 4 reused; prompts 4 encoded, 0 reused"),
        "{f32}"
    );
    let again = prepare(&bf16_config);
    assert!(again.contains("prompts 0 encoded, 4 reused"), "{again}");

    let out = cogvx(&["--config", s(&bf16_config), "train", "--max-steps", "2"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let video = dir.path().join("out/validation/step-2/0.mp4");
    let info = cogvx_video::probe(&video).unwrap_or_else(|e| panic!("{}: {e}", video.display()));
    assert_eq!((info.width, info.height, info.frame_count), (96, 64, 9));
    // 4 captions in each dtype, the validation prompt and "" in bf16.
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache/prompts"))
            .unwrap()
            .count(),
        10
    );
}

#[test]
fn resume_latest_from_the_cli_continues_the_same_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    // Uninterrupted: 8 steps.
    let full = tempfile::tempdir().unwrap();
    let config = small_config(full.path(), "");
    let out = cogvx(&["--config", s(&config), "train", "--max-steps", "8"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let want = losses(&full.path().join("out"));
    assert_eq!(want.len(), 8);

    // 4 steps (checkpoints at 3 and 4), then --resume latest up to 8.
    let config = small_config(dir.path(), "");
    let out = cogvx(&["--config", s(&config), "train", "--max-steps", "4"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let out = cogvx(&[
        "--config",
        s(&config),
        "train",
        "--max-steps",
        "8",
        "--resume",
        "latest",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("resumed from") && stdout.contains("checkpoint-4"),
        "{stdout}"
    );
    let got = losses(&dir.path().join("out"));
    assert_eq!(
        got, want,
        "a resumed run must reproduce the uninterrupted loss curve"
    );
}

#[test]
fn dora_from_the_wasm_plugin_trains_and_exports_peft_keys() {
    let wasm = plugin_file("dora.wasm");
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), "");
    let out = cogvx(&[
        "--plugin",
        s(&wasm),
        "--config",
        s(&config),
        "train",
        "--adapter",
        "dora",
        "--max-steps",
        "3",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let file = dir.path().join("out/pytorch_lora_weights.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let keys: Vec<&String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .collect();
    for suffix in ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"] {
        let key = format!("transformer.transformer_blocks.0.attn1.to_q.{suffix}");
        assert!(keys.iter().any(|k| **k == key), "{key} missing in {keys:?}");
    }
    let meta = safetensors_metadata(&file);
    let adapter: serde_json::Value =
        serde_json::from_str(meta["lora_adapter_metadata"].as_str().unwrap()).unwrap();
    assert_eq!(adapter["transformer.use_dora"], true, "{adapter}");
    assert_eq!(adapter["transformer.peft_type"], "LORA", "{adapter}");
    assert!(losses(&dir.path().join("out"))
        .iter()
        .all(|(_, l)| l.is_finite()));
}

/// Every file under `dir` with its size and modification time.
fn dir_listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), m.len(), m.modified().unwrap()));
        }
    }
    out.sort();
    out
}

/// Runs `train` with a config and returns (exit code, stderr); asserts that nothing was
/// prepared or trained.
fn refused(dir: &Path, config_text: &str, flags: &[&str]) -> (Option<i32>, String) {
    let config = dir.join("bad.toml");
    std::fs::write(&config, config_text).unwrap();
    let mut args = vec!["--config", s(&config), "train"];
    args.extend_from_slice(flags);
    let out = cogvx(&args);
    assert!(
        !dir.join("cache").exists(),
        "the cache was touched before the error"
    );
    assert!(!dir.join("out").join("metrics.jsonl").exists());
    (out.status.code(), text(&out).1)
}

#[test]
fn bad_input_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo();
    let model = repo.join("examples/models/cogvideox-2b-tiny");
    let data = repo.join("examples/datasets/mini");
    let base = |extra_model: &str, extra_data: &str, extra_train: &str| {
        format!(
            "[model]\npath = \"{}\"\n{extra_model}\n[data]\nroot = \"{}\"\ncache_dir = \"{}\"\n{extra_data}\n[train]\noutput_dir = \"{}\"\n{extra_train}\n",
            model.display(),
            data.display(),
            dir.path().join("cache").display(),
            dir.path().join("out").display()
        )
    };

    // An unknown key, named with the file.
    let (code, err) = refused(
        dir.path(),
        &base("", "resolution = \"9x64x96\"", "lerning_rate = 1e-4"),
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("lerning_rate"),
        "{err}"
    );

    // Frames not 8N+1; sides not multiples of 16.
    let (code, err) = refused(dir.path(), &base("", "resolution = \"10x64x96\"", ""), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("8N+1"), "{err}");
    let (_, err) = refused(dir.path(), &base("", "resolution = \"9x60x96\"", ""), &[]);
    assert!(err.contains("multiples of 16"), "{err}");

    // A text-to-video folder for an image-to-video run.
    let (code, err) = refused(
        dir.path(),
        &base("task = \"i2v\"", "resolution = \"9x64x96\"", ""),
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("task") && err.contains("text-to-video"),
        "{err}"
    );

    // A bad value, named by its key.
    let (_, err) = refused(
        dir.path(),
        &base("", "resolution = \"9x64x96\"", "adam_betas = [0.9, 1.5]"),
        &[],
    );
    assert!(err.contains("adam_betas"), "{err}");

    // An unwritable output folder (under a regular file).
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let (code, err) = refused(
        dir.path(),
        &base("", "resolution = \"9x64x96\"", ""),
        &["--output-dir", s(&blocker.join("out"))],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("output_dir") && err.contains("file/out"),
        "{err}"
    );

    // An adapter plugin that is not loaded.
    let (_, err) = refused(
        dir.path(),
        &base("", "resolution = \"9x64x96\"", "adapter = \"dora2\""),
        &[],
    );
    assert!(err.contains("dora2"), "{err}");

    // An output folder inside the model folder (an SFT export would overwrite its transformer)
    // or inside the dataset: refused, and nothing in them written (a copy of the model, in case).
    let copy = dir.path().join("model-copy");
    cogvx_fixtures::copy_dir(&model, &copy);
    let before = dir_listing(&copy);
    let with_copy = base("", "resolution = \"9x64x96\"", "adapter = \"sft\"")
        .replace(&model.display().to_string(), &copy.display().to_string());
    for out in [
        copy.clone(),
        copy.join("transformer"),
        copy.join("x/../out"),
    ] {
        let (code, err) = refused(dir.path(), &with_copy, &["--output-dir", s(&out)]);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("output_dir") && err.contains("inside [model] path"),
            "{err}"
        );
    }
    assert_eq!(dir_listing(&copy), before, "the model folder was written");
    let (code, err) = refused(
        dir.path(),
        &base("", "resolution = \"9x64x96\"", ""),
        &["--output-dir", s(&data.join("runs"))],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("inside [data] root") && !data.join("runs").exists(),
        "{err}"
    );

    // A truncated transformer (or one of another model): refused before the dataset is encoded.
    let weights = copy.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let (code, err) = refused(dir.path(), &with_copy.replace("adapter = \"sft\"", ""), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("transformer") && err.contains("model-copy"),
        "{err}"
    );
    std::fs::write(&weights, &bytes).unwrap();
    let config_path = copy.join("transformer/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("\"num_layers\": 2", "\"num_layers\": 1"),
    )
    .unwrap();
    let (code, err) = refused(dir.path(), &with_copy.replace("adapter = \"sft\"", ""), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("belong to another model"), "{err}");
    std::fs::write(&config_path, config).unwrap();

    // A released model's name that is not the folder's architecture.
    let (code, err) = refused(
        dir.path(),
        &base("name = \"cogvideox-5b\"", "resolution = \"9x64x96\"", ""),
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("[model] name") && err.contains("5b model") && err.contains("2b model"),
        "{err}"
    );

    // A rank or a validation size no machine holds: refused with the plan's numbers (a rank
    // of 1e12 aborted allocating).
    let (code, err) = refused(
        dir.path(),
        &base("", "resolution = \"9x64x96\"", "rank = 1000000000000"),
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("needs more memory") && err.contains("AdamW states"),
        "{err}"
    );
    let (code, err) = refused(
        dir.path(),
        &base("", "resolution = \"9x64x96\"", "").replace("[train]", "[validation]\nsteps = 1\nprompts = [\"x\"]\nnum_frames = 49\nheight = 16384\nwidth = 16384\n\n[train]"),
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("needs more memory") && err.contains("validation"),
        "{err}"
    );

    // A resolution no machine holds (48M tokens): the plan's numbers, before any work.
    let (code, err) = refused(
        dir.path(),
        &base(
            "",
            "resolution = \"49x30720x30720\"",
            "gradient_checkpointing = true",
        ),
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("needs more memory")
            && err.contains("peak of train")
            && err.contains("--force"),
        "{err}"
    );
}

/// The shared reference models sit beside the repository (CI and development machines).
fn shared_model(name: &str) -> PathBuf {
    cogvx_fixtures::model(name)
}

#[test]
fn image_to_video_trains_validates_with_an_image_and_samples() {
    let model = shared_model("cogvideox-5b-i2v-tiny");
    let dir = tempfile::tempdir().unwrap();
    let image = repo().join("examples/datasets/mini/videos/testsrc.mp4"); // its first frame
    let config = small_config(dir.path(), "");
    let body = std::fs::read_to_string(&config).unwrap().replace(
        "[model]\n",
        &format!(
            "[validation]\nsteps = 2\nprompts = [\"a test pattern\"]\nimages = [\"{}\"]\nnum_inference_steps = 3\nvalidators = [\"video_metrics\"]\n\n[model]\ntask = \"i2v\"\n",
            image.display()
        ),
    );
    std::fs::write(&config, body).unwrap();
    let out = cogvx(&[
        "--config",
        s(&config),
        "--model",
        s(&model),
        "train",
        "--max-steps",
        "2",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let out_dir = dir.path().join("out");
    let info = cogvx_video::probe(out_dir.join("validation/step-2/0.mp4")).unwrap();
    assert_eq!((info.width, info.height, info.frame_count), (96, 64, 9));
    // The validator's metrics are in the log.
    let log = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert!(log.contains("sharpness"), "{log}");

    // cogvx sample with the trained LoRA and a conditioning image; without one it is refused.
    let lora = out_dir.join("pytorch_lora_weights.safetensors");
    let video = dir.path().join("i2v.mp4");
    let args = [
        "--model",
        s(&model),
        "sample",
        "--lora",
        s(&lora),
        "--prompt",
        "a test pattern",
        "--steps",
        "2",
        "--out",
        s(&video),
    ];
    let out = cogvx(&args);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("image"), "{}", text(&out).1);
    let mut with_image = args.to_vec();
    with_image.extend(["--image", s(&image)]);
    let out = cogvx(&with_image);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(cogvx_video::probe(&video).unwrap().frame_count, 9);
}

#[test]
fn sft_exports_a_diffusers_transformer_folder() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), "export_dtype = \"bf16\"");
    let out = cogvx(&[
        "--config",
        s(&config),
        "train",
        "--adapter",
        "sft",
        "--max-steps",
        "2",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let exported = dir.path().join("out/transformer");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["_class_name"], "CogVideoXTransformer3DModel");
    let weights: Vec<String> = std::fs::read_dir(&exported)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(!weights.is_empty(), "no weights in {}", exported.display());
    // Stored in the configured dtype.
    let bytes = std::fs::read(exported.join(&weights[0])).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let dtypes: std::collections::BTreeSet<&str> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap())
        .collect();
    assert_eq!(dtypes.into_iter().collect::<Vec<_>>(), ["BF16"]);
    // The exported folder is a model folder's transformer: sampling with it works.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let base = repo().join("examples/models/cogvideox-2b-tiny");
    for entry in std::fs::read_dir(&base).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "transformer" {
            std::os::unix::fs::symlink(base.join(&name), model.join(&name)).unwrap();
        }
    }
    std::os::unix::fs::symlink(&exported, model.join("transformer")).unwrap();
    let video = dir.path().join("sft.mp4");
    let out = cogvx(&[
        "--model",
        s(&model),
        "sample",
        "--prompt",
        "a test pattern",
        "--steps",
        "2",
        "--out",
        s(&video),
    ]);
    assert!(out.status.success(), "{}", text(&out).1);
}

/// The issue's bar: `cogvx parity ../shared/reference/cases` passes every case, the LoRA training
/// steps of all five variants included.
#[test]
fn parity_passes_all_shared_cases_including_the_training_steps() {
    let cases = cogvx_fixtures::case("");
    let out = cogvx(&["parity", s(&cases)]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("35 cases,") && last.contains(" 0 FAIL, 0 skipped"),
        "{last}"
    );
    let lora_rows = stdout
        .lines()
        .filter(|l| l.contains("train_step_lora") && l.trim_end().ends_with("ok"))
        .count();
    assert!(
        lora_rows >= 5 * 4,
        "loss, grad norm, gradients and weights of 5 variants:\n{stdout}"
    );
}

/// The captions `index.json` of a cache holds, in dataset order.
fn cached_captions(cache: &Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json")).unwrap()).unwrap();
    let mut samples: Vec<(String, String)> = index["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["origin"].as_str().unwrap().to_string(),
                s["caption"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    samples.sort();
    samples.into_iter().map(|(_, c)| c).collect()
}

/// The third-party path: `examples/caption_cleanup`, built by plugins/build.sh to a `.wasm`
/// component and a native `.so`, is loaded by `cogvx train` from each file and rewrites the
/// captions that reach the cache (and so the T5 embeddings the run trains on).
#[test]
fn the_third_party_caption_cleanup_plugin_rewrites_cached_captions_from_wasm_and_so() {
    let data = tempfile::tempdir().unwrap();
    cogvx_fixtures::copy_dir(&repo().join("examples/datasets/mini"), data.path());
    std::fs::write(
        data.path().join("prompts.txt"),
        "  \"BW_STYLE A man talks on a car phone\"  \n\
         BW_STYLE\tCyclists   ride bikes along a street, the camera follows them\n\
         «BW_STYLE A colorful test pattern»\n\
         BW_STYLE a zoom into a mandelbrot fractal with glowing edges\n",
    )
    .unwrap();
    // Whitespace normalised, wrapping quotes stripped, lowercased, cut at 8 words.
    let want = [
        "bw_style a man talks on a car phone",
        "bw_style cyclists ride bikes along a street, the",
        "bw_style a colorful test pattern",
        "bw_style a zoom into a mandelbrot fractal with",
    ];
    for file in ["caption_cleanup.wasm", "caption_cleanup.so"] {
        let plugin = plugin_file(file);
        let dir = tempfile::tempdir().unwrap();
        let config = small_config(dir.path(), "max_steps = 2");
        let base = std::fs::read_to_string(&config).unwrap();
        let toml_text = format!(
            "plugins = [\"{}\"]\n{}\n[plugin.caption_cleanup]\nlowercase = true\nmax_words = 8\n",
            plugin.display(),
            base.replace("[data]", "[data]\nrewriters = [\"caption_cleanup\"]"),
        );
        std::fs::write(&config, toml_text).unwrap();
        let out = cogvx(&[
            "--config",
            s(&config),
            "train",
            "--data-root",
            s(data.path()),
        ]);
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "{file}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert_eq!(cached_captions(&dir.path().join("cache")), want, "{file}");
        assert_eq!(losses(&dir.path().join("out")).len(), 2, "{file}");
    }
}

/// The README's headline command, `cogvx --plugin plugins/crop_resize.wasm train --config ...`:
/// the sandboxed crop_resize component replaces the built-in one for the cache the run trains on.
#[test]
fn the_headline_command_trains_with_the_wasm_crop_resize() {
    let wasm = plugin_file("crop_resize.wasm");
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), "max_steps = 2");
    let text_before = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_before.replace(
            "[data]",
            "[data]\ntransforms = [\"frame_skip\", \"crop_resize\"]",
        ),
    )
    .unwrap();
    let out = cogvx(&["--plugin", s(&wasm), "train", "--config", s(&config)]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cache/index.json")).unwrap())
            .unwrap();
    let crop = index["transforms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "crop_resize")
        .unwrap_or_else(|| panic!("no crop_resize in {index}"));
    // A plugin loaded from a file is keyed by the file's hash (a built-in by its parameters).
    assert!(
        crop["params"].as_str().unwrap().contains("file_sha256"),
        "{crop}"
    );
    assert_eq!(losses(&dir.path().join("out")).len(), 2);
    assert!(dir
        .path()
        .join("out")
        .join("pytorch_lora_weights.safetensors")
        .exists());
}

/// The first-party `timestep_sampling` scheduler plugin, built in and loaded from its `.so` and
/// `.wasm` (which replace the built-in of the same name): `[model] scheduler` makes the run
/// draw its timesteps from the plugin's logit-normal distribution. The timesteps metrics.jsonl
/// logs (60 per run) pass a Kolmogorov-Smirnov test against the plugin's CDF at the 0.1% level
/// (critical distance 1.95 / sqrt(60) = 0.25) and fail it against the official uniform draw.
#[test]
fn the_timestep_sampling_plugin_shapes_the_trained_timesteps_from_each_file() {
    use cogvx_plugin_timestep_sampling::Sampling;
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(small_config(dir.path(), "max_steps = 15\nbatch_size = 4"))
        .unwrap();
    let (mean, std) = (2.0, 0.4);
    let sampling = Sampling::LogitNormal { mean, std };
    let n = 1000usize;
    // The CDF of the distribution over timesteps 0..n (P(timestep <= t)).
    let plugin_cdf = |t: usize| sampling.cdf((t + 1) as f64 / n as f64);
    let uniform_cdf = |t: usize| (t + 1) as f64 / n as f64;
    let ks = |drawn: &[u32], cdf: &dyn Fn(usize) -> f64| {
        let mut sorted = drawn.to_vec();
        sorted.sort();
        let m = sorted.len() as f64;
        (0..n)
            .map(|t| {
                let below = sorted.partition_point(|&x| x as usize <= t) as f64 / m;
                (below - cdf(t)).abs()
            })
            .fold(0.0, f64::max)
    };
    for file in [
        None,
        Some("timestep_sampling.so"),
        Some("timestep_sampling.wasm"),
    ] {
        let name = file.unwrap_or("built-in");
        let out = dir.path().join(format!("out-{name}"));
        let mut toml_text = base
            .replace(
                &dir.path().join("out").display().to_string(),
                &out.display().to_string(),
            )
            .replace(
                "[data]",
                "[plugin.timestep_sampling]\ndistribution = \"logit_normal\"\nmean = 2.0\nstd = 0.4\n\n[data]",
            )
            .replace("[model]", "[model]\nscheduler = \"timestep_sampling\"");
        if let Some(f) = file {
            toml_text = format!("plugins = [\"{}\"]\n{toml_text}", plugin_file(f).display());
        }
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, toml_text).unwrap();
        let out_run = cogvx(&["--config", s(&config), "train"]);
        let (stdout, stderr) = text(&out_run);
        assert!(
            out_run.status.success(),
            "{name}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let drawn: Vec<u32> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["type"] == "step")
            .flat_map(|v| {
                v["timesteps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap() as u32)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(drawn.len(), 60, "{name}");
        let (d_plugin, d_uniform) = (ks(&drawn, &plugin_cdf), ks(&drawn, &uniform_cdf));
        assert!(
            d_plugin < 0.25 && d_uniform > 0.5,
            "{name}: KS distance {d_plugin} to logit-normal({mean}, {std}), {d_uniform} to uniform; timesteps {drawn:?}"
        );
    }
}
