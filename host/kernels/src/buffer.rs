//! New output buffers initialised on rayon's threads.
//!
//! `vec![0.0; n]` zeroes the whole buffer on the calling thread before any parallel work (and,
//! for a buffer the allocator recycles, with a `memset` of its own): at the benchmark's sizes
//! that was a visible serial share of every kernel call. Here each task zeroes its own chunk
//! just before writing it, in its own thread and cache.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A buffer of `len` values, filled `chunk` values at a time on rayon's threads: `fill(i, c)`
/// gets the `i`-th chunk, set to `init`, to write.
pub fn par_new(
    len: usize,
    chunk: usize,
    init: f32,
    fill: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| {
            c.fill(MaybeUninit::new(init));
            // SAFETY: every element of `c` was initialised by the line above, and
            // `MaybeUninit<f32>` has `f32`'s layout.
            let c = unsafe { &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32]) };
            fill(i, c);
        });
    // SAFETY: the chunks cover `0..len` and each was initialised.
    unsafe { v.set_len(len) };
    v
}

/// `len` copies of `value`, set on rayon's threads.
pub fn par_filled(len: usize, value: f32) -> Vec<f32> {
    par_new(len, 1 << 14, value, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_initialised_then_filled_in_order() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (64, 64), (1000, 7)] {
            let v = par_new(len, chunk, 2.0, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    if j % 2 == 0 {
                        *x = (i * chunk + j) as f32;
                    }
                }
            });
            assert_eq!(v.len(), len);
            for (k, &x) in v.iter().enumerate() {
                let want = if (k % chunk) % 2 == 0 { k as f32 } else { 2.0 };
                assert_eq!(x, want, "len {len} chunk {chunk} element {k}");
            }
        }
        assert_eq!(par_filled(5, -1.5), vec![-1.5; 5]);
    }
}
