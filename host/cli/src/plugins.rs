//! Building the plugin registry: built-ins, then the config's `plugins`, then `--plugin` files;
//! each plugin then receives its `[plugin.<name>]` table.

use anyhow::{anyhow, Result};
use cogvx_plugin_host::{LoadedPlugin, Registry};

use crate::config::Config;

/// Registers every built-in plugin.
pub fn register_builtins(registry: &mut Registry) {
    registry.register_builtin(Box::new(cogvx_data::layout::FinetuneLayout::default()));
    registry.register_builtin(cogvx_plugin_frame_skip::builtin());
    registry.register_builtin(cogvx_plugin_crop_resize::builtin());
    registry.register_builtin(cogvx_plugin_id_token::builtin());
    registry.register_builtin(cogvx_plugin_folder_reader::builtin());
    registry.register_builtin(cogvx_plugin_metadata_reader::builtin());
    registry.register_builtin(cogvx_plugin_video_metrics::builtin());
    registry.register_builtin(cogvx_plugin_timestep_sampling::builtin());
    for scheduler in cogvx_scheduler::builtin_plugins() {
        registry.register_builtin(scheduler);
    }
}

/// The registry for a run: built-ins, the config's plugin files, then the `--plugin` files,
/// each configured with its `[plugin.<name>]` table.
pub fn build_registry(config: &Config, cli_plugins: &[std::path::PathBuf]) -> Result<Registry> {
    config.wasm.validate().map_err(|e| anyhow!("{e}"))?;
    let mut registry = Registry::with_wasm_limits(config.wasm.limits());
    register_builtins(&mut registry);
    for path in config.plugins.iter().chain(cli_plugins) {
        registry.load(path).map_err(|e| anyhow!("{e}"))?;
    }
    let names: Vec<String> = registry.iter().map(|p| p.name().to_string()).collect();
    config.check_plugin_tables(&names)?;
    // Plugins with a table are configured now, so `cogvx plugins` already reports bad tables;
    // the others get `{}` when a command puts them in its chain (see `take_chain`).
    for name in config.plugin.keys() {
        let params = config.plugin_params_json(name)?;
        let plugin = registry
            .get_mut(name)
            .expect("checked by check_plugin_tables");
        configure(plugin, &params)?;
    }
    Ok(registry)
}

fn configure(plugin: &mut LoadedPlugin, params: &str) -> Result<()> {
    use cogvx_plugin_api::Plugin;
    let name = plugin.name().to_string();
    plugin
        .configure(params)
        .map_err(|e| anyhow!("config [plugin.{name}]: {e}"))
}

/// Takes the named plugins out of the registry, in order, checking that each has `kind`.
/// A plugin without a `[plugin.<name>]` table is configured with `{}` here, so that one with
/// required parameters says which are missing.
pub fn take_chain(
    registry: &mut Registry,
    config: &Config,
    names: &[String],
    kind: cogvx_plugin_api::PluginKind,
    key: &str,
) -> Result<Vec<LoadedPlugin>> {
    let mut out = Vec::new();
    for name in names {
        let plugin = registry.take(name).ok_or_else(|| {
            let known: Vec<String> = registry
                .by_kind(kind)
                .map(|p| p.name().to_string())
                .collect();
            anyhow!(
                "config `{key}`: no plugin named `{name}` (known {kind} plugins: {})",
                known.join(", ")
            )
        })?;
        if !plugin.has_kind(kind) {
            let kinds: Vec<&str> = plugin.kinds().iter().map(|k| k.as_str()).collect();
            anyhow::bail!(
                "config `{key}`: plugin `{name}` is not a {kind} plugin (it is: {})",
                kinds.join(", ")
            );
        }
        let mut plugin = plugin;
        if !config.plugin.contains_key(name) {
            configure(&mut plugin, "{}")?;
        }
        out.push(plugin);
    }
    Ok(out)
}
