//! Layer normalisation over the last axis (no affine part) and its gradient, row by row in
//! vectorised loops, blocks of rows on rayon's threads. Same maths as
//! `cogvx_model_core::nn::layer_norm` (torch's CPU kernel): `(x - mean) * rstd` with
//! `rstd = 1 / sqrt(var + eps)`, the biased variance of the centred row.

use rayon::prelude::*;

/// Rows per rayon task (at least one task per 16 Ki values).
fn rows_per_task(row: usize) -> usize {
    (16_384 / row.max(1)).max(1)
}

/// `(mean, rstd)` of one row.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = crate::simd::sum(x) / n;
    let var = crate::simd::centred_sq_sum(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `x` (rows of `row` values) normalised row by row.
pub fn layer_norm(x: &[f32], row: usize, eps: f32) -> Vec<f32> {
    assert!(
        row > 0 && x.len() % row == 0,
        "layer_norm: {} values in rows of {row}",
        x.len()
    );
    let chunk = rows_per_task(row) * row;
    crate::buffer::par_new(x.len(), chunk, 0.0, |i, y| {
        let x = &x[i * chunk..i * chunk + y.len()];
        for (y, x) in y.chunks_exact_mut(row).zip(x.chunks_exact(row)) {
            let (mean, rstd) = moments(x, eps);
            crate::simd::shift_scale(x, mean, rstd, y);
        }
    })
}

/// The gradient of [`layer_norm`] at `x` for the output's gradient `grad`, written over `grad`:
/// `rstd * (g - mean(g) - x_hat * mean(g * x_hat))` per row, the moments recomputed from `x`.
pub fn layer_norm_backward(x: &[f32], grad: &mut [f32], row: usize, eps: f32) {
    assert!(
        row > 0 && x.len() % row == 0,
        "layer_norm_backward: {} values in rows of {row}",
        x.len()
    );
    assert_eq!(
        x.len(),
        grad.len(),
        "layer_norm_backward: x and grad lengths"
    );
    let chunk = rows_per_task(row) * row;
    grad.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(g, x)| {
            for (g, x) in g.chunks_exact_mut(row).zip(x.chunks_exact(row)) {
                let n = row as f32;
                let (mean, rstd) = moments(x, eps);
                let (g_sum, gx_sum) = crate::simd::grad_sums(g, x, mean, rstd);
                crate::simd::norm_grad(g, x, mean, rstd, g_sum / n, gx_sum / n);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook normalisation and its gradient in f64.
    fn naive(x: &[f32], g: &[f32], row: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut dx) = (Vec::new(), Vec::new());
        for (x, g) in x.chunks(row).zip(g.chunks(row)) {
            let n = row as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let rstd = 1.0 / (var + eps).sqrt();
            let xh: Vec<f64> = x.iter().map(|&v| (v as f64 - mean) * rstd).collect();
            let gm = g.iter().map(|&v| v as f64).sum::<f64>() / n;
            let gxm = g.iter().zip(&xh).map(|(&g, h)| g as f64 * h).sum::<f64>() / n;
            y.extend(xh.iter().copied());
            dx.extend(
                g.iter()
                    .zip(&xh)
                    .map(|(&g, h)| rstd * (g as f64 - gm - h * gxm)),
            );
        }
        (y, dx)
    }

    #[test]
    fn layer_norm_and_its_gradient_equal_the_f64_formula() {
        // Rows shorter and longer than a vector, with tails, offsets and scales that differ,
        // and more rows than one task holds.
        for (rows, row) in [(3, 5), (700, 64), (9, 100), (2, 1)] {
            let x: Vec<f32> = (0..rows * row)
                .map(|i| ((i * 37) % 101) as f32 * 0.05 * (1 + i / row) as f32 + (i / row) as f32)
                .collect();
            let g: Vec<f32> = (0..rows * row)
                .map(|i| ((i * 13) % 7) as f32 - 3.0)
                .collect();
            let (yw, dw) = naive(&x, &g, row, 1e-5);
            let y = layer_norm(&x, row, 1e-5);
            let mut dx = g.clone();
            layer_norm_backward(&x, &mut dx, row, 1e-5);
            for i in 0..x.len() {
                assert!(
                    (y[i] as f64 - yw[i]).abs() < 2e-5 * (1.0 + yw[i].abs()),
                    "y[{i}] {rows}x{row}: {} vs {}",
                    y[i],
                    yw[i]
                );
                assert!(
                    (dx[i] as f64 - dw[i]).abs() < 1e-4 * (1.0 + dw[i].abs()),
                    "dx[{i}] {rows}x{row}: {} vs {}",
                    dx[i],
                    dw[i]
                );
            }
        }
    }
}
