//! Memory layout where a CPU backend's operations care about it: the swap of a tensor's token
//! and head axes as a copy into a contiguous tensor ([`ModelBackend::swap_dims_contiguous`]).
//!
//! burn-flex walks a strided view element by element wherever its fast paths do not apply (a
//! broadcast operand beside a permuted one, the reshape of a permuted tensor), so the heads
//! split from a linear's output as a `swap_dims` view made every operation after it (the
//! attention's norms and rotary embedding, and their backward) several times slower. Copied
//! once into a contiguous tensor by whole rows ([`cogvx_kernels::layout`]), they take the fast
//! paths. Under autodiff the swap is one operation whose backward is the same swap of the
//! gradient, so the gradients come back contiguous too.

use crate::backend::{unary_backward, ModelBackend};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{ops::FloatTensor, Tensor, TensorPrimitive};

/// [`ModelBackend::contiguous`] on a tensor.
pub fn contiguous<B: ModelBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::contiguous(
        x.into_primitive().tensor(),
    )))
}

/// [`ModelBackend::swap_dims_contiguous`] on a tensor.
pub fn swap_dims_contiguous<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    dim1: usize,
    dim2: usize,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::swap_dims_contiguous(
        x.into_primitive().tensor(),
        dim1,
        dim2,
    )))
}

/// The backward of [`ModelBackend::swap_dims_contiguous`]: the same swap of the gradient.
#[derive(Debug)]
struct SwapDimsBackward;

impl<B: ModelBackend> Backward<B, 1> for SwapDimsBackward {
    type State = (usize, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        unary_backward::<B, _>(ops, grads, |(dim1, dim2), grad| {
            B::swap_dims_contiguous(grad, dim1, dim2)
        });
    }
}

/// The backward of [`ModelBackend::contiguous`]: the gradient, laid out contiguously.
#[derive(Debug)]
struct ContiguousBackward;

impl<B: ModelBackend> Backward<B, 1> for ContiguousBackward {
    type State = ();

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        unary_backward::<B, _>(ops, grads, |(), grad| B::contiguous(grad));
    }
}

/// [`ModelBackend::contiguous`] under autodiff: one operation, nothing saved.
pub(crate) fn autodiff_contiguous<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    match ContiguousBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((), B::contiguous(x.primitive)),
        OpsKind::UnTracked(prep) => prep.finish(B::contiguous(x.primitive)),
    }
}

/// [`ModelBackend::swap_dims_contiguous`] under autodiff: one operation, nothing saved.
pub(crate) fn autodiff_swap_dims_contiguous<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    dim1: usize,
    dim2: usize,
) -> FloatTensor<Autodiff<B, C>> {
    match SwapDimsBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (dim1, dim2),
            B::swap_dims_contiguous(x.primitive, dim1, dim2),
        ),
        OpsKind::UnTracked(prep) => prep.finish(B::swap_dims_contiguous(x.primitive, dim1, dim2)),
    }
}

/// [`ModelBackend::contiguous`] for burn-flex: f32 views whose last axis is contiguous are
/// copied row by row on rayon's threads; anything else by burn-flex's own copy.
#[cfg(feature = "flex")]
pub(crate) fn flex_contiguous(x: burn_flex::FlexTensor) -> burn_flex::FlexTensor {
    use burn::tensor::{DType, TensorData};
    let layout = x.layout();
    let whole = layout.contiguous_offsets() == Some((0, layout.num_elements()));
    if whole {
        return x;
    }
    let strides: Option<Vec<usize>> = layout
        .strides()
        .iter()
        .map(|&s| usize::try_from(s).ok())
        .collect();
    let dims = layout.shape().to_vec();
    match strides {
        Some(strides)
            if x.dtype() == DType::F32
                && dims.len() >= 2
                && strides.last() == Some(&1)
                && *dims.last().unwrap_or(&0) >= 16 =>
        {
            let values = cogvx_kernels::layout::gather_rows(
                x.storage::<f32>(),
                layout.start_offset(),
                &dims,
                &strides,
            );
            burn_flex::FlexTensor::from_data(TensorData::new(values, dims))
        }
        _ => x.to_contiguous(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// Forward and gradient equal `swap_dims`'s, on `B` with autodiff.
    fn equals_swap_dims<B: ModelBackend>()
    where
        Autodiff<B>: ModelBackend,
    {
        let device = Default::default();
        let dims = [2, 5, 3, 16];
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let weights: Vec<f32> = (0..n).map(|i| (i % 11) as f32 - 5.0).collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(values, dims), &device);
        let w = Tensor::<B, 4>::from_data(TensorData::new(weights, [2, 3, 5, 16]), &device);
        let run = |ours: bool| {
            let xa = Tensor::<Autodiff<B>, 4>::from_inner(x.clone()).require_grad();
            let y = if ours {
                Tensor::<Autodiff<B>, 4>::from_primitive(TensorPrimitive::Float(
                    <Autodiff<B> as ModelBackend>::swap_dims_contiguous(
                        xa.clone().into_primitive().tensor(),
                        1,
                        2,
                    ),
                ))
            } else {
                xa.clone().swap_dims(1, 2)
            };
            let loss = (y.clone() * Tensor::from_inner(w.clone())).sum();
            let grads = loss.backward();
            let g = xa.grad(&grads).expect("x's gradient");
            (y.inner().into_data(), g.into_data())
        };
        let (ours, reference) = (run(true), run(false));
        assert_eq!(ours.0, reference.0);
        assert_eq!(ours.1, reference.1);
    }

    /// `contiguous` of a narrowed view: the same values, and the gradient lands in the view's
    /// rows of its source.
    fn contiguous_keeps_values_and_gradients<B: ModelBackend>()
    where
        Autodiff<B>: ModelBackend,
    {
        let device = Default::default();
        let x = Tensor::<B, 3>::from_data(
            TensorData::new(
                (0..2 * 6 * 16).map(|i| i as f32).collect::<Vec<_>>(),
                [2, 6, 16],
            ),
            &device,
        );
        let run = |ours: bool| {
            let xa = Tensor::<Autodiff<B>, 3>::from_inner(x.clone()).require_grad();
            let view = xa.clone().narrow(1, 2, 3);
            let y = if ours { contiguous(view) } else { view };
            let w = Tensor::<Autodiff<B>, 3>::from_inner(Tensor::<B, 3>::ones([1, 3, 16], &device))
                .mul_scalar(3.0);
            let grads = (y.clone() * w).sum().backward();
            (
                y.inner().into_data(),
                xa.grad(&grads).expect("x's gradient").into_data(),
            )
        };
        let (ours, reference) = (run(true), run(false));
        assert_eq!(ours.0, reference.0);
        assert_eq!(ours.1, reference.1);
    }

    #[test]
    fn the_contiguous_swap_equals_swap_dims_on_ndarray() {
        contiguous_keeps_values_and_gradients::<crate::CpuBackend>();
        equals_swap_dims::<crate::CpuBackend>();
    }

    #[cfg(feature = "flex")]
    #[test]
    fn the_contiguous_swap_equals_swap_dims_on_flex() {
        equals_swap_dims::<crate::FlexBackend>();
        contiguous_keeps_values_and_gradients::<crate::FlexBackend>();
        // The copy is contiguous, and a view of a view (narrowed, then swapped) copies right.
        let t = Tensor::<crate::FlexBackend, 3>::from_data(
            TensorData::new(
                (0..4 * 6 * 16).map(|i| i as f32).collect::<Vec<_>>(),
                [4, 6, 16],
            ),
            &Default::default(),
        )
        .narrow(1, 1, 4);
        let ours = flex_contiguous(t.clone().swap_dims(0, 1).into_primitive().tensor());
        assert!(ours.is_contiguous());
        let ours = Tensor::<crate::FlexBackend, 3>::from_primitive(TensorPrimitive::Float(ours));
        assert_eq!(ours.into_data(), t.swap_dims(0, 1).into_data());
    }
}
