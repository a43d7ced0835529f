//! Entry files and the index: safetensors written atomically (temp + fsync + rename), each
//! carrying its own key and a sha256 of its tensor bytes, so a truncated, corrupt or misplaced
//! file is never read as valid.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::CacheError;

/// Format tag in every entry header (`cogvx-cache` metadata key).
pub const ENTRY_FORMAT: &str = "cogvx-cache/1";

/// A host tensor: shape and f32 data (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor; `data.len()` must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> CacheError {
    CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `dest` atomically ([`cogvx_io::write_atomically`]: a temporary file in the
/// same folder, fsynced, then renamed over `dest`).
pub fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    cogvx_io::write_atomically(dest, bytes).map_err(|e| io_err(dest, e))
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Serializes `tensors` (f32) with `key` and a content checksum in the header, and writes
/// the file atomically.
pub fn write_entry(
    path: &Path,
    key: &str,
    tensors: &[(&str, &HostTensor)],
) -> Result<(), CacheError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), f32_bytes(&t.data), t.shape.clone()))
        .collect();
    let mut sorted: Vec<&(String, Vec<u8>, Vec<usize>)> = bytes.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (n, b, s) in &sorted {
        h.update(n.as_bytes());
        h.update(format!("{s:?}").as_bytes());
        h.update(b);
    }
    let checksum = hex(&h.finalize());
    let mut views = Vec::new();
    for (n, b, s) in &bytes {
        let v = TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| CacheError::Entry {
            path: path.to_path_buf(),
            message: format!("cannot serialize tensor `{n}`: {e}"),
        })?;
        views.push((n.clone(), v));
    }
    let meta = HashMap::from([
        ("format".to_string(), ENTRY_FORMAT.to_string()),
        ("key".to_string(), key.to_string()),
        ("sha256".to_string(), checksum),
    ]);
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| CacheError::Entry {
        path: path.to_path_buf(),
        message: format!("cannot serialize: {e}"),
    })?;
    write_atomically(path, &out)
}

/// Reads and validates an entry file: parses as safetensors, has this crate's format tag,
/// its header key equals `key`, every tensor is f32 and the checksum matches. Returns the
/// tensors by name.
pub fn read_entry(path: &Path, key: &str) -> Result<BTreeMap<String, HostTensor>, CacheError> {
    let bad = |message: String| CacheError::Entry {
        path: path.to_path_buf(),
        message,
    };
    let buf = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let st = SafeTensors::deserialize(&buf).map_err(|e| {
        bad(format!(
            "not a valid safetensors file (truncated or corrupt?): {e}"
        ))
    })?;
    let (_, meta) =
        SafeTensors::read_metadata(&buf).map_err(|e| bad(format!("unreadable header: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(ENTRY_FORMAT) {
        return Err(bad(format!(
            "not a cogvx cache entry (header `format` is not `{ENTRY_FORMAT}`)"
        )));
    }
    if meta.get("key").map(String::as_str) != Some(key) {
        return Err(bad(format!(
            "header key {:?} does not match the expected key {key}",
            meta.get("key")
        )));
    }
    let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    names.sort();
    let mut h = Sha256::new();
    let mut out = BTreeMap::new();
    for n in names {
        let v = st
            .tensor(&n)
            .map_err(|e| bad(format!("tensor `{n}`: {e}")))?;
        if v.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor `{n}` is {:?}, expected F32",
                v.dtype()
            )));
        }
        h.update(n.as_bytes());
        h.update(format!("{:?}", v.shape()).as_bytes());
        h.update(v.data());
        let data = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(n, HostTensor::new(v.shape().to_vec(), data));
    }
    if meta.get("sha256").map(String::as_str) != Some(hex(&h.finalize()).as_str()) {
        return Err(bad("checksum mismatch: the file is corrupt".into()));
    }
    Ok(out)
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses entry bytes without checking key or checksum (diagnostics and tests).
pub fn read_entry_unchecked(buf: &[u8]) -> Result<BTreeMap<String, HostTensor>, String> {
    let st = SafeTensors::deserialize(buf).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (n, v) in st.tensors() {
        if v.dtype() != Dtype::F32 {
            return Err(format!("tensor `{n}` is {:?}, expected F32", v.dtype()));
        }
        let data = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(n, HostTensor::new(v.shape().to_vec(), data));
    }
    Ok(out)
}
