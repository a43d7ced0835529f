//! Shared model plumbing for the cogvx CogVideoX port.
//!
//! * [`weights`]: opens a diffusers component folder (single-file or sharded safetensors, stored
//!   fp16/bf16/fp32) and hands tensors out by checkpoint name through a path-scoped
//!   [`weights::VarBuilder`], so module code carries the checkpoint's names and needs no renaming table.
//! * [`config`]: typed `config.json` reading with errors that name the file.
//! * [`nn`]: the few layers every component shares (PyTorch weight layout).
//! * [`adapter`]: trainable adapters on [`nn::Linear`] (LoRA, plugin recipes).
//! * [`attention`]: the single scaled-dot-product attention function of the project
//!   (memory-efficient, one autodiff operation with its own backward).
//! * [`feed_forward`]: the transformer feed-forward as one operation that recomputes its hidden
//!   layer in the backward, chunk by chunk.
//! * [`backend`]: [`backend::ModelBackend`], burn's `Backend` plus cogvx's own operations.
//! * [`linear`]: `x W^T + b` as one operation (threaded products on the CPU, fused bias).
//! * [`modulate`]: a block's per-stream scale-and-shift and gated residual on its joint sequence.
//! * [`rotary`]: the rotary position embedding as one operation (one pass each way on the CPU).
//! * [`layout`]: the swap of token and head axes as a contiguous copy (CPU backends' fast paths).
//! * [`grad_checkpoint`]: gradient checkpointing as a segmented backward (recompute per module).
//! * [`precision`]: mixed precision (half compute and frozen weights, f32 where autocast keeps it).
//! * [`case`]: the parity case format of `shared/reference/cases`.

pub mod activation;
pub mod adapter;
pub mod attention;
pub mod backend;
pub mod case;
pub mod config;
pub mod error;
pub mod feed_forward;
pub mod grad_checkpoint;
mod host;
pub mod layout;
pub mod linear;
pub mod modulate;
pub mod nn;
pub mod precision;
#[cfg(feature = "testing")]
pub mod recipe_testing;
pub mod rotary;
pub mod weights;

pub use backend::{ModelAutodiffBackend, ModelBackend};
pub use error::LoadError;

/// The CPU backend used by tests and CPU runs (burn's ndarray backend, f32).
pub type CpuBackend = burn::backend::NdArray<f32>;
/// The device of [`CpuBackend`].
pub type CpuDevice = burn::backend::ndarray::NdArrayDevice;
/// [`CpuBackend`] with autodiff, for training on the CPU.
pub type CpuAutodiffBackend = burn::backend::Autodiff<CpuBackend>;

/// burn's `flex` CPU backend (f32 by default, with bf16/f16 tensors): the CPU backend of mixed
/// precision, with the `flex` feature.
#[cfg(feature = "flex")]
pub type FlexBackend = burn::backend::Flex;
/// [`FlexBackend`] with autodiff.
#[cfg(feature = "flex")]
pub type FlexAutodiffBackend = burn::backend::Autodiff<FlexBackend>;

/// burn's wgpu backend (f32; Vulkan, or Mesa's lavapipe on the CPU), with the `wgpu` feature:
/// the cubecl backend itself, without burn's op fusion (see the `cuda` feature).
#[cfg(feature = "wgpu")]
pub type WgpuBackend =
    burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

/// The CUDA backend (f32), with the `cuda` feature.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;
/// The device of [`CudaBackend`].
#[cfg(feature = "cuda")]
pub type CudaDevice = burn::backend::cuda::CudaDevice;

/// A deterministic test tensor with values in about [-1, 1] (the operations' tests draw their
/// operands here).
#[cfg(test)]
pub(crate) fn test_tensor<B: burn::tensor::backend::Backend, const D: usize>(
    dims: [usize; D],
    seed: usize,
) -> burn::tensor::Tensor<B, D> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 498.5 - 1.0)
        .collect();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, dims), &Default::default())
}
