//! `scheduler/scheduler_config.json` of a CogVideoX model folder, as read by diffusers'
//! `CogVideoXDDIMScheduler.__init__` / `CogVideoXDPMScheduler.__init__` (both take the same keys
//! with the same defaults).

use serde_json::{Map, Value};

use crate::SchedulerError;

/// How the betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, n, dtype=float32)`.
    Linear,
    /// `torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=float64) ** 2` (CogVideoX).
    ScaledLinear,
    /// Glide cosine schedule (`betas_for_alpha_bar`, float32).
    SquaredcosCapV2,
}

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// The clean sample x0.
    Sample,
    /// The velocity `sqrt(a) * noise - sqrt(1 - a) * x0` (CogVideoX).
    VPrediction,
}

/// How inference timesteps are spread over the training range (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `np.linspace(0, n_train - 1, steps).round()[::-1]`.
    Linspace,
    /// `arange(0, steps) * (n_train // steps) + steps_offset`, reversed.
    Leading,
    /// `round(arange(n_train, 0, -n_train / steps)) - 1` (CogVideoX).
    Trailing,
}

/// The scheduler config, with diffusers' defaults for absent keys.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`, when present (e.g. `CogVideoXDDIMScheduler`).
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// Read for completeness; the CogVideoX schedulers never clip (diffusers ignores it too).
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
    pub snr_shift_scale: f64,
}

impl Default for SchedulerConfig {
    /// The defaults of `CogVideoXDDIMScheduler.__init__` (identical for the DPM scheduler).
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.0120,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
            snr_shift_scale: 3.0,
        }
    }
}

/// Class names whose config this crate understands.
pub const KNOWN_CLASSES: [&str; 2] = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"];

impl SchedulerConfig {
    /// Parses `scheduler_config.json` text. `source` names the file in error messages.
    ///
    /// Keys diffusers does not use for these schedulers (`_diffusers_version`,
    /// `clip_sample_range`, `sample_max_value`, ...) are ignored as diffusers does; a known key
    /// with a value of the wrong type or an unknown enum value is an error naming the key.
    pub fn from_json(text: &str, source: &str) -> Result<Self, SchedulerError> {
        let value: Value = serde_json::from_str(text).map_err(|e| SchedulerError::Config {
            source_name: source.to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        let map = value.as_object().ok_or_else(|| SchedulerError::Config {
            source_name: source.to_string(),
            message: "expected a JSON object at the top level".into(),
        })?;
        let r = Reader { map, source };
        let d = SchedulerConfig::default();
        let class_name = r.opt_str("_class_name")?;
        let beta_schedule = match r.opt_str("beta_schedule")?.as_deref() {
            None => d.beta_schedule,
            Some("linear") => BetaSchedule::Linear,
            Some("scaled_linear") => BetaSchedule::ScaledLinear,
            Some("squaredcos_cap_v2") => BetaSchedule::SquaredcosCapV2,
            Some(other) => {
                return Err(r.err(
                    "beta_schedule",
                    format!("unknown value {other:?}; expected \"linear\", \"scaled_linear\" or \"squaredcos_cap_v2\""),
                ))
            }
        };
        let prediction_type = match r.opt_str("prediction_type")?.as_deref() {
            None => d.prediction_type,
            Some("epsilon") => PredictionType::Epsilon,
            Some("sample") => PredictionType::Sample,
            Some("v_prediction") => PredictionType::VPrediction,
            Some(other) => {
                return Err(r.err(
                    "prediction_type",
                    format!(
                    "unknown value {other:?}; expected \"epsilon\", \"sample\" or \"v_prediction\""
                ),
                ))
            }
        };
        let timestep_spacing = match r.opt_str("timestep_spacing")?.as_deref() {
            None => d.timestep_spacing,
            Some("linspace") => TimestepSpacing::Linspace,
            Some("leading") => TimestepSpacing::Leading,
            Some("trailing") => TimestepSpacing::Trailing,
            Some(other) => {
                return Err(r.err(
                    "timestep_spacing",
                    format!(
                    "unknown value {other:?}; expected \"linspace\", \"leading\" or \"trailing\""
                ),
                ))
            }
        };
        let trained_betas = match map.get("trained_betas") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_f64().ok_or_else(|| {
                            r.err("trained_betas", "expected an array of numbers".into())
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(_) => {
                return Err(r.err(
                    "trained_betas",
                    "expected an array of numbers or null".into(),
                ))
            }
        };
        let cfg = SchedulerConfig {
            class_name,
            num_train_timesteps: r
                .opt_usize("num_train_timesteps")?
                .unwrap_or(d.num_train_timesteps),
            beta_start: r.opt_f64("beta_start")?.unwrap_or(d.beta_start),
            beta_end: r.opt_f64("beta_end")?.unwrap_or(d.beta_end),
            beta_schedule,
            trained_betas,
            clip_sample: r.opt_bool("clip_sample")?.unwrap_or(d.clip_sample),
            set_alpha_to_one: r
                .opt_bool("set_alpha_to_one")?
                .unwrap_or(d.set_alpha_to_one),
            steps_offset: r.opt_usize("steps_offset")?.unwrap_or(d.steps_offset),
            prediction_type,
            timestep_spacing,
            rescale_betas_zero_snr: r
                .opt_bool("rescale_betas_zero_snr")?
                .unwrap_or(d.rescale_betas_zero_snr),
            snr_shift_scale: r.opt_f64("snr_shift_scale")?.unwrap_or(d.snr_shift_scale),
        };
        if cfg.num_train_timesteps == 0 {
            return Err(r.err("num_train_timesteps", "must be at least 1".into()));
        }
        if let Some(b) = &cfg.trained_betas {
            if b.len() != cfg.num_train_timesteps {
                return Err(r.err(
                    "trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {}",
                        b.len(),
                        cfg.num_train_timesteps
                    ),
                ));
            }
        }
        Ok(cfg)
    }

    /// Reads `path` (a `scheduler_config.json`) and parses it.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|e| SchedulerError::Config {
            source_name: path.display().to_string(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::from_json(&text, &path.display().to_string())
    }
}

struct Reader<'a> {
    map: &'a Map<String, Value>,
    source: &'a str,
}

impl Reader<'_> {
    fn err(&self, key: &str, message: String) -> SchedulerError {
        SchedulerError::Config {
            source_name: self.source.to_string(),
            message: format!("key `{key}`: {message}"),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>, SchedulerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, SchedulerError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, SchedulerError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, SchedulerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, found {v}"))),
        }
    }
}
