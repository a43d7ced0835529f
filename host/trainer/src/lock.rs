//! One run per output folder: an advisory lock on `<output_dir>/.cogvx.lock`, naming its holder.
//!
//! A second run in the same folder deleted the first one's checkpoint being written (it removes
//! stale temp folders when it starts), and the first run died. The lock is held for the whole
//! run and released when the process ends, however it ends (the kernel drops `flock` locks).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::TrainerError;

/// The lock file inside the output folder.
pub const LOCK_FILE: &str = ".cogvx.lock";

/// A held lock on an output folder (released on drop).
#[derive(Debug)]
pub struct OutputLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl OutputLock {
    /// Takes the lock of `dir` (created if needed) or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, TrainerError> {
        let path = dir.join(LOCK_FILE);
        let io = |e: std::io::Error| TrainerError::Io {
            path: path.clone(),
            message: format!("cannot lock the output folder: {e}"),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if !try_lock(&file).map_err(io)? {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(TrainerError::Input(format!(
                "{} is in use by another cogvx run ({}); wait for it to finish, or choose another `[train] output_dir`",
                dir.display(),
                cogvx_plugin_api::text::display_safe(holder.trim(), 200)
            )));
        }
        let holder = format!(
            "pid {}, started {} s after the epoch",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        file.set_len(0).map_err(io)?;
        file.write_all(holder.as_bytes()).map_err(io)?;
        Ok(OutputLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(unix)]
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true)
}
