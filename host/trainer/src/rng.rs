//! The trainer's random numbers: each sample's draws (timestep, latent noise, I2V image noise)
//! come from a ChaCha8 stream keyed by the seed and the sample's position in the run's sample
//! sequence, and the per-epoch data order from the seed and the epoch alone. Nothing depends
//! on how samples are grouped into micro-batches, accumulation windows or (later) processes,
//! and a resumed run needs no saved generator state.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Key offset of the per-sample draw streams, so that they never share a key with the data
/// order's ([`epoch_order`]) for the same seed.
const SAMPLE_DRAWS_KEY: u64 = 0x636f_6776_782d_6477; // "cogvx-dw"

/// A seeded random stream (ChaCha8).
#[derive(Clone, Debug)]
pub struct TrainRng {
    rng: ChaCha8Rng,
}

impl TrainRng {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        TrainRng {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The draws of the sample at position `draw` of the run's sample sequence (`epoch *
    /// samples + index in the epoch's order`): the same values whatever the batch size, the
    /// gradient accumulation or the step the run resumed at.
    pub fn for_sample(seed: u64, draw: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ SAMPLE_DRAWS_KEY);
        rng.set_stream(draw);
        TrainRng { rng }
    }

    /// A uniform integer in `0..n` (`torch.randint(0, n)`'s distribution).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// A uniform `f64` in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// `n` standard-normal values (the scheduler's Box-Muller, as sampling draws them).
    pub fn normal(&mut self, n: usize) -> Vec<f32> {
        cogvx_scheduler::noise::standard_normal(&mut self.rng, n)
    }

    /// An index drawn with probability proportional to `weights` (inverse CDF).
    pub fn weighted(&mut self, cumulative: &[f64]) -> usize {
        let total = *cumulative.last().expect("non-empty weights");
        let u = self.uniform() * total;
        let i = cumulative.partition_point(|c| *c <= u);
        i.min(cumulative.len() - 1)
    }
}

/// The sample order of `epoch`: a Fisher-Yates shuffle of `0..n` with a ChaCha8 stream keyed by
/// `seed` and `epoch` (independent of everything else, so a resumed run sees the same order).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// The micro-batches of an epoch as positions in its `order` ([`epoch_order`]): each bucket's
/// samples (`bucket_of[sample]`), in the order's sequence, cut into batches of `batch_size`
/// (a bucket's last batch may be smaller), every batch one bucket, the batches sorted by their
/// first position. With one bucket this is the order cut into consecutive batches.
pub fn epoch_batches(order: &[usize], bucket_of: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut open: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    let mut batches = Vec::new();
    for (pos, &sample) in order.iter().enumerate() {
        let bucket = bucket_of.get(sample).copied().unwrap_or(0);
        let batch = open.entry(bucket).or_default();
        batch.push(pos);
        if batch.len() == batch_size {
            batches.push(open.remove(&bucket).expect("present"));
        }
    }
    batches.extend(open.into_values());
    batches.sort_by_key(|b| b[0]);
    batches
}

/// The number of batches [`epoch_batches`] makes of these buckets (the same every epoch).
pub fn batches_per_epoch(bucket_of: &[usize], batch_size: usize) -> u64 {
    let mut counts: std::collections::BTreeMap<usize, usize> = Default::default();
    for &b in bucket_of {
        *counts.entry(b).or_default() += 1;
    }
    counts
        .values()
        .map(|&c| c.div_ceil(batch_size.max(1)) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_streams_depend_on_seed_and_position_only() {
        let a = TrainRng::for_sample(7, 3).normal(16);
        assert_eq!(a, TrainRng::for_sample(7, 3).normal(16));
        assert_ne!(a, TrainRng::for_sample(7, 4).normal(16));
        assert_ne!(a, TrainRng::for_sample(8, 3).normal(16));
        // Not the data order's stream of the same seed.
        let mut order = ChaCha8Rng::seed_from_u64(7);
        order.set_stream(3);
        assert_ne!(a, cogvx_scheduler::noise::standard_normal(&mut order, 16));
    }

    #[test]
    fn normal_and_uniform_statistics() {
        let mut r = TrainRng::new(1);
        let v = r.normal(20000);
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[r.below(4)] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        // weights 1:0:3 -> index 1 never drawn
        let cum = [1.0, 1.0, 4.0];
        let mut w = [0usize; 3];
        for _ in 0..4000 {
            w[r.weighted(&cum)] += 1;
        }
        assert_eq!(w[1], 0);
        assert!((2700..3300).contains(&w[2]), "{w:?}");
    }

    #[test]
    fn epoch_orders_are_permutations_that_differ_by_epoch() {
        let a = epoch_order(42, 0, 10);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(42, 0, 10));
        assert_ne!(a, epoch_order(42, 1, 10));
        assert_ne!(a, epoch_order(43, 0, 10));
        assert!(epoch_order(1, 0, 0).is_empty());
    }

    #[test]
    fn epoch_batches_hold_one_bucket_each_and_every_sample_once() {
        let n = 11;
        let order = epoch_order(7, 0, n);
        // One bucket: the order cut into consecutive batches, as without buckets.
        let one = epoch_batches(&order, &[0; 11], 3);
        let want: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(3)
            .map(|c| c.to_vec())
            .collect();
        assert_eq!(one, want);
        assert_eq!(batches_per_epoch(&[0; 11], 3), 4);
        // Three buckets of 5, 4 and 2 samples.
        let bucket_of = [0, 1, 0, 2, 1, 0, 1, 0, 2, 1, 0];
        let batches = epoch_batches(&order, &bucket_of, 2);
        assert_eq!(batches.len() as u64, batches_per_epoch(&bucket_of, 2));
        assert_eq!(batches.len(), 3 + 2 + 1);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        for b in &batches {
            assert!(
                b.iter()
                    .all(|&p| bucket_of[order[p]] == bucket_of[order[b[0]]]),
                "{b:?}"
            );
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
        assert!(batches.windows(2).all(|w| w[0][0] < w[1][0]));
        // Deterministic per seed and epoch; another epoch, another grouping.
        assert_eq!(batches, epoch_batches(&epoch_order(7, 0, n), &bucket_of, 2));
        let other: Vec<Vec<usize>> = epoch_batches(&epoch_order(7, 1, n), &bucket_of, 2)
            .iter()
            .map(|b| b.iter().map(|&p| epoch_order(7, 1, n)[p]).collect())
            .collect();
        let this: Vec<Vec<usize>> = batches
            .iter()
            .map(|b| b.iter().map(|&p| order[p]).collect())
            .collect();
        assert_ne!(this, other);
    }
}
