//! Writing sampled videos, and the whole `cogvx sample` job: check every input, load the
//! pipeline, optionally apply a LoRA, generate, write `.mp4` files.

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor};
use cogvx_plugin_api::{Frames, Plugin};
use cogvx_transformer::CogVideoXTransformer3DModel;
use cogvx_vae::VaeConfig;
use cogvx_video::EncodeOptions;

use crate::image::ConditionImage;
use crate::lora::apply_lora;
use crate::model::ModelFolder;
use crate::pipeline::{
    check_conditioning, check_request, CogVideoXPipeline, SampleRequest, SeededNoise,
};
use crate::EngineError;

/// The pipeline's frames `[B, T, 3, H, W]` in [0, 1] as one packed RGB8 clip per video:
/// `(x * 255).round()` (ties to even, as NumPy) as diffusers' `numpy_to_pil` /
/// `export_to_video`, values clamped to [0, 1] first.
pub fn frames_to_u8<B: Backend>(frames: Tensor<B, 5>) -> Result<Vec<Frames>, EngineError> {
    let [b, t, c, h, w] = frames.dims();
    if c != 3 || b == 0 || t == 0 || h == 0 || w == 0 {
        return Err(EngineError::Input(format!(
            "frames have shape {:?}; expected [batch, frames, 3, height, width]",
            frames.dims()
        )));
    }
    let hwc = frames.permute([0, 1, 3, 4, 2]); // [B, T, H, W, 3]
    let values = hwc
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| EngineError::Input(format!("cannot read the frames back: {e:?}")))?;
    let per_video = t * h * w * 3;
    Ok(values
        .chunks_exact(per_video)
        .map(|v| Frames {
            width: w as u32,
            height: h as u32,
            count: t as u32,
            rgb: v
                .iter()
                .map(|&x| (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
                .collect(),
        })
        .collect())
}

/// Where video `i` of `n` goes: `out` itself for a single video, else `<stem>-<i>.<ext>` next
/// to it.
pub fn video_path(out: &Path, i: usize, n: usize) -> PathBuf {
    if n <= 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "video".into());
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mp4".into());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

/// Writes the pipeline's frames `[B, T, 3, H, W]` in [0, 1] as H.264 `.mp4` files
/// ([`cogvx_video::encode_mp4`], atomic) at `fps`: one video to `out`, several to
/// [`video_path`]s. Returns the paths written.
pub fn write_videos<B: Backend>(
    frames: Tensor<B, 5>,
    out: &Path,
    fps: f64,
    options: &EncodeOptions,
) -> Result<Vec<PathBuf>, EngineError> {
    let clips = frames_to_u8(frames)?;
    let n = clips.len();
    let mut paths = Vec::with_capacity(n);
    for (i, clip) in clips.iter().enumerate() {
        let path = video_path(out, i, n);
        cogvx_video::encode_mp4(&path, clip, fps, options)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Checks that `out` can be written as an `.mp4`: the extension, an existing folder, and a
/// probe file created and removed there.
pub fn check_output(out: &Path) -> Result<(), EngineError> {
    let bad = |message: String| EngineError::Input(format!("{}: {message}", out.display()));
    let is_mp4 = out
        .extension()
        .map(|e| e.eq_ignore_ascii_case("mp4"))
        .unwrap_or(false);
    if !is_mp4 {
        return Err(bad("the output must be an .mp4 file".into()));
    }
    if out.is_dir() {
        return Err(bad("is a folder; give a file name ending in .mp4".into()));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(bad(format!(
            "the folder {} does not exist; create it first",
            dir.display()
        )));
    }
    let probe = dir.join(format!(".cogvx-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| bad(format!("cannot write in {} ({e})", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// One `cogvx sample` run.
#[derive(Clone, Debug)]
pub struct SampleJob {
    /// The diffusers model folder.
    pub model: PathBuf,
    /// A diffusers LoRA file (`pytorch_lora_weights.safetensors`) to apply.
    pub lora: Option<PathBuf>,
    /// Multiplies the LoRA's `alpha / r` (diffusers' adapter weight); 1.0 is the trained strength.
    pub lora_strength: f64,
    /// The conditioning image (image file or video, first frame) for image-to-video models,
    /// used for every prompt. Required exactly for I2V folders.
    pub image: Option<PathBuf>,
    /// Prompts, sizes, steps, guidance, seed. Its `images` must be empty (they come from
    /// `image`).
    pub request: SampleRequest,
    /// The `.mp4` to write (several prompts: `<stem>-<i>.mp4`).
    pub out: PathBuf,
    /// Frames per second; `None`: [`CogVideoXPipeline::default_fps`] (8, or 16 for 1.5).
    pub fps: Option<f64>,
    pub encode: EncodeOptions,
}

impl SampleJob {
    /// A job with the pipeline defaults, no LoRA, no image.
    pub fn new(
        model: impl Into<PathBuf>,
        prompt: impl Into<String>,
        out: impl Into<PathBuf>,
    ) -> Self {
        SampleJob {
            model: model.into(),
            lora: None,
            lora_strength: 1.0,
            image: None,
            request: SampleRequest {
                prompts: vec![prompt.into()],
                ..Default::default()
            },
            out: out.into(),
            fps: None,
            encode: EncodeOptions::default(),
        }
    }
}

/// Runs a [`SampleJob`]: checks the output path, the model folder and its kind against the
/// image, the sizes, the image and the LoRA file before loading any weight; then loads the
/// model, applies the LoRA, samples with `scheduler`'s plan (`None`: the folder's scheduler)
/// and [`SeededNoise`] from the request's seed, reports `on_step(i, n)`, and writes the
/// video(s). Returns the paths written.
pub fn sample<B: cogvx_model_core::ModelBackend>(
    job: &SampleJob,
    scheduler: Option<&mut dyn Plugin>,
    on_step: &mut dyn FnMut(usize, usize),
    device: &B::Device,
) -> Result<Vec<PathBuf>, EngineError> {
    check_output(&job.out)?;
    if !job.request.images.is_empty() {
        return Err(EngineError::Input(
            "SampleJob: give the conditioning image as `image`, not in `request.images`".into(),
        ));
    }
    if let Some(fps) = job.fps {
        if !(fps.is_finite() && fps > 0.0) {
            return Err(EngineError::Input(format!(
                "fps {fps} must be a positive number"
            )));
        }
    }
    let folder = ModelFolder::open(&job.model)?;
    let vae_config_path = folder.component_dir("vae").join("config.json");
    let vae_config = VaeConfig::from_file(&vae_config_path)?;
    let spatial = 1usize << vae_config.block_out_channels.len().saturating_sub(1);
    let mut request = job.request.clone();
    let num_prompts = request.prompts.len();
    check_conditioning(
        &folder,
        if job.image.is_some() { num_prompts } else { 0 },
        num_prompts,
    )?;
    if let Some(path) = &job.image {
        let image = ConditionImage::open(path)?;
        request.images = vec![image; num_prompts];
    }
    check_request(&folder, spatial, &request)?;
    let lora = match &job.lora {
        Some(path) => Some((cogvx_adapters::load_lora_any(path)?, path)),
        None => None,
    };

    let mut transformer =
        CogVideoXTransformer3DModel::<B>::from_dir(&folder.component_dir("transformer"), device)?;
    if let Some((lora, path)) = &lora {
        let names = apply_lora(&mut transformer, lora, path, job.lora_strength, device)?;
        tracing::info!("{}: LoRA on {} layers", path.display(), names.len());
    }
    let pipe = CogVideoXPipeline::load_with_transformer(folder, transformer, device)?;
    let plan = pipe.plan_with(scheduler, request.num_inference_steps)?;
    let mut noise = SeededNoise::new(request.seed);
    let frames = pipe.generate_with(&request, plan, None, &mut noise, on_step, device)?;
    let fps = job.fps.unwrap_or_else(|| pipe.default_fps());
    write_videos(frames, &job.out, fps, &job.encode)
}
