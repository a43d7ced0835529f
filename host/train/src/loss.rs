//! The loss of the official CogVideoX finetune (`compute_loss` of
//! `finetune/models/cogvideox_t2v/lora_trainer.py` and `cogvideox_i2v/lora_trainer.py`):
//! v-prediction turned into a predicted x0 by `get_velocity`, weighted by `1 / (1 - ᾱ_t)`,
//! mean per sample, then mean over the batch.

use crate::error::{invalid, TrainError};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_model_core::{ModelAutodiffBackend, ModelBackend};
use cogvx_scheduler::{add_noise, get_velocity, NoiseSchedule};
use cogvx_transformer::{BlockTape, CogVideoXTransformer3DModel, RotaryEmb, TransformerConfig};

/// The value CogVideoX1.5-I2V's trainer and pipeline pass as `ofs`.
pub const OFS_VALUE: f32 = 2.0;

/// One batch of cached training inputs.
#[derive(Clone, Debug)]
pub struct TrainBatch<B: Backend> {
    /// VAE latents `[B, C, F, H, W]`, already multiplied by the scaling factor (as cached).
    pub latents: Tensor<B, 5>,
    /// T5 prompt embeddings `[B, S, D]`.
    pub prompt_embeds: Tensor<B, 3>,
    /// I2V only: image latents `[B, C, 1, H, W]` (noise-augmented, encoded, scaled).
    pub image_latents: Option<Tensor<B, 5>>,
}

/// The noise draw of one step: a timestep per sample and the noise for [`model_latents`]' shape.
#[derive(Clone, Debug)]
pub struct NoiseDraw<B: Backend> {
    /// Training timesteps in `0..num_train_timesteps`, one per sample.
    pub timesteps: Vec<usize>,
    /// `[B, F', C, H, W]` (the shape of [`model_latents`]).
    pub noise: Tensor<B, 5>,
}

/// The latents as the model sees them: CogVideoX 1.5 (`patch_size_t`) prepends the first frame
/// `F % patch_size_t` times, then `[B, C, F, H, W]` is permuted to `[B, F, C, H, W]`.
pub fn model_latents<B: Backend>(
    config: &TransformerConfig,
    latents: Tensor<B, 5>,
) -> Tensor<B, 5> {
    let latents = match config.patch_size_t {
        Some(pt) => {
            let ncopy = latents.dims()[2] % pt;
            if ncopy == 0 {
                latents
            } else {
                let first = latents.clone().narrow(2, 0, 1);
                let mut parts = vec![first; ncopy];
                parts.push(latents);
                Tensor::cat(parts, 2)
            }
        }
        None => latents,
    };
    latents.permute([0, 2, 1, 3, 4])
}

/// The `[B, F', C, H, W]` shape of the noise for latents of `[B, C, F, H, W]` (see [`model_latents`]).
pub fn noise_shape(config: &TransformerConfig, latents: [usize; 5]) -> [usize; 5] {
    let [b, c, f, h, w] = latents;
    let f = match config.patch_size_t {
        Some(pt) => f + f % pt,
        None => f,
    };
    [b, f, c, h, w]
}

fn per_sample<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 5> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n, 1, 1, 1, 1]), device)
}

/// The finetune's loss for one batch: noising with `noise`/`timesteps`, the transformer's
/// v-prediction (I2V: image latents zero-padded to `F` frames and concatenated on channels;
/// RoPE from the latent size; `ofs = 2.0` for 1.5-I2V), `x0 = get_velocity(pred, noisy, t)`,
/// `mean_b(mean((x0 - latents)^2 / (1 - ᾱ_t)))`. Returns a `[1]` tensor.
pub fn compute_loss<B: ModelBackend>(
    model: &CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
) -> Result<Tensor<B, 1>, TrainError> {
    let x = loss_inputs(model, schedule, batch, draw)?;
    let pred = model.forward(
        x.model_in.clone(),
        batch.prompt_embeds.clone(),
        x.timestep.clone(),
        x.ofs.clone(),
        x.rotary.as_ref(),
    )?;
    x.loss(&schedule.alphas_cumprod, pred, &draw.timesteps)
}

/// [`compute_loss`] through [`CogVideoXTransformer3DModel::forward_taped`], for training: the
/// tape runs the backward (recomputing the blocks under gradient checkpointing).
pub fn compute_loss_taped<B: ModelAutodiffBackend>(
    model: &CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
) -> Result<(Tensor<B, 1>, BlockTape<B>), TrainError> {
    let x = loss_inputs(model, schedule, batch, draw)?;
    let (pred, tape) = model.forward_taped(
        x.model_in.clone(),
        batch.prompt_embeds.clone(),
        x.timestep.clone(),
        x.ofs.clone(),
        x.rotary.as_ref(),
    )?;
    Ok((
        x.loss(&schedule.alphas_cumprod, pred, &draw.timesteps)?,
        tape,
    ))
}

/// What the transformer is called with, and the targets of the loss.
struct LossInputs<B: Backend> {
    latent: Tensor<B, 5>,
    noisy: Tensor<B, 5>,
    model_in: Tensor<B, 5>,
    rotary: Option<RotaryEmb<B>>,
    ofs: Option<Tensor<B, 1>>,
    timestep: Tensor<B, 1>,
}

/// Checks the batch and the draw against the model, noises the latents and builds the inputs.
fn loss_inputs<B: Backend>(
    model: &CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
) -> Result<LossInputs<B>, TrainError> {
    let config = &model.config;
    let device = batch.latents.device();
    let [b, c, _, h, w] = batch.latents.dims();
    let latent = model_latents(config, batch.latents.clone());
    let [_, f, _, _, _] = latent.dims();
    if draw.noise.dims() != latent.dims() {
        return invalid(format!(
            "noise has shape {:?}, the latents as the model sees them {:?} ([B, F, C, H, W])",
            draw.noise.dims(),
            latent.dims()
        ));
    }
    if draw.timesteps.len() != b {
        return invalid(format!(
            "{} timesteps for a batch of {b}",
            draw.timesteps.len()
        ));
    }
    let ac = &schedule.alphas_cumprod;
    if let Some(t) = draw.timesteps.iter().find(|t| **t >= ac.len()) {
        return invalid(format!("timestep {t} is outside 0..{}", ac.len()));
    }
    if batch.prompt_embeds.dims()[0] != b {
        return invalid(format!(
            "prompt embeddings for {} samples, latents for {b}",
            batch.prompt_embeds.dims()[0]
        ));
    }
    let noisy = add_noise(ac, latent.clone(), draw.noise.clone(), &draw.timesteps)?;
    let model_in = match (&batch.image_latents, config.in_channels) {
        (Some(images), in_ch) if in_ch == 2 * c => {
            if images.dims() != [b, c, 1, h, w] {
                return invalid(format!("image latents have shape {:?}, expected [{b}, {c}, 1, {h}, {w}]", images.dims()));
            }
            let img = images.clone().permute([0, 2, 1, 3, 4]); // [B, 1, C, H, W]
            let img = if f > 1 { Tensor::cat(vec![img, Tensor::zeros([b, f - 1, c, h, w], &device)], 1) } else { img };
            Tensor::cat(vec![noisy.clone(), img], 2)
        }
        (None, in_ch) if in_ch == c => noisy.clone(),
        (Some(_), in_ch) => {
            return invalid(format!(
                "image latents given, but the transformer takes {in_ch} channels for {c}-channel latents: it is not an image-to-video model"
            ))
        }
        (None, in_ch) => {
            return invalid(format!(
                "the transformer takes {in_ch} channels for {c}-channel latents: an image-to-video model needs image latents"
            ))
        }
    };
    let rotary = model.image_rotary_emb(f, h, w, &device)?;
    let ofs = config
        .ofs_embed_dim
        .map(|_| Tensor::<B, 1>::from_data(TensorData::new(vec![OFS_VALUE], [1]), &device));
    let t: Vec<f32> = draw.timesteps.iter().map(|t| *t as f32).collect();
    let timestep = Tensor::<B, 1>::from_data(TensorData::new(t, [b]), &device);
    Ok(LossInputs {
        latent,
        noisy,
        model_in,
        rotary,
        ofs,
        timestep,
    })
}

impl<B: Backend> LossInputs<B> {
    /// `mean_b(mean((get_velocity(pred, noisy, t) - latents)^2 / (1 - ᾱ_t)))`.
    fn loss(
        self,
        ac: &[f64],
        pred: Tensor<B, 5>,
        timesteps: &[usize],
    ) -> Result<Tensor<B, 1>, TrainError> {
        let b = timesteps.len();
        let device = pred.device();
        let latent_pred = get_velocity(ac, pred, self.noisy, timesteps)?;
        let weights: Vec<f32> = timesteps
            .iter()
            .map(|t| (1.0 / (1.0 - ac[*t])) as f32)
            .collect();
        let err = (latent_pred - self.latent).powi_scalar(2) * per_sample::<B>(weights, &device);
        let per_sample_loss = err.reshape([b as i32, -1]).mean_dim(1); // [B, 1]
        Ok(per_sample_loss.mean())
    }
}
