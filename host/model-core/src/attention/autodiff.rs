//! Attention as one autodiff operation: the forward saves q, k, v, the bias, the output and
//! the per-row log-sum-exp (O(L x head_dim), never the score matrix); the backward is
//! [`ModelBackend::flash_attention_backward`].

use crate::backend::{AttentionInputs, AttentionSaved, ModelBackend};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::ops::FloatTensor;

/// The backward step of one attention call; `N` is 3 (q, k, v) or 4 (with a bias).
#[derive(Debug)]
struct AttentionBackward<const N: usize>;

/// What the backward needs: the inputs as primitives and the forward's output and log-sum-exp.
#[derive(Debug, Clone)]
struct State<B: ModelBackend> {
    inputs: AttentionInputs<B>,
    saved: AttentionSaved<B>,
}

impl<B: ModelBackend, const N: usize> Backward<B, N> for AttentionBackward<N> {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad_out = grads.consume::<B>(&ops.node);
        let parents = ops.parents;
        let bias_grad = N == 4 && parents[N - 1].is_some();
        let g = B::flash_attention_backward(ops.state.inputs, ops.state.saved, grad_out, bias_grad);
        let values = [Some(g.q), Some(g.k), Some(g.v), g.bias];
        crate::backend::register_gradients::<B>(grads, parents.map(|p| p.map(|n| n.id)), values);
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    fn attention_tiles(requested: crate::attention::BlockSizes) -> crate::attention::Tiling {
        B::attention_tiles(requested)
    }

    fn flash_attention(inputs: AttentionInputs<Self>) -> FloatTensor<Self> {
        let AttentionInputs {
            q,
            k,
            v,
            bias,
            scale,
            sizes,
        } = inputs;
        let inner = AttentionInputs::<B> {
            q: q.primitive.clone(),
            k: k.primitive.clone(),
            v: v.primitive.clone(),
            bias: bias.as_ref().map(|b| b.primitive.clone()),
            scale,
            sizes,
        };
        macro_rules! op {
            ($n:literal, $nodes:expr) => {
                match AttentionBackward::<$n>
                    .prepare::<C>($nodes)
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let saved = B::flash_attention_forward(inner.clone());
                        let out = saved.out.clone();
                        prep.finish(
                            State {
                                inputs: inner,
                                saved,
                            },
                            out,
                        )
                    }
                    OpsKind::UnTracked(prep) => prep.finish(B::flash_attention(inner)),
                }
            };
        }
        match &bias {
            None => op!(3, [q.node.clone(), k.node.clone(), v.node.clone()]),
            Some(b) => op!(
                4,
                [
                    q.node.clone(),
                    k.node.clone(),
                    v.node.clone(),
                    b.node.clone()
                ]
            ),
        }
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::activation::autodiff_gelu_tanh::<B, C>(x)
    }

    fn feed_forward(inputs: crate::feed_forward::FeedForwardInputs<Self>) -> FloatTensor<Self> {
        crate::feed_forward::autodiff_feed_forward::<B, C>(inputs)
    }

    fn layer_norm_rows(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        crate::nn::autodiff_layer_norm::<B, C>(x, eps)
    }

    fn torch_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        crate::linear::autodiff_linear::<B, C>(x, weight, bias)
    }

    fn contiguous(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::layout::autodiff_contiguous::<B, C>(x)
    }

    fn lora_linear(inputs: crate::linear::LoraInputs<Self>) -> FloatTensor<Self> {
        crate::linear::autodiff_lora_linear::<B, C>(inputs)
    }

    fn modulate(inputs: crate::modulate::ModulateInputs<Self>) -> FloatTensor<Self> {
        crate::modulate::autodiff_modulate::<B, C>(inputs)
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        crate::rotary::autodiff_rotary::<B, C>(x, cos, sin)
    }

    fn swap_dims_contiguous(x: FloatTensor<Self>, dim1: usize, dim2: usize) -> FloatTensor<Self> {
        crate::layout::autodiff_swap_dims_contiguous::<B, C>(x, dim1, dim2)
    }
}
