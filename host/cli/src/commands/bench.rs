//! `cogvx bench`: throughput numbers for the docs (benchmarks, never timed tests).

use anyhow::{anyhow, Context, Result};
use cogvx_plugin_api::Plugin;
use cogvx_plugin_host::LoadedPlugin;
use std::path::Path;
use std::process::ExitCode;

use super::Settings;

/// Decode + preprocess of a generated 1080p clip to the target resolution with frame_skip and
/// crop_resize, crop_resize running built-in, as a native `.so` and as a `.wasm` component.
pub fn preprocess(
    settings: &Settings,
    plugins_dir: &Path,
    seconds: u32,
    repeat: u32,
) -> Result<ExitCode> {
    let target = settings.resolution;
    let work = std::env::temp_dir().join("cogvx-bench");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let fps = 30;
    let clip = cogvx_video::bench::make_bench_clip(&work, 1920, 1080, seconds * fps, fps)
        .map_err(|e| anyhow!("{e}"))?;
    println!(
        "clip: {} (1920x1080, {} frames at {fps} fps) -> {}",
        clip.display(),
        seconds * fps,
        settings.resolution
    );
    let registry = settings.registry()?;
    let limits = registry.wasm_limits().clone();
    type Load<'a> = Box<dyn Fn() -> Result<LoadedPlugin> + 'a>;
    let transports: [(&str, Load<'_>); 3] = [
        (
            "built-in",
            Box::new(|| Ok(LoadedPlugin::builtin(cogvx_plugin_crop_resize::builtin()))),
        ),
        (
            "native .so",
            Box::new(|| {
                LoadedPlugin::load_native(&plugins_dir.join("crop_resize.so"))
                    .map_err(|e| anyhow!("{e} (run `bash plugins/build.sh`)"))
            }),
        ),
        (
            "wasm",
            Box::new(|| {
                LoadedPlugin::load_wasm(&plugins_dir.join("crop_resize.wasm"), &limits)
                    .map_err(|e| anyhow!("{e} (run `bash plugins/build.sh`)"))
            }),
        ),
    ];
    let mut rows = Vec::new();
    for (name, make) in transports {
        let mut frame_skip = LoadedPlugin::builtin(cogvx_plugin_frame_skip::builtin());
        let mut crop_resize = make()?;
        frame_skip.configure("{}").map_err(|e| anyhow!("{e}"))?;
        crop_resize.configure("{}").map_err(|e| anyhow!("{e}"))?;
        let chain: Vec<&mut dyn Plugin> = vec![&mut frame_skip, &mut crop_resize];
        let t = cogvx_video::bench::preprocess_throughput(&clip, target, chain, repeat)
            .map_err(|e| anyhow!("{e}"))?;
        println!("{name:<11} {t}");
        rows.push(serde_json::json!({
            "transport": name,
            "frames_per_second": t.frames_per_second,
            "frames": t.frames,
            "seconds": t.seconds,
            "resolution": settings.resolution.to_string(),
        }));
    }
    println!("{}", serde_json::to_string(&rows)?);
    Ok(ExitCode::SUCCESS)
}

/// `cogvx bench train-step`: one JSON line, as `torch_train_step.py` prints.
pub fn train_step(
    settings: &Settings,
    preset: &str,
    options: cogvx_bench::StepOptions,
) -> Result<ExitCode> {
    let report = match settings.device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda(index) => {
            let preset = cogvx_bench::preset(preset).map_err(|e| anyhow!("{e}"))?;
            let device = cogvx_model_core::CudaDevice { index };
            cogvx_bench::train_step_on::<burn::backend::Autodiff<cogvx_model_core::CudaBackend>>(
                &preset, options, &device,
            )
        }
        _ => cogvx_bench::train_step(preset, options),
    }
    .map_err(|e| anyhow!("{e}"))?;
    println!("{}", report.to_json_line());
    Ok(ExitCode::SUCCESS)
}

/// `cogvx bench attention`: one JSON line.
pub fn attention(
    settings: &Settings,
    options: cogvx_bench::attention::AttentionOptions,
) -> Result<ExitCode> {
    let report = match settings.device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda(index) => {
            cogvx_bench::attention::attention_on::<
                burn::backend::Autodiff<cogvx_model_core::CudaBackend>,
            >(options, &cogvx_model_core::CudaDevice { index })
        }
        _ => cogvx_bench::attention::attention_cpu(options).map_err(|e| anyhow!("{e}"))?,
    };
    println!("{}", report.to_json_line());
    Ok(ExitCode::SUCCESS)
}

/// `cogvx bench gemm`: one JSON line.
pub fn gemm(settings: &Settings, options: cogvx_bench::gemm::GemmOptions) -> Result<ExitCode> {
    let report = match settings.device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda(index) => cogvx_bench::gemm::gemm_on::<
            cogvx_model_core::CudaBackend,
        >(
            options, &cogvx_model_core::CudaDevice { index }
        ),
        _ => cogvx_bench::gemm::gemm_cpu(options),
    }
    .map_err(|e| anyhow!("{e}"))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
