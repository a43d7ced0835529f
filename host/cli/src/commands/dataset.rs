//! `cogvx dataset check` and `cogvx dataset preview`.

use anyhow::Result;
use cogvx_data::chain::Chain;
use cogvx_plugin_api::{Plugin, PluginKind};
use cogvx_plugin_host::{LoadedPlugin, Transport};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::Settings;
use crate::plugins::take_chain;

/// The plugins of the data chain, taken out of the registry for the duration of a command.
struct ChainPlugins {
    reader: Option<LoadedPlugin>,
    rewriters: Vec<LoadedPlugin>,
    transforms: Vec<LoadedPlugin>,
}

impl ChainPlugins {
    fn from_settings(settings: &Settings) -> Result<Self> {
        let mut registry = settings.registry()?;
        let data = &settings.config.data;
        let mut readers = take_chain(&mut registry, &settings.config, std::slice::from_ref(&data.reader), PluginKind::DatasetReader, "[data] reader")?;
        let reader = readers.pop().expect("one reader taken");
        // The built-in finetune-layout reader is called directly, so its problems keep file and line.
        let reader = (reader.transport() != Transport::BuiltIn || reader.name() != "finetune-layout").then_some(reader);
        let rewriters = take_chain(&mut registry, &settings.config, &data.rewriters, PluginKind::PromptRewriter, "[data] rewriters")?;
        let transforms = take_chain(&mut registry, &settings.config, &data.transforms, PluginKind::VideoTransform, "[data] transforms")?;
        Ok(ChainPlugins { reader, rewriters, transforms })
    }

    fn chain(&mut self) -> Chain<'_> {
        Chain {
            reader: self.reader.as_mut().map(|p| p as &mut dyn Plugin),
            prompt_rewriters: self.rewriters.iter_mut().map(|p| p as &mut dyn Plugin).collect(),
            video_transforms: self.transforms.iter_mut().map(|p| p as &mut dyn Plugin).collect(),
        }
    }
}

pub fn check(settings: &Settings, dir: Option<PathBuf>) -> Result<ExitCode> {
    let root = settings.data_root(dir)?;
    let mut plugins = ChainPlugins::from_settings(settings)?;
    let report = cogvx_data::check::check(&root, settings.resolution.into(), &mut plugins.chain());
    println!("{report}");
    Ok(if report.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub fn preview(settings: &Settings, dir: Option<PathBuf>, out: &Path) -> Result<ExitCode> {
    let root = settings.data_root(dir)?;
    let mut plugins = ChainPlugins::from_settings(settings)?;
    let options = cogvx_data::preview::PreviewOptions {
        seed: settings.config.data.seed,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..Default::default()
    };
    let summary = match cogvx_data::preview::preview(&root, out, settings.resolution.into(), &mut plugins.chain(), &options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    for (clip, caption) in summary.clips.iter().zip(&summary.captions) {
        println!("{}\t{}", clip.display(), caption);
    }
    if let Some(sheet) = &summary.contact_sheet {
        println!("contact sheet: {}", sheet.display());
    }
    for p in &summary.failed {
        eprintln!("failed: {p}");
    }
    Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
