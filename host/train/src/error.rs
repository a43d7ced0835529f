//! Errors of the training core.

use cogvx_model_core::adapter::AdapterError;
use cogvx_model_core::LoadError;
use cogvx_scheduler::SchedulerError;
use cogvx_transformer::TransformerError;
use std::path::PathBuf;

/// Why a training step, an adapter injection or an export failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Transformer(#[from] TransformerError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Adapters(#[from] cogvx_adapters::AdaptersError),
    /// A batch, a setting or a parameter set that cannot be used, with what to do about it.
    #[error("{0}")]
    Invalid(String),
    /// Writing or reading a file failed.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

pub(crate) fn invalid<T>(message: impl Into<String>) -> Result<T, TrainError> {
    Err(TrainError::Invalid(message.into()))
}
