//! Export of a trained LoRA as diffusers writes it (`CogVideoXPipeline.save_lora_weights` with
//! `transformer_lora_adapter_metadata`): `pytorch_lora_weights.safetensors`, keys
//! `transformer.<peft key>` in float32, header metadata `format = "pt"` and
//! `lora_adapter_metadata` (PEFT's `LoraConfig.to_dict()` with every key prefixed by
//! `transformer.`, as `json.dumps(..., indent=2, sort_keys=True)`), so that diffusers'
//! `load_lora_weights` applies it at `alpha / rank`.

use crate::error::{invalid, AdaptersError};
use burn::tensor::backend::Backend;
use cogvx_model_core::adapter::AdapterTensor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The file name diffusers uses.
pub const LORA_WEIGHTS_NAME: &str = "pytorch_lora_weights.safetensors";
/// The PEFT version whose `LoraConfig` fields the metadata lists (the fields written by the
/// diffusers/PEFT versions that produced the reference files).
pub const PEFT_METADATA_VERSION: &str = "0.21.2";

/// Rank, alpha and targets written to the metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraMetadata {
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
}

pub(crate) fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// PEFT's `LoraConfig(r, lora_alpha, target_modules).to_dict()` (set-valued fields sorted).
pub fn lora_config_dict(meta: &LoraMetadata) -> BTreeMap<String, Value> {
    let mut targets = meta.target_modules.clone();
    targets.sort();
    targets.dedup();
    let entries: Vec<(&str, Value)> = vec![
        ("alora_invocation_tokens", Value::Null),
        ("alpha_pattern", json!({})),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", Value::Null),
        ("bias", json!("none")),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", json!(false)),
        ("eva_config", Value::Null),
        ("exclude_modules", Value::Null),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(false)),
        ("init_lora_weights", json!(true)),
        ("kasa_config", Value::Null),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("loftq_config", json!({})),
        ("lora_alpha", number(meta.alpha)),
        ("lora_bias", json!(false)),
        ("lora_dropout", json!(0.0)),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", json!("megatron.core")),
        ("modules_to_save", Value::Null),
        ("monteclora_config", Value::Null),
        ("peft_type", json!("LORA")),
        ("peft_version", json!(PEFT_METADATA_VERSION)),
        ("qalora_group_size", json!(16)),
        ("r", json!(meta.rank)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_modules", json!(targets)),
        ("target_parameters", Value::Null),
        ("task_type", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_dora", json!(false)),
        ("use_qalora", json!(false)),
        ("use_rslora", json!(false)),
        ("velora_config", Value::Null),
    ];
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Python's `json.dumps(value, indent=2, sort_keys=True)` (ASCII-escaped, `", "`/`": "` separators).
pub fn python_json_dumps(value: &Value) -> String {
    fn write(v: &Value, indent: usize, out: &mut String) {
        let pad = |n: usize| " ".repeat(n);
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => {
                if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                    // Rust's `{:?}` switches to exponents at the same magnitudes as Python's
                    // repr; Python writes the exponent signed and with at least two digits.
                    let s = format!("{f:?}");
                    match s.split_once('e') {
                        Some((mantissa, exp)) => {
                            let (sign, digits) = exp
                                .strip_prefix('-')
                                .map(|d| ('-', d))
                                .unwrap_or(('+', exp));
                            out.push_str(&format!("{mantissa}e{sign}{digits:0>2}"));
                        }
                        None => out.push_str(&s),
                    }
                } else {
                    out.push_str(&n.to_string());
                }
            }
            Value::String(s) => {
                out.push('"');
                for ch in s.chars() {
                    match ch {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        '\t' => out.push_str("\\t"),
                        c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                            let mut buf = [0u16; 2];
                            for u in c.encode_utf16(&mut buf) {
                                out.push_str(&format!("\\u{:04x}", u));
                            }
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Value::Array(a) if a.is_empty() => out.push_str("[]"),
            Value::Array(a) => {
                out.push_str("[\n");
                for (i, x) in a.iter().enumerate() {
                    out.push_str(&pad(indent + 2));
                    write(x, indent + 2, out);
                    if i + 1 < a.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&pad(indent));
                out.push(']');
            }
            Value::Object(m) if m.is_empty() => out.push_str("{}"),
            Value::Object(m) => {
                let sorted: BTreeMap<&String, &Value> = m.iter().collect();
                out.push_str("{\n");
                for (i, (k, x)) in sorted.iter().enumerate() {
                    out.push_str(&pad(indent + 2));
                    write(&Value::String((*k).clone()), indent + 2, out);
                    out.push_str(": ");
                    write(x, indent + 2, out);
                    if i + 1 < sorted.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&pad(indent));
                out.push('}');
            }
        }
    }
    let mut s = String::new();
    write(value, 0, &mut s);
    s
}

/// The header metadata diffusers writes for a transformer LoRA.
pub fn lora_file_metadata(meta: &LoraMetadata) -> BTreeMap<String, String> {
    let packed: serde_json::Map<String, Value> = lora_config_dict(meta)
        .into_iter()
        .map(|(k, v)| (format!("transformer.{k}"), v))
        .collect();
    BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "lora_adapter_metadata".to_string(),
            python_json_dumps(&Value::Object(packed)),
        ),
    ])
}

/// Writes a safetensors file of float32 tensors with `metadata`, atomically
/// ([`cogvx_io::write_safetensors_f32`]), with the error naming the file.
pub(crate) fn write_safetensors_f32(
    path: &Path,
    tensors: &cogvx_io::F32Tensors,
    metadata: &BTreeMap<String, String>,
) -> Result<(), AdaptersError> {
    cogvx_io::write_safetensors_f32(path, tensors, metadata).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => AdaptersError::Invalid(e.to_string()),
        _ => AdaptersError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    })
}

/// Splits a PEFT LoRA key `<module>.lora_A.weight` / `.lora_B.weight` into the module and
/// `lora_A` / `lora_B`.
pub(crate) fn split_lora_key(key: &str) -> Option<(&str, &'static str)> {
    if let Some(m) = key.strip_suffix(".lora_A.weight") {
        Some((m, "lora_A"))
    } else {
        key.strip_suffix(".lora_B.weight").map(|m| (m, "lora_B"))
    }
}

/// One exported LoRA parameter: `(module, "lora_A" | "lora_B", tensor)`.
pub(crate) type LoraPair<'p, B> = (&'p str, &'static str, &'p AdapterTensor<B>);

/// The LoRA parameters an export writes, as `(module, "lora_A" | "lora_B", tensor)`, after the
/// checks every layout shares: some parameters, a rank above 0, only LoRA names.
pub(crate) fn lora_export_pairs<'p, B: Backend>(
    params: &'p BTreeMap<String, AdapterTensor<B>>,
    meta: &LoraMetadata,
) -> Result<Vec<LoraPair<'p, B>>, AdaptersError> {
    if params.is_empty() {
        return invalid("no LoRA parameters to save");
    }
    if meta.rank == 0 {
        return invalid("LoRA rank 0 in the export metadata");
    }
    params
        .iter()
        .map(|(name, t)| match split_lora_key(name) {
            Some((module, half)) => Ok((module, half, t)),
            None => invalid(format!(
                "`{name}` is not a LoRA parameter (lora_A.weight / lora_B.weight)"
            )),
        })
        .collect()
}

/// Saves LoRA parameters (`<layer>.lora_A.weight` / `.lora_B.weight`, PEFT names without the
/// `transformer.` prefix) to `dir/pytorch_lora_weights.safetensors` in diffusers' layout, with
/// the adapter metadata. Returns the file's path.
pub fn save_lora<B: Backend>(
    dir: &Path,
    params: &BTreeMap<String, AdapterTensor<B>>,
    meta: &LoraMetadata,
) -> Result<std::path::PathBuf, AdaptersError> {
    let tensors = lora_export_pairs(params, meta)?
        .into_iter()
        .map(|(module, half, t)| {
            (
                format!("transformer.{module}.{half}.weight"),
                (t.shape(), t.to_vec()),
            )
        })
        .collect();
    let path = dir.join(LORA_WEIGHTS_NAME);
    write_safetensors_f32(&path, &tensors, &lora_file_metadata(meta))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_formatting() {
        let v = json!({"b": [1, "x\u{e9}"], "a": {}, "c": 1e-5, "d": 0.0, "e": [], "f": 1e16, "g": 2.5});
        assert_eq!(
            python_json_dumps(&v),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    \"x\\u00e9\"\n  ],\n  \"c\": 1e-05,\n  \"d\": 0.0,\n  \"e\": [],\n  \"f\": 1e+16,\n  \"g\": 2.5\n}"
        );
    }

    #[test]
    fn alpha_is_written_as_given() {
        let m = |alpha| {
            lora_config_dict(&LoraMetadata {
                rank: 8,
                alpha,
                target_modules: vec!["to_q".into()],
            })["lora_alpha"]
                .clone()
        };
        assert_eq!(m(64.0), json!(64));
        assert_eq!(m(2.5), json!(2.5));
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Default::default();
        let a = AdapterTensor::<cogvx_model_core::CpuBackend>::from_vec(
            &[1, 3],
            vec![1.0, -2.0, 0.5],
            &dev,
        )
        .unwrap();
        let b =
            AdapterTensor::<cogvx_model_core::CpuBackend>::from_vec(&[2, 1], vec![0.25, 4.0], &dev)
                .unwrap();
        let params = BTreeMap::from([
            ("blocks.0.to_q.lora_A.weight".to_string(), a),
            ("blocks.0.to_q.lora_B.weight".to_string(), b),
        ]);
        let meta = LoraMetadata {
            rank: 1,
            alpha: 0.5,
            target_modules: vec!["to_q".into()],
        };
        let path = save_lora(dir.path(), &params, &meta).unwrap();
        let loaded = load_lora(&path).unwrap();
        assert_eq!(loaded.metadata, Some(meta));
        assert_eq!(
            loaded.tensors["blocks.0.to_q.lora_A.weight"],
            (vec![1, 3], vec![1.0, -2.0, 0.5])
        );
        assert_eq!(
            loaded.tensors["blocks.0.to_q.lora_B.weight"],
            (vec![2, 1], vec![0.25, 4.0])
        );
        std::fs::write(dir.path().join("bad.safetensors"), b"nope").unwrap();
        let e = load_lora(&dir.path().join("bad.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("not a safetensors file"),
            "{e}"
        );
    }

    #[test]
    fn refuses_non_lora_names_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = AdapterTensor::<cogvx_model_core::CpuBackend>::from_vec(
            &[1],
            vec![1.0],
            &Default::default(),
        )
        .unwrap();
        let params = BTreeMap::from([("blocks.0.weight".to_string(), t)]);
        let meta = LoraMetadata {
            rank: 1,
            alpha: 1.0,
            target_modules: vec![],
        };
        assert!(save_lora(dir.path(), &params, &meta).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

/// A LoRA read back from a `pytorch_lora_weights.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedLora {
    /// PEFT names without the `transformer.` prefix -> `(shape, values)`.
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// Rank, alpha and targets from the header; `None` for files without adapter metadata
    /// (e.g. the official finetune's), which diffusers loads at scale 1.0 (alpha = rank).
    pub metadata: Option<LoraMetadata>,
}

/// Host tensors of an adapter file by key without the `transformer.` prefix: (shape, f32 values).
pub(crate) type FileTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads an adapter file written as diffusers does (F32/F16/BF16): every tensor must be under
/// `transformer.` (`expected` describes the key form in the error), returned without the prefix,
/// and the header's `lora_adapter_metadata` as the dict of its `transformer.` keys (prefix
/// stripped; `None` when the header has none). Errors name the file and the key.
pub(crate) fn read_adapter_file(
    path: &Path,
    expected: &str,
) -> Result<(FileTensors, Option<BTreeMap<String, Value>>), AdaptersError> {
    let bad = |message: String| AdaptersError::Io {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some(key) = name.strip_prefix("transformer.") else {
            return Err(bad(format!("tensor `{name}` is not a {expected}")));
        };
        let data = cogvx_model_core::weights::bytes_to_f32(view.data(), view.dtype()).ok_or_else(
            || {
                bad(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    view.dtype()
                ))
            },
        )?;
        tensors.insert(key.to_string(), (view.shape().to_vec(), data));
    }
    let metadata = match header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
    {
        None => None,
        Some(text) => {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| bad(format!("header `lora_adapter_metadata` is not JSON: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| bad("header `lora_adapter_metadata` is not a JSON object".into()))?;
            Some(
                obj.iter()
                    .filter_map(|(k, v)| {
                        Some((k.strip_prefix("transformer.")?.to_string(), v.clone()))
                    })
                    .collect(),
            )
        }
    };
    Ok((tensors, metadata))
}

/// `target_modules` of a PEFT config dict: a list, or one name.
pub(crate) fn target_modules_of(dict: &BTreeMap<String, Value>) -> Vec<String> {
    match dict.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Reads a LoRA file in either layout cogvx writes: diffusers' (`transformer.` keys,
/// [`load_lora`]) or ComfyUI's (`diffusion_model.` keys, [`crate::load_lora_comfyui`]), told
/// apart by the first key.
pub fn load_lora_any(path: &Path) -> Result<LoadedLora, AdaptersError> {
    let bytes = std::fs::read(path).map_err(|e| AdaptersError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let comfyui = safetensors::SafeTensors::deserialize(&bytes)
        .ok()
        .and_then(|st| {
            st.names()
                .first()
                .map(|n| n.starts_with("diffusion_model."))
        })
        .unwrap_or(false);
    if comfyui {
        crate::load_lora_comfyui(path)
    } else {
        load_lora(path)
    }
}

/// Reads a diffusers LoRA file (F32/F16/BF16): the `transformer.` LoRA tensors and the adapter
/// metadata of the header. Errors name the file and the key.
pub fn load_lora(path: &Path) -> Result<LoadedLora, AdaptersError> {
    let bad = |message: String| AdaptersError::Io {
        path: path.to_path_buf(),
        message,
    };
    let (tensors, dict) = read_adapter_file(
        path,
        "transformer LoRA weight (expected `transformer.<module>.lora_A.weight`)",
    )?;
    if let Some(key) = tensors
        .keys()
        .find(|k| !(k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")))
    {
        return Err(bad(format!(
            "tensor `transformer.{key}` is not a LoRA weight (only lora_A/lora_B are supported)"
        )));
    }
    let metadata = match dict {
        None => None,
        Some(dict) => {
            let rank = dict.get("r").and_then(Value::as_u64).ok_or_else(|| {
                bad("header `lora_adapter_metadata` has no integer `transformer.r`".into())
            })?;
            let alpha = dict
                .get("lora_alpha")
                .and_then(Value::as_f64)
                .ok_or_else(|| {
                    bad(
                        "header `lora_adapter_metadata` has no number `transformer.lora_alpha`"
                            .into(),
                    )
                })?;
            Some(LoraMetadata {
                rank: rank as usize,
                alpha,
                target_modules: target_modules_of(&dict),
            })
        }
    };
    Ok(LoadedLora { tensors, metadata })
}
