//! One matrix product of the kernels' tiles, through `gemm` on one thread (the kernels run
//! their own threads over heads and blocks), as one band of [`crate::matmul`].

use crate::matmul::{band_product, Matrix, Out};

/// A read-only matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major rows of `cols` values starting at `data[0]`.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of [`View::rows`]: element `(r, c)` is `data[c * cols + r]`.
    pub fn rows_transposed(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = alpha * a b` (`accumulate`: `dst += alpha * a b`) for `a` `m x k`, `b` `k x n`, `dst`
/// `m x n` row-major with rows `dst_rs` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: View<'_>,
    b: View<'_>,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len() && n <= dst_rs && a.fits(m, k) && b.fits(k, n),
        "matmul operands out of bounds"
    );
    let (a, b) = (
        Matrix {
            data: a.data,
            rows: m,
            cols: k,
            rs: a.rs,
            cs: a.cs,
        },
        Matrix {
            data: b.data,
            rows: k,
            cols: n,
            rs: b.rs,
            cs: b.cs,
        },
    );
    // SAFETY: every element the product reads or writes is inside its slice (checked above);
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe { band_product(a, b, None, alpha, Out(dst.as_mut_ptr()), dst_rs, accumulate) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_equals_the_triple_loop_with_transposes_and_accumulation() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 2.0).collect(); // b^T, n x k
        let mut dst = vec![1.0f32; m * 9]; // rows 9 apart
        matmul(
            m,
            n,
            k,
            &mut dst,
            9,
            true,
            View::rows(&a, k),
            View::rows_transposed(&bt, k),
            2.0,
        );
        for r in 0..m {
            for c in 0..9 {
                let want = if c < n {
                    1.0 + 2.0 * (0..k).map(|i| a[r * k + i] * bt[c * k + i]).sum::<f32>()
                } else {
                    1.0
                };
                assert_eq!(dst[r * 9 + c], want, "({r}, {c})");
            }
        }
    }
}
