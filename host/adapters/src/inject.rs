//! Adapter injection into the transformer by diffusers module name, and access to the adapter
//! parameters (values, gradients, updates) by their PEFT names
//! (`transformer_blocks.0.attn1.to_q.lora_A.weight`).

use crate::error::{invalid, AdaptersError};
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use cogvx_model_core::adapter::{
    AdapterTensor, LinearAdapter, LoraAdapter, RecipeAdapter, RecipeLimits,
};
use cogvx_model_core::nn::Linear;
use cogvx_plugin_api::{AdapterRecipe, AdapterRequest};
use cogvx_transformer::CogVideoXTransformer3DModel;
use std::collections::BTreeMap;

/// diffusers' default LoRA targets for CogVideoX (the official finetune's `target_modules`).
pub const DEFAULT_TARGETS: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];

pub use cogvx_model_core::adapter::matches_target;

/// Every `nn.Linear` of the transformer with its diffusers module path, in module order.
///
/// CogVideoX 1.0's `patch_embed.proj` is a `Conv2d` in diffusers and is not listed.
pub fn linear_layers_mut<B: Backend>(
    model: &mut CogVideoXTransformer3DModel<B>,
) -> Vec<(String, &mut Linear<B>)> {
    let conv_patch = model.config.patch_size_t.is_none();
    let mut out: Vec<(String, &mut Linear<B>)> = Vec::new();
    let pe = &mut model.patch_embed;
    if !conv_patch {
        out.push(("patch_embed.proj".into(), &mut pe.proj));
    }
    out.push(("patch_embed.text_proj".into(), &mut pe.text_proj));
    out.push((
        "time_embedding.linear_1".into(),
        &mut model.time_embedding.linear_1,
    ));
    out.push((
        "time_embedding.linear_2".into(),
        &mut model.time_embedding.linear_2,
    ));
    if let Some(ofs) = model.ofs_embedding.as_mut() {
        out.push(("ofs_embedding.linear_1".into(), &mut ofs.linear_1));
        out.push(("ofs_embedding.linear_2".into(), &mut ofs.linear_2));
    }
    for (i, block) in model.transformer_blocks.iter_mut().enumerate() {
        let p = format!("transformer_blocks.{i}");
        out.push((format!("{p}.norm1.linear"), &mut block.norm1.linear));
        let attn = &mut block.attn1;
        out.push((format!("{p}.attn1.to_q"), &mut attn.to_q));
        out.push((format!("{p}.attn1.to_k"), &mut attn.to_k));
        out.push((format!("{p}.attn1.to_v"), &mut attn.to_v));
        out.push((format!("{p}.attn1.to_out.0"), &mut attn.to_out.0));
        out.push((format!("{p}.norm2.linear"), &mut block.norm2.linear));
        out.push((format!("{p}.ff.net.0.proj"), &mut block.ff.net.0.proj));
        out.push((format!("{p}.ff.net.2"), &mut block.ff.net.2));
    }
    out.push(("norm_out.linear".into(), &mut model.norm_out.linear));
    out.push(("proj_out".into(), &mut model.proj_out));
    out
}

/// Rank, alpha and target modules of an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Module names or suffixes (PEFT `target_modules`), e.g. `to_q`, `attn1.to_out.0`.
    pub targets: Vec<String>,
}

impl AdapterSpec {
    /// LoRA on diffusers' default targets.
    pub fn lora(rank: usize, alpha: f64) -> Self {
        AdapterSpec {
            rank,
            alpha,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Freezes every weight of `model`: call it before injecting adapters (whose parameters are then
/// the only trainable ones).
pub fn freeze<B: Backend>(model: CogVideoXTransformer3DModel<B>) -> CogVideoXTransformer3DModel<B> {
    model.no_grad()
}

fn select<'a, B: Backend>(
    model: &'a mut CogVideoXTransformer3DModel<B>,
    spec: &AdapterSpec,
) -> Result<Vec<(String, &'a mut Linear<B>)>, AdaptersError> {
    if spec.rank == 0 {
        return invalid("adapter rank must be at least 1");
    }
    if spec.targets.is_empty() {
        return invalid(
            "no adapter target modules given (diffusers' default is to_q, to_k, to_v, to_out.0)",
        );
    }
    if model.config.patch_size_t.is_none() && matches_target("patch_embed.proj", &spec.targets) {
        return invalid(
            "adapter targets match `patch_embed.proj`, which is a Conv2d in CogVideoX 1.0; adapters go on linear layers only \
             (name the targets more precisely, e.g. `ff.net.0.proj`)",
        );
    }
    let layers = linear_layers_mut(model);
    let names: Vec<String> = layers.iter().map(|(n, _)| n.clone()).collect();
    for t in &spec.targets {
        if !names
            .iter()
            .any(|n| n == t || n.ends_with(&format!(".{t}")))
        {
            let sample: Vec<&str> = names.iter().take(12).map(String::as_str).collect();
            return invalid(format!("adapter target `{t}` matches no linear layer of the transformer (they are named like {}, ...)", sample.join(", ")));
        }
    }
    let chosen: Vec<_> = layers
        .into_iter()
        .filter(|(n, _)| matches_target(n, &spec.targets))
        .collect();
    if let Some((name, _)) = chosen.iter().find(|(_, l)| l.adapter.is_some()) {
        return invalid(format!("layer `{name}` already has an adapter"));
    }
    Ok(chosen)
}

/// Puts a fresh PEFT-initialised LoRA on every targeted layer; returns the layer names.
pub fn inject_lora<B: Backend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    spec: &AdapterSpec,
    device: &B::Device,
) -> Result<Vec<String>, AdaptersError> {
    let mut names = Vec::new();
    for (name, layer) in select(model, spec)? {
        let (inf, outf) = layer.dims();
        let lora =
            LoraAdapter::new(inf, outf, spec.rank, spec.alpha, device).map_err(|mut e| {
                e.layer = name.clone();
                e
            })?;
        layer.adapter = Some(LinearAdapter::Lora(lora));
        names.push(name);
    }
    Ok(names)
}

/// Puts a plugin recipe's adapter on every targeted layer: `recipe_for` is asked for the recipe
/// of each layer (the plugin's `adapter_recipe`), which is validated against the layer and
/// `limits`. Returns the layer names.
pub fn inject_recipe<B: Backend, E: std::fmt::Display>(
    model: &mut CogVideoXTransformer3DModel<B>,
    spec: &AdapterSpec,
    limits: RecipeLimits,
    mut recipe_for: impl FnMut(&AdapterRequest) -> Result<AdapterRecipe, E>,
    device: &B::Device,
) -> Result<Vec<String>, AdaptersError> {
    let mut names = Vec::new();
    for (name, layer) in select(model, spec)? {
        let (inf, outf) = layer.dims();
        let request = AdapterRequest {
            layer: name.clone(),
            in_features: inf as u32,
            out_features: outf as u32,
            rank: spec.rank as u32,
            alpha: spec.alpha as f32,
        };
        let recipe = recipe_for(&request)
            .map_err(|e| AdaptersError::Invalid(format!("adapter plugin, layer `{name}`: {e}")))?;
        let adapter = RecipeAdapter::new(recipe, request, &layer.weight.val(), limits, device)?;
        layer.adapter = Some(LinearAdapter::Recipe(adapter));
        names.push(name);
    }
    Ok(names)
}

/// Every adapter parameter as `(full PEFT name, value, trainable)`, in module order.
pub fn adapter_tensors<B: Backend>(
    model: &mut CogVideoXTransformer3DModel<B>,
) -> Vec<(String, AdapterTensor<B>, bool)> {
    let mut out = Vec::new();
    for (name, layer) in linear_layers_mut(model) {
        if let Some(adapter) = &layer.adapter {
            for (suffix, t, trainable) in adapter.tensors() {
                out.push((format!("{name}.{suffix}"), t, trainable));
            }
        }
    }
    out
}

/// The trainable adapter parameters by full name, on the inner (non-autodiff) backend.
pub fn trainable_values<B: AutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
) -> BTreeMap<String, AdapterTensor<B::InnerBackend>> {
    adapter_tensors(model)
        .into_iter()
        .filter(|(_, _, trainable)| *trainable)
        .map(|(n, t, _)| {
            let inner = match t {
                AdapterTensor::Vector(t) => AdapterTensor::Vector(t.inner()),
                AdapterTensor::Matrix(t) => AdapterTensor::Matrix(t.inner()),
            };
            (n, inner)
        })
        .collect()
}

/// Every adapter parameter by full name (trainable or not), on the inner backend: what a
/// checkpoint must hold to restore an adapter whose recipe has frozen, randomly initialised
/// parameters ([`set_adapter_values`] accepts all of them).
pub fn all_adapter_values<B: AutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
) -> BTreeMap<String, AdapterTensor<B::InnerBackend>> {
    adapter_tensors(model)
        .into_iter()
        .map(|(n, t, _)| {
            let inner = match t {
                AdapterTensor::Vector(t) => AdapterTensor::Vector(t.inner()),
                AdapterTensor::Matrix(t) => AdapterTensor::Matrix(t.inner()),
            };
            (n, inner)
        })
        .collect()
}

/// The gradient of every trainable adapter parameter that the loss reached (as `p.grad` in torch:
/// parameters the loss does not depend on have none).
pub fn adapter_grads<B: AutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    grads: &B::Gradients,
) -> BTreeMap<String, AdapterTensor<B::InnerBackend>> {
    let mut out = BTreeMap::new();
    for (name, t, trainable) in adapter_tensors(model) {
        if !trainable {
            continue;
        }
        let g = match t {
            AdapterTensor::Vector(t) => t.grad(grads).map(AdapterTensor::Vector),
            AdapterTensor::Matrix(t) => t.grad(grads).map(AdapterTensor::Matrix),
        };
        if let Some(g) = g {
            out.insert(name, g);
        }
    }
    out
}

/// Sets adapter parameters by full name (each must exist with the same shape).
pub fn set_adapter_values<B: AutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    values: &BTreeMap<String, AdapterTensor<B::InnerBackend>>,
) -> Result<(), AdaptersError> {
    let mut remaining: BTreeMap<&str, &AdapterTensor<B::InnerBackend>> =
        values.iter().map(|(k, v)| (k.as_str(), v)).collect();
    for (name, layer) in linear_layers_mut(model) {
        let Some(adapter) = layer.adapter.as_mut() else {
            continue;
        };
        let suffixes: Vec<String> = adapter.tensors().into_iter().map(|(s, _, _)| s).collect();
        for suffix in suffixes {
            let full = format!("{name}.{suffix}");
            if let Some(v) = remaining.remove(full.as_str()) {
                let v = match v.clone() {
                    AdapterTensor::Vector(t) => {
                        AdapterTensor::Vector(Tensor::<B, 1>::from_inner(t))
                    }
                    AdapterTensor::Matrix(t) => {
                        AdapterTensor::Matrix(Tensor::<B, 2>::from_inner(t))
                    }
                };
                adapter.set_tensor(&name, &suffix, v)?;
            }
        }
    }
    if !remaining.is_empty() {
        let names: Vec<&str> = remaining.keys().copied().collect();
        return invalid(format!(
            "no adapter parameter named {} in the model",
            names.join(", ")
        ));
    }
    Ok(())
}
