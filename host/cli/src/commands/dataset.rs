//! `cogvx dataset check` and `cogvx dataset preview`.

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{ChainPlugins, Settings};

pub fn check(settings: &Settings, dir: Option<PathBuf>) -> Result<ExitCode> {
    let root = settings.data_root(dir)?;
    let mut plugins = ChainPlugins::from_settings(settings)?;
    let report = cogvx_data::check::check(&root, &settings.buckets, &mut plugins.chain());
    println!("{report}");
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn preview(settings: &Settings, dir: Option<PathBuf>, out: &Path) -> Result<ExitCode> {
    let root = settings.data_root(dir)?;
    let mut plugins = ChainPlugins::from_settings(settings)?;
    let options = cogvx_data::preview::PreviewOptions {
        seed: settings.config.data.seed,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..Default::default()
    };
    let summary = match cogvx_data::preview::preview(
        &root,
        out,
        &settings.buckets,
        &mut plugins.chain(),
        &options,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    for (clip, caption) in summary.clips.iter().zip(&summary.captions) {
        // Captions come from the dataset or a rewriter: printed without control characters.
        println!(
            "{}\t{}",
            clip.display(),
            cogvx_plugin_api::text::display_safe(caption, 2048)
        );
    }
    if let Some(sheet) = &summary.contact_sheet {
        if settings.buckets.is_bucketed() {
            // One row per bucket that holds a clip, in the list's order.
            let rows: Vec<String> = settings
                .buckets
                .list()
                .iter()
                .filter(|b| summary.buckets.contains(b))
                .map(|b| b.to_string())
                .collect();
            println!(
                "contact sheet: {} (rows: {})",
                sheet.display(),
                rows.join(", ")
            );
        } else {
            println!("contact sheet: {}", sheet.display());
        }
    }
    for p in &summary.failed {
        eprintln!("failed: {p}");
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
