//! Applying a diffusers LoRA file (`pytorch_lora_weights.safetensors`) to a loaded transformer
//! for sampling, as diffusers' `load_lora_weights` does: each `<module>.lora_A.weight` /
//! `<module>.lora_B.weight` pair becomes a LoRA adapter on that linear layer, applied at
//! `lora_alpha / r` (times an optional strength, diffusers' adapter weight).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_adapters::{linear_layers_mut, LoadedLora};
use cogvx_model_core::adapter::{LinearAdapter, LoraAdapter};
use cogvx_transformer::CogVideoXTransformer3DModel;

use crate::EngineError;

/// The `lora_alpha` diffusers uses for a file without adapter metadata (the official
/// finetune's): `get_peft_kwargs` sets it to the most common rank, so such files load at
/// scale 1.0. Ties go to the smallest rank.
pub fn default_alpha(lora: &LoadedLora) -> Option<f64> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for (key, (shape, _)) in &lora.tensors {
        if key.ends_with(".lora_B.weight") && shape.len() == 2 {
            *counts.entry(shape[1]).or_default() += 1;
        }
    }
    let max = counts.values().copied().max()?;
    counts
        .into_iter()
        .find(|&(_, n)| n == max)
        .map(|(rank, _)| rank as f64)
}

/// Puts the LoRA of `lora` (read from `path`, used in errors) on `transformer`'s linear layers
/// by diffusers module name, at `strength * lora_alpha / r`; `lora_alpha` from the file's
/// metadata, else [`default_alpha`]. Returns the adapted module names. Errors (a module the
/// transformer lacks, a missing A or B, shapes that do not fit, a layer that already has an
/// adapter, a metadata rank different from the tensors') name the file and the key; the
/// transformer is left unchanged then.
pub fn apply_lora<B: Backend>(
    transformer: &mut CogVideoXTransformer3DModel<B>,
    lora: &LoadedLora,
    path: &Path,
    strength: f64,
    device: &B::Device,
) -> Result<Vec<String>, EngineError> {
    let bad = |message: String| EngineError::Lora {
        path: path.to_path_buf(),
        message,
    };
    if !strength.is_finite() {
        return Err(bad(format!(
            "LoRA strength {strength} is not a finite number"
        )));
    }
    if lora.tensors.is_empty() {
        return Err(bad("the file holds no LoRA tensors".into()));
    }
    let alpha = match &lora.metadata {
        Some(meta) => meta.alpha,
        None => default_alpha(lora).ok_or_else(|| bad("the file holds no lora_B tensor".into()))?,
    };
    // Group A and B by module.
    type Pair<'a> = [Option<&'a (Vec<usize>, Vec<f32>)>; 2];
    let mut modules: BTreeMap<&str, Pair> = BTreeMap::new();
    for (key, value) in &lora.tensors {
        let (module, slot) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(bad(format!(
                "`transformer.{key}` is not a lora_A/lora_B weight"
            )));
        };
        modules.entry(module).or_default()[slot] = Some(value);
    }

    let mut layers: BTreeMap<String, _> = linear_layers_mut(transformer).into_iter().collect();
    let mut built = Vec::with_capacity(modules.len());
    for (module, [a, b]) in &modules {
        let (Some((a_shape, a_data)), Some((b_shape, b_data))) = (a, b) else {
            let missing = if a.is_none() { "lora_A" } else { "lora_B" };
            return Err(bad(format!(
                "`transformer.{module}.{missing}.weight` is missing (the file has the other half of the pair)"
            )));
        };
        let Some(layer) = layers.get(*module) else {
            let sample: Vec<&str> = layers.keys().take(6).map(String::as_str).collect();
            return Err(bad(format!(
                "`transformer.{module}.lora_A.weight`: the transformer has no linear layer `{module}` \
                 (they are named like {}, ...); is this LoRA for another CogVideoX model?",
                sample.join(", ")
            )));
        };
        if layer.adapter.is_some() {
            return Err(bad(format!(
                "`{module}` already has an adapter; apply one LoRA per transformer"
            )));
        }
        let (inf, outf) = layer.dims();
        let (&[r, a_in], &[b_out, rb]) = (a_shape.as_slice(), b_shape.as_slice()) else {
            return Err(bad(format!(
                "`transformer.{module}`: lora_A {a_shape:?} and lora_B {b_shape:?} must be matrices"
            )));
        };
        if a_in != inf || b_out != outf || r != rb || r == 0 {
            return Err(bad(format!(
                "`transformer.{module}`: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit the layer \
                 ({inf} -> {outf}; expected [r, {inf}] and [{outf}, r])"
            )));
        }
        if let Some(meta) = &lora.metadata {
            if meta.rank != r {
                return Err(bad(format!(
                    "`transformer.{module}` has rank {r}, the header's `lora_adapter_metadata` says r = {}",
                    meta.rank
                )));
            }
        }
        let a = Tensor::<B, 2>::from_data(TensorData::new(a_data.clone(), [r, inf]), device);
        let b = Tensor::<B, 2>::from_data(TensorData::new(b_data.clone(), [outf, r]), device);
        let adapter = LoraAdapter::from_tensors(module, a, b, alpha * strength)
            .map_err(|e| bad(e.to_string()))?;
        built.push((module.to_string(), adapter));
    }
    // Everything checked: attach.
    let mut names = Vec::with_capacity(built.len());
    for (module, adapter) in built {
        let layer = layers.get_mut(&module).expect("checked above");
        layer.adapter = Some(LinearAdapter::Lora(adapter));
        names.push(module);
    }
    Ok(names)
}

/// Reads a LoRA file in diffusers' or ComfyUI's layout ([`cogvx_adapters::load_lora_any`]) and applies it ([`apply_lora`]).
pub fn load_and_apply_lora<B: Backend>(
    transformer: &mut CogVideoXTransformer3DModel<B>,
    path: &Path,
    strength: f64,
    device: &B::Device,
) -> Result<Vec<String>, EngineError> {
    let lora = cogvx_adapters::load_lora_any(path)?;
    apply_lora(transformer, &lora, path, strength, device)
}
