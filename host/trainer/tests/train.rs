//! The training loop end to end on the tiny 2B model (`shared/reference/models/cogvideox-2b-tiny`)
//! with a synthetic three-sample cache (latents `[4, 3, 4, 6]`, i.e. 9x32x48 pixels, prompt
//! embeddings `[16, 32]`), written through cogvx-cache's entry format.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::backend::Autodiff;
use cogvx_cache::{
    store, Cache, HostTensor, Index, IndexSample, ModelIdentity, INDEX, INDEX_FORMAT,
};
use cogvx_metrics::{read_steps, TensorBoardRecord};
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_plugin_api::{Metric, Plugin, PluginInfo, PluginKind, PluginResult, ValidateRequest};
use cogvx_trainer::checkpoint::{checkpoint_dir, list_checkpoints, OPTIMIZER_FILE};
use cogvx_trainer::{
    train, ExportFormat, ExportReport, LrScheduler, Resume, TrainConfig, TrainJob, TrainSummary,
    TrainerError, ValidationConfig,
};

type B = Autodiff<CpuBackend>;

/// The adapter initialisation seeds the backend's global RNG: one run at a time per process.
static RUN: Mutex<()> = Mutex::new(());

fn model_dir() -> PathBuf {
    tiny("cogvideox-2b-tiny")
}

fn tiny(name: &str) -> PathBuf {
    cogvx_fixtures::model(name)
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    cogvx_scheduler::noise::gaussian_noise(seed, n)
}

/// A cache of `n` samples with the given latent channel count.
fn make_cache(dir: &Path, n: usize, i2v: bool) -> Cache {
    make_cache_in(dir, n, i2v, |_| None)
}

/// [`make_cache`] with sample `i` in bucket `bucket(i)` (`[frames, height, width]`; `None`: the
/// index's 9x32x48).
fn make_cache_in(
    dir: &Path,
    n: usize,
    i2v: bool,
    bucket: impl Fn(usize) -> Option<[u32; 3]>,
) -> Cache {
    std::fs::create_dir_all(dir.join("latents")).unwrap();
    std::fs::create_dir_all(dir.join("prompts")).unwrap();
    let mut samples = Vec::new();
    for i in 0..n {
        let lkey = format!("{:064x}", 1000 + i);
        let pkey = format!("{:064x}", 2000 + i);
        let [f, h, w] = bucket(i).unwrap_or([9, 32, 48]).map(|x| x as usize);
        let lshape = vec![4, (f - 1) / 4 + 1, h / 8, w / 8];
        let latent = HostTensor::new(
            lshape.clone(),
            values(lshape.iter().product(), 10 + i as u64),
        );
        let prompt = HostTensor::new(vec![16, 32], values(16 * 32, 20 + i as u64));
        let image = HostTensor::new(
            vec![3, h, w],
            values(3 * h * w, 30 + i as u64)
                .into_iter()
                .map(|v| (v * 0.3).clamp(-1.0, 1.0))
                .collect(),
        );
        let mut tensors: Vec<(&str, &HostTensor)> = vec![("latent", &latent)];
        if i2v {
            tensors.push(("image", &image));
        }
        store::write_entry(
            &dir.join("latents").join(format!("{lkey}.safetensors")),
            &lkey,
            &tensors,
        )
        .unwrap();
        store::write_entry(
            &dir.join("prompts").join(format!("{pkey}.safetensors")),
            &pkey,
            &[("prompt_embedding", &prompt)],
        )
        .unwrap();
        samples.push(IndexSample {
            origin: format!("videos.txt:{}", i + 1),
            video: format!("videos/{i}.mp4"),
            caption: format!("caption {i}"),
            seed: i as u64,
            latent: lkey,
            prompt: pkey,
            image: i2v,
            resolution: bucket(i),
        });
    }
    let index = Index {
        format: INDEX_FORMAT.into(),
        model: ModelIdentity {
            vae: "test".into(),
            text: "test".into(),
        },
        transforms: Vec::new(),
        resolution: [9, 32, 48],
        buckets: (0..n).filter_map(&bucket).collect(),
        seed: 0,
        max_sequence_length: 16,
        i2v,
        samples,
    };
    std::fs::write(dir.join(INDEX), serde_json::to_vec(&index).unwrap()).unwrap();
    Cache::open(dir).unwrap()
}

/// Small, fast settings that exercise accumulation (3 samples, 2 micro-batches per step: windows
/// of 2 then 1 per epoch), a decaying schedule with warmup, clipping and keep-last-K.
fn config(out: &Path, max_steps: u64, checkpointing_steps: u64) -> TrainConfig {
    TrainConfig {
        rank: 4,
        alpha: 2.0,
        learning_rate: 1e-3,
        lr_scheduler: LrScheduler::Linear,
        lr_warmup_steps: 1,
        max_steps: Some(max_steps),
        gradient_accumulation_steps: 2,
        checkpointing_steps,
        checkpoints_total_limit: Some(2),
        output_dir: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

/// Runs a job as `cogvx train` does on the CPU: mixed precision on burn's flex backend.
fn run(job: TrainJob<'_>) -> Result<TrainSummary, TrainerError> {
    let _guard = RUN.lock().unwrap_or_else(|e| e.into_inner());
    if job.config.mixed_precision.is_half() {
        train::<Autodiff<cogvx_model_core::FlexBackend>>(job, &Default::default())
    } else {
        train::<B>(job, &CpuDevice::default())
    }
}

fn job<'a>(model: &Path, cache: &Cache, config: TrainConfig) -> TrainJob<'a> {
    let mut j = TrainJob::new(model, cache.clone(), config);
    j.progress = false;
    j
}

fn bits(losses: &[(u64, f64)]) -> Vec<(u64, u64)> {
    losses.iter().map(|(s, l)| (*s, l.to_bits())).collect()
}

#[test]
fn resume_continues_the_same_loss_curve() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 3, false);

    // 2N = 6 steps without interruption.
    let full_out = tmp.path().join("full");
    let full = run(job(&model, &cache, config(&full_out, 6, 3))).unwrap();
    assert_eq!(bits(&full.losses).len(), 6);
    assert!(full.exported.is_some());

    // N = 3 steps, stopped (a checkpoint is written at the stop), then resumed for N more.
    let out = tmp.path().join("split");
    let mut stop = |r: &cogvx_metrics::StepRecord| r.step == 3;
    let mut first = job(&model, &cache, config(&out, 6, 3));
    first.on_step = Some(&mut stop);
    let a = run(first).unwrap();
    assert!(a.stopped_early);
    assert_eq!((a.step, a.exported.as_ref()), (3, None));
    let mut second = job(&model, &cache, config(&out, 6, 3));
    second.resume = Some(Resume::Latest);
    let b = run(second).unwrap();
    assert_eq!(b.resumed_from, Some(checkpoint_dir(&out, 3)));
    assert_eq!(b.start_step, 3);

    let mut joined = a.losses.clone();
    joined.extend(b.losses.clone());
    assert_eq!(
        bits(&joined),
        bits(&full.losses),
        "resumed {joined:?}\nuninterrupted {:?}",
        full.losses
    );

    // The same final weights, byte for byte.
    let lora = |dir: &Path| std::fs::read(dir.join(cogvx_train::LORA_WEIGHTS_NAME)).unwrap();
    assert_eq!(lora(&out), lora(&full_out));

    // metrics.jsonl holds one continuous curve; 2 steps per epoch (3 samples, accumulation 2).
    let steps = read_steps(&out.join(cogvx_trainer::METRICS_FILE)).unwrap();
    assert_eq!(
        steps.iter().map(|r| r.step).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        steps.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        [0, 0, 1, 1, 2, 2]
    );
    assert_eq!(
        steps.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>(),
        bits(&full.losses).iter().map(|x| x.1).collect::<Vec<_>>()
    );
    // Linear schedule, 1 warmup step: lr 0 at the first update, then (6 - s) / 5 * 1e-3.
    assert_eq!(steps[0].lr, 0.0);
    assert!(
        (steps[1].lr - 1e-3).abs() < 1e-15 && (steps[5].lr - 0.2e-3).abs() < 1e-15,
        "{steps:?}"
    );
    assert!(steps
        .iter()
        .all(|r| r.grad_norm.is_finite() && r.grad_norm > 0.0));
    assert!(out.join(cogvx_trainer::LOSS_PLOT_FILE).is_file());
    // TensorBoard: one event file per segment, the second starting at step 4; read in order,
    // they show the uninterrupted run's curve (as f32) and one timestep histogram per step.
    let tb = out.join(cogvx_trainer::TENSORBOARD_DIR);
    assert_eq!(cogvx_metrics::event_files(&tb).unwrap().len(), 2);
    let records = cogvx_metrics::read_events(&tb).unwrap();
    assert!(records.contains(&TensorBoardRecord::Start { step: 4 }));
    let f32_curve = |losses: &[(u64, f64)]| -> Vec<(i64, f32)> {
        losses.iter().map(|&(s, l)| (s as i64, l as f32)).collect()
    };
    assert_eq!(
        cogvx_metrics::scalar_series(&records, "train/loss"),
        f32_curve(&full.losses)
    );
    assert_eq!(
        cogvx_metrics::scalar_series(&records, "train/lr")[1],
        (2, 1e-3f32)
    );
    // The histograms hold each step's timesteps (as metrics.jsonl lists them).
    let histograms: Vec<(i64, f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            TensorBoardRecord::Histogram {
                tag,
                step,
                count,
                sum,
            } if tag == "train/timesteps" => Some((*step, *count, *sum)),
            _ => None,
        })
        .collect();
    let expected: Vec<(i64, f64, f64)> = steps
        .iter()
        .map(|r| {
            let t = &r.timesteps;
            (
                r.step as i64,
                t.len() as f64,
                t.iter().map(|&x| x as f64).sum(),
            )
        })
        .collect();
    // 3 samples, accumulation 2: each epoch's steps train 2 samples, then the last one.
    assert_eq!(
        expected.iter().map(|e| e.1).collect::<Vec<_>>(),
        [2.0, 1.0, 2.0, 1.0, 2.0, 1.0]
    );
    assert_eq!(histograms, expected);
    // keep-last-2: checkpoints 3 and 6.
    let kept: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, [3, 6]);
}

const KILL_ENV: &str = "COGVX_TRAINER_KILL_TEST_OUT";

fn kill_config(out: &Path) -> TrainConfig {
    TrainConfig {
        checkpoints_total_limit: None,
        ..config(out, 4, 1)
    }
}

#[test]
fn killed_checkpoint_write_leaves_previous_usable() {
    let model = model_dir();
    if let Ok(out) = std::env::var(KILL_ENV) {
        // Child: train, and abort the process in the middle of writing checkpoint-2 (after its
        // weights file, before its optimizer and state files).
        let out = PathBuf::from(out);
        let cache = Cache::open(out.parent().unwrap().join("cache")).unwrap();
        let abort = |p: &Path| {
            let in_tmp = p
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().starts_with(".checkpoint-2.tmp-"))
                .unwrap_or(false);
            if in_tmp && p.file_name().unwrap() != OPTIMIZER_FILE {
                std::process::abort();
            }
        };
        let mut j = job(&model, &cache, kill_config(&out));
        j.on_checkpoint_file = Some(&abort);
        let _ = run(j);
        panic!("the child should have been killed while writing checkpoint-2");
    }

    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 3, false);
    let out = tmp.path().join("out");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_checkpoint_write_leaves_previous_usable",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(KILL_ENV, &out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child run was not killed");
    // The partial write is a hidden temp folder; checkpoint-1 is intact and the only one listed.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with(".checkpoint-2.tmp-")),
        "{names:?}"
    );
    assert!(!out.join("checkpoint-2").exists(), "{names:?}");
    let listed: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(listed, [1]);

    let mut resumed = job(&model, &cache, kill_config(&out));
    resumed.resume = Some(Resume::Latest);
    let r = run(resumed).unwrap();
    assert_eq!(r.resumed_from, Some(checkpoint_dir(&out, 1)));
    assert_eq!(r.losses.iter().map(|x| x.0).collect::<Vec<_>>(), [2, 3, 4]);
    // The temp folder was cleaned up and the resumed run matches an uninterrupted one.
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp-")));
    let full = run(job(&model, &cache, kill_config(&tmp.path().join("full")))).unwrap();
    assert_eq!(bits(&r.losses), bits(&full.losses[1..]));
}

/// A validator that reports the mean brightness and the frame count.
struct Brightness;

impl Plugin for Brightness {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "brightness".into(),
            version: "0.1.0".into(),
            kinds: vec![PluginKind::Validator],
            description: "test".into(),
        }
    }
    fn validate(&mut self, request: &ValidateRequest) -> PluginResult<Vec<Metric>> {
        let f = &request.frames;
        let mean = f.rgb.iter().map(|v| *v as f64).sum::<f64>() / f.rgb.len() as f64;
        Ok(vec![
            Metric {
                name: "mean".into(),
                value: mean,
            },
            Metric {
                name: "frames".into(),
                value: f.count as f64,
            },
        ])
    }
}

/// A validator that fails on its first video and scores NaN on the next.
struct Flaky(u32);

impl Plugin for Flaky {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "flaky".into(),
            version: "0.1.0".into(),
            kinds: vec![PluginKind::Validator],
            description: "test".into(),
        }
    }
    fn validate(&mut self, _: &ValidateRequest) -> PluginResult<Vec<Metric>> {
        self.0 += 1;
        match self.0 {
            1 => Err(cogvx_plugin_api::PluginError::Failed(
                "flaky: no score this time".into(),
            )),
            _ => Ok(vec![Metric {
                name: "score".into(),
                value: f64::NAN,
            }]),
        }
    }
}

/// A validator's failure marks that validation failed and training goes on (it aborted the
/// run); a NaN score is logged as null.
#[test]
fn a_failing_validator_does_not_stop_training() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, false);
    let out = tmp.path().join("out");
    let mut cfg = config(&out, 4, 100);
    cfg.gradient_accumulation_steps = 1;
    let mut flaky = Flaky(0);
    let mut j = job(&model, &cache, cfg);
    j.validation = ValidationConfig {
        steps: 2,
        prompts: vec!["a red cube".into()],
        num_inference_steps: 1,
        validators: vec!["flaky".into()],
        ..ValidationConfig::default()
    };
    j.validators = vec![&mut flaky];
    let s = run(j).unwrap();
    assert_eq!(s.step, 4);
    let log = std::fs::read_to_string(out.join(cogvx_trainer::METRICS_FILE)).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "validation")
        .collect();
    assert_eq!(events.len(), 2, "{log}");
    assert!(
        events[0]["flaky.error"]
            .as_str()
            .unwrap()
            .contains("no score this time"),
        "{}",
        events[0]
    );
    assert!(
        events[1]["flaky.score"].is_null() && events[1].get("flaky.error").is_none(),
        "{}",
        events[1]
    );
}

#[test]
fn lora_export_validation_videos_and_validator_metrics() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, false);
    let out = tmp.path().join("out");
    let mut cfg = config(&out, 4, 100);
    cfg.gradient_accumulation_steps = 1;
    cfg.lr_scheduler = LrScheduler::Constant;
    let mut brightness = Brightness;
    let mut j = job(&model, &cache, cfg);
    j.validation = ValidationConfig {
        steps: 2,
        prompts: vec!["a red cube".into()],
        num_inference_steps: 2,
        validators: vec!["brightness".into(), "video_metrics".into()],
        ..ValidationConfig::default()
    };
    let mut video_metrics = cogvx_plugin_video_metrics::VideoMetricsPlugin::default();
    j.validators = vec![&mut video_metrics, &mut brightness];
    let s = run(j).unwrap();
    // Validation at steps 2 and 4 (the end), one video each.
    assert_eq!(
        s.validation_videos,
        [
            out.join("validation/step-2/0.mp4"),
            out.join("validation/step-4/0.mp4")
        ]
    );
    for v in &s.validation_videos {
        let info = cogvx_video::probe(v).unwrap();
        assert_eq!(
            (info.width, info.height, info.frame_count),
            (48, 32, 9),
            "{info:?}"
        );
        assert!(
            (info.fps - 8.0).abs() < 1e-6,
            "CogVideoX 1.0 videos are 8 fps: {}",
            info.fps
        );
    }
    let log = std::fs::read_to_string(out.join(cogvx_trainer::METRICS_FILE)).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "validation")
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["step"], 2);
    assert_eq!(events[0]["brightness.frames"], 9.0);
    assert!(events[0]["brightness.mean"].as_f64().unwrap() > 0.0);
    // The shipped validator's metrics, under `video_metrics.<name>`.
    for m in [
        "brightness",
        "flicker_mean_luma",
        "flicker_pixel",
        "sharpness",
    ] {
        assert!(
            events[1][format!("video_metrics.{m}")]
                .as_f64()
                .is_some_and(f64::is_finite),
            "{m}: {}",
            events[1]
        );
    }
    // Each video's frame strip: a PNG beside it, and in TensorBoard with the scores.
    let records = cogvx_metrics::read_events(&out.join(cogvx_trainer::TENSORBOARD_DIR)).unwrap();
    for (k, step) in [2i64, 4].into_iter().enumerate() {
        let png = std::fs::read(out.join(format!("validation/step-{step}/0.png"))).unwrap();
        let strip = image::load_from_memory(&png).unwrap();
        // 8 of the 9 frames of 48x32, 2-pixel gaps.
        assert_eq!((strip.width(), strip.height()), (2 + 8 * 50, 36));
        assert!(records.contains(&TensorBoardRecord::Image {
            tag: "validation/0".into(),
            step,
            width: 402,
            height: 36,
            png,
        }));
        let mean = cogvx_metrics::scalar_series(&records, "validation/0/brightness.mean")[k];
        assert_eq!(
            mean,
            (step, events[k]["brightness.mean"].as_f64().unwrap() as f32)
        );
    }
    // The LoRA export loads back with the configured rank, alpha and targets.
    let lora = cogvx_train::load_lora(s.exported.as_ref().unwrap()).unwrap();
    let meta = lora.metadata.expect("adapter metadata");
    assert_eq!((meta.rank, meta.alpha), (4, 2.0));
    assert_eq!(
        lora.tensors.len(),
        2 * 4 * 2,
        "2 blocks x 4 targets x (A, B)"
    );
    // The final checkpoint (step 4) is written even though 4 is not a multiple of 100.
    assert_eq!(s.last_checkpoint, Some(checkpoint_dir(&out, 4)));
}

/// A copy of a model folder (files copied, so they can be replaced).
/// Validation samples from prompt embeddings computed before the transformer is loaded and kept
/// in the prompt cache: once they are cached, training validates with a model folder whose T5
/// weights are unreadable (same name and size, so the same identity), and the video is the one
/// sampled with T5 itself.
#[test]
fn validation_samples_from_prompt_embeddings_computed_before_training() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, false);
    let prompts_before = std::fs::read_dir(cache.dir.join("prompts"))
        .unwrap()
        .count();
    let validated = |model: &Path, out: &Path| {
        let mut cfg = config(out, 1, 100);
        cfg.gradient_accumulation_steps = 1;
        let mut j = job(model, &cache, cfg);
        j.validation = ValidationConfig {
            steps: 1,
            prompts: vec!["a red cube".into()],
            num_inference_steps: 2,
            ..ValidationConfig::default()
        };
        run(j)
    };
    let first = validated(&model, &tmp.path().join("out-1")).unwrap();
    // The validation prompt and the negative prompt "" (guidance 6 > 1) joined the cache.
    assert_eq!(
        std::fs::read_dir(cache.dir.join("prompts"))
            .unwrap()
            .count(),
        prompts_before + 2
    );

    let copy = tmp.path().join("model");
    cogvx_fixtures::copy_dir(&model, &copy);
    let weights = copy.join("text_encoder").join("model.safetensors");
    let size = std::fs::metadata(&weights).unwrap().len() as usize;
    std::fs::write(&weights, vec![0u8; size]).unwrap();
    let second = validated(&copy, &tmp.path().join("out-2")).unwrap();
    assert_eq!(
        std::fs::read(&first.validation_videos[0]).unwrap(),
        std::fs::read(&second.validation_videos[0]).unwrap(),
        "the video sampled from cached embeddings differs from the one sampled after encoding"
    );

    // With the cache's prompt entries gone, training must encode them again: it reports the
    // unreadable T5 weights (before any training step).
    for e in std::fs::read_dir(cache.dir.join("prompts")).unwrap() {
        let p = e.unwrap().path();
        if !cache
            .index
            .samples
            .iter()
            .any(|s| p.file_stem().is_some_and(|n| n == s.prompt.as_str()))
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let e = validated(&copy, &tmp.path().join("out-3"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_encoder"), "{e}");
    assert!(!tmp
        .path()
        .join("out-3")
        .join(cogvx_trainer::METRICS_FILE)
        .exists());
}

#[test]
fn bad_inputs_fail_before_any_work() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 1, false);
    let err = |j: TrainJob<'_>| run(j).unwrap_err().to_string();

    // An output folder that is a file.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = err(job(&model, &cache, config(&file, 1, 1)));
    assert!(e.contains("a-file"), "{e}");

    // An output folder inside the model folder: refused before anything is written there.
    let e = err(job(
        &model,
        &cache,
        config(&model.join("transformer").join("run"), 1, 1),
    ));
    assert!(e.contains("inside [model] path"), "{e}");
    assert!(!model.join("transformer").join("run").exists());

    let out = tmp.path().join("out");
    // An adapter plugin that was not loaded.
    let e = err(job(
        &model,
        &cache,
        TrainConfig {
            adapter: "dora".into(),
            ..config(&out, 1, 1)
        },
    ));
    assert!(e.contains("`adapter`") && e.contains("dora"), "{e}");
    // A validator that was not loaded.
    let mut j = job(&model, &cache, config(&out, 1, 1));
    j.validation = ValidationConfig {
        steps: 1,
        prompts: vec!["x".into()],
        validators: vec!["flicker".into()],
        ..ValidationConfig::default()
    };
    let e = err(j);
    assert!(
        e.contains("validation.validators") && e.contains("flicker"),
        "{e}"
    );
    // A bad value.
    let e = err(job(
        &model,
        &cache,
        TrainConfig {
            batch_size: 0,
            ..config(&out, 1, 1)
        },
    ));
    assert!(e.contains("`batch_size`"), "{e}");
    // An I2V cache for a T2V model.
    let i2v_cache = make_cache(&tmp.path().join("cache-i2v"), 1, true);
    let e = err(job(&model, &i2v_cache, config(&out, 1, 1)));
    assert!(
        e.contains("image-to-video") && e.contains("text-to-video"),
        "{e}"
    );
    // A resume path that is not a checkpoint.
    let mut j = job(&model, &cache, config(&out, 1, 1));
    j.resume = Some(Resume::Path(tmp.path().join("nope")));
    let e = err(j);
    assert!(e.contains("nope"), "{e}");
    // Nothing was trained: no checkpoint, no export.
    assert!(list_checkpoints(&out).unwrap().is_empty());
    assert!(!out.join(cogvx_train::LORA_WEIGHTS_NAME).exists());
}

#[test]
fn resume_refuses_other_adapter_settings() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, false);
    let out = tmp.path().join("out");
    run(job(&model, &cache, config(&out, 1, 1))).unwrap();
    let mut j = job(
        &model,
        &cache,
        TrainConfig {
            rank: 8,
            ..config(&out, 2, 1)
        },
    );
    j.resume = Some(Resume::Latest);
    let e = run(j).unwrap_err().to_string();
    assert!(e.contains("`rank` = 4 there, 8 now"), "{e}");
    // Extending a finished run with more steps works.
    let mut j = job(&model, &cache, config(&out, 2, 1));
    j.resume = Some(Resume::Latest);
    let s = run(j).unwrap();
    assert_eq!((s.start_step, s.step), (1, 2));
}

#[test]
fn resume_refuses_another_data_model_or_plugin_config_and_logs_moved_folders() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, false);
    let out = tmp.path().join("out");
    let run_config = |resolution: &str, root: &str, crop: &str| {
        serde_json::json!({
            "model": {"path": "/models/a"},
            "data": {"resolution": resolution, "root": root, "transforms": ["frame_skip", "crop_resize"]},
            "plugin": {"crop_resize": {"mode": crop}},
            "train": {"rank": 4},
        })
    };
    let mut j = job(&model, &cache, config(&out, 1, 1));
    j.run_config = Some(run_config("9x32x48", "/data/a", "center"));
    run(j).unwrap();
    let saved = cogvx_trainer::read_checkpoint(&out.join("checkpoint-1")).unwrap();
    assert_eq!(
        saved.state.run_config,
        Some(run_config("9x32x48", "/data/a", "center"))
    );

    // Another resolution and another plugin table: refused, naming both keys.
    let mut j = job(&model, &cache, config(&out, 2, 1));
    j.resume = Some(Resume::Latest);
    j.run_config = Some(run_config("9x64x96", "/data/a", "random"));
    let e = run(j).unwrap_err().to_string();
    assert!(
        e.contains("`data.resolution` = \"9x32x48\" there, \"9x64x96\" now"),
        "{e}"
    );
    assert!(
        e.contains("`plugin.crop_resize.mode`") && e.contains("another output_dir"),
        "{e}"
    );
    // A moved dataset folder is not another run.
    let mut j = job(&model, &cache, config(&out, 2, 1));
    j.resume = Some(Resume::Latest);
    j.run_config = Some(run_config("9x32x48", "/data/moved", "center"));
    let s = run(j).unwrap();
    assert_eq!((s.start_step, s.step), (1, 2));
}

/// A bit flipped in a saved checkpoint is found by its checksum: `--resume latest` goes back to
/// the previous checkpoint, and with every checkpoint damaged it is an error (not a fresh start).
#[test]
fn damaged_checkpoints_are_found_and_skipped() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 4, false);
    let out = tmp.path().join("out");
    run(job(
        &model,
        &cache,
        TrainConfig {
            checkpoints_total_limit: None,
            ..config(&out, 2, 1)
        },
    ))
    .unwrap();
    let flip = |step: u64| {
        let path = out
            .join(format!("checkpoint-{step}"))
            .join(cogvx_trainer::checkpoint::WEIGHTS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
    };
    flip(2);
    let e = cogvx_trainer::checkpoint::read_checkpoint(&out.join("checkpoint-2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("checksum does not match"), "{e}");
    let mut j = job(
        &model,
        &cache,
        TrainConfig {
            checkpoints_total_limit: None,
            ..config(&out, 2, 1)
        },
    );
    j.resume = Some(Resume::Latest);
    let s = run(j).unwrap();
    assert_eq!(
        (s.start_step, s.step),
        (1, 2),
        "resumed from the previous checkpoint"
    );
    // checkpoint-2 was written again by that run; damage both.
    flip(1);
    flip(2);
    let mut j = job(
        &model,
        &cache,
        TrainConfig {
            checkpoints_total_limit: None,
            ..config(&out, 3, 1)
        },
    );
    j.resume = Some(Resume::Latest);
    let e = run(j).unwrap_err().to_string();
    assert!(
        e.contains("every checkpoint under") && e.contains("damaged"),
        "{e}"
    );
}

/// Two runs in one output folder: the second is refused naming the first (it deleted the
/// first run's checkpoint being written, and the first run died); the lock goes with its holder.
#[test]
fn a_second_run_in_the_same_output_folder_is_refused() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 1, false);
    let out = tmp.path().join("out");
    let held = cogvx_trainer::lock::OutputLock::acquire(&out).unwrap();
    let e = run(job(&model, &cache, config(&out, 1, 1)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("in use by another cogvx run")
            && e.contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    assert!(list_checkpoints(&out).unwrap().is_empty());
    drop(held);
    run(job(&model, &cache, config(&out, 1, 1))).unwrap();
}

/// A hand-edited or corrupted `trainer_state.json` is an error naming the field (it panicked
/// indexing the data order with `data.batch = 1000`), and the run it would resume is untouched.
#[test]
fn resume_checks_every_field_it_reads_from_the_checkpoint() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    // 4 samples, batch 1, accumulation 2: 4 batches and 2 updates per epoch.
    let cache = make_cache(&tmp.path().join("cache"), 4, false);
    let out = tmp.path().join("out");
    run(job(&model, &cache, config(&out, 1, 1))).unwrap();
    let state_path = out
        .join("checkpoint-1")
        .join(cogvx_trainer::checkpoint::STATE_FILE);
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    // An edit is first caught by the checksum; without checksums (older checkpoints, or a
    // state written by another tool) every field is still checked.
    let mut v = good.clone();
    v["data"]["batch"] = 1000.into();
    std::fs::write(&state_path, serde_json::to_string(&v).unwrap()).unwrap();
    let e = cogvx_trainer::checkpoint::read_checkpoint(&out.join("checkpoint-1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("checksum does not match"), "{e}");
    std::fs::remove_file(
        out.join("checkpoint-1")
            .join(cogvx_trainer::checkpoint::CHECKSUMS_FILE),
    )
    .unwrap();
    assert_eq!(
        (good["step"].as_u64(), good["data"]["batch"].as_u64()),
        (Some(1), Some(2))
    );
    type Edit = (&'static str, fn(&mut serde_json::Value), &'static str);
    let edits: [Edit; 6] = [
        (
            "batch past the epoch",
            |v| v["data"]["batch"] = 1000.into(),
            "`data.batch` = 1000",
        ),
        (
            "batch inside an accumulation window",
            |v| v["data"]["batch"] = 1.into(),
            "`step` = 1 does not match",
        ),
        (
            "step of another position",
            |v| v["step"] = 7.into(),
            "`step` = 7 does not match",
        ),
        (
            "epoch overflowing the step",
            |v| v["data"]["epoch"] = u64::MAX.into(),
            "does not match",
        ),
        (
            "negative time",
            |v| v["elapsed_s"] = (-1.0).into(),
            "`elapsed_s`",
        ),
        (
            "negative learning rate",
            |v| v["last_lr"] = (-0.5).into(),
            "`last_lr`",
        ),
    ];
    for (what, edit, expect) in edits {
        let mut v = good.clone();
        edit(&mut v);
        std::fs::write(&state_path, serde_json::to_string(&v).unwrap()).unwrap();
        let mut j = job(&model, &cache, config(&out, 2, 1));
        j.resume = Some(Resume::Path(out.join("checkpoint-1")));
        let e = run(j)
            .map(|s| format!("{s:?}"))
            .unwrap_or_else(|e| e.to_string());
        assert!(
            e.contains(expect) && e.contains("trainer_state.json"),
            "{what}: {e}"
        );
        assert!(!out.join("checkpoint-2").exists(), "{what}: trained on");
    }
    // The untouched state resumes.
    std::fs::write(&state_path, serde_json::to_string(&good).unwrap()).unwrap();
    let mut j = job(&model, &cache, config(&out, 2, 1));
    j.resume = Some(Resume::Path(out.join("checkpoint-1")));
    assert_eq!(run(j).unwrap().step, 2);
}

/// Runs `config` for 4 steps uninterrupted, and again as 2 steps + a resume of 2 (a fresh
/// adapter plugin from `plugin` for each run); asserts identical losses and returns the
/// uninterrupted summary and output folder.
fn split_run_matches(
    model: &Path,
    cache: &Cache,
    root: &Path,
    config: impl Fn(&Path) -> TrainConfig,
    plugin: impl Fn() -> Option<Box<dyn Plugin>>,
) -> (TrainSummary, PathBuf) {
    let go = |out: &Path, stop_at: Option<u64>, resume: bool| {
        let mut p = plugin();
        let mut stop = |r: &cogvx_metrics::StepRecord| Some(r.step) == stop_at;
        let mut j = job(model, cache, config(out));
        j.adapter_plugin = p.as_deref_mut().map(|p| p as &mut dyn Plugin);
        j.on_step = Some(&mut stop);
        if resume {
            j.resume = Some(Resume::Latest);
        }
        run(j).unwrap()
    };
    let full_out = root.join("full");
    let full = go(&full_out, None, false);
    let split = root.join("split");
    let a = go(&split, Some(2), false);
    assert!(a.stopped_early);
    let b = go(&split, None, true);
    assert_eq!(b.start_step, 2);
    let mut joined = a.losses;
    joined.extend(b.losses);
    assert_eq!(
        bits(&joined),
        bits(&full.losses),
        "resumed {joined:?}\nuninterrupted {:?}",
        full.losses
    );
    assert!(full.losses.iter().all(|(_, l)| l.is_finite()));
    (full, full_out)
}

/// `[data] buckets`: five samples in two buckets (9x32x48 and 9x48x32) with batch size 2 train
/// in batches of one bucket each (a mixed batch is refused by the batcher), 2 + 1 batches per
/// epoch, every sample once per epoch, and resume exactly.
#[test]
fn bucketed_batches_hold_one_bucket_and_resume_exactly() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache_in(&tmp.path().join("cache"), 5, false, |i| {
        Some(if i % 2 == 0 { [9, 32, 48] } else { [9, 48, 32] })
    });
    let cfg = |out: &Path| TrainConfig {
        batch_size: 2,
        gradient_accumulation_steps: 1,
        ..config(out, 6, 3)
    };
    let (full, out) = split_run_matches(&model, &cache, tmp.path(), cfg, || None);
    assert_eq!(full.losses.len(), 6);
    let steps = read_steps(&out.join(cogvx_trainer::METRICS_FILE)).unwrap();
    // Three batches an epoch (two of 9x32x48 samples 0, 2, 4; one of 1, 3), two epochs.
    assert_eq!(
        steps.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 1]
    );
    for epoch in steps.chunks(3) {
        let mut sizes: Vec<usize> = epoch.iter().map(|r| r.timesteps.len()).collect();
        sizes.sort();
        assert_eq!(sizes, [1, 2, 2], "{steps:?}");
    }
}

#[test]
fn i2v_15_trains_with_noisy_image_latents_and_resumes_exactly() {
    let model = tiny("cogvideox1.5-5b-i2v-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, true);
    let (full, out) =
        split_run_matches(&model, &cache, tmp.path(), |out| config(out, 4, 2), || None);
    assert_eq!(
        full.exported,
        Some(out.join(cogvx_train::LORA_WEIGHTS_NAME))
    );
}

#[test]
fn dora_plugin_adapter_trains_resumes_and_exports_peft_names() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, false);
    let cfg = |out: &Path| TrainConfig {
        adapter: "dora".into(),
        ..config(out, 4, 2)
    };
    let (full, _) = split_run_matches(&model, &cache, tmp.path(), cfg, || {
        Some(Box::new(cogvx_plugin_dora::Dora::default()))
    });
    let loaded = cogvx_train::load_adapter(full.exported.as_ref().unwrap()).unwrap();
    let names: Vec<&String> = loaded.tensors.keys().collect();
    assert!(
        names
            .iter()
            .any(|n| n.ends_with("attn1.to_q.lora_magnitude_vector")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.ends_with("attn1.to_out.0.lora_B.weight")),
        "{names:?}"
    );
    assert!(loaded.metadata.expect("PEFT metadata").use_dora);
    // A plugin of another name than `adapter` is refused.
    let mut dora = cogvx_plugin_dora::Dora::default();
    let mut j = job(
        &model,
        &cache,
        TrainConfig {
            adapter: "loha".into(),
            ..config(&tmp.path().join("x"), 1, 1)
        },
    );
    j.adapter_plugin = Some(&mut dora);
    let e = run(j).unwrap_err().to_string();
    assert!(e.contains("loha") && e.contains("dora"), "{e}");
}

#[test]
fn sft_trains_every_weight_resumes_and_exports_a_transformer_folder() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 2, false);
    let cfg = |out: &Path| TrainConfig {
        adapter: "sft".into(),
        learning_rate: 1e-4,
        ..config(out, 4, 2)
    };
    let (full, out) = split_run_matches(&model, &cache, tmp.path(), cfg, || None);
    let dir = full.exported.clone().unwrap();
    assert_eq!(dir, out.join(cogvx_trainer::SFT_EXPORT_DIR));
    // The folder loads as a transformer, and its weights moved away from the base model's.
    let device = CpuDevice::default();
    let trained =
        cogvx_transformer::CogVideoXTransformer3DModel::<CpuBackend>::from_dir(&dir, &device)
            .unwrap();
    let base = cogvx_transformer::CogVideoXTransformer3DModel::<CpuBackend>::from_dir(
        &model.join("transformer"),
        &device,
    )
    .unwrap();
    let w = |m: &cogvx_transformer::CogVideoXTransformer3DModel<CpuBackend>| {
        m.transformer_blocks[0]
            .attn1
            .to_q
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    let (a, b) = (w(&trained), w(&base));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(&b).any(|(x, y)| x != y),
        "SFT left to_q unchanged"
    );
}

#[test]
fn i2v_validation_samples_from_the_conditioning_image() {
    let model = tiny("cogvideox1.5-5b-i2v-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 1, true);
    // The conditioning image (anything FFmpeg decodes; here a one-frame clip of 64x40).
    let (w, h) = (64u32, 40u32);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    let image = tmp.path().join("cond.mp4");
    cogvx_video::encode_mp4(
        &image,
        &cogvx_plugin_api::Frames {
            width: w,
            height: h,
            count: 1,
            rgb,
        },
        8.0,
        &Default::default(),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let mut j = job(&model, &cache, config(&out, 1, 1));
    j.validation = ValidationConfig {
        steps: 1,
        prompts: vec!["a cat".into()],
        images: vec![image],
        num_inference_steps: 2,
        ..ValidationConfig::default()
    };
    let s = run(j).unwrap();
    assert_eq!(s.validation_videos, [out.join("validation/step-1/0.mp4")]);
    let info = cogvx_video::probe(&s.validation_videos[0]).unwrap();
    assert_eq!((info.width, info.height), (48, 32));
    assert!(
        (info.fps - 16.0).abs() < 1e-6,
        "CogVideoX 1.5 videos are 16 fps: {}",
        info.fps
    );
    // Without images an I2V model's validation is refused before training.
    let mut j = job(&model, &cache, config(&tmp.path().join("out2"), 1, 1));
    j.validation = ValidationConfig {
        steps: 1,
        prompts: vec!["a cat".into()],
        ..ValidationConfig::default()
    };
    let e = run(j).unwrap_err().to_string();
    assert!(e.contains("validation.images"), "{e}");
    assert!(!tmp.path().join("out2").join("checkpoint-1").exists());
}

/// Mixed precision on the CPU (burn's flex backend; ndarray has no half types): the tiny 2B
/// model's LoRA loss curve in bf16 and in fp16 follows the f32 one. The transformer's output in
/// bf16 is within 0.7% (relative L2) of f32's (fp16: 0.08%, the transformer parity test), the
/// loss is a mean of squared differences with the target, and eight steps at lr 1e-3 move the
/// LoRA weights by about 1e-2. Measured: at most 3.5e-3 (bf16) and 7.5e-4 (fp16) relative
/// difference at any step; the bounds are 1e-2 and 3e-3.
#[test]
fn mixed_precision_loss_curves_follow_the_f32_curve() {
    use cogvx_model_core::precision::MixedPrecision;
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 3, false);
    let run_flex = |name: &str, mixed_precision: MixedPrecision| {
        let cfg = TrainConfig {
            mixed_precision,
            gradient_accumulation_steps: 1,
            ..config(&tmp.path().join(name), 8, 8)
        };
        if mixed_precision == MixedPrecision::No {
            // f32 on flex too: the comparison is of precisions, not backends.
            let _guard = RUN.lock().unwrap_or_else(|e| e.into_inner());
            train::<Autodiff<cogvx_model_core::FlexBackend>>(
                job(&model, &cache, cfg),
                &Default::default(),
            )
            .unwrap()
        } else {
            run(job(&model, &cache, cfg)).unwrap()
        }
    };
    let f32_run = run_flex("f32", MixedPrecision::No);
    for (mp, tol) in [(MixedPrecision::Bf16, 1e-2), (MixedPrecision::Fp16, 3e-3)] {
        let half = run_flex(mp.name(), mp);
        assert_eq!(half.losses.len(), f32_run.losses.len());
        let worst = half
            .losses
            .iter()
            .zip(&f32_run.losses)
            .map(|((_, a), (_, b))| ((a - b) / b).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "{}: worst relative loss difference {worst:.3e}, skipped steps {:?}",
            mp.name(),
            half.skipped_steps
        );
        assert!(
            worst <= tol,
            "{}: {:?}\nf32: {:?}",
            mp.name(),
            half.losses,
            f32_run.losses
        );
        // The trained LoRA moved (a skipped or broken update would leave lora_B at zero).
        let lora = std::fs::read(
            tmp.path()
                .join(mp.name())
                .join(cogvx_train::LORA_WEIGHTS_NAME),
        )
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&lora).unwrap();
        let (_, b) = st
            .tensors()
            .into_iter()
            .find(|(n, _)| n.ends_with("lora_B.weight"))
            .unwrap();
        assert!(
            b.data().iter().any(|x| *x != 0),
            "{}: lora_B is still zero",
            mp.name()
        );
    }
}

/// `gradient_checkpointing_offload`: the blocks' bf16 inputs through host memory and back give
/// the losses of checkpointing on the device, bit for bit; without checkpointing the key is
/// refused, naming it.
#[test]
fn offloaded_checkpoints_train_as_the_device_ones() {
    use cogvx_model_core::precision::MixedPrecision;
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 3, false);
    let go = |name: &str, offload: bool| {
        let cfg = TrainConfig {
            mixed_precision: MixedPrecision::Bf16,
            gradient_checkpointing: true,
            gradient_checkpointing_offload: offload,
            ..config(&tmp.path().join(name), 3, 3)
        };
        run(job(&model, &cache, cfg)).unwrap()
    };
    let (device, host) = (go("device", false), go("host", true));
    assert_eq!(device.losses.len(), 3);
    assert_eq!(device.losses, host.losses);
    let cfg = TrainConfig {
        gradient_checkpointing_offload: true,
        ..config(&tmp.path().join("bad"), 1, 1)
    };
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("gradient_checkpointing_offload")
            && err.contains("gradient_checkpointing = true"),
        "{err}"
    );
}

/// fp16's dynamic loss scaling: a first scale of 2^20 overflows the tiny model's half-precision
/// gradients (measured: 2^16 does not, 2^18 does), so the first steps are skipped (logged, grad_norm null in metrics.jsonl, the scale halved each
/// time) until the scale fits; training then goes on, and a resume restores the scaler (the
/// split run equals the uninterrupted one bit for bit).
#[test]
fn fp16_skips_overflowing_steps_and_resumes_its_loss_scale() {
    use cogvx_model_core::precision::MixedPrecision;
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 3, false);
    let cfg = |out: &Path| TrainConfig {
        mixed_precision: MixedPrecision::Fp16,
        fp16_init_scale: 1_048_576.0,
        checkpoints_total_limit: None,
        ..config(out, 6, 1)
    };
    let (full, out) = split_run_matches(&model, &cache, tmp.path(), cfg, || None);
    eprintln!("skipped steps {:?}", full.skipped_steps);
    assert!(
        full.skipped_steps.first() == Some(&1),
        "skipped {:?}",
        full.skipped_steps
    );
    assert!(
        full.skipped_steps.len() < 6,
        "every step overflowed: {:?}",
        full.skipped_steps
    );
    let steps = read_steps(&out.join(cogvx_trainer::METRICS_FILE)).unwrap();
    for r in &steps {
        assert_eq!(
            r.grad_norm.is_nan(),
            full.skipped_steps.contains(&r.step),
            "{r:?}"
        );
    }
    // The scale halved once per skipped step, and the checkpoint holds it.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(checkpoint_dir(&out, 6).join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    let scale = state["loss_scaler"]["scale"].as_f64().unwrap();
    assert_eq!(
        scale,
        1_048_576.0 / 2f64.powi(full.skipped_steps.len() as i32),
        "{state}"
    );
    assert_eq!(
        state["loss_scaler"]["skipped"].as_u64(),
        Some(full.skipped_steps.len() as u64)
    );
}

/// Half precision on a backend without half types (burn-ndarray) is a configuration error
/// naming the key, before any work.
#[test]
fn mixed_precision_on_a_backend_without_half_types_is_refused() {
    use cogvx_model_core::precision::MixedPrecision;
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 1, false);
    let out = tmp.path().join("out");
    let cfg = TrainConfig {
        mixed_precision: MixedPrecision::Bf16,
        ..config(&out, 1, 1)
    };
    let _guard = RUN.lock().unwrap_or_else(|e| e.into_inner());
    let err = train::<B>(job(&model, &cache, cfg), &CpuDevice::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`mixed_precision` = \"bf16\"") && err.contains("ndarray"),
        "{err}"
    );
    assert!(!out.join("checkpoint-1").exists());
}

/// Gradient accumulation as a larger batch: `k` accumulated micro-batches of 1 give the losses
/// and weights of one batch of `k` (the same samples, and each sample draws the same timestep
/// and noise from its own stream). Tolerance: rel 1e-5 on each step's loss and the largest
/// weight difference below 1e-5 of the largest weight (f32 sums in another order, over 3
/// updates).
#[test]
fn accumulating_batches_of_one_trains_as_one_larger_batch() {
    for (model, n, i2v) in [
        (model_dir(), 4, false),
        (tiny("cogvideox1.5-5b-i2v-tiny"), 2, true),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cache = make_cache(&tmp.path().join("cache"), n, i2v);
        let go = |name: &str, batch_size: usize, k: usize| {
            let out = tmp.path().join(name);
            let c = TrainConfig {
                batch_size,
                gradient_accumulation_steps: k,
                lr_scheduler: LrScheduler::Constant,
                tensorboard: false,
                ..config(&out, 3, 100)
            };
            let s = run(job(&model, &cache, c)).unwrap();
            assert!(!out.join(cogvx_trainer::TENSORBOARD_DIR).exists());
            let lora = cogvx_train::load_lora(s.exported.as_ref().unwrap()).unwrap();
            (s.losses, lora.tensors)
        };
        let (batch_losses, batch) = go("batch", n, 1);
        let (acc_losses, acc) = go("accumulated", 1, n);
        assert_eq!(batch_losses.len(), 3);
        for ((s, a), (_, b)) in acc_losses.iter().zip(&batch_losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{}: step {s}: accumulated loss {a}, batch loss {b}",
                model.display()
            );
        }
        assert_eq!(
            batch.keys().collect::<Vec<_>>(),
            acc.keys().collect::<Vec<_>>()
        );
        let scale = batch
            .values()
            .flat_map(|(_, v)| v.iter().map(|x| x.abs()))
            .fold(0f32, f32::max);
        let mut moved = false;
        for (name, (_, a)) in &acc {
            let b = &batch[name].1;
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5 * scale,
                "{}: {name}: differs by {worst} (largest weight {scale})",
                model.display()
            );
            moved |= name.contains("lora_B") && b.iter().any(|x| *x != 0.0);
        }
        assert!(moved, "lora_B never moved: the runs did not train");
    }
}

/// `[train] caption_dropout`: a dropped sample trains on the empty prompt's embedding (T5-encoded
/// once into the cache), decided by one draw after the sample's other draws. With p = 1 a run is
/// the run on a cache whose every caption is the empty prompt, bit for bit; with p = 0.5 some
/// captions drop (logged per step) and the timesteps are those of the run without dropout.
#[test]
fn caption_dropout_trains_on_the_cached_empty_prompt() {
    let model = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = make_cache(&tmp.path().join("cache"), 4, false);
    let go = |name: &str, cache: &Cache, p: f64| {
        let out = tmp.path().join(name);
        let c = TrainConfig {
            caption_dropout: p,
            batch_size: 2,
            gradient_accumulation_steps: 1,
            ..config(&out, 6, 100)
        };
        let s = run(job(&model, cache, c)).unwrap();
        (s.losses, read_steps(&out.join("metrics.jsonl")).unwrap())
    };
    let (base_losses, base) = go("p0", &cache, 0.0);
    let (all_losses, all) = go("p1", &cache, 1.0);
    assert!(base.iter().all(|s| s.dropped_captions == 0));
    assert!(all.iter().all(|s| s.dropped_captions == 2), "{all:?}");
    assert_ne!(bits(&base_losses), bits(&all_losses));

    // The empty prompt's embedding is in the cache (read back, not encoded again).
    let prompts_before = std::fs::read_dir(cache.dir.join("prompts"))
        .unwrap()
        .count();
    assert_eq!(prompts_before, 5, "4 captions and the empty prompt");
    let empty = cogvx_cache::prompt_embeddings::<CpuBackend>(
        &cache.dir,
        &model,
        &[String::new()],
        16,
        None,
        &CpuDevice::default(),
    )
    .unwrap()
    .remove(0);
    assert_eq!(empty.shape, vec![16, 32]);
    let emptied = make_cache(&tmp.path().join("emptied"), 4, false);
    for s in &emptied.index.samples {
        store::write_entry(
            &emptied
                .dir
                .join("prompts")
                .join(format!("{}.safetensors", s.prompt)),
            &s.prompt,
            &[("prompt_embedding", &empty)],
        )
        .unwrap();
    }
    let emptied = Cache::open(&emptied.dir).unwrap();
    let (emptied_losses, emptied_steps) = go("emptied", &emptied, 0.0);
    assert_eq!(bits(&emptied_losses), bits(&all_losses));

    let (_, half) = go("half", &cache, 0.5);
    let dropped: u32 = half.iter().map(|s| s.dropped_captions).sum();
    assert!(
        (1..12).contains(&dropped),
        "{dropped} of 12 captions dropped"
    );
    for ((h, b), e) in half.iter().zip(&base).zip(&emptied_steps) {
        assert_eq!(h.timesteps.len(), 2);
        assert_eq!(h.timesteps, b.timesteps, "step {}", h.step);
        assert_eq!(e.timesteps, b.timesteps, "step {}", h.step);
    }
}

/// `[train] export_formats = ["diffusers", "comfyui"]`: both files hold the same trained pair per
/// layer (ComfyUI's under `diffusion_model.blocks.{i}.q` with `alpha`), `cogvx sample --lora`
/// applies either, and the report read back from each file shows every expected key, a LoRA that
/// changes the transformer's output, and an output equal to the trained model's.
#[test]
fn comfyui_export_holds_the_trained_lora_and_its_report_checks_it() {
    for (model, i2v) in [
        (model_dir(), false),
        (tiny("cogvideox1.5-5b-i2v-tiny"), true),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cache = make_cache(&tmp.path().join("cache"), 2, i2v);
        let out = tmp.path().join("out");
        let c = TrainConfig {
            export_formats: vec![ExportFormat::Diffusers, ExportFormat::Comfyui],
            target_modules: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]
                .map(String::from)
                .to_vec(),
            ..config(&out, 2, 100)
        };
        let s = run(job(&model, &cache, c)).unwrap();
        assert_eq!(s.exported, Some(out.join(cogvx_train::LORA_WEIGHTS_NAME)));
        let comfy = out.join(cogvx_adapters::COMFYUI_LORA_NAME);
        let diffusers = cogvx_train::load_lora(s.exported.as_ref().unwrap()).unwrap();
        let back = cogvx_adapters::load_lora_any(&comfy).unwrap();
        assert_eq!(back.tensors, diffusers.tensors);
        let (m, d) = (back.metadata.unwrap(), diffusers.metadata.unwrap());
        assert_eq!((m.rank, m.alpha), (d.rank, d.alpha));

        // The ComfyUI names, as comfy/ldm/cogvideo/model.py has them.
        let bytes = std::fs::read(&comfy).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for key in [
            "diffusion_model.blocks.0.q.lora_A.weight",
            "diffusion_model.blocks.1.attn_out.lora_B.weight",
            "diffusion_model.blocks.1.ff_proj.lora_A.weight",
            "diffusion_model.blocks.0.k.alpha",
        ] {
            assert!(st.tensor(key).is_ok(), "{}: no {key}", model.display());
        }

        // The report, returned and written: 2 blocks x 5 targets, A and B (+ alpha for ComfyUI).
        let written: Vec<ExportReport> = serde_json::from_slice(
            &std::fs::read(out.join(cogvx_trainer::EXPORT_REPORT_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(written, s.export_reports);
        assert_eq!(written.len(), 2);
        for (r, keys) in written.iter().zip([2 * 5 * 2, 2 * 5 * 3]) {
            assert_eq!((r.keys_written, r.keys_expected), (keys, keys), "{r:?}");
            assert!(r.missing.is_empty() && r.unexpected.is_empty(), "{r:?}");
            assert_eq!(r.scale, 2.0 / 4.0);
            assert!(r.output_change > 1e-7, "{}: {r:?}", model.display());
            assert!(
                r.difference_from_trained < 1e-5,
                "{}: {r:?}",
                model.display()
            );
        }
        assert_eq!(written[1].file, comfy);

        // `cogvx sample --lora` takes the ComfyUI file too.
        let mut t = cogvx_transformer::CogVideoXTransformer3DModel::<CpuBackend>::from_dir(
            &model.join("transformer"),
            &CpuDevice::default(),
        )
        .unwrap();
        let applied =
            cogvx_engine::load_and_apply_lora(&mut t, &comfy, 1.0, &CpuDevice::default()).unwrap();
        assert_eq!(applied.len(), 2 * 5);
    }
}
