//! Errors of loading a plugin file.

use std::path::PathBuf;

/// Why a plugin file could not be loaded. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The extension is neither `.wasm` nor `.so`.
    #[error("cannot load plugin {}: unknown file type; expected a `.wasm` component or a native `.so`", path.display())]
    UnknownExtension { path: PathBuf },
    /// The file does not exist or cannot be read.
    #[error("cannot load plugin {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    /// The file is not a cogvx plugin at all.
    #[error("{} is not a cogvx plugin: {reason}", path.display())]
    NotAPlugin { path: PathBuf, reason: String },
    /// The file is a cogvx plugin built for another plugin API version.
    #[error(
        "{} was built for cogvx plugin API {found}, but this host supports API {expected}; \
         rebuild the plugin against cogvx-plugin-api {expected}",
        path.display()
    )]
    ApiVersion {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The plugin was recognised but failed to start (instantiate, `info`, `configure`).
    #[error("cannot start plugin {}: {reason}", path.display())]
    Start { path: PathBuf, reason: String },
    /// Two loaded files declare the same plugin name.
    #[error("plugin `{name}` is loaded twice: from {first} and from {}; pass only one of them", second.display())]
    Duplicate {
        name: String,
        first: String,
        second: PathBuf,
    },
}
