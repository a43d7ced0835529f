//! # cogvx plugin host
//!
//! Loads cogvx plugins and puts every one of them behind the same
//! [`cogvx_plugin_api::Plugin`] interface, whatever its transport:
//!
//! * **built-in**: a plugin crate linked into the binary (`my_plugin::builtin()`),
//! * **native**: a `.so` exporting the abi_stable root module of `export_plugin!`; the API
//!   version and the root module's layout are checked at load, a panic becomes an error,
//! * **WASM**: a `wasm32-wasip2` component of the `cogvx:plugin@0.1.0` world, run by wasmtime
//!   in a sandbox (no filesystem, network or environment; a dataset reader sees its dataset
//!   root read-only), with a memory cap per instance and a time cap per call ([`WasmLimits`]).
//!
//! [`LoadedPlugin`] wraps one plugin: it names the plugin, its version, transport and call in
//! every error, and checks what the plugin returns (plans via [`TransformPlan::check`](cogvx_plugin_api::TransformPlan::check), frames,
//! sample paths). [`Registry`] holds the built-ins and the loaded files for `cogvx plugins`.

mod error;
mod loaded;
mod native;
mod registry;
#[cfg(feature = "testing")]
pub mod testing;
mod validate;
mod wasm;

pub use error::LoadError;
pub use loaded::{LoadedPlugin, Transport};
pub use registry::{PluginRow, Registry};
pub use validate::validate_samples;
pub use wasm::{WasmLimits, GUEST_DATASET_ROOT};

pub use cogvx_plugin_api::{
    Plugin, PluginError, PluginInfo, PluginKind, PluginResult, API_VERSION,
};

/// The plugin API versions this host can load (one WIT binding / native layout per version).
pub const SUPPORTED_API_VERSIONS: &[&str] = &[API_VERSION];
