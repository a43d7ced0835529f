//! Text conditioning for CogVideoX: the T5 tokenizer and the T5 v1.1 encoder.
//!
//! * [`T5Tokenizer`]: reads a diffusers `tokenizer/` folder (`tokenizer.json` or `spiece.model`)
//!   and gives transformers' `T5Tokenizer` ids.

pub mod spm;
pub mod tokenizer;

pub use tokenizer::{T5Tokenizer, TokenizerConfig, TokenizerSource};

use std::path::PathBuf;

/// Errors of the text crate.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tokenizer file is malformed or not a T5 tokenizer.
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// Bad arguments (e.g. `max_length` 0, ids out of the vocabulary).
    #[error("{0}")]
    InvalidInput(String),
    /// Loading the encoder's config or weights failed.
    #[error(transparent)]
    Load(#[from] cogvx_model_core::LoadError),
}
