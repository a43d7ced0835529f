//! The one attention function of cogvx.
//!
//! Every model (transformer, T5, VAE mid-block if any) calls [`attention`]; a memory-efficient
//! (flash / chunked) implementation replaces this body without touching model code.

use burn::tensor::{activation::softmax, backend::Backend, Tensor};

/// Scaled dot-product attention over `[batch, heads, len, head_dim]` tensors.
///
/// `scale` defaults to `1/sqrt(head_dim)` (PyTorch's `scaled_dot_product_attention`); T5 passes
/// `Some(1.0)`. `bias` is added to the scores before the softmax (T5's relative position bias, or
/// a mask as large negative values) and broadcasts over `[batch, heads, q_len, k_len]`.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: Option<f64>,
) -> Tensor<B, 4> {
    let head_dim = q.dims()[3];
    let scale = scale.unwrap_or(1.0 / (head_dim as f64).sqrt());
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale); // [B, H, Lq, Lk]
    let scores = match bias {
        Some(bias) => scores + bias,
        None => scores,
    };
    softmax(scores, 3).matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, CpuDevice};
    use burn::tensor::TensorData;

    #[test]
    fn uniform_scores_average_values() {
        let dev = CpuDevice::default();
        let q = Tensor::<CpuBackend, 4>::zeros([1, 1, 2, 4], &dev);
        let k = Tensor::<CpuBackend, 4>::ones([1, 1, 3, 4], &dev);
        let v = Tensor::<CpuBackend, 4>::from_data(TensorData::new((0..12).map(|x| x as f32).collect::<Vec<_>>(), [1, 1, 3, 4]), &dev);
        let out = attention(q, k, v, None, None).into_data().to_vec::<f32>().unwrap();
        let want = [4.0f32, 5.0, 6.0, 7.0, 4.0, 5.0, 6.0, 7.0];
        assert!(out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5), "{out:?}");
    }

    #[test]
    fn bias_masks_keys() {
        let dev = CpuDevice::default();
        let q = Tensor::<CpuBackend, 4>::zeros([1, 1, 1, 2], &dev);
        let k = Tensor::<CpuBackend, 4>::zeros([1, 1, 2, 2], &dev);
        let v = Tensor::<CpuBackend, 4>::from_data(TensorData::new(vec![1.0f32, 1.0, 3.0, 3.0], [1, 1, 2, 2]), &dev);
        let bias = Tensor::<CpuBackend, 4>::from_data(TensorData::new(vec![0.0f32, -1e9], [1, 1, 1, 2]), &dev);
        let out = attention(q, k, v, Some(bias), Some(1.0)).into_data().to_vec::<f32>().unwrap();
        assert_eq!(out, vec![1.0, 1.0]);
    }
}
