//! Atomic file writes: write to a temporary file in the destination's folder, then rename.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, VideoError};

/// A temporary path next to `dest` (same folder, hidden name), unique within this process.
pub fn temp_path(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = format!(".{name}.tmp-{}-{n}", std::process::id());
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(tmp),
        _ => PathBuf::from(tmp),
    }
}

/// Runs `write` on a temporary path next to `dest` and renames the result onto `dest`;
/// on failure the temporary file is removed and `dest` is left untouched.
pub fn write_atomically(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(dest);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, dest).map_err(|source| VideoError::Io {
            path: dest.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
