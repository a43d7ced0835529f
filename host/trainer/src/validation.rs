//! Validation during training: the validation prompts (and images, I2V) sampled with the model
//! being trained, written as `.mp4`, scored by validator plugins and logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_cache::{Cache, HostTensor};
use cogvx_engine::{
    frames_to_u8, CogVideoXPipeline, ConditionImage, ModelFolder, PromptSource, SampleRequest,
    SeededNoise,
};
use cogvx_metrics::MetricsLog;
use cogvx_plugin_api::{Plugin, ValidateRequest};
use cogvx_transformer::CogVideoXTransformer3DModel;
use cogvx_vae::{AutoencoderKLCogVideoX, Tiling, VaeOptions};

use crate::{TrainerError, ValidationConfig};

/// Frames in each validation video's strip (`validation/step-<n>/<i>.png`, TensorBoard).
const STRIP_FRAMES: usize = 8;
/// The strip's largest height in pixels (a 480x720 video's frames are shown at 256x384).
const STRIP_HEIGHT: u32 = 256;

pub(crate) struct Validation<B: Backend> {
    folder: ModelFolder,
    out: PathBuf,
    config: ValidationConfig,
    images: Vec<ConditionImage>,
    /// The T5 embedding of each validation prompt and of the negative prompt `""`, computed
    /// once before training (cached in the prompt cache), so T5 is never loaded beside the
    /// model being trained.
    embeddings: BTreeMap<String, HostTensor>,
    /// `[frames, height, width]` of the training data.
    resolution: [usize; 3],
    max_sequence_length: usize,
    _backend: std::marker::PhantomData<B>,
}

impl<B: cogvx_model_core::ModelBackend> Validation<B> {
    /// Reads the conditioning images (I2V) so that a missing file fails before training, and
    /// gets the prompts' embeddings from the cache, encoding the missing ones with T5 (loaded
    /// only then, and released before this returns). Call it before the transformer is loaded.
    /// `text_dtype`: T5's weight dtype, as the training captions were encoded with.
    pub(crate) fn new(
        folder: ModelFolder,
        out: &Path,
        cache: &Cache,
        config: &ValidationConfig,
        text_dtype: Option<burn::tensor::FloatDType>,
        device: &B::Device,
    ) -> Result<Self, TrainerError> {
        let mut images = Vec::new();
        let mut embeddings = BTreeMap::new();
        if config.enabled() {
            for p in &config.images {
                images.push(ConditionImage::open(p).map_err(|e| {
                    TrainerError::Config(format!("`validation.images`: {}: {e}", p.display()))
                })?);
            }
            let mut prompts = config.prompts.clone();
            if config.guidance_scale > 1.0 {
                // The negative prompt of classifier-free guidance (the pipeline's default).
                prompts.push(String::new());
            }
            let encoded = cogvx_cache::prompt_embeddings::<B>(
                &cache.dir,
                &folder.root,
                &prompts,
                cache.index.max_sequence_length,
                text_dtype,
                device,
            )?;
            embeddings = prompts.into_iter().zip(encoded).collect();
        }
        let [f, h, w] = cache.index.resolution;
        Ok(Validation {
            folder,
            out: out.to_path_buf(),
            config: config.clone(),
            images,
            embeddings,
            resolution: [f as usize, h as usize, w as usize],
            max_sequence_length: cache.index.max_sequence_length,
            _backend: std::marker::PhantomData,
        })
    }

    /// Samples every prompt with `transformer` (the model being trained, without autodiff),
    /// writes `validation/step-<step>/<i>.mp4`, runs the validators and logs a `validation` event
    /// per video. Returns the videos written.
    pub(crate) fn run<'p>(
        &self,
        step: u64,
        transformer: CogVideoXTransformer3DModel<B>,
        scheduler: Option<&mut (dyn Plugin + 'p)>,
        validators: &mut [(String, &mut dyn Plugin)],
        metrics: &mut MetricsLog,
        device: &B::Device,
    ) -> Result<Vec<PathBuf>, TrainerError> {
        // The VAE is loaded for this validation and released after it; T5 is never loaded here
        // (the prompts' embeddings were computed before training). Neither is resident while
        // the transformer trains, as `cogvx plan`'s training phase assumes.
        let prompts = self
            .embeddings
            .iter()
            .map(|(p, e)| {
                (
                    p.clone(),
                    Tensor::from_data(TensorData::new(e.data.clone(), e.shape.clone()), device),
                )
            })
            .collect();
        let (vae, vae_config) =
            AutoencoderKLCogVideoX::from_dir(&self.folder.component_dir("vae"), device)?;
        let pipe = CogVideoXPipeline::from_parts(
            self.folder.clone(),
            PromptSource::Precomputed(prompts),
            transformer,
            vae,
            vae_config,
        )?;
        let result = self.sample_all(step, &pipe, scheduler, validators, metrics, device);
        drop(pipe);
        result
    }

    fn sample_all<'p>(
        &self,
        step: u64,
        pipe: &CogVideoXPipeline<B>,
        mut scheduler: Option<&mut (dyn Plugin + 'p)>,
        validators: &mut [(String, &mut dyn Plugin)],
        metrics: &mut MetricsLog,
        device: &B::Device,
    ) -> Result<Vec<PathBuf>, TrainerError> {
        let c = &self.config;
        let dir = self.out.join("validation").join(format!("step-{step}"));
        std::fs::create_dir_all(&dir).map_err(|e| TrainerError::Io {
            path: dir.clone(),
            message: e.to_string(),
        })?;
        let t0 = std::time::Instant::now();
        let fps = c.fps.unwrap_or_else(|| pipe.default_fps());
        // Tiled and sliced decode, as the official finetune's validation (`enable_tiling`,
        // `enable_slicing`): a whole-frame decode of 49x480x720 would need ~8 GB more.
        let vae_options = VaeOptions {
            tiling: Some(Tiling::for_config(&pipe.vae_config)),
            slicing: true,
        };
        let mut written = Vec::new();
        for (i, prompt) in c.prompts.iter().enumerate() {
            let request = SampleRequest {
                prompts: vec![prompt.clone()],
                negative_prompt: None,
                images: self.images.get(i).cloned().into_iter().collect(),
                num_frames: Some(c.num_frames.unwrap_or(self.resolution[0])),
                height: Some(c.height.unwrap_or(self.resolution[1])),
                width: Some(c.width.unwrap_or(self.resolution[2])),
                num_inference_steps: c.num_inference_steps,
                guidance_scale: c.guidance_scale,
                use_dynamic_cfg: c.use_dynamic_cfg,
                max_sequence_length: self.max_sequence_length,
                seed: c.seed,
                vae_options,
            };
            let plan = pipe.plan_with(scheduler.as_deref_mut(), c.num_inference_steps)?;
            let mut noise = SeededNoise::new(c.seed);
            let frames =
                pipe.generate_with(&request, plan, None, &mut noise, &mut |_, _| {}, device)?;
            let clip = frames_to_u8(frames)?.remove(0);
            let path = dir.join(format!("{i}.mp4"));
            cogvx_video::encode_mp4(&path, &clip, fps, &cogvx_video::EncodeOptions::default())?;
            // The video at a glance: evenly spaced frames side by side, as a PNG beside it and
            // in TensorBoard's Images tab.
            let strip =
                cogvx_video::frame_strip(&clip, STRIP_FRAMES, STRIP_HEIGHT).map_err(|reason| {
                    cogvx_video::VideoError::BadFrames {
                        path: path.clone(),
                        reason,
                    }
                })?;
            cogvx_video::write_png(dir.join(format!("{i}.png")), &strip)?;
            let mut fields = serde_json::Map::new();
            fields.insert("prompt".into(), prompt.clone().into());
            fields.insert("video".into(), path.display().to_string().into());
            for (name, plugin) in validators.iter_mut() {
                let request = ValidateRequest {
                    prompt: prompt.clone(),
                    frames: clip.clone(),
                    fps,
                };
                // A validator that fails marks this video's validation failed; training goes on.
                let scores = match plugin.validate(&request) {
                    Ok(scores) => scores,
                    Err(e) => {
                        tracing::warn!("validation step {step}, video {i}: validator `{name}` failed (training goes on): {e}");
                        fields.insert(format!("{name}.error"), e.to_string().into());
                        continue;
                    }
                };
                for m in scores {
                    if !m.value.is_finite() {
                        tracing::warn!("validation step {step}, video {i}: {name}.{} = {} (not a finite number; logged as null)", m.name, m.value);
                    } else {
                        tracing::info!(
                            "validation step {step}, video {i}: {name}.{} = {}",
                            m.name,
                            m.value
                        );
                    }
                    fields.insert(format!("{name}.{}", m.name), serde_json::json!(m.value));
                }
            }
            if let Some(tb) = metrics.tensorboard() {
                let tag = format!("validation/{i}");
                tb.log_image(&tag, step, &strip)?;
                tb.log_numbers(&tag, step, &fields)?;
            }
            metrics.log_event("validation", step, serde_json::Value::Object(fields))?;
            written.push(path);
        }
        tracing::info!(
            "validation at step {step}: {} videos in {} ({:.1}s)",
            written.len(),
            dir.display(),
            t0.elapsed().as_secs_f64()
        );
        Ok(written)
    }
}
