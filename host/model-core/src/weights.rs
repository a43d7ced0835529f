//! Weights of one diffusers component folder (`transformer/`, `vae/`, `text_encoder/`).
//!
//! The files are memory-mapped; a tensor is converted to f32 only when a module asks for it,
//! so the process never holds two full copies of the weights.

use crate::LoadError;
use burn::tensor::{backend::Backend, DType, FloatDType, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// All tensors of one component folder, single-file or sharded.
pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// key -> shard index.
    index: BTreeMap<String, usize>,
}

/// A tensor as stored on disk, converted to f32 on the host.
#[derive(Clone, Debug)]
pub struct HostWeight {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Weights {
    /// Opens the weights in `dir`: a `*.safetensors.index.json` (sharded) if present, else
    /// the single `*.safetensors` file (`diffusion_pytorch_model.safetensors`, `model.safetensors`).
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let index_file = names
            .iter()
            .find(|n| n.ends_with(".safetensors.index.json"));
        let files: Vec<PathBuf> = if let Some(index_name) = index_file {
            let index_path = dir.join(index_name);
            let text = std::fs::read_to_string(&index_path).map_err(|source| LoadError::Io {
                path: index_path.clone(),
                source,
            })?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::Config {
                    path: index_path.clone(),
                    message: e.to_string(),
                })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::Config {
                    path: index_path.clone(),
                    message: "missing object `weight_map`".into(),
                })?;
            let mut shard_names: BTreeSet<String> = BTreeSet::new();
            for (key, file) in map {
                let file = file.as_str().ok_or_else(|| LoadError::Config {
                    path: index_path.clone(),
                    message: format!("weight_map.{key}: expected a file name"),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(LoadError::Config {
                        path: index_path.clone(),
                        message: format!("weight_map.{key}: shard `{file}` must be a plain file name in the same folder"),
                    });
                }
                shard_names.insert(file.to_string());
            }
            let missing: Vec<String> = shard_names
                .iter()
                .filter(|f| !dir.join(f).is_file())
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(LoadError::MissingShards {
                    index: index_path,
                    missing,
                });
            }
            shard_names.iter().map(|f| dir.join(f)).collect()
        } else {
            let singles: Vec<PathBuf> = names
                .iter()
                .filter(|n| n.ends_with(".safetensors"))
                .map(|n| dir.join(n))
                .collect();
            match singles.len() {
                0 => {
                    return Err(LoadError::NoWeights {
                        dir: dir.to_path_buf(),
                    })
                }
                _ => singles,
            }
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let shard = open_shard(path)?;
            for key in shard.tensors.keys() {
                index.insert(key.clone(), i);
            }
            shards.push(shard);
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// The folder the weights came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|k| k.as_str())
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.index.get(key)?];
        Some(shard.tensors[key].shape.clone())
    }

    /// Reads a tensor converted to f32 (from f16, bf16, f32 or f64).
    pub fn get_f32(&self, key: &str) -> Result<Option<HostWeight>, LoadError> {
        let Some(&si) = self.index.get(key) else {
            return Ok(None);
        };
        let shard = &self.shards[si];
        let info = &shard.tensors[key];
        let (a, b) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + a..shard.data_start + b)
            .ok_or_else(|| LoadError::Safetensors {
                path: shard.path.clone(),
                message: format!("tensor `{key}` lies outside the file"),
            })?;
        let data = bytes_to_f32(bytes, info.dtype).ok_or_else(|| LoadError::Dtype {
            path: shard.path.clone(),
            key: key.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        Ok(Some(HostWeight {
            shape: info.shape.clone(),
            data,
        }))
    }
}

fn open_shard(path: PathBuf) -> Result<Shard, LoadError> {
    let file = std::fs::File::open(&path).map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    // SAFETY: the file is opened read-only; a concurrent writer could change the bytes under us,
    // which at worst yields wrong numbers, never unsoundness in safe code reading a byte slice.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    let (header_len, meta) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let tensors: HashMap<String, TensorInfo> = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok(Shard {
        path,
        mmap,
        data_start: 8 + header_len,
        tensors,
    })
}

/// Converts little-endian stored values to f32; `None` for dtypes that are not floats.
pub fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

#[derive(Default)]
struct Tracker {
    used: BTreeSet<String>,
    problems: Vec<String>,
}

/// A path-scoped view of [`Weights`]: `vb.pp("transformer_blocks").pp(0).tensor("attn1.to_q.weight", ..)`.
///
/// Missing keys and wrong shapes do not stop loading: they are recorded (a zero tensor of the
/// expected shape is returned) and [`VarBuilder::finish`] reports every problem at once,
/// together with the keys in the files that no module asked for.
#[derive(Clone)]
pub struct VarBuilder {
    weights: Arc<Weights>,
    prefix: String,
    tracker: Arc<Mutex<Tracker>>,
    /// The dtype tensors are created in; `None` = f32.
    dtype: Option<FloatDType>,
}

impl VarBuilder {
    /// A builder at the root of `weights`.
    pub fn new(weights: Weights) -> Self {
        VarBuilder {
            weights: Arc::new(weights),
            prefix: String::new(),
            tracker: Arc::default(),
            dtype: None,
        }
    }

    /// Opens `dir` and returns a root builder.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        Ok(Self::new(Weights::open(dir)?))
    }

    /// A builder one level down: `pp("attn1")`, `pp(3)`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        VarBuilder {
            weights: self.weights.clone(),
            prefix,
            tracker: self.tracker.clone(),
            dtype: self.dtype,
        }
    }

    /// This builder creating its tensors in `dtype` (mixed precision keeps frozen weights in
    /// bf16/f16); `F32` or `None` = f32.
    pub fn with_dtype(mut self, dtype: Option<FloatDType>) -> Self {
        self.dtype = dtype.filter(|d| *d != FloatDType::F32);
        self
    }

    /// The dtype set with [`VarBuilder::with_dtype`] (`None` = f32).
    pub fn dtype(&self) -> Option<FloatDType> {
        self.dtype
    }

    /// The full key of `name` under this builder.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The underlying weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Whether `name` exists under this builder.
    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.key(name))
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.weights.shape(&self.key(name))
    }

    /// Loads `name` as a tensor of the expected `shape` on `device`, in f32 or the builder's
    /// [dtype](VarBuilder::with_dtype).
    ///
    /// A missing key or a wrong shape is recorded for [`VarBuilder::finish`] and a zero tensor of
    /// `shape` is returned; only unreadable data is an immediate error.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, LoadError> {
        let key = self.key(name);
        match self.weights.get_f32(&key)? {
            None => {
                self.record(format!("  missing key `{key}` (expected shape {shape:?})"));
                Ok(self.create(TensorData::zeros::<f32, _>(shape), device))
            }
            Some(w) => {
                self.tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .used
                    .insert(key.clone());
                if w.shape != shape {
                    self.record(format!(
                        "  wrong shape for `{key}`: file has {:?}, model expects {shape:?}",
                        w.shape
                    ));
                    return Ok(self.create(TensorData::zeros::<f32, _>(shape), device));
                }
                Ok(self.create(TensorData::new(w.data, shape), device))
            }
        }
    }

    /// f32 host data as a tensor in the builder's dtype (converted on the host, so the device
    /// never holds the f32 copy).
    fn create<B: Backend, const D: usize>(
        &self,
        data: TensorData,
        device: &B::Device,
    ) -> Tensor<B, D> {
        match self.dtype {
            None => Tensor::from_data(data, device),
            Some(dtype) => {
                let dtype = DType::from(dtype);
                Tensor::from_data(data.convert_dtype(dtype), (device, dtype))
            }
        }
    }

    /// Like [`VarBuilder::tensor`], but a missing key is not a problem: returns `None`.
    pub fn tensor_opt<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Option<Tensor<B, D>>, LoadError> {
        if self.contains(name) {
            self.tensor(name, shape, device).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Marks keys as deliberately unused (e.g. buffers diffusers recomputes), so `finish` does not
    /// report them as unexpected.
    pub fn ignore(&self, name: &str) {
        let key = self.key(name);
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .used
            .insert(key);
    }

    fn record(&self, problem: String) {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .problems
            .push(problem);
    }

    /// Reports every missing, wrong-shape and unexpected key at once. Call after the whole model
    /// is built from the root builder.
    pub fn finish(&self) -> Result<(), LoadError> {
        let tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        let mut problems = tracker.problems.clone();
        let unexpected: Vec<&str> = self
            .weights
            .keys()
            .filter(|k| !tracker.used.contains(*k))
            .collect();
        for key in unexpected {
            problems.push(format!("  unexpected key `{key}` (not used by the model)"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Mismatch {
                dir: self.weights.dir().to_path_buf(),
                problems,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, CpuDevice};
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, d)| {
                d.iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect()
            })
            .collect();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| {
                (
                    n.to_string(),
                    TensorView::new(Dtype::F16, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn loads_f16_and_reports_all_problems() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model.safetensors"),
            &[
                ("a.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
                ("b.weight", vec![3], vec![0.5; 3]),
                ("extra", vec![1], vec![0.0]),
            ],
        );
        let vb = VarBuilder::from_dir(dir.path()).unwrap();
        let dev = CpuDevice::default();
        let a = vb
            .pp("a")
            .tensor::<CpuBackend, 2>("weight", [2, 2], &dev)
            .unwrap();
        assert_eq!(
            a.into_data().to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        let _ = vb
            .pp("b")
            .tensor::<CpuBackend, 1>("weight", [4], &dev)
            .unwrap();
        let _ = vb.tensor::<CpuBackend, 1>("c.bias", [4], &dev).unwrap();
        let err = vb.finish().unwrap_err().to_string();
        assert!(
            err.contains("wrong shape for `b.weight`: file has [3], model expects [4]"),
            "{err}"
        );
        assert!(err.contains("missing key `c.bias`"), "{err}");
        assert!(err.contains("unexpected key `extra`"), "{err}");
    }

    #[test]
    fn sharded_with_missing_shard_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("m-00001-of-00002.safetensors"),
            &[("a", vec![1], vec![1.0])],
        );
        std::fs::write(
            dir.path().join("m.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"m-00001-of-00002.safetensors","b":"m-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = Weights::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("missing shard file(s): m-00002-of-00002.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn opens_the_shared_sharded_transformer() {
        let dir = cogvx_fixtures::reference("models/cogvideox-5b-tiny/transformer");
        let w = Weights::open(&dir).unwrap();
        assert!(w.keys().count() > 20);
        let key = w
            .keys()
            .find(|k| k.ends_with("to_q.weight"))
            .unwrap()
            .to_string();
        let t = w.get_f32(&key).unwrap().unwrap();
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
        assert!(t.data.iter().any(|x| *x != 0.0));
    }
}
