//! The one attention function of cogvx.
//!
//! Every model (transformer, T5) calls [`attention`]. It is memory-efficient attention
//! (FlashAttention-2, [`flash`]) as one operation of [`ModelBackend`]: under autodiff it keeps
//! q, k, v, the output and one log-sum-exp per row for the backward, O(L x head_dim) instead of
//! the O(L^2) score matrix. The CPU backends run it as one kernel over host buffers
//! (`cpu`, [`cogvx_kernels::attention`]); other backends as burn operations tile by tile
//! ([`flash`]). [`attention_naive`] is the textbook formula, kept as the oracle.

mod autodiff;
pub(crate) mod cpu;
pub mod flash;

pub use flash::BlockSizes;

/// The tiles an attention call runs, the forward's and the backward's (what benchmarks report;
/// see [`ModelBackend::attention_tiles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    pub forward: BlockSizes,
    pub backward: BlockSizes,
}

use crate::backend::{AttentionInputs, ModelBackend};
use burn::tensor::{activation::softmax, backend::Backend, Tensor, TensorPrimitive};

/// Scaled dot-product attention over `[batch, heads, len, head_dim]` tensors.
///
/// `scale` defaults to `1/sqrt(head_dim)` (PyTorch's `scaled_dot_product_attention`); T5 passes
/// `Some(1.0)`. `bias` is added to the scores before the softmax (T5's relative position bias, or
/// a mask as large negative values) and broadcasts over `[batch, heads, q_len, k_len]` (each of
/// its dims 1 or full).
pub fn attention<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: Option<f64>,
) -> Tensor<B, 4> {
    let [b, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    attention_with_blocks(q, k, v, bias, scale, BlockSizes::for_shape(b * h, lq, lk))
}

/// [`attention`] with the tile sizes given (tests, benchmarks).
pub fn attention_with_blocks<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: Option<f64>,
    sizes: BlockSizes,
) -> Tensor<B, 4> {
    let scale = scale.unwrap_or(1.0 / (q.dims()[3] as f64).sqrt());
    let inputs = AttentionInputs {
        q: q.into_primitive().tensor(),
        k: k.into_primitive().tensor(),
        v: v.into_primitive().tensor(),
        bias: bias.map(|b| b.into_primitive().tensor()),
        scale,
        sizes,
    };
    Tensor::from_primitive(TensorPrimitive::Float(B::flash_attention(inputs)))
}

/// `softmax(q k^T * scale + bias) v` as written, materialising the score matrix: the oracle
/// the memory-efficient path is tested against.
pub fn attention_naive<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: Option<f64>,
) -> Tensor<B, 4> {
    let head_dim = q.dims()[3];
    let scale = scale.unwrap_or(1.0 / (head_dim as f64).sqrt());
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale); // [B, H, Lq, Lk]
    let scores = match bias {
        Some(bias) => scores + bias,
        None => scores,
    };
    softmax(scores, 3).matmul(v)
}

#[cfg(test)]
mod tests;
