//! CPU kernels of cogvx, on plain `f32` slices (no burn types), so they build fast, test
//! against naive loops, and sit behind one `ModelBackend` method each in `cogvx-model-core`.
//!
//! - [`activation`]: the tanh-approximated GELU and its gradient, vectorised, on rayon's
//!   threads.
//! - [`attention`]: memory-efficient attention (FlashAttention-2 tiling) forward and backward,
//!   its tiles multiplied by `gemm`, its row-wise softmax maths vectorised, heads on rayon's
//!   threads.
//! - [`buffer`]: new output buffers initialised chunk by chunk on rayon's threads.
//! - [`feed_forward`]: the transformer feed-forward and its gradients chunk by chunk of rows,
//!   the hidden layer never whole, each chunk's output written once in place.
//! - [`layout`]: a strided view copied into a contiguous buffer row by row (the swap of a
//!   tensor's token and head axes).
//! - [`matmul`]: matrix products of any strides, the output in one band per rayon thread
//!   (each band a single-threaded `gemm`), a bias fused into the output.
//! - [`modulate`]: a block's per-stream scale-and-shift and gated residual over its joint
//!   text + video sequence, one vectorised pass on rayon's threads.
//! - [`norm`]: layer normalisation over the last axis and its gradient, rows on rayon's
//!   threads.
//! - [`rotary`]: the rotary position embedding of each head and its gradient, one pass.
//! - [`simd`]: the row-wise loops those kernels use (a vectorisable `exp`, max, dot), compiled
//!   for AVX2+FMA when the CPU has it.
//!
//! The dev profile builds this crate at opt-level 3 (workspace `Cargo.toml`): its loops are the
//! training step's hot path, also in tests and benchmarks.

pub mod activation;
pub mod attention;
pub mod buffer;
pub mod feed_forward;
pub mod layout;
pub mod matmul;
pub mod modulate;
pub mod norm;
pub mod rotary;
pub mod simd;
mod tile;

/// Deterministic test values in about [-1, 1] (the kernels' tests draw their operands here).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 498.5 - 1.0)
        .collect()
}
