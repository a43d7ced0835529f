//! [`ModelBackend`]: a burn backend with the operations cogvx implements itself.
//!
//! Model code that needs one of them is generic over `B: ModelBackend` instead of burn's
//! `Backend`. Each method has a default written with burn tensor operations, so a backend gets
//! them by a one-line `impl`; a backend can override one with a fused kernel, and
//! [`burn::backend::Autodiff`] overrides them with their own backward (see
//! [`crate::attention`]).

use crate::attention::flash::{self, BlockSizes};
use crate::attention::Tiling;
use crate::feed_forward::{FeedForwardGrads, FeedForwardInputs};
use crate::precision::{float_dtype, to_dtype, to_f32};
use burn::tensor::FloatDType;
use burn::tensor::{
    backend::AutodiffBackend, backend::Backend, ops::FloatTensor, Tensor, TensorPrimitive,
};

/// The attention operands and options, as primitives: q `[B, H, Lq, D]`, k `[B, H, Lk, D]`,
/// v `[B, H, Lk, Dv]`, an additive `bias` broadcastable to `[B, H, Lq, Lk]`, the score `scale`
/// and the tiling.
#[derive(Debug, Clone)]
pub struct AttentionInputs<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub bias: Option<FloatTensor<B>>,
    pub scale: f64,
    pub sizes: BlockSizes,
}

/// What the attention backward needs besides the inputs: the output and each row's log-sum-exp.
#[derive(Debug, Clone)]
pub struct AttentionSaved<B: Backend> {
    pub out: FloatTensor<B>,
    pub lse: FloatTensor<B>,
}

/// Gradients of the attention output with respect to q, k, v and the bias (when asked).
#[derive(Debug)]
pub struct AttentionGrads<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub bias: Option<FloatTensor<B>>,
}

fn tensor<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend>(t: Tensor<B, 4>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The body of a one-input autodiff operation's backward: the gradient of its output, mapped
/// by `f` with the saved state, registered for its input (when that is tracked).
pub(crate) fn unary_backward<B: Backend, S>(
    ops: burn::backend::autodiff::ops::Ops<S, 1>,
    grads: &mut burn::backend::autodiff::grads::Gradients,
    f: impl FnOnce(S, FloatTensor<B>) -> FloatTensor<B>,
) {
    let grad = grads.consume::<B>(&ops.node);
    if let Some(node) = &ops.parents[0] {
        grads.register::<B>(node.id, f(ops.state, grad));
    }
}

/// The end of an autodiff operation's backward: each parent that is tracked (its id, from
/// `ops.parents`) gets its gradient, where one was computed.
pub(crate) fn register_gradients<B: Backend>(
    grads: &mut burn::backend::autodiff::grads::Gradients,
    parents: impl IntoIterator<Item = Option<burn::backend::autodiff::NodeId>>,
    values: impl IntoIterator<Item = Option<FloatTensor<B>>>,
) {
    for (parent, value) in parents.into_iter().zip(values) {
        if let (Some(id), Some(value)) = (parent, value) {
            grads.register::<B>(id, value);
        }
    }
}

/// A burn backend with cogvx's own operations.
pub trait ModelBackend: Backend {
    /// Memory-efficient attention forward: the output and the per-row log-sum-exp
    /// (FlashAttention-2, [`flash::forward`]).
    ///
    /// Half-precision operands are computed in f32 block by block (FlashAttention's f32
    /// accumulators); the output has q's dtype, the log-sum-exp is f32.
    fn flash_attention_forward(inputs: AttentionInputs<Self>) -> AttentionSaved<Self> {
        generic_flash_attention_forward(inputs)
    }

    /// The tiles this backend's attention runs, forward and backward, for the requested one
    /// (the CPU kernel has its own, capped by it, see [`crate::attention::cpu`]); what
    /// benchmarks report.
    fn attention_tiles(requested: BlockSizes) -> Tiling {
        Tiling {
            forward: requested,
            backward: requested,
        }
    }

    /// Memory-efficient attention backward from the saved output and log-sum-exp
    /// ([`flash::backward`]); `bias_grad` asks for the bias's gradient too.
    fn flash_attention_backward(
        inputs: AttentionInputs<Self>,
        saved: AttentionSaved<Self>,
        grad_out: FloatTensor<Self>,
        bias_grad: bool,
    ) -> AttentionGrads<Self> {
        generic_flash_attention_backward(inputs, saved, grad_out, bias_grad)
    }

    /// Attention as one operation: under autodiff it saves only q, k, v, the output and the
    /// log-sum-exp, and its backward is [`ModelBackend::flash_attention_backward`].
    fn flash_attention(inputs: AttentionInputs<Self>) -> FloatTensor<Self> {
        Self::flash_attention_forward(inputs).out
    }

    /// tanh-approximated GELU ([`crate::activation::gelu_tanh`]); under autodiff one operation
    /// that keeps only its input.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::activation::elementwise::<Self>(x, crate::activation::gelu_tanh_formula::<Self, 1>)
    }

    /// The gradient of [`ModelBackend::gelu_tanh`] at `x` times `grad`.
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::activation::elementwise2::<Self>(
            x,
            grad,
            crate::activation::gelu_tanh_backward_formula::<Self, 1>,
        )
    }

    /// Layer normalisation over the last dimension, without the affine part
    /// ([`crate::nn::layer_norm`]); under autodiff one operation that keeps only its input.
    fn layer_norm_rows(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        crate::nn::generic_layer_norm::<Self>(x, eps)
    }

    /// The gradient of [`ModelBackend::layer_norm_rows`] at `x` times `grad`
    /// ([`crate::nn::layer_norm_backward`]).
    fn layer_norm_rows_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        crate::nn::generic_layer_norm_backward::<Self>(x, grad, eps)
    }

    /// `x` laid out contiguously, row-major (a copy where it is a strided view). By default
    /// unchanged: a backend whose operations take any layout at full speed has nothing to gain.
    fn contiguous(x: FloatTensor<Self>) -> FloatTensor<Self> {
        x
    }

    /// `x.swap_dims(dim1, dim2)`, laid out contiguously ([`ModelBackend::contiguous`]); under
    /// autodiff one operation whose backward swaps the gradient the same way ([`crate::layout`]).
    fn swap_dims_contiguous(x: FloatTensor<Self>, dim1: usize, dim2: usize) -> FloatTensor<Self> {
        Self::contiguous(Self::float_swap_dims(x, dim1, dim2))
    }

    /// `x W^T + b` for `x [rows, in]`, `weight [out, in]` and an optional `bias [out]`
    /// (torch's `F.linear`); under autodiff one operation that saves `x` and `W`
    /// ([`crate::linear`]).
    fn torch_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        crate::linear::generic_linear::<Self>(x, weight, bias)
    }

    /// The product of two 2-D tensors of any layout (transposed views included), as the
    /// linear's and the feed-forward's backward take them.
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `[residual +] y * a[s] [+ c[s]]` over a block's joint text + video sequence, `a` and `c`
    /// holding one row per stream ([`crate::modulate`]); under autodiff one operation.
    fn modulate(inputs: crate::modulate::ModulateInputs<Self>) -> FloatTensor<Self> {
        crate::modulate::generic_modulate(inputs)
    }

    /// `x * cos + rot(x) * sin` for `x [B, H, S, D]` and tables `[S, D]`, `rot` turning each
    /// pair `(x[2i], x[2i+1])` into `(-x[2i+1], x[2i])` ([`crate::rotary`]); under autodiff one
    /// operation keeping only the tables.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        crate::rotary::generic_rotary::<Self>(x, cos, sin)
    }

    /// The gradient of [`ModelBackend::rotary`] with respect to `x`.
    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        crate::rotary::generic_rotary_backward::<Self>(grad, cos, sin)
    }

    /// `c + alpha (lhs rhs)` for 2-D tensors; on flex the product accumulates into `c`'s
    /// buffer (no separate sum pass).
    fn matmul_add(
        c: FloatTensor<Self>,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        alpha: f64,
    ) -> FloatTensor<Self> {
        crate::linear::generic_matmul_add::<Self>(c, lhs, rhs, alpha)
    }

    /// A LoRA layer `x W^T + b + scale (x A^T) B^T` for `x [rows, in]`, `W [out, in]`,
    /// `A [r, in]`, `B [out, r]` ([`crate::linear`]); under autodiff one operation (with `W` and
    /// `b` frozen) that keeps `x` and `x A^T`.
    fn lora_linear(inputs: crate::linear::LoraInputs<Self>) -> FloatTensor<Self> {
        crate::linear::generic_lora_linear::<Self>(inputs)
    }

    /// The feed-forward `gelu_tanh(x W1^T + b1) W2^T + b2` over chunks of rows
    /// ([`crate::feed_forward`]); under autodiff one operation that keeps its operands and,
    /// unless `inputs.recompute`, the pre-activation; never the hidden layer.
    fn feed_forward(inputs: FeedForwardInputs<Self>) -> FloatTensor<Self> {
        crate::feed_forward::forward::<Self>(inputs)
    }

    /// [`ModelBackend::feed_forward`] and the pre-activation `x W1^T + b1` it computed, which
    /// [`ModelBackend::feed_forward_backward`] then takes instead of recomputing it.
    fn feed_forward_keeping(
        inputs: FeedForwardInputs<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::feed_forward::forward_keeping::<Self>(inputs)
    }

    /// The gradients of [`ModelBackend::feed_forward`] for `[x, w1, b1, w2, b2]` where `wanted`,
    /// from the kept pre-activation or recomputing it chunk by chunk.
    fn feed_forward_backward(
        inputs: FeedForwardInputs<Self>,
        kept: Option<FloatTensor<Self>>,
        grad: FloatTensor<Self>,
        wanted: [bool; 5],
    ) -> FeedForwardGrads<Self> {
        crate::feed_forward::backward::<Self>(inputs, kept, grad, wanted)
    }
}

/// [`ModelBackend::flash_attention_forward`] written with burn operations ([`flash::forward`]):
/// what a backend without its own kernel runs.
pub fn generic_flash_attention_forward<B: Backend>(
    inputs: AttentionInputs<B>,
) -> AttentionSaved<B> {
    let q = tensor::<B>(inputs.q);
    let dtype = float_dtype(&q);
    let (out, lse) = flash::forward(
        to_f32(q),
        to_f32(tensor::<B>(inputs.k)),
        to_f32(tensor::<B>(inputs.v)),
        inputs.bias.map(|b| to_f32(tensor(b))),
        inputs.scale,
        inputs.sizes,
    );
    AttentionSaved {
        out: prim(to_dtype(out, dtype)),
        lse: prim(lse),
    }
}

/// [`ModelBackend::flash_attention_backward`] written with burn operations
/// ([`flash::backward`]).
pub fn generic_flash_attention_backward<B: Backend>(
    inputs: AttentionInputs<B>,
    saved: AttentionSaved<B>,
    grad_out: FloatTensor<B>,
    bias_grad: bool,
) -> AttentionGrads<B> {
    let (q, k, v) = (
        tensor::<B>(inputs.q),
        tensor::<B>(inputs.k),
        tensor::<B>(inputs.v),
    );
    let bias = inputs.bias.map(tensor::<B>);
    // Each gradient in its input's dtype, computed in f32.
    let dtypes = (
        float_dtype(&q),
        float_dtype(&k),
        float_dtype(&v),
        bias.as_ref().map(float_dtype),
    );
    let g = flash::backward(
        to_f32(q),
        to_f32(k),
        to_f32(v),
        bias.map(to_f32),
        inputs.scale,
        to_f32(tensor(saved.out)),
        to_f32(tensor(saved.lse)),
        to_f32(tensor(grad_out)),
        bias_grad,
        inputs.sizes,
    );
    AttentionGrads {
        q: prim(to_dtype(g.q, dtypes.0)),
        k: prim(to_dtype(g.k, dtypes.1)),
        v: prim(to_dtype(g.v, dtypes.2)),
        bias: g
            .bias
            .map(|b| prim(to_dtype(b, dtypes.3.unwrap_or(FloatDType::F32)))),
    }
}

/// An autodiff backend whose inner backend is a [`ModelBackend`] too: what training code
/// needs (the model runs on `Self`, validation and the optimizer on `Self::InnerBackend`).
pub trait ModelAutodiffBackend: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {
    /// Whether a backward from `tensor` reaches anything that requires a gradient (a leaf that
    /// requires one, or a result computed from one). burn's `is_require_grad` answers for
    /// leaves only.
    fn is_tracked(tensor: &FloatTensor<Self>) -> bool;
}

impl<B: ModelBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    ModelAutodiffBackend for burn::backend::Autodiff<B, C>
{
    fn is_tracked(tensor: &FloatTensor<Self>) -> bool {
        !tensor.node.requirement.is_none()
    }
}

/// The methods a CPU backend runs as [`cogvx_kernels`]: the attention
/// ([`crate::attention::cpu`]), the GELU ([`crate::activation`]), the layer norm
/// ([`crate::nn`]), the modulation, RoPE and the feed-forward ([`crate::feed_forward`]).
macro_rules! cpu_kernels {
    () => {
        fn flash_attention_forward(inputs: AttentionInputs<Self>) -> AttentionSaved<Self> {
            crate::attention::cpu::forward(inputs)
        }

        fn attention_tiles(requested: BlockSizes) -> Tiling {
            crate::attention::cpu::tiles(requested)
        }

        fn flash_attention_backward(
            inputs: AttentionInputs<Self>,
            saved: AttentionSaved<Self>,
            grad_out: FloatTensor<Self>,
            bias_grad: bool,
        ) -> AttentionGrads<Self> {
            crate::attention::cpu::backward(inputs, saved, grad_out, bias_grad)
        }

        fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
            crate::activation::cpu_gelu_tanh::<Self>(x)
        }

        fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            crate::activation::cpu_gelu_tanh_backward::<Self>(x, grad)
        }

        fn layer_norm_rows(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
            crate::nn::cpu_layer_norm::<Self>(x, eps)
        }

        fn modulate(inputs: crate::modulate::ModulateInputs<Self>) -> FloatTensor<Self> {
            crate::modulate::cpu_modulate::<Self>(inputs)
        }

        fn rotary(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            crate::rotary::cpu_rotary::<Self>(x, cos, sin)
        }

        fn rotary_backward(
            grad: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            crate::rotary::cpu_rotary_backward::<Self>(grad, cos, sin)
        }

        fn layer_norm_rows_backward(
            x: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            eps: f64,
        ) -> FloatTensor<Self> {
            crate::nn::cpu_layer_norm_backward::<Self>(x, grad, eps)
        }

        fn feed_forward(inputs: FeedForwardInputs<Self>) -> FloatTensor<Self> {
            crate::feed_forward::cpu_forward::<Self>(inputs)
        }

        fn feed_forward_keeping(
            inputs: FeedForwardInputs<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            crate::feed_forward::cpu_forward_keeping::<Self>(inputs)
        }

        fn feed_forward_backward(
            inputs: FeedForwardInputs<Self>,
            kept: Option<FloatTensor<Self>>,
            grad: FloatTensor<Self>,
            wanted: [bool; 5],
        ) -> FeedForwardGrads<Self> {
            crate::feed_forward::cpu_backward::<Self>(inputs, kept, grad, wanted)
        }
    };
}

impl<E, I, Q> ModelBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn_ndarray::FloatNdArrayElement,
    I: burn_ndarray::IntNdArrayElement,
    Q: burn_ndarray::QuantElement,
    burn_ndarray::NdArrayTensor:
        From<burn_ndarray::SharedArray<E>> + From<burn_ndarray::SharedArray<I>>,
{
    cpu_kernels!();
}

#[cfg(feature = "cuda")]
impl ModelBackend for crate::CudaBackend {}

#[cfg(feature = "flex")]
impl ModelBackend for burn::backend::Flex {
    cpu_kernels!();

    fn contiguous(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::layout::flex_contiguous(x)
    }

    fn torch_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        crate::linear::flex::linear(x, weight, bias)
    }

    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::linear::flex::matmul(lhs, rhs)
    }

    fn matmul_add(
        c: FloatTensor<Self>,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        alpha: f64,
    ) -> FloatTensor<Self> {
        crate::linear::flex::matmul_add(c, lhs, rhs, alpha)
    }
}

#[cfg(feature = "wgpu")]
impl ModelBackend for crate::WgpuBackend {}
