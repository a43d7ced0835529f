//! Training-side helpers of the CogVideoX schedulers (`add_noise`, `get_velocity`) and the
//! trainer's loss weights, over burn tensors whose first dimension is the batch.
//!
//! As in diffusers, `alphas_cumprod` is cast to the sample's dtype (float32) before the square
//! roots are taken.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::SchedulerError;

/// `(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))` per timestep, computed in float32 as diffusers does.
fn sqrt_alphas(
    alphas_cumprod: &[f64],
    timesteps: &[usize],
) -> Result<(Vec<f32>, Vec<f32>), SchedulerError> {
    let mut a = Vec::with_capacity(timesteps.len());
    let mut b = Vec::with_capacity(timesteps.len());
    for &t in timesteps {
        let ac = *alphas_cumprod.get(t).ok_or_else(|| {
            SchedulerError::Invalid(format!(
                "timestep {t} is outside 0..{}",
                alphas_cumprod.len()
            ))
        })? as f32;
        a.push(ac.sqrt());
        b.push((1.0f32 - ac).sqrt());
    }
    Ok((a, b))
}

/// A `[N, 1, 1, ...]` tensor of per-sample factors, broadcastable over a `[N, ...]` tensor.
fn per_sample<B: Backend, const D: usize>(values: Vec<f32>, device: &B::Device) -> Tensor<B, D> {
    let mut shape = [1usize; D];
    shape[0] = values.len();
    Tensor::<B, D>::from_data(TensorData::new(values, shape), device)
}

fn check<B: Backend, const D: usize>(
    what: &str,
    a: &Tensor<B, D>,
    b: &Tensor<B, D>,
    timesteps: &[usize],
) -> Result<(), SchedulerError> {
    if a.dims() != b.dims() {
        return Err(SchedulerError::Shape(format!(
            "{what}: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )));
    }
    let n = a.dims()[0];
    if timesteps.len() != n && timesteps.len() != 1 {
        return Err(SchedulerError::Shape(format!(
            "{what}: {} timesteps for a batch of {n} (give one per sample, or one for all)",
            timesteps.len()
        )));
    }
    Ok(())
}

/// The forward process: `sqrt(ᾱ_t) * original_samples + sqrt(1 - ᾱ_t) * noise`, with one
/// timestep per batch element (or one for the whole batch).
pub fn add_noise<B: Backend, const D: usize>(
    alphas_cumprod: &[f64],
    original_samples: Tensor<B, D>,
    noise: Tensor<B, D>,
    timesteps: &[usize],
) -> Result<Tensor<B, D>, SchedulerError> {
    check("add_noise", &original_samples, &noise, timesteps)?;
    let (a, b) = sqrt_alphas(alphas_cumprod, timesteps)?;
    let device = original_samples.device();
    let a = per_sample::<B, D>(a, &device);
    let b = per_sample::<B, D>(b, &device);
    Ok(original_samples.mul(a).add(noise.mul(b)))
}

/// diffusers' `get_velocity(sample, noise, timesteps)`: `sqrt(ᾱ_t) * noise - sqrt(1 - ᾱ_t) * sample`.
///
/// The CogVideoX trainer calls it as `get_velocity(model_pred, noisy_latents, t)`, which turns a
/// v-prediction into the predicted x0.
pub fn get_velocity<B: Backend, const D: usize>(
    alphas_cumprod: &[f64],
    sample: Tensor<B, D>,
    noise: Tensor<B, D>,
    timesteps: &[usize],
) -> Result<Tensor<B, D>, SchedulerError> {
    check("get_velocity", &sample, &noise, timesteps)?;
    let (a, b) = sqrt_alphas(alphas_cumprod, timesteps)?;
    let device = sample.device();
    let a = per_sample::<B, D>(a, &device);
    let b = per_sample::<B, D>(b, &device);
    Ok(noise.mul(a).sub(sample.mul(b)))
}

/// The CogVideoX trainer's loss weight per timestep, `1 / (1 - ᾱ_t)`.
pub fn loss_weights(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod.iter().map(|a| 1.0 / (1.0 - a)).collect()
}
