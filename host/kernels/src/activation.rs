//! The tanh-approximated GELU and its gradient over a buffer, in vectorised loops ([`simd`]'s
//! `exp`), chunks on rayon's threads. Same formula as `cogvx_model_core::activation`:
//! `x * sigmoid(z)` with `z = C1 x + C3 x^3` (`0.5 (1 + tanh(z / 2)) = sigmoid(z)`).

use crate::simd::{self, MulAdd};
use rayon::prelude::*;

/// `2 sqrt(2/pi)`.
const C1: f32 = (2.0 * 0.797_884_560_802_865_4) as f32;
/// `2 sqrt(2/pi) * 0.044715`.
const C3: f32 = (2.0 * 0.797_884_560_802_865_4 * 0.044715) as f32;
/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// `sigmoid(z)` and `sigmoid(z) (1 - sigmoid(z))` from `e = exp(-|z|)`, which never
/// overflows: `1 / (1 + e)` for `z >= 0`, `e / (1 + e)` below, and `e / (1 + e)^2` (no
/// cancellation where `sigmoid(z)` is close to 1).
#[inline(always)]
fn sigmoid<M: MulAdd>(z: f32) -> (f32, f32) {
    let e = simd::exp_with::<M>(-z.abs());
    let r = 1.0 / (1.0 + e);
    let s = if z >= 0.0 { r } else { e * r };
    (s, e * r * r)
}

#[inline(always)]
fn forward_body<M: MulAdd>(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        let z = (x * x * C3 + C1) * x;
        *o = x * sigmoid::<M>(z).0;
    }
}

/// `d/dx [x s] = s + x s (1 - s) (C1 + 3 C3 x^2)` with `s = sigmoid(z)`, times the gradient.
#[inline(always)]
fn backward_body<M: MulAdd>(x: &[f32], grad: &mut [f32]) {
    for (g, &x) in grad.iter_mut().zip(x) {
        let x2 = x * x;
        let (s, ds) = sigmoid::<M>((x2 * C3 + C1) * x);
        let dz = x2 * (3.0 * C3) + C1;
        *g *= ds * dz * x + s;
    }
}

crate::simd::dispatch! {
    /// `out[i] = gelu_tanh(x[i])` for one chunk.
    fn forward_chunk(x: &[f32], out: &mut [f32]) = forward_body::<MulAdd>;
}

#[inline(always)]
fn in_place_body<M: MulAdd>(v: &mut [f32]) {
    for o in v.iter_mut() {
        let x = *o;
        let z = (x * x * C3 + C1) * x;
        *o = x * sigmoid::<M>(z).0;
    }
}

crate::simd::dispatch! {
    /// `v[i] = gelu_tanh(v[i])` for one chunk.
    fn in_place_chunk(v: &mut [f32]) = in_place_body::<MulAdd>;
}

crate::simd::dispatch! {
    /// `grad[i] *= gelu_tanh'(x[i])` for one chunk.
    fn backward_chunk(x: &[f32], grad: &mut [f32]) = backward_body::<MulAdd>;
}

/// `gelu_tanh(x)` element by element (torch's `gelu(approximate="tanh")`).
pub fn gelu_tanh(x: &[f32]) -> Vec<f32> {
    crate::buffer::par_new(x.len(), CHUNK, 0.0, |i, out| {
        forward_chunk(&x[i * CHUNK..i * CHUNK + out.len()], out)
    })
}

/// `gelu_tanh(x)` written over `out` (of `x`'s length).
pub fn gelu_tanh_into(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "gelu_tanh_into: x and out lengths");
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| forward_chunk(x, o));
}

/// `gelu_tanh` of each value, in place.
pub fn gelu_tanh_in_place(v: &mut [f32]) {
    v.par_chunks_mut(CHUNK).for_each(in_place_chunk);
}

/// The gradient of [`gelu_tanh`] at `x` times `grad`, written over `grad`.
pub fn gelu_tanh_backward(x: &[f32], grad: &mut [f32]) {
    assert_eq!(
        x.len(),
        grad.len(),
        "gelu_tanh_backward: x and grad lengths"
    );
    grad.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(g, x)| backward_chunk(x, g));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook formula and its derivative in f64.
    fn gelu64(x: f64) -> (f64, f64) {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let u = k * (x + 0.044715 * x.powi(3));
        let t = u.tanh();
        let du = k * (1.0 + 3.0 * 0.044715 * x * x);
        (
            0.5 * x * (1.0 + t),
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
        )
    }

    #[test]
    fn gelu_and_its_gradient_equal_the_f64_formula() {
        // Past a chunk (two tasks and a tail), and the far tails where sigmoid saturates.
        let x: Vec<f32> = (0..CHUNK + 4097)
            .map(|i| (i as f32 - 10_000.0) * 1.3e-3)
            .chain([-120.0, -30.0, -9.0, 0.0, 1e-6, 9.0, 30.0, 120.0])
            .collect();
        let y = gelu_tanh(&x);
        let mut into = vec![f32::NAN; x.len()];
        gelu_tanh_into(&x, &mut into);
        let mut in_place = x.clone();
        gelu_tanh_in_place(&mut in_place);
        assert_eq!(into, y, "gelu_tanh_into");
        assert_eq!(in_place, y, "gelu_tanh_in_place");
        let mut g: Vec<f32> = (0..x.len()).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
        let scale = g.clone();
        gelu_tanh_backward(&x, &mut g);
        for (i, &xi) in x.iter().enumerate() {
            let (want, dwant) = gelu64(xi as f64);
            let dwant = dwant * scale[i] as f64;
            let tol = |w: f64| 4e-7 * w.abs().max(1.0) + 1e-30;
            assert!(
                (y[i] as f64 - want).abs() <= tol(want),
                "gelu({xi}) = {} not {want}",
                y[i]
            );
            assert!(
                (g[i] as f64 - dwant).abs() <= tol(dwant) * 4.0,
                "gelu'({xi}) = {} not {dwant}",
                g[i]
            );
        }
    }
}
