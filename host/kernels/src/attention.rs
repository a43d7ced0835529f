//! Memory-efficient attention on the CPU: FlashAttention-2's tiling, with each tile's products
//! done by `gemm` and its softmax maths by the vectorised loops of [`crate::simd`].
//!
//! Operands are row-major `f32` slices holding `batch * heads` heads one after another: q
//! `[len_q, head_dim]`, k `[len_k, head_dim]`, v `[len_k, head_dim_v]` per head. The forward
//! keeps, per head, one score tile per thread and returns the output and each row's
//! log-sum-exp; the backward recomputes each tile's probabilities from them. Heads (and in the
//! forward the query blocks of a head) run on rayon's current pool.
//!
//! Same maths as `cogvx_model_core::attention::flash` (the burn-op version other backends run):
//! scores `scale * q k^T + bias`, rows whose every score is `-inf` give zeros.

use crate::simd;
use crate::tile::{matmul, View};
use rayon::prelude::*;

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
}

impl Dims {
    fn batch_heads(&self) -> usize {
        self.batch * self.heads
    }

    /// Panics unless q, k, v (and the bias, if any) have this shape's lengths.
    fn check_operands(&self, q: &[f32], k: &[f32], v: &[f32], bias: Option<&Bias<'_>>) {
        if let Some(b) = bias {
            b.check(self);
        }
        let bh = self.batch_heads();
        assert_eq!(
            q.len(),
            bh * self.len_q * self.head_dim,
            "attention: q's length"
        );
        assert_eq!(
            k.len(),
            bh * self.len_k * self.head_dim,
            "attention: k's length"
        );
        assert_eq!(
            v.len(),
            bh * self.len_k * self.head_dim_v,
            "attention: v's length"
        );
    }

    /// Nothing to compute: every output is empty or zero.
    fn is_degenerate(&self) -> bool {
        self.batch_heads() == 0 || self.len_q == 0 || self.len_k == 0 || self.head_dim_v == 0
    }
}

/// An additive bias, broadcast to `[batch, heads, len_q, len_k]` by its strides: element
/// `(b, h, i, j)` is `values[b * s0 + h * s1 + i * s2 + j * s3]`, a stride 0 along an axis the
/// bias broadcasts over.
#[derive(Debug, Clone, Copy)]
pub struct Bias<'a> {
    pub values: &'a [f32],
    pub strides: [usize; 4],
}

impl Bias<'_> {
    fn check(&self, dims: &Dims) {
        let last = [dims.batch, dims.heads, dims.len_q, dims.len_k]
            .iter()
            .zip(self.strides)
            .map(|(&n, s)| n.saturating_sub(1) * s)
            .sum::<usize>();
        assert!(
            dims.is_degenerate() || last < self.values.len(),
            "attention: bias strides {:?} reach past its {} values",
            self.strides,
            self.values.len()
        );
    }

    /// Adds the bias of head `bh` (`b * heads + h`), query row `i`, keys `j0..j0 + row.len()`.
    fn add_to(&self, row: &mut [f32], heads: usize, bh: usize, i: usize, j0: usize) {
        let [s0, s1, s2, s3] = self.strides;
        let at = (bh / heads) * s0 + (bh % heads) * s1 + i * s2 + j0 * s3;
        if s3 == 0 {
            let b = self.values[at];
            row.iter_mut().for_each(|x| *x += b);
        } else {
            let src = &self.values[at..];
            row.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x += src[j * s3]);
        }
    }
}

/// Query rows and key columns per tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    pub q: usize,
    pub k: usize,
}

impl Tiles {
    /// The forward's tiles, 256 query rows by 512 keys (PyTorch's CPU flash attention splits
    /// these lengths the same way): one 512 KiB score tile per thread, and each key block,
    /// packed once per product, serves twice the rows of [`Tiles::BACKWARD`]'s. Measured
    /// against 128 x 256 at M's shape (8 heads, 2,374 tokens, 2 threads): a 9% faster forward.
    pub const FORWARD: Tiles = Tiles { q: 256, k: 512 };

    /// The backward's tiles, 128 query rows by 256 keys: a score tile is 128 KiB, so its two
    /// tiles (probabilities and their gradient) and the blocks they multiply stay in a core's
    /// L2 cache. Measured against 64 x 512 (the same tile size): a 5-7% faster backward at M's
    /// and a 2B block's shapes (twice the rows per product halve the packing of each key
    /// block); against 256 x 512, the same time.
    pub const BACKWARD: Tiles = Tiles { q: 128, k: 256 };

    /// No cap: [`Inputs::max_tiles`] that leaves the kernel its own tiles.
    pub const UNCAPPED: Tiles = Tiles {
        q: usize::MAX,
        k: usize::MAX,
    };

    /// These tiles, each side at most `cap`'s (and at least 1).
    pub fn capped(self, cap: Tiles) -> Tiles {
        Tiles {
            q: self.q.min(cap.q).max(1),
            k: self.k.min(cap.k).max(1),
        }
    }
}

/// The output `[heads, len_q, head_dim_v]` and the natural log of each row's softmax
/// denominator `[heads, len_q]`.
pub struct Forward {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Gradients with respect to q, k and v (the shapes of the operands).
pub struct Grads {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// `(start, len)` of consecutive blocks of `block` covering `0..len`.
fn blocks(len: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(block.max(1))
        .map(move |s| (s, block.min(len - s)))
}

/// One attention call: the operands (laid out as the module doc says), their shape, the score
/// scale and the largest tiles the caller allows (the forward runs [`Tiles::FORWARD`], the
/// backward [`Tiles::BACKWARD`], each capped by them; tests ask for small tiles).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub bias: Option<Bias<'a>>,
    pub dims: Dims,
    pub scale: f32,
    pub max_tiles: Tiles,
}

/// Attention forward: `softmax(scale * q k^T + bias) v` and the rows' log-sum-exp.
pub fn forward(x: Inputs<'_>) -> Forward {
    let Inputs {
        q,
        k,
        v,
        bias,
        dims,
        scale,
        max_tiles,
    } = x;
    dims.check_operands(q, k, v, bias.as_ref());
    let Dims {
        heads,
        len_q: lq,
        len_k: lk,
        head_dim: d,
        head_dim_v: dv,
        ..
    } = dims;
    let bh = dims.batch_heads();
    let tiles = Tiles::FORWARD.capped(max_tiles);
    let mut out = crate::buffer::par_filled(bh * lq * dv, 0.0);
    let mut lse = vec![f32::NEG_INFINITY; bh * lq];
    if dims.is_degenerate() {
        return Forward { out, lse };
    }
    let tq = tiles.q;
    out.par_chunks_mut(lq * dv)
        .zip(lse.par_chunks_mut(lq))
        .enumerate()
        .for_each(|(h, (out_h, lse_h))| {
            let q_h = &q[h * lq * d..(h + 1) * lq * d];
            let k_h = &k[h * lk * d..(h + 1) * lk * d];
            let v_h = &v[h * lk * dv..(h + 1) * lk * dv];
            out_h
                .par_chunks_mut(tq * dv)
                .zip(lse_h.par_chunks_mut(tq))
                .enumerate()
                .for_each(|(i, (out_i, lse_i))| {
                    let q0 = i * tq;
                    let q_i = &q_h[q0 * d..(q0 + lse_i.len()) * d];
                    let rows = RowBias {
                        bias: bias.as_ref(),
                        heads,
                        bh: h,
                        q0,
                    };
                    forward_block(q_i, k_h, v_h, rows, dims, scale, tiles.k, out_i, lse_i);
                });
        });
    Forward { out, lse }
}

/// The bias rows of one head from query row `q0` on.
#[derive(Clone, Copy)]
struct RowBias<'a> {
    bias: Option<&'a Bias<'a>>,
    heads: usize,
    bh: usize,
    q0: usize,
}

impl RowBias<'_> {
    fn add(&self, row: &mut [f32], r: usize, k0: usize) {
        if let Some(b) = self.bias {
            b.add_to(row, self.heads, self.bh, self.q0 + r, k0);
        }
    }
}

/// One block of query rows against every key: the online softmax over key tiles.
#[allow(clippy::too_many_arguments)]
fn forward_block(
    q_i: &[f32],
    k_h: &[f32],
    v_h: &[f32],
    bias: RowBias<'_>,
    dims: Dims,
    scale: f32,
    tk: usize,
    out_i: &mut [f32],
    lse_i: &mut [f32],
) {
    let (d, dv, lk) = (dims.head_dim, dims.head_dim_v, dims.len_k);
    let qn = lse_i.len();
    let tk = tk.max(1).min(lk);
    let mut s = vec![0.0f32; qn * tk];
    // Running row maximum (clamped to f32::MIN, so masked rows stay finite) and denominator;
    // `out_i` accumulates the unnormalised output.
    let mut m = vec![f32::MIN; qn];
    let mut l = vec![0.0f32; qn];
    for (k0, kn) in blocks(lk, tk) {
        let s = &mut s[..qn * kn];
        let k_j = View::rows_transposed(&k_h[k0 * d..(k0 + kn) * d], d);
        matmul(qn, kn, d, s, kn, false, View::rows(q_i, d), k_j, scale);
        for r in 0..qn {
            let row = &mut s[r * kn..(r + 1) * kn];
            bias.add(row, r, k0);
            let m_new = simd::max(row, m[r]);
            let alpha = simd::exp(m[r] - m_new);
            let sum = simd::exp_shifted_sum(row, m_new);
            l[r] = l[r] * alpha + sum;
            if alpha != 1.0 {
                simd::scale(&mut out_i[r * dv..(r + 1) * dv], alpha);
            }
            m[r] = m_new;
        }
        let v_j = View::rows(&v_h[k0 * dv..(k0 + kn) * dv], dv);
        matmul(qn, dv, kn, out_i, dv, true, View::rows(s, kn), v_j, 1.0);
    }
    for r in 0..qn {
        let lr = l[r].max(f32::MIN_POSITIVE);
        out_i[r * dv..(r + 1) * dv]
            .iter_mut()
            .for_each(|x| *x /= lr);
        lse_i[r] = m[r] + lr.ln();
    }
}

/// Attention backward from [`forward`]'s output and log-sum-exp: the gradients of q, k and v for
/// the output's gradient `grad_out`. Heads run in parallel; within a head, key blocks outside
/// and query blocks inside (FlashAttention-2), so each key block's dK and dV stay in cache.
pub fn backward(x: Inputs<'_>, out: &[f32], lse: &[f32], grad_out: &[f32]) -> Grads {
    let Inputs {
        q,
        k,
        v,
        bias,
        dims,
        scale,
        max_tiles,
    } = x;
    dims.check_operands(q, k, v, bias.as_ref());
    let Dims {
        heads,
        len_q: lq,
        len_k: lk,
        head_dim: d,
        head_dim_v: dv,
        ..
    } = dims;
    let bh = dims.batch_heads();
    assert_eq!(
        out.len(),
        bh * lq * dv,
        "attention backward: the output's length"
    );
    assert_eq!(
        grad_out.len(),
        bh * lq * dv,
        "attention backward: the gradient's length"
    );
    assert_eq!(
        lse.len(),
        bh * lq,
        "attention backward: the log-sum-exp's length"
    );
    let mut grads = Grads {
        q: crate::buffer::par_filled(bh * lq * d, 0.0),
        k: crate::buffer::par_filled(bh * lk * d, 0.0),
        v: crate::buffer::par_filled(bh * lk * dv, 0.0),
    };
    if dims.is_degenerate() || d == 0 {
        return grads;
    }
    let tiles = Tiles::BACKWARD.capped(max_tiles);
    let (tq, tk) = (tiles.q.min(lq), tiles.k.min(lk));
    grads
        .q
        .par_chunks_mut(lq * d)
        .zip(grads.k.par_chunks_mut(lk * d))
        .zip(grads.v.par_chunks_mut(lk * dv))
        .enumerate()
        .for_each(|(h, ((dq_h, dk_h), dv_h))| {
            let head = Head {
                q: &q[h * lq * d..(h + 1) * lq * d],
                k: &k[h * lk * d..(h + 1) * lk * d],
                v: &v[h * lk * dv..(h + 1) * lk * dv],
                out: &out[h * lq * dv..(h + 1) * lq * dv],
                grad_out: &grad_out[h * lq * dv..(h + 1) * lq * dv],
                lse: &lse[h * lq..(h + 1) * lq],
            };
            let rows = RowBias {
                bias: bias.as_ref(),
                heads,
                bh: h,
                q0: 0,
            };
            backward_head(head, rows, dims, scale, (tq, tk), dq_h, dk_h, dv_h);
        });
    grads
}

/// One head's operands, as the backward reads them.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    grad_out: &'a [f32],
    lse: &'a [f32],
}

#[allow(clippy::too_many_arguments)]
fn backward_head(
    x: Head<'_>,
    bias: RowBias<'_>,
    dims: Dims,
    scale: f32,
    (tq, tk): (usize, usize),
    dq: &mut [f32],
    dk: &mut [f32],
    dvs: &mut [f32],
) {
    let (lq, lk, d, dv) = (dims.len_q, dims.len_k, dims.head_dim, dims.head_dim_v);
    // D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij.
    let delta: Vec<f32> = (0..lq)
        .map(|i| {
            simd::dot(
                &x.grad_out[i * dv..(i + 1) * dv],
                &x.out[i * dv..(i + 1) * dv],
            )
        })
        .collect();
    let mut p = vec![0.0f32; tq * tk];
    let mut dp = vec![0.0f32; tq * tk];
    for (k0, kn) in blocks(lk, tk) {
        let k_j = &x.k[k0 * d..(k0 + kn) * d];
        let v_j = &x.v[k0 * dv..(k0 + kn) * dv];
        let dk_j = &mut dk[k0 * d..(k0 + kn) * d];
        let dv_j = &mut dvs[k0 * dv..(k0 + kn) * dv];
        for (q0, qn) in blocks(lq, tq) {
            let q_i = &x.q[q0 * d..(q0 + qn) * d];
            let do_i = &x.grad_out[q0 * dv..(q0 + qn) * dv];
            let (p, dp) = (&mut p[..qn * kn], &mut dp[..qn * kn]);
            // P = exp(scale * Q_i K_j^T + bias - lse_i)
            matmul(
                qn,
                kn,
                d,
                p,
                kn,
                false,
                View::rows(q_i, d),
                View::rows_transposed(k_j, d),
                scale,
            );
            for r in 0..qn {
                let row = &mut p[r * kn..(r + 1) * kn];
                bias.add(row, q0 + r, k0);
                simd::exp_shifted(row, x.lse[q0 + r]);
            }
            // dV_j += P^T dO_i
            matmul(
                kn,
                dv,
                qn,
                dv_j,
                dv,
                true,
                View::rows_transposed(p, kn),
                View::rows(do_i, dv),
                1.0,
            );
            // dP = dO_i V_j^T, then dS = P * (dP - D_i) in place
            matmul(
                qn,
                kn,
                dv,
                dp,
                kn,
                false,
                View::rows(do_i, dv),
                View::rows_transposed(v_j, dv),
                1.0,
            );
            for r in 0..qn {
                simd::softmax_grad(
                    &p[r * kn..(r + 1) * kn],
                    &mut dp[r * kn..(r + 1) * kn],
                    delta[q0 + r],
                );
            }
            // dQ_i += scale dS K_j; dK_j += scale dS^T Q_i
            let dq_i = &mut dq[q0 * d..(q0 + qn) * d];
            matmul(
                qn,
                d,
                kn,
                dq_i,
                d,
                true,
                View::rows(dp, kn),
                View::rows(k_j, d),
                scale,
            );
            matmul(
                kn,
                d,
                qn,
                dk_j,
                d,
                true,
                View::rows_transposed(dp, kn),
                View::rows(q_i, d),
                scale,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-amp, amp).
    fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    /// The kernel's forward and backward for one call.
    #[allow(clippy::too_many_arguments)]
    fn run(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: Option<Bias<'_>>,
        dims: Dims,
        scale: f32,
        grad_out: &[f32],
        tiles: Tiles,
    ) -> (Forward, Grads) {
        let x = Inputs {
            q,
            k,
            v,
            bias,
            dims,
            scale,
            max_tiles: tiles,
        };
        let f = forward(x);
        let b = backward(x, &f.out, &f.lse, grad_out);
        (f, b)
    }

    fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y.powi(2)).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// The textbook attention and its gradients in f64: (out, dq, dk, dv).
    #[allow(clippy::type_complexity)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: Option<&Bias<'_>>,
        g: &[f32],
        dims: Dims,
        scale: f32,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let Dims {
            heads,
            len_q: lq,
            len_k: lk,
            head_dim: d,
            head_dim_v: dv,
            ..
        } = dims;
        let bh = dims.batch_heads();
        let (mut out, mut dq) = (vec![0.0; bh * lq * dv], vec![0.0; bh * lq * d]);
        let (mut dk, mut dvv) = (vec![0.0; bh * lk * d], vec![0.0; bh * lk * dv]);
        for h in 0..bh {
            for i in 0..lq {
                let mut s: Vec<f64> = (0..lk)
                    .map(|j| {
                        let dotp: f64 = (0..d)
                            .map(|c| {
                                q[(h * lq + i) * d + c] as f64 * k[(h * lk + j) * d + c] as f64
                            })
                            .sum();
                        let b = bias.map_or(0.0, |b| {
                            let [s0, s1, s2, s3] = b.strides;
                            b.values[(h / heads) * s0 + (h % heads) * s1 + i * s2 + j * s3] as f64
                        });
                        dotp * scale as f64 + b
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // fully masked: zeros
                }
                s.iter_mut().for_each(|x| *x = (*x - m).exp());
                let sum: f64 = s.iter().sum();
                let p: Vec<f64> = s.iter().map(|x| x / sum).collect();
                let go = |c: usize| g[(h * lq + i) * dv + c] as f64;
                let vv = |j: usize, c: usize| v[(h * lk + j) * dv + c] as f64;
                for c in 0..dv {
                    out[(h * lq + i) * dv + c] = (0..lk).map(|j| p[j] * vv(j, c)).sum();
                }
                let dp: Vec<f64> = (0..lk)
                    .map(|j| (0..dv).map(|c| go(c) * vv(j, c)).sum())
                    .collect();
                let delta: f64 = (0..lk).map(|j| p[j] * dp[j]).sum();
                for j in 0..lk {
                    let ds = p[j] * (dp[j] - delta) * scale as f64;
                    for c in 0..d {
                        dq[(h * lq + i) * d + c] += ds * k[(h * lk + j) * d + c] as f64;
                        dk[(h * lk + j) * d + c] += ds * q[(h * lq + i) * d + c] as f64;
                    }
                    for c in 0..dv {
                        dvv[(h * lk + j) * dv + c] += p[j] * go(c);
                    }
                }
            }
        }
        (out, dq, dk, dvv)
    }

    #[test]
    fn forward_and_backward_equal_the_textbook_formula() {
        // Lengths that are not multiples of the tiles, cross-attention, Dv != D, one head.
        let shapes = [
            (2, 3, 37, 37, 16, 16),
            (1, 2, 50, 23, 8, 8),
            (2, 1, 5, 70, 32, 12),
            (1, 1, 130, 600, 64, 64),
        ];
        let tilings = [
            Tiles { q: 1, k: 1 },
            Tiles { q: 3, k: 4 },
            Tiles { q: 16, k: 32 },
            Tiles::UNCAPPED,
        ];
        for (si, &(batch, heads, lq, lk, d, dv)) in shapes.iter().enumerate() {
            let dims = Dims {
                batch,
                heads,
                len_q: lq,
                len_k: lk,
                head_dim: d,
                head_dim_v: dv,
            };
            let bh = batch * heads;
            let seed = si as u64 * 10;
            let q = values(bh * lq * d, seed + 1, 2.0);
            let k = values(bh * lk * d, seed + 2, 2.0);
            let v = values(bh * lk * dv, seed + 3, 1.0);
            let g = values(bh * lq * dv, seed + 4, 1.0);
            let full = values(bh * lq * lk, seed + 5, 3.0);
            // No bias; a full one; one per head (broadcast over the batch); a key mask.
            let biases = [
                None,
                Some(Bias {
                    values: &full,
                    strides: [heads * lq * lk, lq * lk, lk, 1],
                }),
                Some(Bias {
                    values: &full,
                    strides: [0, lq * lk, lk, 1],
                }),
                Some(Bias {
                    values: &full,
                    strides: [lk, 0, 0, 1],
                }),
            ];
            let scale = 1.0 / (d as f32).sqrt();
            for bias in biases {
                let (out_w, dq_w, dk_w, dv_w) = naive(&q, &k, &v, bias.as_ref(), &g, dims, scale);
                for tiles in tilings {
                    let (f, b) = run(&q, &k, &v, bias, dims, scale, &g, tiles);
                    let what = format!(
                        "shape {si} tiles {tiles:?} bias {:?}",
                        bias.map(|b| b.strides)
                    );
                    assert!(
                        rel_l2(&f.out, &out_w) < 1e-6,
                        "out: {what}: {:e}",
                        rel_l2(&f.out, &out_w)
                    );
                    for (name, got, want) in
                        [("q", &b.q, &dq_w), ("k", &b.k, &dk_w), ("v", &b.v, &dv_w)]
                    {
                        let err = rel_l2(got, want);
                        assert!(err < 1e-5, "d{name}: {what}: {err:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn fully_masked_rows_give_zeros_and_no_nan() {
        let dims = Dims {
            batch: 1,
            heads: 1,
            len_q: 4,
            len_k: 6,
            head_dim: 8,
            head_dim_v: 8,
        };
        let (q, k, v) = (values(32, 1, 1.0), values(48, 2, 1.0), values(48, 3, 1.0));
        let mut mask = vec![0.0f32; 24];
        mask[12..18].fill(f32::NEG_INFINITY); // row 2 sees no key
        let bias = Some(Bias {
            values: &mask,
            strides: [0, 0, 6, 1],
        });
        let g = values(32, 4, 1.0);
        let (f, b) = run(&q, &k, &v, bias, dims, 0.3, &g, Tiles { q: 3, k: 4 });
        assert!(
            f.out.iter().chain(&f.lse).all(|x| x.is_finite()),
            "{:?}",
            f.out
        );
        assert!(f.out[16..24].iter().all(|&x| x == 0.0));
        assert!(b.q.iter().chain(&b.k).chain(&b.v).all(|x| x.is_finite()));
        assert!(b.q[16..24].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let dims = Dims {
            batch: 1,
            heads: 3,
            len_q: 200,
            len_k: 300,
            head_dim: 16,
            head_dim_v: 16,
        };
        let (q, k, v) = (
            values(9600, 1, 1.0),
            values(14400, 2, 1.0),
            values(14400, 3, 1.0),
        );
        let g = values(9600, 4, 1.0);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (f, b) = run(&q, &k, &v, None, dims, 0.25, &g, Tiles::UNCAPPED);
                (f.out, f.lse, b.q, b.k, b.v)
            })
        };
        assert!(run(1) == run(3));
    }
}
