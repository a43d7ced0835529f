//! `cogvx parity DIR`: diffusers parity cases, one table, exit 0 only if all that ran passed.

use crate::config::Device;
use anyhow::{anyhow, Result};
use burn::backend::Autodiff;
use cogvx_engine::parity::{all_passed, case_files, ParityRunner, Row, Table};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::process::ExitCode;

/// Runs the cases of `dir` (optionally only those whose name contains `filter`) on `device`
/// (on the CPU, with `backend`).
pub fn run(
    dir: &Path,
    filter: Option<&str>,
    device: Device,
    backend: cogvx_bench::CpuBackendKind,
) -> Result<ExitCode> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(index) => {
            let runner =
                runner::<cogvx_model_core::CudaBackend>(cogvx_model_core::CudaDevice { index });
            report(dir, filter, |p| runner.run_file(p))
        }
        _ if backend == cogvx_bench::CpuBackendKind::Flex => {
            let runner = runner::<cogvx_model_core::FlexBackend>(Default::default());
            report(dir, filter, |p| runner.run_file(p))
        }
        _ => {
            let runner =
                runner::<cogvx_model_core::CpuBackend>(cogvx_model_core::CpuDevice::default());
            report(dir, filter, |p| runner.run_file(p))
        }
    }
}

/// The engine's runner plus the training step (`train_step_lora`), which runs on `B` with autodiff.
fn runner<B: cogvx_model_core::ModelBackend>(device: B::Device) -> ParityRunner<B> {
    ParityRunner::<B>::new(device).with_component(
        "train_step_lora",
        Box::new(|case, device| {
            cogvx_train::run_case::<Autodiff<B>>(case, device).map_err(|e| e.to_string())
        }),
    )
}

fn report(
    dir: &Path,
    filter: Option<&str>,
    run_file: impl Fn(&Path) -> Vec<Row>,
) -> Result<ExitCode> {
    let files: Vec<_> = case_files(dir)
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .filter(|p| {
            filter.is_none_or(|f| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(f))
            })
        })
        .collect();
    if files.is_empty() {
        anyhow::bail!(
            "{}: no case files (*.safetensors){}",
            dir.display(),
            filter
                .map(|f| format!(" matching `{f}`"))
                .unwrap_or_default()
        );
    }
    let bar = ProgressBar::new(files.len() as u64);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut rows = Vec::new();
    for path in &files {
        bar.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        rows.extend(run_file(path));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{}", Table(&rows));
    Ok(if all_passed(&rows) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
