//! Errors of adapter injection and of adapter files.

use cogvx_model_core::adapter::AdapterError;
use std::path::PathBuf;

/// Why an adapter could not be injected, read or written.
#[derive(Debug, thiserror::Error)]
pub enum AdaptersError {
    /// A plugin's adapter recipe or the LoRA math refused the layer.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A setting, a file's contents or a parameter set that cannot be used, with what to do.
    #[error("{0}")]
    Invalid(String),
    /// Writing or reading a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

pub(crate) fn invalid<T>(message: impl Into<String>) -> Result<T, AdaptersError> {
    Err(AdaptersError::Invalid(message.into()))
}
