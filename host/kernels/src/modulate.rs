//! The per-stream modulations of a CogVideoX block over its joint `[batch, len, d]` sequence
//! (text rows first, then video rows): `y * a + c` (the adaptive norm's scale and shift) and
//! `x + y * a` (the gated residual), where `a` and `c` hold one row per batch and stream, so
//! the text rows (`< split`) take the first and the video rows the second. One vectorised pass
//! on rayon's threads, in the order of the composed operations (`(y * a) + c`, `x + (y * a)`),
//! so the values are those of the broadcast products and sums they replace.

use crate::simd::dispatch;

/// The shape of the sequence and where its second stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    pub batch: usize,
    pub len: usize,
    pub d: usize,
    /// Rows `0..split` of each batch entry take `a[b, 0]` (and `c[b, 0]`), the rest `a[b, 1]`.
    pub split: usize,
}

impl Segments {
    fn values(&self) -> usize {
        self.batch * self.len * self.d
    }

    /// The `[batch, 2, d]` parameter row of global row `r` (of `batch * len`).
    fn param_row<'a>(&self, p: &'a [f32], r: usize) -> &'a [f32] {
        let (b, l) = (r / self.len, r % self.len);
        let s = usize::from(l >= self.split);
        &p[(b * 2 + s) * self.d..(b * 2 + s + 1) * self.d]
    }

    fn check(&self, what: &str, n: usize, params: &[Option<&[f32]>]) {
        assert!(
            self.split <= self.len,
            "{what}: split {} past the length {}",
            self.split,
            self.len
        );
        assert_eq!(n, self.values(), "{what}: values for {self:?}");
        for p in params.iter().flatten() {
            assert_eq!(
                p.len(),
                self.batch * 2 * self.d,
                "{what}: a [batch, 2, d] parameter"
            );
        }
    }
}

/// Rows per rayon task (at least one task per 16 Ki values).
fn rows_per_task(d: usize) -> usize {
    (16_384 / d.max(1)).max(1)
}

#[inline(always)]
fn scale_body(y: &[f32], a: &[f32], out: &mut [f32]) {
    for ((o, &y), &a) in out.iter_mut().zip(y).zip(a) {
        *o = y * a;
    }
}

#[inline(always)]
fn scale_shift_body(y: &[f32], a: &[f32], c: &[f32], out: &mut [f32]) {
    for (((o, &y), &a), &c) in out.iter_mut().zip(y).zip(a).zip(c) {
        *o = y * a + c;
    }
}

#[inline(always)]
fn residual_body(x: &[f32], y: &[f32], a: &[f32], out: &mut [f32]) {
    for (((o, &x), &y), &a) in out.iter_mut().zip(x).zip(y).zip(a) {
        *o = x + y * a;
    }
}

dispatch! {
    /// `out = y * a` for one row.
    fn scale_row(y: &[f32], a: &[f32], out: &mut [f32]) = scale_body;
}

dispatch! {
    /// `out = y * a + c` for one row.
    fn scale_shift_row(y: &[f32], a: &[f32], c: &[f32], out: &mut [f32]) = scale_shift_body;
}

dispatch! {
    /// `out = x + y * a` for one row.
    fn residual_row(x: &[f32], y: &[f32], a: &[f32], out: &mut [f32]) = residual_body;
}

/// `y * a[s] + c[s]` (`c` given) or `y * a[s]` row by row, for `y` `[batch, len, d]` and
/// `a`, `c` `[batch, 2, d]`.
pub fn scale_shift(y: &[f32], a: &[f32], c: Option<&[f32]>, seg: Segments) -> Vec<f32> {
    seg.check("scale_shift", y.len(), &[Some(a), c]);
    let d = seg.d;
    let chunk = rows_per_task(d) * d;
    crate::buffer::par_new(y.len(), chunk, 0.0, |i, out| {
        let r0 = i * chunk / d.max(1);
        for (k, o) in out.chunks_exact_mut(d).enumerate() {
            let r = r0 + k;
            let y = &y[r * d..(r + 1) * d];
            match c {
                Some(c) => scale_shift_row(y, seg.param_row(a, r), seg.param_row(c, r), o),
                None => scale_row(y, seg.param_row(a, r), o),
            }
        }
    })
}

/// The gated residual `x + y * a[s]` row by row, for `x`, `y` `[batch, len, d]` and `a`
/// `[batch, 2, d]`.
pub fn gated_residual(x: &[f32], y: &[f32], a: &[f32], seg: Segments) -> Vec<f32> {
    seg.check("gated_residual", y.len(), &[Some(a)]);
    assert_eq!(x.len(), y.len(), "gated_residual: x and y lengths");
    let d = seg.d;
    let chunk = rows_per_task(d) * d;
    crate::buffer::par_new(y.len(), chunk, 0.0, |i, out| {
        let r0 = i * chunk / d.max(1);
        for (k, o) in out.chunks_exact_mut(d).enumerate() {
            let r = r0 + k;
            let span = r * d..(r + 1) * d;
            residual_row(&x[span.clone()], &y[span], seg.param_row(a, r), o);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values as values;

    #[test]
    fn rows_take_their_stream_s_parameters_and_the_composed_values() {
        // Text-only and video-only sequences, a split inside, several batch entries, rows
        // longer and shorter than a vector, more rows than one task holds.
        for (batch, len, d, split) in [(1, 5, 3, 0), (2, 7, 20, 3), (3, 4, 16, 4), (2, 300, 64, 37)]
        {
            let seg = Segments {
                batch,
                len,
                d,
                split,
            };
            let n = batch * len * d;
            let (x, y) = (values(n, 1), values(n, 2));
            let (a, c) = (values(batch * 2 * d, 3), values(batch * 2 * d, 4));
            let pick = |p: &[f32], i: usize| {
                let (b, l, j) = (i / (len * d), (i / d) % len, i % d);
                p[(b * 2 + usize::from(l >= split)) * d + j]
            };
            let ss = scale_shift(&y, &a, Some(&c), seg);
            let s = scale_shift(&y, &a, None, seg);
            let r = gated_residual(&x, &y, &a, seg);
            for i in 0..n {
                assert_eq!(ss[i], y[i] * pick(&a, i) + pick(&c, i), "{seg:?} [{i}]");
                assert_eq!(s[i], y[i] * pick(&a, i), "{seg:?} [{i}]");
                assert_eq!(r[i], x[i] + y[i] * pick(&a, i), "{seg:?} [{i}]");
            }
        }
    }

    #[test]
    #[should_panic(expected = "a [batch, 2, d] parameter")]
    fn a_parameter_of_the_wrong_size_panics() {
        let seg = Segments {
            batch: 1,
            len: 2,
            d: 3,
            split: 1,
        };
        scale_shift(&[0.0; 6], &[1.0; 3], None, seg);
    }
}
