//! `cogvx train`: checks everything, prepares the cache when stale, then runs the trainer.

use anyhow::{anyhow, bail, Context, Result};
use cogvx_plugin_api::{Plugin, PluginKind};
use cogvx_plugin_host::{LoadedPlugin, Registry};
use cogvx_trainer::{Resume, TrainConfig, TrainJob, ValidationConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::prepare::{cache_dir, open_model, prepare_cache, print_summary};
use super::{ChainPlugins, Settings};
use crate::plugins::take_chain;
use crate::TrainArgs;

/// `[train]` with the flags applied, and `[validation]` with prompts from `[data]
/// validation_root` when it lists none itself.
fn effective_configs(
    settings: &Settings,
    args: &TrainArgs,
) -> Result<(TrainConfig, ValidationConfig)> {
    let mut train = settings.config.train.clone();
    if let Some(a) = &args.adapter {
        train.adapter = a.clone();
    }
    if let Some(n) = args.max_steps {
        train.max_steps = Some(n);
    }
    if let Some(r) = args.rank {
        train.rank = r;
    }
    if let Some(a) = args.alpha {
        train.alpha = a;
    }
    if let Some(dir) = &args.output_dir {
        train.output_dir = dir.clone();
    }
    train
        .validate()
        .map_err(|e| anyhow!("config [train]: {e}"))?;
    let mut validation = settings.config.validation.clone();
    if validation.prompts.is_empty() {
        if let Some(root) = &settings.config.data.validation_root {
            let data = &settings.config.data;
            let columns = cogvx_data::Columns {
                caption: data
                    .caption_column
                    .clone()
                    .unwrap_or(cogvx_data::layout::PROMPTS.into()),
                image: data.image_column.clone(),
                ..Default::default()
            };
            let (prompts, images) = read_validation_set(root, &columns)?;
            validation.prompts = prompts;
            if validation.images.is_empty() {
                validation.images = images;
            }
        }
    }
    validation
        .validate()
        .map_err(|e| anyhow!("config [validation]: {e}"))?;
    Ok((train, validation))
}

/// The prompts (and images, when the image list exists) of a validation set in the finetune
/// layout, with the `[data]` column files.
fn read_validation_set(
    root: &Path,
    columns: &cogvx_data::Columns,
) -> Result<(Vec<String>, Vec<PathBuf>)> {
    let read = |name: &str| -> Result<Option<Vec<String>>> {
        let path = cogvx_data::resolve_in_root(root, name)
            .map_err(|e| anyhow!("[data] validation_root: {e}"))?;
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("[data] validation_root: cannot read {}", path.display()))?;
        Ok(Some(
            text.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        ))
    };
    let prompts = read(&columns.caption)?.ok_or_else(|| {
        anyhow!(
            "[data] validation_root: {} has no {}",
            root.display(),
            columns.caption
        )
    })?;
    let image_list = columns
        .image
        .as_deref()
        .unwrap_or(cogvx_data::layout::IMAGES);
    let images = read(image_list)?;
    if images.is_none() && columns.image.is_some() {
        bail!(
            "[data] validation_root: {} has no {image_list} (`[data] image_column`)",
            root.display()
        );
    }
    let images: Vec<PathBuf> = images
        .unwrap_or_default()
        .iter()
        .map(|p| root.join(p))
        .collect();
    if !images.is_empty() && images.len() != prompts.len() {
        bail!(
            "[data] validation_root: {} lists {} images for {} prompts in {}; give one image per prompt",
            root.join(image_list).display(),
            images.len(),
            prompts.len(),
            columns.caption
        );
    }
    Ok((prompts, images))
}

/// A model with learned positional embeddings (CogVideoX-5B-I2V) runs at its one frame size
/// only (as diffusers refuses another): every bucket must have it.
fn check_buckets_fit_model(settings: &Settings, folder: &cogvx_engine::ModelFolder) -> Result<()> {
    let tc = &folder.transformer_config;
    if !settings.buckets.is_bucketed() || !tc.use_learned_positional_embeddings {
        return Ok(());
    }
    let (h, w) = (tc.sample_height as u32 * 8, tc.sample_width as u32 * 8);
    let other: Vec<String> = settings
        .buckets
        .list()
        .iter()
        .filter(|b| (b.height, b.width) != (h, w))
        .map(|b| b.to_string())
        .collect();
    if !other.is_empty() {
        bail!(
            "config [data] buckets: {} ({}) has learned positional embeddings for {h}x{w} pixels (height x width) only, so buckets {} cannot train on it; list buckets of {h}x{w} (their lengths may differ) or remove `buckets`",
            folder.root.display(),
            folder.variant,
            other.join(", ")
        );
    }
    Ok(())
}

/// The plugins a run takes out of the registry.
struct RunPlugins {
    adapter: Option<LoadedPlugin>,
    scheduler: Option<LoadedPlugin>,
    validators: Vec<LoadedPlugin>,
}

fn take_plugins(
    registry: &mut Registry,
    settings: &Settings,
    train: &TrainConfig,
    validation: &ValidationConfig,
) -> Result<RunPlugins> {
    let config = &settings.config;
    let adapter = if train.is_lora() || train.is_sft() {
        None
    } else if registry.get_mut(&train.adapter).is_none() {
        bail!(
            "config [train] adapter = \"{}\": no such plugin is loaded. Adapters other than lora and sft are plugins: load one with --plugin FILE (e.g. --plugin plugins/{}.wasm, built by `bash plugins/build.sh`) or list it in the config's `plugins`",
            train.adapter,
            train.adapter
        );
    } else {
        take_chain(
            registry,
            config,
            std::slice::from_ref(&train.adapter),
            PluginKind::Adapter,
            "[train] adapter",
        )?
        .pop()
    };
    let scheduler = match &config.model.scheduler {
        Some(name) => take_chain(
            registry,
            config,
            std::slice::from_ref(name),
            PluginKind::Scheduler,
            "[model] scheduler",
        )?
        .pop(),
        None => None,
    };
    let validators = take_chain(
        registry,
        config,
        &validation.validators,
        PluginKind::Validator,
        "[validation] validators",
    )?;
    Ok(RunPlugins {
        adapter,
        scheduler,
        validators,
    })
}

/// The run's whole resolved config (the config file with the command line's overrides, paths
/// resolved), stored in its checkpoints: a resume under another one is refused naming the keys
/// that differ ([`TrainJob::run_config`]).
fn run_config(
    settings: &Settings,
    train: &TrainConfig,
    validation: &ValidationConfig,
) -> Result<serde_json::Value> {
    let c = &settings.config;
    let plugin_files: Vec<&PathBuf> = c.plugins.iter().chain(&settings.cli_plugins).collect();
    Ok(serde_json::json!({
        "model": {
            "path": c.model.path,
            "task": c.model.task.map(|t| t.to_string()),
            "name": c.model.name,
            "scheduler": c.model.scheduler,
        },
        "data": {
            "root": c.data.root,
            "validation_root": c.data.validation_root,
            "resolution": settings.resolution.to_string(),
            "buckets": settings.buckets.is_bucketed().then(|| settings.buckets.list().iter().map(|r| r.to_string()).collect::<Vec<_>>()),
            "max_upscale": settings.buckets.max_upscale(),
            "reader": c.data.reader,
            "transforms": c.data.transforms,
            "rewriters": c.data.rewriters,
            "seed": c.data.seed,
            "cache_dir": c.data.cache_dir,
        },
        "plugins": plugin_files,
        "plugin": serde_json::to_value(&c.plugin)?,
        "train": serde_json::to_value(train)?,
        "validation": serde_json::to_value(validation)?,
    }))
}

pub fn run(settings: &Settings, args: TrainArgs) -> Result<ExitCode> {
    // The processes of the run: several when an MPI launcher (`cogvx launch`) started this one
    // (on GPUs joined by NCCL, each on the GPU of its local rank). They must find each other
    // and agree on the job within the rendezvous timeout.
    let timeout = cogvx_dist::rendezvous_timeout();
    let watchdog = cogvx_dist::launched_by_mpi().then(|| {
        cogvx_dist::Watchdog::arm(
            format!(
                "the processes of the run did not all start and agree on the job within {:.0} s (COGVX_RENDEZVOUS_TIMEOUT): \
                 check that every rank was launched, runs this cogvx and can reach the others",
                timeout.as_secs_f64()
            ),
            timeout,
        )
    });
    let world = match settings.device {
        crate::config::Device::Cuda(index) => {
            cogvx_dist::from_env_for_gpu(index + cogvx_dist::local_rank().unwrap_or(0))
        }
        crate::config::Device::Cpu => cogvx_dist::from_env(),
    }
    .map_err(|e| anyhow!("{e}"))?;
    let rank = world.rank();
    // Every check before any work: config values, model kind, data root, plugins, output folder.
    let (train, validation) = effective_configs(settings, &args)?;
    // Every process runs the same job (compared before rank 0 prepares the cache).
    let job = serde_json::json!({
        "config": run_config(settings, &train, &validation)?,
        "resume": args.resume,
    });
    cogvx_dist::check_same_job(world.as_ref(), job.to_string().as_bytes())
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(w) = watchdog {
        w.disarm();
    }
    let folder = open_model(settings)?;
    let models = cogvx_plan::ModelConfigs::from_dir(&folder.root).map_err(|e| anyhow!("{e}"))?;
    super::plan::check_model_files(&folder.root, &models)?;
    super::plan::check_fits(
        settings,
        models,
        &train,
        &validation,
        world.world_size(),
        args.force,
    )?;
    if !folder.variant.is_i2v() && !validation.images.is_empty() {
        bail!(
            "config [validation] images: {} is a text-to-video model ({}); conditioning images need an image-to-video (…-I2V) model",
            folder.root.display(),
            folder.variant
        );
    }
    if folder.variant.is_i2v() && validation.enabled() && validation.images.is_empty() {
        bail!(
            "config [validation]: {} is an image-to-video model ({}); give one conditioning image per prompt in `images` (or images.txt in [data] validation_root)",
            folder.root.display(),
            folder.variant
        );
    }
    check_buckets_fit_model(settings, &folder)?;
    let root = settings.data_root(None)?;
    if !root.is_dir() {
        bail!(
            "dataset root {} is not a folder (set --data-root DIR or `[data] root`)",
            root.display()
        );
    }
    // One registry (each plugin file loaded once) for the data chain and the run's plugins.
    let mut registry = settings.registry()?;
    let mut chain = ChainPlugins::take(&mut registry, settings)?;
    let mut plugins = take_plugins(&mut registry, settings, &train, &validation)?;
    cogvx_trainer::check_output_dir(
        &train.output_dir,
        &[("[model] path", &folder.root), ("[data] root", &root)],
    )
    .map_err(|e| anyhow!("{e}"))?;
    let resume = match args.resume.as_deref() {
        None => None,
        Some(r) => {
            let resume: Resume = r.parse().expect("infallible");
            if let Resume::Path(p) = &resume {
                if !p.is_dir() {
                    bail!("--resume {}: no such checkpoint folder (use `latest` or a checkpoint-<step> folder)", p.display());
                }
            }
            Some(resume)
        }
    };

    // The cache: prepared (only what changed is recomputed), then opened.
    let cache = cache_dir(
        settings,
        args.cache_dir.clone(),
        Some(train.output_dir.join("cache")),
    )?;
    // Rank 0 prepares it while the others wait, then every rank opens it.
    if rank == 0 {
        let summary = prepare_cache(settings, &mut chain, &root, &folder, &cache)?;
        print_summary(&summary);
    }
    world.barrier();
    let cache = cogvx_cache::Cache::open(&cache).map_err(|e| anyhow!("{e}"))?;
    if cache.is_empty() {
        bail!(
            "no usable samples in {} (see the problems above)",
            root.display()
        );
    }

    // The adapter plugin's table goes into the export metadata (PEFT settings such as use_rslora).
    let adapter_params: serde_json::Value = if plugins.adapter.is_some() {
        serde_json::from_str(&settings.config.plugin_params_json(&train.adapter)?)?
    } else {
        serde_json::Value::Null
    };
    // Ctrl-C: finish the current step, write a checkpoint, stop (a second Ctrl-C quits at once).
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping after this step and writing a checkpoint (Ctrl-C again quits at once)"
            );
        });
    }
    let mut on_step = |_: &cogvx_metrics::StepRecord| stop.load(Ordering::SeqCst);

    let mut job = TrainJob::new(folder.root.clone(), cache, train);
    job.adapter_params = adapter_params;
    job.on_step = Some(&mut on_step);
    job.validation = validation;
    job.adapter_plugin = plugins.adapter.as_mut().map(|p| p as &mut dyn Plugin);
    job.scheduler_plugin = plugins.scheduler.as_mut().map(|p| p as &mut dyn Plugin);
    job.validators = plugins
        .validators
        .iter_mut()
        .map(|p| p as &mut dyn Plugin)
        .collect();
    job.resume = resume;
    job.run_config = Some(run_config(settings, &job.config, &job.validation)?);
    job.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    job.collective = world.as_ref();

    match settings.device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda(index) => {
            // Several processes on a machine: each takes the GPU of its local rank, counted from
            // the one named (`cuda:N`).
            let index = if job.collective.world_size() > 1 {
                index + cogvx_dist::local_rank().unwrap_or(0)
            } else {
                index
            };
            run_on::<burn::backend::Autodiff<cogvx_model_core::CudaBackend>>(
                job,
                &cogvx_model_core::CudaDevice { index },
            )
        }
        // On the CPU every precision runs on burn's flex backend: faster than ndarray for the
        // whole training step and the VAE, with the same parity (docs/benchmarks.md), and it has
        // the half types mixed precision needs.
        _ => run_on::<cogvx_model_core::FlexAutodiffBackend>(job, &Default::default()),
    }
}

fn run_on<B: cogvx_model_core::ModelAutodiffBackend>(
    job: TrainJob<'_>,
    device: &B::Device,
) -> Result<ExitCode> {
    let rank = job.collective.rank();
    let summary = cogvx_trainer::train::<B>(job, device).map_err(|e| anyhow!("{e}"))?;
    if rank != 0 {
        // Rank 0 reports the run.
        return Ok(if summary.stopped_early {
            ExitCode::from(130)
        } else {
            ExitCode::SUCCESS
        });
    }
    if let Some(from) = &summary.resumed_from {
        println!("resumed from {}", from.display());
    }
    println!(
        "trained steps {}..{} of {}",
        summary.start_step, summary.step, summary.total_steps
    );
    if let Some((step, loss)) = summary.losses.last() {
        println!("last loss {loss:.6} (step {step})");
    }
    if let Some(c) = &summary.last_checkpoint {
        println!("checkpoint: {}", c.display());
    }
    for v in &summary.validation_videos {
        println!("validation video: {}", v.display());
    }
    if let Some(e) = &summary.exported {
        println!("exported: {}", e.display());
    }
    for r in &summary.export_reports {
        println!(
            "export {}: {} ({} of {} keys{}), scale {}, output change with the LoRA {:.3e}, difference from the trained model {:.1e}",
            r.format,
            r.file.display(),
            r.keys_written,
            r.keys_expected,
            if r.missing.is_empty() && r.unexpected.is_empty() {
                String::new()
            } else {
                format!("; missing {:?}, not loadable {:?}", r.missing, r.unexpected)
            },
            r.scale,
            r.output_change,
            r.difference_from_trained
        );
    }
    if summary.stopped_early {
        println!(
            "stopped at step {}: continue with --resume latest",
            summary.step
        );
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}
