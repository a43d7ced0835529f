//! # cogvx-trainer
//!
//! The CogVideoX training loop, faithful to the official finetune (`CogVideo/finetune`:
//! `trainer.py`, `models/cogvideox_{t2v,i2v}/lora_trainer.py`) under accelerate's semantics, with
//! exact resume:
//!
//! * [`config`]: [`TrainConfig`] / [`ValidationConfig`] with the official defaults.
//! * [`schedule`]: diffusers' `get_scheduler` learning-rate schedules as pure functions.
//! * [`checkpoint`]: atomic `checkpoint-<step>/` folders (weights, AdamW state, RNG position,
//!   data position, LR schedule, configs), keep-last-K.
//! * [`train`]: the loop. Per epoch the cached samples are shuffled (seeded by `seed` and the
//!   epoch), cut into micro-batches of `batch_size` (the last one smaller when the sample count
//!   is not a multiple, as torch's `DataLoader(drop_last=False)`); each micro-batch draws its
//!   timesteps (uniform over `[0, num_train_timesteps)` or a scheduler plugin's distribution) and
//!   its gaussian noise from the saved RNG, I2V builds its noisy image latents as the official
//!   I2V trainer; gradients accumulate as accelerate's (`loss / k`, an update every `k`
//!   micro-batches and at the end of each epoch), then global-norm clipping, AdamW at the
//!   schedule's learning rate. One step is one optimizer update.
//!
//! Outputs under `output_dir`: `checkpoint-<step>/`, `metrics.jsonl` (one
//! [`cogvx_metrics::StepRecord`] per step, validation events), `loss.png`,
//! `validation/step-<N>/<i>.mp4`, and at the end the trained weights: the built-in LoRA as
//! diffusers' `pytorch_lora_weights.safetensors` (with the adapter metadata diffusers reads
//! alpha from), a plugin adapter (DoRA, LoHa, LoKr, ...) in the same file under PEFT's names,
//! SFT as a diffusers transformer folder `transformer/`.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod checkpoint;
pub mod lock;
pub mod config;
pub mod rng;
pub mod schedule;
mod validation;

pub use checkpoint::{
    latest_checkpoint, list_checkpoints, read_checkpoint, write_checkpoint, Checkpoint, DataPosition, TrainerState,
};
pub use config::{TrainConfig, ValidationConfig};
pub use rng::{epoch_order, RngState, TrainRng};
pub use schedule::{LrSchedule, LrScheduler};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::FloatDType;
use cogvx_model_core::precision::{LossScaler, MixedPrecision};
use burn::tensor::{Tensor, TensorData};
use cogvx_cache::Cache;
use cogvx_metrics::{MetricsLog, StepRecord, TrainProgress};
use cogvx_model_core::adapter::{AdapterTensor, RecipeLimits};
use cogvx_plugin_api::Plugin;
use cogvx_scheduler::NoiseSchedule;
use cogvx_train::{AdamW, InnerTensors, NoiseDraw, TrainBatch, TrainMode};
use cogvx_transformer::CogVideoXTransformer3DModel;
use cogvx_vae::{AutoencoderKLCogVideoX, Tiling, VaeConfig, VaeOptions};

/// Metrics file name under `output_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Loss-curve file name under `output_dir`.
pub const LOSS_PLOT_FILE: &str = "loss.png";

/// Why training could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A bad setting; the message names the key.
    #[error("config {0}")]
    Config(String),
    /// Inputs that do not fit together (model, cache, plugins, checkpoint), with what to do.
    #[error("{0}")]
    Input(String),
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Train(#[from] cogvx_train::TrainError),
    #[error(transparent)]
    Adapters(#[from] cogvx_adapters::AdaptersError),
    #[error(transparent)]
    Cache(#[from] cogvx_cache::CacheError),
    #[error(transparent)]
    Engine(#[from] cogvx_engine::EngineError),
    #[error(transparent)]
    Transformer(#[from] cogvx_transformer::TransformerError),
    #[error(transparent)]
    Vae(#[from] cogvx_vae::VaeError),
    #[error(transparent)]
    Metrics(#[from] cogvx_metrics::MetricsError),
    #[error(transparent)]
    Video(#[from] cogvx_video::VideoError),
    /// A plugin call failed.
    #[error("plugin `{plugin}`: {message}")]
    Plugin { plugin: String, message: String },
}

/// Where to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete `checkpoint-<step>` under `output_dir` (a fresh start when there is none).
    Latest,
    /// A given checkpoint folder.
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    /// `latest` or a path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "latest" { Resume::Latest } else { Resume::Path(PathBuf::from(s)) })
    }
}

/// Everything a training run needs.
pub struct TrainJob<'a> {
    /// The diffusers CogVideoX folder (transformer, scheduler, VAE; text encoder for validation).
    pub model_dir: PathBuf,
    /// The prepared latent / prompt cache.
    pub cache: Cache,
    pub config: TrainConfig,
    pub validation: ValidationConfig,
    /// The adapter plugin named by `config.adapter` when it is neither `lora` nor `sft`.
    pub adapter_plugin: Option<&'a mut dyn Plugin>,
    /// The adapter plugin's configuration table (as given to its `configure`): its PEFT fields
    /// (e.g. `use_rslora`) go into the exported file's metadata.
    pub adapter_params: serde_json::Value,
    /// Limits for the adapter plugin's recipes.
    pub recipe_limits: RecipeLimits,
    /// A scheduler plugin: its `scheduler_tables` give the training `alphas_cumprod` and timestep
    /// distribution, its `scheduler_plan` the validation sampler. `None`: the model folder's
    /// scheduler, uniform timesteps.
    pub scheduler_plugin: Option<&'a mut dyn Plugin>,
    /// Validator plugins, one per name in `validation.validators`.
    pub validators: Vec<&'a mut dyn Plugin>,
    pub resume: Option<Resume>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Called after every step (after its checkpoint and validation); returning `true` stops the
    /// run after writing a checkpoint of that step (a later `Resume::Latest` continues it).
    pub on_step: Option<&'a mut dyn FnMut(&StepRecord) -> bool>,
    /// Called after each checkpoint file is written and synced (fault-injection tests).
    pub on_checkpoint_file: Option<&'a dyn Fn(&Path)>,
}

impl<'a> TrainJob<'a> {
    /// A job with no plugins, no resume, no validation and the progress bar on.
    pub fn new(model_dir: impl Into<PathBuf>, cache: Cache, config: TrainConfig) -> Self {
        TrainJob {
            model_dir: model_dir.into(),
            cache,
            config,
            validation: ValidationConfig::default(),
            adapter_plugin: None,
            adapter_params: serde_json::Value::Null,
            recipe_limits: RecipeLimits::default(),
            scheduler_plugin: None,
            validators: Vec::new(),
            resume: None,
            progress: true,
            on_step: None,
            on_checkpoint_file: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// The step the run started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// The last completed step.
    pub step: u64,
    /// The step the run was set to reach.
    pub total_steps: u64,
    /// The checkpoint resumed from.
    pub resumed_from: Option<PathBuf>,
    /// `(step, loss)` of every step this run made.
    pub losses: Vec<(u64, f64)>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// The exported weights (`None` when the run was stopped early).
    pub exported: Option<PathBuf>,
    /// Validation videos written.
    pub validation_videos: Vec<PathBuf>,
    /// The run stopped early through [`TrainJob::on_step`].
    pub stopped_early: bool,
    /// fp16: the steps of this run skipped because their gradients overflowed.
    pub skipped_steps: Vec<u64>,
}

fn input<T>(message: impl Into<String>) -> Result<T, TrainerError> {
    Err(TrainerError::Input(message.into()))
}

/// Checks that the output folder can be created and written, and that it is not (inside) a
/// folder the run reads: an SFT export or a checkpoint written into the model folder would
/// overwrite the base model; into the dataset, the data. `protected` names each such folder by
/// its config key (`[model] path`, `[data] root`).
pub fn check_output_dir(dir: &Path, protected: &[(&str, &Path)]) -> Result<(), TrainerError> {
    let out = resolved(dir);
    for (key, folder) in protected {
        let folder = resolved(folder);
        if out.starts_with(&folder) {
            return input(format!(
                "`[train] output_dir` {} is inside {key} {}: the run would write its checkpoints and export there \
                 (an SFT export overwrites the model's transformer); choose an output folder outside it",
                dir.display(),
                folder.display()
            ));
        }
    }
    let io = |e: std::io::Error| TrainerError::Io {
        path: dir.to_path_buf(),
        message: format!("the output folder is not writable: {e}; choose another `[train] output_dir` (--output-dir DIR)"),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let probe = dir.join(format!(".cogvx-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(io)?;
    std::fs::remove_file(&probe).map_err(io)?;
    Ok(())
}

/// `path` made absolute with its symbolic links resolved, as far as it exists (the rest is
/// appended as written, `..` applied), so that two spellings of one folder compare equal.
fn resolved(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for c in rest.iter().rev() {
                match c {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::CurDir => {}
                    c => out.push(c),
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// The training-side noise schedule and timestep distribution.
struct TrainSchedule {
    schedule: NoiseSchedule,
    /// Cumulative timestep weights (`None`: uniform).
    cumulative: Option<Vec<f64>>,
}

impl TrainSchedule {
    fn draw_timestep(&self, rng: &mut TrainRng) -> usize {
        match &self.cumulative {
            None => rng.below(self.schedule.alphas_cumprod.len()),
            Some(c) => rng.weighted(c),
        }
    }
}

fn train_schedule<'p>(model_dir: &Path, plugin: Option<&mut (dyn Plugin + 'p)>) -> Result<TrainSchedule, TrainerError> {
    let mut schedule = cogvx_train::load_schedule(model_dir)?;
    let Some(plugin) = plugin else { return Ok(TrainSchedule { schedule, cumulative: None }) };
    let name = plugin.info().name;
    let perr = |m: String| TrainerError::Plugin { plugin: name.clone(), message: m };
    let path = model_dir.join("scheduler").join("scheduler_config.json");
    let json = std::fs::read_to_string(&path).map_err(|e| TrainerError::Io { path: path.clone(), message: e.to_string() })?;
    let tables = plugin.scheduler_tables(&json).map_err(|e| perr(e.to_string()))?;
    let n = tables.alphas_cumprod.len();
    if n == 0 || tables.alphas_cumprod.iter().any(|a| !(a.is_finite() && *a > 0.0 && *a < 1.0)) {
        return Err(perr(format!("scheduler_tables: alphas_cumprod must be {n} > 0 values in (0, 1)")));
    }
    // compute_loss weights the loss by 1 / (1 - alphas_cumprod), as the official trainer.
    if tables.loss_weights.len() != n {
        return Err(perr(format!("scheduler_tables: {} loss weights for {n} timesteps", tables.loss_weights.len())));
    }
    for (t, (w, a)) in tables.loss_weights.iter().zip(&tables.alphas_cumprod).enumerate() {
        let want = 1.0 / (1.0 - a);
        if (w - want).abs() > 1e-6 * want.abs().max(1.0) {
            return Err(perr(format!(
                "scheduler_tables: loss weight {w} at timestep {t}; the CogVideoX loss uses 1 / (1 - alphas_cumprod) = {want}"
            )));
        }
    }
    let cumulative = match &tables.timestep_weights {
        None => None,
        Some(w) => {
            if w.len() != n || w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
                return Err(perr(format!("scheduler_tables: timestep_weights must be {n} finite non-negative values, not all zero")));
            }
            let mut acc = 0.0;
            Some(
                w.iter()
                    .map(|x| {
                        acc += x;
                        acc
                    })
                    .collect(),
            )
        }
    };
    schedule.alphas_cumprod = tables.alphas_cumprod;
    Ok(TrainSchedule { schedule, cumulative })
}

/// The trainable tensors of the model by name, on the host.
fn host_tensors<B: Backend>(t: &BTreeMap<String, AdapterTensor<B>>) -> checkpoint::HostTensors {
    t.iter().map(|(k, v)| (k.clone(), (v.shape(), v.to_vec()))).collect()
}

fn from_host<B: Backend>(t: &checkpoint::HostTensors, device: &B::Device, path: &Path) -> Result<BTreeMap<String, AdapterTensor<B>>, TrainerError> {
    t.iter()
        .map(|(k, (shape, data))| {
            AdapterTensor::from_vec(shape, data.clone(), device)
                .map(|v| (k.clone(), v))
                .ok_or_else(|| TrainerError::Io { path: path.to_path_buf(), message: format!("tensor `{k}` has shape {shape:?}, not a vector or matrix") })
        })
        .collect()
}

fn stack<B: Backend, const D1: usize>(items: Vec<&cogvx_cache::HostTensor>, device: &B::Device) -> Tensor<B, D1> {
    let n = items.len();
    let mut shape = vec![n];
    shape.extend_from_slice(&items[0].shape);
    let mut data = Vec::with_capacity(n * items[0].data.len());
    for t in &items {
        data.extend_from_slice(&t.data);
    }
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// The VAE for the I2V image latents, with the options the official trainer encodes with
/// (`enable_slicing`, `enable_tiling`).
struct ImageEncoder<B: Backend> {
    vae: AutoencoderKLCogVideoX<B>,
    options: VaeOptions,
}

impl<B: Backend> ImageEncoder<B> {
    fn load(model_dir: &Path, device: &B::Device) -> Result<Self, TrainerError> {
        let (vae, config): (AutoencoderKLCogVideoX<B>, VaeConfig) = AutoencoderKLCogVideoX::from_dir(&model_dir.join("vae"), device)?;
        Ok(ImageEncoder { vae, options: VaeOptions { tiling: Some(Tiling::for_config(&config)), slicing: true } })
    }
}

/// One micro-batch on the device, with its random draws taken from `rng` in the official
/// trainer's order (I2V: image noise level, image noise, posterior sample; then timesteps and
/// latent noise).
fn make_micro_batch<B: AutodiffBackend>(
    cache: &Cache,
    indices: &[usize],
    model_config: &cogvx_transformer::TransformerConfig,
    schedule: &TrainSchedule,
    images: Option<&ImageEncoder<B::InnerBackend>>,
    rng: &mut TrainRng,
    device: &B::Device,
) -> Result<(TrainBatch<B>, NoiseDraw<B>), TrainerError> {
    let entries = indices.iter().map(|&i| cache.get(i)).collect::<Result<Vec<_>, _>>()?;
    let first = &entries[0];
    for e in &entries[1..] {
        if e.latent.shape != first.latent.shape || e.prompt_embedding.shape != first.prompt_embedding.shape {
            return input(format!(
                "samples {} and {} of the cache have latents {:?} / {:?} and prompts {:?} / {:?}: a batch needs equal shapes; use batch_size = 1",
                first.sample.origin, e.sample.origin, first.latent.shape, e.latent.shape, first.prompt_embedding.shape, e.prompt_embedding.shape
            ));
        }
    }
    let b = entries.len();
    let latents: Tensor<B, 5> = stack::<B, 5>(entries.iter().map(|e| &e.latent).collect(), device);
    let prompt_embeds: Tensor<B, 3> = stack::<B, 3>(entries.iter().map(|e| &e.prompt_embedding).collect(), device);
    let image_latents = match images {
        None => None,
        Some(enc) => {
            let inner_device = device.clone();
            let imgs: Vec<&cogvx_cache::HostTensor> = entries
                .iter()
                .map(|e| {
                    e.image.as_ref().ok_or_else(|| {
                        TrainerError::Input(format!("cache sample {} has no conditioning image; run `cogvx prepare` for I2V", e.sample.origin))
                    })
                })
                .collect::<Result<_, _>>()?;
            let img: Tensor<B::InnerBackend, 4> = stack::<B::InnerBackend, 4>(imgs, &inner_device);
            let dims = img.dims();
            // torch.normal(mean=-3.0, std=0.5, size=(1,)): one noise level for the whole batch.
            let log_sigma = rng.normal(1)[0] * 0.5 - 3.0;
            let log_sigma = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(vec![log_sigma; b], [b]), &inner_device);
            let n: usize = dims.iter().product();
            let noise = Tensor::<B::InnerBackend, 4>::from_data(TensorData::new(rng.normal(n), dims), &inner_device);
            let latents = cogvx_cache::noisy_image_latents(
                &enc.vae,
                img,
                log_sigma,
                noise,
                |shape| {
                    let n: usize = shape.iter().product();
                    Tensor::from_data(TensorData::new(rng.normal(n), shape), &inner_device)
                },
                &enc.options,
            )?;
            Some(Tensor::<B, 5>::from_inner(latents))
        }
    };
    let timesteps: Vec<usize> = (0..b).map(|_| schedule.draw_timestep(rng)).collect();
    let shape = cogvx_train::noise_shape(model_config, latents.dims());
    let n: usize = shape.iter().product();
    let noise = Tensor::<B, 5>::from_data(TensorData::new(rng.normal(n), shape), device);
    Ok((TrainBatch { latents, prompt_embeds, image_latents }, NoiseDraw { timesteps, noise }))
}

/// What a checkpoint stores of the model: every adapter parameter (trainable or not: a recipe
/// may have frozen, randomly initialised ones), or every transformer weight for SFT.
fn checkpoint_values<B: AutodiffBackend>(mode: TrainMode, model: &mut CogVideoXTransformer3DModel<B>) -> InnerTensors<B> {
    match mode {
        TrainMode::Adapter => cogvx_train::all_adapter_values(model),
        TrainMode::Full => cogvx_train::full_values(model),
    }
}

/// Name of the SFT export folder under `output_dir`.
pub const SFT_EXPORT_DIR: &str = "transformer";

/// The final export: the built-in LoRA as diffusers' `pytorch_lora_weights.safetensors`
/// (`save_lora`), a plugin adapter under PEFT's names in the same file (`save_adapter`, PEFT
/// config in the header), SFT as a diffusers transformer folder `output_dir/transformer/`
/// (in `config.export_dtype`, sharded as diffusers does, with the source `config.json`).
fn export<B: AutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    config: &TrainConfig,
    spec: &cogvx_train::AdapterSpec,
    adapter_params: &serde_json::Value,
    source_transformer: &Path,
    out: &Path,
) -> Result<PathBuf, TrainerError> {
    if config.is_sft() {
        let dir = out.join(SFT_EXPORT_DIR);
        let f = cogvx_train::save_transformer_folder(model, source_transformer, &dir, cogvx_train::DEFAULT_MAX_SHARD_BYTES, config.export_dtype)?;
        return Ok(f.dir);
    }
    if config.is_lora() {
        let meta = cogvx_train::LoraMetadata { rank: config.rank, alpha: config.alpha, target_modules: config.target_modules.clone() };
        return Ok(cogvx_train::save_lora(out, &cogvx_train::trainable_values(model), &meta)?);
    }
    let mut meta = cogvx_train::adapter_metadata(model, spec, BTreeMap::new())?;
    meta.config = cogvx_train::peft_settings(&meta.peft_type, adapter_params);
    Ok(cogvx_train::save_adapter(model, out, &meta)?)
}

/// Shape-defining keys a resumed run must share with its checkpoint.
fn check_resumable(saved: &TrainConfig, now: &TrainConfig, dir: &Path) -> Result<(), TrainerError> {
    let mut diffs = Vec::new();
    macro_rules! same {
        ($k:ident) => {
            if saved.$k != now.$k {
                diffs.push(format!("`{}` = {:?} there, {:?} now", stringify!($k), saved.$k, now.$k));
            }
        };
    }
    same!(adapter);
    same!(rank);
    same!(alpha);
    same!(target_modules);
    same!(batch_size);
    same!(gradient_accumulation_steps);
    same!(seed);
    same!(mixed_precision);
    if !diffs.is_empty() {
        return input(format!(
            "cannot resume from {}: it was trained with other settings ({}); restore them or start a new run in another output_dir",
            dir.display(),
            diffs.join("; ")
        ));
    }
    for (k, a, b) in [
        ("learning_rate", saved.learning_rate, now.learning_rate),
        ("weight_decay", saved.weight_decay, now.weight_decay),
        ("max_grad_norm", saved.max_grad_norm, now.max_grad_norm),
    ] {
        if a != b {
            tracing::warn!("resuming {} with `{k}` = {b} (the checkpoint used {a}): the loss curve will differ from an uninterrupted run", dir.display());
        }
    }
    if saved.lr_scheduler != now.lr_scheduler || saved.lr_warmup_steps != now.lr_warmup_steps {
        tracing::warn!("resuming {} with another learning-rate schedule", dir.display());
    }
    Ok(())
}

/// Runs (or resumes) a training job on `device` and exports the result; see the crate docs.
pub fn train<B: cogvx_model_core::ModelAutodiffBackend>(job: TrainJob<'_>, device: &B::Device) -> Result<TrainSummary, TrainerError> {
    let TrainJob {
        model_dir,
        cache,
        config,
        validation: vconfig,
        adapter_plugin,
        adapter_params,
        recipe_limits,
        mut scheduler_plugin,
        mut validators,
        resume,
        progress,
        mut on_step,
        on_checkpoint_file,
    } = job;

    // ---- checks before any work
    config.validate()?;
    vconfig.validate()?;
    let out = config.output_dir.clone();
    check_output_dir(&out, &[("[model] path", &model_dir)])?;
    let _lock = lock::OutputLock::acquire(&out)?;
    if cache.is_empty() {
        return input(format!("the cache {} holds no samples; run `cogvx prepare` on a dataset with videos", cache.dir.display()));
    }
    let folder = cogvx_engine::ModelFolder::open(&model_dir)?;
    let i2v = folder.variant.is_i2v();
    if i2v != cache.index.i2v {
        return input(format!(
            "the model {} is {} ({}), but the cache {} was prepared for {}; prepare it for this model",
            model_dir.display(),
            if i2v { "image-to-video" } else { "text-to-video" },
            folder.variant,
            cache.dir.display(),
            if cache.index.i2v { "image-to-video" } else { "text-to-video" },
        ));
    }
    if vconfig.enabled() && i2v && vconfig.images.is_empty() {
        return Err(TrainerError::Config("`validation.images`: an image-to-video model needs one conditioning image per validation prompt".into()));
    }
    if vconfig.enabled() && !i2v && !vconfig.images.is_empty() {
        return Err(TrainerError::Config("`validation.images`: given for a text-to-video model; remove them".into()));
    }
    let mut validator_refs: Vec<(String, &mut dyn Plugin)> = Vec::new();
    for name in &vconfig.validators {
        let pos = validators.iter().position(|p| &p.info().name == name).ok_or_else(|| {
            TrainerError::Config(format!("`validation.validators`: no validator plugin named `{name}` was loaded"))
        })?;
        validator_refs.push((name.clone(), validators.remove(pos)));
    }
    let tc = folder.transformer_config.clone();
    let first = cache.get(0)?;
    let c = first.latent.shape[0];
    let want_in = if i2v { 2 * c } else { c };
    if tc.in_channels != want_in {
        return input(format!(
            "the cache's latents have {c} channels, the transformer of {} takes {} ({}); prepare the cache with this model's VAE",
            model_dir.display(),
            tc.in_channels,
            if i2v { "twice the latent channels for I2V" } else { "the latent channels" }
        ));
    }
    if first.prompt_embedding.shape[1] != tc.text_embed_dim {
        return input(format!(
            "the cache's prompt embeddings have width {}, the transformer takes {}; prepare the cache with this model's text encoder",
            first.prompt_embedding.shape[1], tc.text_embed_dim
        ));
    }

    // Mixed precision needs the half dtype (and bf16, which T5 runs in) on this backend.
    let text_dtype = config.mixed_precision.text_encoder_dtype();
    for dtype in std::iter::once(config.mixed_precision.dtype()).chain(text_dtype) {
        if !B::supports_dtype(device, dtype.into()) {
            return Err(TrainerError::Config(format!(
                "`mixed_precision` = \"{}\": the {} backend has no {:?} tensors; use \"no\", or the flex backend on the CPU (as `cogvx train` does) or CUDA",
                config.mixed_precision.name(),
                B::name(device),
                dtype
            )));
        }
    }

    // Validation's prompt embeddings, T5-encoded now (or read from the cache) so that T5 is
    // never resident beside the model being trained.
    let validation = validation::Validation::<B::InnerBackend>::new(folder.clone(), &out, &cache, &vconfig, text_dtype, device)?;

    // ---- model and adapter
    // Mixed precision: frozen weights are loaded in the half dtype; SFT keeps f32 master
    // weights and computes in half (autocast).
    let precision = config.mixed_precision;
    let load_dtype = if config.is_sft() { FloatDType::F32 } else { precision.dtype() };
    let mut model = CogVideoXTransformer3DModel::<B>::from_dir_in(&folder.component_dir("transformer"), load_dtype, device)?;
    model.set_compute_dtype(precision.dtype());
    // The adapter initialisation draws from the backend RNG.
    B::seed(device, config.seed);
    let spec = cogvx_train::AdapterSpec { rank: config.rank, alpha: config.alpha, targets: config.target_modules.clone() };
    let mode = if config.is_sft() { TrainMode::Full } else { TrainMode::Adapter };
    let layers = if config.is_lora() {
        model = cogvx_train::freeze(model);
        cogvx_train::inject_lora(&mut model, &spec, device)?
    } else if config.is_sft() {
        model = cogvx_train::enable_full_training(model);
        Vec::new()
    } else {
        let plugin = adapter_plugin.ok_or_else(|| {
            TrainerError::Config(format!("`adapter` = {:?}: no adapter plugin of that name was loaded (built in: \"lora\", \"sft\")", config.adapter))
        })?;
        let pname = plugin.info().name;
        if pname != config.adapter {
            return Err(TrainerError::Config(format!("`adapter` = {:?}, but the adapter plugin given is `{pname}`", config.adapter)));
        }
        model = cogvx_train::freeze(model);
        cogvx_train::inject_recipe(&mut model, &spec, recipe_limits, |req| plugin.adapter_recipe(req), device)?
    };
    model.set_gradient_checkpointing(config.gradient_checkpointing);
    model.set_checkpoint_offload(config.gradient_checkpointing_offload);
    let n_params: usize = mode.values(&mut model).values().map(|t| t.shape().iter().product::<usize>()).sum();
    if config.is_sft() {
        tracing::info!("full fine-tuning: {n_params} trainable parameters");
    } else {
        tracing::info!("{} adapter on {} layers, {n_params} trainable parameters", config.adapter, layers.len());
    }

    let tschedule = train_schedule(&model_dir, scheduler_plugin.as_deref_mut())?;
    let image_encoder = if i2v { Some(ImageEncoder::<B::InnerBackend>::load(&model_dir, device)?) } else { None };

    // ---- the plan of the run
    let n = cache.len();
    let bs = config.batch_size;
    let k = config.gradient_accumulation_steps as u64;
    let batches_per_epoch = n.div_ceil(bs) as u64;
    let updates_per_epoch = batches_per_epoch.div_ceil(k);
    let total_steps = config.max_steps.unwrap_or(config.epochs * updates_per_epoch);
    let lr_schedule = LrSchedule {
        kind: config.lr_scheduler,
        num_warmup_steps: config.lr_warmup_steps,
        num_training_steps: total_steps,
        num_cycles: config.lr_num_cycles,
    };
    let mut optimizer = AdamW::<B::InnerBackend>::new(config.adamw());
    let mut rng = TrainRng::new(config.seed);
    let mut step = 0u64;
    let mut pos = DataPosition { epoch: 0, batch: 0 };
    let mut elapsed_s = 0.0;
    let mut last_lr = 0.0;
    let mut scaler = (precision == MixedPrecision::Fp16).then(|| LossScaler { scale: config.fp16_init_scale, ..LossScaler::default() });

    // ---- resume
    checkpoint::remove_stale_temp_dirs(&out)?;
    let resumed: Option<(PathBuf, Checkpoint)> = match resume {
        None => None,
        Some(Resume::Path(p)) => {
            if !p.join(checkpoint::STATE_FILE).is_file() {
                return input(format!("--resume {}: not a checkpoint folder (no {})", p.display(), checkpoint::STATE_FILE));
            }
            let ck = read_checkpoint(&p)?;
            Some((p, ck))
        }
        Some(Resume::Latest) => {
            // The newest checkpoint that reads back whole; damaged ones are skipped with a
            // warning, and a run whose every checkpoint is damaged is an error, not a fresh start.
            let all = list_checkpoints(&out)?;
            if all.is_empty() {
                tracing::info!("no checkpoint under {}; starting a new run", out.display());
            }
            let mut found = None;
            let mut damaged = Vec::new();
            for (_, dir) in all.iter().rev() {
                match read_checkpoint(dir) {
                    Ok(ck) => {
                        found = Some((dir.clone(), ck));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("skipping damaged checkpoint {}: {e}", dir.display());
                        damaged.push(e.to_string());
                    }
                }
            }
            if found.is_none() && !all.is_empty() {
                return input(format!(
                    "--resume latest: every checkpoint under {} is damaged ({}); remove them to start a new run there",
                    out.display(),
                    damaged.join("; ")
                ));
            }
            found
        }
    };
    let resume_dir = resumed.as_ref().map(|(d, _)| d.clone());
    if let Some((dir, ck)) = &resumed {
        check_resumable(&ck.state.config, &config, dir)?;
        if ck.state.num_samples != n as u64 {
            return input(format!(
                "cannot resume from {}: it was trained on {} samples, the cache {} has {n}; resume with the same cache",
                dir.display(),
                ck.state.num_samples,
                cache.dir.display()
            ));
        }
        ck.check_resumable(dir, batches_per_epoch, k)?;
        let values = from_host::<B::InnerBackend>(&ck.weights, device, &dir.join(checkpoint::WEIGHTS_FILE))?;
        mode.set_values(&mut model, &values)?;
        optimizer.load_state(&ck.optimizer, device)?;
        rng = TrainRng::from_state(&ck.state.rng).map_err(|m| TrainerError::Io { path: dir.join(checkpoint::STATE_FILE), message: m })?;
        step = ck.state.step;
        pos = ck.state.data;
        elapsed_s = ck.state.elapsed_s;
        last_lr = ck.state.last_lr;
        if scaler.is_some() {
            scaler = Some(ck.state.loss_scaler.clone().unwrap_or_default());
        }
        tracing::info!("resumed from {} at step {step} (epoch {}, batch {})", dir.display(), pos.epoch, pos.batch);
    }
    let start_step = step;
    if step >= total_steps {
        tracing::info!("the run already reached step {step} of {total_steps}");
    }

    let mut metrics = MetricsLog::open(&out.join(METRICS_FILE), resume_dir.as_ref().map(|_| step))?;
    let bar = TrainProgress::new(total_steps, step, progress);
    tracing::info!(
        "training {total_steps} steps: {n} samples, batch {bs}, accumulation {k}, {updates_per_epoch} steps per epoch, lr {} ({})",
        config.learning_rate,
        config.lr_scheduler.as_str()
    );

    let folder_transformer = folder.component_dir("transformer");
    let mut summary = TrainSummary {
        start_step,
        step,
        total_steps,
        resumed_from: resume_dir.clone(),
        losses: Vec::new(),
        last_checkpoint: None,
        exported: None,
        validation_videos: Vec::new(),
        stopped_early: false,
        skipped_steps: Vec::new(),
    };
    let mut order = epoch_order(config.seed, pos.epoch, n);
    let mut order_epoch = pos.epoch;
    let mut last_saved = resume_dir.as_ref().map(|_| step);
    let mut last_validated = None;

    let save = |model: &mut CogVideoXTransformer3DModel<B>,
                optimizer: &AdamW<B::InnerBackend>,
                rng: &TrainRng,
                step: u64,
                pos: DataPosition,
                last_lr: f64,
                elapsed_s: f64,
                scaler: &Option<LossScaler>|
     -> Result<PathBuf, TrainerError> {
        let ck = Checkpoint {
            state: TrainerState {
                format: checkpoint::CHECKPOINT_FORMAT.into(),
                step,
                total_steps,
                num_samples: n as u64,
                data: pos,
                lr_schedule,
                last_lr,
                rng: rng.state(),
                elapsed_s,
                config: config.clone(),
                validation: vconfig.clone(),
                loss_scaler: scaler.clone(),
            },
            weights: host_tensors(&checkpoint_values(mode, model)),
            optimizer: optimizer.state_to_host(),
        };
        let dir = write_checkpoint(&out, &ck, on_checkpoint_file)?;
        if let Some(keep) = config.checkpoints_total_limit {
            for d in checkpoint::prune_checkpoints(&out, keep)? {
                tracing::info!("removed old checkpoint {}", d.display());
            }
        }
        tracing::info!("saved {}", dir.display());
        Ok(dir)
    };
    let plot = |out: &Path| {
        if let Err(e) = cogvx_metrics::plot_loss_curve(&out.join(METRICS_FILE), &out.join(LOSS_PLOT_FILE)) {
            tracing::warn!("loss curve not drawn: {e}");
        }
    };

    while step < total_steps {
        let t0 = Instant::now();
        let step_epoch = pos.epoch;
        // One accumulation window: k micro-batches, or fewer at the end of the epoch
        // (accelerate syncs gradients at the end of the dataloader).
        let mut acc: Option<InnerTensors<B>> = None;
        let mut losses = Vec::new();
        let mut samples = 0usize;
        for _ in 0..k {
            if order_epoch != pos.epoch {
                order = epoch_order(config.seed, pos.epoch, n);
                order_epoch = pos.epoch;
            }
            let start = pos.batch as usize * bs;
            let idx = &order[start..(start + bs).min(n)];
            let (batch, draw) = make_micro_batch::<B>(&cache, idx, &tc, &tschedule, image_encoder.as_ref(), &mut rng, device)?;
            let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            let (loss, grads) = cogvx_train::loss_and_grads_scaled(mode, &mut model, &tschedule.schedule, &batch, &draw, loss_scale)?;
            losses.push(loss);
            samples += idx.len();
            let grads: InnerTensors<B> = if k == 1 { grads } else { grads.into_iter().map(|(n, g)| (n, g.mul_scalar(1.0 / k as f64))).collect() };
            acc = Some(match acc {
                None => grads,
                Some(mut a) => {
                    for (name, g) in grads {
                        let v = match a.remove(&name) {
                            Some(prev) => prev.add(g),
                            None => g,
                        };
                        a.insert(name, v);
                    }
                    a
                }
            });
            pos.batch += 1;
            if pos.batch == batches_per_epoch {
                pos = DataPosition { epoch: pos.epoch + 1, batch: 0 };
                break;
            }
        }
        let lr = lr_schedule.lr_at(config.learning_rate, step);
        let grads = acc.unwrap_or_default();
        // fp16: the scaler records whether the gradients are finite; a step whose gradients
        // overflowed is skipped (the scale is halved).
        let taken = scaler.as_mut().is_none_or(|s| s.update(cogvx_train::total_grad_norm(&grads).is_finite()));
        let grad_norm = if taken {
            cogvx_train::apply_update_for(mode, &mut model, grads, &mut optimizer, lr, Some(config.max_grad_norm))?
        } else {
            let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            tracing::warn!("step {}: fp16 gradients overflowed; step skipped, loss scale now {scale}", step + 1);
            summary.skipped_steps.push(step + 1);
            f64::INFINITY
        };
        step += 1;
        last_lr = lr;
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        let dt = t0.elapsed().as_secs_f64();
        elapsed_s += dt;
        let record = StepRecord { step, epoch: step_epoch, loss, lr, grad_norm, step_time_s: dt, samples_per_s: samples as f64 / dt.max(1e-9) };
        metrics.log(&record)?;
        bar.update(step, loss, lr);
        tracing::debug!("step {step}: loss {loss:.6} lr {lr:.3e} grad_norm {grad_norm:.4}");
        summary.losses.push((step, loss));
        if !loss.is_finite() {
            tracing::warn!("step {step}: the loss is {loss}");
        }

        if step % config.checkpointing_steps == 0 {
            summary.last_checkpoint = Some(save(&mut model, &optimizer, &rng, step, pos, last_lr, elapsed_s, &scaler)?);
            last_saved = Some(step);
            plot(&out);
        }
        if vconfig.enabled() && step % vconfig.steps == 0 {
            let videos = validation.run(step, model.valid(), scheduler_plugin.as_deref_mut(), &mut validator_refs, &mut metrics, device)?;
            summary.validation_videos.extend(videos);
            last_validated = Some(step);
        }
        if let Some(cb) = on_step.as_deref_mut() {
            if cb(&record) {
                summary.stopped_early = step < total_steps;
                break;
            }
        }
    }
    summary.step = step;

    // ---- the end: a checkpoint (the official trainer's must_save), validation, export
    if last_saved != Some(step) && step > 0 {
        summary.last_checkpoint = Some(save(&mut model, &optimizer, &rng, step, pos, last_lr, elapsed_s, &scaler)?);
    }
    plot(&out);
    bar.finish();
    if summary.stopped_early {
        tracing::info!("stopped at step {step} of {total_steps}; resume with `Resume::Latest`");
        return Ok(summary);
    }
    if vconfig.enabled() && last_validated != Some(step) {
        let videos = validation.run(step, model.valid(), scheduler_plugin, &mut validator_refs, &mut metrics, device)?;
        summary.validation_videos.extend(videos);
    }
    let path = export(&mut model, &config, &spec, &adapter_params, &folder_transformer, &out)?;
    tracing::info!("wrote {}", path.display());
    summary.exported = Some(path);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_plugin_api::{PluginInfo, PluginKind, PluginResult, SchedulerTables};

    struct Tables(SchedulerTables);

    impl Plugin for Tables {
        fn info(&self) -> PluginInfo {
            PluginInfo { name: "tables".into(), version: "0.1.0".into(), kinds: vec![PluginKind::Scheduler], description: "test".into() }
        }
        fn scheduler_tables(&mut self, _config_json: &str) -> PluginResult<SchedulerTables> {
            Ok(self.0.clone())
        }
    }

    fn model_dir() -> PathBuf {
        cogvx_fixtures::model("cogvideox-2b-tiny")
    }

    #[test]
    fn timesteps_are_uniform_or_the_scheduler_plugins_distribution() {
        let dir = model_dir();
        let own = train_schedule(&dir, None).unwrap();
        let n = own.schedule.alphas_cumprod.len();
        assert_eq!(n, 1000);
        let mut rng = TrainRng::new(0);
        let draws: Vec<usize> = (0..5000).map(|_| own.draw_timestep(&mut rng)).collect();
        assert!(draws.iter().all(|t| *t < n));
        assert!(draws.iter().any(|t| *t < 100) && draws.iter().any(|t| *t >= 900));

        // A plugin that puts all the probability on timesteps 10 and 20 (1:3), with its own
        // alphas_cumprod.
        let ac: Vec<f64> = (0..n).map(|t| 0.999 - 0.99 * t as f64 / n as f64).collect();
        let mut weights = vec![0.0; n];
        weights[10] = 1.0;
        weights[20] = 3.0;
        let tables = SchedulerTables {
            alphas_cumprod: ac.clone(),
            timestep_weights: Some(weights),
            loss_weights: ac.iter().map(|a| 1.0 / (1.0 - a)).collect(),
        };
        let mut plugin = Tables(tables.clone());
        let s = train_schedule(&dir, Some(&mut plugin)).unwrap();
        assert_eq!(s.schedule.alphas_cumprod, ac);
        let mut counts = [0usize; 2];
        for _ in 0..4000 {
            match s.draw_timestep(&mut rng) {
                10 => counts[0] += 1,
                20 => counts[1] += 1,
                t => panic!("drew timestep {t}"),
            }
        }
        assert!((850..1150).contains(&counts[0]), "{counts:?}");

        // Loss weights other than CogVideoX's 1 / (1 - alphas_cumprod) are refused, as are bad tables.
        let mut bad = tables.clone();
        bad.loss_weights[5] = 1.0;
        let e = train_schedule(&dir, Some(&mut Tables(bad))).err().unwrap().to_string();
        assert!(e.contains("plugin `tables`") && e.contains("timestep 5"), "{e}");
        let mut bad = tables.clone();
        bad.timestep_weights = Some(vec![0.0; n]);
        assert!(train_schedule(&dir, Some(&mut Tables(bad))).is_err());
        let mut bad = tables;
        bad.alphas_cumprod[0] = 1.5;
        assert!(train_schedule(&dir, Some(&mut Tables(bad))).is_err());
    }
}
