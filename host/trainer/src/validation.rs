//! Validation during training: the validation prompts (and images, I2V) sampled with the model
//! being trained, written as `.mp4`, scored by validator plugins and logged.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use cogvx_cache::Cache;
use cogvx_engine::{frames_to_u8, plan_from_plugin, CogVideoXPipeline, ConditionImage, ModelFolder, SampleRequest, SeededNoise};
use cogvx_metrics::MetricsLog;
use cogvx_plugin_api::{Plugin, ValidateRequest};
use cogvx_text::PromptEncoder;
use cogvx_transformer::CogVideoXTransformer3DModel;
use cogvx_vae::{AutoencoderKLCogVideoX, VaeOptions};

use crate::{ValidationConfig, TrainerError};

pub(crate) struct Validation<B: Backend> {
    folder: ModelFolder,
    out: PathBuf,
    config: ValidationConfig,
    images: Vec<ConditionImage>,
    /// `[frames, height, width]` of the training data.
    resolution: [usize; 3],
    max_sequence_length: usize,
    _backend: std::marker::PhantomData<B>,
}

impl<B: cogvx_model_core::ModelBackend> Validation<B> {
    /// Reads the conditioning images (I2V) so that a missing file fails before training.
    pub(crate) fn new(folder: ModelFolder, out: &Path, cache: &Cache, config: &ValidationConfig) -> Result<Self, TrainerError> {
        let mut images = Vec::new();
        if config.enabled() {
            for p in &config.images {
                images.push(ConditionImage::open(p).map_err(|e| TrainerError::Config(format!("`validation.images`: {}: {e}", p.display())))?);
            }
        }
        let [f, h, w] = cache.index.resolution;
        Ok(Validation {
            folder,
            out: out.to_path_buf(),
            config: config.clone(),
            images,
            resolution: [f as usize, h as usize, w as usize],
            max_sequence_length: cache.index.max_sequence_length,
            _backend: std::marker::PhantomData,
        })
    }

    /// Samples every prompt with `transformer` (the model being trained, without autodiff),
    /// writes `validation/step-<step>/<i>.mp4`, runs the validators and logs a `validation` event
    /// per video. Returns the videos written.
    pub(crate) fn run<'p>(
        &mut self,
        step: u64,
        transformer: CogVideoXTransformer3DModel<B>,
        scheduler: Option<&mut (dyn Plugin + 'p)>,
        validators: &mut [(String, &mut dyn Plugin)],
        metrics: &mut MetricsLog,
        device: &B::Device,
    ) -> Result<Vec<PathBuf>, TrainerError> {
        // T5 and the VAE are loaded for this validation and released after it: they are not
        // resident while the transformer trains (T5 alone is 19 GB in f32), as `cogvx plan`'s
        // training phase assumes.
        let prompt_encoder = PromptEncoder::load(&self.folder.root, device).map_err(cogvx_engine::EngineError::from)?;
        let (vae, vae_config) = AutoencoderKLCogVideoX::from_dir(&self.folder.component_dir("vae"), device)?;
        let pipe = CogVideoXPipeline::from_parts(self.folder.clone(), prompt_encoder, transformer, vae, vae_config)?;
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
        std::fs::create_dir_all(&dir).map_err(|e| TrainerError::Io { path: dir.clone(), message: e.to_string() })?;
        let t0 = std::time::Instant::now();
        let fps = c.fps.unwrap_or_else(|| pipe.default_fps());
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
                vae_options: VaeOptions::default(),
            };
            let plan = match scheduler.as_deref_mut() {
                Some(p) => plan_from_plugin(p, &pipe.folder, c.num_inference_steps)?,
                None => pipe.default_plan(c.num_inference_steps)?,
            };
            let mut noise = SeededNoise::new(c.seed);
            let frames = pipe.generate_with(&request, plan, None, &mut noise, &mut |_, _| {}, device)?;
            let clip = frames_to_u8(frames)?.remove(0);
            let path = dir.join(format!("{i}.mp4"));
            cogvx_video::encode_mp4(&path, &clip, fps, &cogvx_video::EncodeOptions::default())?;
            let mut fields = serde_json::Map::new();
            fields.insert("prompt".into(), prompt.clone().into());
            fields.insert("video".into(), path.display().to_string().into());
            for (name, plugin) in validators.iter_mut() {
                let request = ValidateRequest { prompt: prompt.clone(), frames: clip.clone(), fps };
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
                        tracing::info!("validation step {step}, video {i}: {name}.{} = {}", m.name, m.value);
                    }
                    fields.insert(format!("{name}.{}", m.name), serde_json::json!(m.value));
                }
            }
            metrics.log_event("validation", step, serde_json::Value::Object(fields))?;
            written.push(path);
        }
        tracing::info!("validation at step {step}: {} videos in {} ({:.1}s)", written.len(), dir.display(), t0.elapsed().as_secs_f64());
        Ok(written)
    }
}
