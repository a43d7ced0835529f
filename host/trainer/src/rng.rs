//! The trainer's random numbers: a ChaCha8 stream whose exact position is saved in checkpoints,
//! and the per-epoch data order derived from the seed and the epoch alone.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A seeded random stream (ChaCha8) for timesteps, noise and the I2V image noise.
#[derive(Clone, Debug)]
pub struct TrainRng {
    rng: ChaCha8Rng,
}

/// The exact position of a [`TrainRng`] (what a checkpoint stores).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte ChaCha key, hex.
    pub seed: String,
    pub stream: u64,
    /// The 32-bit word position in the stream (a `u128`, as a decimal string).
    pub word_pos: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TrainRng {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        TrainRng {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Saves the exact position.
    pub fn state(&self) -> RngState {
        RngState {
            seed: hex(&self.rng.get_seed()),
            stream: self.rng.get_stream(),
            word_pos: self.rng.get_word_pos().to_string(),
        }
    }

    /// Restores a position saved by [`Self::state`].
    pub fn from_state(state: &RngState) -> Result<Self, String> {
        if state.seed.len() != 64 {
            return Err(format!("rng seed {:?} is not 64 hex digits", state.seed));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&state.seed[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("rng seed {:?}: {e}", state.seed))?;
        }
        let pos: u128 = state
            .word_pos
            .parse()
            .map_err(|e| format!("rng word_pos {:?}: {e}", state.word_pos))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(state.stream);
        rng.set_word_pos(pos);
        Ok(TrainRng { rng })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = TrainRng::new(7);
        let _ = a.normal(13);
        let _ = a.below(1000);
        let saved = a.state();
        let json = serde_json::to_string(&saved).unwrap();
        let mut b = TrainRng::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(a.normal(9), b.normal(9));
        assert_eq!(a.below(1000), b.below(1000));
        assert_eq!(a.uniform().to_bits(), b.uniform().to_bits());
        assert!(TrainRng::from_state(&RngState {
            seed: "zz".into(),
            stream: 0,
            word_pos: "0".into()
        })
        .is_err());
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
}
