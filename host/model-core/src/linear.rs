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
use burn::tensor::{backend::Backend, ops::FloatTensor, Tensor, TensorMetadata, TensorPrimitive};

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
        crate::backend::register_gradients::<B>(grads, parents.map(|p| p.map(|n| n.id)), values);
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

/// [`ModelBackend::matmul_add`] in burn operations.
pub(crate) fn generic_matmul_add<B: ModelBackend>(
    c: FloatTensor<B>,
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
    alpha: f64,
) -> FloatTensor<B> {
    let product = B::matmul(lhs, rhs);
    let product = if alpha == 1.0 {
        product
    } else {
        B::float_mul_scalar(product, alpha.into())
    };
    B::float_add(c, product)
}

/// The operands of [`ModelBackend::lora_linear`]: `x [rows, in]`, the frozen `weight [out, in]`
/// and `bias [out]`, `lora_a [r, in]`, `lora_b [out, r]` and the scale `alpha / r`.
#[derive(Debug, Clone)]
pub struct LoraInputs<B: Backend> {
    pub x: FloatTensor<B>,
    pub weight: FloatTensor<B>,
    pub bias: Option<FloatTensor<B>>,
    pub lora_a: FloatTensor<B>,
    pub lora_b: FloatTensor<B>,
    pub scale: f64,
}

/// `x W^T + b + scale (x A^T) B^T`: the base product with its bias, then the adapter's
/// product accumulated onto it ([`ModelBackend::matmul_add`]), and `x A^T`.
fn lora_forward<B: ModelBackend>(inputs: LoraInputs<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let LoraInputs {
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scale,
    } = inputs;
    let base = B::torch_linear(x.clone(), weight, bias);
    let u = B::torch_linear(x, lora_a, None);
    let out = B::matmul_add(base, u.clone(), B::float_transpose(lora_b), scale);
    (out, u)
}

/// [`ModelBackend::lora_linear`] through [`ModelBackend::torch_linear`] and
/// [`ModelBackend::matmul_add`].
pub(crate) fn generic_lora_linear<B: ModelBackend>(inputs: LoraInputs<B>) -> FloatTensor<B> {
    lora_forward::<B>(inputs).0
}

/// What the LoRA backward keeps: `x`, `W`, `A`, `B`, `u = x A^T` and the scale.
#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    u: FloatTensor<B>,
    scale: f64,
}

/// The backward of [`ModelBackend::lora_linear`] under autodiff, parents `[x, A, B]`.
#[derive(Debug)]
struct LoraBackward;

impl<B: ModelBackend> Backward<B, 3> for LoraBackward {
    type State = LoraState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let g = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let [px, pa, pb] = ops.parents;
        let scale = |t: FloatTensor<B>| {
            if s.scale == 1.0 {
                t
            } else {
                B::float_mul_scalar(t, s.scale.into())
            }
        };
        // d/du = scale g B ([rows, r]).
        let gu = (px.is_some() || pa.is_some()).then(|| scale(B::matmul(g.clone(), s.lora_b)));
        if let Some(node) = pb {
            let gb = scale(B::matmul(B::float_transpose(g.clone()), s.u));
            grads.register::<B>(node.id, gb);
        }
        if let Some(node) = pa {
            let gu = gu.clone().expect("computed when A is tracked");
            grads.register::<B>(node.id, B::matmul(B::float_transpose(gu), s.x));
        }
        if let Some(node) = px {
            let gu = gu.expect("computed when x is tracked");
            let gx = B::matmul_add(B::matmul(g, s.weight), gu, s.lora_a, 1.0);
            grads.register::<B>(node.id, gx);
        }
    }
}

/// [`ModelBackend::lora_linear`] under autodiff: one operation over `[x, A, B]` when the base
/// weight and bias are frozen (LoRA training), the composed linears otherwise.
pub(crate) fn autodiff_lora_linear<B: ModelBackend, C: CheckpointStrategy>(
    inputs: LoraInputs<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let base_trained = [Some(&inputs.weight), inputs.bias.as_ref()]
        .into_iter()
        .flatten()
        .any(|t| !t.node.requirement.is_none());
    if base_trained {
        return generic_lora_linear::<Autodiff<B, C>>(inputs);
    }
    let inner = LoraInputs::<B> {
        x: inputs.x.primitive.clone(),
        weight: inputs.weight.primitive.clone(),
        bias: inputs.bias.as_ref().map(|b| b.primitive.clone()),
        lora_a: inputs.lora_a.primitive.clone(),
        lora_b: inputs.lora_b.primitive.clone(),
        scale: inputs.scale,
    };
    let nodes = [
        inputs.x.node.clone(),
        inputs.lora_a.node.clone(),
        inputs.lora_b.node.clone(),
    ];
    match LoraBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (x, weight, lora_a, lora_b, scale) = (
                inner.x.clone(),
                inner.weight.clone(),
                inner.lora_a.clone(),
                inner.lora_b.clone(),
                inner.scale,
            );
            let (out, u) = lora_forward::<B>(inner);
            let state = LoraState {
                x,
                weight,
                lora_a,
                lora_b,
                u,
                scale,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::lora_linear(inner)),
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

    /// [`crate::ModelBackend::matmul_add`] on flex: the product accumulated into `c`'s buffer
    /// (its own when no other tensor holds it, else a copy).
    pub fn matmul_add(c: FlexTensor, lhs: FlexTensor, rhs: FlexTensor, alpha: f64) -> FlexTensor {
        let fits = matches!(
            (matrix(&c), matrix(&lhs), matrix(&rhs)),
            (Some(c), Some(a), Some(b)) if c.rs == c.cols && c.cs == 1
                && a.cols == b.rows && c.rows == a.rows && c.cols == b.cols
        ) && c.layout().contiguous_offsets() == Some((0, c.layout().num_elements()));
        if !fits {
            return super::generic_matmul_add::<Flex>(c, lhs, rhs, alpha);
        }
        let shape = c.layout().shape().to_vec();
        let n = c.layout().num_elements();
        let mut out = if c.is_unique() {
            c.into_data()
                .into_vec::<f32>()
                .expect("an f32 tensor's data holds f32 values")
        } else {
            c.storage::<f32>()[..n].to_vec()
        };
        let (a, b) = (
            matrix(&lhs).expect("checked above"),
            matrix(&rhs).expect("checked above"),
        );
        cogvx_kernels::matmul::matmul_scaled_into(a, b, alpha as f32, &mut out, true);
        FlexTensor::from_data(TensorData::new(out, shape))
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
    use burn::tensor::TensorData;

    use crate::test_tensor as values;

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

    /// The LoRA operation equals `x W^T + b + scale (x A^T) B^T` in burn operations under
    /// autodiff: output and the gradients of x, A and B (and of W and b when they are trained,
    /// which takes the composed path).
    fn lora_equals_the_formula<B: ModelBackend>(tol: f32)
    where
        Autodiff<B>: ModelBackend,
    {
        let (rows, inp, out, r) = (130, 70, 90, 8);
        let x = values::<B, 2>([rows, inp], 1);
        let w = values::<B, 2>([out, inp], 2);
        let b = values::<B, 1>([out], 3);
        let la = values::<B, 2>([r, inp], 4);
        let lb = values::<B, 2>([out, r], 5);
        let g = values::<B, 2>([rows, out], 6);
        for (scale, base_trained) in [(1.0, false), (2.0, false), (0.5, true)] {
            let run = |ours: bool| {
                let ad = |t: &Tensor<B, 2>, grad: bool| {
                    let t = Tensor::<Autodiff<B>, 2>::from_inner(t.clone());
                    if grad {
                        t.require_grad()
                    } else {
                        t
                    }
                };
                let (xa, wa) = (ad(&x, true), ad(&w, base_trained));
                let ba = Tensor::<Autodiff<B>, 1>::from_inner(b.clone());
                let ba = if base_trained { ba.require_grad() } else { ba };
                let (aa, bb) = (ad(&la, true), ad(&lb, true));
                let y: Tensor<Autodiff<B>, 2> = if ours {
                    let prim = |t: &Tensor<Autodiff<B>, 2>| t.clone().into_primitive().tensor();
                    Tensor::from_primitive(TensorPrimitive::Float(
                        <Autodiff<B> as ModelBackend>::lora_linear(LoraInputs {
                            x: prim(&xa),
                            weight: prim(&wa),
                            bias: Some(ba.clone().into_primitive().tensor()),
                            lora_a: prim(&aa),
                            lora_b: prim(&bb),
                            scale,
                        }),
                    ))
                } else {
                    xa.clone().matmul(wa.clone().transpose())
                        + ba.clone().unsqueeze::<2>()
                        + xa.clone()
                            .matmul(aa.clone().transpose())
                            .matmul(bb.clone().transpose())
                            .mul_scalar(scale)
                };
                let grads = (y.clone() * Tensor::from_inner(g.clone())).sum().backward();
                let gd = |t: &Tensor<Autodiff<B>, 2>| t.grad(&grads).map(|t| t.into_data());
                (
                    y.inner().into_data(),
                    [gd(&xa), gd(&aa), gd(&bb), gd(&wa)],
                    ba.grad(&grads).map(|t| t.into_data()),
                )
            };
            let (ours, reference) = (run(true), run(false));
            let t = burn::tensor::Tolerance::<f32>::relative(tol);
            ours.0.assert_approx_eq::<f32>(&reference.0, t);
            for (i, (o, r)) in ours.1.iter().zip(&reference.1).enumerate() {
                assert_eq!(o.is_some(), r.is_some(), "gradient {i} (scale {scale})");
                if let (Some(o), Some(r)) = (o, r) {
                    o.assert_approx_eq::<f32>(r, t);
                }
            }
            assert_eq!(ours.2.is_some(), reference.2.is_some());
        }
    }

    #[test]
    fn lora_equals_the_formula_on_ndarray() {
        lora_equals_the_formula::<crate::CpuBackend>(1e-4);
    }

    #[cfg(feature = "flex")]
    #[test]
    fn lora_equals_the_formula_on_flex() {
        lora_equals_the_formula::<crate::FlexBackend>(1e-4);
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
