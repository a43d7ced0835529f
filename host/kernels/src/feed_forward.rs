//! The transformer feed-forward `gelu_tanh(x W1^T + b1) W2^T + b2` over a `[rows, D]` input,
//! and its gradients, a chunk of rows at a time.
//!
//! The hidden layer `[rows, F]` only ever exists as one chunk, in scratch buffers reused from
//! chunk to chunk; each chunk's output rows (and its input gradient's) are written once, in
//! place, after the previous chunk's; the weight and bias gradients accumulate into their
//! buffers. Every product is a threaded [`crate::matmul`] band product; bias sums are products
//! with a row of ones. The backward takes the pre-activation `x W1^T + b1` that
//! [`forward_keeping`] returned, or recomputes it chunk by chunk from `x`.

use crate::activation::{gelu_tanh_backward, gelu_tanh_in_place, gelu_tanh_into};
use crate::matmul::{matmul_append, matmul_into, Matrix};

/// The two layers, row-major in PyTorch's layout: `w1 [f, d]`, `b1 [f]`, `w2 [d, f]`,
/// `b2 [d]`.
#[derive(Debug, Clone, Copy)]
pub struct Layers<'a> {
    pub w1: &'a [f32],
    pub b1: &'a [f32],
    pub w2: &'a [f32],
    pub b2: &'a [f32],
    pub d: usize,
    pub f: usize,
}

impl<'a> Layers<'a> {
    /// Panics unless the lengths match `d` and `f`, and returns the rows of `x` (`[rows, d]`).
    fn rows(&self, x: &[f32]) -> usize {
        let (d, f) = (self.d, self.f);
        assert!(
            self.w1.len() == f * d
                && self.b1.len() == f
                && self.w2.len() == d * f
                && self.b2.len() == d,
            "feed_forward: weight lengths for d = {d}, f = {f}"
        );
        assert!(
            d > 0 && x.len() % d == 0,
            "feed_forward: {} values are not rows of {d}",
            x.len()
        );
        x.len() / d
    }

    fn w1(&self) -> Matrix<'a> {
        Matrix::row_major(self.w1, self.f, self.d)
    }

    fn w2(&self) -> Matrix<'a> {
        Matrix::row_major(self.w2, self.d, self.f)
    }
}

/// `(start, len)` of each chunk of at most `chunk_rows` rows.
fn chunks(rows: usize, chunk_rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = chunk_rows.max(1);
    (0..rows)
        .step_by(step)
        .map(move |s| (s, step.min(rows - s)))
}

/// The first `len` values of a scratch buffer, reallocated (zeroed on the threads) when it is
/// shorter: chunks after the first reuse it.
fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        *buf = crate::buffer::par_filled(len, 0.0);
    }
    &mut buf[..len]
}

/// `gelu_tanh(x W1^T + b1) W2^T + b2` for `x [rows, d]`, `chunk_rows` rows at a time.
pub fn forward(x: &[f32], layers: Layers<'_>, chunk_rows: usize) -> Vec<f32> {
    run_forward(x, layers, chunk_rows, None)
}

/// [`forward`], also returning the pre-activation `x W1^T + b1` (`[rows, f]`) for
/// [`backward`], which then skips recomputing it.
pub fn forward_keeping(x: &[f32], layers: Layers<'_>, chunk_rows: usize) -> (Vec<f32>, Vec<f32>) {
    let mut pre = Vec::new();
    let y = run_forward(x, layers, chunk_rows, Some(&mut pre));
    (y, pre)
}

/// The forward; with `keep`, each chunk's pre-activation is appended to it.
fn run_forward(
    x: &[f32],
    layers: Layers<'_>,
    chunk_rows: usize,
    mut keep: Option<&mut Vec<f32>>,
) -> Vec<f32> {
    let rows = layers.rows(x);
    let (d, f) = (layers.d, layers.f);
    let mut out = Vec::with_capacity(rows * d);
    let mut hidden = Vec::new();
    if let Some(pre) = keep.as_deref_mut() {
        pre.reserve_exact(rows * f);
    }
    for (s, len) in chunks(rows, chunk_rows) {
        let xr = Matrix::row_major(&x[s * d..(s + len) * d], len, d);
        let h = match keep.as_deref_mut() {
            Some(pre) => {
                matmul_append(pre, xr, layers.w1().t(), Some(layers.b1));
                let h = scratch(&mut hidden, len * f);
                gelu_tanh_into(&pre[s * f..], h);
                h
            }
            None => {
                hidden.clear();
                matmul_append(&mut hidden, xr, layers.w1().t(), Some(layers.b1));
                gelu_tanh_in_place(&mut hidden);
                &hidden[..]
            }
        };
        let h = Matrix::row_major(h, len, f);
        matmul_append(&mut out, h, layers.w2().t(), Some(layers.b2));
    }
    out
}

/// The gradients of [`forward`] with respect to `[x, w1, b1, w2, b2]`, each where asked.
#[derive(Debug, Default)]
pub struct Grads {
    pub x: Option<Vec<f32>>,
    pub w1: Option<Vec<f32>>,
    pub b1: Option<Vec<f32>>,
    pub w2: Option<Vec<f32>>,
    pub b2: Option<Vec<f32>>,
}

/// `acc += a b`, the first product starting the sum.
fn add_product(acc: &mut Option<Vec<f32>>, a: Matrix<'_>, b: Matrix<'_>) {
    match acc {
        Some(acc) => matmul_into(a, b, acc, true),
        None => {
            let mut v = Vec::new();
            matmul_append(&mut v, a, b, None);
            *acc = Some(v);
        }
    }
}

/// The gradients of [`forward`] given the output's gradient `grad [rows, d]`; `wanted` says
/// which of `[x, w1, b1, w2, b2]` are asked for; `kept` is [`forward_keeping`]'s
/// pre-activation, recomputed chunk by chunk when `None`. Per chunk, the hidden gradient
/// `g W2` becomes the pre-activation's gradient in place, then that buffer takes the hidden
/// layer for `w2`'s gradient.
pub fn backward(
    x: &[f32],
    kept: Option<&[f32]>,
    grad: &[f32],
    layers: Layers<'_>,
    wanted: [bool; 5],
    chunk_rows: usize,
) -> Grads {
    let rows = layers.rows(x);
    assert_eq!(grad.len(), x.len(), "feed_forward: grad and x lengths");
    let (d, f) = (layers.d, layers.f);
    if let Some(kept) = kept {
        assert_eq!(
            kept.len(),
            rows * f,
            "feed_forward: the kept pre-activation's length"
        );
    }
    let ones = vec![1.0f32; rows];
    let sum_rows = |m: Matrix<'_>| Matrix::row_major(&ones[..m.rows], 1, m.rows);
    let mut grads = Grads {
        x: wanted[0].then(|| Vec::with_capacity(rows * d)),
        ..Grads::default()
    };
    let (mut recomputed, mut work) = (Vec::new(), Vec::new());
    let needs_chunks = wanted[..4].iter().any(|&w| w);
    for (s, len) in chunks(rows, chunk_rows).take_while(|_| needs_chunks) {
        let xr = Matrix::row_major(&x[s * d..(s + len) * d], len, d);
        let gr = Matrix::row_major(&grad[s * d..(s + len) * d], len, d);
        let pre: &[f32] = match kept {
            Some(kept) => &kept[s * f..(s + len) * f],
            None => {
                recomputed.clear();
                matmul_append(&mut recomputed, xr, layers.w1().t(), Some(layers.b1));
                &recomputed
            }
        };
        if wanted[..3].iter().any(|&w| w) {
            work.clear();
            matmul_append(&mut work, gr, layers.w2(), None);
            gelu_tanh_backward(pre, &mut work);
            let ga = Matrix::row_major(&work, len, f);
            if wanted[1] {
                add_product(&mut grads.w1, ga.t(), xr);
            }
            if wanted[2] {
                add_product(&mut grads.b1, sum_rows(ga), ga);
            }
            if let Some(gx) = &mut grads.x {
                matmul_append(gx, ga, layers.w1(), None);
            }
        }
        if wanted[3] {
            let h = scratch(&mut work, len * f);
            gelu_tanh_into(pre, h);
            add_product(&mut grads.w2, gr.t(), Matrix::row_major(h, len, f));
        }
    }
    if wanted[4] {
        let g = Matrix::row_major(grad, rows, d);
        add_product(&mut grads.b2, sum_rows(g), g);
    }
    // Zero rows: sums over nothing.
    for (grad, wanted, len) in [
        (&mut grads.w1, wanted[1], f * d),
        (&mut grads.b1, wanted[2], f),
        (&mut grads.w2, wanted[3], d * f),
        (&mut grads.b2, wanted[4], d),
    ] {
        if wanted && grad.is_none() {
            *grad = Some(vec![0.0; len]);
        }
    }
    grads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    fn gelu64(x: f64) -> (f64, f64) {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let t = (k * (x + 0.044715 * x.powi(3))).tanh();
        let du = k * (1.0 + 3.0 * 0.044715 * x * x);
        (
            0.5 * x * (1.0 + t),
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
        )
    }

    /// The forward, its pre-activation and all five gradients by loops in f64:
    /// `(y, pre, [gx, gw1, gb1, gw2, gb2])`.
    fn naive(x: &[f32], g: &[f32], l: Layers<'_>) -> (Vec<f64>, Vec<f64>, [Vec<f64>; 5]) {
        let (d, f) = (l.d, l.f);
        let rows = x.len() / d;
        let mut y = vec![0.0; rows * d];
        let mut pre = vec![0.0; rows * f];
        let mut gx = vec![0.0; rows * d];
        let (mut gw1, mut gb1) = (vec![0.0; f * d], vec![0.0; f]);
        let (mut gw2, mut gb2) = (vec![0.0; d * f], vec![0.0; d]);
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let gr = &g[r * d..(r + 1) * d];
            for j in 0..f {
                let a: f64 = l.b1[j] as f64
                    + (0..d)
                        .map(|i| xr[i] as f64 * l.w1[j * d + i] as f64)
                        .sum::<f64>();
                pre[r * f + j] = a;
                let (h, dh) = gelu64(a);
                let mut gh = 0.0;
                for o in 0..d {
                    y[r * d + o] += h * l.w2[o * f + j] as f64;
                    gh += gr[o] as f64 * l.w2[o * f + j] as f64;
                    gw2[o * f + j] += gr[o] as f64 * h;
                }
                let ga = gh * dh;
                gb1[j] += ga;
                for i in 0..d {
                    gw1[j * d + i] += ga * xr[i] as f64;
                    gx[r * d + i] += ga * l.w1[j * d + i] as f64;
                }
            }
            for o in 0..d {
                y[r * d + o] += l.b2[o] as f64;
                gb2[o] += gr[o] as f64;
            }
        }
        (y, pre, [gx, gw1, gb1, gw2, gb2])
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: element {i}: {g} against {w}"
            );
        }
    }

    #[test]
    fn forward_and_gradients_equal_the_f64_loops_for_any_chunking() {
        // Big enough for the products to split into bands on 3 threads; chunkings of one row,
        // a remainder chunk, exactly the rows, more than the rows; zero rows.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let (d, f) = (48, 200);
        let (w1, b1) = (values(f * d, 1), values(f, 2));
        let (w2, b2) = (values(d * f, 3), values(d, 4));
        let layers = Layers {
            w1: &w1,
            b1: &b1,
            w2: &w2,
            b2: &b2,
            d,
            f,
        };
        for rows in [0, 37, 130] {
            let (x, g) = (values(rows * d, 5), values(rows * d, 6));
            let (y, pre, want) = naive(&x, &g, layers);
            for chunk_rows in [1, 16, 50, rows, 1000] {
                let what = format!("{rows} rows in chunks of {chunk_rows}");
                let got = pool.install(|| forward(&x, layers, chunk_rows));
                assert_close(&got, &y, &format!("y, {what}"));
                let (got, kept) = pool.install(|| forward_keeping(&x, layers, chunk_rows));
                assert_eq!(got, forward(&x, layers, chunk_rows), "keeping, {what}");
                assert_close(&kept, &pre, &format!("kept, {what}"));
                for (mask, keep) in [0b11111u8, 0b00001, 0b00110, 0b01000, 0b10000, 0b01011]
                    .into_iter()
                    .flat_map(|m| [(m, false), (m, true)])
                {
                    let wanted = std::array::from_fn(|i| mask & (1 << i) != 0);
                    let kept = keep.then_some(&kept[..]);
                    let grads = pool.install(|| backward(&x, kept, &g, layers, wanted, chunk_rows));
                    let got = [grads.x, grads.w1, grads.b1, grads.w2, grads.b2];
                    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                        let what = format!("gradient {i}, {what}, wanted {mask:05b}, kept {keep}");
                        match got {
                            Some(got) => {
                                assert!(wanted[i], "{what}: given, not asked for");
                                assert_close(got, want, &what);
                            }
                            None => assert!(!wanted[i], "{what}: asked for, not given"),
                        }
                    }
                }
            }
        }
    }
}
