//! Applies an [`InferencePlan`] (from a built-in scheduler or a scheduler plugin) to burn tensors.

use std::collections::VecDeque;

use burn::tensor::{backend::Backend, Tensor};
use cogvx_plugin_api::{InferencePlan, StepCoefficients};

use crate::SchedulerError;

/// What one step produced.
#[derive(Clone, Debug)]
pub struct StepOutput<B: Backend, const D: usize> {
    /// `x_{t-1}`, the next model input.
    pub prev_sample: Tensor<B, D>,
    /// The predicted clean sample `x0` of this step.
    pub pred_original_sample: Tensor<B, D>,
}

/// `acc + c * x`, skipping the term when `c == 0` (as a zero coefficient contributes nothing).
fn axpy<B: Backend, const D: usize>(
    acc: Option<Tensor<B, D>>,
    c: f64,
    x: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    if c == 0.0 {
        return acc;
    }
    let term = x.clone().mul_scalar(c);
    Some(match acc {
        Some(a) => a.add(term),
        None => term,
    })
}

/// Applies one step's coefficients.
///
/// `history[k]` is the x0 of the step `k + 1` steps earlier. `noise` must be given when
/// `coefs.noise_coef != 0` (see [`step_needs_noise`]); it is ignored otherwise.
pub fn apply_step<B: Backend, const D: usize>(
    coefs: &StepCoefficients,
    sample: Tensor<B, D>,
    model_output: Tensor<B, D>,
    history: &[Tensor<B, D>],
    noise: Option<Tensor<B, D>>,
) -> Result<StepOutput<B, D>, SchedulerError> {
    if sample.dims() != model_output.dims() {
        return Err(SchedulerError::Shape(format!(
            "step at timestep {}: model_output has shape {:?} but the sample has {:?}",
            coefs.timestep,
            model_output.dims(),
            sample.dims()
        )));
    }
    let x0 = axpy(
        axpy(None, coefs.x0_sample, &sample),
        coefs.x0_model_output,
        &model_output,
    )
    .unwrap_or_else(|| sample.zeros_like());
    let mut prev = axpy(None, coefs.sample_coef, &sample);
    prev = axpy(prev, coefs.model_output_coef, &model_output);
    prev = axpy(prev, coefs.x0_coef, &x0);
    for (k, &c) in coefs.x0_history.iter().enumerate() {
        if c == 0.0 {
            continue;
        }
        let old = history.get(k).ok_or_else(|| {
            SchedulerError::Invalid(format!(
                "step at timestep {} uses the x0 of {} step(s) earlier, but only {} earlier step(s) ran",
                coefs.timestep,
                k + 1,
                history.len()
            ))
        })?;
        if old.dims() != sample.dims() {
            return Err(SchedulerError::Shape(format!(
                "step at timestep {}: x0 history has shape {:?} but the sample has {:?}",
                coefs.timestep,
                old.dims(),
                sample.dims()
            )));
        }
        prev = axpy(prev, c, old);
    }
    if coefs.noise_coef != 0.0 {
        let noise = noise.ok_or_else(|| {
            SchedulerError::Invalid(format!(
                "step at timestep {} adds noise (coefficient {}) but no noise tensor was given",
                coefs.timestep, coefs.noise_coef
            ))
        })?;
        if noise.dims() != sample.dims() {
            return Err(SchedulerError::Shape(format!(
                "step at timestep {}: noise has shape {:?} but the sample has {:?}",
                coefs.timestep,
                noise.dims(),
                sample.dims()
            )));
        }
        prev = axpy(prev, coefs.noise_coef, &noise);
    }
    let prev_sample = prev.unwrap_or_else(|| sample.zeros_like());
    Ok(StepOutput {
        prev_sample,
        pred_original_sample: x0,
    })
}

/// Whether a step adds noise (and so needs a noise tensor).
pub fn step_needs_noise(coefs: &StepCoefficients) -> bool {
    coefs.noise_coef != 0.0
}

/// Walks an [`InferencePlan`] step by step, keeping the x0 history multistep solvers need.
///
/// ```text
/// let mut ex = PlanExecutor::new(plan)?;
/// while let Some(t) = ex.current_timestep() {
///     let model_output = model(&latents, t);
///     let noise = ex.needs_noise().then(|| draw_noise());
///     latents = ex.step(latents, model_output, noise)?.prev_sample;
/// }
/// ```
#[derive(Clone, Debug)]
pub struct PlanExecutor<B: Backend, const D: usize> {
    plan: InferencePlan,
    index: usize,
    /// Most recent first.
    history: VecDeque<Tensor<B, D>>,
    keep: usize,
}

impl<B: Backend, const D: usize> PlanExecutor<B, D> {
    /// Starts at the plan's first step. An empty plan is an error.
    pub fn new(plan: InferencePlan) -> Result<Self, SchedulerError> {
        if plan.steps.is_empty() {
            return Err(SchedulerError::Invalid(
                "the inference plan has no steps".into(),
            ));
        }
        let keep = plan
            .steps
            .iter()
            .map(|s| s.x0_history.len())
            .max()
            .unwrap_or(0);
        Ok(PlanExecutor {
            plan,
            index: 0,
            history: VecDeque::new(),
            keep,
        })
    }

    /// The plan being executed.
    pub fn plan(&self) -> &InferencePlan {
        &self.plan
    }

    /// All model timesteps, in order.
    pub fn timesteps(&self) -> Vec<u32> {
        self.plan.steps.iter().map(|s| s.timestep).collect()
    }

    /// Index of the next step.
    pub fn step_index(&self) -> usize {
        self.index
    }

    /// The timestep of the next step, `None` once every step ran.
    pub fn current_timestep(&self) -> Option<u32> {
        self.plan.steps.get(self.index).map(|s| s.timestep)
    }

    /// Whether the next step needs a noise tensor.
    pub fn needs_noise(&self) -> bool {
        self.plan
            .steps
            .get(self.index)
            .is_some_and(step_needs_noise)
    }

    /// Runs the next step and records its x0.
    pub fn step(
        &mut self,
        sample: Tensor<B, D>,
        model_output: Tensor<B, D>,
        noise: Option<Tensor<B, D>>,
    ) -> Result<StepOutput<B, D>, SchedulerError> {
        let coefs = self.plan.steps.get(self.index).ok_or_else(|| {
            SchedulerError::Invalid(format!(
                "all {} steps of the plan already ran",
                self.plan.steps.len()
            ))
        })?;
        let history: Vec<Tensor<B, D>> = self.history.iter().cloned().collect();
        let out = apply_step(coefs, sample, model_output, &history, noise)?;
        if self.keep > 0 {
            self.history.push_front(out.pred_original_sample.clone());
            self.history.truncate(self.keep);
        }
        self.index += 1;
        Ok(out)
    }
}
