//! Standard-normal noise drawn on the host, identical on every backend for a given seed: the
//! noise of sampling and training ([`standard_normal`], from a seeded `rand` generator) and the
//! posterior sample of the latent cache ([`gaussian_noise`], from a seed alone, so a cache entry
//! can be recomputed bit for bit). Both go through one Box-Muller transform.

use rand::Rng;

/// `n` values of the Box-Muller transform of uniform pairs `(u1, u2)`, `u1` in `(0, 1]`, `u2` in
/// `[0, 1)`, drawn from `pair`; both outputs of each pair are used.
fn box_muller(n: usize, mut pair: impl FnMut() -> (f64, f64)) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = pair();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// `n` standard-normal values from `rng` (the noise of sampling and of training steps).
pub fn standard_normal(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    box_muller(n, || {
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        (u1, u2)
    })
}

/// `n` standard-normal values determined by `seed` alone (SplitMix64 uniforms): the posterior
/// sample of a cached latent, so that the same seed gives the same entry on every run.
pub fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    box_muller(n, || {
        let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
        (u1, u2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn gaussian_noise_is_seeded_and_standard() {
        let a = gaussian_noise(3, 20001);
        assert_eq!(a.len(), 20001);
        assert_eq!(a, gaussian_noise(3, 20001));
        assert_ne!(a[..10], gaussian_noise(4, 10)[..]);
        assert_eq!(
            a[..10],
            gaussian_noise(3, 10)[..],
            "a prefix does not depend on the length"
        );
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }

    #[test]
    fn standard_normal_is_seeded_and_standard() {
        let mut a = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = rand::rngs::StdRng::seed_from_u64(7);
        let x = standard_normal(&mut a, 20001);
        assert_eq!(x, standard_normal(&mut b, 20001));
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }
}
