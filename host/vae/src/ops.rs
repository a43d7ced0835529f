//! Tensor helpers with PyTorch's exact semantics (nearest interpolation, time pooling, frame views).

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// Nearest-neighbour source indices of PyTorch's `F.interpolate(mode="nearest", size=out)` along one
/// dim: `min(floor(dst * (in / out)), in - 1)` computed in float32 like ATen.
pub fn nearest_indices(input: usize, output: usize) -> Vec<i64> {
    if input == output {
        return (0..output as i64).collect();
    }
    if output == 2 * input {
        return (0..output as i64).map(|i| i >> 1).collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| ((i as f32 * scale).floor() as i64).min(input as i64 - 1))
        .collect()
}

/// `F.interpolate(x, size=size)` (nearest) on the last `N` dims of `x`.
pub fn interpolate_nearest<B: Backend, const D: usize, const N: usize>(
    x: Tensor<B, D>,
    size: [usize; N],
) -> Tensor<B, D> {
    let mut x = x;
    for (k, &out) in size.iter().enumerate() {
        let dim = D - N + k;
        let input = x.dims()[dim];
        if input == out {
            continue;
        }
        if out == 2 * input {
            x = repeat_interleave2(x, dim);
            continue;
        }
        let idx = nearest_indices(input, out);
        let n = idx.len();
        let device = x.device();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &device);
        x = x.select(dim, idx);
    }
    x
}

/// Each element of `dim` twice in a row (nearest upsampling by 2 along `dim`).
pub fn repeat_interleave2<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let dims = x.dims();
    // [.., n, ..] -> [.., n, 1, ..] -> [.., n, 2, ..] -> [.., 2n, ..]
    let mut with_one: Vec<usize> = dims.to_vec();
    with_one.insert(dim + 1, 1);
    let mut expanded = with_one.clone();
    expanded[dim + 1] = 2;
    let mut out = dims;
    out[dim] *= 2;
    match D {
        // One extra rank is needed for the intermediate; burn's ranks are const generics.
        3 => rep::<B, D, 4>(x, &with_one, &expanded, out),
        4 => rep::<B, D, 5>(x, &with_one, &expanded, out),
        5 => rep::<B, D, 6>(x, &with_one, &expanded, out),
        _ => {
            // Generic fallback through select.
            let n = dims[dim];
            let idx: Vec<i64> = (0..2 * n as i64).map(|i| i >> 1).collect();
            let device = x.device();
            x.select(
                dim,
                Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [2 * n]), &device),
            )
        }
    }
}

fn rep<B: Backend, const D: usize, const D1: usize>(
    x: Tensor<B, D>,
    with_one: &[usize],
    expanded: &[usize],
    out: [usize; D],
) -> Tensor<B, D> {
    let w: [usize; D1] = with_one.try_into().expect("rank");
    let e: [usize; D1] = expanded.try_into().expect("rank");
    x.reshape(w).expand(e).reshape(out)
}

/// `F.avg_pool1d(kernel_size=2, stride=2)` along the time dim (2) of `[B, C, T, H, W]`, `T` even.
pub fn avg_pool_time2<B: Backend>(x: Tensor<B, 5>) -> Tensor<B, 5> {
    let [b, c, t, h, w] = x.dims();
    let x6: Tensor<B, 6> = x.reshape([b, c, t / 2, 2, h, w]);
    let s: Tensor<B, 5> = x6.sum_dim(3).reshape([b, c, t / 2, h, w]);
    s / 2.0
}

/// `[B, C, T, H, W] -> [B*T, C, H, W]`, the frame-wise 2D view used by the up/down samplers.
pub fn frames_to_batch<B: Backend>(x: Tensor<B, 5>) -> Tensor<B, 4> {
    let [b, c, t, h, w] = x.dims();
    x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w])
}

/// Inverse of [`frames_to_batch`].
pub fn batch_to_frames<B: Backend>(x: Tensor<B, 4>, b: usize) -> Tensor<B, 5> {
    let [bt, c, h, w] = x.dims();
    x.reshape([b, bt / b, c, h, w]).permute([0, 2, 1, 3, 4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_model_core::{CpuBackend as Cb, CpuDevice};

    fn t<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Cb, D> {
        Tensor::from_data(TensorData::new(data, shape), &CpuDevice::default())
    }

    fn v<const D: usize>(x: Tensor<Cb, D>) -> Vec<f32> {
        x.into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn nearest_indices_match_torch() {
        // torch.nn.functional.interpolate(torch.arange(n)[None,None].float(), size=m) for a few (n, m).
        assert_eq!(nearest_indices(2, 4), vec![0, 0, 1, 1]);
        assert_eq!(nearest_indices(2, 8), vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(nearest_indices(3, 5), vec![0, 0, 1, 1, 2]);
        assert_eq!(nearest_indices(5, 3), vec![0, 1, 3]);
        assert_eq!(nearest_indices(3, 7), vec![0, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn interpolate_and_repeat() {
        let x = t(vec![1.0, 2.0, 3.0], [1, 1, 3]);
        assert_eq!(
            v(repeat_interleave2(x.clone(), 2)),
            vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
        );
        assert_eq!(
            v(interpolate_nearest(x, [5])),
            vec![1.0, 1.0, 2.0, 2.0, 3.0]
        );
        let y = t((0..6).map(|i| i as f32).collect(), [1, 1, 2, 3]);
        let up = interpolate_nearest(y, [4, 6]);
        assert_eq!(up.dims(), [1, 1, 4, 6]);
        assert_eq!(v(up)[..6].to_vec(), vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn avg_pool_time_pairs_frames() {
        let x = t((0..4).map(|i| i as f32).collect(), [1, 1, 4, 1, 1]);
        assert_eq!(v(avg_pool_time2(x)), vec![0.5, 2.5]);
    }
}
