//! `cogvx sample`: one video per prompt from a model folder, optionally with a LoRA.

use anyhow::{anyhow, Result};
use cogvx_engine::{SampleJob, SampleRequest};
use cogvx_plugin_api::{Plugin, PluginKind};
use indicatif::{ProgressBar, ProgressStyle};
use std::process::ExitCode;

use super::Settings;
use crate::plugins::take_chain;
use crate::SampleArgs;

pub fn run(settings: &Settings, args: SampleArgs) -> Result<ExitCode> {
    let model = settings.model_dir()?;
    let folder = cogvx_engine::ModelFolder::open(&model).map_err(|e| anyhow!("{e}"))?;
    let resolution = settings.resolution;
    let mut job = SampleJob::new(model, String::new(), args.out.clone());
    job.request = SampleRequest {
        prompts: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        // Sizes: --resolution or `[data] resolution` when given, else the model's own.
        num_frames: settings
            .resolution_given
            .then_some(resolution.frames as usize),
        height: settings
            .resolution_given
            .then_some(resolution.height as usize),
        width: settings
            .resolution_given
            .then_some(resolution.width as usize),
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        use_dynamic_cfg: args.dynamic_cfg,
        seed: args.seed,
        // The text length the transformer's positional table covers (226 for released models).
        max_sequence_length: folder.transformer_config.max_text_seq_length,
        ..Default::default()
    };
    job.lora = args.lora.clone();
    job.lora_strength = args.lora_strength;
    job.image = args.image.clone();
    job.fps = args.fps;

    let scheduler_name = args
        .scheduler
        .clone()
        .or_else(|| settings.config.model.scheduler.clone());
    let mut scheduler = match &scheduler_name {
        Some(name) => {
            let mut registry = settings.registry()?;
            take_chain(
                &mut registry,
                &settings.config,
                std::slice::from_ref(name),
                PluginKind::Scheduler,
                "--scheduler",
            )?
            .pop()
        }
        None => None,
    };

    let scheduler = scheduler.as_mut().map(|p| p as &mut dyn Plugin);
    match settings.device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda(index) => run_on::<cogvx_model_core::CudaBackend>(
            &job,
            scheduler,
            &cogvx_model_core::CudaDevice { index },
        ),
        // The CPU runs on burn's flex backend, as training (docs/benchmarks.md).
        _ => run_on::<cogvx_model_core::FlexBackend>(&job, scheduler, &Default::default()),
    }
}

fn run_on<B: cogvx_model_core::ModelBackend>(
    job: &SampleJob,
    scheduler: Option<&mut dyn Plugin>,
    device: &B::Device,
) -> Result<ExitCode> {
    let bar = ProgressBar::new(job.request.num_inference_steps as u64);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(
            ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps, ETA {eta}")
                .expect("valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let written = cogvx_engine::sample::<B>(
        job,
        scheduler,
        &mut |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        },
        device,
    )
    .map_err(|e| anyhow!("{e}"))?;
    bar.finish_and_clear();
    for path in written {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
