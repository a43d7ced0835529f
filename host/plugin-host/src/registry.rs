//! [`Registry`]: the built-in plugins and the loaded plugin files, by name.

use std::path::Path;

use cogvx_plugin_api::{Plugin, PluginKind};

use crate::{LoadError, LoadedPlugin, Transport, WasmLimits};

/// One line of `cogvx plugins`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginRow {
    pub name: String,
    pub version: String,
    pub kinds: Vec<PluginKind>,
    pub transport: Transport,
    pub api_version: String,
    /// The file, or `built-in`.
    pub source: String,
}

impl std::fmt::Display for PluginRow {
    /// `name version  kinds  transport  api  source`, tab-separated.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds = self
            .kinds
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(",");
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}\t{}",
            self.name, self.version, kinds, self.transport, self.api_version, self.source
        )
    }
}

/// The plugins the host knows, in registration order. A plugin loaded from a file replaces
/// the built-in of the same name; two files with the same plugin name are an error.
#[derive(Debug, Default)]
pub struct Registry {
    plugins: Vec<LoadedPlugin>,
    limits: WasmLimits,
}

impl Registry {
    /// An empty registry with the default [`WasmLimits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry whose WASM plugins get `limits`.
    pub fn with_wasm_limits(limits: WasmLimits) -> Self {
        Registry {
            plugins: Vec::new(),
            limits,
        }
    }

    /// The limits given to WASM plugins loaded from now on.
    pub fn wasm_limits(&self) -> &WasmLimits {
        &self.limits
    }

    /// Registers a built-in plugin. If a plugin of the same name was already loaded from a
    /// file, that one stays and the built-in is ignored; a built-in replaces a built-in.
    pub fn register_builtin(&mut self, plugin: Box<dyn Plugin>) -> &mut LoadedPlugin {
        let loaded = LoadedPlugin::builtin(plugin);
        let i = match self.plugins.iter().position(|p| p.name() == loaded.name()) {
            Some(i) if self.plugins[i].transport() != Transport::BuiltIn => {
                tracing::debug!(
                    plugin = loaded.name(),
                    "built-in shadowed by a loaded plugin"
                );
                i
            }
            Some(i) => {
                self.plugins[i] = loaded;
                i
            }
            None => {
                self.plugins.push(loaded);
                self.plugins.len() - 1
            }
        };
        &mut self.plugins[i]
    }

    /// Loads a `.wasm` or `.so` plugin file; it replaces a built-in of the same name.
    pub fn load(&mut self, path: &Path) -> Result<&mut LoadedPlugin, LoadError> {
        let loaded = LoadedPlugin::load(path, &self.limits)?;
        let i = match self.plugins.iter().position(|p| p.name() == loaded.name()) {
            Some(i) if self.plugins[i].transport() == Transport::BuiltIn => {
                tracing::info!(plugin = loaded.name(), source = %path.display(), "replaces the built-in plugin");
                self.plugins[i] = loaded;
                i
            }
            Some(i) => {
                return Err(LoadError::Duplicate {
                    name: loaded.name().to_string(),
                    first: self.plugins[i]
                        .source()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    second: path.to_path_buf(),
                })
            }
            None => {
                self.plugins.push(loaded);
                self.plugins.len() - 1
            }
        };
        Ok(&mut self.plugins[i])
    }

    /// The plugin called `name`.
    pub fn get(&self, name: &str) -> Option<&LoadedPlugin> {
        self.plugins.iter().find(|p| p.name() == name)
    }

    /// The plugin called `name`, to call it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut LoadedPlugin> {
        self.plugins.iter_mut().find(|p| p.name() == name)
    }

    /// Removes and returns the plugin called `name` (e.g. to move it into a worker thread).
    pub fn take(&mut self, name: &str) -> Option<LoadedPlugin> {
        let i = self.plugins.iter().position(|p| p.name() == name)?;
        Some(self.plugins.remove(i))
    }

    /// The plugins that implement `kind`, in registration order.
    pub fn by_kind(&self, kind: PluginKind) -> impl Iterator<Item = &LoadedPlugin> {
        self.plugins.iter().filter(move |p| p.has_kind(kind))
    }

    /// Mutable access to the plugins that implement `kind`, in registration order.
    pub fn by_kind_mut(&mut self, kind: PluginKind) -> impl Iterator<Item = &mut LoadedPlugin> {
        self.plugins.iter_mut().filter(move |p| p.has_kind(kind))
    }

    /// All plugins, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &LoadedPlugin> {
        self.plugins.iter()
    }

    /// One row per plugin for `cogvx plugins`: name, kinds, transport, API version, source.
    pub fn list(&self) -> Vec<PluginRow> {
        self.plugins
            .iter()
            .map(|p| PluginRow {
                name: p.name().to_string(),
                version: p.version().to_string(),
                kinds: p.kinds().to_vec(),
                transport: p.transport(),
                api_version: p.api_version().to_string(),
                source: p
                    .source()
                    .map(|s| s.display().to_string())
                    .unwrap_or_else(|| "built-in".into()),
            })
            .collect()
    }
}
