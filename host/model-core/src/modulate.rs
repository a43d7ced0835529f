//! The per-stream modulations of a CogVideoX block on its joint sequence
//! ([`ModelBackend::modulate`]): `[x +] y * a[s] [+ c[s]]` for `y [B, L, D]`, with `a`, `c`
//! `[B, 2, D]` holding one row per stream, the text rows (`< split`) taking the first.
//!
//! Composed of burn operations, the adaptive norm's `norm(x) * (1 + scale) + shift` and the
//! gated residual `x + y * gate` cost a narrow, a broadcast product, a broadcast sum and a
//! concatenation per stream, and their backward as many again, each a pass over the sequence
//! (on one thread on burn-flex). As one operation they are one pass on the CPU backends
//! ([`cogvx_kernels::modulate`], f32; half precision takes the composed path) and one for the
//! gradient of `y`; the gradients of `a` and `c` (which only full fine-tuning asks for) are row
//! sums in burn operations.

use crate::backend::ModelBackend;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    backend::Backend, ops::FloatTensor, DType, Tensor, TensorMetadata, TensorPrimitive,
};

/// The operands of [`ModelBackend::modulate`].
#[derive(Debug, Clone)]
pub struct ModulateInputs<B: Backend> {
    /// `[B, L, D]`.
    pub y: FloatTensor<B>,
    /// `[B, 2, D]`: the text rows' factor, then the video rows'.
    pub a: FloatTensor<B>,
    /// `[B, 2, D]`, added after the product; not together with `residual`.
    pub c: Option<FloatTensor<B>>,
    /// `[B, L, D]`, added to the product (the gated residual); not together with `c`.
    pub residual: Option<FloatTensor<B>>,
    /// The first video row.
    pub split: usize,
}

fn t<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn p<B: Backend>(t: Tensor<B, 3>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `[residual +] y * a[s] [+ c[s]]` on tensors ([`ModelBackend::modulate`]).
pub fn modulate<B: ModelBackend>(
    y: Tensor<B, 3>,
    a: Tensor<B, 3>,
    c: Option<Tensor<B, 3>>,
    residual: Option<Tensor<B, 3>>,
    split: usize,
) -> Tensor<B, 3> {
    t(B::modulate(ModulateInputs {
        y: p(y),
        a: p(a),
        c: c.map(p),
        residual: residual.map(p),
        split,
    }))
}

/// The two streams' row ranges `(start, len, stream)` of a sequence of `len` rows, empty ones
/// left out.
fn streams(len: usize, split: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    [(0, split, 0), (split, len - split, 1)]
        .into_iter()
        .filter(|&(_, n, _)| n > 0)
}

/// [`ModelBackend::modulate`] in burn operations: each stream's rows times its row of `a`
/// (plus its row of `c`), concatenated, plus the residual.
pub(crate) fn generic_modulate<B: Backend>(inputs: ModulateInputs<B>) -> FloatTensor<B> {
    assert!(
        inputs.c.is_none() || inputs.residual.is_none(),
        "modulate: a shift and a residual together"
    );
    let (y, a) = (t(inputs.y), t(inputs.a));
    let c = inputs.c.map(t);
    let [_, len, _] = y.dims();
    let parts: Vec<Tensor<B, 3>> = streams(len, inputs.split)
        .map(|(start, n, s)| {
            let part = y.clone().narrow(1, start, n) * a.clone().narrow(1, s, 1);
            match &c {
                Some(c) => part + c.clone().narrow(1, s, 1),
                None => part,
            }
        })
        .collect();
    let out = if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else if parts.is_empty() {
        y
    } else {
        Tensor::cat(parts, 1)
    };
    p(match inputs.residual {
        Some(x) => t(x) + out,
        None => out,
    })
}

/// [`ModelBackend::modulate`] for a CPU backend: [`cogvx_kernels::modulate`] on the host
/// buffers when every operand is f32, [`generic_modulate`] otherwise.
pub(crate) fn cpu_modulate<B: Backend>(inputs: ModulateInputs<B>) -> FloatTensor<B> {
    let all_f32 = [Some(&inputs.y), Some(&inputs.a)]
        .into_iter()
        .chain([inputs.c.as_ref(), inputs.residual.as_ref()])
        .flatten()
        .all(|x| x.dtype() == DType::F32);
    if !all_f32 || (inputs.c.is_some() && inputs.residual.is_some()) {
        return generic_modulate(inputs);
    }
    let device = B::float_device(&inputs.y);
    let y = crate::host::Host::new::<B>(inputs.y);
    let [batch, len, d] = y.shape.dims::<3>();
    let seg = cogvx_kernels::modulate::Segments {
        batch,
        len,
        d,
        split: inputs.split,
    };
    let a = crate::host::Host::new::<B>(inputs.a);
    let out = match (inputs.c, inputs.residual) {
        (c, None) => {
            let c = c.map(crate::host::Host::new::<B>);
            cogvx_kernels::modulate::scale_shift(
                y.values(),
                a.values(),
                c.as_ref().map(|c| c.values()),
                seg,
            )
        }
        (_, Some(x)) => {
            let x = crate::host::Host::new::<B>(x);
            cogvx_kernels::modulate::gated_residual(x.values(), y.values(), a.values(), seg)
        }
    };
    crate::host::tensor::<B>(out, y.shape, y.dtype, &device)
}

/// The sum over each stream's rows of `g [B, L, D]`: `[B, 2, D]` (zeros for an empty stream).
fn stream_sums<B: Backend>(g: Tensor<B, 3>, split: usize) -> Tensor<B, 3> {
    let [b, len, d] = g.dims();
    let rows = |start: usize, n: usize| {
        if n == 0 {
            Tensor::zeros([b, 1, d], &g.device())
        } else {
            g.clone().narrow(1, start, n).sum_dim(1)
        }
    };
    Tensor::cat(vec![rows(0, split), rows(split, len - split)], 1)
}

/// The backward of [`ModelBackend::modulate`] under autodiff; the parents are `[y, a]` and, for
/// `N = 3`, the shift `c` or the residual (`has_shift` says which).
#[derive(Debug)]
struct ModulateBackward<const N: usize>;

/// `y` (kept when `a` is tracked), `a`, whether the third parent is the shift, the split.
type State<B> = (Option<FloatTensor<B>>, FloatTensor<B>, bool, usize);

impl<B: ModelBackend, const N: usize> Backward<B, N> for ModulateBackward<N> {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (y, a, has_shift, split) = ops.state;
        let parents = ops.parents;
        if let Some(node) = &parents[0] {
            let gy = B::modulate(ModulateInputs {
                y: grad.clone(),
                a: a.clone(),
                c: None,
                residual: None,
                split,
            });
            grads.register::<B>(node.id, gy);
        }
        if let Some(node) = &parents[1] {
            let y = y.expect("y is kept when a's gradient is wanted");
            let ga = stream_sums::<B>(t(grad.clone()) * t(y), split);
            grads.register::<B>(node.id, p(ga));
        }
        if N == 3 {
            if let Some(node) = &parents[N - 1] {
                let g = if has_shift {
                    p(stream_sums::<B>(t(grad), split))
                } else {
                    grad
                };
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// [`ModelBackend::modulate`] under autodiff: one operation keeping `a` (and `y` when `a` is
/// tracked).
pub(crate) fn autodiff_modulate<B: ModelBackend, C: CheckpointStrategy>(
    inputs: ModulateInputs<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let ModulateInputs {
        y,
        a,
        c,
        residual,
        split,
    } = inputs;
    let inner = ModulateInputs::<B> {
        y: y.primitive.clone(),
        a: a.primitive.clone(),
        c: c.as_ref().map(|c| c.primitive.clone()),
        residual: residual.as_ref().map(|x| x.primitive.clone()),
        split,
    };
    let has_shift = c.is_some();
    let keep_y = !a.node.requirement.is_none();
    macro_rules! op {
        ($n:literal, $nodes:expr) => {
            match ModulateBackward::<$n>
                .prepare::<C>($nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = (
                        keep_y.then(|| inner.y.clone()),
                        inner.a.clone(),
                        has_shift,
                        split,
                    );
                    prep.finish(state, B::modulate(inner))
                }
                OpsKind::UnTracked(prep) => prep.finish(B::modulate(inner)),
            }
        };
    }
    match c.as_ref().or(residual.as_ref()) {
        None => op!(2, [y.node.clone(), a.node.clone()]),
        Some(third) => op!(3, [y.node.clone(), a.node.clone(), third.node.clone()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_tensor as values;

    /// Forward and gradients equal the composed formula under autodiff (every operand
    /// tracked), for the shift form and the residual form, and splits at both ends.
    fn equals_the_formula<B: ModelBackend>()
    where
        Autodiff<B>: ModelBackend,
    {
        let (b, len, d) = (2, 9, 20);
        for split in [0, 4, 9] {
            for form in ["shift", "residual", "plain"] {
                let run = |ours: bool| {
                    let leaf = |dims, seed| {
                        Tensor::<Autodiff<B>, 3>::from_inner(values::<B, 3>(dims, seed))
                            .require_grad()
                    };
                    let (y, a) = (leaf([b, len, d], 1), leaf([b, 2, d], 2));
                    let c = (form == "shift").then(|| leaf([b, 2, d], 3));
                    let x = (form == "residual").then(|| leaf([b, len, d], 4));
                    let inputs = ModulateInputs {
                        y: p(y.clone()),
                        a: p(a.clone()),
                        c: c.clone().map(p),
                        residual: x.clone().map(p),
                        split,
                    };
                    let out = t::<Autodiff<B>>(if ours {
                        <Autodiff<B> as ModelBackend>::modulate(inputs)
                    } else {
                        generic_modulate(inputs)
                    });
                    let w = Tensor::from_inner(values::<B, 3>([b, len, d], 5));
                    let grads = (out.clone() * w).sum().backward();
                    let g = |t: &Option<Tensor<Autodiff<B>, 3>>| {
                        t.as_ref()
                            .map(|t| t.grad(&grads).expect("a gradient").into_data())
                    };
                    (
                        out.inner().into_data(),
                        y.grad(&grads).map(|t| t.into_data()),
                        a.grad(&grads).map(|t| t.into_data()),
                        g(&c),
                        g(&x),
                    )
                };
                let (ours, reference) = (run(true), run(false));
                let tol = burn::tensor::Tolerance::<f32>::absolute(1e-5);
                ours.0.assert_approx_eq::<f32>(&reference.0, tol);
                for (what, o, r) in [
                    ("y", ours.1, reference.1),
                    ("a", ours.2, reference.2),
                    ("c", ours.3, reference.3),
                    ("x", ours.4, reference.4),
                ] {
                    assert_eq!(o.is_some(), r.is_some(), "{what} ({form}, split {split})");
                    if let (Some(o), Some(r)) = (o, r) {
                        o.assert_approx_eq::<f32>(&r, tol);
                    }
                }
            }
        }
    }

    #[test]
    fn modulate_equals_the_formula_on_ndarray() {
        equals_the_formula::<crate::CpuBackend>();
    }

    #[cfg(feature = "flex")]
    #[test]
    fn modulate_equals_the_formula_on_flex() {
        equals_the_formula::<crate::FlexBackend>();
    }
}
