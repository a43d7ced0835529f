//! Test/bench helpers: random diffusers-layout `transformer/` folders for any config, built from
//! the model's own module paths (which equal the checkpoint keys).
#![allow(dead_code)]

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use cogvx_model_core::weights::VarBuilder;
use cogvx_transformer::{CogVideoXTransformer3DModel, TransformerConfig};
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

pub type B = cogvx_model_core::CpuBackend;

/// The shared reference folder (next to the repository), or `None` with a loud message.
pub fn reference_dir() -> PathBuf {
    cogvx_fixtures::reference("")
}

/// Collects `(path, shape)` of every parameter, paths joined with `.` like the checkpoint keys.
#[derive(Default)]
pub struct ParamPaths {
    stack: Vec<String>,
    pub params: Vec<(String, Vec<usize>)>,
}

impl<Bk: Backend> ModuleVisitor<Bk> for ParamPaths {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
        self.params
            .push((self.stack.join("."), param.val().dims().to_vec()));
    }
}

/// Every parameter of `model` as `(checkpoint key, checkpoint shape)`, plus the learned
/// `patch_embed.pos_embedding` buffer when the config has one.
pub fn checkpoint_keys(model: &CogVideoXTransformer3DModel<B>) -> Vec<(String, Vec<usize>)> {
    let mut v = ParamPaths::default();
    model.visit(&mut v);
    let c = &model.config;
    let mut keys = v.params;
    for (k, shape) in keys.iter_mut() {
        // 1.0's patch projection is a Conv2d in the checkpoint, held flattened here.
        if k == "patch_embed.proj.weight" && c.patch_size_t.is_none() {
            *shape = vec![c.inner_dim(), c.in_channels, c.patch_size, c.patch_size];
        }
    }
    if c.use_learned_positional_embeddings {
        let pos = model
            .patch_embed
            .pos_embedding
            .as_ref()
            .expect("learned table");
        keys.push(("patch_embed.pos_embedding".into(), pos.dims().to_vec()));
    }
    keys
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes `config.json` and random f32 weights for `config` into `dir` (a diffusers `transformer/`
/// folder). Norm weights are near 1, everything else uniform with std about `scale / sqrt(fan_in)`.
pub fn write_random_transformer(dir: &Path, config: &TransformerConfig, seed: u64, scale: f32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    // 1. An empty file gives a zero model whose module paths name every key.
    write_safetensors(&file, &[]);
    let device = Default::default();
    let vb = VarBuilder::from_dir(dir).unwrap();
    let zero = CogVideoXTransformer3DModel::<B>::load(&vb, config, &device).unwrap();
    let keys = checkpoint_keys(&zero);
    // 2. Random values for those keys.
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
            (k, shape, data)
        })
        .collect();
    write_safetensors(&file, &tensors);
}

/// A small random input for `config`: `(hidden_states, encoder_hidden_states, timestep, ofs)`.
pub fn random_inputs(
    config: &TransformerConfig,
    batch: usize,
    frames: usize,
    height: usize,
    width: usize,
    text_len: usize,
    seed: u64,
) -> (
    Tensor<B, 5>,
    Tensor<B, 3>,
    Tensor<B, 1>,
    Option<Tensor<B, 1>>,
) {
    random_inputs_on::<B>(
        config,
        batch,
        frames,
        height,
        width,
        text_len,
        seed,
        &Default::default(),
    )
}

/// [`random_inputs`] on any backend.
#[allow(clippy::too_many_arguments)]
pub fn random_inputs_on<Bk: Backend>(
    config: &TransformerConfig,
    batch: usize,
    frames: usize,
    height: usize,
    width: usize,
    text_len: usize,
    seed: u64,
    device: &Bk::Device,
) -> (
    Tensor<Bk, 5>,
    Tensor<Bk, 3>,
    Tensor<Bk, 1>,
    Option<Tensor<Bk, 1>>,
) {
    use burn::tensor::TensorData;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rand_vec =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.7f32..1.7)).collect() };
    let x_shape = [batch, frames, config.in_channels, height, width];
    let x = Tensor::from_data(
        TensorData::new(rand_vec(x_shape.iter().product()), x_shape),
        device,
    );
    let ctx_shape = [batch, text_len, config.text_embed_dim];
    let ctx = Tensor::from_data(
        TensorData::new(rand_vec(ctx_shape.iter().product()), ctx_shape),
        device,
    );
    let t = Tensor::from_data(
        TensorData::new(
            (0..batch)
                .map(|i| (137 + 401 * i) as f32)
                .collect::<Vec<_>>(),
            [batch],
        ),
        device,
    );
    let ofs = config
        .ofs_embed_dim
        .map(|_| Tensor::from_data(TensorData::new(vec![2.0f32], [1]), device));
    (x, ctx, t, ofs)
}
