//! Parity cases produced by diffusers (`shared/reference/cases/*.safetensors`).
//!
//! A case file holds inputs `in.<name>`, expected outputs `out.<name>` and header metadata:
//! `component`, `model` (folder relative to the cases folder's parent), `params` (JSON) and
//! `tolerance` (JSON: `{"rel_l2": x}` or `"exact"`).

use crate::weights::bytes_to_f32;
use crate::LoadError;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Values of a host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A tensor held on the host, as read from or compared with a case file.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// A float tensor.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        HostTensor {
            shape,
            data: HostData::F32(data),
        }
    }

    /// An integer tensor.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        HostTensor {
            shape,
            data: HostData::I64(data),
        }
    }

    /// The values as f32 (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::I64(v) => v.iter().map(|x| *x as f32).collect(),
        }
    }

    /// The values as i64 (floats truncated).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|x| *x as i64).collect(),
            HostData::I64(v) => v.clone(),
        }
    }

    /// A float burn tensor; errors if the rank is not `D`.
    pub fn to_tensor<B: Backend, const D: usize>(
        &self,
        device: &B::Device,
    ) -> Result<Tensor<B, D>, LoadError> {
        let shape: [usize; D] = self.shape.clone().try_into().map_err(|_| {
            LoadError::Other(format!(
                "expected a rank-{D} tensor, got shape {:?}",
                self.shape
            ))
        })?;
        Ok(Tensor::from_data(
            TensorData::new(self.to_f32(), shape),
            device,
        ))
    }

    /// An integer burn tensor; errors if the rank is not `D`.
    pub fn to_int_tensor<B: Backend, const D: usize>(
        &self,
        device: &B::Device,
    ) -> Result<Tensor<B, D, Int>, LoadError> {
        let shape: [usize; D] = self.shape.clone().try_into().map_err(|_| {
            LoadError::Other(format!(
                "expected a rank-{D} tensor, got shape {:?}",
                self.shape
            ))
        })?;
        Ok(Tensor::from_data(
            TensorData::new(self.to_i64(), shape),
            device,
        ))
    }

    /// Reads a float burn tensor back to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("converted to f32");
        HostTensor::f32(shape, data)
    }
}

/// The bound a case puts on each output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// `||got - want|| / ||want|| <= x`.
    RelL2(f64),
    /// Integer outputs must match exactly.
    Exact,
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tolerance::RelL2(x) => write!(f, "{x:.0e}"),
            Tolerance::Exact => f.write_str("exact"),
        }
    }
}

/// One parity case.
#[derive(Clone, Debug)]
pub struct Case {
    /// File stem, e.g. `cogvideox-2b.transformer.0`.
    pub name: String,
    pub path: PathBuf,
    pub component: String,
    /// The model folder (resolved against the cases folder's parent).
    pub model_dir: PathBuf,
    pub params: serde_json::Value,
    /// The default bound (`rel_l2` of the `tolerance` metadata).
    pub tolerance: Tolerance,
    /// Per-output bounds that override the default (e.g. `"input_ids": "exact"`).
    pub output_tolerances: BTreeMap<String, Tolerance>,
    /// Inputs without the `in.` prefix.
    pub inputs: BTreeMap<String, HostTensor>,
    /// Expected outputs without the `out.` prefix.
    pub outputs: BTreeMap<String, HostTensor>,
}

impl Case {
    /// Reads a case file; `model` is resolved relative to the parent of the file's folder.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| LoadError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let header = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            header
                .get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata has no `{k}`")))
        };
        let component = get("component")?;
        let model = get("model")?;
        let params: serde_json::Value = match header.get("params") {
            Some(p) => {
                serde_json::from_str(p).map_err(|e| bad(format!("metadata `params`: {e}")))?
            }
            None => serde_json::Value::Object(Default::default()),
        };
        let mut output_tolerances = BTreeMap::new();
        let tolerance = match header.get("tolerance").map(|s| s.as_str()) {
            None => return Err(bad("metadata has no `tolerance`".into())),
            Some(t) => {
                let v: serde_json::Value = serde_json::from_str(t)
                    .map_err(|e| bad(format!("metadata `tolerance`: {e}")))?;
                let parse = |v: &serde_json::Value| match (v.as_str(), v.as_f64()) {
                    (Some("exact"), _) => Some(Tolerance::Exact),
                    (_, Some(x)) => Some(Tolerance::RelL2(x)),
                    _ => None,
                };
                if let Some(tol) = parse(&v) {
                    tol
                } else if let Some(map) = v.as_object() {
                    for (name, value) in map.iter().filter(|(k, _)| *k != "rel_l2") {
                        let tol = parse(value).ok_or_else(|| {
                            bad(format!("metadata `tolerance.{name}`: unknown form {value}"))
                        })?;
                        output_tolerances.insert(name.clone(), tol);
                    }
                    match map.get("rel_l2") {
                        Some(x) => parse(x).ok_or_else(|| {
                            bad(format!("metadata `tolerance.rel_l2`: unknown form {x}"))
                        })?,
                        None => {
                            return Err(bad(format!("metadata `tolerance`: no `rel_l2` in {t}")))
                        }
                    }
                } else {
                    return Err(bad(format!("metadata `tolerance`: unknown form {t}")));
                }
            }
        };
        let mut inputs = BTreeMap::new();
        let mut outputs = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data =
                match view.dtype() {
                    Dtype::I64 => HostData::I64(
                        view.data()
                            .chunks_exact(8)
                            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                            .collect(),
                    ),
                    Dtype::I32 => HostData::I64(
                        view.data()
                            .chunks_exact(4)
                            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                            .collect(),
                    ),
                    dt => HostData::F32(bytes_to_f32(view.data(), dt).ok_or_else(|| {
                        bad(format!("tensor `{name}` has unsupported dtype {dt:?}"))
                    })?),
                };
            let t = HostTensor { shape, data };
            if let Some(n) = name.strip_prefix("in.") {
                inputs.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix("out.") {
                outputs.insert(n.to_string(), t);
            }
        }
        let base = path
            .parent()
            .and_then(|p| p.parent())
            .unwrap_or(Path::new("."));
        Ok(Case {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            component,
            model_dir: base.join(model),
            params,
            tolerance,
            output_tolerances,
            inputs,
            outputs,
        })
    }

    /// The bound for output `name`: its own entry in the tolerance metadata, else the default.
    pub fn tolerance_for(&self, name: &str) -> Tolerance {
        self.output_tolerances
            .get(name)
            .copied()
            .unwrap_or(self.tolerance)
    }

    /// An input by name (without `in.`), or an error naming the case.
    pub fn input(&self, name: &str) -> Result<&HostTensor, LoadError> {
        self.inputs.get(name).ok_or_else(|| {
            LoadError::Other(format!("case {}: missing input `in.{name}`", self.name))
        })
    }

    /// A parameter from `params`, or an error naming the case.
    pub fn param(&self, name: &str) -> Result<&serde_json::Value, LoadError> {
        self.params
            .get(name)
            .ok_or_else(|| LoadError::Other(format!("case {}: missing param `{name}`", self.name)))
    }
}

/// `||got - want|| / ||want||` (with `||want|| = 0` giving `||got||`).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let mut diff = 0.0f64;
    let mut norm = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        diff += ((*g as f64) - (*w as f64)).powi(2);
        norm += (*w as f64).powi(2);
    }
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_basics() {
        assert_eq!(rel_l2(&[1.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((rel_l2(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
        assert_eq!(rel_l2(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }

    #[test]
    fn reads_a_shared_case() {
        let path = cogvx_fixtures::case("cogvideox-2b.transformer.0.safetensors");
        let case = Case::load(&path).unwrap();
        assert_eq!(case.component, "transformer");
        assert!(case.model_dir.ends_with("models/cogvideox-2b-tiny"));
        assert!(case.model_dir.join("model_index.json").exists());
        assert_eq!(case.tolerance, Tolerance::RelL2(1e-4));
        assert_eq!(
            case.input("hidden_states").unwrap().shape,
            vec![2, 3, 4, 8, 12]
        );
        assert!(matches!(
            case.input("timestep").unwrap().data,
            HostData::I64(_)
        ));
        assert_eq!(case.outputs["sample"].shape, vec![2, 3, 4, 8, 12]);
        assert_eq!(case.tolerance_for("sample"), Tolerance::RelL2(1e-4));
    }

    #[test]
    fn per_output_tolerances() {
        let path = cogvx_fixtures::case("cogvideox-2b.text_encoder.safetensors");
        let case = Case::load(&path).unwrap();
        assert_eq!(case.tolerance_for("input_ids"), Tolerance::Exact);
        assert_eq!(
            case.tolerance_for("last_hidden_state"),
            Tolerance::RelL2(1e-4)
        );
    }
}
