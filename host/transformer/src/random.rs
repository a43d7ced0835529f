//! Random diffusers-layout `transformer/` folders (`config.json` plus float32 safetensors) for
//! any [`TransformerConfig`], for benchmarks at real widths and tests of generated configs. The
//! checkpoint keys are the model's own module paths, which equal diffusers' keys.

use crate::{CogVideoXTransformer3DModel, TransformerConfig, TransformerError};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::CpuBackend;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

/// Collects `(path, shape)` of every float parameter, paths joined with `.`.
#[derive(Default)]
struct ParamPaths {
    stack: Vec<String>,
    params: Vec<(String, Vec<usize>)>,
}

impl<B: Backend> ModuleVisitor<B> for ParamPaths {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.params
            .push((self.stack.join("."), param.val().dims().to_vec()));
    }
}

/// Every parameter of `model` as `(checkpoint key, checkpoint shape)`, plus the learned
/// `patch_embed.pos_embedding` buffer when the config has one.
pub fn checkpoint_keys<B: Backend>(
    model: &CogVideoXTransformer3DModel<B>,
) -> Vec<(String, Vec<usize>)> {
    let mut visitor = ParamPaths::default();
    model.visit(&mut visitor);
    let c = &model.config;
    let mut keys = visitor.params;
    for (k, shape) in keys.iter_mut() {
        // CogVideoX 1.0's patch projection is a Conv2d in the checkpoint, held flattened here.
        if k == "patch_embed.proj.weight" && c.patch_size_t.is_none() {
            *shape = vec![c.inner_dim(), c.in_channels, c.patch_size, c.patch_size];
        }
    }
    if c.use_learned_positional_embeddings {
        if let Some(pos) = model.patch_embed.pos_embedding.as_ref() {
            keys.push(("patch_embed.pos_embedding".into(), pos.dims().to_vec()));
        }
    }
    keys
}

fn io(path: &Path, e: impl std::fmt::Display) -> TransformerError {
    TransformerError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes `config.json` and seeded random float32 weights for `config` into `dir` (a diffusers
/// `transformer/` folder that [`CogVideoXTransformer3DModel::from_dir`] loads). Norm weights are
/// `1 + U(-0.1, 0.1)`; every other tensor is `U(-a, a)` with `a = scale * sqrt(3 / fan_in)`
/// (at `scale = 1`, standard deviation `1 / sqrt(fan_in)`, the scale of PyTorch's default
/// initialisations).
pub fn write_random_transformer(
    dir: &Path,
    config: &TransformerConfig,
    seed: u64,
    scale: f32,
) -> Result<(), TransformerError> {
    config
        .validate()
        .map_err(|message| TransformerError::Config {
            path: dir.join("config.json").display().to_string(),
            message,
        })?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let config_path = dir.join("config.json");
    let mut json = serde_json::to_value(config).map_err(|e| io(&config_path, e))?;
    json["_class_name"] = "CogVideoXTransformer3DModel".into();
    let text = serde_json::to_string_pretty(&json).map_err(|e| io(&config_path, e))?;
    cogvx_io::write_atomically(&config_path, text.as_bytes()).map_err(|e| io(&config_path, e))?;
    // An empty weights file gives a zero model whose module paths name every key.
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let none = BTreeMap::new();
    cogvx_io::write_safetensors_f32(&file, &none, &BTreeMap::new()).map_err(|e| io(&file, e))?;
    let vb = VarBuilder::from_dir(dir)?;
    let keys = checkpoint_keys(&CogVideoXTransformer3DModel::<CpuBackend>::load(
        &vb,
        config,
        &Default::default(),
    )?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = cogvx_io::F32Tensors::new();
    for (k, shape) in keys {
        let n: usize = shape.iter().product();
        let is_norm_weight = shape.len() == 1 && k.contains("norm") && k.ends_with("weight");
        let fan_in: usize = if shape.len() > 1 {
            shape[1..].iter().product()
        } else {
            shape[0]
        };
        let a = scale * (3.0f32 / fan_in.max(1) as f32).sqrt();
        let data = (0..n)
            .map(|_| {
                let u: f32 = rng.random_range(-1.0..1.0);
                if is_norm_weight {
                    1.0 + 0.1 * u
                } else {
                    a * u
                }
            })
            .collect();
        tensors.insert(k, (shape, data));
    }
    cogvx_io::write_safetensors_f32(&file, &tensors, &BTreeMap::new()).map_err(|e| io(&file, e))
}
