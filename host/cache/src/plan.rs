//! Planning: what `prepare` would compute, from the dataset listing and the keys alone,
//! without decoding or encoding anything.

use std::path::Path;

use cogvx_data::{layout::origin_location, read_layout, resolve_in_root, Chain, Problem};
use cogvx_plugin_api::{Resolution, Sample};
use cogvx_vae::{Tiling, VaeConfig, VaeOptions};

use crate::read::*;
use crate::*;

/// What [`prepare`] / [`plan`] need besides the dataset and model.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Target `frames x height x width` (frames `8N+1`, sides multiples of 16); with
    /// `buckets`, the largest bucket.
    pub resolution: Resolution,
    /// `[data] buckets` (or an upscale limit): each clip at its bucket, part of its latent key.
    /// Set with [`PrepareOptions::with_buckets`]; `None`: every clip at `resolution`.
    pub buckets: Option<cogvx_data::Buckets>,
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
            buckets: None,
        }
    }

    /// Places each clip in its bucket of `buckets` (nothing changes for a single resolution
    /// without an upscale limit); `resolution` becomes the largest bucket.
    pub fn with_buckets(mut self, buckets: cogvx_data::Buckets) -> Self {
        self.resolution = buckets.largest();
        self.buckets = buckets.needs_assignment().then_some(buckets);
        self
    }
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
    fn distinct_pending<'a>(
        &'a self,
        pending: impl Fn(&'a PlannedSample) -> Option<&'a str>,
    ) -> usize {
        self.samples
            .iter()
            .filter_map(pending)
            .collect::<std::collections::BTreeSet<&str>>()
            .len()
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

/// The dataset's samples: through the chain's reader plugin if it has one, else the built-in
/// `finetune-layout` reader. Any structural problem is an error.
pub(crate) fn list_samples(root: &Path, chain: &mut Chain<'_>) -> Result<Vec<Sample>, CacheError> {
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
            let layout = read_layout(root, &chain.columns);
            if layout.problems.is_empty() {
                Ok(layout.samples)
            } else {
                Err(CacheError::Dataset(layout.problems))
            }
        }
    }
}

pub(crate) fn transform_ids(
    chain: &Chain<'_>,
    params: &[String],
) -> Result<Vec<PluginId>, CacheError> {
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

pub(crate) fn check_resolution(r: Resolution) -> Result<(), CacheError> {
    if r.frames == 0
        || (r.frames - 1) % 8 != 0
        || r.height == 0
        || r.width == 0
        || r.height % 16 != 0
        || r.width % 16 != 0
    {
        return Err(CacheError::Input(format!(
            "resolution {}x{}x{}: frames must be 8N+1 and height/width positive multiples of 16",
            r.frames, r.height, r.width
        )));
    }
    Ok(())
}

pub(crate) fn vae_options_for(options: &PrepareOptions, config: &VaeConfig) -> VaeOptions {
    options.vae_options.unwrap_or(VaeOptions {
        tiling: Some(Tiling::for_config(config)),
        slicing: true,
    })
}

pub(crate) fn vae_options_string(
    options: &PrepareOptions,
    model_dir: &Path,
) -> Result<String, CacheError> {
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
    for b in options.buckets.iter().flat_map(|b| b.list()) {
        check_resolution(*b)?;
    }
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
    let (mut rewriters, mut video_transforms) = chain.stages();
    for sample in &samples {
        let (file, line) = origin_location(data_root, sample);
        let keyed = (|| -> Result<IndexSample, String> {
            let caption = rewriters
                .rewrite(&sample.caption)?
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
            let seed = keys::sample_seed(options.seed, &video_sha, sample.frames);
            // With buckets: the clip's bucket, planned as prepare will plan it.
            let bucket = match &options.buckets {
                Some(b) => Some(
                    b.assign_file(&video, sample.frames, &mut video_transforms, seed)?
                        .bucket,
                ),
                None => None,
            };
            let ctx = keys::LatentContext {
                resolution: bucket.unwrap_or(options.resolution),
                ..ctx.clone()
            };
            Ok(IndexSample {
                origin: sample.origin.clone(),
                video: sample.video.clone(),
                seed,
                latent: keys::latent_key(&ctx, &video_sha, image_sha.as_deref(), sample.frames),
                prompt: keys::prompt_key(
                    &caption,
                    &model.text,
                    options.max_sequence_length,
                    options.text_dtype,
                ),
                caption,
                image: options.i2v,
                resolution: bucket.map(|r| [r.frames, r.height, r.width]),
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
    if let Some(b) = &options.buckets {
        if planned.is_empty() && !failed.is_empty() {
            return Err(CacheError::Input(format!(
                "no clip fits any bucket of [data] buckets ({}):\n{}",
                b.list()
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                failed
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )));
        }
    }
    let r = options.resolution;
    let index = Index {
        format: INDEX_FORMAT.into(),
        model,
        transforms,
        resolution: [r.frames, r.height, r.width],
        buckets: options
            .buckets
            .iter()
            .flat_map(|b| b.list())
            .map(|r| [r.frames, r.height, r.width])
            .collect(),
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
