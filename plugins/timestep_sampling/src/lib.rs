//! # `timestep_sampling` — which timesteps training samples
//!
//! A scheduler plugin (training side only). The official CogVideoX finetune draws each sample's
//! timestep uniformly from `0..num_train_timesteps`; SD3-era trainers (finetrainers,
//! SimpleTuner, diffusion-pipe) also offer distributions that spend more steps at middle or high
//! noise. This plugin returns only [`SchedulerTables::timestep_weights`]: the host keeps the
//! model folder's noise schedule, its loss weights and, for validation, its sampler.
//!
//! Use it with `[model] scheduler = "timestep_sampling"` and a `[plugin.timestep_sampling]`
//! table:
//!
//! | `distribution` | parameters | density of `x = t / N` (noise fraction) |
//! | --- | --- | --- |
//! | `"logit_normal"` (default) | `mean` (0), `std` (1) | `logit(x) ~ Normal(mean, std)` (SD3) |
//! | `"shifted"` | `shift` (3) | `x = shift·u / (1 + (shift - 1)·u)`, `u ~ U(0, 1)` (SD3's shift) |
//! | `"uniform"` | — | uniform, as the official finetune |
//!
//! The weight of timestep `t` is the probability mass the continuous distribution puts on
//! `[t / N, (t + 1) / N)` (`F((t + 1) / N) - F(t / N)` with the CDF `F`), so the weights sum to
//! one and a histogram of drawn timesteps converges to them. `mean > 0` or `shift > 1` move the
//! mass to high noise (large `t`).

use cogvx_plugin_api::serde::Deserialize;
use cogvx_plugin_api::{
    serde_json, Plugin, PluginError, PluginInfo, PluginKind, PluginResult, SchedulerTables,
};

/// The plugin's name (`[model] scheduler` and `[plugin.<name>]`).
pub const NAME: &str = "timestep_sampling";

/// The distribution of the training timesteps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(crate = "cogvx_plugin_api::serde", rename_all = "snake_case")]
pub enum Distribution {
    /// `logit(t / N) ~ Normal(mean, std)`.
    #[default]
    LogitNormal,
    /// `u ~ U(0, 1)` shifted by `shift · u / (1 + (shift - 1) · u)`.
    Shifted,
    /// Every timestep alike.
    Uniform,
}

/// `[plugin.timestep_sampling]` as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(crate = "cogvx_plugin_api::serde", deny_unknown_fields, default)]
struct Params {
    distribution: Distribution,
    mean: Option<f64>,
    std: Option<f64>,
    shift: Option<f64>,
}

/// A validated configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// `logit(x) ~ Normal(mean, std)`.
    LogitNormal { mean: f64, std: f64 },
    /// SD3's timestep shift of a uniform draw.
    Shifted { shift: f64 },
    /// Uniform.
    Uniform,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::LogitNormal {
            mean: 0.0,
            std: 1.0,
        }
    }
}

fn invalid(message: String) -> PluginError {
    PluginError::Invalid(format!("{NAME}: {message}"))
}

impl Sampling {
    /// Parses and checks `[plugin.timestep_sampling]` (as JSON).
    pub fn from_params(params_json: &str) -> PluginResult<Self> {
        let p: Params = cogvx_plugin_api::parse_params(NAME, params_json)?;
        let unused = |key: &str, value: Option<f64>| match value {
            Some(_) => Err(invalid(format!(
                "[plugin.{NAME}] `{key}` does not apply to distribution = \"{}\"; remove it",
                match p.distribution {
                    Distribution::LogitNormal => "logit_normal",
                    Distribution::Shifted => "shifted",
                    Distribution::Uniform => "uniform",
                }
            ))),
            None => Ok(()),
        };
        match p.distribution {
            Distribution::LogitNormal => {
                unused("shift", p.shift)?;
                let mean = p.mean.unwrap_or(0.0);
                let std = p.std.unwrap_or(1.0);
                if !mean.is_finite() || mean.abs() > 10.0 {
                    return Err(invalid(format!(
                        "[plugin.{NAME}] mean = {mean}: use a value in [-10, 10] (0 centres the mass at t = N/2)"
                    )));
                }
                if !(std.is_finite() && std > 0.0 && std <= 10.0) {
                    return Err(invalid(format!(
                        "[plugin.{NAME}] std = {std}: use a value in (0, 10] (1 is SD3's default)"
                    )));
                }
                Ok(Sampling::LogitNormal { mean, std })
            }
            Distribution::Shifted => {
                unused("mean", p.mean)?;
                unused("std", p.std)?;
                let shift = p.shift.unwrap_or(3.0);
                if !(shift.is_finite() && shift > 0.0 && shift <= 1000.0) {
                    return Err(invalid(format!(
                        "[plugin.{NAME}] shift = {shift}: use a value in (0, 1000] (1 is uniform, 3 is SD3's default)"
                    )));
                }
                Ok(Sampling::Shifted { shift })
            }
            Distribution::Uniform => {
                unused("mean", p.mean)?;
                unused("std", p.std)?;
                unused("shift", p.shift)?;
                Ok(Sampling::Uniform)
            }
        }
    }

    /// The distribution's CDF at the noise fraction `x` in `[0, 1]`.
    pub fn cdf(&self, x: f64) -> f64 {
        if x <= 0.0 {
            return 0.0;
        }
        if x >= 1.0 {
            return 1.0;
        }
        match *self {
            Sampling::LogitNormal { mean, std } => {
                let z = ((x / (1.0 - x)).ln() - mean) / std;
                0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
            }
            Sampling::Shifted { shift } => x / (shift - (shift - 1.0) * x),
            Sampling::Uniform => x,
        }
    }

    /// The probability of each of `n` timesteps: the mass on `[t / n, (t + 1) / n)`.
    pub fn weights(&self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|t| self.cdf((t + 1) as f64 / n as f64) - self.cdf(t as f64 / n as f64))
            .collect()
    }
}

/// The plugin.
#[derive(Clone, Debug, Default)]
pub struct TimestepSampling {
    sampling: Sampling,
}

/// `num_train_timesteps` of a diffusers `scheduler_config.json`.
fn num_train_timesteps(config_json: &str) -> PluginResult<usize> {
    let v: serde_json::Value = serde_json::from_str(config_json)
        .map_err(|e| invalid(format!("scheduler_config.json is not JSON: {e}")))?;
    let n = v
        .get("num_train_timesteps")
        .and_then(|n| n.as_u64())
        .ok_or_else(|| {
            invalid("scheduler_config.json has no integer `num_train_timesteps`".to_string())
        })?;
    if n == 0 || n > 1_000_000 {
        return Err(invalid(format!(
            "scheduler_config.json: num_train_timesteps = {n} is outside 1..=1000000"
        )));
    }
    Ok(n as usize)
}

impl Plugin for TimestepSampling {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::Scheduler],
            description: "training timestep distribution (logit_normal, shifted, uniform) over the model's own noise schedule".to_string(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.sampling = Sampling::from_params(params_json)?;
        Ok(())
    }

    fn scheduler_tables(&mut self, config_json: &str) -> PluginResult<SchedulerTables> {
        let n = num_train_timesteps(config_json)?;
        Ok(SchedulerTables {
            alphas_cumprod: Vec::new(),
            timestep_weights: Some(self.sampling.weights(n)),
            loss_weights: Vec::new(),
        })
    }
}

cogvx_plugin_api::export_plugin!(TimestepSampling);

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_of(w: &[f64]) -> f64 {
        w.iter().enumerate().map(|(t, p)| t as f64 * p).sum()
    }

    #[test]
    fn weights_are_the_bin_masses_of_each_distribution() {
        let n = 1000;
        for s in [
            Sampling::default(),
            Sampling::LogitNormal {
                mean: 1.0,
                std: 0.5,
            },
            Sampling::Shifted { shift: 3.0 },
            Sampling::Uniform,
        ] {
            let w = s.weights(n);
            assert_eq!(w.len(), n);
            assert!(w.iter().all(|p| *p >= 0.0), "{s:?}");
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{s:?}");
        }
        // Symmetric around N/2; the median of logit-normal(1, .5) is sigmoid(1).
        let w = Sampling::default().weights(n);
        assert!((mean_of(&w) - 499.5).abs() < 1e-6);
        let s = Sampling::LogitNormal {
            mean: 1.0,
            std: 0.5,
        };
        let sigmoid = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((s.cdf(sigmoid) - 0.5).abs() < 1e-12);
        // A density check away from the tails: mass of a bin ~ pdf(x) / N.
        let t = 700;
        let x = (t as f64 + 0.5) / n as f64;
        let z = ((x / (1.0 - x)).ln() - 1.0) / 0.5;
        let pdf =
            (-0.5 * z * z).exp() / (0.5 * (2.0 * std::f64::consts::PI).sqrt() * x * (1.0 - x));
        let mass = s.weights(n)[t];
        let mid = s.cdf((t as f64 + 1.0) / n as f64) - s.cdf(t as f64 / n as f64);
        assert_eq!(mass, mid);
        assert!(
            (mass * n as f64 - pdf).abs() < 0.01 * pdf,
            "{mass} vs {pdf}"
        );
        // Shift 3 puts 3/4 of the mass above t = N/2 (F(1/2) = 0.5 / (3 - 1) = 1/4).
        let w = Sampling::Shifted { shift: 3.0 }.weights(n);
        assert!((w[..500].iter().sum::<f64>() - 0.25).abs() < 1e-12);
        // Shift 1 is uniform.
        let w = Sampling::Shifted { shift: 1.0 }.weights(n);
        assert!(w.iter().all(|p| (p - 1e-3).abs() < 1e-15));
    }

    #[test]
    fn configuration_errors_name_the_key() {
        assert_eq!(Sampling::from_params("{}").unwrap(), Sampling::default());
        assert_eq!(
            Sampling::from_params(r#"{"distribution":"shifted"}"#).unwrap(),
            Sampling::Shifted { shift: 3.0 }
        );
        for (params, want) in [
            (
                r#"{"distribution":"shifted","mean":1}"#,
                "`mean` does not apply",
            ),
            (r#"{"std":0}"#, "std = 0"),
            (r#"{"distribution":"shifted","shift":-1}"#, "shift = -1"),
            (
                r#"{"distribution":"uniform","shift":2}"#,
                "`shift` does not apply",
            ),
            (
                r#"{"distribution":"lognormal"}"#,
                "unknown variant `lognormal`",
            ),
            (r#"{"sigma":1}"#, "unknown field `sigma`"),
        ] {
            let e = Sampling::from_params(params).unwrap_err().to_string();
            assert!(e.contains(want), "{params}: {e}");
        }
    }

    #[test]
    fn tables_leave_the_noise_schedule_to_the_model() {
        let mut p = TimestepSampling::default();
        p.configure(r#"{"distribution":"shifted","shift":2}"#)
            .unwrap();
        let t = p
            .scheduler_tables(r#"{"num_train_timesteps": 10, "beta_start": 0.00085}"#)
            .unwrap();
        assert!(t.alphas_cumprod.is_empty() && t.loss_weights.is_empty());
        assert_eq!(t.timestep_weights.unwrap().len(), 10);
        for bad in ["{}", "not json", r#"{"num_train_timesteps": 0}"#] {
            assert!(p.scheduler_tables(bad).is_err(), "{bad}");
        }
    }
}
