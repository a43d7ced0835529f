//! `cogvx parity DIR`.

use anyhow::Result;
use std::path::Path;
use std::process::ExitCode;

pub fn run(dir: &Path, filter: Option<&str>) -> Result<ExitCode> {
    let _ = (dir, filter);
    anyhow::bail!("parity: wired once cogvx-engine lands")
}
