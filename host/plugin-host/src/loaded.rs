//! [`LoadedPlugin`]: one plugin behind the `Plugin` trait, whatever its transport.

use std::path::{Path, PathBuf};

use cogvx_plugin_api::text::display_safe;
use cogvx_plugin_api::*;

use crate::validate::validate_samples;
use crate::{native, wasm, LoadError, WasmLimits};

/// The longest message of a plugin's error that is kept (the rest is counted, not printed).
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// Checks and bounds what a loaded plugin says about itself: the name is 1 to 64 characters
/// of `[A-Za-z0-9._-]` (it appears in configs, tables and cache keys); the version and
/// description are printed without control characters and cut to 64 and 256 bytes.
fn checked_info(mut info: PluginInfo, path: &Path) -> Result<PluginInfo, LoadError> {
    let name_ok = (1..=64).contains(&info.name.len())
        && info
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !name_ok {
        return Err(LoadError::Start {
            path: path.to_path_buf(),
            reason: format!(
                "its name `{}` is not a plugin name (1 to 64 characters of letters, digits, `.`, `_` and `-`)",
                display_safe(&info.name, 64)
            ),
        });
    }
    info.version = display_safe(&info.version, 64);
    info.description = display_safe(&info.description, 256);
    Ok(info)
}

/// How a plugin reaches the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Linked into the binary.
    BuiltIn,
    /// A native `.so` loaded through abi_stable.
    Native,
    /// A sandboxed WASM component.
    Wasm,
}

impl Transport {
    /// `built-in`, `native` or `wasm`, as printed by `cogvx plugins`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::BuiltIn => "built-in",
            Transport::Native => "native",
            Transport::Wasm => "wasm",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plugin ready to call. It implements [`Plugin`] itself, so the rest of the host calls
/// every plugin the same way; each error is prefixed with the plugin's name, version,
/// transport (and file) and the call, and what the plugin returns is checked (plans with
/// [`TransformPlan::check`](cogvx_plugin_api::TransformPlan::check), frames with [`Frames::check`](cogvx_plugin_api::Frames::check), sample paths with [`validate_samples`]).
pub struct LoadedPlugin {
    info: PluginInfo,
    transport: Transport,
    api_version: String,
    source: Option<PathBuf>,
    /// sha256 of the file the plugin was loaded from (`None` for built-ins).
    digest: Option<String>,
    inner: Box<dyn Plugin>,
}

/// The sha256 of a plugin file, hex.
fn file_digest(path: &Path) -> Result<String, LoadError> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| LoadError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("info", &self.info)
            .field("transport", &self.transport)
            .field("api_version", &self.api_version)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// Wraps a built-in plugin (e.g. `cogvx_plugin_crop_resize::builtin()`).
    pub fn builtin(plugin: Box<dyn Plugin>) -> Self {
        LoadedPlugin {
            info: plugin.info(),
            transport: Transport::BuiltIn,
            api_version: API_VERSION.to_string(),
            source: None,
            digest: None,
            inner: plugin,
        }
    }

    /// Loads a plugin file by its extension: `.wasm` (component) or `.so` (native library).
    pub fn load(path: &Path, limits: &WasmLimits) -> Result<Self, LoadError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("wasm") => Self::load_wasm(path, limits),
            Some("so") | Some("dylib") | Some("dll") => Self::load_native(path),
            _ => Err(LoadError::UnknownExtension {
                path: path.to_path_buf(),
            }),
        }
    }

    /// Loads a WASM component (compiled once per process; instantiated in a sandbox).
    pub fn load_wasm(path: &Path, limits: &WasmLimits) -> Result<Self, LoadError> {
        let (plugin, info, api_version) = wasm::WasmPlugin::load(path, limits)?;
        let info = checked_info(info, path)?;
        Ok(LoadedPlugin {
            info,
            transport: Transport::Wasm,
            api_version,
            source: Some(path.to_path_buf()),
            digest: Some(file_digest(path)?),
            inner: Box::new(plugin),
        })
    }

    /// Loads a native plugin library, checking its API version and root-module layout.
    pub fn load_native(path: &Path) -> Result<Self, LoadError> {
        let (plugin, info, api_version) = native::NativePlugin::load(path)?;
        let info = checked_info(info, path)?;
        Ok(LoadedPlugin {
            info,
            transport: Transport::Native,
            api_version,
            source: Some(path.to_path_buf()),
            digest: Some(file_digest(path)?),
            inner: Box::new(plugin),
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The plugin's own version.
    pub fn version(&self) -> &str {
        &self.info.version
    }

    /// The kinds the plugin implements.
    pub fn kinds(&self) -> &[PluginKind] {
        &self.info.kinds
    }

    /// Whether the plugin implements `kind`.
    pub fn has_kind(&self, kind: PluginKind) -> bool {
        self.info.kinds.contains(&kind)
    }

    /// How the plugin is loaded.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The plugin API version the plugin was built against.
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The file the plugin was loaded from (`None` for built-ins).
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The sha256 (hex) of the file the plugin was loaded from; `None` for built-ins. Part of
    /// the cache keys of what the plugin produces, so that a file plugin named like a built-in
    /// (or a rebuilt one with an unchanged version) never reuses the other's entries.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `plugin `name` version (transport[, file])`, the prefix of every error.
    pub fn label(&self) -> String {
        match &self.source {
            Some(p) => format!(
                "plugin `{}` {} ({}, {})",
                self.info.name,
                self.info.version,
                self.transport,
                p.display()
            ),
            None => format!(
                "plugin `{}` {} ({})",
                self.info.name, self.info.version, self.transport
            ),
        }
    }

    fn wrap<T>(&self, call: &str, r: PluginResult<T>) -> PluginResult<T> {
        r.map_err(|e| {
            let label = self.label();
            let e = match e {
                PluginError::Unsupported(m) => {
                    PluginError::Unsupported(display_safe(&m, MAX_MESSAGE_BYTES))
                }
                PluginError::Invalid(m) => {
                    PluginError::Invalid(display_safe(&m, MAX_MESSAGE_BYTES))
                }
                PluginError::Failed(m) => PluginError::Failed(display_safe(&m, MAX_MESSAGE_BYTES)),
            };
            match e {
                PluginError::Unsupported(m) => {
                    PluginError::Unsupported(format!("{label}: `{call}`: {m}"))
                }
                PluginError::Invalid(m) => PluginError::Invalid(format!("{label}: `{call}`: {m}")),
                PluginError::Failed(m) => {
                    PluginError::Failed(format!("{label}: `{call}` failed: {m}"))
                }
            }
        })
    }

    fn bad_output(&self, call: &str, what: &str, why: String) -> PluginError {
        PluginError::Failed(format!("{}: `{call}` returned {what}: {why}", self.label()))
    }
}

impl Plugin for LoadedPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        let r = self.inner.configure(params_json);
        self.wrap("configure", r)
    }

    /// Lists the samples; paths under `root` are made relative to it, and every path must
    /// then be relative and stay inside the root.
    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        let r = self.inner.list_samples(root);
        let mut samples = self.wrap("list-samples", r)?;
        // Paths inside the root become relative to it; anything else is checked below.
        let relative = |p: &mut String| {
            if let Ok(rel) = Path::new(p.as_str()).strip_prefix(root) {
                *p = if rel.as_os_str().is_empty() {
                    ".".into()
                } else {
                    rel.to_string_lossy().into_owned()
                };
            }
        };
        for s in &mut samples {
            relative(&mut s.video);
            if let Some(image) = &mut s.image {
                relative(image);
            }
        }
        validate_samples(&samples)
            .map_err(|why| self.bad_output("list-samples", "a bad sample", why))?;
        Ok(samples)
    }

    fn plan_transform(&mut self, request: &TransformRequest) -> PluginResult<TransformPlan> {
        let r = self.inner.plan_transform(request);
        let plan = self.wrap("plan-transform", r)?;
        plan.check(&request.clip)
            .map_err(|why| self.bad_output("plan-transform", "a bad plan", why))?;
        Ok(plan)
    }

    fn transform_frames(&mut self, frames: Frames) -> PluginResult<Frames> {
        let r = self.inner.transform_frames(frames);
        let out = self.wrap("transform-frames", r)?;
        out.check()
            .map_err(|why| self.bad_output("transform-frames", "bad frames", why))?;
        Ok(out)
    }

    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        let r = self.inner.rewrite_prompt(caption);
        self.wrap("rewrite-prompt", r)
    }

    fn adapter_recipe(&mut self, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
        let r = self.inner.adapter_recipe(request);
        self.wrap("adapter-recipe", r)
    }

    fn scheduler_tables(&mut self, config_json: &str) -> PluginResult<SchedulerTables> {
        let r = self.inner.scheduler_tables(config_json);
        self.wrap("scheduler-tables", r)
    }

    fn scheduler_plan(&mut self, request: &SchedulerPlanRequest) -> PluginResult<InferencePlan> {
        let r = self.inner.scheduler_plan(request);
        self.wrap("scheduler-plan", r)
    }

    fn validate(&mut self, request: &ValidateRequest) -> PluginResult<Vec<Metric>> {
        let r = self.inner.validate(request);
        self.wrap("validate", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, version: &str, description: &str) -> PluginInfo {
        PluginInfo {
            name: name.into(),
            version: version.into(),
            kinds: vec![PluginKind::PromptRewriter],
            description: description.into(),
        }
    }

    /// A 50 MB name made `cogvx plugins` panic (format width); names with escapes reached the
    /// terminal. Names are checked at load; versions and descriptions are escaped and cut.
    #[test]
    fn what_a_plugin_says_about_itself_is_checked_and_bounded() {
        let p = Path::new("x.wasm");
        for bad in ["", "a b", "caption\u{1b}[2J", "../x", "é"] {
            let e = checked_info(info(bad, "1", ""), p).unwrap_err().to_string();
            assert!(
                e.contains("not a plugin name") && !e.contains('\u{1b}'),
                "{e}"
            );
        }
        let huge = "n".repeat(50 << 20);
        let e = checked_info(info(&huge, "1", ""), p)
            .unwrap_err()
            .to_string();
        assert!(e.len() < 1024, "{}", e.len());
        let ok = checked_info(
            info("crop_resize-2.v1", "1.0\u{1b}[31m", &"d".repeat(10_000)),
            p,
        )
        .unwrap();
        assert_eq!(ok.version, "1.0\\u{1b}[31m");
        assert!(ok.description.len() < 300 && ok.description.ends_with("more bytes)"));
    }
}
