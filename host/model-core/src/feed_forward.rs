//! The transformer feed-forward `net.2(gelu_tanh(net.0.proj(x)))` as one operation
//! ([`ModelBackend::feed_forward`]), computed over chunks of rows.
//!
//! Composed of burn ops, the feed-forward keeps its hidden layer (`[tokens, 4 x inner_dim]`, 546
//! MiB per block at CogVideoX-2B's 17,776 tokens in f32) for the GELU's backward, and its
//! backward holds two more of that size (the gradients of the GELU's output and input). As one
//! operation it keeps only its input `x` (a quarter of that) and recomputes the hidden layer
//! in the backward, chunk by chunk: no `[tokens, 4 x inner_dim]` buffer exists, forward or
//! backward, only chunks of [`crate::activation::CHUNK`] elements. The price is one more
//! `net.0.proj` matmul in the backward (about 4% of a 2B block's step at 17,776 tokens). This
//! is the "selective activation recomputation" of Megatron-LM applied to the MLP.
//!
//! The operation applies to a feed-forward without adapters on its two layers (their weights
//! may be trained, as in SFT); one with a LoRA on `net.0.proj` or `net.2` runs composed.

use crate::activation::CHUNK;
use crate::backend::ModelBackend;
use crate::linear::{linear, matmul};
use crate::precision::{float_dtype, like, to_dtype, to_f32};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    backend::Backend, ops::FloatTensor, Tensor, TensorCreationOptions, TensorPrimitive,
};

/// The operands as primitives, in PyTorch layout: `x [rows, D]`, `w1 [F, D]`, `b1 [F]`,
/// `w2 [D, F]`, `b2 [D]` (one dtype, the compute dtype).
#[derive(Debug, Clone)]
pub struct FeedForwardInputs<B: Backend> {
    pub x: FloatTensor<B>,
    pub w1: FloatTensor<B>,
    pub b1: FloatTensor<B>,
    pub w2: FloatTensor<B>,
    pub b2: FloatTensor<B>,
}

/// Gradients with respect to `[x, w1, b1, w2, b2]`, each when asked, in its operand's dtype.
pub type FeedForwardGrads<B> = [Option<FloatTensor<B>>; 5];

fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn p<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Rows per chunk for a hidden width `f`: a chunk of the hidden layer holds about [`CHUNK`]
/// elements (16 MiB in f32), and at least one row.
pub fn chunk_rows(f: usize) -> usize {
    (CHUNK / f.max(1)).max(1)
}

/// `gelu_tanh(x W1^T + b1) W2^T + b2` for `[rows, D]` operands, in `x`'s dtype (the GELU
/// formula in f32), one chunk of rows at a time.
pub fn forward<B: ModelBackend>(inputs: FeedForwardInputs<B>) -> FloatTensor<B> {
    let x: Tensor<B, 2> = t(inputs.x);
    let (w1, b1) = (t::<B, 2>(inputs.w1), t::<B, 1>(inputs.b1));
    let (w2, b2) = (t::<B, 2>(inputs.w2), t::<B, 1>(inputs.b2));
    let [rows, d] = x.dims();
    let step = chunk_rows(w1.dims()[0]);
    let chunk = |xr: Tensor<B, 2>| {
        let a = linear(xr, w1.clone(), Some(b1.clone()));
        let h: Tensor<B, 2> = t(B::gelu_tanh(p(a)));
        linear(h, w2.clone(), Some(b2.clone()))
    };
    if rows <= step {
        return p(chunk(x));
    }
    let options = TensorCreationOptions::new(x.device()).with_dtype(x.dtype());
    let mut out = Tensor::<B, 2>::zeros([rows, d], options);
    for s in (0..rows).step_by(step) {
        let len = step.min(rows - s);
        out = out.slice_assign([s..s + len, 0..d], chunk(x.clone().narrow(0, s, len)));
    }
    p(out)
}

/// The gradients of [`forward`] given the output's gradient `grad [rows, D]`; `wanted` says
/// which of `[x, w1, b1, w2, b2]` are asked for. The hidden layer is recomputed per chunk; the
/// weight and bias gradients are summed over the chunks in f32.
pub fn backward<B: ModelBackend>(
    inputs: FeedForwardInputs<B>,
    grad: FloatTensor<B>,
    wanted: [bool; 5],
) -> FeedForwardGrads<B> {
    let x: Tensor<B, 2> = t(inputs.x);
    let (w1, b1, w2, b2) = (
        t::<B, 2>(inputs.w1),
        t::<B, 1>(inputs.b1),
        t::<B, 2>(inputs.w2),
        t::<B, 1>(inputs.b2),
    );
    let g: Tensor<B, 2> = like(t(grad), &x);
    let [rows, d] = x.dims();
    let f = w1.dims()[0];
    let step = chunk_rows(f);
    let options = TensorCreationOptions::new(x.device()).with_dtype(x.dtype());
    let mut gx = wanted[0].then(|| Tensor::<B, 2>::zeros([rows, d], options));
    let mut gw1: Option<Tensor<B, 2>> = None;
    let mut gb1: Option<Tensor<B, 1>> = None;
    let mut gw2: Option<Tensor<B, 2>> = None;
    for s in (0..rows).step_by(step) {
        let len = step.min(rows - s);
        let xr = x.clone().narrow(0, s, len);
        let gr = g.clone().narrow(0, s, len);
        let a = linear(xr.clone(), w1.clone(), Some(b1.clone()));
        if wanted[3] {
            let h: Tensor<B, 2> = t(B::gelu_tanh(p(a.clone())));
            gw2 = accumulate(gw2, matmul(gr.clone().transpose(), h));
        }
        let gh = matmul(gr, w2.clone());
        let ga: Tensor<B, 2> = t(B::gelu_tanh_backward(p(a), p(gh)));
        if wanted[1] {
            gw1 = accumulate(gw1, matmul(ga.clone().transpose(), xr));
        }
        if wanted[2] {
            gb1 = accumulate(gb1, to_f32(ga.clone()).sum_dim(0).squeeze_dim::<1>(0));
        }
        if let Some(out) = gx.take() {
            gx = Some(out.slice_assign([s..s + len, 0..d], matmul(ga, w1.clone())));
        }
    }
    let gb2 = wanted[4].then(|| {
        p(to_dtype(
            to_f32(g).sum_dim(0).squeeze_dim::<1>(0),
            float_dtype(&b2),
        ))
    });
    [
        gx.map(p),
        gw1.map(|gw| p(to_dtype(gw, float_dtype(&w1)))),
        gb1.map(|gb| p(to_dtype(gb, float_dtype(&b1)))),
        gw2.map(|gw| p(to_dtype(gw, float_dtype(&w2)))),
        gb2,
    ]
}

/// `acc + part` in f32 (the first `part` starts the sum).
fn accumulate<B: Backend, const D: usize>(
    acc: Option<Tensor<B, D>>,
    part: Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    Some(match acc {
        Some(acc) => acc + to_f32(part),
        None => to_f32(part),
    })
}

#[derive(Debug)]
struct FeedForwardBackward;

impl<B: ModelBackend> Backward<B, 5> for FeedForwardBackward {
    type State = FeedForwardInputs<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 5>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let wanted = ops.parents.each_ref().map(|n| n.is_some());
        let values = B::feed_forward_backward(ops.state, grad, wanted);
        for (parent, value) in ops.parents.into_iter().zip(values) {
            if let (Some(node), Some(value)) = (parent, value) {
                grads.register::<B>(node.id, value);
            }
        }
    }
}

/// The autodiff operation: keeps the operands (the input `x` and references to the weights),
/// never the hidden layer.
pub(crate) fn autodiff_feed_forward<B: ModelBackend, C: CheckpointStrategy>(
    inputs: FeedForwardInputs<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let FeedForwardInputs { x, w1, b1, w2, b2 } = inputs;
    let nodes = [
        x.node.clone(),
        w1.node.clone(),
        b1.node.clone(),
        w2.node.clone(),
        b2.node.clone(),
    ];
    let inner = FeedForwardInputs::<B> {
        x: x.primitive,
        w1: w1.primitive,
        b1: b1.primitive,
        w2: w2.primitive,
        b2: b2.primitive,
    };
    match FeedForwardBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = B::feed_forward(inner.clone());
            prep.finish(inner, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::feed_forward(inner)),
    }
}

/// The feed-forward of a `[rows, D]` input through `net.0.proj` (`w1 [F, D]`, `b1 [F]`), the
/// tanh GELU and `net.2` (`w2 [D, F]`, `b2 [D]`), as one operation ([`ModelBackend::feed_forward`]).
pub fn feed_forward<B: ModelBackend>(
    x: Tensor<B, 2>,
    w1: Tensor<B, 2>,
    b1: Tensor<B, 1>,
    w2: Tensor<B, 2>,
    b2: Tensor<B, 1>,
) -> Tensor<B, 2> {
    t(B::feed_forward(FeedForwardInputs {
        x: p(x),
        w1: p(w1),
        b1: p(b1),
        w2: p(w2),
        b2: p(b2),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::gelu_tanh_formula;
    use crate::{CpuAutodiffBackend, CpuBackend};
    use burn::tensor::Distribution;

    type A = CpuAutodiffBackend;

    fn rel_l2(a: &Tensor<CpuBackend, 2>, b: &Tensor<CpuBackend, 2>) -> f32 {
        let num = (a.clone() - b.clone()).square().sum().into_scalar().sqrt();
        num / b.clone().square().sum().into_scalar().sqrt().max(1e-30)
    }

    /// The operation against the composed burn ops, forward and every gradient, for a row count
    /// that is one chunk and one that is several chunks with a remainder.
    #[test]
    fn the_operation_equals_the_composed_layers() {
        let dev = Default::default();
        let (d, f) = (24, 1 << 16);
        // chunk_rows(f) = 64 rows: 40 is one chunk, 150 is two full chunks and 22 rows.
        assert_eq!(chunk_rows(f), 64);
        for rows in [40, 150] {
            let r = |s: [usize; 2], std: f64| {
                Tensor::<CpuBackend, 2>::random(s, Distribution::Normal(0.0, std), &dev)
            };
            let (x, w1, w2, gy) = (
                r([rows, d], 1.0),
                r([f, d], 0.2),
                r([d, f], 0.01),
                r([rows, d], 1.0),
            );
            let b1 = Tensor::<CpuBackend, 1>::random([f], Distribution::Normal(0.0, 0.5), &dev);
            let b2 = Tensor::<CpuBackend, 1>::random([d], Distribution::Normal(0.0, 0.5), &dev);
            let run = |fused: bool| {
                let leaf2 = |t: &Tensor<CpuBackend, 2>| {
                    Tensor::<A, 2>::from_inner(t.clone()).require_grad()
                };
                let leaf1 = |t: &Tensor<CpuBackend, 1>| {
                    Tensor::<A, 1>::from_inner(t.clone()).require_grad()
                };
                let (xa, w1a, b1a, w2a, b2a) =
                    (leaf2(&x), leaf2(&w1), leaf1(&b1), leaf2(&w2), leaf1(&b2));
                let y = if fused {
                    feed_forward(
                        xa.clone(),
                        w1a.clone(),
                        b1a.clone(),
                        w2a.clone(),
                        b2a.clone(),
                    )
                } else {
                    let h = gelu_tanh_formula(
                        xa.clone().matmul(w1a.clone().transpose()) + b1a.clone().unsqueeze(),
                    );
                    h.matmul(w2a.clone().transpose()) + b2a.clone().unsqueeze()
                };
                let grads = (y.clone() * Tensor::from_inner(gy.clone()))
                    .sum()
                    .backward();
                let g1 = |t: Tensor<A, 1>| t.grad(&grads).unwrap().unsqueeze::<2>();
                (
                    y.inner(),
                    [
                        xa.grad(&grads).unwrap(),
                        w1a.grad(&grads).unwrap(),
                        g1(b1a),
                        w2a.grad(&grads).unwrap(),
                        g1(b2a),
                    ],
                )
            };
            let (y1, g1) = run(true);
            let (y0, g0) = run(false);
            assert!(
                rel_l2(&y1, &y0) <= 1e-6,
                "rows {rows}: forward {}",
                rel_l2(&y1, &y0)
            );
            for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
                let e = rel_l2(a, b);
                assert!(
                    e <= 1e-5,
                    "rows {rows}: gradient {} off by {e}",
                    ["x", "w1", "b1", "w2", "b2"][i]
                );
            }
        }
    }

    /// Without autodiff (sampling) and with frozen weights only `x`'s gradient is computed; both
    /// give the composed values.
    #[test]
    fn frozen_weights_give_only_the_input_gradient() {
        let dev = Default::default();
        let (rows, d, f) = (70, 8, 1 << 17);
        let r = |s: [usize; 2]| {
            Tensor::<CpuBackend, 2>::random(s, Distribution::Normal(0.0, 0.3), &dev)
        };
        let (x, w1, w2) = (r([rows, d]), r([f, d]), r([d, f]));
        let (b1, b2) = (
            Tensor::<CpuBackend, 1>::zeros([f], &dev),
            Tensor::<CpuBackend, 1>::ones([d], &dev),
        );
        let composed =
            gelu_tanh_formula(x.clone().matmul(w1.clone().transpose()) + b1.clone().unsqueeze())
                .matmul(w2.clone().transpose())
                + b2.clone().unsqueeze();
        let fused = feed_forward(x.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone());
        assert!(rel_l2(&fused, &composed) <= 1e-6);
        let xa = Tensor::<A, 2>::from_inner(x).require_grad();
        let y = feed_forward(
            xa.clone(),
            Tensor::from_inner(w1),
            Tensor::from_inner(b1),
            Tensor::from_inner(w2),
            Tensor::from_inner(b2),
        );
        let grads = y.sum().backward();
        assert_eq!(xa.grad(&grads).unwrap().dims(), [rows, d]);
    }
}
