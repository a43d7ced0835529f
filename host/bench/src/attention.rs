//! `cogvx bench attention`: forward and backward of the attention operation alone at one
//! shape (e.g. CogVideoX-2B's `[1, 30, 17776, 64]`), memory-efficient or naive, with the time of
//! each and the process's peak RSS.

use crate::{peak_rss_mib, round_to, run_with_threads, BenchError};
use burn::tensor::{backend::AutodiffBackend, Distribution, ElementConversion, Tensor};
use cogvx_model_core::attention::{attention_naive, attention_with_blocks, BlockSizes};
use cogvx_model_core::{FlexAutodiffBackend, ModelAutodiffBackend};
use serde::Serialize;
use std::time::Instant;

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionOptions {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub head_dim: usize,
    /// The textbook formula (the `[B, H, L, L]` scores kept for the backward) instead of the
    /// memory-efficient operation.
    pub naive: bool,
    /// CPU threads.
    pub threads: usize,
    /// Tile sizes of the memory-efficient operation (default: [`BlockSizes::for_shape`]).
    pub blocks: Option<BlockSizes>,
}

/// One JSON line of `cogvx bench attention`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AttentionReport {
    pub op: String,
    pub shape: [usize; 4],
    pub threads: usize,
    /// Query rows x key columns per tile of the forward, as the backend runs them (`null` for
    /// the naive formula).
    pub forward_tile: Option<[usize; 2]>,
    /// The same for the backward.
    pub backward_tile: Option<[usize; 2]>,
    /// Seconds of the forward (values read back, so the work is done).
    pub forward_s: f64,
    /// Seconds of the backward (q, k and v gradients read back).
    pub backward_s: f64,
    /// `4 B H L^2 D` (forward) + `10 B H L^2 D` (backward with the recomputed scores), over
    /// the total time, in GFLOP/s.
    pub gflops: f64,
    pub peak_rss_mib: Option<f64>,
}

/// Runs the benchmark on the CPU backend with `threads` threads.
pub fn attention_cpu(options: AttentionOptions) -> Result<AttentionReport, BenchError> {
    if options.batch == 0 || options.heads == 0 || options.len == 0 || options.head_dim == 0 {
        return Err(BenchError::Invalid(
            "batch, heads, len and head_dim must be positive".into(),
        ));
    }
    if options.blocks.is_some_and(|b| b.q == 0 || b.k == 0) {
        return Err(BenchError::Invalid("tile sizes must be positive".into()));
    }
    run_with_threads(options.threads, || {
        attention_on::<FlexAutodiffBackend>(options, &Default::default())
    })
}

/// Runs the benchmark on any autodiff backend (the GPU check uses CUDA).
pub fn attention_on<B: ModelAutodiffBackend>(
    options: AttentionOptions,
    device: &B::Device,
) -> AttentionReport {
    let AttentionOptions {
        batch,
        heads,
        len,
        head_dim,
        naive,
        threads,
        blocks,
    } = options;
    let blocks = blocks.unwrap_or_else(|| BlockSizes::for_shape(batch * heads, len, len));
    let shape = [batch, heads, len, head_dim];
    let make =
        || Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad();
    let (q, k, v) = (make(), make(), make());
    let start = Instant::now();
    let out = if naive {
        attention_naive(q.clone(), k.clone(), v.clone(), None, None)
    } else {
        attention_with_blocks(q.clone(), k.clone(), v.clone(), None, None, blocks)
    };
    let out_sum = out.clone().sum().into_scalar();
    let forward_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let grads = out.sum().backward();
    let total: f64 = [&q, &k, &v].iter().map(|t| grad_sum::<B>(t, &grads)).sum();
    let backward_s = start.elapsed().as_secs_f64();
    tracing::debug!("attention output sum {out_sum:?}, gradient sum {total}");
    let flops = 14.0 * (batch * heads) as f64 * (len as f64).powi(2) * head_dim as f64;
    let tiling = B::attention_tiles(blocks);
    AttentionReport {
        op: if naive {
            "naive".into()
        } else {
            "memory-efficient".into()
        },
        shape,
        threads,
        forward_tile: (!naive).then_some([tiling.forward.q, tiling.forward.k]),
        backward_tile: (!naive).then_some([tiling.backward.q, tiling.backward.k]),
        forward_s: round_to(forward_s, 4),
        backward_s: round_to(backward_s, 4),
        gflops: round_to(flops / (forward_s + backward_s) / 1e9, 1),
        peak_rss_mib: peak_rss_mib().map(|m| round_to(m, 1)),
    }
}

fn grad_sum<B: AutodiffBackend>(t: &Tensor<B, 4>, grads: &B::Gradients) -> f64 {
    t.grad(grads)
        .map(|g| g.sum().into_scalar().elem::<f64>())
        .unwrap_or(0.0)
}

impl AttentionReport {
    /// One JSON line.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_shape_runs_both_ways() {
        let _rng = crate::TEST_RNG.lock().unwrap_or_else(|e| e.into_inner());
        for naive in [false, true] {
            let blocks = Some(BlockSizes { q: 16, k: 16 });
            let r = attention_cpu(AttentionOptions {
                batch: 1,
                heads: 2,
                len: 40,
                head_dim: 8,
                naive,
                threads: 1,
                blocks,
            })
            .unwrap();
            assert_eq!(r.forward_tile, (!naive).then_some([16, 16]));
            assert_eq!(r.backward_tile, (!naive).then_some([16, 16]));
            assert_eq!(r.shape, [1, 2, 40, 8]);
            assert!(
                r.forward_s > 0.0 && r.backward_s > 0.0 && r.gflops > 0.0,
                "{r:?}"
            );
            assert_eq!(r.op, if naive { "naive" } else { "memory-efficient" });
        }
        let bad = AttentionOptions {
            batch: 1,
            heads: 0,
            len: 4,
            head_dim: 8,
            naive: false,
            threads: 1,
            blocks: None,
        };
        assert!(attention_cpu(bad)
            .unwrap_err()
            .to_string()
            .contains("positive"));
    }
}
