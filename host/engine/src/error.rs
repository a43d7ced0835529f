//! Errors of the engine.

use std::path::PathBuf;

/// Why loading a model folder, sampling or a parity run failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model folder is not a CogVideoX diffusers folder we can use; the message says what
    /// is wrong and where.
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    /// Bad sampling arguments (sizes, steps, latents shape...).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Load(#[from] cogvx_model_core::LoadError),
    #[error(transparent)]
    Transformer(#[from] cogvx_transformer::TransformerError),
    #[error(transparent)]
    Vae(#[from] cogvx_vae::VaeError),
    #[error(transparent)]
    Text(#[from] cogvx_text::TextError),
    #[error(transparent)]
    Scheduler(#[from] cogvx_scheduler::SchedulerError),
    /// A scheduler plugin refused to give tables or a plan.
    #[error("scheduler plugin `{plugin}`: {message}")]
    Plugin { plugin: String, message: String },
    /// Reading a conditioning image or writing a video failed.
    #[error(transparent)]
    Video(#[from] cogvx_video::VideoError),
    /// Reading a LoRA file failed.
    #[error(transparent)]
    Adapters(#[from] cogvx_adapters::AdaptersError),
    /// A LoRA file that does not fit the model; the message names the file and the key.
    #[error("{path}: {message}")]
    Lora { path: PathBuf, message: String },
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
