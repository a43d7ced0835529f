//! `cogvx prepare`: the latent/prompt cache (also run by `cogvx train` when it is stale).

use anyhow::{anyhow, bail, Result};
use cogvx_cache::{PrepareOptions, Summary};
use cogvx_engine::ModelFolder;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{ChainPlugins, Settings};
use crate::config::Task;

/// Opens the model folder and checks it against `[model] task`.
pub fn open_model(settings: &Settings) -> Result<ModelFolder> {
    let dir = settings.model_dir()?;
    let folder = ModelFolder::open(&dir).map_err(|e| anyhow!("{e}"))?;
    if let Some(name) = &settings.config.model.name {
        // `cogvideox-5b-i2v` names the variant `5b-i2v`.
        let named = cogvx_plan::ModelConfigs::released(name)
            .map_err(|e| anyhow!("config `[model] name`: {e}"))?;
        let variant =
            cogvx_engine::Variant::detect(&named.transformer).map_err(|e| anyhow!("{e}"))?;
        if variant != folder.variant {
            bail!(
                "config `[model] name = \"{name}\"` is a {variant} model, but {} holds a {} model: fix the name or the folder",
                dir.display(),
                folder.variant
            );
        }
    }
    if let Some(task) = settings.config.model.task {
        let is = if folder.variant.is_i2v() {
            Task::I2v
        } else {
            Task::T2v
        };
        if task != is {
            bail!(
                "config `[model] task = \"{task}\"`, but {} is a{} model ({}): use a{} model folder or set task = \"{is}\"",
                dir.display(),
                if is == Task::I2v { "n image-to-video" } else { " text-to-video" },
                folder.variant,
                if task == Task::I2v { "n image-to-video (…-I2V)" } else { " text-to-video" },
            );
        }
    }
    Ok(folder)
}

/// The cache folder: the flag, else `[data] cache_dir`, else `fallback`.
pub fn cache_dir(
    settings: &Settings,
    flag: Option<PathBuf>,
    fallback: Option<PathBuf>,
) -> Result<PathBuf> {
    flag.or_else(|| settings.config.data.cache_dir.clone())
        .or(fallback)
        .ok_or_else(|| anyhow!("no cache folder: pass --cache-dir DIR or set `[data] cache_dir` (or `[train] output_dir`) in the config"))
}

/// Prepares `cache` for the dataset at `root` with the model folder, the config's plugin chain
/// (taken into `plugins`) and resolution. Problems with single samples are in the summary;
/// structural ones are errors.
pub fn prepare_cache(
    settings: &Settings,
    plugins: &mut ChainPlugins,
    root: &Path,
    folder: &ModelFolder,
    cache: &Path,
) -> Result<Summary> {
    // What the cache keys on per transform: its parameters, and for a plugin loaded from a
    // file, the file's digest (a `.wasm` named `crop_resize` must not reuse the built-in's entries).
    let params = settings
        .transform_params()?
        .into_iter()
        .zip(&plugins.transforms)
        .map(|(params, plugin)| match plugin.digest() {
            None => Ok(params),
            Some(digest) => {
                let params: serde_json::Value = serde_json::from_str(&params)?;
                Ok(serde_json::json!({ "params": params, "file_sha256": digest }).to_string())
            }
        })
        .collect::<Result<Vec<String>>>()?;
    let mut options =
        PrepareOptions::new(settings.resolution).with_buckets(settings.buckets.clone());
    options.seed = settings.config.data.seed;
    options.i2v = folder.variant.is_i2v();
    // Prompts are tokenized to the length the transformer's positional table covers (226 for
    // every released checkpoint, as the finetune's max_text_seq_length).
    options.max_sequence_length = folder.transformer_config.max_text_seq_length;
    // With mixed precision T5 keeps its weights in bf16 (half the memory of the prompts pass).
    options.text_dtype = settings.config.train.mixed_precision.text_encoder_dtype();
    options.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = match settings.device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda(index) => {
            let device = cogvx_model_core::CudaDevice { index };
            cogvx_cache::prepare::<cogvx_model_core::CudaBackend>(
                cache,
                root,
                &folder.root,
                &mut plugins.chain(),
                &params,
                &options,
                &device,
            )
        }
        // The CPU runs on burn's flex backend, as training (faster VAE passes than ndarray's,
        // and bf16 T5 weights with mixed precision).
        _ => cogvx_cache::prepare::<cogvx_model_core::FlexBackend>(
            cache,
            root,
            &folder.root,
            &mut plugins.chain(),
            &params,
            &options,
            &Default::default(),
        ),
    };
    summary.map_err(|e| anyhow!("{e}"))
}

/// Prints what `prepare` did; failed samples go to stderr.
pub fn print_summary(summary: &Summary) {
    println!(
        "{} samples: latents {} encoded, {} reused; prompts {} encoded, {} reused; index {}",
        summary.samples,
        summary.encoded_latents,
        summary.reused_latents,
        summary.encoded_prompts,
        summary.reused_prompts,
        summary.index.display()
    );
    for p in &summary.failed {
        eprintln!("left out: {p}");
    }
}

pub fn run(
    settings: &Settings,
    dir: Option<PathBuf>,
    cache_flag: Option<PathBuf>,
) -> Result<ExitCode> {
    let root = settings.data_root(dir)?;
    let folder = open_model(settings)?;
    let cache = cache_dir(settings, cache_flag, None)?;
    let mut plugins = ChainPlugins::from_settings(settings)?;
    let summary = prepare_cache(settings, &mut plugins, &root, &folder, &cache)?;
    print_summary(&summary);
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
