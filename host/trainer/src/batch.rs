//! What one step trains on: micro-batches read from the cache, with their random draws
//! (timesteps from the model's schedule or a scheduler plugin's distribution, latent noise,
//! for I2V the official trainer's noisy image latents, and caption dropout) taken from each
//! sample's stream.

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use cogvx_cache::{Cache, HostTensor};
use cogvx_plugin_api::Plugin;
use cogvx_scheduler::NoiseSchedule;
use cogvx_train::{NoiseDraw, TrainBatch};
use cogvx_vae::{AutoencoderKLCogVideoX, Tiling, VaeConfig, VaeOptions};

use crate::{input, TrainRng, TrainerError};

/// The training-side noise schedule and timestep distribution.
pub(crate) struct TrainSchedule {
    pub(crate) schedule: NoiseSchedule,
    /// Cumulative timestep weights (`None`: uniform).
    cumulative: Option<Vec<f64>>,
}

impl TrainSchedule {
    pub(crate) fn draw_timestep(&self, rng: &mut TrainRng) -> usize {
        match &self.cumulative {
            None => rng.below(self.schedule.alphas_cumprod.len()),
            Some(c) => rng.weighted(c),
        }
    }
}

pub(crate) fn train_schedule<'p>(
    model_dir: &Path,
    plugin: Option<&mut (dyn Plugin + 'p)>,
) -> Result<TrainSchedule, TrainerError> {
    let mut schedule = cogvx_train::load_schedule(model_dir)?;
    let Some(plugin) = plugin else {
        return Ok(TrainSchedule {
            schedule,
            cumulative: None,
        });
    };
    let name = plugin.info().name;
    let perr = |m: String| TrainerError::Plugin {
        plugin: name.clone(),
        message: m,
    };
    let path = model_dir.join("scheduler").join("scheduler_config.json");
    let json = std::fs::read_to_string(&path).map_err(|e| TrainerError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let tables = plugin
        .scheduler_tables(&json)
        .map_err(|e| perr(e.to_string()))?;
    // Empty tables: the plugin only shapes the timestep distribution (the model's own schedule
    // and loss weights stay).
    let own_schedule = tables.alphas_cumprod.is_empty() && tables.loss_weights.is_empty();
    let n = if own_schedule {
        schedule.alphas_cumprod.len()
    } else {
        tables.alphas_cumprod.len()
    };
    if !own_schedule {
        check_tables(&tables, n).map_err(perr)?;
    }
    let cumulative = match &tables.timestep_weights {
        None => None,
        Some(w) => {
            if w.len() != n
                || w.iter().any(|x| !x.is_finite() || *x < 0.0)
                || w.iter().sum::<f64>() <= 0.0
            {
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
    if !own_schedule {
        schedule.alphas_cumprod = tables.alphas_cumprod;
    }
    Ok(TrainSchedule {
        schedule,
        cumulative,
    })
}

/// A plugin's own `alphas_cumprod` (`n` values in (0, 1)) and the loss weights the CogVideoX
/// loss uses with them, `1 / (1 - alphas_cumprod)`.
fn check_tables(tables: &cogvx_plugin_api::SchedulerTables, n: usize) -> Result<(), String> {
    if n == 0
        || tables
            .alphas_cumprod
            .iter()
            .any(|a| !(a.is_finite() && *a > 0.0 && *a < 1.0))
    {
        return Err(format!(
            "scheduler_tables: alphas_cumprod must be {n} > 0 values in (0, 1) (or empty, with empty loss_weights, to keep the model's schedule)"
        ));
    }
    // compute_loss weights the loss by 1 / (1 - alphas_cumprod), as the official trainer.
    if tables.loss_weights.len() != n {
        return Err(format!(
            "scheduler_tables: {} loss weights for {n} timesteps",
            tables.loss_weights.len()
        ));
    }
    for (t, (w, a)) in tables
        .loss_weights
        .iter()
        .zip(&tables.alphas_cumprod)
        .enumerate()
    {
        let want = 1.0 / (1.0 - a);
        if (w - want).abs() > 1e-6 * want.abs().max(1.0) {
            return Err(format!(
                "scheduler_tables: loss weight {w} at timestep {t}; the CogVideoX loss uses 1 / (1 - alphas_cumprod) = {want}"
            ));
        }
    }
    Ok(())
}

/// The VAE for the I2V image latents, with the options the official trainer encodes with
/// (`enable_slicing`, `enable_tiling`).
pub(crate) struct ImageEncoder<B: Backend> {
    vae: AutoencoderKLCogVideoX<B>,
    options: VaeOptions,
}

impl<B: Backend> ImageEncoder<B> {
    pub(crate) fn load(model_dir: &Path, device: &B::Device) -> Result<Self, TrainerError> {
        let (vae, config): (AutoencoderKLCogVideoX<B>, VaeConfig) =
            AutoencoderKLCogVideoX::from_dir(&model_dir.join("vae"), device)?;
        Ok(ImageEncoder {
            vae,
            options: VaeOptions {
                tiling: Some(Tiling::for_config(&config)),
                slicing: true,
            },
        })
    }
}

fn stack<B: Backend, const D1: usize>(
    items: Vec<&HostTensor>,
    device: &B::Device,
) -> Tensor<B, D1> {
    let n = items.len();
    let mut shape = vec![n];
    shape.extend_from_slice(&items[0].shape);
    let mut data = Vec::with_capacity(n * items[0].data.len());
    for t in &items {
        data.extend_from_slice(&t.data);
    }
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// What a run's micro-batches are made from.
pub(crate) struct BatchSource<'a, B: AutodiffBackend> {
    pub(crate) cache: &'a Cache,
    pub(crate) model_config: &'a cogvx_transformer::TransformerConfig,
    pub(crate) schedule: &'a TrainSchedule,
    /// The VAE of the I2V image latents (`None` for T2V).
    pub(crate) images: Option<&'a ImageEncoder<B::InnerBackend>>,
    /// `[train] caption_dropout` when it is above 0.
    pub(crate) caption_dropout: Option<&'a CaptionDropout>,
}

/// Caption dropout for classifier-free guidance: each sample's prompt embedding is replaced by
/// the empty prompt's with probability `p`.
pub(crate) struct CaptionDropout {
    pub(crate) p: f64,
    /// The T5 embedding of `""`, `[L, D]` like the cached captions'.
    pub(crate) empty: HostTensor,
}

/// A micro-batch and its draws.
pub(crate) struct MicroBatch<B: AutodiffBackend> {
    pub(crate) batch: TrainBatch<B>,
    pub(crate) draw: NoiseDraw<B>,
    /// How many samples trained on the empty prompt (caption dropout).
    pub(crate) dropped_captions: usize,
}

/// One micro-batch on the device, with each sample's random draws taken from its own stream
/// (`rngs[i]` for `indices[i]`), in the official trainer's order (I2V: image noise level, image
/// noise, posterior sample; then timestep and latent noise), then, with caption dropout only,
/// one uniform draw that decides whether the sample's caption is dropped (last, so that the
/// other draws do not depend on it). Per-sample streams make a batch of 4 draw what 4
/// accumulated batches of 1 draw; the I2V noise level is therefore drawn per sample (the
/// official trainer draws one for its whole batch: the same with batch size 1).
pub(crate) fn make_micro_batch<B: AutodiffBackend>(
    source: &BatchSource<'_, B>,
    indices: &[usize],
    rngs: &mut [TrainRng],
    device: &B::Device,
) -> Result<MicroBatch<B>, TrainerError> {
    if rngs.len() != indices.len() {
        return input(format!(
            "{} random streams for a micro-batch of {} samples",
            rngs.len(),
            indices.len()
        ));
    }
    let entries = indices
        .iter()
        .map(|&i| source.cache.get(i))
        .collect::<Result<Vec<_>, _>>()?;
    let first = &entries[0];
    for e in &entries[1..] {
        if e.latent.shape != first.latent.shape
            || e.prompt_embedding.shape != first.prompt_embedding.shape
        {
            return input(format!(
                "samples {} and {} of the cache have latents {:?} / {:?} and prompts {:?} / {:?}: a batch needs equal shapes; use batch_size = 1",
                first.sample.origin, e.sample.origin, first.latent.shape, e.latent.shape, first.prompt_embedding.shape, e.prompt_embedding.shape
            ));
        }
    }
    let b = entries.len();
    let latents: Tensor<B, 5> = stack::<B, 5>(entries.iter().map(|e| &e.latent).collect(), device);
    let image_latents = match source.images {
        None => None,
        Some(enc) => {
            let inner_device = device.clone();
            let imgs: Vec<&HostTensor> = entries
                .iter()
                .map(|e| {
                    e.image.as_ref().ok_or_else(|| {
                        TrainerError::Input(format!("cache sample {} has no conditioning image; run `cogvx prepare` for I2V", e.sample.origin))
                    })
                })
                .collect::<Result<_, _>>()?;
            let img: Tensor<B::InnerBackend, 4> = stack::<B::InnerBackend, 4>(imgs, &inner_device);
            let dims = img.dims();
            // torch.normal(mean=-3.0, std=0.5, size=(1,)), here per sample.
            let log_sigma: Vec<f32> = rngs
                .iter_mut()
                .map(|r| r.normal(1)[0] * 0.5 - 3.0)
                .collect();
            let log_sigma = Tensor::<B::InnerBackend, 1>::from_data(
                TensorData::new(log_sigma, [b]),
                &inner_device,
            );
            let noise = Tensor::<B::InnerBackend, 4>::from_data(
                TensorData::new(per_sample_normal(rngs, dims.iter().product()), dims),
                &inner_device,
            );
            let latents = noisy_image_latents(
                &enc.vae,
                img,
                log_sigma,
                noise,
                |shape| {
                    let n: usize = shape.iter().product();
                    Tensor::from_data(
                        TensorData::new(per_sample_normal(rngs, n), shape),
                        &inner_device,
                    )
                },
                &enc.options,
            )?;
            Some(Tensor::<B, 5>::from_inner(latents))
        }
    };
    let timesteps: Vec<usize> = rngs
        .iter_mut()
        .map(|r| source.schedule.draw_timestep(r))
        .collect();
    let shape = cogvx_train::noise_shape(source.model_config, latents.dims());
    let noise = Tensor::<B, 5>::from_data(
        TensorData::new(per_sample_normal(rngs, shape.iter().product()), shape),
        device,
    );
    let dropped: Vec<bool> = match source.caption_dropout {
        None => vec![false; b],
        Some(d) => rngs.iter_mut().map(|r| r.uniform() < d.p).collect(),
    };
    let prompts: Vec<&HostTensor> = entries
        .iter()
        .zip(&dropped)
        .map(|(e, &drop)| match source.caption_dropout {
            Some(d) if drop => &d.empty,
            _ => &e.prompt_embedding,
        })
        .collect();
    let prompt_embeds: Tensor<B, 3> = stack::<B, 3>(prompts, device);
    Ok(MicroBatch {
        batch: TrainBatch {
            latents,
            prompt_embeds,
            image_latents,
        },
        draw: NoiseDraw { timesteps, noise },
        dropped_captions: dropped.iter().filter(|d| **d).count(),
    })
}

/// `n` standard-normal values for a batch-major tensor: sample `i`'s slice of `n / rngs.len()`
/// values from `rngs[i]`.
fn per_sample_normal(rngs: &mut [TrainRng], n: usize) -> Vec<f32> {
    let per = n / rngs.len();
    let mut out = Vec::with_capacity(n);
    for r in rngs.iter_mut() {
        out.extend(r.normal(per));
    }
    out
}

/// The I2V train-time image path of the official trainer: `images [B, 3, H, W]` in [-1, 1]
/// plus `sigma[b] * noise`, with `sigma = exp(N(-3, 0.5))` per sample (`log_sigma` is the
/// caller's draw of `N(-3, 0.5)`, `noise` standard normal of the images' shape), VAE-encoded
/// as one-frame videos, posterior-sampled with `sample_noise` and times `scaling_factor`.
/// Returns image latents `[B, C, 1, h, w]`.
pub fn noisy_image_latents<B: Backend>(
    vae: &AutoencoderKLCogVideoX<B>,
    images: Tensor<B, 4>,
    log_sigma: Tensor<B, 1>,
    noise: Tensor<B, 4>,
    sample_noise: impl FnOnce([usize; 5]) -> Tensor<B, 5>,
    options: &VaeOptions,
) -> Result<Tensor<B, 5>, TrainerError> {
    let [b, c, h, w] = images.dims();
    if noise.dims() != [b, c, h, w] || log_sigma.dims() != [b] {
        return Err(TrainerError::Input(format!(
            "noisy_image_latents: images {:?}, noise {:?}, log_sigma {:?}; expected noise of the images' shape and one sigma per image",
            images.dims(),
            noise.dims(),
            log_sigma.dims()
        )));
    }
    let sigma = log_sigma.exp().reshape([b, 1, 1, 1]);
    let noisy = (images + noise * sigma).unsqueeze_dim::<5>(2);
    let dist = vae.encode_exact(noisy, options)?;
    let eps = sample_noise(dist.mean.dims());
    Ok(vae.scale_latents(dist.sample_with(eps)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_model_core::{CpuBackend, CpuDevice};

    #[test]
    fn noisy_image_latents_follow_the_official_train_step() {
        let model = cogvx_fixtures::model("cogvideox-2b-tiny");
        use burn::tensor::{Distribution, Tensor};
        let device = CpuDevice::default();
        let (vae, cfg) =
            cogvx_vae::AutoencoderKLCogVideoX::<CpuBackend>::from_dir(&model.join("vae"), &device)
                .unwrap();
        let opts = cogvx_vae::VaeOptions::default();
        let images = Tensor::<CpuBackend, 4>::random(
            [2, 3, 32, 48],
            Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let noise = Tensor::<CpuBackend, 4>::random(
            [2, 3, 32, 48],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let eps = Tensor::<CpuBackend, 5>::random(
            [2, 4, 1, 4, 6],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let log_sigma = Tensor::<CpuBackend, 1>::from_floats([-3.0, -2.5], &device);
        let got = noisy_image_latents(
            &vae,
            images.clone(),
            log_sigma,
            noise.clone(),
            |_| eps.clone(),
            &opts,
        )
        .unwrap();
        // By hand: images + noise * exp(log_sigma), as one-frame videos, posterior sample, * scaling_factor.
        let sigma =
            Tensor::<CpuBackend, 1>::from_floats([(-3.0f32).exp(), (-2.5f32).exp()], &device)
                .reshape([2, 1, 1, 1]);
        let dist = vae
            .encode((images + noise * sigma).unsqueeze_dim::<5>(2), &opts)
            .unwrap();
        let want = (dist.mean + (dist.logvar * 0.5).exp() * eps) * cfg.scaling_factor;
        assert_eq!(got.dims(), [2, 4, 1, 4, 6]);
        let (g, w): (Vec<f32>, Vec<f32>) = (
            got.into_data().to_vec().unwrap(),
            want.into_data().to_vec().unwrap(),
        );
        assert_eq!(g, w);
    }
}
