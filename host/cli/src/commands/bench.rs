//! `cogvx bench`.

use anyhow::Result;
use std::path::Path;
use std::process::ExitCode;

use super::Settings;

pub fn preprocess(settings: &Settings, plugins_dir: &Path, seconds: u32, repeat: u32) -> Result<ExitCode> {
    let _ = (settings, plugins_dir, seconds, repeat);
    anyhow::bail!("bench preprocess: wired once the video bench lands")
}
