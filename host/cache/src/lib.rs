//! # cogvx-cache
//!
//! The latent / prompt cache behind `cogvx prepare` (and `train`, which prepares when stale).
//!
//! For each dataset sample, [`prepare`] rewrites the caption through the chain's prompt
//! rewriters, plans and decodes the clip through its video transforms, VAE-encodes it the way
//! the official CogVideoX finetune caches videos (one posterior sample `mean + std * noise`,
//! seeded per sample, times `scaling_factor`, with the VAE's tiling and slicing enabled) and
//! T5-encodes the caption (`max_sequence_length`, 226 for CogVideoX), storing:
//!
//! ```text
//! <cache>/index.json                   the samples of the last prepare -> entry keys
//! <cache>/latents/<key>.safetensors    `latent` [C, F, h, w] (scaled), I2V: `image` [3, H, W]
//! <cache>/prompts/<key>.safetensors    `prompt_embedding` [L, D]
//! ```
//!
//! Keys are content hashes ([`keys`]): editing a video, an image, a caption, a plugin's
//! params or version, the model, the resolution or the seed changes only the keys that depend
//! on it, so exactly those entries are recomputed. Every file is written atomically (temporary
//! file, fsync, rename) and carries its key and a checksum of its tensors, so a crash mid-write,
//! a truncated or corrupt file is detected and recomputed, never read as valid.
//!
//! **I2V.** The official I2V trainer caches the conditioning *image* (pixels in [-1, 1],
//! `[C, H, W]`), not its latent: at train time it adds noise in pixel space
//! (`sigma = exp(N(-3, 0.5))`), VAE-encodes the noisy image, samples and scales the latent.
//! A latent cached before that noise would change the math, so the cache stores the
//! preprocessed image (from `images.txt`, through the clip's crop scaled to the image and
//! resized to the frame size, or else the clip's first trained frame) and
//! [`noisy_image_latents`] does the train-time part.

pub mod keys;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_data::{layout::origin_location, read_layout, resolve_in_root, Chain, Problem};
use cogvx_plugin_api::{Frames, Resolution, Sample, Size, TransformPlan};
use cogvx_text::PromptEncoder;
use cogvx_vae::{AutoencoderKLCogVideoX, Tiling, VaeConfig, VaeOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use keys::{ModelIdentity, PluginId};
pub use store::HostTensor;

/// Index file name.
pub const INDEX: &str = "index.json";
/// Index format tag.
pub const INDEX_FORMAT: &str = "cogvx-cache-index/1";

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file could not be read or written.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An entry or index file is missing, truncated, corrupt or of the wrong shape.
    #[error("{path}: {message}", path = .path.display())]
    Entry { path: PathBuf, message: String },
    /// The dataset has problems (each with its file and line); nothing was prepared.
    #[error("the dataset has problems:\n{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Dataset(Vec<Problem>),
    /// Bad arguments (names what to change).
    #[error("{0}")]
    Input(String),
    /// Loading or running the VAE failed.
    #[error(transparent)]
    Vae(#[from] cogvx_vae::VaeError),
    /// Loading or running the text encoder failed.
    #[error(transparent)]
    Text(#[from] cogvx_text::TextError),
}

/// What [`prepare`] / [`plan`] need besides the dataset and model.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Target `frames x height x width` (frames `8N+1`, sides multiples of 16).
    pub resolution: Resolution,
    /// Base seed; each sample's seed derives from it and the sample's content.
    pub seed: u64,
    /// T5 `max_sequence_length` (226 for CogVideoX).
    pub max_sequence_length: usize,
    /// Image-to-video: also store the conditioning image.
    pub i2v: bool,
    /// VAE options; `None` = tiling (diffusers' defaults for the model) and slicing, as the
    /// official trainer encodes.
    pub vae_options: Option<VaeOptions>,
    /// The dtype T5 keeps its weights in (`None`: f32, diffusers' parity; `Some(BF16)` with
    /// mixed precision: half the memory). Part of the prompt keys.
    pub text_dtype: Option<burn::tensor::FloatDType>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl PrepareOptions {
    /// Defaults for a resolution: seed 42, 226 tokens, T2V, official VAE options, progress bar.
    pub fn new(resolution: Resolution) -> Self {
        PrepareOptions {
            resolution,
            seed: 42,
            max_sequence_length: cogvx_text::COGVIDEOX_MAX_SEQUENCE_LENGTH,
            i2v: false,
            vae_options: None,
            text_dtype: None,
            progress: true,
        }
    }
}

/// One sample as the cache plans it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IndexSample {
    /// `file:line` the sample came from (e.g. `videos.txt:3`).
    pub origin: String,
    /// The clip path, relative to the dataset root.
    pub video: String,
    /// The final caption (after the prompt rewriters).
    pub caption: String,
    /// The per-sample seed (crop randomness and the posterior sample).
    pub seed: u64,
    /// Key of `latents/<key>.safetensors`.
    pub latent: String,
    /// Key of `prompts/<key>.safetensors`.
    pub prompt: String,
    /// Whether the latent entry holds an `image` tensor (I2V).
    pub image: bool,
}

/// `index.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Index {
    pub format: String,
    pub model: ModelIdentity,
    pub transforms: Vec<PluginId>,
    /// `[frames, height, width]`.
    pub resolution: [u32; 3],
    pub seed: u64,
    pub max_sequence_length: usize,
    pub i2v: bool,
    pub samples: Vec<IndexSample>,
}

/// What [`plan`] found for one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedSample {
    pub sample: IndexSample,
    /// A valid latent entry exists.
    pub latent_ready: bool,
    /// A valid prompt entry exists.
    pub prompt_ready: bool,
}

/// What [`prepare`] would do, computed without decoding or encoding anything.
#[derive(Clone, Debug)]
pub struct Plan {
    pub index: Index,
    pub samples: Vec<PlannedSample>,
    /// Samples whose keys could not be computed (unreadable file, rewriter error).
    pub failed: Vec<Problem>,
    /// The index on disk equals the planned one.
    pub index_current: bool,
}

impl Plan {
    /// Latent entries to compute.
    pub fn latents_to_encode(&self) -> usize {
        self.distinct_pending(|s| (!s.latent_ready).then_some(s.sample.latent.as_str()))
    }
    /// Prompt entries to compute.
    pub fn prompts_to_encode(&self) -> usize {
        self.distinct_pending(|s| (!s.prompt_ready).then_some(s.sample.prompt.as_str()))
    }
    /// The number of distinct entry keys `pending` returns (samples may share an entry).
    fn distinct_pending<'a>(&'a self, pending: impl Fn(&'a PlannedSample) -> Option<&'a str>) -> usize {
        self.samples.iter().filter_map(pending).collect::<std::collections::BTreeSet<&str>>().len()
    }
    /// `prepare` has work to do (an entry to compute, or the index to rewrite).
    pub fn is_stale(&self) -> bool {
        !self.index_current
            || self
                .samples
                .iter()
                .any(|s| !s.latent_ready || !s.prompt_ready)
    }
}

/// What [`prepare`] did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Samples listed by the dataset.
    pub samples: usize,
    /// Latent entries computed / found valid and reused.
    pub encoded_latents: usize,
    pub reused_latents: usize,
    /// Prompt entries computed / found valid and reused.
    pub encoded_prompts: usize,
    pub reused_prompts: usize,
    /// Samples left out, with the reason (file and line).
    pub failed: Vec<Problem>,
    /// The index written.
    pub index: PathBuf,
}

fn latent_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("latents").join(format!("{key}.safetensors"))
}

fn prompt_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("prompts").join(format!("{key}.safetensors"))
}

/// The embeddings of `prompts` outside the dataset (the validation prompts and the empty
/// negative prompt), `[max_sequence_length, d_model]` each, in order: read from
/// `<cache>/prompts/` where a valid entry exists, else T5-encoded (the tokenizer and encoder
/// of `model_dir` loaded once, and released before this returns) and written there, keyed as
/// the training captions are (`text_dtype` as [`PrepareOptions::text_dtype`]). Training calls
/// this before it loads the transformer, so that validation samples without T5 resident.
pub fn prompt_embeddings<B: cogvx_model_core::ModelBackend>(
    cache: &Path,
    model_dir: &Path,
    prompts: &[String],
    max_sequence_length: usize,
    text_dtype: Option<burn::tensor::FloatDType>,
    device: &B::Device,
) -> Result<Vec<HostTensor>, CacheError> {
    let identity = ModelIdentity::of(model_dir)?;
    let dir = cache.join("prompts");
    std::fs::create_dir_all(&dir).map_err(|source| CacheError::Io { path: dir.clone(), source })?;
    let mut encoder: Option<PromptEncoder<B>> = None;
    let mut out = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let key = keys::prompt_key(prompt, &identity.text, max_sequence_length, text_dtype);
        let path = prompt_path(cache, &key);
        match validate_prompt(&path, &key) {
            Ok(e) if e.shape[0] == max_sequence_length => {
                out.push(e);
                continue;
            }
            _ if path.exists() => {
                tracing::warn!("{}: invalid prompt entry; encoding it again", path.display())
            }
            _ => {}
        }
        if encoder.is_none() {
            tracing::info!("loading the text encoder from {} for {} prompt(s)", model_dir.display(), prompts.len());
            encoder = Some(PromptEncoder::<B>::load_in(model_dir, text_dtype, device)?);
        }
        let enc = encoder.as_ref().expect("loaded above");
        let emb = enc.encode(&[prompt.as_str()], max_sequence_length, 1, device)?;
        let emb = to_host(emb.squeeze_dim::<2>(0))?;
        store::write_entry(&path, &key, &[("prompt_embedding", &emb)])?;
        out.push(emb);
    }
    Ok(out)
}

/// The dataset's samples: through the chain's reader plugin if it has one, else the built-in
/// `finetune-layout` reader. Any structural problem is an error.
fn list_samples(root: &Path, chain: &mut Chain<'_>) -> Result<Vec<Sample>, CacheError> {
    match chain.reader.as_mut() {
        Some(reader) => reader.list_samples(&root.to_string_lossy()).map_err(|e| {
            let name = reader.info().name;
            CacheError::Dataset(vec![Problem::new(
                root,
                None,
                format!("dataset reader `{name}`: {e}"),
            )])
        }),
        None => {
            let layout = read_layout(root);
            if layout.problems.is_empty() {
                Ok(layout.samples)
            } else {
                Err(CacheError::Dataset(layout.problems))
            }
        }
    }
}

fn transform_ids(chain: &Chain<'_>, params: &[String]) -> Result<Vec<PluginId>, CacheError> {
    if params.len() != chain.video_transforms.len() {
        return Err(CacheError::Input(format!(
            "{} params strings given for {} video-transform plugins; pass one (JSON, may be empty) per plugin, in chain order",
            params.len(),
            chain.video_transforms.len()
        )));
    }
    chain
        .video_transforms
        .iter()
        .zip(params)
        .map(|(p, j)| {
            let info = p.info();
            PluginId::new(&info.name, &info.version, j)
        })
        .collect()
}

fn check_resolution(r: Resolution) -> Result<(), CacheError> {
    if r.frames == 0
        || !(r.frames - 1).is_multiple_of(8)
        || r.height == 0
        || r.width == 0
        || !r.height.is_multiple_of(16)
        || !r.width.is_multiple_of(16)
    {
        return Err(CacheError::Input(format!(
            "resolution {}x{}x{}: frames must be 8N+1 and height/width positive multiples of 16",
            r.frames, r.height, r.width
        )));
    }
    Ok(())
}

fn vae_options_for(options: &PrepareOptions, config: &VaeConfig) -> VaeOptions {
    options.vae_options.unwrap_or(VaeOptions {
        tiling: Some(Tiling::for_config(config)),
        slicing: true,
    })
}

fn vae_options_string(options: &PrepareOptions, model_dir: &Path) -> Result<String, CacheError> {
    let config = VaeConfig::from_file(&model_dir.join("vae").join("config.json"))?;
    let o = vae_options_for(options, &config);
    Ok(format!("{:?}/{}", o.tiling, o.slicing))
}

/// Computes every sample's keys and checks which entries exist and are valid, without
/// decoding or encoding. `transform_params[i]` is the params JSON the chain's `i`-th video
/// transform was configured with.
pub fn plan(
    cache: &Path,
    data_root: &Path,
    model_dir: &Path,
    chain: &mut Chain<'_>,
    transform_params: &[String],
    options: &PrepareOptions,
) -> Result<Plan, CacheError> {
    check_resolution(options.resolution)?;
    let transforms = transform_ids(chain, transform_params)?;
    let model = ModelIdentity::of(model_dir)?;
    let vae_opts = vae_options_string(options, model_dir)?;
    let samples = list_samples(data_root, chain)?;
    let ctx = keys::LatentContext {
        transforms: &transforms,
        vae: &model.vae,
        vae_options: &vae_opts,
        resolution: options.resolution,
        seed: options.seed,
        i2v: options.i2v,
    };
    let mut planned = Vec::new();
    let mut failed = Vec::new();
    for sample in &samples {
        let (file, line) = origin_location(data_root, sample);
        let keyed = (|| -> Result<IndexSample, String> {
            let caption = chain
                .rewrite_prompt(&sample.caption)?
                .replace(['\n', '\r'], " ");
            if caption.trim().is_empty() {
                return Err("the prompt rewriters left an empty caption".into());
            }
            let video = resolve_in_root(data_root, &sample.video)?;
            let video_sha = keys::file_sha256(&video).map_err(|e| e.to_string())?;
            let image_sha = match (&sample.image, options.i2v) {
                (Some(rel), true) => {
                    let p = resolve_in_root(data_root, rel)?;
                    Some(keys::file_sha256(&p).map_err(|e| e.to_string())?)
                }
                _ => None,
            };
            Ok(IndexSample {
                origin: sample.origin.clone(),
                video: sample.video.clone(),
                seed: keys::sample_seed(options.seed, &video_sha, sample.frames),
                latent: keys::latent_key(&ctx, &video_sha, image_sha.as_deref(), sample.frames),
                prompt: keys::prompt_key(&caption, &model.text, options.max_sequence_length, options.text_dtype),
                caption,
                image: options.i2v,
            })
        })();
        match keyed {
            Ok(s) => {
                let latent_ready =
                    validate_latent(&latent_path(cache, &s.latent), &s.latent, s.image).is_ok();
                let prompt_ready =
                    validate_prompt(&prompt_path(cache, &s.prompt), &s.prompt).is_ok();
                planned.push(PlannedSample {
                    sample: s,
                    latent_ready,
                    prompt_ready,
                });
            }
            Err(m) => failed.push(Problem::new(file, line, m)),
        }
    }
    let r = options.resolution;
    let index = Index {
        format: INDEX_FORMAT.into(),
        model,
        transforms,
        resolution: [r.frames, r.height, r.width],
        seed: options.seed,
        max_sequence_length: options.max_sequence_length,
        i2v: options.i2v,
        samples: planned.iter().map(|p| p.sample.clone()).collect(),
    };
    let index_current = read_index(cache).map(|i| i == index).unwrap_or(false);
    Ok(Plan {
        index,
        samples: planned,
        failed,
        index_current,
    })
}

/// Deterministic standard-normal noise: SplitMix64 uniforms through Box-Muller.
pub fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // u1 in (0, 1], u2 in [0, 1)
        let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Frames (RGB8, `[F, H, W, 3]`) as the VAE's input `[1, 3, F, H, W]` in [-1, 1]
/// (`x / 255 * 2 - 1`, as the official dataset's transform).
pub fn frames_to_video<B: Backend>(frames: &Frames, device: &B::Device) -> Tensor<B, 5> {
    let (f, h, w) = (
        frames.count as usize,
        frames.height as usize,
        frames.width as usize,
    );
    let data: Vec<f32> = frames
        .rgb
        .iter()
        .map(|&v| v as f32 / 255.0 * 2.0 - 1.0)
        .collect();
    Tensor::<B, 4>::from_data(TensorData::new(data, [f, h, w, 3]), device)
        .permute([3, 0, 1, 2])
        .unsqueeze_dim(0)
}

/// The cached latent of a video: `scaling_factor * (mean + std * noise)`, the noise
/// [`gaussian_noise`]`(seed)`. Returns `[C, F, h, w]`.
pub fn encode_latent<B: Backend>(
    vae: &AutoencoderKLCogVideoX<B>,
    video: Tensor<B, 5>,
    seed: u64,
    options: &VaeOptions,
) -> Result<HostTensor, CacheError> {
    let dist = vae.encode(video, options)?;
    let dims = dist.mean.dims();
    let n = dims.iter().product();
    let noise = Tensor::<B, 1>::from_data(
        TensorData::new(gaussian_noise(seed, n), [n]),
        &dist.mean.device(),
    )
    .reshape(dims);
    let z = vae.scale_latents(dist.sample_with(noise));
    to_host(z.squeeze_dim::<4>(0))
}

fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<HostTensor, CacheError> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| CacheError::Input(format!("cannot read a tensor back to the host: {e:?}")))?;
    Ok(HostTensor::new(shape, data))
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
) -> Result<Tensor<B, 5>, CacheError> {
    let [b, c, h, w] = images.dims();
    if noise.dims() != [b, c, h, w] || log_sigma.dims() != [b] {
        return Err(CacheError::Input(format!(
            "noisy_image_latents: images {:?}, noise {:?}, log_sigma {:?}; expected noise of the images' shape and one sigma per image",
            images.dims(),
            noise.dims(),
            log_sigma.dims()
        )));
    }
    let sigma = log_sigma.exp().reshape([b, 1, 1, 1]);
    let noisy = (images + noise * sigma).unsqueeze_dim::<5>(2);
    let mut dist = vae.encode(noisy.clone(), options)?;
    let want = [h / vae.spatial_scale, w / vae.spatial_scale];
    if options.tiling.is_some() && dist.mean.dims()[3..] != want {
        // As in `prepare`: a tiled encode of frames barely larger than a tile (tiny models) keeps
        // too many rows; encode the image whole.
        let whole = VaeOptions { tiling: None, ..*options };
        dist = vae.encode(noisy, &whole)?;
    }
    let eps = sample_noise(dist.mean.dims());
    Ok(vae.scale_latents(dist.sample_with(eps)))
}

/// The conditioning image `[3, H, W]` in [-1, 1] of an I2V sample: the listed image (the
/// clip's crop scaled to the image's size, resized to the frame size with the plan's filter),
/// else the first frame of the preprocessed clip.
fn conditioning_image(
    image: Option<&Path>,
    pre: &cogvx_video::Preprocessed,
) -> Result<HostTensor, String> {
    let frames = &pre.frames;
    let (w, h) = (frames.width as usize, frames.height as usize);
    let rgb: Vec<u8> = match image {
        None => frames.rgb[..w * h * 3].to_vec(),
        Some(path) => {
            let mut reader = cogvx_video::VideoReader::open(path).map_err(|e| e.to_string())?;
            let info = reader.info().clone();
            let crop = pre.plan.crop.map(|c| {
                let sx = info.width as f64 / pre.clip.width as f64;
                let sy = info.height as f64 / pre.clip.height as f64;
                let x = ((c.x as f64 * sx).round() as u32).min(info.width - 1);
                let y = ((c.y as f64 * sy).round() as u32).min(info.height - 1);
                cogvx_plugin_api::CropBox {
                    x,
                    y,
                    width: ((c.width as f64 * sx).round() as u32).clamp(1, info.width - x),
                    height: ((c.height as f64 * sy).round() as u32).clamp(1, info.height - y),
                }
            });
            let plan = TransformPlan {
                frames: vec![0],
                crop,
                resize: Some(Size {
                    width: frames.width,
                    height: frames.height,
                }),
                filter: pre.plan.filter,
            };
            let got = reader.read(&plan).map_err(|e| e.to_string())?;
            if got.count < 1 || (got.width, got.height) != (frames.width, frames.height) {
                return Err(format!(
                    "{}: image decoded to {}x{}, expected {w}x{h}",
                    path.display(),
                    got.width,
                    got.height
                ));
            }
            got.rgb[..w * h * 3].to_vec()
        }
    };
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            data[ch * h * w + i] = px[ch] as f32 / 255.0 * 2.0 - 1.0;
        }
    }
    Ok(HostTensor::new(vec![3, h, w], data))
}

struct VaeEncoder<B: Backend> {
    vae: AutoencoderKLCogVideoX<B>,
    vae_options: VaeOptions,
}

/// Prepares the cache: plans (see [`plan`]), computes every missing or invalid entry, then
/// writes the index (only samples whose entries all exist). It runs in two passes, one model
/// each: every latent with the VAE, which is then released, then every prompt with T5; each
/// model is loaded only if something must be computed with it. A sample that fails (unreadable clip, wrong frame count after
/// the chain, plugin error) is reported in [`Summary::failed`] and left out of the index.
pub fn prepare<B: cogvx_model_core::ModelBackend>(
    cache: &Path,
    data_root: &Path,
    model_dir: &Path,
    chain: &mut Chain<'_>,
    transform_params: &[String],
    options: &PrepareOptions,
    device: &B::Device,
) -> Result<Summary, CacheError> {
    prepare_on::<B, B>(cache, data_root, model_dir, chain, transform_params, options, device, device)
}

/// [`prepare`] with the prompts pass on its own backend `T` (on the CPU, a bf16 T5 needs burn's
/// flex backend while the VAE runs on ndarray).
#[allow(clippy::too_many_arguments)]
pub fn prepare_on<B: cogvx_model_core::ModelBackend, T: cogvx_model_core::ModelBackend>(
    cache: &Path,
    data_root: &Path,
    model_dir: &Path,
    chain: &mut Chain<'_>,
    transform_params: &[String],
    options: &PrepareOptions,
    device: &B::Device,
    text_device: &T::Device,
) -> Result<Summary, CacheError> {
    let planned = plan(
        cache,
        data_root,
        model_dir,
        chain,
        transform_params,
        options,
    )?;
    for d in [
        cache.to_path_buf(),
        cache.join("latents"),
        cache.join("prompts"),
    ] {
        std::fs::create_dir_all(&d).map_err(|source| CacheError::Io {
            path: d.clone(),
            source,
        })?;
    }
    let mut summary = Summary {
        samples: planned.samples.len() + planned.failed.len(),
        failed: planned.failed.clone(),
        index: cache.join(INDEX),
        ..Default::default()
    };
    let samples = list_samples(data_root, chain)?;
    let by_origin: BTreeMap<&str, &Sample> =
        samples.iter().map(|s| (s.origin.as_str(), s)).collect();
    // Two passes, one model each: every latent with the VAE, which is then released, then
    // every prompt with T5. The two are never resident together (T5 alone is 19 GB in f32).
    let mut vae_encoder: Option<VaeEncoder<B>> = None;
    let mut text_encoder: Option<PromptEncoder<T>> = None;
    let load_vae = |enc: &mut Option<VaeEncoder<B>>| -> Result<(), CacheError> {
        if enc.is_none() {
            tracing::info!("loading the VAE from {}", model_dir.display());
            let (vae, config) = AutoencoderKLCogVideoX::<B>::from_dir(&model_dir.join("vae"), device)?;
            *enc = Some(VaeEncoder { vae_options: vae_options_for(options, &config), vae });
        }
        Ok(())
    };
    let load_text = |enc: &mut Option<PromptEncoder<T>>| -> Result<(), CacheError> {
        if enc.is_none() {
            tracing::info!("loading the text encoder from {}", model_dir.display());
            *enc = Some(PromptEncoder::<T>::load_in(model_dir, options.text_dtype, text_device)?);
        }
        Ok(())
    };
    // One tick per sample and pass.
    let ticks = 2 * planned.samples.len() as u64;
    let bar = if options.progress {
        ProgressBar::new(ticks)
    } else {
        ProgressBar::with_draw_target(Some(ticks), ProgressDrawTarget::hidden())
    };
    cogvx_metrics::console::track(&bar);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} prepare [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut done_latents = std::collections::BTreeSet::new();
    let mut done_prompts = std::collections::BTreeSet::new();
    let mut kept = Vec::new();
    let (_, mut transforms) = chain.stages();
    let mut latent_ok = std::collections::BTreeSet::new();
    for latents_pass in [true, false] {
    if !latents_pass {
        vae_encoder = None;
    }
    for p in &planned.samples {
        let s = &p.sample;
        if !latents_pass && !latent_ok.contains(&s.origin) {
            continue;
        }
        bar.set_message(s.video.clone());
        let sample = by_origin.get(s.origin.as_str()).copied();
        let (file, line) = match sample {
            Some(smp) => origin_location(data_root, smp),
            None => (data_root.to_path_buf(), None),
        };
        let result = (|| -> Result<(), String> {
            let sample = sample.ok_or_else(|| {
                format!(
                    "sample {} vanished from the dataset while preparing",
                    s.origin
                )
            })?;
            // Latent (first pass only).
            if !latents_pass {
                // The prompt pass: this sample's latent is ready.
            } else if p.latent_ready || done_latents.contains(&s.latent) {
                if !done_latents.contains(&s.latent) {
                    summary.reused_latents += 1;
                    done_latents.insert(s.latent.clone());
                }
            } else {
                let started = std::time::Instant::now();
                let video = resolve_in_root(data_root, &sample.video)?;
                let pre = cogvx_video::preprocess_clip(
                    &video,
                    sample.frames,
                    &mut transforms,
                    options.resolution,
                    s.seed,
                )
                .map_err(|e| e.to_string())?;
                let r = options.resolution;
                let f = &pre.frames;
                if (f.count, f.height, f.width) != (r.frames, r.height, r.width) {
                    return Err(format!(
                        "{}: the chain gives {}x{}x{} (frames x height x width), the resolution is {}x{}x{}; \
                         add or configure frame selection / crop_resize so that clips match it",
                        video.display(),
                        f.count,
                        f.height,
                        f.width,
                        r.frames,
                        r.height,
                        r.width
                    ));
                }
                load_vae(&mut vae_encoder).map_err(|e| e.to_string())?;
                let enc = vae_encoder.as_ref().expect("loaded");
                let x = frames_to_video::<B>(&pre.frames, device);
                let latent = encode_latent(&enc.vae, x.clone(), s.seed, &enc.vae_options)
                    .map_err(|e| e.to_string())?;
                let want = [
                    (r.frames as usize - 1) / 4 + 1,
                    r.height as usize / 8,
                    r.width as usize / 8,
                ];
                let latent = if enc.vae_options.tiling.is_some() && latent.shape[1..] != want {
                    // diffusers' tiled encode keeps `tile_latent_stride` rows per tile without
                    // cropping the total: for frames not much larger than a tile (tiny test
                    // models) that is more than H/8 rows. Such a latent is unusable; encode whole.
                    tracing::warn!(
                        "tiled VAE encode gives latent {:?} for {}x{} frames; encoding without tiling",
                        latent.shape,
                        r.height,
                        r.width
                    );
                    let whole = VaeOptions {
                        tiling: None,
                        ..enc.vae_options
                    };
                    encode_latent(&enc.vae, x, s.seed, &whole).map_err(|e| e.to_string())?
                } else {
                    latent
                };
                let image = if options.i2v {
                    let img_path = match &sample.image {
                        Some(rel) => Some(resolve_in_root(data_root, rel)?),
                        None => None,
                    };
                    Some(conditioning_image(img_path.as_deref(), &pre)?)
                } else {
                    None
                };
                let mut tensors = vec![("latent", &latent)];
                if let Some(i) = &image {
                    tensors.push(("image", i));
                }
                store::write_entry(&latent_path(cache, &s.latent), &s.latent, &tensors)
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    "{} -> latent {:?} ({:.2} s)",
                    video.display(),
                    latent.shape,
                    started.elapsed().as_secs_f64()
                );
                summary.encoded_latents += 1;
                done_latents.insert(s.latent.clone());
            }
            // Prompt (second pass only).
            if latents_pass {
                // The latent pass: prompts come after the VAE is released.
            } else if p.prompt_ready || done_prompts.contains(&s.prompt) {
                if !done_prompts.contains(&s.prompt) {
                    summary.reused_prompts += 1;
                    done_prompts.insert(s.prompt.clone());
                }
            } else {
                load_text(&mut text_encoder).map_err(|e| e.to_string())?;
                let enc = text_encoder.as_ref().expect("loaded");
                let emb = enc
                    .encode(
                        &[s.caption.as_str()],
                        options.max_sequence_length,
                        1,
                        text_device,
                    )
                    .map_err(|e| e.to_string())?;
                let emb = to_host(emb.squeeze_dim::<2>(0)).map_err(|e| e.to_string())?;
                store::write_entry(
                    &prompt_path(cache, &s.prompt),
                    &s.prompt,
                    &[("prompt_embedding", &emb)],
                )
                .map_err(|e| e.to_string())?;
                tracing::debug!("prompt {} -> {:?}", cogvx_plugin_api::text::display_safe(&s.caption, 200), emb.shape);
                summary.encoded_prompts += 1;
                done_prompts.insert(s.prompt.clone());
            }
            Ok(())
        })();
        match result {
            Ok(()) if latents_pass => {
                latent_ok.insert(s.origin.clone());
            }
            Ok(()) => kept.push(s.clone()),
            Err(m) => {
                tracing::error!(
                    "{}{}: {m}",
                    file.display(),
                    line.map(|l| format!(":{l}")).unwrap_or_default()
                );
                summary.failed.push(Problem::new(file, line, m));
            }
        }
        bar.inc(1);
    }
    }
    bar.finish_and_clear();
    let mut index = planned.index;
    index.samples = kept;
    let json = serde_json::to_vec_pretty(&index)
        .map_err(|e| CacheError::Input(format!("cannot serialize the index: {e}")))?;
    store::write_atomically(&summary.index, &json)?;
    tracing::info!(
        "prepare: {} samples, latents {} encoded / {} reused, prompts {} encoded / {} reused, {} failed",
        summary.samples,
        summary.encoded_latents,
        summary.reused_latents,
        summary.encoded_prompts,
        summary.reused_prompts,
        summary.failed.len()
    );
    Ok(summary)
}

/// Reads `<cache>/index.json`.
pub fn read_index(cache: &Path) -> Result<Index, CacheError> {
    let path = cache.join(INDEX);
    let bytes = std::fs::read(&path).map_err(|source| CacheError::Io {
        path: path.clone(),
        source,
    })?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| CacheError::Entry {
        path: path.clone(),
        message: format!("not a cache index: {e}; run `cogvx prepare` again"),
    })?;
    if index.format != INDEX_FORMAT {
        return Err(CacheError::Entry {
            path,
            message: format!(
                "index format {:?}, this build reads {INDEX_FORMAT:?}; run `cogvx prepare` again",
                index.format
            ),
        });
    }
    Ok(index)
}

fn validate_latent(
    path: &Path,
    key: &str,
    image: bool,
) -> Result<BTreeMap<String, HostTensor>, CacheError> {
    let t = store::read_entry(path, key)?;
    let bad = |m: String| CacheError::Entry {
        path: path.to_path_buf(),
        message: m,
    };
    match t.get("latent") {
        Some(l) if l.shape.len() == 4 => {}
        Some(l) => {
            return Err(bad(format!(
                "tensor `latent` has shape {:?}, expected [C, F, h, w]",
                l.shape
            )))
        }
        None => return Err(bad("no tensor `latent`".into())),
    }
    if image {
        match t.get("image") {
            Some(i) if i.shape.len() == 3 && i.shape[0] == 3 => {}
            Some(i) => {
                return Err(bad(format!(
                    "tensor `image` has shape {:?}, expected [3, H, W]",
                    i.shape
                )))
            }
            None => {
                return Err(bad(
                    "no tensor `image` (an I2V entry needs the conditioning image)".into(),
                ))
            }
        }
    }
    Ok(t)
}

fn validate_prompt(path: &Path, key: &str) -> Result<HostTensor, CacheError> {
    let mut t = store::read_entry(path, key)?;
    match t.remove("prompt_embedding") {
        Some(p) if p.shape.len() == 2 => Ok(p),
        Some(p) => Err(CacheError::Entry {
            path: path.to_path_buf(),
            message: format!(
                "tensor `prompt_embedding` has shape {:?}, expected [L, D]",
                p.shape
            ),
        }),
        None => Err(CacheError::Entry {
            path: path.to_path_buf(),
            message: "no tensor `prompt_embedding`".into(),
        }),
    }
}

/// One cached training sample.
#[derive(Clone, Debug)]
pub struct Entry {
    pub sample: IndexSample,
    /// Scaled latent `[C, F, h, w]`.
    pub latent: HostTensor,
    /// Prompt embedding `[L, D]`.
    pub prompt_embedding: HostTensor,
    /// I2V: the conditioning image `[3, H, W]` in [-1, 1].
    pub image: Option<HostTensor>,
}

/// A prepared cache, for the trainer.
#[derive(Clone, Debug)]
pub struct Cache {
    pub dir: PathBuf,
    pub index: Index,
}

impl Cache {
    /// Opens `<dir>/index.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CacheError> {
        let dir = dir.as_ref().to_path_buf();
        let index = read_index(&dir)?;
        Ok(Cache { dir, index })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.index.samples.len()
    }

    /// No samples.
    pub fn is_empty(&self) -> bool {
        self.index.samples.is_empty()
    }

    /// Loads and validates sample `i`: checksums, dtype, ranks, the latent's frame count and
    /// size against the index resolution and the VAE's 4x/8x compression, the prompt length,
    /// and the image size. Errors name the file.
    pub fn get(&self, i: usize) -> Result<Entry, CacheError> {
        let s = self.index.samples.get(i).ok_or_else(|| {
            CacheError::Input(format!(
                "sample {i} out of range: the cache has {} samples",
                self.len()
            ))
        })?;
        let lp = latent_path(&self.dir, &s.latent);
        let mut t = validate_latent(&lp, &s.latent, s.image)?;
        let latent = t.remove("latent").expect("validated");
        let [f, h, w] = self.index.resolution;
        let want = [(f as usize - 1) / 4 + 1, h as usize / 8, w as usize / 8];
        if latent.shape[1..] != want {
            return Err(CacheError::Entry {
                path: lp,
                message: format!(
                    "latent shape {:?} does not fit the resolution {f}x{h}x{w} (expected [C, {}, {}, {}]); run `cogvx prepare` again",
                    latent.shape, want[0], want[1], want[2]
                ),
            });
        }
        let image = t.remove("image");
        if let Some(img) = &image {
            if img.shape[1..] != [h as usize, w as usize] {
                return Err(CacheError::Entry {
                    path: lp,
                    message: format!("image shape {:?}, expected [3, {h}, {w}]", img.shape),
                });
            }
        }
        let pp = prompt_path(&self.dir, &s.prompt);
        let prompt_embedding = validate_prompt(&pp, &s.prompt)?;
        if prompt_embedding.shape[0] != self.index.max_sequence_length {
            return Err(CacheError::Entry {
                path: pp,
                message: format!(
                    "prompt embedding has {} tokens, the index says {}",
                    prompt_embedding.shape[0], self.index.max_sequence_length
                ),
            });
        }
        Ok(Entry {
            sample: s.clone(),
            latent,
            prompt_embedding,
            image,
        })
    }

    /// Removes entry files the index does not reference and temporary files left by an
    /// interrupted write; returns the paths removed. The cache holds one index: entries of
    /// another configuration prepared into the same folder are removed too.
    pub fn prune(&self) -> Result<Vec<PathBuf>, CacheError> {
        let mut keep = std::collections::BTreeSet::new();
        for s in &self.index.samples {
            keep.insert(latent_path(&self.dir, &s.latent));
            keep.insert(prompt_path(&self.dir, &s.prompt));
        }
        let mut removed = Vec::new();
        for sub in ["latents", "prompts"] {
            let d = self.dir.join(sub);
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CacheError::Io { path: d, source }),
            };
            for e in rd.filter_map(|e| e.ok()) {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = name.ends_with(".safetensors") || name.contains(".tmp-");
                if p.is_file() && ours && !keep.contains(&p) {
                    std::fs::remove_file(&p).map_err(|source| CacheError::Io {
                        path: p.clone(),
                        source,
                    })?;
                    removed.push(p);
                }
            }
        }
        Ok(removed)
    }

    /// All samples in index order, each loaded and validated on demand.
    pub fn entries(&self) -> impl Iterator<Item = Result<Entry, CacheError>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_noise_is_seeded_and_standard() {
        let a = gaussian_noise(3, 20001);
        assert_eq!(a.len(), 20001);
        assert_eq!(a, gaussian_noise(3, 20001));
        assert_ne!(a[..10], gaussian_noise(4, 10)[..]);
        assert_eq!(
            a[..10],
            gaussian_noise(3, 10)[..],
            "a prefix does not depend on the length"
        );
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }

    #[test]
    fn entries_are_validated_and_named_in_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        let t = HostTensor::new(vec![2, 3], (0..6).map(|v| v as f32).collect());
        store::write_entry(&p, "k1", &[("prompt_embedding", &t)]).unwrap();
        assert_eq!(validate_prompt(&p, "k1").unwrap(), t);
        // Wrong key (a file moved or copied under another name).
        let e = validate_prompt(&p, "k2").unwrap_err().to_string();
        assert!(
            e.contains("x.safetensors") && e.contains("does not match"),
            "{e}"
        );
        // Wrong rank.
        let bad = HostTensor::new(vec![6], t.data.clone());
        store::write_entry(&p, "k1", &[("prompt_embedding", &bad)]).unwrap();
        assert!(validate_prompt(&p, "k1")
            .unwrap_err()
            .to_string()
            .contains("expected [L, D]"));
        // A latent entry without its I2V image.
        let l = HostTensor::new(vec![1, 1, 1, 1], vec![0.5]);
        store::write_entry(&p, "k3", &[("latent", &l)]).unwrap();
        assert!(validate_latent(&p, "k3", false).is_ok());
        assert!(validate_latent(&p, "k3", true)
            .unwrap_err()
            .to_string()
            .contains("no tensor `image`"));
        // Not a safetensors file at all; a missing file.
        std::fs::write(&p, b"garbage").unwrap();
        assert!(validate_latent(&p, "k3", false)
            .unwrap_err()
            .to_string()
            .contains("not a valid safetensors file"));
        assert!(validate_latent(&d.path().join("nope"), "k", false).is_err());
    }

    #[test]
    fn resolutions_are_checked() {
        assert!(check_resolution(Resolution {
            frames: 9,
            height: 64,
            width: 96
        })
        .is_ok());
        for r in [(10, 64, 96), (9, 60, 96), (9, 64, 0), (0, 64, 96)] {
            let e = check_resolution(Resolution {
                frames: r.0,
                height: r.1,
                width: r.2,
            })
            .unwrap_err();
            assert!(e.to_string().contains("8N+1"), "{e}");
        }
    }
}
