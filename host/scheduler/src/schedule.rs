//! The noise schedule shared by `CogVideoXDDIMScheduler` and `CogVideoXDPMScheduler`
//! (diffusers `schedulers/scheduling_ddim_cogvideox.py`, `__init__` and `set_timesteps`).
//!
//! Tables are held in `f64`. diffusers builds `scaled_linear` betas in float64 (so the whole
//! `alphas_cumprod` chain is float64), but `linear`, `squaredcos_cap_v2` and `trained_betas` in
//! float32; for those every intermediate here is rounded to `f32` after each operation, which
//! reproduces torch's float32 arithmetic value for value.

use cogvx_plugin_api::SchedulerTables;

use crate::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};
use crate::SchedulerError;

/// The dtype diffusers computes the tables in for a given config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TablePrecision {
    F32,
    F64,
}

impl TablePrecision {
    fn round(self, x: f64) -> f64 {
        match self {
            TablePrecision::F32 => x as f32 as f64,
            TablePrecision::F64 => x,
        }
    }
}

/// Betas, `alphas_cumprod` and the final alpha of a CogVideoX scheduler config.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    pub config: SchedulerConfig,
    /// The dtype diffusers uses for these tables.
    pub precision: TablePrecision,
    pub betas: Vec<f64>,
    /// `cumprod(1 - betas)`, SNR-shifted by `snr_shift_scale`, rescaled to zero terminal SNR
    /// when `rescale_betas_zero_snr` is set.
    pub alphas_cumprod: Vec<f64>,
    /// The "previous" alpha of the last step: `1.0` with `set_alpha_to_one`, else `alphas_cumprod[0]`.
    pub final_alpha_cumprod: f64,
}

/// `torch.linspace(start, end, steps)` on the CPU: the first half counts up from `start`, the
/// second half down from `end`, each value rounded to `p`.
fn torch_linspace(start: f64, end: f64, steps: usize, p: TablePrecision) -> Vec<f64> {
    if steps == 1 {
        return vec![p.round(start)];
    }
    let (start, end) = (p.round(start), p.round(end));
    let step = p.round((end - start) / (steps - 1) as f64);
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                p.round(start + p.round(step * i as f64))
            } else {
                p.round(end - p.round(step * (steps - i - 1) as f64))
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (computed in Python floats,
/// stored as float32).
fn betas_for_alpha_bar(n: usize, max_beta: f64) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            ((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta)) as f32 as f64
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` applied to `alphas_cumprod` (Algorithm 1 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
fn rescale_zero_terminal_snr(alphas_cumprod: &[f64], p: TablePrecision) -> Vec<f64> {
    let sqrt: Vec<f64> = alphas_cumprod.iter().map(|a| p.round(a.sqrt())).collect();
    let s0 = sqrt[0];
    let st = sqrt[sqrt.len() - 1];
    let scale = p.round(s0 / p.round(s0 - st));
    sqrt.iter()
        .map(|s| {
            let shifted = p.round(s - st);
            let scaled = p.round(shifted * scale);
            p.round(scaled * scaled)
        })
        .collect()
}

impl NoiseSchedule {
    /// Builds the tables as `CogVideoXDDIMScheduler.__init__` does.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        let n = config.num_train_timesteps;
        let (precision, betas) = if let Some(trained) = &config.trained_betas {
            (
                TablePrecision::F32,
                trained.iter().map(|b| *b as f32 as f64).collect::<Vec<_>>(),
            )
        } else {
            match config.beta_schedule {
                BetaSchedule::Linear => (
                    TablePrecision::F32,
                    torch_linspace(config.beta_start, config.beta_end, n, TablePrecision::F32),
                ),
                BetaSchedule::ScaledLinear => {
                    let p = TablePrecision::F64;
                    let roots = torch_linspace(
                        config.beta_start.powf(0.5),
                        config.beta_end.powf(0.5),
                        n,
                        p,
                    );
                    (p, roots.iter().map(|r| r * r).collect())
                }
                BetaSchedule::SquaredcosCapV2 => {
                    (TablePrecision::F32, betas_for_alpha_bar(n, 0.999))
                }
            }
        };
        let p = precision;
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f64;
        for (i, b) in betas.iter().enumerate() {
            let alpha = p.round(1.0 - b);
            acc = if i == 0 { alpha } else { p.round(acc * alpha) };
            alphas_cumprod.push(acc);
        }
        // alphas_cumprod / (snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod)
        let s = config.snr_shift_scale;
        let one_minus_s = p.round(1.0 - s);
        for a in alphas_cumprod.iter_mut() {
            let denom = p.round(p.round(s) + p.round(one_minus_s * *a));
            *a = p.round(*a / denom);
        }
        if config.rescale_betas_zero_snr {
            alphas_cumprod = rescale_zero_terminal_snr(&alphas_cumprod, p);
        }
        if let Some((i, a)) = alphas_cumprod
            .iter()
            .enumerate()
            .find(|(_, a)| !a.is_finite() || **a < 0.0 || **a > 1.0)
        {
            return Err(SchedulerError::Invalid(format!(
                "the scheduler config gives alphas_cumprod[{i}] = {a}, outside [0, 1]: check beta_start, beta_end, \
                 trained_betas and snr_shift_scale (must be positive)"
            )));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(NoiseSchedule {
            config,
            precision,
            betas,
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    /// Parses a `scheduler_config.json` text and builds the tables.
    pub fn from_json(text: &str, source: &str) -> Result<Self, SchedulerError> {
        Self::new(SchedulerConfig::from_json(text, source)?)
    }

    /// Number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// `alphas_cumprod[t]`, or `final_alpha_cumprod` for `t < 0` (the step after the last).
    pub fn alpha_prod(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// The per-timestep loss weights of the CogVideoX trainer, `1 / (1 - alphas_cumprod)`.
    pub fn loss_weights(&self) -> Vec<f64> {
        crate::train::loss_weights(&self.alphas_cumprod)
    }

    /// The training tables in the plugin API's form (uniform timestep sampling).
    pub fn tables(&self) -> SchedulerTables {
        SchedulerTables {
            alphas_cumprod: self.alphas_cumprod.clone(),
            timestep_weights: None,
            loss_weights: self.loss_weights(),
        }
    }

    /// The inference timesteps of `set_timesteps(num_inference_steps)`, highest first.
    pub fn timesteps(&self, num_inference_steps: usize) -> Result<Vec<u32>, SchedulerError> {
        let n_train = self.config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            return Err(SchedulerError::Invalid(format!(
                "num_inference_steps = {num_inference_steps}: must be between 1 and num_train_timesteps = {n_train}"
            )));
        }
        let steps = num_inference_steps;
        let ts: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                // np.linspace(0, n_train - 1, steps).round()[::-1]
                let stop = (n_train - 1) as f64;
                let mut v: Vec<f64> = if steps == 1 {
                    vec![0.0]
                } else {
                    let step = stop / (steps - 1) as f64;
                    let mut v: Vec<f64> = (0..steps).map(|i| i as f64 * step).collect();
                    v[steps - 1] = stop;
                    v
                };
                v.reverse();
                v.iter().map(|x| x.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n_train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // np.round(np.arange(n_train, 0, -n_train / steps)) - 1, with numpy's arange fill:
                // x[i] = start + i * ((start + delta) - start).
                let start = n_train as f64;
                let delta = -(n_train as f64 / steps as f64);
                let len = ((0.0 - start) / delta).ceil().max(0.0) as usize;
                let d = (start + delta) - start;
                let ts: Vec<i64> = (0..len)
                    .map(|i| (start + i as f64 * d).round_ties_even() as i64 - 1)
                    .collect();
                if ts.len() != steps {
                    // numpy's float arange overshoots for some step counts (61, 103, 121, ...
                    // of 1000) and diffusers then runs an extra step at timestep -1.
                    return Err(SchedulerError::Invalid(format!(
                        "num_inference_steps = {steps} with \"trailing\" spacing: diffusers computes {} timesteps \
                         ({:?}), a float rounding artifact that ends on timestep -1; choose another step count",
                        ts.len(),
                        &ts[ts.len().saturating_sub(3)..]
                    )));
                }
                ts
            }
        };
        ts.iter()
            .map(|&t| {
                if t < 0 || t as usize >= n_train {
                    Err(SchedulerError::Invalid(format!(
                        "timestep {t} from timestep_spacing/steps_offset is outside 0..{n_train}: lower steps_offset"
                    )))
                } else {
                    Ok(t as u32)
                }
            })
            .collect()
    }

    /// The `prev_timestep` the CogVideoX schedulers step to from `t`:
    /// `t - num_train_timesteps // num_inference_steps` (negative past the end).
    pub fn prev_timestep(&self, t: u32, num_inference_steps: usize) -> i64 {
        t as i64 - (self.config.num_train_timesteps / num_inference_steps) as i64
    }
}
