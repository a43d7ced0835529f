//! Native (`.so`) transport: the abi_stable root module a plugin library exports, and the
//! plugin-side entry points. Every entry point runs inside `catch_unwind`, so a panicking
//! plugin reports [`NativeErrorKind::Panicked`] instead of aborting the host.
//!
//! Calls cross the boundary as `(method, JSON, bytes)`: the arguments and results are the
//! serde encodings of the crate's data types, except that frame pixels travel as a
//! separate byte vector (the `rgb` field is sent empty) so they are never JSON-encoded.
//! Plugin authors never touch this module; [`crate::export_plugin!`] wires it up.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use abi_stable;
use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::{Frames, Plugin, PluginError, PluginResult};

/// Name of the static that holds a plugin library's abi_stable header
/// (`abi_stable::library::ROOT_MODULE_LOADER_NAME`; checked by a unit test).
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// An opaque pointer to a plugin instance living inside the library
/// (`Box<Box<dyn Plugin>>`); only the library that created it may use or free it.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct InstanceHandle(pub *mut c_void);

/// How a native call failed.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeErrorKind {
    /// [`PluginError::Unsupported`].
    Unsupported,
    /// [`PluginError::Invalid`].
    Invalid,
    /// [`PluginError::Failed`].
    Failed,
    /// The plugin panicked; the instance must not be used again.
    Panicked,
}

/// An error crossing the native boundary.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct NativeError {
    /// How the call failed.
    pub kind: NativeErrorKind,
    /// What went wrong, for the user.
    pub message: RString,
}

/// A successful reply: the JSON-encoded result and, for frames, the pixels.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct NativeReply {
    /// The result, JSON-encoded (a `Frames` result is sent with `rgb` empty).
    pub json: RString,
    /// The pixels of a `Frames` result; empty otherwise.
    pub bytes: RVec<u8>,
}

/// The root module of a native cogvx plugin library.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin API version the library was built against ([`crate::API_VERSION`]).
    pub api_version: RStr<'static>,
    /// Creates a plugin instance (`T::default()`).
    pub new_instance: extern "C" fn() -> RResult<InstanceHandle, NativeError>,
    /// Calls `method` (the WIT function name, e.g. `plan-transform`) on an instance.
    pub call: extern "C" fn(
        InstanceHandle,
        RStr<'_>,
        RStr<'_>,
        RVec<u8>,
    ) -> RResult<NativeReply, NativeError>,
    /// Frees an instance.
    #[sabi(last_prefix_field)]
    pub drop_instance: extern "C" fn(InstanceHandle),
}

impl RootModule for PluginModuleRef {
    abi_stable::declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "cogvx_plugin";
    const NAME: &'static str = "cogvx_plugin";
    /// The plugin API version (not the crate version): the host reads it from the library
    /// header before the layout check, to refuse another API version with a clear message.
    const VERSION_STRINGS: VersionStrings = VersionStrings::new(crate::API_VERSION);
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

fn to_native(e: PluginError) -> NativeError {
    let (kind, m) = match e {
        PluginError::Unsupported(m) => (NativeErrorKind::Unsupported, m),
        PluginError::Invalid(m) => (NativeErrorKind::Invalid, m),
        PluginError::Failed(m) => (NativeErrorKind::Failed, m),
    };
    NativeError {
        kind,
        message: m.into(),
    }
}

fn panicked(payload: Box<dyn std::any::Any + Send>) -> NativeError {
    NativeError {
        kind: NativeErrorKind::Panicked,
        message: format!("panicked: {}", panic_message(payload)).into(),
    }
}

/// Entry point: creates an instance of `T`.
#[doc(hidden)]
pub extern "C" fn new_instance<T: Plugin + Default + 'static>(
) -> RResult<InstanceHandle, NativeError> {
    match catch_unwind(|| {
        let plugin: Box<dyn Plugin> = Box::new(T::default());
        InstanceHandle(Box::into_raw(Box::new(plugin)) as *mut c_void)
    }) {
        Ok(h) => RResult::ROk(h),
        Err(p) => RResult::RErr(panicked(p)),
    }
}

/// Entry point: frees an instance created by [`new_instance`]. A panic in `Drop` is swallowed.
#[doc(hidden)]
pub extern "C" fn drop_instance(handle: InstanceHandle) {
    if handle.0.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: created by `new_instance` of this library, freed once by the host.
        drop(unsafe { Box::from_raw(handle.0 as *mut Box<dyn Plugin>) });
    }));
}

/// Entry point: dispatches one call.
#[doc(hidden)]
pub extern "C" fn call(
    handle: InstanceHandle,
    method: RStr<'_>,
    json: RStr<'_>,
    bytes: RVec<u8>,
) -> RResult<NativeReply, NativeError> {
    if handle.0.is_null() {
        return RResult::RErr(NativeError {
            kind: NativeErrorKind::Failed,
            message: "null plugin instance".into(),
        });
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: created by `new_instance` of this library and not yet freed; the host
        // serialises calls on one instance.
        let plugin: &mut Box<dyn Plugin> = unsafe { &mut *(handle.0 as *mut Box<dyn Plugin>) };
        dispatch(
            plugin.as_mut(),
            method.as_str(),
            json.as_str(),
            bytes.into_vec(),
        )
    }));
    match result {
        Ok(Ok((json, bytes))) => RResult::ROk(NativeReply {
            json: json.into(),
            bytes: bytes.into(),
        }),
        Ok(Err(e)) => RResult::RErr(to_native(e)),
        Err(p) => RResult::RErr(panicked(p)),
    }
}

fn decode<T: serde::de::DeserializeOwned>(method: &str, json: &str) -> PluginResult<T> {
    serde_json::from_str(json).map_err(|e| {
        PluginError::Invalid(format!("{method}: cannot decode the host's arguments: {e}"))
    })
}

fn encode<T: serde::Serialize>(method: &str, value: &T) -> PluginResult<String> {
    serde_json::to_string(value)
        .map_err(|e| PluginError::Failed(format!("{method}: cannot encode the result: {e}")))
}

/// Splits the pixels off a `Frames` value (they travel as raw bytes).
#[doc(hidden)]
pub fn split_frames(mut frames: Frames) -> (Frames, Vec<u8>) {
    let rgb = std::mem::take(&mut frames.rgb);
    (frames, rgb)
}

/// Decodes and runs one call on `plugin`; used by the library side and, for tests, the host.
#[doc(hidden)]
pub fn dispatch(
    plugin: &mut dyn Plugin,
    method: &str,
    json: &str,
    bytes: Vec<u8>,
) -> PluginResult<(String, Vec<u8>)> {
    let none = Vec::new();
    match method {
        "info" => Ok((encode(method, &plugin.info())?, none)),
        "configure" => {
            let params: String = decode(method, json)?;
            plugin.configure(&params)?;
            Ok(("null".into(), none))
        }
        "list-samples" => {
            let root: String = decode(method, json)?;
            Ok((encode(method, &plugin.list_samples(&root)?)?, none))
        }
        "plan-transform" => {
            let request: crate::TransformRequest = decode(method, json)?;
            Ok((encode(method, &plugin.plan_transform(&request)?)?, none))
        }
        "transform-frames" => {
            let mut frames: Frames = decode(method, json)?;
            frames.rgb = bytes;
            let (header, rgb) = split_frames(plugin.transform_frames(frames)?);
            Ok((encode(method, &header)?, rgb))
        }
        "rewrite-prompt" => {
            let caption: String = decode(method, json)?;
            Ok((encode(method, &plugin.rewrite_prompt(&caption)?)?, none))
        }
        "adapter-recipe" => {
            let request: crate::AdapterRequest = decode(method, json)?;
            Ok((encode(method, &plugin.adapter_recipe(&request)?)?, none))
        }
        "scheduler-tables" => {
            let config: String = decode(method, json)?;
            Ok((encode(method, &plugin.scheduler_tables(&config)?)?, none))
        }
        "scheduler-plan" => {
            let request: crate::SchedulerPlanRequest = decode(method, json)?;
            Ok((encode(method, &plugin.scheduler_plan(&request)?)?, none))
        }
        "validate" => {
            let mut request: crate::ValidateRequest = decode(method, json)?;
            request.frames.rgb = bytes;
            Ok((encode(method, &plugin.validate(&request)?)?, none))
        }
        other => Err(PluginError::Unsupported(format!(
            "unknown native call `{other}`"
        ))),
    }
}

/// Builds the root module for plugin type `T` (called once, when the host loads the library).
#[doc(hidden)]
pub fn root_module<T: Plugin + Default + 'static>() -> PluginModuleRef {
    use abi_stable::prefix_type::PrefixTypeTrait;
    PluginModule {
        api_version: RStr::from_str(crate::API_VERSION),
        new_instance: new_instance::<T>,
        call,
        drop_instance,
    }
    .leak_into_prefix()
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_module_symbol_matches_abi_stable() {
        assert_eq!(
            super::ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}
