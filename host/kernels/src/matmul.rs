//! Matrix products of any strides on rayon's threads, into a fresh buffer.
//!
//! The output is cut into one band of rows (or of columns, when it is wider than tall) per
//! thread and each band is one single-threaded `gemm` call, which packs its own operands: no
//! serial packing between parallel sections, and the buffer is written once (never zeroed
//! first). A bias, when given, is copied into each output row before the product accumulates
//! onto it, so `x W^T + b` costs one pass.

use rayon::prelude::*;

/// A read-only matrix: element `(r, c)` is `data[r * rs + c * cs]` (a transpose is a swap of
/// the two strides, no copy).
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Matrix<'a> {
    /// Row-major `rows x cols` values at the start of `data`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Matrix {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (a view).
    pub fn t(self) -> Self {
        Matrix {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Panics unless every element lies inside `data`.
    fn check(&self, what: &str) {
        let last = if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        };
        assert!(
            last <= self.data.len(),
            "matmul: {what} ({} x {}, strides {} and {}) reaches past its {} values",
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.data.len()
        );
    }
}

/// Products below this many multiply-adds run on the calling thread (a band would be too
/// small to pay for the hand-off).
const PARALLEL_MACS: usize = 1 << 20;
/// Bands are whole multiples of this many rows or columns (the micro-kernels' register tile).
const BAND_ALIGN: usize = 16;

/// A raw output pointer handed to the band tasks; each task writes a disjoint band.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: the tasks write disjoint elements (see `product`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer `offset` elements on (a method, so that closures capture the whole `Out`).
    ///
    /// # Safety
    /// As [`pointer::add`].
    unsafe fn add(self, offset: usize) -> Out {
        Out(self.0.add(offset))
    }
}

/// `a b`, plus `bias[c]` on every row when given: a new row-major `a.rows x b.cols` buffer.
pub fn matmul(a: Matrix<'_>, b: Matrix<'_>, bias: Option<&[f32]>) -> Vec<f32> {
    let mut out = Vec::new();
    matmul_append(&mut out, a, b, bias);
    out
}

/// `a b` (plus `bias[c]` on every row when given) appended to `buf` as `a.rows` more rows of
/// `b.cols` values: chunks of an output written in turn, or a scratch buffer refilled (after
/// `clear`) without a new allocation.
pub fn matmul_append(buf: &mut Vec<f32>, a: Matrix<'_>, b: Matrix<'_>, bias: Option<&[f32]>) {
    let (start, len) = (buf.len(), a.rows * b.cols);
    buf.reserve(len);
    // SAFETY: `product` writes each of the `len` elements past `start` (overwriting, or onto
    // the bias it first copies there) before `set_len` exposes them.
    unsafe {
        product(
            a,
            b,
            bias,
            1.0,
            Out(buf.as_mut_ptr().add(start)),
            b.cols,
            false,
        );
        buf.set_len(start + len);
    }
}

/// `out = a b` (`accumulate`: `out += a b`) into a row-major `a.rows x b.cols` buffer.
pub fn matmul_into(a: Matrix<'_>, b: Matrix<'_>, out: &mut [f32], accumulate: bool) {
    matmul_scaled_into(a, b, 1.0, out, accumulate)
}

/// `out = alpha a b` (`accumulate`: `out += alpha a b`) into a row-major `a.rows x b.cols`
/// buffer.
pub fn matmul_scaled_into(
    a: Matrix<'_>,
    b: Matrix<'_>,
    alpha: f32,
    out: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(
        out.len(),
        a.rows * b.cols,
        "matmul: the output's length for {} x {}",
        a.rows,
        b.cols
    );
    // SAFETY: `out` is a live, exclusively borrowed buffer of the output's size.
    unsafe { product(a, b, None, alpha, Out(out.as_mut_ptr()), b.cols, accumulate) }
}

/// `alpha` times the product into `out` (row-major, rows `out_rs` apart), split into bands on
/// rayon's threads.
///
/// # Safety
/// `out` must be valid for writes of the `a.rows x b.cols` output (and for reads where
/// `accumulate`).
unsafe fn product(
    a: Matrix<'_>,
    b: Matrix<'_>,
    bias: Option<&[f32]>,
    alpha: f32,
    out: Out,
    out_rs: usize,
    accumulate: bool,
) {
    assert_eq!(
        a.cols, b.rows,
        "matmul: a is {} x {}, b is {} x {}",
        a.rows, a.cols, b.rows, b.cols
    );
    a.check("a");
    b.check("b");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "matmul: the bias's length");
    }
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let split_rows = m >= n;
    let extent = if split_rows { m } else { n };
    let bands = if m * n * k < PARALLEL_MACS || threads == 1 {
        1
    } else {
        threads.min(extent.div_ceil(BAND_ALIGN))
    };
    let band = extent
        .div_ceil(bands)
        .next_multiple_of(BAND_ALIGN)
        .min(extent);
    let run = |start: usize| {
        let len = band.min(extent - start);
        // SAFETY: the band's rows (or columns) of `a`, `b` and `out` are inside them (checked
        // above), and no two bands share an output element.
        unsafe {
            if split_rows {
                let a = Matrix {
                    data: &a.data[start * a.rs..],
                    rows: len,
                    ..a
                };
                let out = out.add(start * out_rs);
                band_product(a, b, bias, alpha, out, out_rs, accumulate);
            } else {
                let b = Matrix {
                    data: &b.data[start * b.cs..],
                    cols: len,
                    ..b
                };
                let bias = bias.map(|x| &x[start..start + len]);
                band_product(a, b, bias, alpha, out.add(start), out_rs, accumulate);
            }
        }
    };
    if bands == 1 {
        run(0);
    } else {
        (0..extent)
            .step_by(band)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(run);
    }
}

/// One band (or one attention tile, [`crate::tile`]) on this thread.
///
/// # Safety
/// As [`product`], for this band's output.
pub(crate) unsafe fn band_product(
    a: Matrix<'_>,
    b: Matrix<'_>,
    bias: Option<&[f32]>,
    alpha: f32,
    out: Out,
    out_rs: usize,
    accumulate: bool,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let mut read_dst = accumulate;
    if let Some(bias) = bias {
        for r in 0..m {
            let row = out.0.add(r * out_rs);
            if accumulate {
                for (c, &x) in bias.iter().enumerate() {
                    *row.add(c) += x;
                }
            } else {
                std::ptr::copy_nonoverlapping(bias.as_ptr(), row, n);
            }
        }
        read_dst = true;
    }
    if k == 0 {
        if !read_dst {
            for r in 0..m {
                std::ptr::write_bytes(out.0.add(r * out_rs), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        out.0,
        1,
        out_rs as isize,
        read_dst,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values as values;

    /// The triple loop in f64.
    fn naive(a: Matrix<'_>, b: Matrix<'_>, bias: Option<&[f32]>) -> Vec<f64> {
        let mut out = vec![0.0; a.rows * b.cols];
        for r in 0..a.rows {
            for c in 0..b.cols {
                let dot: f64 = (0..a.cols)
                    .map(|i| {
                        a.data[r * a.rs + i * a.cs] as f64 * b.data[i * b.rs + c * b.cs] as f64
                    })
                    .sum();
                out[r * b.cols + c] = dot + bias.map_or(0.0, |x| x[c] as f64);
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: element {i}: {g} against {w}"
            );
        }
    }

    #[test]
    fn products_equal_the_triple_loop_for_every_split_transpose_and_bias() {
        // Below and above the parallel threshold, taller than wide (row bands) and wider than
        // tall (column bands), sizes that are not multiples of the band alignment, k = 0.
        let shapes = [
            (5, 7, 3),
            (300, 70, 130),
            (37, 500, 90),
            (129, 129, 65),
            (64, 3, 0),
        ];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let a_rm = values(m * k, si);
            let a_cm = values(m * k, si + 10); // stored k x m: its transpose is a
            let b_rm = values(k * n, si + 20);
            let b_cm = values(k * n, si + 30);
            let bias = values(n, si + 40);
            let a_views = [
                Matrix::row_major(&a_rm, m, k),
                Matrix::row_major(&a_cm, k, m).t(),
            ];
            let b_views = [
                Matrix::row_major(&b_rm, k, n),
                Matrix::row_major(&b_cm, n, k).t(),
            ];
            for (ai, a) in a_views.iter().enumerate() {
                for (bi, b) in b_views.iter().enumerate() {
                    for bias in [None, Some(&bias[..])] {
                        let what =
                            format!("{m}x{k} @ {k}x{n}, a {ai}, b {bi}, bias {}", bias.is_some());
                        let want = naive(*a, *b, bias);
                        let got = pool.install(|| matmul(*a, *b, bias));
                        assert_close(&got, &want, &what);
                        // Accumulating onto a buffer that already holds the product doubles it.
                        let mut twice = got.clone();
                        pool.install(|| matmul_into(*a, *b, &mut twice, true));
                        let want2: Vec<f64> = want
                            .iter()
                            .enumerate()
                            .map(|(i, w)| 2.0 * w - bias.map_or(0.0, |x| x[i % n] as f64))
                            .collect();
                        assert_close(&twice, &want2, &format!("{what}, accumulated"));
                    }
                }
            }
        }
    }

    #[test]
    fn a_scaled_product_accumulates_onto_the_buffer() {
        let (m, n, k) = (150, 40, 70);
        let (a, b) = (values(m * k, 1), values(k * n, 2));
        let (a, b) = (Matrix::row_major(&a, m, k), Matrix::row_major(&b, k, n));
        let want: Vec<f64> = naive(a, b, None).iter().map(|x| 1.0 - 0.5 * x).collect();
        let mut out = vec![1.0f32; m * n];
        matmul_scaled_into(a, b, -0.5, &mut out, true);
        assert_close(&out, &want, "1 - 0.5 a b");
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (200, 90, 150);
        let (a, b) = (values(m * k, 1), values(k * n, 2));
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    matmul(
                        Matrix::row_major(&a, m, k),
                        Matrix::row_major(&b, k, n),
                        None,
                    )
                })
        };
        assert!(run(1) == run(4));
    }

    #[test]
    #[should_panic(expected = "reaches past")]
    fn an_operand_too_short_for_its_shape_panics() {
        let a = vec![0.0f32; 10];
        let b = vec![0.0f32; 12];
        matmul(
            Matrix::row_major(&a, 3, 4),
            Matrix::row_major(&b, 4, 3),
            None,
        );
    }
}
