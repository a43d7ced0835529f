use super::*;
use crate::{CpuAutodiffBackend, CpuBackend, CpuDevice};
use burn::tensor::TensorData;

type A = CpuAutodiffBackend;

/// Deterministic values in [-amp, amp) (a 64-bit LCG), so failures reproduce.
fn rand_tensor<B: Backend>(dims: [usize; 4], seed: u64, amp: f32) -> Tensor<B, 4> {
    let n: usize = dims.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect();
    Tensor::from_data(TensorData::new(data, dims), &Default::default())
}

fn values<B: Backend>(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Relative L2 distance `|a - b| / |b|`.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn uniform_scores_average_values() {
    let dev = CpuDevice::default();
    let q = Tensor::<CpuBackend, 4>::zeros([1, 1, 2, 4], &dev);
    let k = Tensor::<CpuBackend, 4>::ones([1, 1, 3, 4], &dev);
    let v = Tensor::<CpuBackend, 4>::from_data(
        TensorData::new((0..12).map(|x| x as f32).collect::<Vec<_>>(), [1, 1, 3, 4]),
        &dev,
    );
    let out = attention(q, k, v, None, None)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let want = [4.0f32, 5.0, 6.0, 7.0, 4.0, 5.0, 6.0, 7.0];
    assert!(
        out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
        "{out:?}"
    );
}

#[test]
fn bias_masks_keys() {
    let dev = CpuDevice::default();
    let q = Tensor::<CpuBackend, 4>::zeros([1, 1, 1, 2], &dev);
    let k = Tensor::<CpuBackend, 4>::zeros([1, 1, 2, 2], &dev);
    let v = Tensor::<CpuBackend, 4>::from_data(
        TensorData::new(vec![1.0f32, 1.0, 3.0, 3.0], [1, 1, 2, 2]),
        &dev,
    );
    let bias =
        Tensor::<CpuBackend, 4>::from_data(TensorData::new(vec![0.0f32, -1e9], [1, 1, 1, 2]), &dev);
    let out = attention(q, k, v, Some(bias), Some(1.0))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(out, vec![1.0, 1.0]);
}

/// Shapes with lengths that are not multiples of the blocks, cross-attention (Lq != Lk), Dv != D.
const SHAPES: [([usize; 4], usize, usize); 4] = [
    ([2, 3, 37, 16], 37, 16), // q dims, Lk, Dv
    ([1, 2, 50, 8], 23, 8),
    ([2, 1, 5, 32], 70, 12),
    ([1, 4, 64, 64], 64, 64),
];
const TILINGS: [BlockSizes; 4] = [
    BlockSizes { q: 7, k: 5 },
    BlockSizes { q: 16, k: 64 },
    BlockSizes { q: 1, k: 1 },
    BlockSizes { q: 4096, k: 4096 },
];

/// Bias shapes to try for `[b, h, lq, lk]`: full, per-head, a key mask broadcast over queries.
fn bias_shapes([b, h, lq, _]: [usize; 4], lk: usize) -> Vec<[usize; 4]> {
    vec![[b, h, lq, lk], [1, h, lq, lk], [b, 1, 1, lk]]
}

#[test]
fn blocked_forward_equals_naive_for_every_tiling() {
    for (si, (qd, lk, dv)) in SHAPES.into_iter().enumerate() {
        let [b, h, _, d] = qd;
        let q = rand_tensor::<CpuBackend>(qd, 1 + si as u64, 2.0);
        let k = rand_tensor::<CpuBackend>([b, h, lk, d], 11 + si as u64, 2.0);
        let v = rand_tensor::<CpuBackend>([b, h, lk, dv], 21 + si as u64, 1.0);
        let mut biases: Vec<Option<[usize; 4]>> = vec![None];
        biases.extend(bias_shapes(qd, lk).into_iter().map(Some));
        for bias in biases {
            let bias = bias.map(|dims| rand_tensor::<CpuBackend>(dims, 31 + si as u64, 3.0));
            let want = values(attention_naive(
                q.clone(),
                k.clone(),
                v.clone(),
                bias.clone(),
                None,
            ));
            for sizes in TILINGS {
                let got = values(attention_with_blocks(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    bias.clone(),
                    None,
                    sizes,
                ));
                let err = rel_l2(&got, &want);
                assert!(
                    err <= 1e-6,
                    "shape {qd:?} lk {lk} tiling {sizes:?} bias {:?}: rel L2 {err:e}",
                    bias.as_ref().map(|b| b.dims())
                );
            }
        }
    }
}

/// Gradients of `sum(out * w)` (a fixed random cotangent) through both paths.
fn grads(
    naive: bool,
    q: &Tensor<CpuBackend, 4>,
    k: &Tensor<CpuBackend, 4>,
    v: &Tensor<CpuBackend, 4>,
    bias: Option<&Tensor<CpuBackend, 4>>,
    w: &Tensor<CpuBackend, 4>,
    sizes: BlockSizes,
) -> Vec<Vec<f32>> {
    let q = Tensor::<A, 4>::from_inner(q.clone()).require_grad();
    let k = Tensor::<A, 4>::from_inner(k.clone()).require_grad();
    let v = Tensor::<A, 4>::from_inner(v.clone()).require_grad();
    let bias = bias.map(|b| Tensor::<A, 4>::from_inner(b.clone()).require_grad());
    let out = if naive {
        attention_naive(q.clone(), k.clone(), v.clone(), bias.clone(), None)
    } else {
        attention_with_blocks(q.clone(), k.clone(), v.clone(), bias.clone(), None, sizes)
    };
    let loss = (out * Tensor::from_inner(w.clone())).sum();
    let g = loss.backward();
    let mut all = vec![
        values(q.grad(&g).unwrap()),
        values(k.grad(&g).unwrap()),
        values(v.grad(&g).unwrap()),
    ];
    if let Some(bias) = bias {
        all.push(values(bias.grad(&g).unwrap()));
    }
    all
}

#[test]
fn blocked_gradients_equal_naive_ones() {
    for (si, (qd, lk, dv)) in SHAPES.into_iter().enumerate() {
        let [b, h, lq, d] = qd;
        let q = rand_tensor::<CpuBackend>(qd, 41 + si as u64, 2.0);
        let k = rand_tensor::<CpuBackend>([b, h, lk, d], 51 + si as u64, 2.0);
        let v = rand_tensor::<CpuBackend>([b, h, lk, dv], 61 + si as u64, 1.0);
        let w = rand_tensor::<CpuBackend>([b, h, lq, dv], 71 + si as u64, 1.0);
        let mut biases: Vec<Option<[usize; 4]>> = vec![None];
        biases.extend(bias_shapes(qd, lk).into_iter().map(Some));
        for bias in biases {
            let bias = bias.map(|dims| rand_tensor::<CpuBackend>(dims, 81 + si as u64, 3.0));
            let want = grads(true, &q, &k, &v, bias.as_ref(), &w, TILINGS[0]);
            for sizes in TILINGS {
                let got = grads(false, &q, &k, &v, bias.as_ref(), &w, sizes);
                for (name, (g, n)) in ["q", "k", "v", "bias"].iter().zip(got.iter().zip(&want)) {
                    let err = rel_l2(g, n);
                    assert!(
                        err <= 1e-5,
                        "d{name}: shape {qd:?} lk {lk} tiling {sizes:?}: rel L2 {err:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn frozen_inputs_get_no_gradient_and_untracked_calls_work() {
    let q = rand_tensor::<CpuBackend>([1, 2, 9, 8], 1, 1.0);
    let k = rand_tensor::<CpuBackend>([1, 2, 9, 8], 2, 1.0);
    let v = rand_tensor::<CpuBackend>([1, 2, 9, 8], 3, 1.0);
    // Only v is trained: q and k stay without gradients, v's equals the naive one.
    let qa = Tensor::<A, 4>::from_inner(q.clone());
    let ka = Tensor::<A, 4>::from_inner(k.clone());
    let va = Tensor::<A, 4>::from_inner(v.clone()).require_grad();
    let g = attention_with_blocks(
        qa.clone(),
        ka.clone(),
        va.clone(),
        None,
        None,
        BlockSizes { q: 4, k: 4 },
    )
    .sum()
    .backward();
    assert!(qa.grad(&g).is_none() && ka.grad(&g).is_none());
    let want = Tensor::<A, 4>::from_inner(v.clone()).require_grad();
    let gw = attention_naive(
        Tensor::from_inner(q.clone()),
        Tensor::from_inner(k.clone()),
        want.clone(),
        None,
        None,
    )
    .sum()
    .backward();
    assert!(
        rel_l2(
            &values(va.grad(&g).unwrap()),
            &values(want.grad(&gw).unwrap())
        ) <= 1e-5
    );
    // Nothing requires a gradient: the untracked path gives the same output.
    let out = attention(
        Tensor::<A, 4>::from_inner(q.clone()),
        Tensor::from_inner(k.clone()),
        Tensor::from_inner(v.clone()),
        None,
        None,
    );
    assert!(rel_l2(&values(out), &values(attention_naive(q, k, v, None, None))) <= 1e-6);
}

#[test]
fn fully_masked_rows_give_zeros_not_nan() {
    let q = rand_tensor::<CpuBackend>([1, 1, 4, 8], 5, 1.0);
    let k = rand_tensor::<CpuBackend>([1, 1, 6, 8], 6, 1.0);
    let v = rand_tensor::<CpuBackend>([1, 1, 6, 8], 7, 1.0);
    // Row 2 sees no key at all.
    let mut mask = vec![0.0f32; 24];
    mask[12..18].fill(f32::NEG_INFINITY);
    let bias = Tensor::<CpuBackend, 4>::from_data(
        TensorData::new(mask, [1, 1, 4, 6]),
        &Default::default(),
    );
    let out = values(attention_with_blocks(
        q,
        k,
        v,
        Some(bias),
        None,
        BlockSizes { q: 3, k: 4 },
    ));
    assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    assert!(out[16..24].iter().all(|&x| x == 0.0), "{:?}", &out[16..24]);
}

#[test]
fn default_tiles_stay_within_the_budget() {
    // CogVideoX-2B at 49x480x720: 30 heads, 17,776 tokens.
    let s = BlockSizes::for_shape(30, 17_776, 17_776);
    assert_eq!(s.k, flash::MAX_BLOCK_K);
    assert!(
        30 * s.q * s.k <= flash::TILE_ELEMENTS && s.q % 16 == 0 && s.q >= 16,
        "{s:?}"
    );
    // The tiny models' sequences are one tile (plain softmax attention).
    assert_eq!(
        BlockSizes::for_shape(4, 300, 300),
        BlockSizes { q: 300, k: 300 }
    );
}

/// The CPU backends run their own kernel; the burn-operation path (what GPU backends run) is
/// checked here directly against the naive formula and its autodiff gradients.
#[test]
fn generic_burn_op_path_equals_naive() {
    use crate::backend::{
        generic_flash_attention_backward, generic_flash_attention_forward, AttentionInputs,
    };
    for (si, (qd, lk, dv)) in SHAPES.into_iter().take(3).enumerate() {
        let [b, h, lq, d] = qd;
        let q = rand_tensor::<CpuBackend>(qd, 141 + si as u64, 2.0);
        let k = rand_tensor::<CpuBackend>([b, h, lk, d], 151 + si as u64, 2.0);
        let v = rand_tensor::<CpuBackend>([b, h, lk, dv], 161 + si as u64, 1.0);
        let w = rand_tensor::<CpuBackend>([b, h, lq, dv], 171 + si as u64, 1.0);
        let bias = rand_tensor::<CpuBackend>([1, h, lq, lk], 181 + si as u64, 3.0);
        for bias in [None, Some(bias)] {
            let want_out = values(attention_naive(
                q.clone(),
                k.clone(),
                v.clone(),
                bias.clone(),
                None,
            ));
            let want = grads(true, &q, &k, &v, bias.as_ref(), &w, TILINGS[0]);
            for sizes in TILINGS {
                let inputs = AttentionInputs::<CpuBackend> {
                    q: q.clone().into_primitive().tensor(),
                    k: k.clone().into_primitive().tensor(),
                    v: v.clone().into_primitive().tensor(),
                    bias: bias.clone().map(|b| b.into_primitive().tensor()),
                    scale: 1.0 / (d as f64).sqrt(),
                    sizes,
                };
                let saved = generic_flash_attention_forward(inputs.clone());
                let out = Tensor::<CpuBackend, 4>::from_primitive(TensorPrimitive::Float(
                    saved.out.clone(),
                ));
                assert!(rel_l2(&values(out), &want_out) <= 1e-6, "{qd:?} {sizes:?}");
                let g = generic_flash_attention_backward(
                    inputs,
                    saved,
                    w.clone().into_primitive().tensor(),
                    bias.is_some(),
                );
                let mut got = vec![g.q, g.k, g.v];
                got.extend(g.bias);
                for (i, (g, n)) in got.into_iter().zip(&want).enumerate() {
                    let g = values(Tensor::<CpuBackend, 4>::from_primitive(
                        TensorPrimitive::Float(g),
                    ));
                    let err = rel_l2(&g, n);
                    assert!(err <= 1e-5, "grad {i}: {qd:?} {sizes:?}: {err:e}");
                }
            }
        }
    }
}
