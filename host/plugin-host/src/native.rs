//! Native transport: a `.so` exporting the abi_stable root module of `export_plugin!`.
//!
//! Load order: open the library, read its abi_stable header, compare the plugin API version
//! stored there (before any layout check, so another API version gets a one-line refusal),
//! check the root module's layout, then the module's own `api_version` field.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::{RResult, RStr, RVec};
use cogvx_plugin_api::native::{InstanceHandle, NativeError, NativeErrorKind, PluginModuleRef};
use cogvx_plugin_api::*;

use crate::LoadError;

/// A native plugin instance. The library is never unloaded (abi_stable leaks it on purpose).
pub(crate) struct NativePlugin {
    module: PluginModuleRef,
    handle: InstanceHandle,
    params: Option<String>,
    path: PathBuf,
    info: Option<PluginInfo>,
}

// SAFETY: the instance is a `Box<dyn Plugin>` (`Plugin: Send`) owned by this value alone; the
// module's functions are plain `extern "C"` functions without thread affinity.
unsafe impl Send for NativePlugin {}

/// Whether a library built for API `found` can be used by this host (`ours`): same major
/// version, and for 0.x the same minor version.
pub(crate) fn api_compatible(found: &str, ours: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parse(found), parse(ours)) {
        (Some((fa, fb)), Some((oa, ob))) => fa == oa && (oa != 0 || fb == ob),
        _ => false,
    }
}

fn first_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = lines
        .iter()
        .take(n)
        .copied()
        .collect::<Vec<_>>()
        .join("\n  ");
    if lines.len() > n {
        out.push_str(&format!("\n  ... ({} more lines)", lines.len() - n));
    }
    out
}

fn library_error(path: &Path, e: LibraryError) -> LoadError {
    let path = path.to_path_buf();
    match e {
        LibraryError::OpenError { err, .. } => {
            LoadError::NotAPlugin { path, reason: format!("not a loadable shared library ({err})") }
        }
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
            path,
            reason: "it is a shared library but exports no cogvx/abi_stable root module \
                     (build the plugin crate with `--features native-export` and call `export_plugin!`)"
                .into(),
        },
        LibraryError::InvalidAbiHeader(h) => LoadError::NotAPlugin {
            path,
            reason: format!("it was built with an incompatible abi_stable ({h:?}); rebuild it against cogvx-plugin-api {API_VERSION}"),
        },
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => LoadError::ApiVersion {
            path,
            found: actual_version.to_string(),
            expected: expected_version.to_string(),
        },
        LibraryError::AbiInstability(err) => LoadError::NotAPlugin {
            path,
            reason: format!(
                "its root module does not have the layout of cogvx plugin API {API_VERSION} \
                 (built against another cogvx-plugin-api?):\n  {}",
                first_lines(&err.to_string(), 12)
            ),
        },
        other => LoadError::Start { path, reason: first_lines(&other.to_string(), 12) },
    }
}

/// Checks that an ELF file's program segments and section table lie inside the file (a file
/// that is not ELF is left to the loader, which refuses it with its own message).
fn check_elf_extent(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Ok(());
    }
    let len = bytes.len() as u64;
    let short = |what: String| {
        format!("the file is truncated or damaged: {what}, but the file has {len} bytes (copy or build it again)")
    };
    if bytes.len() < 64 || bytes[4] != 2 || bytes[5] != 1 {
        return Err(if bytes.len() < 64 {
            short("its ELF header needs 64 bytes".into())
        } else {
            "it is not a 64-bit little-endian ELF library".into()
        });
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes")) as u64;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let (phoff, shoff) = (u64_at(0x20), u64_at(0x28));
    let (phentsize, phnum, shentsize, shnum) =
        (u16_at(0x36), u16_at(0x38), u16_at(0x3a), u16_at(0x3c));
    let ph_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    if ph_end > len || phentsize < 56 {
        return Err(short(format!("its program headers end at byte {ph_end}")));
    }
    let sh_end = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if sh_end > len {
        return Err(short(format!("its section headers end at byte {sh_end}")));
    }
    for i in 0..phnum {
        let h = (phoff + i * phentsize) as usize;
        // PT_LOAD segments are mapped from the file.
        if u32_at(h) == 1 {
            let (offset, filesz) = (u64_at(h + 8), u64_at(h + 32));
            let end = offset.saturating_add(filesz);
            if end > len {
                return Err(short(format!(
                    "its loadable segment {i} ends at byte {end}"
                )));
            }
        }
    }
    Ok(())
}

/// Says once per library that a native plugin runs unsandboxed: its initialisers run inside
/// the host when it is loaded, before any check, with the host's rights (only `.wasm` plugins
/// are sandboxed).
fn warn_native_once(path: &Path) {
    static SEEN: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|p| p == path) {
        seen.push(path.to_path_buf());
        tracing::warn!(
            "loading native plugin {}: native plugins are not sandboxed; its code runs in this process with your rights \
             as soon as it is loaded, before any check (use a .wasm build of a plugin you do not trust)",
            path.display()
        );
    }
}

impl NativePlugin {
    /// Loads, checks and instantiates; returns the instance, its info and its API version.
    pub(crate) fn load(path: &Path) -> Result<(Self, PluginInfo, String), LoadError> {
        if let Err(e) = std::fs::metadata(path) {
            return Err(LoadError::Unreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
        // A truncated library maps pages past the end of the file: the loader dies of SIGBUS
        // touching them, with no message. Its segments must lie inside the file.
        check_elf_extent(path).map_err(|reason| LoadError::NotAPlugin {
            path: path.to_path_buf(),
            reason,
        })?;
        warn_native_once(path);
        let header = lib_header_from_path(path).map_err(|e| library_error(path, e))?;
        let found = header.version_strings().version.as_str().to_string();
        if !api_compatible(&found, API_VERSION) {
            return Err(LoadError::ApiVersion {
                path: path.to_path_buf(),
                found,
                expected: API_VERSION.into(),
            });
        }
        header
            .ensure_layout::<PluginModuleRef>()
            .map_err(|e| library_error(path, e))?;
        // SAFETY: the layout was checked just above.
        let module = unsafe { header.init_root_module_with_unchecked_layout::<PluginModuleRef>() }
            .map_err(|e| library_error(path, e))?;
        let declared = module.api_version().as_str().to_string();
        if !api_compatible(&declared, API_VERSION) {
            return Err(LoadError::ApiVersion {
                path: path.to_path_buf(),
                found: declared,
                expected: API_VERSION.into(),
            });
        }
        let handle = match (module.new_instance())() {
            RResult::ROk(h) => h,
            RResult::RErr(e) => {
                return Err(LoadError::Start {
                    path: path.to_path_buf(),
                    reason: format!("creating the instance: {}", e.message),
                })
            }
        };
        let mut plugin = NativePlugin {
            module,
            handle,
            params: None,
            path: path.to_path_buf(),
            info: None,
        };
        let info = plugin.info_checked().map_err(|e| LoadError::Start {
            path: path.to_path_buf(),
            reason: format!("`info`: {e}"),
        })?;
        plugin.info = Some(info.clone());
        Ok((plugin, info, declared))
    }

    fn info_checked(&mut self) -> PluginResult<PluginInfo> {
        let (json, _) = self.raw_call("info", String::new(), Vec::new())?;
        let info: PluginInfo = serde_json::from_str(&json).map_err(|e| {
            PluginError::Failed(format!("the plugin answered `info` with bad JSON: {e}"))
        })?;
        if info.name.trim().is_empty() {
            return Err(PluginError::Failed("the plugin's name is empty".into()));
        }
        Ok(info)
    }

    /// Frees the instance and creates a fresh one, configured with the stored parameters. When
    /// the fresh instance fails (or panics) in `configure`, it is dropped and the plugin is left
    /// without one: the next call tries again, once. Nothing here recurses, so a plugin that
    /// panics in `configure` gives one error per call (it used to recreate, re-configure and
    /// panic again until the stack overflowed).
    fn recreate(&mut self) -> Result<(), String> {
        self.drop_instance();
        match (self.module.new_instance())() {
            RResult::ROk(h) => self.handle = h,
            RResult::RErr(e) => {
                return Err(format!("recreating the instance failed: {}", e.message))
            }
        }
        if let Some(params) = self.params.clone() {
            let json = serde_json::to_string(&params).expect("a string serialises");
            if let Err(e) = self.call_once("configure", json, Vec::new()) {
                self.drop_instance();
                return Err(format!(
                    "re-configuring the recreated instance failed: {}",
                    e.message
                ));
            }
        }
        Ok(())
    }

    fn drop_instance(&mut self) {
        let handle = std::mem::replace(&mut self.handle, InstanceHandle(std::ptr::null_mut()));
        if !handle.0.is_null() {
            (self.module.drop_instance())(handle);
        }
    }

    /// One call on the current instance, without recovery.
    fn call_once(
        &mut self,
        method: &str,
        json: String,
        bytes: Vec<u8>,
    ) -> Result<(String, Vec<u8>), NativeError> {
        match (self.module.call())(
            self.handle,
            RStr::from_str(method),
            RStr::from_str(&json),
            RVec::from(bytes),
        ) {
            RResult::ROk(r) => Ok((r.json.into_string(), r.bytes.into_vec())),
            RResult::RErr(e) => Err(e),
        }
    }

    fn raw_call(
        &mut self,
        method: &str,
        json: String,
        bytes: Vec<u8>,
    ) -> PluginResult<(String, Vec<u8>)> {
        if self.handle.0.is_null() {
            self.recreate().map_err(PluginError::Failed)?;
        }
        match self.call_once(method, json, bytes) {
            Ok(r) => Ok(r),
            Err(e) => {
                let m = e.message.into_string();
                Err(match e.kind {
                    NativeErrorKind::Unsupported => PluginError::Unsupported(m),
                    NativeErrorKind::Invalid => PluginError::Invalid(m),
                    NativeErrorKind::Failed => PluginError::Failed(m),
                    NativeErrorKind::Panicked => {
                        let note = match self.recreate() {
                            Ok(()) => "the instance was recreated".to_string(),
                            Err(e) => {
                                tracing::warn!(plugin = %self.path.display(), "{e}");
                                e
                            }
                        };
                        PluginError::Failed(format!("{m} ({note})"))
                    }
                })
            }
        }
    }

    fn call<A: serde::Serialize, R: serde::de::DeserializeOwned>(
        &mut self,
        method: &str,
        arg: &A,
    ) -> PluginResult<R> {
        self.call_bytes(method, arg, Vec::new()).map(|(r, _)| r)
    }

    fn call_bytes<A: serde::Serialize, R: serde::de::DeserializeOwned>(
        &mut self,
        method: &str,
        arg: &A,
        bytes: Vec<u8>,
    ) -> PluginResult<(R, Vec<u8>)> {
        let json = serde_json::to_string(arg)
            .map_err(|e| PluginError::Failed(format!("cannot encode the arguments: {e}")))?;
        let (out, bytes) = self.raw_call(method, json, bytes)?;
        let value = serde_json::from_str(&out).map_err(|e| {
            PluginError::Failed(format!(
                "the plugin's answer is not a valid {method} result: {e}"
            ))
        })?;
        Ok((value, bytes))
    }
}

impl Drop for NativePlugin {
    fn drop(&mut self) {
        self.drop_instance();
    }
}

impl Plugin for NativePlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone().expect("set by `load`")
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.params = Some(params_json.to_string());
        let _: () = self.call("configure", &params_json)?;
        Ok(())
    }

    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        self.call("list-samples", &root)
    }

    fn plan_transform(&mut self, request: &TransformRequest) -> PluginResult<TransformPlan> {
        self.call("plan-transform", request)
    }

    fn transform_frames(&mut self, frames: Frames) -> PluginResult<Frames> {
        let (header, rgb) = native::split_frames(frames);
        let (mut out, rgb): (Frames, Vec<u8>) =
            self.call_bytes("transform-frames", &header, rgb)?;
        out.rgb = rgb;
        Ok(out)
    }

    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        self.call("rewrite-prompt", &caption)
    }

    fn adapter_recipe(&mut self, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
        self.call("adapter-recipe", request)
    }

    fn scheduler_tables(&mut self, config_json: &str) -> PluginResult<SchedulerTables> {
        self.call("scheduler-tables", &config_json)
    }

    fn scheduler_plan(&mut self, request: &SchedulerPlanRequest) -> PluginResult<InferencePlan> {
        self.call("scheduler-plan", request)
    }

    fn validate(&mut self, request: &ValidateRequest) -> PluginResult<Vec<Metric>> {
        // Send the pixels as bytes, the rest as JSON (without cloning the pixels).
        #[derive(serde::Serialize)]
        struct Head<'a> {
            prompt: &'a str,
            frames: FramesHead,
            fps: f64,
        }
        #[derive(serde::Serialize)]
        struct FramesHead {
            width: u32,
            height: u32,
            count: u32,
            rgb: [u8; 0],
        }
        let f = &request.frames;
        let head = Head {
            prompt: &request.prompt,
            frames: FramesHead {
                width: f.width,
                height: f.height,
                count: f.count,
                rgb: [],
            },
            fps: request.fps,
        };
        self.call_bytes("validate", &head, f.rgb.clone())
            .map(|(m, _)| m)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_versions() {
        use super::api_compatible as c;
        assert!(c("0.1.0", "0.1.0"));
        assert!(c("0.1.3", "0.1.0"));
        assert!(!c("0.2.0", "0.1.0"));
        assert!(!c("0.0.9", "0.1.0"));
        assert!(c("1.4.0", "1.0.0"));
        assert!(!c("2.0.0", "1.0.0"));
        assert!(!c("garbage", "0.1.0"));
    }
}
