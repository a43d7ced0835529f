//! The transformer feed-forward `net.2(gelu_tanh(net.0.proj(x)))` as one operation
//! ([`ModelBackend::feed_forward`]), computed over chunks of rows.
//!
//! Composed of burn ops, the feed-forward keeps its hidden layer (`[tokens, 4 x inner_dim]`, 546
//! MiB per block at CogVideoX-2B's 17,776 tokens in f32) for the GELU's backward, and its
//! backward holds two more of that size (the gradients of the GELU's output and input). As one
//! operation it keeps one `[tokens, 4 x inner_dim]` tensor, the pre-activation
//! `net.0.proj(x)`, and its backward goes chunk by chunk: no other buffer of that size exists,
//! forward or backward, only chunks of [`crate::activation::CHUNK`] elements.
//!
//! With [`FeedForwardInputs::recompute`] it keeps only its input `x` (a quarter of that) and
//! recomputes the pre-activation in the backward, chunk by chunk: the "selective activation
//! recomputation" of Megatron-LM applied to the MLP, for one more `net.0.proj` matmul (a fifth
//! of the feed-forward's products; about 3% of a training step at preset M, by profile).
//!
//! The operation applies to a feed-forward without adapters on its two layers (their weights
//! may be trained, as in SFT); one with a LoRA on `net.0.proj` or `net.2` runs composed.

use crate::activation::CHUNK;
use crate::backend::ModelBackend;
use crate::host::Host;
use crate::linear::{linear, matmul};
use crate::precision::{float_dtype, like, to_dtype, to_f32};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    backend::Backend, ops::FloatTensor, DType, FloatDType, Tensor, TensorCreationOptions,
    TensorMetadata, TensorPrimitive,
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
    /// Whether the autodiff operation recomputes the pre-activation `x W1^T + b1` in the
    /// backward (keeping only `x`) rather than keeping it from the forward; the values are the
    /// same either way.
    pub recompute: bool,
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

/// [`forward`], also returning the pre-activation `x W1^T + b1` (`[rows, F]`, in `x`'s dtype)
/// for [`backward`]. The hidden layer exists whole for the second product (a backend's own
/// kernel may do better: the CPU one goes chunk by chunk).
pub fn forward_keeping<B: ModelBackend>(
    inputs: FeedForwardInputs<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let pre = linear(t::<B, 2>(inputs.x), t(inputs.w1), Some(t(inputs.b1)));
    let h: Tensor<B, 2> = t(B::gelu_tanh(p(pre.clone())));
    (p(linear(h, t(inputs.w2), Some(t(inputs.b2)))), p(pre))
}

/// The gradients of [`forward`] given the output's gradient `grad [rows, D]`; `wanted` says
/// which of `[x, w1, b1, w2, b2]` are asked for; `kept` is [`forward_keeping`]'s
/// pre-activation, recomputed per chunk when `None`. The weight and bias gradients are summed
/// over the chunks in f32.
pub fn backward<B: ModelBackend>(
    inputs: FeedForwardInputs<B>,
    kept: Option<FloatTensor<B>>,
    grad: FloatTensor<B>,
    wanted: [bool; 5],
) -> FeedForwardGrads<B> {
    let kept = kept.map(t::<B, 2>);
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
        let a = match &kept {
            Some(pre) => pre.clone().narrow(0, s, len),
            None => linear(xr.clone(), w1.clone(), Some(b1.clone())),
        };
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

/// Whether every operand is f32 (the CPU kernel's case; half precision runs composed, its
/// products rounded as the reference's are).
fn all_f32<B: Backend>(inputs: &FeedForwardInputs<B>) -> bool {
    [&inputs.x, &inputs.w1, &inputs.b1, &inputs.w2, &inputs.b2]
        .iter()
        .all(|t| t.dtype() == DType::F32)
}

/// The operands on the host, with the kernel's view of the layers.
struct HostInputs {
    x: Host,
    w1: Host,
    b1: Host,
    w2: Host,
    b2: Host,
}

impl HostInputs {
    fn new<B: Backend>(inputs: FeedForwardInputs<B>) -> Self {
        HostInputs {
            x: Host::new::<B>(inputs.x),
            w1: Host::new::<B>(inputs.w1),
            b1: Host::new::<B>(inputs.b1),
            w2: Host::new::<B>(inputs.w2),
            b2: Host::new::<B>(inputs.b2),
        }
    }

    fn layers(&self) -> cogvx_kernels::feed_forward::Layers<'_> {
        let [f, d] = self.w1.shape.dims::<2>();
        cogvx_kernels::feed_forward::Layers {
            w1: self.w1.values(),
            b1: self.b1.values(),
            w2: self.w2.values(),
            b2: self.b2.values(),
            d,
            f,
        }
    }
}

/// [`ModelBackend::feed_forward`] for a CPU backend: [`cogvx_kernels::feed_forward`] on the
/// operands' buffers when they are f32, [`forward`] otherwise.
pub(crate) fn cpu_forward<B: ModelBackend>(inputs: FeedForwardInputs<B>) -> FloatTensor<B> {
    if !all_f32(&inputs) {
        return forward::<B>(inputs);
    }
    let device = B::float_device(&inputs.x);
    let host = HostInputs::new::<B>(inputs);
    let layers = host.layers();
    let y = cogvx_kernels::feed_forward::forward(host.x.values(), layers, chunk_rows(layers.f));
    crate::host::tensor::<B>(y, host.x.shape.clone(), FloatDType::F32, &device)
}

/// [`ModelBackend::feed_forward_keeping`] for a CPU backend, as [`cpu_forward`].
pub(crate) fn cpu_forward_keeping<B: ModelBackend>(
    inputs: FeedForwardInputs<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    if !all_f32(&inputs) {
        return forward_keeping::<B>(inputs);
    }
    let device = B::float_device(&inputs.x);
    let host = HostInputs::new::<B>(inputs);
    let layers = host.layers();
    let (y, pre) =
        cogvx_kernels::feed_forward::forward_keeping(host.x.values(), layers, chunk_rows(layers.f));
    let rows = host.x.shape.dims::<2>()[0];
    (
        crate::host::tensor::<B>(y, host.x.shape.clone(), FloatDType::F32, &device),
        crate::host::tensor::<B>(pre, [rows, layers.f].into(), FloatDType::F32, &device),
    )
}

/// [`ModelBackend::feed_forward_backward`] for a CPU backend, as [`cpu_forward`].
pub(crate) fn cpu_backward<B: ModelBackend>(
    inputs: FeedForwardInputs<B>,
    kept: Option<FloatTensor<B>>,
    grad: FloatTensor<B>,
    wanted: [bool; 5],
) -> FeedForwardGrads<B> {
    let f32_kept = kept.as_ref().is_none_or(|k| k.dtype() == DType::F32);
    if !all_f32(&inputs) || grad.dtype() != DType::F32 || !f32_kept {
        return backward::<B>(inputs, kept, grad, wanted);
    }
    let device = B::float_device(&inputs.x);
    let host = HostInputs::new::<B>(inputs);
    let kept = kept.map(Host::new::<B>);
    let grad = Host::new::<B>(grad);
    let layers = host.layers();
    let g = cogvx_kernels::feed_forward::backward(
        host.x.values(),
        kept.as_ref().map(Host::values),
        grad.values(),
        layers,
        wanted,
        chunk_rows(layers.f),
    );
    // Each gradient has its operand's shape.
    let tensor = |v: Option<Vec<f32>>, like: &Host| {
        v.map(|v| crate::host::tensor::<B>(v, like.shape.clone(), FloatDType::F32, &device))
    };
    [
        tensor(g.x, &host.x),
        tensor(g.w1, &host.w1),
        tensor(g.b1, &host.b1),
        tensor(g.w2, &host.w2),
        tensor(g.b2, &host.b2),
    ]
}

#[derive(Debug)]
struct FeedForwardBackward;

impl<B: ModelBackend> Backward<B, 5> for FeedForwardBackward {
    /// The operands and, unless they say recompute, the pre-activation.
    type State = (FeedForwardInputs<B>, Option<FloatTensor<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 5>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let wanted = ops.parents.each_ref().map(|n| n.is_some());
        let (inputs, kept) = ops.state;
        let values = B::feed_forward_backward(inputs, kept, grad, wanted);
        let parents = ops.parents.map(|p| p.map(|n| n.id));
        crate::backend::register_gradients::<B>(grads, parents, values);
    }
}

/// The autodiff operation: keeps the operands (the input `x` and references to the weights)
/// and, unless [`FeedForwardInputs::recompute`], the pre-activation; never the hidden layer.
pub(crate) fn autodiff_feed_forward<B: ModelBackend, C: CheckpointStrategy>(
    inputs: FeedForwardInputs<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let FeedForwardInputs {
        x,
        w1,
        b1,
        w2,
        b2,
        recompute,
    } = inputs;
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
        recompute,
    };
    match FeedForwardBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) if recompute => {
            let out = B::feed_forward(inner.clone());
            prep.finish((inner, None), out)
        }
        OpsKind::Tracked(prep) => {
            let (out, pre) = B::feed_forward_keeping(inner.clone());
            prep.finish((inner, Some(pre)), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::feed_forward(inner)),
    }
}

/// The feed-forward of a `[rows, D]` input through `net.0.proj` (`w1 [F, D]`, `b1 [F]`), the
/// tanh GELU and `net.2` (`w2 [D, F]`, `b2 [D]`), as one operation ([`ModelBackend::feed_forward`]);
/// `recompute` as [`FeedForwardInputs::recompute`].
pub fn feed_forward<B: ModelBackend>(
    x: Tensor<B, 2>,
    w1: Tensor<B, 2>,
    b1: Tensor<B, 1>,
    w2: Tensor<B, 2>,
    b2: Tensor<B, 1>,
    recompute: bool,
) -> Tensor<B, 2> {
    t(B::feed_forward(FeedForwardInputs {
        x: p(x),
        w1: p(w1),
        b1: p(b1),
        w2: p(w2),
        b2: p(b2),
        recompute,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::gelu_tanh_formula;
    use crate::{test_tensor, CpuAutodiffBackend, CpuBackend};
    use burn::tensor::Distribution;
    use burn::tensor::ElementConversion;

    type A = CpuAutodiffBackend;

    fn rel_l2<B: Backend>(a: &Tensor<B, 2>, b: &Tensor<B, 2>) -> f32 {
        let num: f32 = (a.clone() - b.clone()).square().sum().into_scalar().elem();
        let den: f32 = b.clone().square().sum().into_scalar().elem();
        num.sqrt() / den.sqrt().max(1e-30)
    }

    /// The operation against the composed burn ops, forward and every gradient, for a row count
    /// that is one chunk and one that is several chunks with a remainder, keeping the
    /// pre-activation and recomputing it.
    fn the_operation_equals_the_composed_layers<B: ModelBackend>()
    where
        Autodiff<B>: ModelBackend,
    {
        let (d, f) = (24, 1 << 16);
        // chunk_rows(f) = 64 rows: 40 is one chunk, 150 is two full chunks and 22 rows.
        assert_eq!(chunk_rows(f), 64);
        for rows in [40, 150] {
            let r =
                |s: [usize; 2], scale: f32, seed| test_tensor::<B, 2>(s, seed).mul_scalar(scale);
            let (x, w1, w2, gy) = (
                r([rows, d], 1.0, 1),
                r([f, d], 0.3, 2),
                r([d, f], 0.02, 3),
                r([rows, d], 1.0, 4),
            );
            let b1 = test_tensor::<B, 1>([f], 5).mul_scalar(0.5);
            let b2 = test_tensor::<B, 1>([d], 6).mul_scalar(0.5);
            let run = |fused: Option<bool>| {
                let leaf2 = |t: &Tensor<B, 2>| {
                    Tensor::<Autodiff<B>, 2>::from_inner(t.clone()).require_grad()
                };
                let leaf1 = |t: &Tensor<B, 1>| {
                    Tensor::<Autodiff<B>, 1>::from_inner(t.clone()).require_grad()
                };
                let (xa, w1a, b1a, w2a, b2a) =
                    (leaf2(&x), leaf2(&w1), leaf1(&b1), leaf2(&w2), leaf1(&b2));
                let y = if let Some(recompute) = fused {
                    feed_forward(
                        xa.clone(),
                        w1a.clone(),
                        b1a.clone(),
                        w2a.clone(),
                        b2a.clone(),
                        recompute,
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
                let g1 = |t: Tensor<Autodiff<B>, 1>| t.grad(&grads).unwrap().unsqueeze::<2>();
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
            let (y0, g0) = run(None);
            for recompute in [false, true] {
                let (y1, g1) = run(Some(recompute));
                let e = rel_l2(&y1, &y0);
                assert!(e <= 1e-6, "rows {rows}, recompute {recompute}: forward {e}");
                for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
                    let e = rel_l2(a, b);
                    assert!(
                        e <= 1e-5,
                        "rows {rows}, recompute {recompute}: gradient {} off by {e}",
                        ["x", "w1", "b1", "w2", "b2"][i]
                    );
                }
            }
        }
    }

    #[test]
    fn the_operation_equals_the_composed_layers_on_ndarray() {
        the_operation_equals_the_composed_layers::<CpuBackend>();
    }

    #[cfg(feature = "flex")]
    #[test]
    fn the_operation_equals_the_composed_layers_on_flex() {
        the_operation_equals_the_composed_layers::<crate::FlexBackend>();
    }

    /// The burn-op path (other backends, half precision) gives the CPU kernel's values,
    /// forward and every gradient.
    #[test]
    fn the_composed_path_equals_the_kernel() {
        let (rows, d, f) = (150, 24, 1 << 16);
        let inputs = FeedForwardInputs::<CpuBackend> {
            x: p(test_tensor::<CpuBackend, 2>([rows, d], 1)),
            w1: p(test_tensor::<CpuBackend, 2>([f, d], 2).mul_scalar(0.3)),
            b1: p(test_tensor::<CpuBackend, 1>([f], 3)),
            w2: p(test_tensor::<CpuBackend, 2>([d, f], 4).mul_scalar(0.02)),
            b2: p(test_tensor::<CpuBackend, 1>([d], 5)),
            recompute: true,
        };
        let g = || p(test_tensor::<CpuBackend, 2>([rows, d], 6));
        let flat = |x: FloatTensor<CpuBackend>| {
            let n = x.shape().num_elements();
            t::<CpuBackend, 1>(x).reshape([1, n])
        };
        let y = (forward(inputs.clone()), cpu_forward(inputs.clone()));
        assert!(rel_l2(&flat(y.0), &flat(y.1)) <= 1e-6);
        let (y, pre) = forward_keeping(inputs.clone());
        let (y_kernel, pre_kernel) = cpu_forward_keeping(inputs.clone());
        assert!(rel_l2(&flat(y), &flat(y_kernel)) <= 1e-6);
        assert!(rel_l2(&flat(pre.clone()), &flat(pre_kernel.clone())) <= 1e-6);
        for kept in [None, Some((pre, pre_kernel))] {
            let (a, b) = kept.map_or((None, None), |(a, b)| (Some(a), Some(b)));
            let composed = backward(inputs.clone(), a, g(), [true; 5]);
            let kernel = cpu_backward(inputs.clone(), b, g(), [true; 5]);
            for (i, (a, b)) in composed.into_iter().zip(kernel).enumerate() {
                let e = rel_l2(&flat(a.unwrap()), &flat(b.unwrap()));
                assert!(e <= 1e-5, "gradient {i} off by {e}");
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
        let fused = feed_forward(
            x.clone(),
            w1.clone(),
            b1.clone(),
            w2.clone(),
            b2.clone(),
            false,
        );
        assert!(rel_l2(&fused, &composed) <= 1e-6);
        let mut gradients = Vec::new();
        for recompute in [false, true] {
            let xa = Tensor::<A, 2>::from_inner(x.clone()).require_grad();
            let y = feed_forward(
                xa.clone(),
                Tensor::from_inner(w1.clone()),
                Tensor::from_inner(b1.clone()),
                Tensor::from_inner(w2.clone()),
                Tensor::from_inner(b2.clone()),
                recompute,
            );
            let grads = y.sum().backward();
            gradients.push(xa.grad(&grads).unwrap());
        }
        assert_eq!(gradients[0].dims(), [rows, d]);
        assert!(rel_l2(&gradients[0], &gradients[1]) <= 1e-6);
    }
}
