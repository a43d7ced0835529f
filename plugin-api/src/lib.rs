//! # cogvx plugin API
//!
//! The stable contract between the `cogvx` host and its plugins. A plugin author implements
//! the plain [`Plugin`] trait (only the methods of the kinds it declares) and calls
//! [`export_plugin!`] once; the same crate then builds to
//!
//! * a **static built-in** (linked into the host as an `rlib`),
//! * a **native `.so`** (`--features native-export`, an abi_stable root module), and
//! * a **WASM component** (`cargo build --target wasm32-wasip2`, WIT package `cogvx:plugin@0.1.0`).
//!
//! API version: [`API_VERSION`].

#![deny(missing_docs)]

// Lets the wit-bindgen output (which names this crate by path) compile inside the crate itself.
extern crate self as cogvx_plugin_api;

mod types;
pub use types::*;

pub mod text;

#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
pub mod native;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

/// Implementation details of [`export_plugin!`]; not part of the stable API.
#[doc(hidden)]
pub mod __private {
    #[cfg(all(feature = "native", not(target_arch = "wasm32")))]
    pub use crate::native;
    #[cfg(target_arch = "wasm32")]
    pub use crate::wasm;
    #[cfg(all(feature = "native", not(target_arch = "wasm32")))]
    pub use abi_stable;
    #[cfg(target_arch = "wasm32")]
    pub use wit_bindgen;
}

/// Exports a plugin type (`Plugin + Default`) through every transport. Call it once, at the
/// root of the plugin crate:
///
/// ```
/// use cogvx_plugin_api::{Plugin, PluginInfo, PluginKind, PluginResult};
///
/// #[derive(Default)]
/// pub struct Shout;
///
/// impl Plugin for Shout {
///     fn info(&self) -> PluginInfo {
///         PluginInfo {
///             name: "shout".into(),
///             version: "0.1.0".into(),
///             kinds: vec![PluginKind::PromptRewriter],
///             description: "upper-cases captions".into(),
///         }
///     }
///     fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
///         Ok(caption.to_uppercase())
///     }
/// }
///
/// cogvx_plugin_api::export_plugin!(Shout);
/// # fn main() {
/// # let mut p = builtin();
/// # assert_eq!(p.rewrite_prompt("a cat").unwrap(), "A CAT");
/// # }
/// ```
///
/// It expands to
///
/// * `pub fn builtin() -> Box<dyn Plugin>`: the plugin as a **static built-in**. The host links
///   the crate as an rlib and calls `my_plugin_crate::builtin()`; since the function lives in
///   the plugin crate's namespace, any number of plugin crates link together without clashes.
/// * with the plugin crate's feature `native-export` on (declare it as
///   `native-export = ["cogvx-plugin-api/native"]`) and a `cdylib` crate type: the abi_stable
///   root module of a **native `.so`** (API version in the header, layout checked at load,
///   every entry point behind `catch_unwind`). The feature is off when the crate is linked as a
///   built-in, so the exported symbol never clashes between plugin crates.
/// * on `wasm32` (`cargo build --target wasm32-wasip2`): the exports of a **WASM component**
///   implementing the `cogvx:plugin@0.1.0` world (`wit/v0.1.0/`).
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        /// This crate's plugin as a static built-in, for hosts that link the crate as an rlib.
        pub fn builtin() -> ::std::boxed::Box<dyn $crate::Plugin> {
            ::std::boxed::Box::new(<$ty as ::core::default::Default>::default())
        }

        #[cfg(all(feature = "native-export", not(target_arch = "wasm32")))]
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        #[unsafe(no_mangle)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::abi_stable::library::LibHeader = {
            extern "C" fn __cogvx_root_module() -> $crate::__private::abi_stable::library::RootModuleResult {
                $crate::__private::abi_stable::library::__call_root_module_loader(
                    $crate::__private::native::root_module::<$ty>,
                )
            }
            // SAFETY: the constructor returns a `PluginModuleRef`, the type named here.
            unsafe {
                $crate::__private::abi_stable::library::LibHeader::from_constructor::<
                    $crate::__private::native::PluginModuleRef,
                >(__cogvx_root_module, $crate::__private::abi_stable::library::CheckTypeLayout::Yes)
            }
        };

        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        type __CogvxPluginWasmExport = $crate::__private::wasm::Export<$ty>;
        #[cfg(target_arch = "wasm32")]
        $crate::__private::wasm::bindings::__export_cogvx_plugin_v0_1_0!(
            __CogvxPluginWasmExport with_types_in $crate::__private::wasm::bindings
        );
    };
}

/// The plugin API version (also the WIT package version `cogvx:plugin@0.1.0`).
pub const API_VERSION: &str = "0.1.0";

/// Why a plugin call failed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PluginError {
    /// The plugin does not implement this call (it did not declare the kind).
    Unsupported(String),
    /// The input was rejected; the message says what and how to fix it.
    Invalid(String),
    /// Anything else.
    Failed(String),
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::Unsupported(m) => write!(f, "unsupported: {m}"),
            PluginError::Invalid(m) => write!(f, "invalid input: {m}"),
            PluginError::Failed(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for PluginError {}

/// Result of a plugin call.
pub type PluginResult<T> = Result<T, PluginError>;

/// serde and serde_json as this crate uses them, so a plugin can derive its parameter struct
/// without depending on them itself (`#[serde(crate = "cogvx_plugin_api::serde")]`).
pub use serde;
pub use serde_json;

/// Deserialises one field of a plugin's parameters, naming its key in the error (serde names
/// only unknown keys, not the key whose value has the wrong type). Use it through
/// [`keyed_fields!`].
pub fn keyed<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    key: &str,
    d: D,
) -> Result<T, D::Error> {
    T::deserialize(d).map_err(|e| <D::Error as serde::de::Error>::custom(format!("`{key}`: {e}")))
}

/// Defines field deserialisers that name their key in errors, for
/// `#[serde(deserialize_with = "...")]` on a plugin's parameter struct:
///
/// ```
/// cogvx_plugin_api::keyed_fields! {
///     de_rank: u32 = "rank";
///     de_use_rslora: bool = "use_rslora";
/// }
/// ```
#[macro_export]
macro_rules! keyed_fields {
    ($($name:ident: $ty:ty = $key:literal;)*) => {$(
        fn $name<'de, D: $crate::serde::Deserializer<'de>>(d: D) -> ::core::result::Result<$ty, D::Error> {
            $crate::keyed($key, d)
        }
    )*};
}

/// Parses a plugin's parameters (its `[plugin.<name>]` table as JSON; empty or `null` reads
/// as `{}`) into `T`, typically a `#[serde(deny_unknown_fields)]` struct, for
/// [`Plugin::configure`]. The error, [`PluginError::Invalid`], reads
/// `<plugin>: bad [plugin.<plugin>] table: <what serde says>`, without JSON line/column
/// positions: the JSON is the host's conversion of the user's TOML, so they would mislead.
pub fn parse_params<T: serde::de::DeserializeOwned>(
    plugin: &str,
    params_json: &str,
) -> PluginResult<T> {
    let text = params_json.trim();
    let text = if text.is_empty() || text == "null" {
        "{}"
    } else {
        text
    };
    serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) if e.line() > 0 => message[..i].to_string(),
            _ => message,
        };
        PluginError::Invalid(format!("{plugin}: bad [plugin.{plugin}] table: {message}"))
    })
}

fn unsupported<T>(call: &str) -> PluginResult<T> {
    Err(PluginError::Unsupported(format!(
        "this plugin does not implement `{call}`"
    )))
}

/// The one trait a plugin implements. Every method but [`Plugin::info`] has a default that
/// answers [`PluginError::Unsupported`]; implement those of the kinds listed in `info().kinds`.
pub trait Plugin: Send {
    /// Name, version, kinds and description.
    fn info(&self) -> PluginInfo;

    /// Receives the plugin's parameters from the config (`[plugin.<name>]` table, as JSON).
    /// Called once after loading, and again whenever the host recreates the instance.
    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        let _ = params_json;
        Ok(())
    }

    /// Dataset reader: list the samples under `root` (a directory the plugin may read).
    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        let _ = root;
        unsupported("list-samples")
    }

    /// Video transform: return the updated plan for this clip.
    fn plan_transform(&mut self, request: &TransformRequest) -> PluginResult<TransformPlan> {
        let _ = request;
        unsupported("plan-transform")
    }

    /// Video transform, pixel path: frames in, frames out (run after the plan is executed).
    fn transform_frames(&mut self, frames: Frames) -> PluginResult<Frames> {
        let _ = frames;
        unsupported("transform-frames")
    }

    /// Prompt rewriter: caption in, caption out.
    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        let _ = caption;
        unsupported("rewrite-prompt")
    }

    /// Adapter: the recipe for one target layer.
    fn adapter_recipe(&mut self, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
        let _ = request;
        unsupported("adapter-recipe")
    }

    /// Scheduler: training tables from the model's `scheduler_config.json` (see
    /// [`SchedulerTables`] for a plugin that only shapes the timestep distribution).
    fn scheduler_tables(&mut self, config_json: &str) -> PluginResult<SchedulerTables> {
        let _ = config_json;
        unsupported("scheduler-tables")
    }

    /// Scheduler: the inference steps' coefficients. A plugin without them (the default
    /// answer, unsupported) leaves validation to the model folder's own scheduler.
    fn scheduler_plan(&mut self, request: &SchedulerPlanRequest) -> PluginResult<InferencePlan> {
        let _ = request;
        unsupported("scheduler-plan")
    }

    /// Validator: metrics for decoded frames.
    fn validate(&mut self, request: &ValidateRequest) -> PluginResult<Vec<Metric>> {
        let _ = request;
        unsupported("validate")
    }
}
