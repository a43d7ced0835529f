//! A trained LoRA in ComfyUI's key layout: `lora_comfyui.safetensors`.
//!
//! ComfyUI's native CogVideoX model (`comfy/ldm/cogvideo/model.py`) names its layers
//! `diffusion_model.blocks.{i}.{q,k,v,attn_out,ff_proj,ff_out,norm1.linear,norm2.linear}` and
//! `diffusion_model.{patch_embed.proj, patch_embed.text_proj, time_embedding_linear_1, ...}`;
//! its LoRA loader takes `<layer>.lora_A.weight` / `<layer>.lora_B.weight` with an optional
//! `<layer>.alpha` scalar, applied at `alpha / rank` (and warns "lora key not loaded" for any key
//! it cannot place, which is how a LoRA "loads but does nothing"). This file writes every pair
//! under those names with its `alpha`, so ComfyUI applies it at the strength diffusers does.

use crate::error::AdaptersError;
use crate::lora_file::{
    lora_export_pairs, split_lora_key, write_safetensors_f32, LoadedLora, LoraMetadata,
};
use burn::tensor::backend::Backend;
use cogvx_model_core::adapter::AdapterTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file name of the ComfyUI export under the output folder.
pub const COMFYUI_LORA_NAME: &str = "lora_comfyui.safetensors";

/// The prefix ComfyUI gives the diffusion model's weights.
const PREFIX: &str = "diffusion_model.";

/// diffusers module names inside `transformer_blocks.{i}` and their ComfyUI names in `blocks.{i}`.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn1.to_q", "q"),
    ("attn1.to_k", "k"),
    ("attn1.to_v", "v"),
    ("attn1.to_out.0", "attn_out"),
    ("ff.net.0.proj", "ff_proj"),
    ("ff.net.2", "ff_out"),
    ("norm1.linear", "norm1.linear"),
    ("norm2.linear", "norm2.linear"),
];

/// Top-level diffusers module names and their ComfyUI names.
const TOP_NAMES: &[(&str, &str)] = &[
    ("patch_embed.proj", "patch_embed.proj"),
    ("patch_embed.text_proj", "patch_embed.text_proj"),
    ("time_embedding.linear_1", "time_embedding_linear_1"),
    ("time_embedding.linear_2", "time_embedding_linear_2"),
    ("ofs_embedding.linear_1", "ofs_embedding_linear_1"),
    ("ofs_embedding.linear_2", "ofs_embedding_linear_2"),
    ("norm_out.linear", "norm_out.linear"),
    ("proj_out", "proj_out"),
];

/// ComfyUI's name (with `diffusion_model.`) of a diffusers transformer module, e.g.
/// `transformer_blocks.3.attn1.to_out.0` -> `diffusion_model.blocks.3.attn_out`; `None` for a
/// module ComfyUI's CogVideoX has no linear layer for.
pub fn comfyui_module(diffusers: &str) -> Option<String> {
    if let Some(rest) = diffusers.strip_prefix("transformer_blocks.") {
        let (index, inner) = rest.split_once('.')?;
        index.parse::<usize>().ok()?;
        let (_, comfy) = BLOCK_NAMES.iter().find(|(d, _)| *d == inner)?;
        return Some(format!("{PREFIX}blocks.{index}.{comfy}"));
    }
    let (_, comfy) = TOP_NAMES.iter().find(|(d, _)| *d == diffusers)?;
    Some(format!("{PREFIX}{comfy}"))
}

/// The diffusers module name of a ComfyUI layer name (the inverse of [`comfyui_module`]).
pub fn diffusers_module(comfyui: &str) -> Option<String> {
    let name = comfyui.strip_prefix(PREFIX)?;
    if let Some(rest) = name.strip_prefix("blocks.") {
        let (index, inner) = rest.split_once('.')?;
        index.parse::<usize>().ok()?;
        let (diffusers, _) = BLOCK_NAMES.iter().find(|(_, c)| *c == inner)?;
        return Some(format!("transformer_blocks.{index}.{diffusers}"));
    }
    let (diffusers, _) = TOP_NAMES.iter().find(|(_, c)| *c == name)?;
    Some(diffusers.to_string())
}

/// [`comfyui_module`], or an error naming the module ComfyUI has no layer for.
fn comfyui_module_for_export(module: &str) -> Result<String, AdaptersError> {
    comfyui_module(module).ok_or_else(|| {
        AdaptersError::Invalid(format!(
            "`{module}` has no counterpart in ComfyUI's CogVideoX model; \
             leave it out of `target_modules` to export for ComfyUI"
        ))
    })
}

/// The keys a ComfyUI LoRA file holds for the diffusers `modules`: `lora_A.weight`,
/// `lora_B.weight` and `alpha` of each (sorted). Errors on a module ComfyUI has no name for.
pub fn comfyui_keys<'a>(
    modules: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, AdaptersError> {
    let mut keys = Vec::new();
    for module in modules {
        let c = comfyui_module_for_export(module)?;
        keys.extend(["lora_A.weight", "lora_B.weight", "alpha"].map(|s| format!("{c}.{s}")));
    }
    keys.sort();
    Ok(keys)
}

/// Saves LoRA parameters (PEFT names, as [`crate::save_lora`] takes them) to
/// `dir/lora_comfyui.safetensors` under ComfyUI's names, float32, each pair with its `alpha`
/// (`meta.alpha`, a 0-d float32 tensor), and the adapter metadata in the header as diffusers
/// writes it. Returns the file's path; nothing is written on error.
pub fn save_lora_comfyui<B: Backend>(
    dir: &Path,
    params: &BTreeMap<String, AdapterTensor<B>>,
    meta: &LoraMetadata,
) -> Result<PathBuf, AdaptersError> {
    let mut tensors = BTreeMap::new();
    for (module, half, t) in lora_export_pairs(params, meta)? {
        let c = comfyui_module_for_export(module)?;
        tensors.insert(format!("{c}.{half}.weight"), (t.shape(), t.to_vec()));
        tensors.insert(format!("{c}.alpha"), (vec![], vec![meta.alpha as f32]));
    }
    let path = dir.join(COMFYUI_LORA_NAME);
    write_safetensors_f32(&path, &tensors, &crate::lora_file::lora_file_metadata(meta))?;
    Ok(path)
}

/// Reads a LoRA in ComfyUI's layout back under diffusers' PEFT names (what
/// [`crate::load_lora`] returns), with the rank from the tensors and the alpha from the `alpha`
/// keys (all equal; missing alphas mean alpha = rank, ComfyUI's scale 1). Errors name the file
/// and the key ComfyUI would not load.
pub fn load_lora_comfyui(path: &Path) -> Result<LoadedLora, AdaptersError> {
    let bad = |message: String| AdaptersError::Io {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut tensors = BTreeMap::new();
    let mut alphas: BTreeMap<String, f32> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = cogvx_model_core::weights::bytes_to_f32(view.data(), view.dtype()).ok_or_else(
            || {
                bad(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    view.dtype()
                ))
            },
        )?;
        if let Some(layer) = name.strip_suffix(".alpha") {
            let [a] = data.as_slice() else {
                return Err(bad(format!("`{name}` is not a scalar")));
            };
            alphas.insert(layer.to_string(), *a);
            continue;
        }
        let Some((layer, half)) = split_lora_key(&name) else {
            return Err(bad(format!(
                "`{name}` is not a LoRA key ComfyUI loads (<layer>.lora_A.weight, .lora_B.weight, .alpha)"
            )));
        };
        let Some(module) = diffusers_module(layer) else {
            return Err(bad(format!(
                "`{name}`: ComfyUI's CogVideoX has no layer `{layer}` (\"lora key not loaded\")"
            )));
        };
        tensors.insert(
            format!("{module}.{half}.weight"),
            (view.shape().to_vec(), data),
        );
    }
    if tensors.is_empty() {
        return Err(bad("the file holds no LoRA tensors".into()));
    }
    let ranks: std::collections::BTreeSet<usize> = tensors
        .iter()
        .filter(|(k, (s, _))| k.ends_with(".lora_A.weight") && s.len() == 2)
        .map(|(_, (s, _))| s[0])
        .collect();
    let [rank] = ranks.iter().copied().collect::<Vec<_>>()[..] else {
        return Err(bad(format!(
            "the LoRA pairs have ranks {ranks:?}; expected one rank"
        )));
    };
    let distinct: std::collections::BTreeSet<u32> = alphas.values().map(|a| a.to_bits()).collect();
    let alpha = match distinct.len() {
        0 => rank as f64,
        1 => f32::from_bits(*distinct.iter().next().expect("one")) as f64,
        _ => {
            return Err(bad(
                "the `alpha` keys differ between layers; expected one alpha".into(),
            ))
        }
    };
    for layer in alphas.keys() {
        let paired = diffusers_module(layer)
            .is_some_and(|m| tensors.contains_key(&format!("{m}.lora_A.weight")));
        if !paired {
            return Err(bad(format!("`{layer}.alpha` has no lora_A/lora_B pair")));
        }
    }
    let mut modules: Vec<String> = tensors
        .keys()
        .filter_map(|k| split_lora_key(k).map(|(m, _)| m.to_string()))
        .collect();
    modules.dedup();
    Ok(LoadedLora {
        tensors,
        metadata: Some(LoraMetadata {
            rank,
            alpha,
            target_modules: modules,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Tensor, TensorData};

    #[test]
    fn every_transformer_linear_has_a_comfyui_name_and_back() {
        for d in [
            "transformer_blocks.0.attn1.to_q",
            "transformer_blocks.12.attn1.to_out.0",
            "transformer_blocks.29.ff.net.0.proj",
            "transformer_blocks.3.ff.net.2",
            "transformer_blocks.3.norm2.linear",
            "patch_embed.text_proj",
            "time_embedding.linear_2",
            "ofs_embedding.linear_1",
            "norm_out.linear",
            "proj_out",
        ] {
            let c = comfyui_module(d).unwrap();
            assert!(c.starts_with("diffusion_model."), "{c}");
            assert_eq!(diffusers_module(&c).as_deref(), Some(d));
        }
        assert_eq!(
            comfyui_module("transformer_blocks.3.attn1.to_out.0").unwrap(),
            "diffusion_model.blocks.3.attn_out"
        );
        assert_eq!(
            comfyui_module("transformer_blocks.0.ff.net.0.proj").unwrap(),
            "diffusion_model.blocks.0.ff_proj"
        );
        assert_eq!(comfyui_module("transformer_blocks.x.attn1.to_q"), None);
        assert_eq!(comfyui_module("attn1.to_q"), None);
        assert_eq!(diffusers_module("blocks.0.q"), None);
    }

    #[test]
    fn save_then_load_round_trips_with_alpha() {
        let dev = Default::default();
        let m = |rows: usize, cols: usize, seed: f32| {
            let v: Vec<f32> = (0..rows * cols).map(|i| seed + i as f32 * 0.5).collect();
            AdapterTensor::Matrix(Tensor::<NdArray, 2>::from_data(
                TensorData::new(v, [rows, cols]),
                &dev,
            ))
        };
        let params = BTreeMap::from([
            (
                "transformer_blocks.0.attn1.to_q.lora_A.weight".to_string(),
                m(2, 4, 1.0),
            ),
            (
                "transformer_blocks.0.attn1.to_q.lora_B.weight".to_string(),
                m(4, 2, 2.0),
            ),
            (
                "transformer_blocks.1.attn1.to_out.0.lora_A.weight".to_string(),
                m(2, 4, 3.0),
            ),
            (
                "transformer_blocks.1.attn1.to_out.0.lora_B.weight".to_string(),
                m(4, 2, 4.0),
            ),
        ]);
        let meta = LoraMetadata {
            rank: 2,
            alpha: 3.5,
            target_modules: vec!["to_q".into(), "to_out.0".into()],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = save_lora_comfyui(dir.path(), &params, &meta).unwrap();
        assert_eq!(path, dir.path().join(COMFYUI_LORA_NAME));
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        assert_eq!(
            names,
            comfyui_keys([
                "transformer_blocks.0.attn1.to_q",
                "transformer_blocks.1.attn1.to_out.0"
            ])
            .unwrap()
        );
        let alpha = st
            .tensor("diffusion_model.blocks.1.attn_out.alpha")
            .unwrap();
        assert!(alpha.shape().is_empty());
        assert_eq!(alpha.data(), 3.5f32.to_le_bytes());
        let back = load_lora_comfyui(&path).unwrap();
        let meta_back = back.metadata.clone().unwrap();
        assert_eq!((meta_back.rank, meta_back.alpha), (2, 3.5));
        for (k, v) in &params {
            assert_eq!(back.tensors[k], (v.shape(), v.to_vec()), "{k}");
        }
        assert_eq!(back.tensors.len(), params.len());
    }

    #[test]
    fn refuses_what_comfyui_would_not_load_and_writes_nothing() {
        let dev = Default::default();
        let t = AdapterTensor::Matrix(Tensor::<NdArray, 2>::zeros([2, 2], &dev));
        let meta = LoraMetadata {
            rank: 2,
            alpha: 2.0,
            target_modules: vec![],
        };
        let dir = tempfile::tempdir().unwrap();
        let params = BTreeMap::from([(
            "transformer_blocks.0.attn1.norm_q.lora_A.weight".to_string(),
            t,
        )]);
        let e = save_lora_comfyui(dir.path(), &params, &meta).unwrap_err();
        assert!(e.to_string().contains("attn1.norm_q"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        // A file with a key ComfyUI cannot place is refused, naming the key.
        let path = dir.path().join("x.safetensors");
        let tensors = BTreeMap::from([(
            "diffusion_model.blocks.0.to_q.lora_A.weight".to_string(),
            (vec![2, 2], vec![0.0f32; 4]),
        )]);
        cogvx_io::write_safetensors_f32(&path, &tensors, &BTreeMap::new()).unwrap();
        let e = load_lora_comfyui(&path).unwrap_err();
        assert!(e.to_string().contains("blocks.0.to_q"), "{e}");
    }
}
