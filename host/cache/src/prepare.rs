//! Preparing: the VAE pass over the clips (latents, I2V images) and the T5 pass over the
//! captions, each written as an entry, then the index.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_data::{layout::origin_location, resolve_in_root, Chain, Problem};
use cogvx_plugin_api::{Frames, Sample, Size, TransformPlan};
use cogvx_scheduler::noise::gaussian_noise;
use cogvx_text::PromptEncoder;
use cogvx_vae::{AutoencoderKLCogVideoX, VaeOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::plan::*;
use crate::read::*;
use crate::*;

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
    std::fs::create_dir_all(&dir).map_err(|source| CacheError::Io {
        path: dir.clone(),
        source,
    })?;
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
                tracing::warn!(
                    "{}: invalid prompt entry; encoding it again",
                    path.display()
                )
            }
            _ => {}
        }
        if encoder.is_none() {
            tracing::info!(
                "loading the text encoder from {} for {} prompt(s)",
                model_dir.display(),
                prompts.len()
            );
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
/// [`gaussian_noise`]`(seed)`, at exactly `H/8 x W/8` ([`AutoencoderKLCogVideoX::encode_exact`]).
/// Returns `[C, F, h, w]`.
pub fn encode_latent<B: Backend>(
    vae: &AutoencoderKLCogVideoX<B>,
    video: Tensor<B, 5>,
    seed: u64,
    options: &VaeOptions,
) -> Result<HostTensor, CacheError> {
    let dist = vae.encode_exact(video, options)?;
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

/// The conditioning image `[3, H, W]` in [-1, 1] of an I2V sample: the listed image (the
/// clip's crop scaled to the image's size, resized to the frame size with the plan's filter),
/// else the first frame of the preprocessed clip.
pub(crate) fn conditioning_image(
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

pub(crate) struct VaeEncoder<B: Backend> {
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
    prepare_on::<B, B>(
        cache,
        data_root,
        model_dir,
        chain,
        transform_params,
        options,
        device,
        device,
    )
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
            let (vae, config) =
                AutoencoderKLCogVideoX::<B>::from_dir(&model_dir.join("vae"), device)?;
            *enc = Some(VaeEncoder {
                vae_options: vae_options_for(options, &config),
                vae,
            });
        }
        Ok(())
    };
    let load_text = |enc: &mut Option<PromptEncoder<T>>| -> Result<(), CacheError> {
        if enc.is_none() {
            tracing::info!("loading the text encoder from {}", model_dir.display());
            *enc = Some(PromptEncoder::<T>::load_in(
                model_dir,
                options.text_dtype,
                text_device,
            )?);
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
                    let [frames, height, width] = planned.index.resolution_of(s);
                    let r = cogvx_plugin_api::Resolution {
                        frames,
                        height,
                        width,
                    };
                    let pre = cogvx_video::preprocess_clip(
                        &video,
                        sample.frames,
                        &mut transforms,
                        r,
                        s.seed,
                    )
                    .map_err(|e| e.to_string())?;
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
                    let latent = encode_latent(&enc.vae, x, s.seed, &enc.vae_options)
                        .map_err(|e| e.to_string())?;
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
                    tracing::debug!(
                        "prompt {} -> {:?}",
                        cogvx_plugin_api::text::display_safe(&s.caption, 200),
                        emb.shape
                    );
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
