//! Rotary position embedding as one operation ([`ModelBackend::rotary`]): `x * cos +
//! rot(x) * sin` over `x [B, H, S, D]` with `cos`, `sin` `[S, D]`, where `rot` turns each pair
//! `(x[2i], x[2i+1])` into `(-x[2i+1], x[2i])` (diffusers' `apply_rotary_emb`, `use_real=True`).
//!
//! Composed of burn operations it is a product with the `[D, D]` pair-swap matrix, two
//! broadcast products and a sum, and as many again in the backward; on the CPU backends it is
//! one pass each way ([`cogvx_kernels::rotary`]). Under autodiff it keeps only the tables: the
//! backward is the transposed rotation of the gradient.

use crate::backend::ModelBackend;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    backend::Backend, ops::FloatTensor, DType, Tensor, TensorData, TensorMetadata, TensorPrimitive,
};

/// The `[D, D]` matrix `R` with `x R = rot(x)` for interleaved pairs `(x[2i], x[2i+1])`:
/// `R[2i+1][2i] = -1`, `R[2i][2i+1] = 1`. Every output is a single signed input, so the
/// product is exact.
pub fn rotate_pairs_matrix<B: Backend>(dim: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut r = vec![0f32; dim * dim];
    for i in 0..dim / 2 {
        r[(2 * i + 1) * dim + 2 * i] = -1.0;
        r[(2 * i) * dim + 2 * i + 1] = 1.0;
    }
    Tensor::from_data(TensorData::new(r, [dim, dim]), device)
}

fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `x [B, H, S, D]` as rows of heads `[B * H, S * D]` times one `[1, S * D]` table row each:
/// the broadcast CPU backends vectorise (a `[1, 1, S, D]` table over `[B, H, S, D]` takes a
/// strided walk). `transpose` multiplies by `R^T` (the backward) instead of `R`.
fn formula<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    transpose: bool,
) -> FloatTensor<B> {
    let x: Tensor<B, 4> = t(x);
    let [b, h, s, d] = x.dims();
    let (cos, sin): (Tensor<B, 2>, Tensor<B, 2>) = (t(cos), t(sin));
    let (cos, sin) = (cos.reshape([1, s * d]), sin.reshape([1, s * d]));
    let mut r = rotate_pairs_matrix::<B>(d, &x.device());
    if transpose {
        r = r.transpose();
    }
    let rows = x.reshape([b * h * s, d]);
    let flat = |t: Tensor<B, 2>| t.reshape([b * h, s * d]);
    let out = if transpose {
        // d/dx of x * cos + (x R) * sin is g * cos + (g * sin) R^T.
        let g = flat(rows);
        let gs = (g.clone() * sin).reshape([b * h * s, d]).matmul(r);
        g * cos + flat(gs)
    } else {
        let rotated = flat(rows.clone().matmul(r));
        flat(rows) * cos + rotated * sin
    };
    out.reshape([b, h, s, d]).into_primitive().tensor()
}

/// [`ModelBackend::rotary`] in burn operations.
pub(crate) fn generic_rotary<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    formula::<B>(x, cos, sin, false)
}

/// [`ModelBackend::rotary_backward`] in burn operations.
pub(crate) fn generic_rotary_backward<B: Backend>(
    grad: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    formula::<B>(grad, cos, sin, true)
}

/// The CPU kernels on the host buffers when all three are f32, the formula otherwise.
fn cpu<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    backward: bool,
) -> FloatTensor<B> {
    if [&x, &cos, &sin].iter().any(|p| p.dtype() != DType::F32) {
        return formula::<B>(x, cos, sin, backward);
    }
    let device = B::float_device(&x);
    let (x, cos, sin) = (
        crate::host::Host::new::<B>(x),
        crate::host::Host::new::<B>(cos),
        crate::host::Host::new::<B>(sin),
    );
    let kernel = if backward {
        cogvx_kernels::rotary::rotary_backward
    } else {
        cogvx_kernels::rotary::rotary
    };
    let out = kernel(x.values(), cos.values(), sin.values());
    crate::host::tensor::<B>(out, x.shape, x.dtype, &device)
}

/// [`ModelBackend::rotary`] for a CPU backend.
pub(crate) fn cpu_rotary<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    cpu::<B>(x, cos, sin, false)
}

/// [`ModelBackend::rotary_backward`] for a CPU backend.
pub(crate) fn cpu_rotary_backward<B: Backend>(
    grad: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    cpu::<B>(grad, cos, sin, true)
}

/// The backward of [`ModelBackend::rotary`] under autodiff: the tables are its state.
#[derive(Debug)]
struct RotaryBackward;

impl<B: ModelBackend> Backward<B, 1> for RotaryBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        crate::backend::unary_backward::<B, _>(ops, grads, |(cos, sin), grad| {
            B::rotary_backward(grad, cos, sin)
        });
    }
}

/// [`ModelBackend::rotary`] under autodiff: one operation keeping the tables. Tables that
/// require a gradient themselves (cogvx's never do) take the composed formula.
pub(crate) fn autodiff_rotary<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    cos: FloatTensor<Autodiff<B, C>>,
    sin: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    if !cos.node.requirement.is_none() || !sin.node.requirement.is_none() {
        return generic_rotary::<Autodiff<B, C>>(x, cos, sin);
    }
    let (cos, sin) = (cos.primitive, sin.primitive);
    match RotaryBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = B::rotary(x.primitive, cos.clone(), sin.clone());
            prep.finish((cos, sin), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::rotary(x.primitive, cos, sin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_tensor as values;

    /// Forward and gradient equal the composed formula under burn's autodiff, bit for bit.
    fn equals_the_formula<B: ModelBackend>()
    where
        Autodiff<B>: ModelBackend,
    {
        let (b, h, s, d) = (2, 3, 7, 8);
        let cos = Tensor::<Autodiff<B>, 2>::from_inner(values::<B, 2>([s, d], 2));
        let sin = Tensor::<Autodiff<B>, 2>::from_inner(values::<B, 2>([s, d], 3));
        let w = Tensor::<Autodiff<B>, 4>::from_inner(values::<B, 4>([b, h, s, d], 4));
        let run = |ours: bool| {
            let x = Tensor::<Autodiff<B>, 4>::from_inner(values::<B, 4>([b, h, s, d], 1))
                .require_grad();
            let (xp, cp, sp) = (
                x.clone().into_primitive().tensor(),
                cos.clone().into_primitive().tensor(),
                sin.clone().into_primitive().tensor(),
            );
            let out: Tensor<Autodiff<B>, 4> = t(if ours {
                <Autodiff<B> as ModelBackend>::rotary(xp, cp, sp)
            } else {
                generic_rotary::<Autodiff<B>>(xp, cp, sp)
            });
            let grads = (out.clone() * w.clone()).sum().backward();
            let g = x.grad(&grads).expect("x's gradient");
            (out.inner().into_data(), g.into_data())
        };
        let (ours, reference) = (run(true), run(false));
        assert_eq!(ours.0, reference.0);
        assert_eq!(ours.1, reference.1);
    }

    #[test]
    fn rotary_equals_the_formula_on_ndarray() {
        equals_the_formula::<crate::CpuBackend>();
    }

    #[cfg(feature = "flex")]
    #[test]
    fn rotary_equals_the_formula_on_flex() {
        equals_the_formula::<crate::FlexBackend>();
    }
}
