//! Typed reading of `config.json` files.

use crate::LoadError;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads and parses a JSON config into `T`. Errors name the file, the line/column and the key.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
