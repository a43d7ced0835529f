//! Tensors as host `f32` buffers and back: how the CPU backends hand their operands to
//! [`cogvx_kernels`], which work on plain slices.

use crate::precision::{float_dtype, to_dtype, to_f32};
use burn::tensor::{
    backend::Backend, ops::FloatTensor, FloatDType, Shape, Tensor, TensorData, TensorMetadata,
    TensorPrimitive,
};

/// A tensor's values as f32, row-major, with its shape and dtype.
pub(crate) struct Host {
    pub values: Vec<f32>,
    pub shape: Shape,
    pub dtype: FloatDType,
}

impl Host {
    /// The values of `t` (half precision widened to f32).
    pub fn new<B: Backend>(t: FloatTensor<B>) -> Self {
        let shape = t.shape();
        let n = shape.num_elements();
        let flat =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(t, [n].into())));
        let dtype = float_dtype(&flat);
        let values = to_f32(flat)
            .into_data()
            .into_vec::<f32>()
            .expect("an f32 tensor's data holds f32 values");
        Host {
            values,
            shape,
            dtype,
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
