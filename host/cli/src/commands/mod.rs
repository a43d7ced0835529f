//! One module per `cogvx` subcommand.

pub mod bench;
pub mod dataset;
pub mod launch;
pub mod parity;
pub mod plan;
pub mod plugins;
pub mod prepare;
pub mod sample;
pub mod train;

use anyhow::{bail, Result};
use cogvx_data::chain::Chain;
use cogvx_plugin_api::{Plugin, PluginKind};
use cogvx_plugin_host::{LoadedPlugin, Transport};
use std::path::PathBuf;

use crate::config::{Config, Device, Resolution};
use crate::plugins::take_chain;
use crate::Cli;

/// The config file merged with the CLI flags that override it.
pub struct Settings {
    pub config: Config,
    pub cli_plugins: Vec<PathBuf>,
    pub resolution: Resolution,
    /// The resolutions clips train at: `[data] buckets`, or `resolution` alone.
    pub buckets: cogvx_data::Buckets,
    /// The resolution came from --resolution or the config file (not the built-in default).
    pub resolution_given: bool,
    /// Where the models run (checked to exist in this build).
    pub device: Device,
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
        if let Some(model) = &cli.model {
            config.model.path = Some(model.clone());
        }
        let resolution_given = cli.resolution.is_some() || config.data.resolution.is_some();
        let resolution = cli
            .resolution
            .or(config.data.resolution)
            .unwrap_or(crate::config::DEFAULT_RESOLUTION);
        config.data.resolution = Some(resolution);
        let buckets = config
            .data
            .buckets(resolution)
            .map_err(|e| match &cli.config {
                Some(path) => anyhow::anyhow!("{}: {e}", path.display()),
                None => anyhow::anyhow!("{e}"),
            })?;
        let device = match (cli.device, config.device, std::env::var("COGVX_DEVICE")) {
            (Some(d), _, _) => d.check_available("--device")?,
            (None, Some(d), _) => d.check_available("`device` in the config")?,
            (None, None, Ok(v)) => v
                .parse::<Device>()
                .map_err(|e| anyhow::anyhow!("COGVX_DEVICE: {e}"))?
                .check_available("COGVX_DEVICE")?,
            (None, None, Err(_)) => Device::Cpu,
        };
        Ok(Settings {
            config,
            cli_plugins: cli.plugins.clone(),
            resolution,
            buckets,
            resolution_given,
            device,
        })
    }

    /// The dataset root: the positional DIR, else --data-root, else `[data] root`.
    pub fn data_root(&self, positional: Option<PathBuf>) -> Result<PathBuf> {
        match positional.or_else(|| self.config.data.root.clone()) {
            Some(p) => Ok(p),
            None => bail!(
                "no dataset root: pass DIR, --data-root DIR, or set `[data] root` in the config"
            ),
        }
    }

    /// The model folder: --model, else `[model] path`.
    pub fn model_dir(&self) -> Result<PathBuf> {
        match &self.config.model.path {
            Some(p) => Ok(p.clone()),
            None => bail!("no model folder: pass --model DIR or set `[model] path` in the config (a diffusers CogVideoX folder)"),
        }
    }

    /// The `[plugin.<name>]` JSON of each `[data] transforms` plugin, in chain order (what the
    /// cache keys on).
    pub fn transform_params(&self) -> Result<Vec<String>> {
        self.config
            .data
            .transforms
            .iter()
            .map(|name| self.config.plugin_params_json(name))
            .collect()
    }

    pub fn registry(&self) -> Result<cogvx_plugin_host::Registry> {
        crate::plugins::build_registry(&self.config, &self.cli_plugins)
    }
}

/// The plugins of the data chain, taken out of the registry for the duration of a command.
pub struct ChainPlugins {
    pub reader: Option<LoadedPlugin>,
    /// The built-in reader's list files (`[data] caption_column` etc.).
    pub columns: cogvx_data::Columns,
    pub rewriters: Vec<LoadedPlugin>,
    pub transforms: Vec<LoadedPlugin>,
}

impl ChainPlugins {
    /// Takes the reader, rewriters and transforms of `[data]` out of a fresh registry.
    pub fn from_settings(settings: &Settings) -> Result<Self> {
        Self::take(&mut settings.registry()?, settings)
    }

    /// Takes the reader, rewriters and transforms of `[data]` out of `registry` (a command that
    /// needs other plugins too loads the files once).
    pub fn take(registry: &mut cogvx_plugin_host::Registry, settings: &Settings) -> Result<Self> {
        let data = &settings.config.data;
        let mut readers = take_chain(
            registry,
            &settings.config,
            std::slice::from_ref(&data.reader),
            PluginKind::DatasetReader,
            "[data] reader",
        )?;
        let mut reader = readers.pop().expect("one reader taken");
        // The `[data]` column keys reach the reader as parameters.
        let params = settings.config.reader_params_json()?;
        reader
            .configure(&params)
            .map_err(|e| anyhow::anyhow!("config [data] reader `{}`: {e}", data.reader))?;
        // The built-in finetune-layout reader is called directly, so its problems keep file and
        // line; it reads the same parameters.
        let columns = cogvx_data::Columns::from_params(&params)
            .map_err(|e| anyhow::anyhow!("config [data]: {e}"))?;
        let builtin =
            reader.transport() == Transport::BuiltIn && reader.name() == "finetune-layout";
        let reader = (!builtin).then_some(reader);
        let rewriters = take_chain(
            registry,
            &settings.config,
            &data.rewriters,
            PluginKind::PromptRewriter,
            "[data] rewriters",
        )?;
        let transforms = take_chain(
            registry,
            &settings.config,
            &data.transforms,
            PluginKind::VideoTransform,
            "[data] transforms",
        )?;
        Ok(ChainPlugins {
            reader,
            columns: if builtin { columns } else { Default::default() },
            rewriters,
            transforms,
        })
    }

    /// The chain over the taken plugins.
    pub fn chain(&mut self) -> Chain<'_> {
        Chain {
            reader: self.reader.as_mut().map(|p| p as &mut dyn Plugin),
            columns: self.columns.clone(),
            prompt_rewriters: self
                .rewriters
                .iter_mut()
                .map(|p| p as &mut dyn Plugin)
                .collect(),
            video_transforms: self
                .transforms
                .iter_mut()
                .map(|p| p as &mut dyn Plugin)
                .collect(),
        }
    }
}
