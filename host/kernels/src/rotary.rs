//! Rotary position embedding (CogVideoX's 3D RoPE, diffusers' `apply_rotary_emb` with
//! `use_real=True`) over heads laid out as rows of `len * d` values: each pair `(x[2i],
//! x[2i+1])` becomes `x * cos + rot(x) * sin` with `rot(x) = (-x[2i+1], x[2i])`, one
//! vectorised pass with heads on rayon's threads. The sums are in the order of that formula,
//! so the values are those of the composed operations.

use rayon::prelude::*;

/// Checks the operands: `x` whole heads of `table` values, `cos` and `sin` one table each,
/// pairs whole.
fn check(what: &str, x: &[f32], cos: &[f32], sin: &[f32]) {
    let n = cos.len();
    assert_eq!(sin.len(), n, "{what}: cos and sin lengths");
    assert!(
        n % 2 == 0 && (n == 0 || x.len() % n == 0),
        "{what}: {} values are not whole heads of a {n}-value table of pairs",
        x.len()
    );
}

#[inline(always)]
fn forward_body(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    for (((o, x), c), s) in out
        .chunks_exact_mut(2)
        .zip(x.chunks_exact(2))
        .zip(cos.chunks_exact(2))
        .zip(sin.chunks_exact(2))
    {
        o[0] = x[0] * c[0] + -x[1] * s[0];
        o[1] = x[1] * c[1] + x[0] * s[1];
    }
}

#[inline(always)]
fn backward_body(g: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    // The transpose of the forward's map: d/dx[2i] gets g[2i] cos[2i] and g[2i+1] sin[2i+1],
    // d/dx[2i+1] gets g[2i+1] cos[2i+1] and -g[2i] sin[2i].
    for (((o, g), c), s) in out
        .chunks_exact_mut(2)
        .zip(g.chunks_exact(2))
        .zip(cos.chunks_exact(2))
        .zip(sin.chunks_exact(2))
    {
        o[0] = g[0] * c[0] + g[1] * s[1];
        o[1] = g[1] * c[1] + -(g[0] * s[0]);
    }
}

crate::simd::dispatch! {
    /// One head's rotation.
    fn forward_head(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) = forward_body;
}

crate::simd::dispatch! {
    /// One head's gradient.
    fn backward_head(g: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) = backward_body;
}

/// Runs `f` on each head of `x` (tables `cos`, `sin`) into a new buffer.
fn per_head(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    f: impl Fn(&[f32], &[f32], &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let n = cos.len().max(1);
    // Whole heads per task, at least 16 Ki values a task.
    let chunk = n * (16_384 / n).max(1);
    crate::buffer::par_new(x.len(), chunk, 0.0, |i, out| {
        let x = &x[i * chunk..i * chunk + out.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, x)| f(x, cos, sin, o));
    })
}

/// `x * cos + rot(x) * sin` for each head of `x` (`cos`, `sin`: one head's `len * d` values).
pub fn rotary(x: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    check("rotary", x, cos, sin);
    per_head(x, cos, sin, forward_head)
}

/// The gradient of [`rotary`] with respect to `x`, for the output's gradient `grad`.
pub fn rotary_backward(grad: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    check("rotary_backward", grad, cos, sin);
    per_head(grad, cos, sin, backward_head)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values as values;

    #[test]
    fn rotary_and_its_gradient_equal_the_pair_formula() {
        for (heads, table) in [(1, 2), (3, 8), (5, 64 * 7), (40, 1024)] {
            let (x, g) = (values(heads * table, 1), values(heads * table, 2));
            let (cos, sin) = (values(table, 3), values(table, 4));
            let y = rotary(&x, &cos, &sin);
            let dx = rotary_backward(&g, &cos, &sin);
            for h in 0..heads {
                for i in (0..table).step_by(2) {
                    let (a, b) = (h * table + i, h * table + i + 1);
                    assert_eq!(y[a], x[a] * cos[i] + -x[b] * sin[i]);
                    assert_eq!(y[b], x[b] * cos[i + 1] + x[a] * sin[i + 1]);
                    // <g, rotary(e_k)> for the unit vectors of the pair.
                    assert_eq!(dx[a], g[a] * cos[i] + g[b] * sin[i + 1]);
                    assert_eq!(dx[b], g[b] * cos[i + 1] - g[a] * sin[i]);
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "whole heads")]
    fn a_partial_head_panics() {
        rotary(&[0.0; 6], &[1.0; 4], &[0.0; 4]);
    }
}
