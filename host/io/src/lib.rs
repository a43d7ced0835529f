//! # cogvx-io
//!
//! The one place cogvx writes files that a crash or a bad input must never leave half-written
//! (cache entries, checkpoints, exports, metrics, videos): everything is written to a hidden
//! temporary file in the destination's folder, flushed to disk, then renamed over the
//! destination, so a reader sees the old file or the new one. On failure the temporary file is
//! removed and the destination is untouched.

#![deny(missing_docs)]

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A hidden temporary path next to `dest` (same folder, so the rename stays on one file
/// system), unique within this process: `<dir>/.<name>.tmp-<pid>-<n>`.
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

/// Runs `write` on a temporary path next to `dest` and renames the result onto `dest`. On
/// failure (of `write`, or of the rename, mapped by `rename_error`) the temporary file is
/// removed and `dest` is left as it was. `write` should flush what it wrote to disk.
pub fn write_via_temp<E>(
    dest: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
    rename_error: impl FnOnce(io::Error) -> E,
) -> Result<(), E> {
    let tmp = temp_path(dest);
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, dest).map_err(rename_error));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `dest` atomically: a temporary file in the same folder, fsynced, then
/// renamed over `dest`.
pub fn write_atomically(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    write_via_temp(
        dest,
        |tmp| {
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        },
        |e| e,
    )
}

/// Named float32 tensors as shape and row-major values.
pub type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Writes a safetensors file of float32 tensors with `metadata` (the header's `__metadata__`),
/// atomically, creating the parent folder. Tensors are laid out in name order, the header is
/// padded to 8 bytes as the safetensors writer does. A tensor whose shape does not hold its
/// values is an [`io::ErrorKind::InvalidInput`] error and nothing is written.
pub fn write_safetensors_f32(
    path: &Path,
    tensors: &F32Tensors,
    metadata: &BTreeMap<String, String>,
) -> io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!(metadata));
    let mut offset = 0usize;
    for (name, (shape, data)) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tensor `{name}`: shape {shape:?} does not hold {} values",
                    data.len()
                ),
            ));
        }
        let end = offset + 4 * data.len();
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header =
        serde_json::to_string(&Value::Object(header)).expect("JSON of strings and numbers");
    header.push_str(&" ".repeat((8 - header.len() % 8) % 8));
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_via_temp(
        path,
        |tmp| {
            let mut f = io::BufWriter::new(std::fs::File::create(tmp)?);
            f.write_all(&(header.len() as u64).to_le_bytes())?;
            f.write_all(header.as_bytes())?;
            for (_, data) in tensors.values() {
                for x in data {
                    f.write_all(&x.to_le_bytes())?;
                }
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()
        },
        |e| e,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_through_the_reference_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/t.safetensors");
        let tensors = F32Tensors::from([
            ("b".to_string(), (vec![2, 2], vec![1.0, -2.0, 3.5, 4.0])),
            (
                "a".to_string(),
                (vec![3], vec![0.25, 0.5, f32::MIN_POSITIVE]),
            ),
        ]);
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors_f32(&path, &tensors, &meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let b = st.tensor("b").unwrap();
        assert_eq!(b.shape(), &[2, 2]);
        let vals: Vec<f32> = b
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, vec![1.0, -2.0, 3.5, 4.0]);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            header.metadata().as_ref().unwrap().get("format").unwrap(),
            "pt"
        );
        // Only the file itself is left in the folder.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_bad_shape_writes_nothing_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, b"old").unwrap();
        let tensors = F32Tensors::from([("x".to_string(), (vec![3], vec![1.0]))]);
        let err = write_safetensors_f32(&path, &tensors, &BTreeMap::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("tensor `x`"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f.json");
        std::fs::write(&dest, b"old").unwrap();
        let r: Result<(), String> = write_via_temp(
            &dest,
            |tmp| {
                std::fs::write(tmp, b"half").unwrap();
                Err("disk full".into())
            },
            |e| e.to_string(),
        );
        assert_eq!(r.unwrap_err(), "disk full");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomically(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
