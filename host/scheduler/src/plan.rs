//! The inference steps of `CogVideoXDDIMScheduler.step` and `CogVideoXDPMScheduler.step`
//! (diffusers `schedulers/scheduling_{ddim,dpm}_cogvideox.py`) written as the linear
//! coefficients of the plugin API ([`StepCoefficients`]):
//!
//! ```text
//! x0   = x0_sample * sample + x0_model_output * model_output
//! prev = sample_coef * sample + model_output_coef * model_output + x0_coef * x0
//!        + Σ_k x0_history[k] * x0_(k+1 steps earlier) + noise_coef * noise
//! ```
//!
//! Coefficients are computed in `f64` from the (f64 or f32-valued) tables; diffusers computes
//! them with 0-dim tensors of the table dtype and applies them in float32, as the executor does.

use cogvx_plugin_api::{InferencePlan, StepCoefficients};

use crate::config::PredictionType;
use crate::schedule::NoiseSchedule;
use crate::SchedulerError;

/// `pred_original_sample` as `(x0_sample, x0_model_output)` for `alpha_prod_t`.
fn x0_coefficients(prediction: PredictionType, alpha_prod_t: f64) -> (f64, f64) {
    let beta_prod_t = 1.0 - alpha_prod_t;
    match prediction {
        // (sample - sqrt(beta) * eps) / sqrt(alpha)
        PredictionType::Epsilon => (
            1.0 / alpha_prod_t.powf(0.5),
            -(beta_prod_t.powf(0.5)) / alpha_prod_t.powf(0.5),
        ),
        PredictionType::Sample => (0.0, 1.0),
        // sqrt(alpha) * sample - sqrt(beta) * v
        PredictionType::VPrediction => (alpha_prod_t.powf(0.5), -(beta_prod_t.powf(0.5))),
    }
}

fn check_finite(plan: &InferencePlan, schedule: &NoiseSchedule) -> Result<(), SchedulerError> {
    for (i, s) in plan.steps.iter().enumerate() {
        let all = [
            s.x0_sample,
            s.x0_model_output,
            s.sample_coef,
            s.model_output_coef,
            s.x0_coef,
            s.noise_coef,
        ];
        if all
            .iter()
            .chain(s.x0_history.iter())
            .any(|c| !c.is_finite())
        {
            let hint = if schedule.config.prediction_type == PredictionType::Epsilon
                && schedule.config.rescale_betas_zero_snr
            {
                ": epsilon prediction cannot recover x0 where alphas_cumprod is 0 (zero terminal SNR); \
                 use prediction_type \"v_prediction\" or rescale_betas_zero_snr = false"
            } else {
                ""
            };
            return Err(SchedulerError::Invalid(format!(
                "step {i} (timestep {}) has a non-finite coefficient{hint}",
                s.timestep
            )));
        }
    }
    Ok(())
}

/// `CogVideoXDDIMScheduler` (eta = 0, the only mode it implements):
///
/// ```text
/// a_t  = sqrt((1 - ᾱ_prev) / (1 - ᾱ_t))
/// b_t  = sqrt(ᾱ_prev) - sqrt(ᾱ_t) * a_t
/// prev = a_t * sample + b_t * x0
/// ```
///
/// with `prev_t = t - num_train_timesteps // num_inference_steps` and `ᾱ_prev = final_alpha_cumprod`
/// below zero.
pub fn ddim_plan(
    schedule: &NoiseSchedule,
    num_inference_steps: usize,
) -> Result<InferencePlan, SchedulerError> {
    let timesteps = schedule.timesteps(num_inference_steps)?;
    let steps = timesteps
        .iter()
        .map(|&t| {
            let prev_t = schedule.prev_timestep(t, num_inference_steps);
            let alpha_prod_t = schedule.alpha_prod(t as i64);
            let alpha_prod_t_prev = schedule.alpha_prod(prev_t);
            let (x0_sample, x0_model_output) =
                x0_coefficients(schedule.config.prediction_type, alpha_prod_t);
            let a_t = ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t)).powf(0.5);
            let b_t = alpha_prod_t_prev.powf(0.5) - alpha_prod_t.powf(0.5) * a_t;
            StepCoefficients {
                timestep: t,
                x0_sample,
                x0_model_output,
                sample_coef: a_t,
                model_output_coef: 0.0,
                x0_coef: b_t,
                x0_history: Vec::new(),
                noise_coef: 0.0,
            }
        })
        .collect();
    let plan = InferencePlan { steps };
    check_finite(&plan, schedule)?;
    Ok(plan)
}

/// `CogVideoXDPMScheduler` (SDE DPM-Solver++ 2M, as the pipeline drives it: the previous step's
/// x0 is passed back as `old_pred_original_sample` and the previous timestep as `timestep_back`):
///
/// ```text
/// λ(ᾱ)  = log sqrt(ᾱ / (1 - ᾱ))
/// h     = λ(ᾱ_prev) - λ(ᾱ_t)
/// mult1 = sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) * exp(-h)
/// mult2 = expm1(-2h) * sqrt(ᾱ_prev)
/// σ     = sqrt(1 - ᾱ_prev) * sqrt(1 - exp(-2h))
/// first step, or prev_t < 0:   prev = mult1 * sample - mult2 * x0 + σ * noise
/// otherwise, with r = (λ(ᾱ_t) - λ(ᾱ_back)) / h, ᾱ_back = ᾱ at the previous step's timestep:
///     D    = (1 + 1/(2r)) * x0 - 1/(2r) * x0_old
///     prev = mult1 * sample - mult2 * D + σ * noise
/// ```
///
/// so `x0_coef = -mult2 (1 + 1/(2r))` and `x0_history = [mult2 / (2r)]`. Only the noise of the
/// final combination reaches the output (diffusers draws a first-order noise too and drops it),
/// hence one `noise_coef` per step.
pub fn dpm_plan(
    schedule: &NoiseSchedule,
    num_inference_steps: usize,
) -> Result<InferencePlan, SchedulerError> {
    let timesteps = schedule.timesteps(num_inference_steps)?;
    let lambda = |a: f64| (a / (1.0 - a)).powf(0.5).ln();
    let mut steps = Vec::with_capacity(timesteps.len());
    for (i, &t) in timesteps.iter().enumerate() {
        let prev_t = schedule.prev_timestep(t, num_inference_steps);
        let alpha_prod_t = schedule.alpha_prod(t as i64);
        let alpha_prod_t_prev = schedule.alpha_prod(prev_t);
        let (x0_sample, x0_model_output) =
            x0_coefficients(schedule.config.prediction_type, alpha_prod_t);
        let lamb = lambda(alpha_prod_t);
        let lamb_next = lambda(alpha_prod_t_prev);
        let h = lamb_next - lamb;
        let mult1 = ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t)).powf(0.5) * (-h).exp();
        let mult2 = (-2.0 * h).exp_m1() * alpha_prod_t_prev.powf(0.5);
        let mult_noise = (1.0 - alpha_prod_t_prev).powf(0.5) * (1.0 - (-2.0 * h).exp()).powf(0.5);
        let (x0_coef, x0_history) = if i == 0 || prev_t < 0 {
            (-mult2, Vec::new())
        } else {
            let alpha_prod_t_back = schedule.alpha_prod(timesteps[i - 1] as i64);
            let h_last = lamb - lambda(alpha_prod_t_back);
            let r = h_last / h;
            let mult3 = 1.0 + 1.0 / (2.0 * r);
            let mult4 = 1.0 / (2.0 * r);
            (-mult2 * mult3, vec![mult2 * mult4])
        };
        steps.push(StepCoefficients {
            timestep: t,
            x0_sample,
            x0_model_output,
            sample_coef: mult1,
            model_output_coef: 0.0,
            x0_coef,
            x0_history,
            noise_coef: mult_noise,
        });
    }
    let plan = InferencePlan { steps };
    check_finite(&plan, schedule)?;
    Ok(plan)
}
