//! Random diffusers-layout `transformer/` folders (config plus float32 safetensors) for any
//! [`TransformerConfig`], with the checkpoint keys taken from the model's own module paths (which
//! equal diffusers' keys, see `cogvx-transformer`).

use crate::BenchError;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::CpuBackend;
use cogvx_transformer::{CogVideoXTransformer3DModel, TransformerConfig};
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
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

fn io(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), BenchError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io(path, e))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| io(path, e))
}

/// The checkpoint keys and shapes of a transformer with `config` (read off a zero model built
/// from an empty weights file in `dir`).
fn checkpoint_keys(
    dir: &Path,
    config: &TransformerConfig,
) -> Result<Vec<(String, Vec<usize>)>, BenchError> {
    let file = dir.join("diffusion_pytorch_model.safetensors");
    write_safetensors(&file, &[])?;
    let vb = VarBuilder::from_dir(dir).map_err(cogvx_transformer::TransformerError::from)?;
    // Every key is missing here (zeros); only the module paths and shapes are used.
    let zero = CogVideoXTransformer3DModel::<CpuBackend>::load(&vb, config, &Default::default())?;
    let mut visitor = ParamPaths::default();
    zero.visit(&mut visitor);
    let mut keys = visitor.params;
    for (k, shape) in keys.iter_mut() {
        // CogVideoX 1.0's patch projection is a Conv2d in the checkpoint, held flattened here.
        if k == "patch_embed.proj.weight" && config.patch_size_t.is_none() {
            *shape = vec![
                config.inner_dim(),
                config.in_channels,
                config.patch_size,
                config.patch_size,
            ];
        }
    }
    if config.use_learned_positional_embeddings {
        if let Some(pos) = zero.patch_embed.pos_embedding.as_ref() {
            keys.push(("patch_embed.pos_embedding".into(), pos.dims().to_vec()));
        }
    }
    Ok(keys)
}

/// Writes `config.json` and seeded random float32 weights for `config` into `dir` (a diffusers
/// `transformer/` folder that [`CogVideoXTransformer3DModel::from_dir`] loads). Norm weights are
/// `1 + U(-0.1, 0.1)`; every other tensor is `U(-a, a)` with `a = sqrt(3 / fan_in)` (standard
/// deviation `1 / sqrt(fan_in)`, the scale of PyTorch's default initialisations).
pub fn write_random_transformer(
    dir: &Path,
    config: &TransformerConfig,
    seed: u64,
) -> Result<(), BenchError> {
    config
        .validate()
        .map_err(|message| cogvx_transformer::TransformerError::Config {
            path: "<bench config>".into(),
            message,
        })?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let config_path = dir.join("config.json");
    let mut json = serde_json::to_value(config).map_err(|e| io(&config_path, e))?;
    json["_class_name"] = "CogVideoXTransformer3DModel".into();
    let text = serde_json::to_string_pretty(&json).map_err(|e| io(&config_path, e))?;
    std::fs::write(&config_path, text).map_err(|e| io(&config_path, e))?;
    let keys = checkpoint_keys(dir, config)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = keys
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let is_norm_weight = shape.len() == 1 && k.contains("norm") && k.ends_with("weight");
            let fan_in: usize = if shape.len() > 1 {
                shape[1..].iter().product()
            } else {
                shape[0]
            };
            let a = (3.0f32 / fan_in.max(1) as f32).sqrt();
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
            (k, shape, data)
        })
        .collect();
    write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &tensors)
}
