//! Activations with their own backward ([`ModelBackend::gelu_tanh`]): under autodiff they keep
//! only their input, where the composed formula keeps every intermediate (three `[tokens,
//! 4 x hidden]` buffers for GELU; 1.6 GiB per block at CogVideoX-2B's 17,776 tokens).

use crate::backend::ModelBackend;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    activation::sigmoid, backend::Backend, ops::FloatTensor, Tensor, TensorMetadata,
    TensorPrimitive,
};

/// `2 sqrt(2/pi)`.
const C1: f64 = 2.0 * 0.797_884_560_802_865_4;
/// `2 sqrt(2/pi) * 0.044715`.
const C3: f64 = C1 * 0.044715;

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (torch's `gelu(approximate="tanh")`), as
/// one operation ([`ModelBackend::gelu_tanh`]).
pub fn gelu_tanh<B: ModelBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::gelu_tanh(
        x.into_primitive().tensor(),
    )))
}

/// The formula, evaluated as the identical `x * sigmoid(2 sqrt(2/pi) x (1 + 0.044715 x^2))`
/// (`0.5 (1 + tanh z) = sigmoid(2 z)`): burn-ndarray's `tanh` goes through f64 and its sigmoid
/// does not; `x^2` as a product (`powf` is several times slower).
pub fn gelu_tanh_formula<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let z2 = (x.clone() * x.clone() * C3 + C1) * x.clone();
    x * sigmoid(z2)
}

/// `d gelu_tanh(x) / dx * grad`: with `s = sigmoid(z2)`, `z2 = C1 x + C3 x^3`,
/// `d/dx [x s] = s + x s (1 - s) (C1 + 3 C3 x^2)`.
pub fn gelu_tanh_backward_formula<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    grad: Tensor<B, D>,
) -> Tensor<B, D> {
    let x2 = x.clone() * x.clone();
    let s = sigmoid((x2.clone() * C3 + C1) * x.clone());
    let dz = x2 * (3.0 * C3) + C1;
    let inner = s.clone() * (s.clone().neg() + 1.0) * dz * x;
    (inner + s) * grad
}

/// Elements per chunk of [`elementwise`]: the formula's temporaries are this size (16 MiB in
/// f32), not the whole tensor's (a `[17776, 7680]` GELU input is 546 MiB, and its backward has
/// four temporaries).
pub const CHUNK: usize = 1 << 22;

/// Applies an element-wise `f` to a primitive of any rank, as flat rank-1 chunks of [`CHUNK`]
/// elements joined again, so that `f`'s intermediates stay chunk-sized.
pub(crate) fn elementwise<B: Backend>(
    x: FloatTensor<B>,
    f: impl Fn(Tensor<B, 1>) -> Tensor<B, 1>,
) -> FloatTensor<B> {
    elementwise2::<B>(x.clone(), x, |x, _| f(x))
}

/// [`elementwise`] for a function of two same-shape primitives.
// `slice_assign` takes one range per dimension: `[s..s + len]` is the one of a 1-D tensor.
#[allow(clippy::single_range_in_vec_init)]
pub(crate) fn elementwise2<B: Backend>(
    x: FloatTensor<B>,
    y: FloatTensor<B>,
    f: impl Fn(Tensor<B, 1>, Tensor<B, 1>) -> Tensor<B, 1>,
) -> FloatTensor<B> {
    let shape = x.shape();
    let n = shape.num_elements();
    let flat = |t: FloatTensor<B>| {
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(t, [n].into())))
    };
    let (x, y) = (flat(x), flat(y));
    // Half-precision inputs are computed in f32 chunk by chunk (as torch's half kernels do)
    // and the result given back in x's dtype.
    let dtype = crate::precision::float_dtype(&x);
    let f = |x: Tensor<B, 1>, y: Tensor<B, 1>| {
        crate::precision::to_dtype(
            f(crate::precision::to_f32(x), crate::precision::to_f32(y)),
            dtype,
        )
    };
    let out = if n <= CHUNK {
        f(x, y)
    } else {
        // Each chunk's result is written into one output as it is computed: collecting the
        // chunks and joining them held the output twice (at the peak of a 2B block's backward,
        // 32 chunks of 16 MiB beside their 546 MiB join). The output is y's own buffer, each
        // chunk overwritten after it was read: when the caller gave y away (the GELU backward's
        // incoming gradient) no third buffer beside x and y is allocated (546 MiB at the peak of
        // a 2B block's backward); when y is shared (the forward passes x twice) the first write
        // copies it, as a fresh output would.
        let mut out = if y.dtype() == x.dtype() {
            y
        } else {
            crate::precision::like(y, &x)
        };
        for s in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - s);
            let part = f(x.clone().narrow(0, s, len), out.clone().narrow(0, s, len));
            out = out.slice_assign([s..s + len], part);
        }
        out
    };
    B::float_reshape(out.into_primitive().tensor(), shape)
}

/// [`ModelBackend::gelu_tanh`] for a CPU backend: [`cogvx_kernels::activation`] on the host
/// buffer (half precision computed in f32, as [`elementwise`] does).
pub(crate) fn cpu_gelu_tanh<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let device = B::float_device(&x);
    let x = crate::host::Host::new::<B>(x);
    let y = cogvx_kernels::activation::gelu_tanh(x.values());
    crate::host::tensor::<B>(y, x.shape, x.dtype, &device)
}

/// [`ModelBackend::gelu_tanh_backward`] for a CPU backend, in `grad`'s buffer.
pub(crate) fn cpu_gelu_tanh_backward<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let device = B::float_device(&x);
    let x = crate::host::Host::new::<B>(x);
    let g = crate::host::Host::new::<B>(grad);
    let shape = g.shape.clone();
    let mut g = g.into_vec();
    cogvx_kernels::activation::gelu_tanh_backward(x.values(), &mut g);
    crate::host::tensor::<B>(g, shape, x.dtype, &device)
}

#[derive(Debug)]
struct GeluTanhBackward;

impl<B: ModelBackend> Backward<B, 1> for GeluTanhBackward {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        crate::backend::unary_backward::<B, _>(ops, grads, B::gelu_tanh_backward);
    }
}

/// The autodiff operation: saves `x` only.
pub(crate) fn autodiff_gelu_tanh<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    match GeluTanhBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = B::gelu_tanh(x.primitive.clone());
            prep.finish(x.primitive, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuAutodiffBackend, CpuBackend};
    use burn::tensor::TensorData;

    #[test]
    fn the_operation_equals_the_formula_forward_and_backward() {
        let values: Vec<f32> = (-60..=60)
            .map(|i| i as f32 * 0.25)
            .chain([-40.0, 40.0, 1e-4, -1e-4])
            .collect();
        let n = values.len();
        let x = Tensor::<CpuBackend, 2>::from_data(
            TensorData::new(values, [1, n]),
            &Default::default(),
        );
        let w = Tensor::<CpuBackend, 2>::from_data(
            TensorData::new(
                (0..n)
                    .map(|i| 1.0 + (i % 7) as f32 * 0.1)
                    .collect::<Vec<_>>(),
                [1, n],
            ),
            &Default::default(),
        );
        let run = |fused: bool| {
            let xa = Tensor::<CpuAutodiffBackend, 2>::from_inner(x.clone()).require_grad();
            let y = if fused {
                gelu_tanh(xa.clone())
            } else {
                gelu_tanh_formula(xa.clone())
            };
            let g = (y.clone() * Tensor::from_inner(w.clone())).sum().backward();
            (
                y.inner().into_data().to_vec::<f32>().unwrap(),
                xa.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap(),
            )
        };
        // The CPU backends' kernel (cogvx_kernels::activation) against the formula in burn
        // operations: the same maths, a different exp (one or two ulp apart).
        let close = |a: f32, b: f32| a.is_finite() && (a - b).abs() <= 1e-6 * b.abs() + 1e-30;
        let (y1, g1) = run(true);
        let (y0, g0) = run(false);
        for (i, (a, b)) in y1.iter().zip(&y0).enumerate() {
            assert!(close(*a, *b), "forward x[{i}]: {a} vs {b}");
        }
        for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
            assert!(
                a.is_finite() && (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                "x[{i}]: {a} vs {b}"
            );
        }
        // Larger than one chunk: the same values as the formula on the whole tensor.
        let big = Tensor::<CpuBackend, 2>::random(
            [3, CHUNK / 2 + 5],
            burn::tensor::Distribution::Normal(0.0, 3.0),
            &Default::default(),
        );
        let values = |t: FloatTensor<CpuBackend>| {
            Tensor::<CpuBackend, 2>::from_primitive(TensorPrimitive::Float(t))
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let whole = gelu_tanh_formula(big.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let chunked = elementwise::<CpuBackend>(
            big.clone().into_primitive().tensor(),
            gelu_tanh_formula::<CpuBackend, 1>,
        );
        assert_eq!(values(chunked), whole);
        let kernel = gelu_tanh(big.clone()).into_data().to_vec::<f32>().unwrap();
        assert!(kernel.iter().zip(&whole).all(|(a, b)| close(*a, *b)));
        let dy = Tensor::<CpuBackend, 2>::ones([3, CHUNK / 2 + 5], &Default::default());
        let (x_, dy_) = (
            big.clone().into_primitive().tensor(),
            dy.clone().into_primitive().tensor(),
        );
        let chunked = elementwise2::<CpuBackend>(
            x_.clone(),
            dy_.clone(),
            gelu_tanh_backward_formula::<CpuBackend, 1>,
        );
        let whole = gelu_tanh_backward_formula(big, dy)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(values(chunked), whole);
        let kernel = values(CpuBackend::gelu_tanh_backward(x_, dy_));
        assert!(kernel
            .iter()
            .zip(&whole)
            .all(|(a, b)| a.is_finite() && (a - b).abs() <= 2e-6 * (1.0 + b.abs())));
        // torch's values at a few points (gelu(approximate="tanh")).
        let at = |v: f32| {
            gelu_tanh(Tensor::<CpuBackend, 1>::from_data(
                TensorData::new(vec![v], [1]),
                &Default::default(),
            ))
            .into_scalar()
        };
        for (v, want) in [(1.0f32, 0.841_192), (-1.0, -0.158_808), (3.0, 2.996_363)] {
            assert!((at(v) - want).abs() < 1e-5, "{v}: {}", at(v));
        }
    }
}
