//! Copying a strided view into a contiguous row-major buffer, whole rows at a time: what a
//! transpose of a tensor's outer axes (heads and tokens) costs when its last axis stays in
//! place.

/// Rows copied per rayon task.
const ROWS_PER_TASK: usize = 256;

/// The elements of the view `(offset, shape, strides)` of `src` in row-major order. The last
/// axis must have stride 1: each row is one slice copy. Rows run on rayon's current pool.
///
/// Panics when the last stride is not 1 or the view reaches outside `src`.
pub fn gather_rows(src: &[f32], offset: usize, shape: &[usize], strides: &[usize]) -> Vec<f32> {
    assert_eq!(shape.len(), strides.len(), "gather_rows: shape and strides");
    let n: usize = shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    let (row, outer) = match shape.split_last() {
        Some((&row, outer)) => (row, outer),
        None => return vec![src[offset]],
    };
    assert!(
        row == 1 || strides[shape.len() - 1] == 1,
        "gather_rows: the last axis must have stride 1"
    );
    let last = offset
        + shape
            .iter()
            .zip(strides)
            .map(|(&len, &s)| (len - 1) * s)
            .sum::<usize>();
    assert!(
        last < src.len(),
        "gather_rows: the view reaches element {last} of {}",
        src.len()
    );
    // The source offset of row `r` (row-major over the outer axes).
    let row_start = |mut r: usize| {
        let mut at = offset;
        for (&len, &s) in outer.iter().zip(strides).rev() {
            at += (r % len) * s;
            r /= len;
        }
        at
    };
    crate::buffer::par_new(n, row * ROWS_PER_TASK, 0.0, |t, chunk| {
        for (i, out) in chunk.chunks_exact_mut(row).enumerate() {
            let at = row_start(t * ROWS_PER_TASK + i);
            out.copy_from_slice(&src[at..at + row]);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element by element, the way the view is defined.
    fn naive(src: &[f32], offset: usize, shape: &[usize], strides: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut e| {
                let mut at = offset;
                for (&len, &s) in shape.iter().zip(strides).rev() {
                    at += (e % len) * s;
                    e /= len;
                }
                src[at]
            })
            .collect()
    }

    #[test]
    fn swapped_token_and_head_axes_equal_the_element_walk() {
        // [B, L, H, D] stored, viewed as [B, H, L, D] (and back), with an offset and a number
        // of rows that is not a multiple of a task.
        let (b, l, h, d) = (2, 300, 3, 5);
        let src: Vec<f32> = (0..7 + b * l * h * d).map(|x| x as f32).collect();
        let shape = [b, h, l, d];
        let strides = [l * h * d, d, h * d, 1];
        assert_eq!(
            gather_rows(&src, 7, &shape, &strides),
            naive(&src, 7, &shape, &strides)
        );
        let contiguous = [h * l * d, l * d, d, 1];
        assert_eq!(
            gather_rows(&src, 0, &shape, &contiguous),
            src[..b * h * l * d].to_vec()
        );
        // Broadcast (stride 0) outer axes and a single element.
        assert_eq!(
            gather_rows(&src, 2, &[4, 2, 3], &[0, 3, 1]),
            naive(&src, 2, &[4, 2, 3], &[0, 3, 1])
        );
        assert_eq!(gather_rows(&src, 9, &[], &[]), vec![9.0]);
        assert!(gather_rows(&src, 0, &[0, 4], &[4, 1]).is_empty());
    }

    #[test]
    #[should_panic(expected = "reaches element")]
    fn a_view_past_the_buffer_panics() {
        gather_rows(&[0.0; 10], 0, &[3, 4], &[4, 1]);
    }
}
