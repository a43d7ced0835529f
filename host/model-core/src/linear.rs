//! `x W^T + b` as one operation ([`ModelBackend::torch_linear`]) and the 2-D matrix product its
//! backward multiplies with ([`ModelBackend::matmul`]).
//!
//! burn-flex's own matmul zero-fills every output and then copies it into a 64-byte-aligned
//! buffer, packs the right operand on one thread while the other waits, and adds a bias as a
//! separate broadcast pass on one thread: at the benchmark's shapes about a fifth of a step
//! ran on one thread there. On flex, f32 products of any strides go to
//! [`cogvx_kernels::matmul`] instead: one band of the output per thread, written once, the bias
//! fused, transposes read through strides. Under autodiff the linear is one operation that
//! saves `x` and `W` and whose backward is two of those products (`g W`, `g^T x`) and a row sum.

use crate::backend::ModelBackend;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{ops::FloatTensor, Tensor, TensorMetadata, TensorPrimitive};

/// `x W^T + b` for `x [rows, in]`, `weight [out, in]`, `bias [out]` ([`ModelBackend::torch_linear`]).
pub fn linear<B: ModelBackend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::torch_linear(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.map(|b| b.into_primitive().tensor()),
    )))
}

/// [`ModelBackend::matmul`] on tensors.
pub fn matmul<B: ModelBackend>(lhs: Tensor<B, 2>, rhs: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::matmul(
        lhs.into_primitive().tensor(),
        rhs.into_primitive().tensor(),
    )))
}

/// [`ModelBackend::torch_linear`] in burn operations (through [`ModelBackend::matmul`]).
pub(crate) fn generic_linear<B: ModelBackend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let y = B::matmul(x, B::float_transpose(weight));
    match bias {
        Some(b) => {
            let out = b.shape().num_elements();
            B::float_add(y, B::float_reshape(b, [1, out].into()))
        }
        None => y,
    }
}

/// The gradients of [`ModelBackend::torch_linear`] for `[x, weight, bias]` where `wanted`, from the
/// output's gradient `grad [rows, out]`.
fn linear_backward<B: ModelBackend>(
    x: Option<FloatTensor<B>>,
    weight: Option<FloatTensor<B>>,
    grad: FloatTensor<B>,
    wanted: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let gx = wanted[0].then(|| {
        B::matmul(
            grad.clone(),
            weight.expect("the weight is saved when x's gradient is wanted"),
        )
    });
    let gw = wanted[1].then(|| {
        B::matmul(
            B::float_transpose(grad.clone()),
            x.expect("x is saved when the weight's gradient is wanted"),
        )
    });
    let gb = wanted[2].then(|| {
        let out = grad.shape().dims::<2>()[1];
        B::float_reshape(B::float_sum_dim(grad, 0), [out].into())
    });
    [gx, gw, gb]
}

/// The backward of [`ModelBackend::torch_linear`] under autodiff; `N` is 2 (x, weight) or 3 (with a
/// bias).
#[derive(Debug)]
struct LinearBackward<const N: usize>;

impl<B: ModelBackend, const N: usize> Backward<B, N> for LinearBackward<N> {
    /// `x` (kept when the weight is tracked) and the weight (kept when `x` is).
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let parents = ops.parents;
        let wanted = [0, 1, 2].map(|i| i < N && parents[i].is_some());
        let (x, weight) = ops.state;
        let values = linear_backward::<B>(x, weight, grad, wanted);
        for (parent, value) in parents.into_iter().zip(values) {
            if let (Some(node), Some(value)) = (parent, value) {
                grads.register::<B>(node.id, value);
            }
        }
    }
}

/// [`ModelBackend::torch_linear`] under autodiff: one operation saving what its backward needs.
pub(crate) fn autodiff_linear<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    bias: Option<FloatTensor<Autodiff<B, C>>>,
) -> FloatTensor<Autodiff<B, C>> {
    let (xp, wp) = (x.primitive.clone(), weight.primitive.clone());
    let bp = bias.as_ref().map(|b| b.primitive.clone());
    let forward = || B::torch_linear(xp.clone(), wp.clone(), bp.clone());
    macro_rules! op {
        ($n:literal, $nodes:expr) => {{
            let nodes = $nodes;
            // What the backward multiplies with: W for x's gradient, x for W's.
            let keep_w = !nodes[0].requirement.is_none();
            let keep_x = !nodes[1].requirement.is_none();
            match LinearBackward::<$n>
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = (keep_x.then(|| xp.clone()), keep_w.then(|| wp.clone()));
                    prep.finish(state, forward())
                }
                OpsKind::UnTracked(prep) => prep.finish(forward()),
            }
        }};
    }
    match &bias {
        None => op!(2, [x.node.clone(), weight.node.clone()]),
        Some(b) => op!(3, [x.node.clone(), weight.node.clone(), b.node.clone()]),
    }
}

/// burn-flex's side: f32 operands through [`cogvx_kernels::matmul`], anything else (half
/// precision, negative strides) through burn-flex's own operations.
#[cfg(feature = "flex")]
pub(crate) mod flex {
    use burn::backend::Flex;
    use burn::tensor::{ops::FloatTensorOps, DType, TensorData};
    use burn_flex::FlexTensor;
    use cogvx_kernels::matmul::Matrix;

    /// `t` as a kernel matrix, when it is a 2-D f32 tensor with non-negative strides.
    fn matrix(t: &FlexTensor) -> Option<Matrix<'_>> {
        let layout = t.layout();
        let dims = layout.shape().to_vec();
        if t.dtype() != DType::F32 || dims.len() != 2 {
            return None;
        }
        let rs = usize::try_from(layout.strides()[0]).ok()?;
        let cs = usize::try_from(layout.strides()[1]).ok()?;
        Some(Matrix {
            data: &t.storage::<f32>()[layout.start_offset()..],
            rows: dims[0],
            cols: dims[1],
            rs,
            cs,
        })
    }

    /// A contiguous f32 `[out]` bias, as a slice.
    fn vector(t: &FlexTensor) -> Option<&[f32]> {
        let layout = t.layout();
        let n = layout.num_elements();
        (t.dtype() == DType::F32 && layout.shape().num_dims() == 1)
            .then(|| layout.contiguous_offsets())
            .flatten()
            .map(|(start, end)| &t.storage::<f32>()[start..end])
            .filter(|v| v.len() == n)
    }

    fn product(a: Matrix<'_>, b: Matrix<'_>, bias: Option<&[f32]>) -> FlexTensor {
        let shape = [a.rows, b.cols];
        FlexTensor::from_data(TensorData::new(
            cogvx_kernels::matmul::matmul(a, b, bias),
            shape,
        ))
    }

    /// [`crate::ModelBackend::matmul`] on flex.
    pub fn matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
        match (matrix(&lhs), matrix(&rhs)) {
            (Some(a), Some(b)) if a.cols == b.rows => product(a, b, None),
            _ => Flex::float_matmul(lhs, rhs),
        }
    }

    /// [`crate::ModelBackend::torch_linear`] on flex.
    pub fn linear(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>) -> FlexTensor {
        let fused = match (matrix(&x), matrix(&weight), bias.as_ref().map(vector)) {
            (Some(a), Some(w), None) if a.cols == w.cols => Some(product(a, w.t(), None)),
            (Some(a), Some(w), Some(Some(b))) if a.cols == w.cols && b.len() == w.rows => {
                Some(product(a, w.t(), Some(b)))
            }
            _ => None,
        };
        fused.unwrap_or_else(|| super::generic_linear::<Flex>(x, weight, bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{backend::Backend, TensorData};

    /// Deterministic values in about [-1, 1].
    fn values<B: Backend, const D: usize>(dims: [usize; D], seed: usize) -> Tensor<B, D> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 498.5 - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(v, dims), &Default::default())
    }

    /// Forward and the three gradients equal burn's `x.matmul(w^T) + b` under autodiff, for
    /// every combination of tracked operands.
    fn equals_the_formula<B: ModelBackend>(tol: f32)
    where
        Autodiff<B>: ModelBackend,
    {
        // Big enough for the flex kernel to split the output into bands.
        let (rows, inp, out) = (170, 133, 145);
        let x = values::<B, 2>([rows, inp], 1);
        let w = values::<B, 2>([out, inp], 2);
        let b = values::<B, 1>([out], 3);
        let g = values::<B, 2>([rows, out], 4);
        for tracked in 0..8u8 {
            for with_bias in [false, true] {
                let run = |ours: bool| {
                    let mk = |t: Tensor<B, 2>, bit: u8| {
                        let t = Tensor::<Autodiff<B>, 2>::from_inner(t);
                        if tracked & bit != 0 {
                            t.require_grad()
                        } else {
                            t
                        }
                    };
                    let (xa, wa) = (mk(x.clone(), 1), mk(w.clone(), 2));
                    let ba = with_bias.then(|| {
                        let t = Tensor::<Autodiff<B>, 1>::from_inner(b.clone());
                        if tracked & 4 != 0 {
                            t.require_grad()
                        } else {
                            t
                        }
                    });
                    let y = if ours {
                        linear(xa.clone(), wa.clone(), ba.clone())
                    } else {
                        let y = xa.clone().matmul(wa.clone().transpose());
                        match &ba {
                            Some(b) => y + b.clone().unsqueeze::<2>(),
                            None => y,
                        }
                    };
                    let grads = (y.clone() * Tensor::from_inner(g.clone())).sum().backward();
                    (
                        y.inner().into_data(),
                        xa.grad(&grads).map(|t| t.into_data()),
                        wa.grad(&grads).map(|t| t.into_data()),
                        ba.and_then(|b| b.grad(&grads)).map(|t| t.into_data()),
                    )
                };
                let (ours, reference) = (run(true), run(false));
                let close = |a: &TensorData, b: &TensorData, what: &str| {
                    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            (x - y).abs() <= tol * (1.0 + y.abs()),
                            "{what} (tracked {tracked:03b}, bias {with_bias}) [{i}]: {x} vs {y}"
                        );
                    }
                };
                close(&ours.0, &reference.0, "output");
                for (what, a, b) in [
                    ("x", &ours.1, &reference.1),
                    ("weight", &ours.2, &reference.2),
                    ("bias", &ours.3, &reference.3),
                ] {
                    assert_eq!(a.is_some(), b.is_some(), "{what}'s gradient exists");
                    if let (Some(a), Some(b)) = (a, b) {
                        close(a, b, what);
                    }
                }
            }
        }
    }

    #[test]
    fn linear_equals_the_formula_on_ndarray() {
        equals_the_formula::<crate::CpuBackend>(1e-5);
    }

    #[cfg(feature = "flex")]
    #[test]
    fn linear_equals_the_formula_on_flex() {
        equals_the_formula::<crate::FlexBackend>(1e-5);
    }

    /// Transposed and narrowed (strided) operands give burn's product.
    #[cfg(feature = "flex")]
    #[test]
    fn flex_matmul_reads_strided_views() {
        type F = crate::FlexBackend;
        let device = Default::default();
        let a = Tensor::<F, 2>::from_data(
            TensorData::new((0..60).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), [6, 10]),
            &device,
        );
        let b = Tensor::<F, 2>::from_data(
            TensorData::new(
                (0..80).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
                [8, 10],
            ),
            &device,
        );
        let lhs = a.clone().narrow(1, 2, 5); // [6, 5], rows 10 apart
        let rhs = b.clone().transpose().narrow(0, 3, 5); // [5, 8], a transposed view
        let ours = matmul(lhs.clone(), rhs.clone()).into_data();
        let reference = lhs.matmul(rhs).into_data();
        ours.assert_approx_eq::<f32>(&reference, burn::tensor::Tolerance::absolute(1e-5));
    }
}
