//! The FlashAttention-2 algorithm written with burn tensor operations, so every backend runs it.
//!
//! The forward walks query blocks and, inside each, key blocks with an online softmax; it keeps
//! only the output and the per-row log-sum-exp. The backward recomputes each score tile from q,
//! k and the log-sum-exp. Nothing of size `len_q x len_k` is ever held, only one
//! `[batch, heads, block_q, block_k]` tile (and an additive bias, which the caller owns).

use burn::tensor::{backend::Backend, Tensor};

/// Tile sizes of the blocked attention (query rows and key columns per tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Query rows per tile.
    pub q: usize,
    /// Key columns per tile.
    pub k: usize,
}

/// Elements of one score tile `[batch, heads, block_q, block_k]` the default sizes aim for
/// (64 MiB in f32): large enough that a tile's matmuls run at full speed, small next to the
/// activations of a real-size block. The backward holds about four tiles at once.
pub const TILE_ELEMENTS: usize = 1 << 24;
/// Key columns per tile at most, by default.
pub const MAX_BLOCK_K: usize = 2048;

impl BlockSizes {
    /// The default tiling for `batch * heads` score matrices of `len_q x len_k`: keys in blocks
    /// of at most [`MAX_BLOCK_K`], as many query rows as keep a tile within [`TILE_ELEMENTS`]
    /// (a multiple of 16, at least 16). Short sequences are one tile: plain softmax attention.
    pub fn for_shape(batch_heads: usize, len_q: usize, len_k: usize) -> Self {
        let k = len_k.clamp(1, MAX_BLOCK_K);
        let rows = TILE_ELEMENTS / (batch_heads.max(1) * k);
        let q = if rows >= len_q {
            len_q.max(1)
        } else {
            (rows / 16 * 16).max(16)
        };
        BlockSizes { q, k }
    }
}

/// `(start, len)` of consecutive blocks of `block` covering `0..len` (the last may be shorter).
fn blocks(len: usize, block: usize) -> Vec<(usize, usize)> {
    (0..len)
        .step_by(block.max(1))
        .map(|s| (s, block.min(len - s)))
        .collect()
}

/// The additive bias's tile for query block `q` and key block `k`: a bias dim of size 1
/// broadcasts over that axis and is not sliced.
fn bias_tile<B: Backend>(
    bias: &Tensor<B, 4>,
    q: (usize, usize),
    k: (usize, usize),
) -> Tensor<B, 4> {
    let [_, _, bq, bk] = bias.dims();
    let mut t = bias.clone();
    if bq != 1 {
        t = t.narrow(2, q.0, q.1);
    }
    if bk != 1 {
        t = t.narrow(3, k.0, k.1);
    }
    t
}

/// Checks the operand shapes: q `[B, H, Lq, D]`, k `[B, H, Lk, D]`, v `[B, H, Lk, Dv]`, bias
/// broadcastable to `[B, H, Lq, Lk]` (each dim 1 or full).
fn check_shapes<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) {
    let ([b, h, lq, d], [kb, kh, lk, kd], [vb, vh, vl, _]) = (q.dims(), k.dims(), v.dims());
    assert!(
        kb == b && vb == b && kh == h && vh == h && kd == d && vl == lk,
        "attention: q {:?}, k {:?}, v {:?} do not fit [B, H, Lq, D], [B, H, Lk, D], [B, H, Lk, Dv]",
        q.dims(),
        k.dims(),
        v.dims()
    );
    if let Some(bias) = bias {
        let full = [b, h, lq, lk];
        assert!(
            bias.dims().iter().zip(full).all(|(&x, f)| x == 1 || x == f),
            "attention: bias {:?} does not broadcast to [B, H, Lq, Lk] = {full:?}",
            bias.dims()
        );
    }
}

/// Blocked forward: `(out [B, H, Lq, Dv], lse [B, H, Lq, 1])` with `lse` the natural log of
/// each row's softmax denominator (scores already scaled and biased).
///
/// A row whose every score is `-inf` (fully masked) gives zeros, as burn's and PyTorch's
/// memory-efficient kernels do.
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f64,
    sizes: BlockSizes,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    check_shapes(&q, &k, &v, bias.as_ref());
    let [_, _, lq, _] = q.dims();
    let lk = k.dims()[2];
    let finfo = q.dtype().finfo().expect("attention on a float tensor");
    let q = q.mul_scalar(scale);
    let k_blocks = blocks(lk, sizes.k);
    let kt: Vec<Tensor<B, 4>> = k_blocks
        .iter()
        .map(|&(s, n)| k.clone().narrow(2, s, n).swap_dims(2, 3))
        .collect();
    let vs: Vec<Tensor<B, 4>> = k_blocks
        .iter()
        .map(|&(s, n)| v.clone().narrow(2, s, n))
        .collect();

    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for qb in blocks(lq, sizes.q) {
        let qi = q.clone().narrow(2, qb.0, qb.1);
        // Running row max m, denominator l and unnormalised output acc over the key blocks.
        let mut state: Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> = None;
        for (j, &kb) in k_blocks.iter().enumerate() {
            let mut s = qi.clone().matmul(kt[j].clone()); // [B, H, bq, bk]
            if let Some(bias) = &bias {
                s = s + bias_tile(bias, qb, kb);
            }
            // Clamped to the dtype's lowest finite value so masked (-inf) rows stay finite.
            let row_max = s.clone().max_dim(3).clamp_min(finfo.min);
            state = Some(match state {
                None => {
                    let p = (s - row_max.clone()).exp();
                    (row_max, p.clone().sum_dim(3), p.matmul(vs[j].clone()))
                }
                Some((m, l, acc)) => {
                    let m_new = m.clone().max_pair(row_max);
                    let alpha = (m - m_new.clone()).exp();
                    let p = (s - m_new.clone()).exp();
                    let l = l * alpha.clone() + p.clone().sum_dim(3);
                    let acc = acc * alpha + p.matmul(vs[j].clone());
                    (m_new, l, acc)
                }
            });
        }
        let (m, l, acc) = state.expect("attention over zero keys");
        let l = l.clamp_min(finfo.min_positive);
        outs.push(acc / l.clone());
        lses.push(m + l.log());
    }
    (cat(outs), cat(lses))
}

/// Gradients of [`forward`]'s output with respect to q, k, v and (when asked) the bias, the
/// bias gradient reduced to the bias's own (broadcast) shape.
pub struct Grads<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub bias: Option<Tensor<B, 4>>,
}

/// Blocked backward (FlashAttention-2): recomputes each tile's probabilities from `lse`,
/// accumulates dV and dK per key block and dQ per query block.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f64,
    out: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    grad_out: Tensor<B, 4>,
    bias_grad: bool,
    sizes: BlockSizes,
) -> Grads<B> {
    check_shapes(&q, &k, &v, bias.as_ref());
    let [_, _, lq, _] = q.dims();
    let lk = k.dims()[2];
    let q = q.mul_scalar(scale);
    // D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij.
    let delta = (grad_out.clone() * out).sum_dim(3);
    let q_blocks = blocks(lq, sizes.q);
    let k_blocks = blocks(lk, sizes.k);
    let ks: Vec<Tensor<B, 4>> = k_blocks
        .iter()
        .map(|&(s, n)| k.clone().narrow(2, s, n))
        .collect();
    let vs: Vec<Tensor<B, 4>> = k_blocks
        .iter()
        .map(|&(s, n)| v.clone().narrow(2, s, n))
        .collect();
    let mut dk: Vec<Option<Tensor<B, 4>>> = vec![None; k_blocks.len()];
    let mut dv: Vec<Option<Tensor<B, 4>>> = vec![None; k_blocks.len()];
    let mut dq = Vec::with_capacity(q_blocks.len());
    // The bias gradient on the bias's grid: one cell per block along a full axis, one along a
    // broadcast axis (where the tiles' gradients are summed).
    let bias_dims = bias.as_ref().map(|b| b.dims());
    let (grid_q, grid_k) = match bias_dims {
        Some([_, _, bq, bk]) if bias_grad => (
            if bq == 1 { 1 } else { q_blocks.len() },
            if bk == 1 { 1 } else { k_blocks.len() },
        ),
        _ => (0, 0),
    };
    let mut dbias: Vec<Vec<Option<Tensor<B, 4>>>> = vec![vec![None; grid_k]; grid_q];

    for (i, &qb) in q_blocks.iter().enumerate() {
        let qi = q.clone().narrow(2, qb.0, qb.1);
        let doi = grad_out.clone().narrow(2, qb.0, qb.1);
        let lse_i = lse.clone().narrow(2, qb.0, qb.1);
        let delta_i = delta.clone().narrow(2, qb.0, qb.1);
        let mut dqi: Option<Tensor<B, 4>> = None;
        for (j, &kb) in k_blocks.iter().enumerate() {
            let mut s = qi.clone().matmul(ks[j].clone().swap_dims(2, 3));
            if let Some(bias) = &bias {
                s = s + bias_tile(bias, qb, kb);
            }
            let p = (s - lse_i.clone()).exp(); // [B, H, bq, bk]
            add_into(&mut dv[j], p.clone().swap_dims(2, 3).matmul(doi.clone()));
            let dp = doi.clone().matmul(vs[j].clone().swap_dims(2, 3));
            let ds = p * (dp - delta_i.clone());
            add_into(&mut dqi, ds.clone().matmul(ks[j].clone()));
            if grid_q > 0 {
                let [bb, bh, bq, bk] = bias_dims.expect("bias dims");
                let mut g = ds.clone();
                for (axis, size) in [(0, bb), (1, bh), (2, bq), (3, bk)] {
                    if size == 1 && g.dims()[axis] != 1 {
                        g = g.sum_dim(axis);
                    }
                }
                let cell = &mut dbias[if bq == 1 { 0 } else { i }][if bk == 1 { 0 } else { j }];
                add_into(cell, g);
            }
            add_into(&mut dk[j], ds.swap_dims(2, 3).matmul(qi.clone()));
        }
        dq.push(dqi.expect("attention over zero keys").mul_scalar(scale));
    }
    let collect = |parts: Vec<Option<Tensor<B, 4>>>| {
        cat(parts
            .into_iter()
            .map(|t| t.expect("one tile per block"))
            .collect())
    };
    let bias = if grid_q > 0 {
        let rows: Vec<Tensor<B, 4>> = dbias
            .into_iter()
            .map(|row| Tensor::cat(row.into_iter().map(|t| t.expect("bias tile")).collect(), 3))
            .collect();
        Some(cat(rows))
    } else {
        None
    };
    Grads {
        q: cat(dq),
        k: collect(dk),
        v: collect(dv),
        bias,
    }
}

/// `acc += x` (the first `x` starts the sum).
fn add_into<B: Backend>(acc: &mut Option<Tensor<B, 4>>, x: Tensor<B, 4>) {
    *acc = Some(match acc.take() {
        Some(a) => a + x,
        None => x,
    });
}

/// Concatenates along the sequence axis (no copy for a single block).
fn cat<B: Backend>(mut parts: Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
    if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(parts, 2)
    }
}
