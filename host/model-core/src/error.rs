//! Errors of model loading.

use std::path::PathBuf;

/// Why a model folder, a config or a weight file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON config is malformed or has a value of the wrong type.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A folder has no weights in a layout we know.
    #[error("{dir}: no weights found (expected `*.safetensors` or `*.safetensors.index.json`)")]
    NoWeights { dir: PathBuf },
    /// A safetensors file is corrupt.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// The shard index names files that are not there.
    #[error("{index}: missing shard file(s): {}. Download the complete checkpoint folder.", missing.join(", "))]
    MissingShards {
        index: PathBuf,
        missing: Vec<String>,
    },
    /// A tensor is stored in a dtype we do not convert.
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    /// Keys missing, unexpected, or of the wrong shape, all listed at once.
    #[error("{dir}: the weights do not match the model config:\n{}", problems.join("\n"))]
    Mismatch { dir: PathBuf, problems: Vec<String> },
    /// Anything else that makes a model folder unusable (unknown variant, bad class name...).
    #[error("{0}")]
    Other(String),
}
