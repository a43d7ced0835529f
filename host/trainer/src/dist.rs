//! The data-parallel side of a run ([`cogvx_dist::Collective`]): which micro-batches a rank
//! trains, the one all-reduce per optimizer step (gradients weighted by sample counts, the
//! losses, the timesteps drawn and the captions dropped), and the start-up check that every
//! rank runs the same job.
//!
//! A micro-step of a run of `W` processes is `W` consecutive micro-batches of the epoch
//! ([`crate::epoch_batches`], each of `batch_size` samples): rank `r` trains the `r`-th. Its
//! gradient is the mean over every sample of the micro-step (each rank's mean weighted by its
//! share of the samples), so two processes of batch 1 make the update of one process of batch
//! 2; the data position counts micro-batches, the same unit whatever the world size, so a run
//! resumes with another one.

use std::collections::BTreeMap;

use cogvx_dist::Collective;
use cogvx_model_core::adapter::AdapterTensor;

use crate::{input, TrainerError};

/// The trainable tensors' names and shapes, in the order the gradient buffer lays them out.
pub(crate) struct GradLayout {
    pub(crate) tensors: Vec<(String, Vec<usize>)>,
}

impl GradLayout {
    pub(crate) fn new<B: burn::tensor::backend::Backend>(
        values: &BTreeMap<String, AdapterTensor<B>>,
    ) -> Self {
        GradLayout {
            tensors: values.iter().map(|(k, v)| (k.clone(), v.shape())).collect(),
        }
    }

    /// The number of trainable values.
    pub(crate) fn values(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    fn len(&self) -> usize {
        self.tensors.len() + self.values()
    }
}

/// Sums `grads` (this rank's, already weighted) and `extras` over the ranks in one all-reduce.
/// A tensor no rank has a gradient for stays absent (AdamW skips it, as in one process); one
/// some rank lacks counts as zeros there.
pub(crate) fn all_reduce_step<B: burn::tensor::backend::Backend>(
    world: &dyn Collective,
    layout: &GradLayout,
    mut grads: BTreeMap<String, AdapterTensor<B>>,
    extras: &mut [f32],
    device: &B::Device,
) -> Result<BTreeMap<String, AdapterTensor<B>>, TrainerError> {
    let t = layout.tensors.len();
    let mut buf = vec![0f32; layout.len() + extras.len()];
    let mut at = t;
    for (i, (name, shape)) in layout.tensors.iter().enumerate() {
        let len = shape.iter().product::<usize>();
        if let Some(g) = grads.remove(name) {
            buf[i] = 1.0;
            let v = g.to_vec();
            if v.len() != len {
                return input(format!(
                    "the gradient of `{name}` has {} values, its parameter {len}",
                    v.len()
                ));
            }
            buf[at..at + len].copy_from_slice(&v);
        }
        at += len;
    }
    if let Some(name) = grads.keys().next() {
        return input(format!(
            "a gradient for `{name}`, which is not a trainable parameter"
        ));
    }
    buf[at..].copy_from_slice(extras);
    world.all_reduce_sum(&mut buf);
    let mut out = BTreeMap::new();
    let mut at = t;
    for (i, (name, shape)) in layout.tensors.iter().enumerate() {
        let len = shape.iter().product::<usize>();
        if buf[i] > 0.0 {
            let g = AdapterTensor::from_vec(shape, buf[at..at + len].to_vec(), device).ok_or_else(
                || TrainerError::Input(format!("`{name}` has shape {shape:?}, not rank 1 or 2")),
            )?;
            out.insert(name.clone(), g);
        }
        at += len;
    }
    extras.copy_from_slice(&buf[at..]);
    Ok(out)
}

/// Refuses to start unless every rank runs the same job: `job` (the configs, the cache's
/// samples, the checkpoint resumed) hashed on each rank and compared with rank 0's.
pub(crate) fn check_same_job(world: &dyn Collective, job: &[u8]) -> Result<(), TrainerError> {
    cogvx_dist::check_same_job(world, job).map_err(|e| TrainerError::Input(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use cogvx_dist::Solo;

    type B = NdArray<f32>;

    /// Two ranks in one process: the sum of both ranks' buffers, as MPI would give each.
    struct Pair {
        other: Vec<f32>,
    }

    impl Collective for Pair {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, values: &mut [f32]) {
            assert_eq!(values.len(), self.other.len());
            for (v, o) in values.iter_mut().zip(&self.other) {
                *v += o;
            }
        }
        fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
            let mut v = values.to_vec();
            v.push(values[0] ^ 1);
            v
        }
        fn reduce_scatter_sum(&self, values: &[f32]) -> Vec<f32> {
            let block = values.len() / 2;
            (0..block).map(|i| values[i] + self.other[i]).collect()
        }
        fn all_gather_f32(&self, values: &[f32]) -> Vec<f32> {
            let mut v = values.to_vec();
            v.extend_from_slice(&self.other[..values.len()]);
            v
        }
        fn gather_f32(&self, values: &[f32]) -> Option<Vec<f32>> {
            Some(self.all_gather_f32(values))
        }
        fn barrier(&self) {}
        fn describe(&self) -> String {
            "pair".into()
        }
    }

    fn tensors(items: &[(&str, Vec<usize>, Vec<f32>)]) -> BTreeMap<String, AdapterTensor<B>> {
        items
            .iter()
            .map(|(k, s, v)| {
                (
                    k.to_string(),
                    AdapterTensor::from_vec(s, v.clone(), &Default::default()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_step_buffer_sums_gradients_and_extras_and_keeps_absent_tensors_absent() {
        let values = tensors(&[
            ("a", vec![2], vec![0.0; 2]),
            ("b", vec![2, 2], vec![0.0; 4]),
            ("c", vec![1], vec![0.0]),
        ]);
        let layout = GradLayout::new(&values);
        // This rank has `a` and `b`; the other rank `b` only (its buffer laid out the same way:
        // presence flags a, b, c, then a's 2, b's 4, c's 1 values, then 2 extras).
        let mine = tensors(&[
            ("a", vec![2], vec![1.0, 2.0]),
            ("b", vec![2, 2], vec![1.0, 1.0, 1.0, 1.0]),
        ]);
        let other = vec![0., 1., 0., 0., 0., 10., 20., 30., 40., 0., 5., 0.5];
        let mut extras = [1.0f32, 0.25];
        let out = all_reduce_step(
            &Pair { other },
            &layout,
            mine,
            &mut extras,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(out["a"].to_vec(), [1.0, 2.0]);
        assert_eq!(out["b"].to_vec(), [11.0, 21.0, 31.0, 41.0]);
        assert_eq!(out["b"].shape(), [2, 2]);
        assert_eq!(extras, [6.0, 0.75]);

        // One process: the gradients come back as they were.
        let one = tensors(&[("c", vec![1], vec![3.0])]);
        let out = all_reduce_step(&Solo, &layout, one, &mut [], &Default::default()).unwrap();
        assert_eq!(out["c"].to_vec(), [3.0]);
        // A gradient outside the layout is an error, not a silent drop.
        let stray = tensors(&[("z", vec![1], vec![3.0])]);
        assert!(all_reduce_step(&Solo, &layout, stray, &mut [], &Default::default()).is_err());
    }
}
