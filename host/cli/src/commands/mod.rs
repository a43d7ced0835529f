//! One module per `cogvx` subcommand.

pub mod bench;
pub mod dataset;
pub mod parity;
pub mod plugins;

use anyhow::{bail, Result};
use std::path::PathBuf;

use crate::config::{Config, Resolution};
use crate::Cli;

/// The config file merged with the CLI flags that override it.
pub struct Settings {
    pub config: Config,
    pub cli_plugins: Vec<PathBuf>,
    pub resolution: Resolution,
}

impl Settings {
    pub fn from_cli(cli: &Cli) -> Result<Self> {
        let mut config = match &cli.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(root) = &cli.data_root {
            config.data.root = Some(root.clone());
        }
        let resolution = cli.resolution.unwrap_or(config.data.resolution);
        config.data.resolution = resolution;
        Ok(Settings { config, cli_plugins: cli.plugins.clone(), resolution })
    }

    /// The dataset root: the positional DIR, else --data-root, else `[data] root`.
    pub fn data_root(&self, positional: Option<PathBuf>) -> Result<PathBuf> {
        match positional.or_else(|| self.config.data.root.clone()) {
            Some(p) => Ok(p),
            None => bail!("no dataset root: pass DIR, --data-root DIR, or set `[data] root` in the config"),
        }
    }

    pub fn registry(&self) -> Result<cogvx_plugin_host::Registry> {
        crate::plugins::build_registry(&self.config, &self.cli_plugins)
    }
}
