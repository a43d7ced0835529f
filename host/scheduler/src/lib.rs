//! # cogvx-scheduler
//!
//! The CogVideoX noise schedulers of diffusers, `CogVideoXDDIMScheduler`
//! (`schedulers/scheduling_ddim_cogvideox.py`) and `CogVideoXDPMScheduler`
//! (`schedulers/scheduling_dpm_cogvideox.py`), as the built-in plugins of the scheduler kind:
//!
//! * [`schedule`]: the tables (`alphas_cumprod` with `snr_shift_scale` and the zero-terminal-SNR
//!   rescale) and the inference timesteps (`linspace`, `leading`, `trailing`).
//! * [`plan`]: each sampling step as the linear coefficients of the plugin API
//!   ([`cogvx_plugin_api::StepCoefficients`]); DDIM and DPM-Solver++ 2M with the previous x0.
//! * [`executor`]: applies an [`cogvx_plugin_api::InferencePlan`] (built-in or from any
//!   scheduler plugin) to burn tensors, with the noise passed in by the caller.
//! * [`train`]: `add_noise`, `get_velocity` and the trainer's loss weights.
//! * [`CogVideoXDdim`] / [`CogVideoXDpm`]: the [`Plugin`] impls named `cogvideox-ddim` and
//!   `cogvideox-dpm`; a loaded plugin of the same name replaces them.
//! * [`run_case`]: the `scheduler_train`, `scheduler_ddim` and `scheduler_dpm` parity cases.

pub mod config;
pub mod executor;
pub mod noise;
pub mod plan;
pub mod schedule;
pub mod train;

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Tensor};
use cogvx_model_core::case::{Case, HostTensor};
use cogvx_model_core::LoadError;
use cogvx_plugin_api::{
    InferencePlan, Plugin, PluginError, PluginInfo, PluginKind, PluginResult, SchedulerPlanRequest,
    SchedulerTables,
};

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use executor::{apply_step, step_needs_noise, PlanExecutor, StepOutput};
pub use plan::{ddim_plan, dpm_plan};
pub use schedule::{NoiseSchedule, TablePrecision};
pub use train::{add_noise, get_velocity, loss_weights};

/// Name of the built-in DDIM scheduler plugin.
pub const DDIM_PLUGIN: &str = "cogvideox-ddim";
/// Name of the built-in DPM scheduler plugin.
pub const DPM_PLUGIN: &str = "cogvideox-dpm";

/// Why a scheduler operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The scheduler config is malformed; `source_name` is the file (or where the text came from).
    #[error("{source_name}: {message}")]
    Config {
        source_name: String,
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// Tensor shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A parity case could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl From<SchedulerError> for PluginError {
    fn from(e: SchedulerError) -> Self {
        PluginError::Invalid(e.to_string())
    }
}

/// Which of the two CogVideoX schedulers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `CogVideoXDDIMScheduler`.
    Ddim,
    /// `CogVideoXDPMScheduler`.
    Dpm,
}

impl SchedulerKind {
    /// The kind for a diffusers `_class_name`, `None` if it is neither CogVideoX scheduler.
    pub fn from_class_name(class: &str) -> Option<Self> {
        match class {
            "CogVideoXDDIMScheduler" => Some(SchedulerKind::Ddim),
            "CogVideoXDPMScheduler" => Some(SchedulerKind::Dpm),
            _ => None,
        }
    }

    /// The built-in plugin's name (`cogvideox-ddim` / `cogvideox-dpm`).
    pub fn plugin_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => DDIM_PLUGIN,
            SchedulerKind::Dpm => DPM_PLUGIN,
        }
    }

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "CogVideoXDDIMScheduler",
            SchedulerKind::Dpm => "CogVideoXDPMScheduler",
        }
    }

    /// The inference plan of this scheduler.
    pub fn plan(
        self,
        schedule: &NoiseSchedule,
        num_inference_steps: usize,
    ) -> Result<InferencePlan, SchedulerError> {
        match self {
            SchedulerKind::Ddim => ddim_plan(schedule, num_inference_steps),
            SchedulerKind::Dpm => dpm_plan(schedule, num_inference_steps),
        }
    }
}

fn plugin_tables(config_json: &str) -> PluginResult<SchedulerTables> {
    Ok(NoiseSchedule::from_json(config_json, "scheduler_config.json")?.tables())
}

fn plugin_plan(kind: SchedulerKind, request: &SchedulerPlanRequest) -> PluginResult<InferencePlan> {
    let schedule = NoiseSchedule::from_json(&request.config_json, "scheduler_config.json")?;
    Ok(kind.plan(&schedule, request.num_inference_steps as usize)?)
}

/// The built-in `cogvideox-ddim` scheduler plugin (`CogVideoXDDIMScheduler`, eta = 0).
#[derive(Clone, Copy, Debug, Default)]
pub struct CogVideoXDdim;

impl Plugin for CogVideoXDdim {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: DDIM_PLUGIN.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: vec![PluginKind::Scheduler],
            description: "CogVideoX DDIM (diffusers CogVideoXDDIMScheduler), built in".into(),
        }
    }

    fn scheduler_tables(&mut self, config_json: &str) -> PluginResult<SchedulerTables> {
        plugin_tables(config_json)
    }

    fn scheduler_plan(&mut self, request: &SchedulerPlanRequest) -> PluginResult<InferencePlan> {
        plugin_plan(SchedulerKind::Ddim, request)
    }
}

/// The built-in `cogvideox-dpm` scheduler plugin (`CogVideoXDPMScheduler`, SDE DPM-Solver++ 2M).
#[derive(Clone, Copy, Debug, Default)]
pub struct CogVideoXDpm;

impl Plugin for CogVideoXDpm {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: DPM_PLUGIN.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: vec![PluginKind::Scheduler],
            description: "CogVideoX DPM-Solver++ 2M (diffusers CogVideoXDPMScheduler), built in"
                .into(),
        }
    }

    fn scheduler_tables(&mut self, config_json: &str) -> PluginResult<SchedulerTables> {
        plugin_tables(config_json)
    }

    fn scheduler_plan(&mut self, request: &SchedulerPlanRequest) -> PluginResult<InferencePlan> {
        plugin_plan(SchedulerKind::Dpm, request)
    }
}

/// Both built-in scheduler plugins.
pub fn builtin_plugins() -> Vec<Box<dyn Plugin>> {
    vec![Box::new(CogVideoXDdim), Box::new(CogVideoXDpm)]
}

/// The components [`run_case`] handles.
pub const CASE_COMPONENTS: [&str; 3] = ["scheduler_train", "scheduler_ddim", "scheduler_dpm"];

fn timesteps_of(t: &HostTensor, n_train: usize) -> Result<Vec<usize>, SchedulerError> {
    t.to_i64()
        .into_iter()
        .map(|v| {
            if v < 0 || v as usize >= n_train {
                Err(SchedulerError::Invalid(format!(
                    "timestep {v} is outside 0..{n_train}"
                )))
            } else {
                Ok(v as usize)
            }
        })
        .collect()
}

/// A case tensor of any rank as `[shape[0], rest]` (every scheduler op is per batch element or
/// element-wise), with its original shape to restore.
fn batch_rows<B: Backend>(
    t: &HostTensor,
    device: &B::Device,
) -> Result<(Tensor<B, 2>, Vec<usize>), SchedulerError> {
    let n = *t
        .shape
        .first()
        .ok_or_else(|| SchedulerError::Shape("a scalar where a batch was expected".into()))?;
    let rest = t.shape[1..].iter().product::<usize>();
    let flat = HostTensor::f32(vec![n, rest], t.to_f32());
    Ok((flat.to_tensor::<B, 2>(device)?, t.shape.clone()))
}

fn to_host<B: Backend>(t: Tensor<B, 2>, shape: &[usize]) -> HostTensor {
    let mut h = HostTensor::from_tensor(t);
    h.shape = shape.to_vec();
    h
}

/// Runs a `scheduler_train`, `scheduler_ddim` or `scheduler_dpm` parity case (see
/// `shared/reference/README.md`) with the scheduler config of the case's model folder, and
/// returns its outputs by name (without `out.`).
///
/// * `scheduler_train`: `noisy = add_noise(sample, noise, t)`,
///   `velocity = get_velocity(noise, sample, t)` (arguments in the order the case recorded
///   them), `alphas_cumprod`.
/// * `scheduler_ddim` / `scheduler_dpm`: `timesteps` and `prev_sample.<i>` of a loop over
///   `params.num_inference_steps` steps fed with `model_output.<i>` (and DPM's `noise.<i>`),
///   executed through the coefficient plan of the built-in plugin.
pub fn run_case<B: Backend>(
    case: &Case,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, SchedulerError> {
    let config_path = case
        .model_dir
        .join("scheduler")
        .join("scheduler_config.json");
    let config_json = std::fs::read_to_string(&config_path).map_err(|e| {
        SchedulerError::Invalid(format!("cannot read {}: {e}", config_path.display()))
    })?;
    let mut out = BTreeMap::new();
    match case.component.as_str() {
        "scheduler_train" => {
            let mut plugin = CogVideoXDdim;
            let tables = plugin
                .scheduler_tables(&config_json)
                .map_err(|e| SchedulerError::Invalid(e.to_string()))?;
            let ac = &tables.alphas_cumprod;
            let (sample, shape) = batch_rows::<B>(case.input("sample")?, device)?;
            let (noise, noise_shape) = batch_rows::<B>(case.input("noise")?, device)?;
            if noise_shape != shape {
                return Err(SchedulerError::Shape(format!(
                    "case {}: noise {noise_shape:?} vs sample {shape:?}",
                    case.name
                )));
            }
            let ts = timesteps_of(case.input("timesteps")?, ac.len())?;
            let noisy = add_noise(ac, sample.clone(), noise.clone(), &ts)?;
            let velocity = get_velocity(ac, noise, sample, &ts)?;
            out.insert("noisy".into(), to_host(noisy, &shape));
            out.insert("velocity".into(), to_host(velocity, &shape));
            out.insert(
                "alphas_cumprod".into(),
                HostTensor::f32(vec![ac.len()], ac.iter().map(|a| *a as f32).collect()),
            );
        }
        "scheduler_ddim" | "scheduler_dpm" => {
            let steps = case.param("num_inference_steps")?.as_u64().ok_or_else(|| {
                SchedulerError::Invalid(format!(
                    "case {}: num_inference_steps is not an integer",
                    case.name
                ))
            })?;
            let request = SchedulerPlanRequest {
                config_json,
                num_inference_steps: steps as u32,
            };
            let mut plugin: Box<dyn Plugin> = if case.component == "scheduler_ddim" {
                Box::new(CogVideoXDdim)
            } else {
                Box::new(CogVideoXDpm)
            };
            let plan = plugin
                .scheduler_plan(&request)
                .map_err(|e| SchedulerError::Invalid(e.to_string()))?;
            let timesteps: Vec<i64> = plan.steps.iter().map(|s| s.timestep as i64).collect();
            out.insert(
                "timesteps".into(),
                HostTensor::i64(vec![timesteps.len()], timesteps),
            );
            let mut executor = PlanExecutor::<B, 2>::new(plan)?;
            let (mut sample, shape) = batch_rows::<B>(case.input("sample")?, device)?;
            let mut i = 0;
            while executor.current_timestep().is_some() {
                let (model_output, _) =
                    batch_rows::<B>(case.input(&format!("model_output.{i}"))?, device)?;
                let noise = if executor.needs_noise() {
                    Some(batch_rows::<B>(case.input(&format!("noise.{i}"))?, device)?.0)
                } else {
                    None
                };
                sample = executor.step(sample, model_output, noise)?.prev_sample;
                out.insert(format!("prev_sample.{i}"), to_host(sample.clone(), &shape));
                i += 1;
            }
        }
        other => {
            return Err(SchedulerError::Invalid(format!(
                "case {}: component `{other}` is not a scheduler component ({})",
                case.name,
                CASE_COMPONENTS.join(", ")
            )))
        }
    }
    Ok(out)
}
