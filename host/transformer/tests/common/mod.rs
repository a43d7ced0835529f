//! Test/bench helpers: random transformer folders (`cogvx_transformer::random`) and inputs.
#![allow(dead_code)]

use burn::tensor::{backend::Backend, Tensor};
use cogvx_transformer::TransformerConfig;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

pub type B = cogvx_model_core::CpuBackend;

/// The shared reference folder (next to the repository), or `None` with a loud message.
pub fn reference_dir() -> PathBuf {
    cogvx_fixtures::reference("")
}

/// [`cogvx_transformer::random::write_random_transformer`], panicking on failure.
pub fn write_random_transformer(dir: &Path, config: &TransformerConfig, seed: u64, scale: f32) {
    cogvx_transformer::random::write_random_transformer(dir, config, seed, scale).unwrap();
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
