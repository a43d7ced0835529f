//! Errors of the transformer crate.

use cogvx_model_core::LoadError;

/// Why the transformer could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum TransformerError {
    /// Reading the folder, the config or the weights failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `config.json` asks for something this port does not implement, or is inconsistent.
    #[error("transformer config {path}: {message}")]
    Config { path: String, message: String },
    /// An input tensor has a shape the model cannot take.
    #[error("transformer input: {0}")]
    Input(String),
    /// Writing a file failed ([`crate::random`]).
    #[error("{path}: {message}")]
    Io {
        path: std::path::PathBuf,
        message: String,
    },
}

pub(crate) fn input_err<T>(message: impl Into<String>) -> Result<T, TransformerError> {
    Err(TransformerError::Input(message.into()))
}
