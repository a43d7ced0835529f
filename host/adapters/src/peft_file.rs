//! Export of any adapter on the transformer (built-in LoRA or a plugin's recipe: DoRA, LoHa,
//! LoKr, ...) under PEFT's parameter names, in diffusers' file layout:
//! `pytorch_lora_weights.safetensors` with keys `transformer.<layer>.<suffix>` (float32) and the
//! header metadata `format = "pt"` and `lora_adapter_metadata` (the PEFT config's `to_dict()`,
//! every key prefixed by `transformer.`, `json.dumps(indent=2, sort_keys=True)`), as
//! [`crate::save_lora`] writes a LoRA.
//!
//! The suffixes are the recipe's export keys, which are PEFT's state-dict names with the adapter
//! name removed (`get_peft_model_state_dict`): `lora_A.weight`, `lora_B.weight` and, for DoRA,
//! `lora_magnitude_vector` (PEFT strips the `.weight` of its `DoraLinearLayer`); LoHa's
//! `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`; LoKr's `lokr_w1`, `lokr_w1_a`, `lokr_w1_b`,
//! `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`. The metadata is PEFT's `LoraConfig` (with `use_dora`),
//! `LoHaConfig` or `LoKrConfig` (`r`, `alpha`, dropout and pattern fields, `init_weights`, ...),
//! with the plugin's settings that are PEFT fields (`use_rslora`, `init_lora_weights`,
//! `init_weights`, `decompose_factor`, `decompose_both`) over PEFT's defaults.
//!
//! A built-in LoRA with no extra settings is written by [`crate::save_lora`] itself, so its file
//! is byte-identical to what `save_lora` writes.

use crate::error::{invalid, AdaptersError};
use crate::inject::{linear_layers_mut, AdapterSpec};
use crate::lora_file::{
    lora_config_dict, number, python_json_dumps, read_adapter_file, save_lora, target_modules_of,
    write_safetensors_f32, LoraMetadata, LORA_WEIGHTS_NAME, PEFT_METADATA_VERSION,
};
use burn::tensor::backend::Backend;
use cogvx_model_core::adapter::{AdapterTensor, LinearAdapter};
use cogvx_transformer::CogVideoXTransformer3DModel;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the export metadata says about an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterMetadata {
    /// PEFT's adapter type: `LORA` (also DoRA), `LOHA`, `LOKR`, or another the plugin declares.
    pub peft_type: String,
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    /// DoRA (a `LORA` with `lora_magnitude_vector`s).
    pub use_dora: bool,
    /// Further PEFT config fields that differ from PEFT's defaults (PEFT names).
    pub config: BTreeMap<String, Value>,
}

/// Fields the trainer sets itself; a plugin setting may not override them.
const CORE_FIELDS: &[&str] = &[
    "r",
    "lora_alpha",
    "alpha",
    "target_modules",
    "peft_type",
    "use_dora",
    "peft_version",
];

fn lycoris_dict(meta: &AdapterMetadata, extra: &[(&str, Value)]) -> BTreeMap<String, Value> {
    let mut targets = meta.target_modules.clone();
    targets.sort();
    targets.dedup();
    let mut entries: Vec<(&str, Value)> = vec![
        ("alpha", number(meta.alpha)),
        ("alpha_pattern", json!({})),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", Value::Null),
        ("exclude_modules", Value::Null),
        ("inference_mode", json!(false)),
        ("init_weights", json!(true)),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("module_dropout", json!(0.0)),
        ("modules_to_save", Value::Null),
        ("peft_type", json!(meta.peft_type.to_ascii_uppercase())),
        ("peft_version", json!(PEFT_METADATA_VERSION)),
        ("r", json!(meta.rank)),
        ("rank_dropout", json!(0.0)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_modules", json!(targets)),
        ("task_type", Value::Null),
        ("use_effective_conv2d", json!(false)),
    ];
    entries.extend(extra.iter().cloned());
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// PEFT's config `to_dict()` for the adapter type with all defaults (set-valued fields sorted).
fn default_dict(meta: &AdapterMetadata) -> BTreeMap<String, Value> {
    match meta.peft_type.to_ascii_uppercase().as_str() {
        "LORA" => {
            let mut d = lora_config_dict(&LoraMetadata {
                rank: meta.rank,
                alpha: meta.alpha,
                target_modules: meta.target_modules.clone(),
            });
            d.insert("use_dora".into(), json!(meta.use_dora));
            d
        }
        "LOHA" => lycoris_dict(meta, &[]),
        "LOKR" => lycoris_dict(
            meta,
            &[
                ("decompose_both", json!(false)),
                ("decompose_factor", json!(-1)),
                ("rank_dropout_scale", json!(false)),
            ],
        ),
        // Another type: PEFT's common fields, rank, alpha and targets.
        _ => {
            let mut targets = meta.target_modules.clone();
            targets.sort();
            targets.dedup();
            [
                ("alpha", number(meta.alpha)),
                ("auto_mapping", Value::Null),
                ("base_model_name_or_path", Value::Null),
                ("inference_mode", json!(false)),
                ("peft_type", json!(meta.peft_type.to_ascii_uppercase())),
                ("peft_version", json!(PEFT_METADATA_VERSION)),
                ("r", json!(meta.rank)),
                ("revision", Value::Null),
                ("target_modules", json!(targets)),
                ("task_type", Value::Null),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        }
    }
}

/// PEFT's config `to_dict()` for `meta`: the type's defaults with `meta.config` applied. A
/// setting that is not a field of that PEFT config is refused (it would be lost on loading).
pub fn peft_config_dict(meta: &AdapterMetadata) -> Result<BTreeMap<String, Value>, AdaptersError> {
    let mut dict = default_dict(meta);
    for (k, v) in &meta.config {
        if CORE_FIELDS.contains(&k.as_str()) {
            return invalid(format!("adapter setting `{k}` is set by the trainer (rank, alpha, targets), not by the plugin's settings"));
        }
        if !dict.contains_key(k) {
            let known: Vec<&str> = dict
                .keys()
                .map(String::as_str)
                .filter(|f| !CORE_FIELDS.contains(f))
                .collect();
            return invalid(format!(
                "adapter setting `{k}` is not a field of PEFT's {} config, so the exported file could not record it (fields: {})",
                meta.peft_type,
                known.join(", ")
            ));
        }
        dict.insert(k.clone(), v.clone());
    }
    Ok(dict)
}

/// The header metadata for `meta` (`format`, `lora_adapter_metadata`).
pub fn adapter_file_metadata(
    meta: &AdapterMetadata,
) -> Result<BTreeMap<String, String>, AdaptersError> {
    let packed: serde_json::Map<String, Value> = peft_config_dict(meta)?
        .into_iter()
        .map(|(k, v)| (format!("transformer.{k}"), v))
        .collect();
    Ok(BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "lora_adapter_metadata".to_string(),
            python_json_dumps(&Value::Object(packed)),
        ),
    ]))
}

/// The settings of an adapter plugin that are PEFT config fields, for [`AdapterMetadata::config`]:
/// the entries of `plugin_params` (the plugin's configuration table as JSON) named like a field of
/// the PEFT config of `peft_type` and set to another value than PEFT's default; other entries
/// (plugin-only settings) are left out.
pub fn peft_settings(peft_type: &str, plugin_params: &Value) -> BTreeMap<String, Value> {
    let probe = AdapterMetadata {
        peft_type: peft_type.to_string(),
        rank: 1,
        alpha: 1.0,
        target_modules: vec![],
        use_dora: false,
        config: BTreeMap::new(),
    };
    let fields = default_dict(&probe);
    match plugin_params.as_object() {
        Some(m) => m
            .iter()
            .filter(|(k, v)| {
                !CORE_FIELDS.contains(&k.as_str()) && fields.get(*k).is_some_and(|d| d != *v)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => BTreeMap::new(),
    }
}

/// Every exported adapter tensor as `(<layer>.<suffix>, value)` plus the PEFT type and whether
/// it is a DoRA. A trainable recipe parameter without an export key is refused (it would be lost).
#[allow(clippy::type_complexity)]
fn exported_tensors<B: Backend>(
    model: &mut CogVideoXTransformer3DModel<B>,
) -> Result<(Vec<(String, AdapterTensor<B>)>, String, bool), AdaptersError> {
    let mut out = Vec::new();
    let mut peft_type: Option<(String, String)> = None;
    let mut dora = false;
    for (layer, linear) in linear_layers_mut(model) {
        let Some(adapter) = &linear.adapter else {
            continue;
        };
        let t = adapter.peft_type().to_ascii_uppercase();
        match &peft_type {
            None => peft_type = Some((t.clone(), layer.clone())),
            Some((first, first_layer)) if *first != t => {
                return invalid(format!("layer `{first_layer}` has a {first} adapter and layer `{layer}` a {t} one; one file holds one adapter type"));
            }
            Some(_) => {}
        }
        let exported: Vec<String> = match adapter {
            LinearAdapter::Lora(_) => vec!["lora_A.weight".into(), "lora_B.weight".into()],
            LinearAdapter::Recipe(r) => r
                .program
                .recipe
                .export
                .iter()
                .map(|k| k.suffix.clone())
                .collect(),
        };
        for (suffix, value, trainable) in adapter.tensors() {
            if exported.contains(&suffix) {
                dora |= suffix == "lora_magnitude_vector";
                out.push((format!("{layer}.{suffix}"), value));
            } else if trainable {
                return invalid(format!(
                    "layer `{layer}`: the adapter's trainable parameter `{suffix}` has no export key, so it cannot be saved under a PEFT name (the plugin's recipe must list it in `export`)"
                ));
            }
        }
    }
    match peft_type {
        Some((t, _)) => Ok((out, t, dora)),
        None => invalid("the model has no adapter to export"),
    }
}

/// The metadata for the model's adapter: its PEFT type and DoRA-ness from the model, rank, alpha
/// and targets from `spec`, and `settings` (e.g. from [`peft_settings`]).
pub fn adapter_metadata<B: Backend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    spec: &AdapterSpec,
    settings: BTreeMap<String, Value>,
) -> Result<AdapterMetadata, AdaptersError> {
    let (_, peft_type, use_dora) = exported_tensors(model)?;
    Ok(AdapterMetadata {
        peft_type,
        rank: spec.rank,
        alpha: spec.alpha,
        target_modules: spec.targets.clone(),
        use_dora,
        config: settings,
    })
}

/// Saves the model's adapter to `dir/pytorch_lora_weights.safetensors` (see the module
/// documentation), atomically. `meta` must agree with the model (type, DoRA). Returns the path.
pub fn save_adapter<B: Backend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    dir: &Path,
    meta: &AdapterMetadata,
) -> Result<PathBuf, AdaptersError> {
    if meta.rank == 0 {
        return invalid("adapter rank 0 in the export metadata");
    }
    let (tensors, peft_type, dora) = exported_tensors(model)?;
    if peft_type != meta.peft_type.to_ascii_uppercase() {
        return invalid(format!(
            "the model's adapter is {peft_type}, the export metadata says {}",
            meta.peft_type
        ));
    }
    if dora != meta.use_dora {
        return invalid(format!(
            "the model's adapter {} magnitude vectors (DoRA), the export metadata says use_dora = {}",
            if dora { "has" } else { "has no" },
            meta.use_dora
        ));
    }
    let plain_lora = peft_type == "LORA" && !dora && meta.config.is_empty();
    if plain_lora {
        let params: BTreeMap<String, AdapterTensor<B>> = tensors.into_iter().collect();
        let lm = LoraMetadata {
            rank: meta.rank,
            alpha: meta.alpha,
            target_modules: meta.target_modules.clone(),
        };
        return save_lora(dir, &params, &lm);
    }
    let metadata = adapter_file_metadata(meta)?;
    let mut host = BTreeMap::new();
    for (name, t) in tensors {
        host.insert(format!("transformer.{name}"), (t.shape(), t.to_vec()));
    }
    let path = dir.join(LORA_WEIGHTS_NAME);
    write_safetensors_f32(&path, &host, &metadata)?;
    Ok(path)
}

/// An adapter read back from a `pytorch_lora_weights.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedAdapter {
    /// `<layer>.<suffix>` (without the `transformer.` prefix) -> `(shape, values)`.
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// The metadata of the header; `None` for files without `lora_adapter_metadata` (a LoRA
    /// from the official finetune, loaded by diffusers at scale 1).
    pub metadata: Option<AdapterMetadata>,
}

impl LoadedAdapter {
    /// The tensors as adapter values for [`crate::set_adapter_values`] (rank 1 or 2 only).
    pub fn values<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<BTreeMap<String, AdapterTensor<B>>, AdaptersError> {
        self.tensors
            .iter()
            .map(|(k, (shape, data))| {
                AdapterTensor::from_vec(shape, data.clone(), device)
                    .map(|t| (k.clone(), t))
                    .ok_or_else(|| AdaptersError::Invalid(format!("adapter tensor `{k}` has shape {shape:?}; adapters have vectors and matrices only")))
            })
            .collect()
    }
}

/// Reads an adapter file written by [`save_adapter`], [`crate::save_lora`] or diffusers (F32, F16
/// or BF16 tensors under `transformer.`). Errors name the file and the key.
pub fn load_adapter(path: &Path) -> Result<LoadedAdapter, AdaptersError> {
    let bad = |message: String| AdaptersError::Io {
        path: path.to_path_buf(),
        message,
    };
    let (tensors, dict) = read_adapter_file(
        path,
        "transformer adapter weight (expected `transformer.<module>.<parameter>`)",
    )?;
    let metadata = match dict {
        None => None,
        Some(dict) => {
            let peft_type = dict
                .get("peft_type")
                .and_then(Value::as_str)
                .unwrap_or("LORA")
                .to_ascii_uppercase();
            let rank = dict.get("r").and_then(Value::as_u64).ok_or_else(|| {
                bad("header `lora_adapter_metadata` has no integer `transformer.r`".into())
            })?;
            let alpha_key = if peft_type == "LORA" {
                "lora_alpha"
            } else {
                "alpha"
            };
            let alpha = dict.get(alpha_key).and_then(Value::as_f64).ok_or_else(|| {
                bad(format!(
                    "header `lora_adapter_metadata` has no number `transformer.{alpha_key}`"
                ))
            })?;
            let target_modules = target_modules_of(&dict);
            let use_dora = dict
                .get("use_dora")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let mut meta = AdapterMetadata {
                peft_type,
                rank: rank as usize,
                alpha,
                target_modules,
                use_dora,
                config: BTreeMap::new(),
            };
            let defaults = default_dict(&meta);
            meta.config = dict
                .into_iter()
                .filter(|(k, v)| {
                    !CORE_FIELDS.contains(&k.as_str()) && defaults.get(k).is_some_and(|d| d != v)
                })
                .collect();
            Some(meta)
        }
    };
    Ok(LoadedAdapter { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(peft_type: &str) -> AdapterMetadata {
        AdapterMetadata {
            peft_type: peft_type.into(),
            rank: 4,
            alpha: 2.0,
            target_modules: vec!["to_v".into(), "to_q".into()],
            use_dora: false,
            config: BTreeMap::new(),
        }
    }

    #[test]
    fn config_dicts_follow_peft() {
        let mut m = meta("LORA");
        m.use_dora = true;
        m.config.insert("use_rslora".into(), json!(true));
        let d = peft_config_dict(&m).unwrap();
        assert_eq!(
            (
                d["use_dora"].clone(),
                d["use_rslora"].clone(),
                d["lora_alpha"].clone()
            ),
            (json!(true), json!(true), json!(2))
        );

        let d = peft_config_dict(&meta("LOHA")).unwrap();
        assert_eq!(
            (d["peft_type"].clone(), d["alpha"].clone(), d["r"].clone()),
            (json!("LOHA"), json!(2), json!(4))
        );
        assert!(!d.contains_key("lora_alpha") && !d.contains_key("decompose_factor"));
        assert_eq!(d["target_modules"], json!(["to_q", "to_v"]));

        let mut m = meta("lokr");
        m.config = peft_settings(
            "LOKR",
            &json!({"decompose_factor": 4, "init_weights": "lycoris", "plugin_only": 1}),
        );
        assert_eq!(m.config.len(), 2);
        let d = peft_config_dict(&m).unwrap();
        assert_eq!(
            (
                d["peft_type"].clone(),
                d["decompose_factor"].clone(),
                d["init_weights"].clone()
            ),
            (json!("LOKR"), json!(4), json!("lycoris"))
        );

        let mut m = meta("LOHA");
        m.config.insert("decompose_factor".into(), json!(2));
        let e = peft_config_dict(&m).unwrap_err().to_string();
        assert!(
            e.contains("`decompose_factor` is not a field of PEFT's LOHA config"),
            "{e}"
        );
        let mut m = meta("LORA");
        m.config.insert("r".into(), json!(2));
        assert!(peft_config_dict(&m)
            .unwrap_err()
            .to_string()
            .contains("set by the trainer"));
    }
}
