//! Tensors as host `f32` buffers and back: how the CPU backends hand their operands to
//! [`cogvx_kernels`], which work on plain slices.
//!
//! On burn-flex an f32 tensor laid out contiguously is read in place (the kernels borrow its
//! buffer) and a result buffer becomes a tensor without a copy; anything else (ndarray, half
//! precision, strided views) goes through `TensorData` as a copy.

use crate::precision::{float_dtype, to_dtype, to_f32};
use burn::tensor::{
    backend::Backend, ops::FloatTensor, FloatDType, Shape, Tensor, TensorData, TensorMetadata,
    TensorPrimitive,
};

/// A tensor's values as f32, row-major, with its shape and dtype.
pub(crate) struct Host {
    values: Values,
    pub shape: Shape,
    pub dtype: FloatDType,
}

/// Where a [`Host`]'s values live.
enum Values {
    /// A buffer of their own.
    Owned(Vec<f32>),
    /// The buffer of an f32 burn-flex tensor, contiguous from offset 0.
    #[cfg(feature = "flex")]
    Flex(burn_flex::FlexTensor),
}

impl Host {
    /// The values of `t` (half precision widened to f32).
    pub fn new<B: Backend>(t: FloatTensor<B>) -> Self {
        let shape = t.shape();
        #[cfg(feature = "flex")]
        let t = match flex::lend::<B>(t) {
            Ok(flex) => {
                return Host {
                    values: Values::Flex(flex),
                    shape,
                    dtype: FloatDType::F32,
                }
            }
            Err(t) => t,
        };
        let n = shape.num_elements();
        let flat =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(t, [n].into())));
        let dtype = float_dtype(&flat);
        let values = to_f32(flat)
            .into_data()
            .into_vec::<f32>()
            .expect("an f32 tensor's data holds f32 values");
        Host {
            values: Values::Owned(values),
            shape,
            dtype,
        }
    }

    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        match &self.values {
            Values::Owned(v) => v,
            #[cfg(feature = "flex")]
            Values::Flex(t) => &t.storage::<f32>()[..self.shape.num_elements()],
        }
    }

    /// The values as a buffer of their own (a copy where they are a tensor's still in use).
    pub fn into_vec(self) -> Vec<f32> {
        match self.values {
            Values::Owned(v) => v,
            #[cfg(feature = "flex")]
            Values::Flex(t) => flex::into_vec(t, self.shape.num_elements()),
        }
    }

    /// The dims of a rank-4 tensor.
    pub fn dims4(&self) -> [usize; 4] {
        assert_eq!(self.shape.num_dims(), 4, "a rank-4 tensor");
        self.shape.dims::<4>()
    }
}

/// `values` as a tensor of `shape` and `dtype` on `device`.
pub(crate) fn tensor<B: Backend>(
    values: Vec<f32>,
    shape: Shape,
    dtype: FloatDType,
    device: &B::Device,
) -> FloatTensor<B> {
    let n = values.len();
    let t = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device);
    B::float_reshape(to_dtype(t, dtype).into_primitive().tensor(), shape)
}

/// The burn-flex side: a generic `FloatTensor<B>` is a `FlexTensor` exactly when `B` is Flex,
/// which `Any` tells at run time (the kernels' callers are generic over the CPU backends).
#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::{ops::FloatTensor, DType};
    use burn_flex::FlexTensor;
    use std::any::Any;

    /// `t` itself when it is an f32 flex tensor whose values are its buffer's first ones, in
    /// order; otherwise `t` back.
    pub fn lend<B: burn::tensor::backend::Backend>(
        t: FloatTensor<B>,
    ) -> Result<FlexTensor, FloatTensor<B>> {
        let boxed: Box<dyn Any> = Box::new(t);
        match boxed.downcast::<FlexTensor>() {
            Ok(flex) => {
                let layout = flex.layout();
                if flex.dtype() == DType::F32
                    && layout.contiguous_offsets() == Some((0, layout.num_elements()))
                {
                    Ok(*flex)
                } else {
                    let back: Box<dyn Any> = flex;
                    Err(*back
                        .downcast::<FloatTensor<B>>()
                        .expect("the same type it was boxed as"))
                }
            }
            Err(other) => Err(*other
                .downcast::<FloatTensor<B>>()
                .expect("the same type it was boxed as")),
        }
    }

    /// The first `n` values of `t`'s buffer (as `lend` left it): the buffer itself when no
    /// other tensor shares it.
    pub fn into_vec(t: FlexTensor, n: usize) -> Vec<f32> {
        if t.is_unique() {
            // Contiguous from offset 0 and not shared: `into_data` hands over the buffer.
            t.into_data()
                .into_vec::<f32>()
                .expect("an f32 tensor's data holds f32 values")
        } else {
            t.storage::<f32>()[..n].to_vec()
        }
    }
}
