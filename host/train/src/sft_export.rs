//! Export of a fully fine-tuned transformer as a diffusers `transformer/` folder, as
//! `CogVideoXTransformer3DModel.save_pretrained(dir, max_shard_size=...)` writes it:
//!
//! * `config.json`, copied from the folder the model was loaded from;
//! * `diffusion_pytorch_model.safetensors`, or, when the weights exceed the shard size,
//!   `diffusion_pytorch_model-0000i-of-0000N.safetensors` plus
//!   `diffusion_pytorch_model.safetensors.index.json`
//!   (`{"metadata": {"total_size": bytes}, "weight_map": {key: file}}`, `json.dumps(indent=2,
//!   sort_keys=True)` and a newline). Shards follow huggingface_hub's
//!   `split_torch_state_dict_into_shards`: tensors in the module's `state_dict()` order, a new
//!   shard when the next tensor would tip the current one over the limit, a tensor larger than the
//!   limit alone in its own shard;
//! * every shard with the header metadata `{"format": "pt"}`, in float32, bfloat16 or float16
//!   (round to nearest even, as `tensor.to(dtype)`).
//!
//! The folder is written next to the target under a temporary name and renamed into place, so a
//! reader sees the old folder or the new one, never a half-written one.

use crate::error::{invalid, TrainError};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use cogvx_adapters::python_json_dumps;
use cogvx_transformer::{CogVideoXTransformer3DModel, TransformerConfig};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The weights file name of a single-file diffusers model.
pub const SAFETENSORS_WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// The index file name of a sharded diffusers model.
pub const SAFETENSORS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";
/// diffusers' default `max_shard_size` (`"10GB"`, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 10_000_000_000;

/// The floating-point type the exported weights are stored in.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum ExportDtype {
    #[serde(rename = "fp32", alias = "f32", alias = "float32")]
    F32,
    /// bfloat16, as the CogVideoX-5B and 1.5 checkpoints are stored.
    #[default]
    #[serde(rename = "bf16", alias = "bfloat16")]
    Bf16,
    /// float16, as the CogVideoX-2B checkpoint is stored.
    #[serde(rename = "fp16", alias = "f16", alias = "float16")]
    F16,
}

impl ExportDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::Bf16 | ExportDtype::F16 => 2,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::Bf16 => Dtype::BF16,
            ExportDtype::F16 => Dtype::F16,
        }
    }

    /// Little-endian bytes of `values` in this type.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ExportDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ExportDtype::Bf16 => values
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            ExportDtype::F16 => values
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        }
    }
}

impl std::str::FromStr for ExportDtype {
    type Err = TrainError;

    /// `fp32`/`f32`/`float32`, `bf16`/`bfloat16`, `fp16`/`f16`/`float16`.
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(ExportDtype::F32),
            "bf16" | "bfloat16" => Ok(ExportDtype::Bf16),
            "fp16" | "f16" | "float16" => Ok(ExportDtype::F16),
            _ => invalid(format!(
                "unknown export dtype `{s}` (use fp32, bf16 or fp16)"
            )),
        }
    }
}

/// The keys of `CogVideoXTransformer3DModel.state_dict()` for `config`, in its order (a module's
/// own parameters and persistent buffers before its children's, children in registration order).
pub fn state_dict_keys(c: &TransformerConfig) -> Vec<String> {
    let mut keys = Vec::new();
    let linear = |keys: &mut Vec<String>, p: &str, bias: bool| {
        keys.push(format!("{p}.weight"));
        if bias {
            keys.push(format!("{p}.bias"));
        }
    };
    let norm = |keys: &mut Vec<String>, p: &str| {
        if c.norm_elementwise_affine {
            keys.push(format!("{p}.weight"));
            keys.push(format!("{p}.bias"));
        }
    };
    // CogVideoXPatchEmbed registers `pos_embedding` as a persistent buffer only when learned.
    if c.use_learned_positional_embeddings {
        keys.push("patch_embed.pos_embedding".into());
    }
    linear(
        &mut keys,
        "patch_embed.proj",
        c.patch_size_t.is_some() || c.patch_bias,
    );
    linear(&mut keys, "patch_embed.text_proj", true);
    linear(&mut keys, "time_embedding.linear_1", true);
    linear(&mut keys, "time_embedding.linear_2", true);
    if c.ofs_embed_dim.is_some() {
        linear(&mut keys, "ofs_embedding.linear_1", true);
        linear(&mut keys, "ofs_embedding.linear_2", true);
    }
    for i in 0..c.num_layers {
        let b = format!("transformer_blocks.{i}");
        linear(&mut keys, &format!("{b}.norm1.linear"), true);
        norm(&mut keys, &format!("{b}.norm1.norm"));
        // diffusers `Attention` creates norm_q/norm_k (always affine here) before the projections.
        for n in ["norm_q", "norm_k"] {
            keys.push(format!("{b}.attn1.{n}.weight"));
            keys.push(format!("{b}.attn1.{n}.bias"));
        }
        for p in ["to_q", "to_k", "to_v"] {
            linear(&mut keys, &format!("{b}.attn1.{p}"), c.attention_bias);
        }
        linear(&mut keys, &format!("{b}.attn1.to_out.0"), true);
        linear(&mut keys, &format!("{b}.norm2.linear"), true);
        norm(&mut keys, &format!("{b}.norm2.norm"));
        linear(&mut keys, &format!("{b}.ff.net.0.proj"), true);
        linear(&mut keys, &format!("{b}.ff.net.2"), true);
    }
    norm(&mut keys, "norm_final");
    linear(&mut keys, "norm_out.linear", true);
    norm(&mut keys, "norm_out.norm");
    linear(&mut keys, "proj_out", true);
    keys
}

/// huggingface_hub's `split_torch_state_dict_into_shards`: `sizes` (key, bytes) in state-dict
/// order to shards of keys. Returns one shard when everything fits.
pub fn split_into_shards(sizes: &[(String, u64)], max_shard_bytes: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut current_size = 0u64;
    for (key, size) in sizes {
        if *size > max_shard_bytes {
            shards.push(vec![key.clone()]);
            continue;
        }
        if current_size + size > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(key.clone());
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The shard file names for `n` shards (`diffusion_pytorch_model-00001-of-00004.safetensors`, or
/// the single-file name for one).
pub fn shard_file_names(n: usize) -> Vec<String> {
    if n == 1 {
        return vec![SAFETENSORS_WEIGHTS_NAME.to_string()];
    }
    (1..=n)
        .map(|i| format!("diffusion_pytorch_model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

/// What [`save_transformer_folder`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedFolder {
    /// The folder.
    pub dir: PathBuf,
    /// The weight files, in shard order.
    pub files: Vec<String>,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_size: u64,
}

/// Reads the parameters named in `wanted` as `(checkpoint shape, bytes)`.
struct ReadParams<'a> {
    path: Vec<String>,
    wanted: &'a BTreeSet<String>,
    conv_shape: Option<Vec<usize>>,
    dtype: ExportDtype,
    out: BTreeMap<String, (Vec<usize>, Vec<u8>)>,
    in_adapter: bool,
}

impl<B: Backend> ModuleVisitor<B> for ReadParams<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
        self.in_adapter = self.path.iter().any(|s| s == "adapter");
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
        self.in_adapter = self.path.iter().any(|s| s == "adapter");
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.in_adapter {
            return;
        }
        let name = self.path.join(".");
        if !self.wanted.contains(&name) {
            return;
        }
        let t = param.val();
        let mut shape = t.dims().to_vec();
        if name == "patch_embed.proj.weight" {
            if let Some(s) = &self.conv_shape {
                shape = s.clone();
            }
        }
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("converted to f32");
        self.out.insert(name, (shape, self.dtype.encode(&data)));
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Whether every entry of an existing `dir` is something a diffusers transformer folder holds
/// (so replacing the folder loses nothing else).
fn is_replaceable_folder(dir: &Path) -> Result<bool, TrainError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ok = entry.file_type().map(|t| t.is_file()).unwrap_or(false)
            && (name == "config.json"
                || (name.starts_with("diffusion_pytorch_model")
                    && (name.ends_with(".safetensors") || name.ends_with(".index.json"))));
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes `model`'s weights as a diffusers transformer folder at `out_dir` (see the module
/// documentation), with `source_transformer_dir/config.json` (the folder the model was loaded
/// from; its config must be the model's). Shards hold at most `max_shard_bytes` of tensor data
/// ([`DEFAULT_MAX_SHARD_BYTES`] is diffusers' default). An existing `out_dir` is replaced only if
/// it holds nothing but a transformer folder's files. Models with adapters are refused (save the
/// adapter with [`crate::save_lora`] / [`crate::save_adapter`]).
pub fn save_transformer_folder<B: Backend>(
    model: &CogVideoXTransformer3DModel<B>,
    source_transformer_dir: &Path,
    out_dir: &Path,
    max_shard_bytes: u64,
    dtype: ExportDtype,
) -> Result<ExportedFolder, TrainError> {
    if max_shard_bytes == 0 {
        return invalid("max shard size must be positive");
    }
    let config_path = source_transformer_dir.join("config.json");
    let config_bytes = std::fs::read(&config_path).map_err(io_err(&config_path))?;
    let source: TransformerConfig = cogvx_model_core::config::read_config(&config_path)?;
    if source != model.config {
        return invalid(format!(
            "{}: this config differs from the model's; pass the transformer folder the model was loaded from",
            config_path.display()
        ));
    }
    let c = &model.config;

    // Names and sizes in state_dict order, checked against the model's parameters.
    let shapes: BTreeMap<String, Vec<usize>> = crate::sft::checkpoint_shapes(model);
    if let Some(name) = crate::sft::first_adapter_layer(model) {
        return invalid(format!(
            "layer `{name}` has an adapter: a transformer folder holds base weights only (export the adapter with save_lora / save_adapter)"
        ));
    }
    let keys = state_dict_keys(c);
    let pos_embedding = if c.use_learned_positional_embeddings {
        model.patch_embed.pos_embedding.clone()
    } else {
        None
    };
    let mut sizes = Vec::with_capacity(keys.len());
    for key in &keys {
        let shape = if key == "patch_embed.pos_embedding" {
            match &pos_embedding {
                Some(t) => t.dims().to_vec(),
                None => return invalid("the model has learned positional embeddings but holds no `patch_embed.pos_embedding`"),
            }
        } else {
            match shapes.get(key) {
                Some(s) => s.clone(),
                None => {
                    return invalid(format!(
                        "the model has no parameter `{key}` that diffusers' state_dict lists"
                    ))
                }
            }
        };
        sizes.push((
            key.clone(),
            (shape.iter().product::<usize>() * dtype.size()) as u64,
        ));
    }
    let listed: BTreeSet<&String> = keys.iter().collect();
    if let Some(extra) = shapes.keys().find(|k| !listed.contains(k)) {
        return invalid(format!(
            "the model's parameter `{extra}` has no place in diffusers' state_dict"
        ));
    }
    let total_size: u64 = sizes.iter().map(|(_, s)| s).sum();
    let shards = split_into_shards(&sizes, max_shard_bytes);
    let files = shard_file_names(shards.len());

    // Write everything into a temporary sibling folder.
    let out_name = out_dir
        .file_name()
        .ok_or_else(|| TrainError::Invalid(format!("{}: not a folder path", out_dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if out_dir.exists() && (!out_dir.is_dir() || !is_replaceable_folder(out_dir)?) {
        return invalid(format!(
            "{}: exists and holds other files than a diffusers transformer folder; choose an empty or new folder",
            out_dir.display()
        ));
    }
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(".{out_name}.tmp-{}-{stamp}", std::process::id()));
    let result = (|| -> Result<(), TrainError> {
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let write_config = tmp.join("config.json");
        std::fs::write(&write_config, &config_bytes).map_err(io_err(&write_config))?;
        let metadata: HashMap<String, String> =
            HashMap::from([("format".to_string(), "pt".to_string())]);
        let conv_shape = shapes.get("patch_embed.proj.weight").cloned();
        let mut weight_map = serde_json::Map::new();
        for (shard, file) in shards.iter().zip(&files) {
            let wanted: BTreeSet<String> = shard.iter().cloned().collect();
            let mut reader = ReadParams {
                path: Vec::new(),
                wanted: &wanted,
                conv_shape: conv_shape.clone(),
                dtype,
                out: BTreeMap::new(),
                in_adapter: false,
            };
            model.visit(&mut reader);
            let mut tensors = reader.out;
            if wanted.contains("patch_embed.pos_embedding") {
                let t = pos_embedding.clone().expect("checked above");
                let shape = t.dims().to_vec();
                let data = t
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("converted to f32");
                tensors.insert(
                    "patch_embed.pos_embedding".into(),
                    (shape, dtype.encode(&data)),
                );
            }
            if let Some(missing) = shard.iter().find(|k| !tensors.contains_key(*k)) {
                return invalid(format!("could not read the model's parameter `{missing}`"));
            }
            let path = tmp.join(file);
            let views = tensors
                .iter()
                .map(|(k, (shape, bytes))| {
                    TensorView::new(dtype.safetensors(), shape.clone(), bytes)
                        .map(|v| (k.clone(), v))
                        .map_err(|e| TrainError::Invalid(format!("tensor `{k}`: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            safetensors::serialize_to_file(views, Some(metadata.clone()), &path).map_err(|e| {
                TrainError::Io {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
            for key in shard {
                weight_map.insert(key.clone(), json!(file));
            }
        }
        if shards.len() > 1 {
            let index = json!({"metadata": {"total_size": total_size}, "weight_map": Value::Object(weight_map)});
            let path = tmp.join(SAFETENSORS_INDEX_NAME);
            std::fs::write(&path, python_json_dumps(&index) + "\n").map_err(io_err(&path))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    // Swap it into place.
    let old = parent.join(format!(".{out_name}.old-{}-{stamp}", std::process::id()));
    let had_old = out_dir.exists();
    if had_old {
        if let Err(e) = std::fs::rename(out_dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io_err(out_dir)(e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, out_dir) {
        if had_old {
            let _ = std::fs::rename(&old, out_dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io_err(out_dir)(e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(ExportedFolder {
        dir: out_dir.to_path_buf(),
        files,
        total_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(v: &[u64]) -> Vec<(String, u64)> {
        v.iter()
            .enumerate()
            .map(|(i, s)| (format!("t{i}"), *s))
            .collect()
    }

    #[test]
    fn shards_split_as_huggingface_hub() {
        // The docstring's example: [6, 6, 2, 6, 2, 2] at 10 -> [6], [6+2], [6+2+2].
        let s = split_into_shards(&sizes(&[6, 6, 2, 6, 2, 2]), 10);
        assert_eq!(
            s,
            vec![vec!["t0"], vec!["t1", "t2"], vec!["t3", "t4", "t5"]]
        );
        // A tensor over the limit gets its own shard, ahead of the shard being filled.
        let s = split_into_shards(&sizes(&[3, 12, 4, 5]), 10);
        assert_eq!(s, vec![vec!["t1"], vec!["t0", "t2"], vec!["t3"]]);
        assert_eq!(split_into_shards(&sizes(&[1, 2]), 10).len(), 1);
        assert_eq!(
            shard_file_names(1),
            vec!["diffusion_pytorch_model.safetensors"]
        );
        assert_eq!(
            shard_file_names(3)[1],
            "diffusion_pytorch_model-00002-of-00003.safetensors"
        );
    }

    #[test]
    fn dtypes_round_to_nearest_even() {
        assert_eq!("BF16".parse::<ExportDtype>().unwrap(), ExportDtype::Bf16);
        assert!("int8"
            .parse::<ExportDtype>()
            .unwrap_err()
            .to_string()
            .contains("fp32, bf16 or fp16"));
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0).
        let x = 1.0f32 + 2f32.powi(-8);
        assert_eq!(
            ExportDtype::Bf16.encode(&[x]),
            half::bf16::from_f32(1.0).to_le_bytes().to_vec()
        );
        assert_eq!(ExportDtype::F32.encode(&[x]), x.to_le_bytes().to_vec());
        assert_eq!(
            serde_json::from_str::<ExportDtype>("\"float16\"").unwrap(),
            ExportDtype::F16
        );
    }
}
