//! # cogvx-trainer
//!
//! The CogVideoX training loop, faithful to the official finetune (`CogVideo/finetune`:
//! `trainer.py`, `models/cogvideox_{t2v,i2v}/lora_trainer.py`) under accelerate's semantics, with
//! exact resume:
//!
//! * [`config`]: [`TrainConfig`] / [`ValidationConfig`] with the official defaults.
//! * [`schedule`]: diffusers' `get_scheduler` learning-rate schedules as pure functions.
//! * [`checkpoint`]: atomic `checkpoint-<step>/` folders (weights, AdamW state, data position,
//!   LR schedule, configs), keep-last-K.
//! * [`train`]: the loop. Per epoch the cached samples are shuffled (seeded by `seed` and the
//!   epoch), cut into micro-batches of `batch_size` (the last one smaller when the sample count
//!   is not a multiple, as torch's `DataLoader(drop_last=False)`); each micro-batch draws its
//!   timesteps (uniform over `[0, num_train_timesteps)` or a scheduler plugin's distribution) and
//!   its gaussian noise per sample, from streams keyed by the seed and the sample's position in
//!   the run ([`TrainRng::for_sample`]), I2V builds its noisy image latents as the official
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

mod batch;
pub mod checkpoint;
pub mod config;
mod dist;
pub mod export;
pub mod lock;
pub mod rng;
mod run;
pub mod schedule;
mod validation;
mod zero;

pub use checkpoint::{
    latest_checkpoint, list_checkpoints, read_checkpoint, write_checkpoint, Checkpoint,
    DataPosition, TrainerState,
};
pub use config::{TrainConfig, ValidationConfig};
pub use export::{ExportFormat, ExportReport, EXPORT_REPORT_FILE};
pub use rng::{batches_per_epoch, epoch_batches, epoch_order, TrainRng};
pub use schedule::{LrSchedule, LrScheduler};

use std::path::{Path, PathBuf};

use cogvx_cache::Cache;
use cogvx_metrics::StepRecord;
use cogvx_model_core::adapter::RecipeLimits;
use cogvx_plugin_api::Plugin;

/// Metrics file name under `output_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Loss-curve file name under `output_dir`.
pub const LOSS_PLOT_FILE: &str = "loss.png";
/// Folder of the TensorBoard event files under `output_dir` (`[train] tensorboard`).
pub const TENSORBOARD_DIR: &str = "tensorboard";

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
        Ok(if s == "latest" {
            Resume::Latest
        } else {
            Resume::Path(PathBuf::from(s))
        })
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
    /// The whole resolved config of the run as JSON (`cogvx train` gives its TOML config with
    /// the command-line overrides applied), stored in every checkpoint. A resume whose config
    /// differs in a key that changes what is trained (`data.resolution`, `data.transforms`, a
    /// `plugin.<name>` table, ...) is refused naming the keys; a moved folder (`model.path`,
    /// `data.root`, ...) is only logged. `None`: not stored, not compared.
    pub run_config: Option<serde_json::Value>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Called after every step (after its checkpoint and validation); returning `true` stops the
    /// run after writing a checkpoint of that step (a later `Resume::Latest` continues it).
    pub on_step: Option<&'a mut dyn FnMut(&StepRecord) -> bool>,
    /// Called after each checkpoint file is written and synced (fault-injection tests).
    pub on_checkpoint_file: Option<&'a dyn Fn(&Path)>,
    /// The processes of a data-parallel run ([`cogvx_dist::Solo`]: one). Every rank trains its
    /// share of each step's micro-batches, the gradients are summed before the update; rank 0
    /// alone writes the output folder (checkpoints, metrics, validation, export).
    pub collective: &'a dyn cogvx_dist::Collective,
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
            run_config: None,
            progress: true,
            on_step: None,
            on_checkpoint_file: None,
            collective: &cogvx_dist::Solo,
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
    /// The exported weights (`None` when the run was stopped early): the first of
    /// `export_formats` for a LoRA.
    pub exported: Option<PathBuf>,
    /// What each exported LoRA file holds and does (also in `output_dir/export_report.json`).
    pub export_reports: Vec<ExportReport>,
    /// Validation videos written.
    pub validation_videos: Vec<PathBuf>,
    /// The run stopped early through [`TrainJob::on_step`].
    pub stopped_early: bool,
    /// fp16: the steps of this run skipped because their gradients overflowed.
    pub skipped_steps: Vec<u64>,
}

pub(crate) fn input<T>(message: impl Into<String>) -> Result<T, TrainerError> {
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
    let io = |e: std::io::Error| {
        TrainerError::Io {
        path: dir.to_path_buf(),
        message: format!("the output folder is not writable: {e}; choose another `[train] output_dir` (--output-dir DIR)"),
    }
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
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
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

/// Name of the SFT export folder under `output_dir`.
pub const SFT_EXPORT_DIR: &str = "transformer";

/// Runs (or resumes) a training job on `device` and exports the result; see the crate docs.
pub fn train<B: cogvx_model_core::ModelAutodiffBackend>(
    mut job: TrainJob<'_>,
    device: &B::Device,
) -> Result<TrainSummary, TrainerError> {
    let mut on_step = job.on_step.take();
    let mut run = run::Run::<B>::set_up(job, device)?;
    while run.step < run.total_steps {
        let record = run.train_step()?;
        if record.step % run.config.checkpointing_steps == 0 {
            run.checkpoint()?;
        }
        if run.vconfig.enabled() && record.step % run.vconfig.steps == 0 {
            run.validate()?;
        }
        let mut stop = [0f32];
        if let Some(cb) = on_step.as_deref_mut() {
            stop[0] = cb(&record) as u8 as f32;
        }
        // Every rank stops when one is asked to (Ctrl-C reaches each process).
        run.world.all_reduce_sum(&mut stop);
        if stop[0] > 0.0 {
            run.summary.stopped_early = run.step < run.total_steps;
            break;
        }
    }
    run.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::train_schedule;
    use cogvx_plugin_api::{PluginInfo, PluginKind, PluginResult, SchedulerTables};

    struct Tables(SchedulerTables);

    impl Plugin for Tables {
        fn info(&self) -> PluginInfo {
            PluginInfo {
                name: "tables".into(),
                version: "0.1.0".into(),
                kinds: vec![PluginKind::Scheduler],
                description: "test".into(),
            }
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
        let e = train_schedule(&dir, Some(&mut Tables(bad)))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("plugin `tables`") && e.contains("timestep 5"),
            "{e}"
        );
        let mut bad = tables.clone();
        bad.timestep_weights = Some(vec![0.0; n]);
        assert!(train_schedule(&dir, Some(&mut Tables(bad))).is_err());
        let mut bad = tables.clone();
        bad.alphas_cumprod[0] = 1.5;
        assert!(train_schedule(&dir, Some(&mut Tables(bad))).is_err());

        // Empty alphas_cumprod and loss weights keep the model's schedule: only the timestep
        // distribution changes (a timestep-sampling plugin); the weights must cover its steps.
        let only_weights = SchedulerTables {
            alphas_cumprod: Vec::new(),
            loss_weights: Vec::new(),
            ..tables.clone()
        };
        let s = train_schedule(&dir, Some(&mut Tables(only_weights.clone()))).unwrap();
        assert_eq!(s.schedule.alphas_cumprod, own.schedule.alphas_cumprod);
        assert!([10, 20].contains(&s.draw_timestep(&mut rng)));
        let mut bad = only_weights.clone();
        bad.timestep_weights = Some(vec![1.0; n - 1]);
        assert!(train_schedule(&dir, Some(&mut Tables(bad))).is_err());
        // Loss weights without their alphas_cumprod are refused.
        let mut bad = only_weights;
        bad.loss_weights = tables.loss_weights;
        let e = train_schedule(&dir, Some(&mut Tables(bad)))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("alphas_cumprod"), "{e}");
    }
}
