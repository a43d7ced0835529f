//! `cogvx plan`: the peak memory of prepare, training and validation for a config, before
//! anything runs; and the check `cogvx train` makes with it against the device's memory.

use anyhow::{anyhow, bail, Result};
use cogvx_plan::{
    DeviceKind, Distribution, ModelConfigs, Plan, PlanInput, Shape, Trainable, ValidationInput,
};
use cogvx_trainer::{TrainConfig, ValidationConfig};
use std::process::ExitCode;

use super::Settings;
use crate::config::Device;

/// The model configs of a plan: the model folder (`--model` / `[model] path`) when it exists,
/// else the released checkpoint named by `name` (`--model-name` / `[model] name`).
pub fn model_configs(settings: &Settings, name: Option<&str>) -> Result<ModelConfigs> {
    let name = name.or(settings.config.model.name.as_deref());
    match (&settings.config.model.path, name) {
        (Some(dir), _) if dir.is_dir() => ModelConfigs::from_dir(dir).map_err(|e| anyhow!("{e}")),
        (_, Some(name)) => ModelConfigs::released(name).map_err(|e| anyhow!("`[model] name`: {e}")),
        (Some(dir), None) => bail!(
            "model folder {} does not exist: pass --model DIR, or name a released model with --model-name or `[model] name` (known: {})",
            dir.display(),
            cogvx_plan::released_names().join(", ")
        ),
        (None, None) => bail!(
            "no model to plan for: pass --model DIR, or name a released model with --model-name or `[model] name` (known: {})",
            cogvx_plan::released_names().join(", ")
        ),
    }
}

/// The plan's input from the config (`train` and `validation` with the CLI's overrides applied).
pub fn plan_input(
    settings: &Settings,
    models: ModelConfigs,
    train: &TrainConfig,
    validation: &ValidationConfig,
    world_size: usize,
) -> PlanInput {
    // With buckets, the largest: the peak of the run.
    let r = settings.buckets.largest();
    let shape = Shape {
        frames: r.frames as usize,
        height: r.height as usize,
        width: r.width as usize,
    };
    let trainable = if train.adapter == "sft" {
        Trainable::Full
    } else {
        // "lora", or an adapter plugin: planned as a LoRA of its rank on the same targets.
        Trainable::Lora {
            rank: train.rank,
            targets: train.target_modules.clone(),
        }
    };
    let validation = validation.enabled().then(|| ValidationInput {
        shape: Shape {
            frames: validation.num_frames.unwrap_or(shape.frames),
            height: validation.height.unwrap_or(shape.height),
            width: validation.width.unwrap_or(shape.width),
        },
        guidance: validation.guidance_scale > 1.0,
    });
    PlanInput {
        models,
        shape,
        batch_size: train.batch_size,
        trainable,
        gradient_checkpointing: train.gradient_checkpointing,
        checkpoint_offload: train.gradient_checkpointing_offload,
        recompute_feed_forward: train.recompute_feed_forward,
        mixed_precision: train.mixed_precision,
        validation,
        device: match settings.device {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
        },
        distribution: Distribution {
            world_size,
            zero_stage: train.zero_stage,
            optimizer_offload: train.optimizer_offload,
        },
    }
}

/// `cogvx plan`: prints the plan (a table, or JSON); exits 1 when a `--gpu-memory` budget is
/// given and a phase does not fit it.
pub fn run(
    settings: &Settings,
    gpu_memory: Option<f64>,
    json: bool,
    model_name: Option<&str>,
    nproc: usize,
) -> Result<ExitCode> {
    if nproc == 0 {
        bail!("--nproc 0: give the number of processes, at least 1");
    }
    if let Some(g) = gpu_memory {
        if !(g.is_finite() && g > 0.0) {
            bail!("--gpu-memory {g}: give the memory in GiB, a positive number (e.g. 24)");
        }
    }
    let train = settings.config.train.clone();
    train
        .validate()
        .map_err(|e| anyhow!("config [train]: {e}"))?;
    let validation = settings.config.validation.clone();
    let mut input = plan_input(
        settings,
        model_configs(settings, model_name)?,
        &train,
        &validation,
        nproc,
    );
    if gpu_memory.is_some() {
        // A GPU budget plans for a GPU (its runtime), whatever this build can run on.
        input.device = DeviceKind::Cuda;
    }
    let mut plan = cogvx_plan::plan(&input).map_err(|e| anyhow!("{e}"))?;
    if let Some(g) = gpu_memory {
        plan = plan.with_budget(g);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.render());
    }
    Ok(if plan.fits == Some(false) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Memory the device can give this run, in GiB: the GPU's total memory (from `nvidia-smi`), or
/// the host's `MemAvailable`. `None` when it cannot be read.
pub fn device_memory_gib(device: Device) -> Option<f64> {
    match device {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kib: f64 = info
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib / (1024.0 * 1024.0))
        }
        Device::Cuda(index) => {
            let out = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.total",
                    "--format=csv,noheader,nounits",
                    &format!("--id={index}"),
                ])
                .output()
                .ok()?;
            let mib: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            Some(mib / 1024.0)
        }
    }
}

/// Before `cogvx train` does any work: the training and validation phases of the plan must fit
/// the device's memory, else an error with the plan's numbers (a warning with `force`).
pub fn check_fits(
    settings: &Settings,
    models: ModelConfigs,
    train: &TrainConfig,
    validation: &ValidationConfig,
    world_size: usize,
    force: bool,
) -> Result<()> {
    let input = plan_input(settings, models, train, validation, world_size);
    let plan = cogvx_plan::plan(&input).map_err(|e| anyhow!("{e}"))?;
    let Some(available) = device_memory_gib(settings.device) else {
        tracing::warn!(
            "could not read the memory of {:?}; the plan's peak is {:.2} GiB",
            settings.device,
            plan.peak_gib
        );
        return Ok(());
    };
    let plan: Plan = plan.with_budget(available);
    let over: Vec<_> = plan
        .phases
        .iter()
        .filter(|p| !p.name.starts_with("prepare") && p.fits == Some(false))
        .collect();
    for p in &plan.phases {
        tracing::info!(
            "memory plan: {} peaks at {:.2} GiB ({:.2} GiB available)",
            p.name,
            p.peak_gib,
            available
        );
    }
    if over.is_empty() {
        return Ok(());
    }
    let what = over
        .iter()
        .map(|p| format!("{} {:.2} GiB", p.name, p.peak_gib))
        .collect::<Vec<_>>()
        .join(", ");
    let message = format!(
        "this config needs more memory than {:?} has ({what}; {available:.2} GiB available):\n{}\n\
         lower `[data] resolution` or `[train] batch_size` / `rank`, set `[train] gradient_checkpointing = true` \
         or `mixed_precision = \"bf16\"`, \
         or pass --force to start anyway",
        settings.device,
        plan.render()
    );
    if force {
        tracing::warn!("{message}");
        Ok(())
    } else {
        bail!(message)
    }
}

/// Before any work: every weight file of the model folder opens (headers and data ranges
/// intact) and holds as many parameters as its `config.json` describes. A corrupt or truncated
/// transformer used to be noticed only after the whole dataset was encoded.
pub fn check_model_files(dir: &std::path::Path, models: &ModelConfigs) -> Result<()> {
    let components: [(&str, u64, u64); 3] = [
        (
            "transformer",
            cogvx_plan::params::transformer_parameters(&models.transformer),
            0,
        ),
        ("vae", cogvx_plan::params::vae_parameters(&models.vae), 0),
        // A T5 checkpoint may store its tied embedding twice (`shared` and `encoder.embed_tokens`).
        (
            "text_encoder",
            cogvx_plan::params::t5_encoder_parameters(&models.text_encoder),
            (models.text_encoder.vocab_size * models.text_encoder.d_model) as u64,
        ),
    ];
    for (component, expected, tied) in components {
        let folder = dir.join(component);
        let weights = cogvx_model_core::weights::Weights::open(&folder)
            .map_err(|e| anyhow!("model folder {}: {e}", folder.display()))?;
        let stored: u64 = weights
            .keys()
            .filter_map(|k| weights.shape(k))
            .map(|s| s.iter().product::<usize>() as u64)
            .sum();
        if stored != expected && stored != expected + tied {
            bail!(
                "model folder {}: the weights hold {stored} parameters, but its config.json describes a model of {expected}: \
                 the files are incomplete or belong to another model (download the folder again)",
                folder.display()
            );
        }
    }
    Ok(())
}
