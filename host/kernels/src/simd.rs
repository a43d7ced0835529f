//! Row-wise loops of the kernels, written so LLVM vectorises them (sixteen independent lanes, no
//! branches in the body), each compiled three times: for the baseline target and, picked at run
//! time, for AVX2 + FMA and for AVX-512. Rust never contracts `a * b + c` on its own, so a body
//! computes the same values in all three builds, except the bodies generic over [`MulAdd`]
//! (`exp` and what uses it), whose multiply-adds are fused in the AVX builds: one instruction
//! and one rounding instead of two, the values within an ulp of the baseline's.

/// Lanes of the accumulators (one AVX-512 register of f32, two AVX ones).
const LANES: usize = 16;

/// Below this `exp` is flushed to zero (`exp(-87.33) ~ f32::MIN_POSITIVE`).
const EXP_LOW: f32 = -87.336_55;
/// Inputs are clamped to this (`exp(88) ~ 1.65e38`, below `f32::MAX`, and `2^n` stays a
/// normal exponent).
const EXP_HIGH: f32 = 88.0;

/// How a loop body's multiply-adds are computed: fused (the AVX2 and AVX-512 builds, where
/// `mul_add` is one instruction) or as a multiply then an add (the baseline build, where
/// `mul_add` would be a call into libm). [`dispatch!`] picks the one its build has.
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// [`MulAdd`] as one fused instruction.
pub(crate) struct Fused;
/// [`MulAdd`] as a multiply and an add.
pub(crate) struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `exp(x)` in f32 to about 1 ulp (Cephes' `expf`: `x = n ln2 + r` with a two-part `ln2`, a
/// degree-6 polynomial for `exp(r)`, `2^n` put into the exponent bits), branch-free so loops
/// over it vectorise. Values below [`EXP_LOW`] (and `-inf`) give 0, values above [`EXP_HIGH`]
/// give `exp(88)`, NaN gives NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<Separate>(x)
}

/// [`exp`] with its multiply-adds computed by `M`.
#[inline(always)]
pub(crate) fn exp_with<M: MulAdd>(x: f32) -> f32 {
    let xc = x.clamp(EXP_LOW, EXP_HIGH);
    // Round to nearest without `round` or a float-to-int cast (neither vectorises everywhere):
    // adding 1.5 * 2^23 leaves the integer `n` in the low mantissa bits of `t`.
    const MAGIC: f32 = 12_582_912.0;
    let t = M::mul_add(xc, std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = M::mul_add(-n, -2.121_944_4e-4, M::mul_add(-n, 0.693_359_4, xc));
    let mut p = 1.987_569_2e-4f32;
    p = M::mul_add(p, r, 1.398_2e-3);
    p = M::mul_add(p, r, 8.333_452e-3);
    p = M::mul_add(p, r, 4.166_579_6e-2);
    p = M::mul_add(p, r, 1.666_666_5e-1);
    p = M::mul_add(p, r, 0.5);
    let y = M::mul_add(p * r, r, r) + 1.0;
    // `2^n`: `n + 127` into the exponent bits, integer arithmetic on `t`'s bits (|n| <= 127).
    let n_bits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let pow2 = f32::from_bits(n_bits.wrapping_add(127) << 23);
    let e = y * pow2;
    // Selects, not branches: they vectorise.
    if x < EXP_LOW {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// Defines `fn $name` (with its visibility) that runs `$body` compiled for AVX-512 or AVX2 + FMA
/// when the CPU has them, and for the baseline target otherwise. A body written
/// `$body::<MulAdd>` is generic over [`MulAdd`]: [`Fused`] in the AVX builds, [`Separate`] in
/// the baseline one.
macro_rules! dispatch {
    (@emit $(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;
        $fast:path, $plain:path) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                        $fast($($arg),*)
                    }
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                        $fast($($arg),*)
                    }
                    // SAFETY: the CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $plain($($arg),*)
        }
    };
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?
        = $body:ident::<MulAdd>;) => {
        $crate::simd::dispatch! { @emit $(#[$doc])* $vis fn $name($($arg: $ty),*) $(-> $ret)?;
            $body::<$crate::simd::Fused>, $body::<$crate::simd::Separate> }
    };
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?
        = $body:ident;) => {
        $crate::simd::dispatch! { @emit $(#[$doc])* $vis fn $name($($arg: $ty),*) $(-> $ret)?;
            $body, $body }
    };
}
pub(crate) use dispatch;

dispatch! {
    /// The largest value of `row`, at least `floor` (NaN-free input assumed).
    pub fn max(row: &[f32], floor: f32) -> f32 = max_body;
}
#[inline(always)]
fn max_body(row: &[f32], floor: f32) -> f32 {
    let mut acc = [floor; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = floor;
    for &x in acc.iter().chain(tail) {
        m = if x > m { x } else { m };
    }
    m
}

dispatch! {
    /// `row[i] = exp(row[i] - shift)`; returns the sum of the new values.
    pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 = exp_shifted_sum_body::<MulAdd>;
}
#[inline(always)]
fn exp_shifted_sum_body<M: MulAdd>(row: &mut [f32], shift: f32) -> f32 {
    // One pass: each lane's values summed as they are written (the same order as `sum`).
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp_with::<M>(c[l] - shift);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut tail = 0.0f32;
    for x in chunks.into_remainder() {
        *x = exp_with::<M>(*x - shift);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum_body(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

dispatch! {
    /// `row[i] = exp(row[i] - shift)`.
    pub fn exp_shifted(row: &mut [f32], shift: f32) = exp_shifted_body::<MulAdd>;
}
#[inline(always)]
fn exp_shifted_body<M: MulAdd>(row: &mut [f32], shift: f32) {
    for x in row.iter_mut() {
        *x = exp_with::<M>(*x - shift);
    }
}

dispatch! {
    /// `dp[i] = p[i] * (dp[i] - delta)`: the softmax backward of one row.
    pub fn softmax_grad(p: &[f32], dp: &mut [f32], delta: f32) = softmax_grad_body;
}
#[inline(always)]
fn softmax_grad_body(p: &[f32], dp: &mut [f32], delta: f32) {
    for (d, &p) in dp.iter_mut().zip(p) {
        *d = p * (*d - delta);
    }
}

dispatch! {
    /// `sum_i a[i] * b[i]`, sixteen partial sums.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 = dot_body;
}
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

dispatch! {
    /// `row[i] *= factor`.
    pub fn scale(row: &mut [f32], factor: f32) = scale_body;
}
#[inline(always)]
fn scale_body(row: &mut [f32], factor: f32) {
    for x in row.iter_mut() {
        *x *= factor;
    }
}

dispatch! {
    /// `sum_i row[i]`, sixteen partial sums.
    pub fn sum(row: &[f32]) -> f32 = sum_body;
}

dispatch! {
    /// `sum_i (row[i] - mean)^2`, sixteen partial sums.
    pub fn centred_sq_sum(row: &[f32], mean: f32) -> f32 = centred_sq_sum_body;
}
#[inline(always)]
fn centred_sq_sum_body(row: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| (x - mean) * (x - mean))
        .sum();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - mean;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}

dispatch! {
    /// `out[i] = (x[i] - shift) * scale`.
    pub fn shift_scale(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) = shift_scale_body;
}
#[inline(always)]
fn shift_scale_body(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = (x - shift) * scale;
    }
}

dispatch! {
    /// `(sum_i g[i], sum_i g[i] * (x[i] - mean) * rstd)`: the two row sums of the layer-norm
    /// gradient.
    pub fn grad_sums(g: &[f32], x: &[f32], mean: f32, rstd: f32) -> (f32, f32) = grad_sums_body;
}
#[inline(always)]
fn grad_sums_body(g: &[f32], x: &[f32], mean: f32, rstd: f32) -> (f32, f32) {
    let (mut a, mut b) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (cg, cx) = (g.chunks_exact(LANES), x.chunks_exact(LANES));
    let (mut ta, mut tb) = (0.0f32, 0.0f32);
    for (&g, &x) in cg.remainder().iter().zip(cx.remainder()) {
        ta += g;
        tb += g * ((x - mean) * rstd);
    }
    for (g, x) in cg.zip(cx) {
        for l in 0..LANES {
            a[l] += g[l];
            b[l] += g[l] * ((x[l] - mean) * rstd);
        }
    }
    (a.iter().sum::<f32>() + ta, b.iter().sum::<f32>() + tb)
}

dispatch! {
    /// `g[i] = rstd * (g[i] - g_mean - (x[i] - mean) * rstd * gx_mean)`: the layer-norm
    /// gradient of one row, in place.
    pub fn norm_grad(g: &mut [f32], x: &[f32], mean: f32, rstd: f32, g_mean: f32, gx_mean: f32) = norm_grad_body;
}
#[inline(always)]
fn norm_grad_body(g: &mut [f32], x: &[f32], mean: f32, rstd: f32, g_mean: f32, gx_mean: f32) {
    for (g, &x) in g.iter_mut().zip(x) {
        *g = rstd * (*g - g_mean - ((x - mean) * rstd) * gx_mean);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest relative error of `f` against f64's `exp` over the softmax's range.
    fn worst_exp_error(f: fn(f32) -> f32) -> f64 {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = f(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        worst
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_softmax_range() {
        // f32's epsilon is 1.19e-7: two ulp at most, with separate and with fused multiply-adds
        // (fused here through libm's `fmaf` where the CPU has no FMA).
        for (name, f) in [
            ("separate", exp_with::<Separate> as fn(f32) -> f32),
            ("fused", exp_with::<Fused>),
        ] {
            let worst = worst_exp_error(f);
            assert!(worst < 2.4e-7, "{name}: worst relative error {worst:e}");
        }
    }

    #[test]
    fn exp_edges() {
        for exp in [exp_with::<Separate> as fn(f32) -> f32, exp_with::<Fused>] {
            assert_eq!(exp(f32::NEG_INFINITY), 0.0);
            assert_eq!(exp(-1000.0), 0.0);
            assert_eq!(exp(0.0), 1.0);
            assert!(exp(f32::NAN).is_nan());
            assert!(exp(88.0).is_finite() && exp(88.0) > 1e38);
        }
    }

    #[test]
    fn row_loops_equal_plain_ones() {
        // Lengths around the lane count, so the remainders are exercised.
        for n in [0usize, 1, 7, 8, 9, 31, 100] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.21)
                .collect();
            let plain_max = a.iter().fold(-5.0f32, |m, &x| m.max(x));
            assert_eq!(max(&a, -5.0), plain_max);
            let plain_dot: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum();
            assert!((dot(&a, &b) as f64 - plain_dot).abs() < 1e-4);
            let mut e = a.clone();
            let sum = exp_shifted_sum(&mut e, 1.5);
            let want: Vec<f64> = a.iter().map(|&x| ((x - 1.5) as f64).exp()).collect();
            for (g, w) in e.iter().zip(&want) {
                assert!(((*g as f64) - w).abs() <= 3e-7 * w.abs());
            }
            assert!((sum as f64 - want.iter().sum::<f64>()).abs() <= 1e-5 * (1.0 + sum as f64));
            let mut e2 = a.clone();
            exp_shifted(&mut e2, 1.5);
            assert_eq!(e, e2);
            let mut d = b.clone();
            softmax_grad(&a, &mut d, 0.25);
            for i in 0..n {
                assert_eq!(d[i], a[i] * (b[i] - 0.25));
            }
            let mut s = a.clone();
            scale(&mut s, 0.5);
            for i in 0..n {
                assert_eq!(s[i], a[i] * 0.5);
            }
        }
    }
}
