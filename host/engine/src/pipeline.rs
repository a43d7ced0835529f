//! Text- and image-to-video sampling, a port of diffusers `CogVideoXPipeline.__call__`
//! (`pipelines/cogvideo/pipeline_cogvideox.py`) and `CogVideoXImageToVideoPipeline.__call__`
//! (`pipeline_cogvideox_image2video.py`), sharing one denoising loop: prompt → T5 tokenizer →
//! T5 encoder → (I2V: image → VAE encode → posterior sample → scaled image latents, zero-padded
//! to the latent frames and concatenated with the noisy latents on channels each step; `ofs`
//! for 1.5) → transformer with classifier-free guidance → scheduler loop (any
//! [`InferencePlan`], applied by the coefficient executor) → `1 / scaling_factor` → VAE decode
//! → frames in [0, 1].
//!
//! Randomness comes from one [`NoiseSource`] (by default [`SeededNoise`] from the request's
//! seed), consumed in the order diffusers consumes its single `generator`: for I2V first one
//! posterior sample per image (`latent_dist.sample(generator)`, shape `[1, C, 1, h, w]`), then
//! the starting latents, then the noise of stochastic schedulers at each step.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_model_core::case::{Case, HostTensor};
use cogvx_plugin_api::{InferencePlan, Plugin, PluginError, SchedulerPlanRequest};
use cogvx_scheduler::{CogVideoXDdim, CogVideoXDpm, PlanExecutor, SchedulerKind};
use cogvx_text::PromptEncoder;
use cogvx_transformer::CogVideoXTransformer3DModel;
use cogvx_vae::{AutoencoderKLCogVideoX, VaeConfig, VaeOptions};
use rand::{rngs::StdRng, SeedableRng};

use crate::image::ConditionImage;
use crate::model::ModelFolder;
use crate::EngineError;

/// The `ofs` value diffusers' image-to-video pipeline feeds CogVideoX 1.5-I2V
/// (`latents.new_full((1,), fill_value=2.0)`).
pub const I2V_OFS: f32 = 2.0;

/// Arguments of a generation, with the defaults of `CogVideoXPipeline.__call__` /
/// `CogVideoXImageToVideoPipeline.__call__`.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRequest {
    /// One video per prompt.
    pub prompts: Vec<String>,
    /// Used for every prompt when classifier-free guidance is on; `None` is `""`.
    pub negative_prompt: Option<String>,
    /// Image-to-video: one conditioning image per prompt (any size; resized to
    /// `height x width`). Must be empty for text-to-video models and non-empty for I2V ones.
    pub images: Vec<ConditionImage>,
    /// Pixels; `None`: `transformer.sample_height * 8`.
    pub height: Option<usize>,
    /// Pixels; `None`: `transformer.sample_width * 8`.
    pub width: Option<usize>,
    /// Pixel frames; `None`: `transformer.sample_frames`.
    pub num_frames: Option<usize>,
    pub num_inference_steps: usize,
    /// Classifier-free guidance is on when `> 1`.
    pub guidance_scale: f64,
    /// The cosine guidance ramp of the pipeline (`use_dynamic_cfg`).
    pub use_dynamic_cfg: bool,
    pub max_sequence_length: usize,
    /// Seed of the image posterior samples, the starting latents and any scheduler noise (DPM).
    pub seed: u64,
    /// VAE tiling / slicing for the image encode and the decode.
    pub vae_options: VaeOptions,
}

/// The text-to-video name of [`SampleRequest`] (a request with no images).
pub type T2vRequest = SampleRequest;

impl Default for SampleRequest {
    fn default() -> Self {
        SampleRequest {
            prompts: Vec::new(),
            negative_prompt: None,
            images: Vec::new(),
            height: None,
            width: None,
            num_frames: None,
            num_inference_steps: 50,
            guidance_scale: 6.0,
            use_dynamic_cfg: false,
            max_sequence_length: cogvx_text::COGVIDEOX_MAX_SEQUENCE_LENGTH,
            seed: 0,
            vae_options: VaeOptions::default(),
        }
    }
}

/// Where sampling noise comes from (the starting latents and the noise of stochastic
/// schedulers), so that tests and parity runs can inject it.
pub trait NoiseSource<B: Backend> {
    /// A standard-normal tensor of `shape`.
    fn sample(&mut self, shape: [usize; 5], device: &B::Device) -> Tensor<B, 5>;
}

/// Standard-normal noise from a seeded host RNG (`StdRng` + Box-Muller), identical on every
/// backend for a given seed.
#[derive(Clone, Debug)]
pub struct SeededNoise {
    rng: StdRng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        SeededNoise {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// `n` standard-normal values.
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        cogvx_scheduler::noise::standard_normal(&mut self.rng, n)
    }
}

impl<B: Backend> NoiseSource<B> for SeededNoise {
    fn sample(&mut self, shape: [usize; 5], device: &B::Device) -> Tensor<B, 5> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(self.values(n), shape), device)
    }
}

/// The guidance scale of step `t` with `use_dynamic_cfg`:
/// `1 + g * (1 - cos(pi * ((n - t) / n) ** 5)) / 2`, exactly as the pipeline computes it
/// (with the model timestep `t`, not the step index).
pub fn dynamic_guidance_scale(guidance_scale: f64, num_inference_steps: usize, t: u32) -> f64 {
    let n = num_inference_steps as f64;
    let x = ((n - t as f64) / n).powf(5.0);
    1.0 + guidance_scale * ((1.0 - (std::f64::consts::PI * x).cos()) / 2.0)
}

/// Where a pipeline's prompt embeddings come from.
#[derive(Debug)]
// One value per pipeline: boxing the encoder would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum PromptSource<B: Backend> {
    /// The tokenizer and T5, loaded: each prompt is encoded when it is sampled.
    Encoder(PromptEncoder<B>),
    /// Embeddings computed beforehand, `[max_sequence_length, d_model]` per prompt text (the
    /// negative prompt, `""` by default, included when guiding): the pipeline holds no T5, as
    /// during training's validation, where T5 would not fit beside the model being trained.
    Precomputed(BTreeMap<String, Tensor<B, 2>>),
}

impl<B: cogvx_model_core::ModelBackend> PromptSource<B> {
    /// `[len(prompts), max_sequence_length, d_model]`: the prompts encoded, or looked up.
    pub fn encode(
        &self,
        prompts: &[String],
        max_sequence_length: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, EngineError> {
        match self {
            PromptSource::Encoder(encoder) => {
                Ok(encoder.encode(prompts, max_sequence_length, 1, device)?)
            }
            PromptSource::Precomputed(embeddings) => {
                let mut rows = Vec::with_capacity(prompts.len());
                for prompt in prompts {
                    let e = embeddings.get(prompt).ok_or_else(|| {
                        EngineError::Input(format!(
                            "no precomputed embedding for the prompt \"{}\" (this pipeline has no \
                             text encoder; encode every prompt it samples beforehand)",
                            cogvx_plugin_api::text::display_safe(prompt, 80)
                        ))
                    })?;
                    if e.dims()[0] != max_sequence_length {
                        return Err(EngineError::Input(format!(
                            "the precomputed embedding of \"{}\" has {} tokens, the request \
                             asks for max_sequence_length {max_sequence_length}",
                            cogvx_plugin_api::text::display_safe(prompt, 80),
                            e.dims()[0]
                        )));
                    }
                    rows.push(e.clone().to_device(device));
                }
                Ok(Tensor::stack(rows, 0))
            }
        }
    }
}

/// A loaded CogVideoX model (text- or image-to-video): its prompt source (tokenizer and T5, or
/// precomputed embeddings), transformer, VAE and the folder's scheduler config. The fields are public: a trainer samples with the weights it is
/// training by putting them in `transformer` (e.g. `pipeline.transformer = model.valid()`).
pub struct CogVideoXPipeline<B: Backend> {
    pub folder: ModelFolder,
    pub prompts: PromptSource<B>,
    pub transformer: CogVideoXTransformer3DModel<B>,
    pub vae: AutoencoderKLCogVideoX<B>,
    pub vae_config: VaeConfig,
}

impl<B: cogvx_model_core::ModelBackend> CogVideoXPipeline<B> {
    /// Loads every component of a diffusers CogVideoX folder (checked by [`ModelFolder::open`]).
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, EngineError> {
        let folder = ModelFolder::open(dir)?;
        let transformer =
            CogVideoXTransformer3DModel::from_dir(&folder.component_dir("transformer"), device)?;
        Self::load_with_transformer(folder, transformer, device)
    }

    /// Loads the tokenizer, T5 and VAE of `folder` and uses the given `transformer` (one being
    /// trained, or with adapters applied) instead of reading `transformer/`. The transformer's
    /// config must be the folder's (same architecture and sizes).
    pub fn load_with_transformer(
        folder: ModelFolder,
        transformer: CogVideoXTransformer3DModel<B>,
        device: &B::Device,
    ) -> Result<Self, EngineError> {
        let prompts = PromptSource::Encoder(PromptEncoder::load(&folder.root, device)?);
        let (vae, vae_config) =
            AutoencoderKLCogVideoX::from_dir(&folder.component_dir("vae"), device)?;
        Self::from_parts(folder, prompts, transformer, vae, vae_config)
    }

    /// Assembles a pipeline from loaded components, checking that the transformer's config is
    /// `folder`'s and that the VAE's latent channels are the transformer's.
    pub fn from_parts(
        folder: ModelFolder,
        prompts: PromptSource<B>,
        transformer: CogVideoXTransformer3DModel<B>,
        vae: AutoencoderKLCogVideoX<B>,
        vae_config: VaeConfig,
    ) -> Result<Self, EngineError> {
        if transformer.config != folder.transformer_config {
            return Err(EngineError::Model {
                path: folder.component_dir("transformer").join("config.json"),
                message: format!(
                    "the given transformer's config differs from this folder's ({:?} vs {:?}); \
                     sample with the model folder the transformer was loaded from",
                    transformer.config, folder.transformer_config
                ),
            });
        }
        if vae.latent_channels != transformer.config.out_channels() {
            return Err(EngineError::Model {
                path: folder.component_dir("vae").join("config.json"),
                message: format!(
                    "the VAE has {} latent channels, the transformer predicts {}",
                    vae.latent_channels,
                    transformer.config.out_channels()
                ),
            });
        }
        Ok(CogVideoXPipeline {
            folder,
            prompts,
            transformer,
            vae,
            vae_config,
        })
    }

    /// `2 ** (len(vae.block_out_channels) - 1)` (8).
    pub fn vae_scale_factor_spatial(&self) -> usize {
        self.vae.spatial_scale
    }

    /// `vae.temporal_compression_ratio` (4).
    pub fn vae_scale_factor_temporal(&self) -> usize {
        self.vae_config.temporal_compression_ratio as usize
    }

    /// Frames per second of the official demos' `export_to_video`: 8 for CogVideoX 1.0,
    /// 16 for 1.5.
    pub fn default_fps(&self) -> f64 {
        if self.folder.variant.is_v15() {
            16.0
        } else {
            8.0
        }
    }

    /// The plan of the folder's own scheduler (`CogVideoXDDIMScheduler` or
    /// `CogVideoXDPMScheduler`, through the built-in plugins).
    pub fn default_plan(&self, num_inference_steps: usize) -> Result<InferencePlan, EngineError> {
        let mut plugin: Box<dyn Plugin> = match self.folder.scheduler_kind {
            SchedulerKind::Ddim => Box::new(CogVideoXDdim),
            SchedulerKind::Dpm => Box::new(CogVideoXDpm),
        };
        plan_from_plugin(plugin.as_mut(), &self.folder, num_inference_steps)
    }

    /// The plan of a scheduler plugin, or the folder's own ([`Self::default_plan`]) when there
    /// is none or the plugin has no inference side (a training-only timestep distribution
    /// answers `scheduler_plan` with [`PluginError::Unsupported`]).
    pub fn plan_with<'p>(
        &self,
        plugin: Option<&mut (dyn Plugin + 'p)>,
        num_inference_steps: usize,
    ) -> Result<InferencePlan, EngineError> {
        let Some(plugin) = plugin else {
            return self.default_plan(num_inference_steps);
        };
        match request_plan(plugin, &self.folder, num_inference_steps) {
            Err(PluginError::Unsupported(_)) => {
                tracing::info!(
                    "scheduler plugin `{}` has no inference plan; sampling with the model's {}",
                    plugin.info().name,
                    self.folder.scheduler_kind.class_name()
                );
                self.default_plan(num_inference_steps)
            }
            result => result.map_err(|e| plugin_error(plugin, e)),
        }
    }

    /// Generates videos with the folder's scheduler and [`SeededNoise`] from `request.seed`.
    /// Returns frames `[B, T, 3, H, W]` in [0, 1].
    pub fn generate(
        &self,
        request: &SampleRequest,
        device: &B::Device,
    ) -> Result<Tensor<B, 5>, EngineError> {
        let plan = self.default_plan(request.num_inference_steps)?;
        let mut noise = SeededNoise::new(request.seed);
        self.generate_with(request, plan, None, &mut noise, &mut |_, _| {}, device)
    }

    /// The full sampling path with an explicit scheduler `plan` (from any scheduler plugin),
    /// optional starting `latents` `[B, F, C, h, w]` (else drawn from `noise`), the noise source
    /// of the image posterior samples and of stochastic schedulers, and `on_step(i, n)` called
    /// after each step. Returns frames `[B, T, 3, H, W]` in [0, 1].
    pub fn generate_with(
        &self,
        request: &SampleRequest,
        plan: InferencePlan,
        latents: Option<Tensor<B, 5>>,
        noise: &mut dyn NoiseSource<B>,
        on_step: &mut dyn FnMut(usize, usize),
        device: &B::Device,
    ) -> Result<Tensor<B, 5>, EngineError> {
        let (latents, additional_frames) =
            self.denoise(request, plan, latents, noise, on_step, device)?;
        // Discard the padding frames added for CogVideoX 1.5.
        let f = latents.dims()[1];
        let latents = latents.narrow(1, additional_frames, f - additional_frames);
        self.decode_latents(latents, &request.vae_options)
    }

    /// The image half of the I2V pipeline's `prepare_latents`: `images [B, 3, H, W]` in
    /// [-1, 1] → each image VAE-encoded as a one-frame video → `latent_dist.sample()` with
    /// noise `[1, C, 1, h, w]` drawn from `noise` image by image → `[B, 1, C, h, w]` →
    /// `scaling_factor *` (or `1 / scaling_factor *` with the VAE's `invert_scale_latents`,
    /// CogVideoX 1.5) → zero frames appended up to `latent_frames` → for `patch_size_t` models,
    /// the first `F % patch_size_t` frames prepended. Returns `[B, F', C, h, w]`.
    pub fn prepare_image_latents(
        &self,
        images: Tensor<B, 4>,
        latent_frames: usize,
        noise: &mut dyn NoiseSource<B>,
        options: &VaeOptions,
    ) -> Result<Tensor<B, 5>, EngineError> {
        let [batch, _, _, _] = images.dims();
        let device = images.device();
        if latent_frames == 0 {
            return Err(EngineError::Input(
                "latent_frames must be at least 1".into(),
            ));
        }
        let mut latents = Vec::with_capacity(batch);
        for i in 0..batch {
            let image = images.clone().narrow(0, i, 1).unsqueeze_dim::<5>(2); // [1, 3, 1, H, W]
            let dist = self.vae.encode_exact(image, options)?;
            let eps = noise.sample(dist.mean.dims(), &device);
            latents.push(dist.sample_with(eps));
        }
        let image_latents = Tensor::cat(latents, 0).swap_dims(1, 2); // [B, 1, C, h, w]
        let image_latents = self.vae.scale_image_latents(image_latents);
        let [b, _, c, h, w] = image_latents.dims();
        let image_latents = if latent_frames > 1 {
            let padding = Tensor::<B, 5>::zeros([b, latent_frames - 1, c, h, w], &device);
            Tensor::cat(vec![image_latents, padding], 1)
        } else {
            image_latents
        };
        Ok(match self.transformer.config.patch_size_t {
            Some(p_t) if latent_frames % p_t != 0 => {
                let first_frame = image_latents.clone().narrow(1, 0, latent_frames % p_t);
                Tensor::cat(vec![first_frame, image_latents], 1)
            }
            _ => image_latents,
        })
    }

    /// The denoising loop of both pipelines: returns the final latents `[B, F, C, h, w]`
    /// (including the frames the 1.5 models pad with) and the number of padded leading frames.
    pub fn denoise(
        &self,
        request: &SampleRequest,
        plan: InferencePlan,
        latents: Option<Tensor<B, 5>>,
        noise: &mut dyn NoiseSource<B>,
        on_step: &mut dyn FnMut(usize, usize),
        device: &B::Device,
    ) -> Result<(Tensor<B, 5>, usize), EngineError> {
        let (height, width, mut num_frames) =
            check_request(&self.folder, self.vae_scale_factor_spatial(), request)?;
        let tc = &self.transformer.config;
        let i2v = self.folder.variant.is_i2v();
        let spatial = self.vae_scale_factor_spatial();
        let temporal = self.vae_scale_factor_temporal();
        let batch_size = request.prompts.len();
        let do_cfg = request.guidance_scale > 1.0;

        // encode_prompt: [negative; positive] on the batch when guiding.
        let enc = &self.prompts;
        let mut prompt_embeds =
            enc.encode(&request.prompts, request.max_sequence_length, device)?;
        if do_cfg {
            let negative = request.negative_prompt.clone().unwrap_or_default();
            let negatives = vec![negative; batch_size];
            let negative_embeds = enc.encode(&negatives, request.max_sequence_length, device)?;
            prompt_embeds = Tensor::cat(vec![negative_embeds, prompt_embeds], 0);
        }

        // Latent frames, padded at the front for patch_size_t (1.5).
        let latent_frames = (num_frames - 1) / temporal + 1;
        let mut additional_frames = 0;
        if let Some(p_t) = tc.patch_size_t {
            if latent_frames % p_t != 0 {
                additional_frames = p_t - latent_frames % p_t;
                num_frames += additional_frames * temporal;
            }
        }
        let latent_frames = (num_frames - 1) / temporal + 1;
        let latent_channels = if i2v {
            tc.in_channels / 2
        } else {
            tc.in_channels
        };
        let mut shape = [
            batch_size,
            latent_frames,
            latent_channels,
            height / spatial,
            width / spatial,
        ];

        // I2V prepare_latents: the image latents come first (they draw from the generator
        // before the starting latents do).
        let image_latents = if i2v {
            if let Some(p_t) = tc.patch_size_t {
                shape[1] += shape[1] % p_t;
            }
            let pixels = request
                .images
                .iter()
                .map(|image| image.preprocess::<B>(height, width, device))
                .collect::<Result<Vec<_>, _>>()?;
            let pixels = Tensor::stack(pixels, 0); // [B, 3, H, W]
            Some(self.prepare_image_latents(pixels, latent_frames, noise, &request.vae_options)?)
        } else {
            None
        };

        let latents = match latents {
            Some(l) => {
                if l.dims() != shape {
                    return Err(EngineError::Input(format!(
                        "latents have shape {:?}, expected {shape:?} [batch, latent frames, channels, height/{spatial}, width/{spatial}]",
                        l.dims()
                    )));
                }
                l
            }
            None => noise.sample(shape, device),
        };
        // init_noise_sigma is 1.0 for both CogVideoX schedulers.
        let mut latents = latents;
        let latent_image_input = image_latents.map(|l| {
            if do_cfg {
                Tensor::cat(vec![l.clone(), l], 0)
            } else {
                l
            }
        });

        let rotary = self
            .transformer
            .image_rotary_emb(shape[1], shape[3], shape[4], device)?;
        let ofs = tc
            .ofs_embed_dim
            .map(|_| Tensor::<B, 1>::full([1], I2V_OFS, device));
        let num_inference_steps = plan.steps.len();
        let mut executor = PlanExecutor::<B, 5>::new(plan)?;
        let mut i = 0;
        while let Some(t) = executor.current_timestep() {
            let latent_model_input = if do_cfg {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            // scale_model_input is the identity for both CogVideoX schedulers.
            let latent_model_input = match &latent_image_input {
                Some(image) => Tensor::cat(vec![latent_model_input, image.clone()], 2),
                None => latent_model_input,
            };
            let n = latent_model_input.dims()[0];
            let timestep = Tensor::<B, 1>::full([n], t as f32, device);
            let noise_pred = self.transformer.forward(
                latent_model_input,
                prompt_embeds.clone(),
                timestep,
                ofs.clone(),
                rotary.as_ref(),
            )?;
            let guidance_scale = if request.use_dynamic_cfg {
                dynamic_guidance_scale(request.guidance_scale, num_inference_steps, t)
            } else {
                request.guidance_scale
            };
            let noise_pred = if do_cfg {
                let uncond = noise_pred.clone().narrow(0, 0, batch_size);
                let text = noise_pred.narrow(0, batch_size, batch_size);
                uncond.clone() + (text - uncond) * guidance_scale
            } else {
                noise_pred
            };
            let step_noise = if executor.needs_noise() {
                Some(noise.sample(shape, device))
            } else {
                None
            };
            latents = executor.step(latents, noise_pred, step_noise)?.prev_sample;
            i += 1;
            on_step(i, num_inference_steps);
        }
        Ok((latents, additional_frames))
    }

    /// The pipeline's `decode_latents` + `postprocess_video(output_type="pt")`: latents
    /// `[B, F, C, h, w]` → `1 / scaling_factor` → VAE decode → `(x / 2 + 0.5).clamp(0, 1)` →
    /// frames `[B, T, 3, H, W]`.
    pub fn decode_latents(
        &self,
        latents: Tensor<B, 5>,
        options: &VaeOptions,
    ) -> Result<Tensor<B, 5>, EngineError> {
        let latents = latents.swap_dims(1, 2); // [B, C, F, h, w]
        let latents = self.vae.unscale_latents(latents);
        let video = self.vae.decode_exact(latents, options)?; // [B, 3, T, H, W]
        let frames = (video * 0.5 + 0.5).clamp(0.0, 1.0);
        Ok(frames.swap_dims(1, 2))
    }
}

/// Checks the conditioning images against the model kind: image-to-video folders need one
/// image per prompt, text-to-video folders take none; and there is at least one prompt.
pub fn check_conditioning(
    folder: &ModelFolder,
    num_images: usize,
    num_prompts: usize,
) -> Result<(), EngineError> {
    let variant = folder.variant;
    if variant.is_i2v() && num_images == 0 {
        return Err(EngineError::Input(format!(
            "{} is an image-to-video model ({variant}); give a conditioning image (--image), \
             or use a text-to-video checkpoint for text-only sampling",
            folder.root.display()
        )));
    }
    if !variant.is_i2v() && num_images > 0 {
        return Err(EngineError::Input(format!(
            "{} is a text-to-video model ({variant}) and takes no conditioning image; \
             image-to-video needs a 5b-i2v or 1.5-5b-i2v checkpoint",
            folder.root.display()
        )));
    }
    if num_prompts == 0 {
        return Err(EngineError::Input("no prompt given".into()));
    }
    if variant.is_i2v() && num_images != num_prompts {
        return Err(EngineError::Input(format!(
            "{num_images} conditioning images for {num_prompts} prompts; give one image per prompt"
        )));
    }
    Ok(())
}

/// Checks a request against a model folder before any work, as the pipelines' `check_inputs`:
/// a conditioning image exactly for image-to-video models (one per prompt), at least one
/// prompt, `height` and `width` positive multiples of 8, at least one frame. Returns
/// `(height, width, num_frames)` with the transformer config's defaults filled in
/// (`sample_height * vae_scale_factor_spatial`, ...).
pub fn check_request(
    folder: &ModelFolder,
    vae_scale_factor_spatial: usize,
    request: &SampleRequest,
) -> Result<(usize, usize, usize), EngineError> {
    let tc = &folder.transformer_config;
    check_conditioning(folder, request.images.len(), request.prompts.len())?;
    let height = request
        .height
        .unwrap_or(tc.sample_height * vae_scale_factor_spatial);
    let width = request
        .width
        .unwrap_or(tc.sample_width * vae_scale_factor_spatial);
    let num_frames = request.num_frames.unwrap_or(tc.sample_frames);
    if height % 8 != 0 || width % 8 != 0 || height == 0 || width == 0 {
        return Err(EngineError::Input(format!(
            "`height` and `width` have to be positive and divisible by 8 but are {height} and {width}"
        )));
    }
    if num_frames == 0 {
        return Err(EngineError::Input("num_frames must be at least 1".into()));
    }
    Ok((height, width, num_frames))
}

/// Asks a scheduler plugin for the plan of `folder`'s scheduler config.
pub fn plan_from_plugin(
    plugin: &mut dyn Plugin,
    folder: &ModelFolder,
    num_inference_steps: usize,
) -> Result<InferencePlan, EngineError> {
    request_plan(plugin, folder, num_inference_steps).map_err(|e| plugin_error(plugin, e))
}

/// The plugin's `scheduler_plan` for the folder's scheduler config.
fn request_plan(
    plugin: &mut dyn Plugin,
    folder: &ModelFolder,
    num_inference_steps: usize,
) -> Result<InferencePlan, PluginError> {
    plugin.scheduler_plan(&SchedulerPlanRequest {
        config_json: folder.scheduler_config_json.clone(),
        num_inference_steps: num_inference_steps as u32,
    })
}

fn plugin_error(plugin: &dyn Plugin, e: PluginError) -> EngineError {
    EngineError::Plugin {
        plugin: plugin.info().name,
        message: e.to_string(),
    }
}

fn param<'a>(case: &'a Case, key: &str) -> Result<&'a serde_json::Value, EngineError> {
    Ok(case.param(key)?)
}

fn param_usize(case: &Case, key: &str) -> Result<usize, EngineError> {
    param(case, key)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| {
            EngineError::Input(format!(
                "case {}: params.{key} is not a non-negative integer",
                case.name
            ))
        })
}

/// Runs a `pipeline_t2v` parity case: the case's prompt, negative prompt, steps, guidance,
/// sizes and `max_sequence_length`, the folder's scheduler, starting from `in.latents`.
/// Returns `{"frames": [1, T, 3, H, W]}`.
pub fn run_case<B: cogvx_model_core::ModelBackend>(
    case: &Case,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, EngineError> {
    if case.component != "pipeline_t2v" {
        return Err(EngineError::Input(format!(
            "case {}: component `{}` is not run by the pipeline (it runs pipeline_t2v)",
            case.name, case.component
        )));
    }
    let text = |key: &str| -> Result<Option<String>, EngineError> {
        match case.params.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(EngineError::Input(format!(
                "case {}: params.{key} is not a string: {v}",
                case.name
            ))),
        }
    };
    let prompt = text("prompt")?
        .ok_or_else(|| EngineError::Input(format!("case {}: missing params.prompt", case.name)))?;
    let request = SampleRequest {
        prompts: vec![prompt],
        negative_prompt: text("negative_prompt")?,
        images: Vec::new(),
        height: Some(param_usize(case, "height")?),
        width: Some(param_usize(case, "width")?),
        num_frames: Some(param_usize(case, "num_frames")?),
        num_inference_steps: param_usize(case, "num_inference_steps")?,
        guidance_scale: param(case, "guidance_scale")?.as_f64().ok_or_else(|| {
            EngineError::Input(format!(
                "case {}: params.guidance_scale is not a number",
                case.name
            ))
        })?,
        use_dynamic_cfg: case
            .params
            .get("use_dynamic_cfg")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        max_sequence_length: param_usize(case, "max_sequence_length")?,
        seed: 0,
        vae_options: VaeOptions::default(),
    };
    let pipe = CogVideoXPipeline::<B>::load(&case.model_dir, device)?;
    let latents = case.input("latents")?.to_tensor::<B, 5>(device)?;
    let plan = pipe.default_plan(request.num_inference_steps)?;
    let mut noise = SeededNoise::new(request.seed);
    let frames = pipe.generate_with(
        &request,
        plan,
        Some(latents),
        &mut noise,
        &mut |_, _| {},
        device,
    )?;
    Ok(BTreeMap::from([(
        "frames".to_string(),
        HostTensor::from_tensor(frames),
    )]))
}
