//! ZeRO-2 and optimizer offload: each rank owns a share of the trainable tensors (whole
//! tensors, balanced by size) and keeps their AdamW states alone. Per update the gradients are
//! reduce-scattered (each rank receives the sums of the tensors it owns), the global gradient
//! norm is summed from the owners' parts, each rank clips and steps its tensors, and the
//! updated tensors are all-gathered into every rank's model. With `optimizer_offload` the
//! states live in host memory and step on the CPU backend.
//!
//! Checkpoints gather the whole state at rank 0 in the replicated layout, so a run resumes
//! with any world size and either stage.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use cogvx_dist::Collective;
use cogvx_model_core::adapter::AdapterTensor;
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_train::{AdamW, AdamWConfig, HostAdamState};

use crate::checkpoint::{tensors_from_host, HostTensors};
use crate::dist::GradLayout;
use crate::{input, TrainerError};

/// A run's sharded (or offloaded) optimizer.
pub(crate) struct Zero<B: Backend> {
    pub(crate) sharding: Sharding,
    pub(crate) optimizer: ShardOptimizer<B>,
    /// Sharded across the ranks (`zero_stage = 2`); else every rank owns every tensor and the
    /// gradients are all-reduced first (offload alone).
    pub(crate) across: bool,
    /// SFT in half precision: the f32 master weights of this rank's tensors, in host memory
    /// (the model holds their half-precision copies, rounded after every update).
    pub(crate) masters: Option<BTreeMap<String, Vec<f32>>>,
}

impl<B: Backend> Zero<B> {
    /// The collective of the shards: the run's, or one process when nothing is sharded.
    pub(crate) fn world<'w>(&self, world: &'w dyn Collective) -> &'w dyn Collective {
        if self.across {
            world
        } else {
            &cogvx_dist::Solo
        }
    }
}

/// Which rank owns each trainable tensor, and where its values sit in the rank's block.
pub(crate) struct Sharding {
    /// (name, shape, owner, offset of its flag in the owner's gradient block, offset in the
    /// owner's state block), in the layout's order.
    tensors: Vec<(String, Vec<usize>, usize, usize, usize)>,
    rank: usize,
    ws: usize,
    /// The longest rank block of gradients (a flag and the values per owned tensor).
    grad_block: usize,
    /// The longest rank block of optimizer states (a flag, the step, exp_avg, exp_avg_sq).
    state_block: usize,
}

impl Sharding {
    /// Whole tensors to ranks, largest first, each to the rank holding the fewest values so far
    /// (ties: the lower rank; the same on every rank).
    pub(crate) fn new(layout: &GradLayout, ws: usize, rank: usize) -> Self {
        let mut by_size: Vec<usize> = (0..layout.tensors.len()).collect();
        let len = |i: usize| layout.tensors[i].1.iter().product::<usize>();
        by_size.sort_by_key(|&i| (std::cmp::Reverse(len(i)), i));
        let mut load = vec![0usize; ws.max(1)];
        let mut owner = vec![0usize; layout.tensors.len()];
        for i in by_size {
            let r = (0..load.len())
                .min_by_key(|&r| (load[r], r))
                .expect("ranks");
            owner[i] = r;
            load[r] += len(i);
        }
        let mut grad_at = vec![0usize; load.len()];
        let mut state_at = vec![0usize; load.len()];
        let tensors = layout
            .tensors
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let o = owner[i];
                let n = len(i);
                let t = (name.clone(), shape.clone(), o, grad_at[o], state_at[o]);
                grad_at[o] += 1 + n;
                state_at[o] += 2 + 2 * n;
                t
            })
            .collect();
        Sharding {
            tensors,
            rank,
            ws: ws.max(1),
            grad_block: grad_at.into_iter().max().unwrap_or(0),
            state_block: state_at.into_iter().max().unwrap_or(0),
        }
    }

    /// Whether this rank owns `name`.
    pub(crate) fn owns(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.0 == name && t.2 == self.rank)
    }

    /// This rank's tensors of `values` (the model's trainable tensors), as f32 host values.
    pub(crate) fn owned_on_host<B: Backend>(
        &self,
        values: BTreeMap<String, AdapterTensor<B>>,
    ) -> BTreeMap<String, Vec<f32>> {
        values
            .into_iter()
            .filter(|(k, _)| self.owns(k))
            .map(|(k, v)| (k, v.to_vec()))
            .collect()
    }

    /// The share of the trainable values this rank owns.
    pub(crate) fn owned_values(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.2 == self.rank)
            .map(|t| t.1.iter().product::<usize>())
            .sum()
    }
}

/// Which blocks a buffer of tensors spans: this rank's only, or every rank's in rank order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocks {
    Mine,
    All,
}

impl Sharding {
    /// A buffer of the gradient layout: for each tensor `get` has a value for (in `Mine`, only
    /// this rank's tensors), a set flag and the values at the tensor's place in its owner's block.
    fn pack<'v>(&self, blocks: Blocks, get: impl Fn(&str) -> Option<&'v [f32]>) -> Vec<f32> {
        let block = self.grad_block;
        let ranks = if blocks == Blocks::All { self.ws } else { 1 };
        let mut buf = vec![0f32; block * ranks];
        for (name, shape, owner, at, _) in &self.tensors {
            if blocks == Blocks::Mine && *owner != self.rank {
                continue;
            }
            if let Some(v) = get(name) {
                let n = shape.iter().product::<usize>();
                let at = if blocks == Blocks::All {
                    owner * block + at
                } else {
                    *at
                };
                buf[at] = 1.0;
                buf[at + 1..at + 1 + n].copy_from_slice(&v[..n]);
            }
        }
        buf
    }

    /// The flagged tensors of a buffer laid out by [`Sharding::pack`].
    fn unpack(&self, blocks: Blocks, buf: &[f32]) -> HostTensors {
        let block = self.grad_block;
        let mut out = BTreeMap::new();
        for (name, shape, owner, at, _) in &self.tensors {
            let at = match blocks {
                Blocks::All => owner * block + at,
                Blocks::Mine if *owner == self.rank => *at,
                Blocks::Mine => continue,
            };
            if buf[at] > 0.0 {
                let n = shape.iter().product::<usize>();
                out.insert(
                    name.clone(),
                    (shape.clone(), buf[at + 1..at + 1 + n].to_vec()),
                );
            }
        }
        out
    }
}

/// The AdamW of a rank's tensors: on the training device, or in host memory (offload).
pub(crate) enum ShardOptimizer<B: Backend> {
    Device(AdamW<B>, B::Device),
    Host(AdamW<CpuBackend>),
}

impl<B: Backend> ShardOptimizer<B> {
    pub(crate) fn new(config: AdamWConfig, offload: bool, device: &B::Device) -> Self {
        if offload {
            ShardOptimizer::Host(AdamW::new(config))
        } else {
            ShardOptimizer::Device(AdamW::new(config), device.clone())
        }
    }

    fn state_to_host(&self) -> BTreeMap<String, HostAdamState> {
        match self {
            ShardOptimizer::Device(o, _) => o.state_to_host(),
            ShardOptimizer::Host(o) => o.state_to_host(),
        }
    }

    /// Loads the states of the tensors `sharding` gives this rank.
    pub(crate) fn load_owned(
        &mut self,
        all: &BTreeMap<String, HostAdamState>,
        sharding: &Sharding,
    ) -> Result<(), TrainerError> {
        let mine: BTreeMap<String, HostAdamState> = all
            .iter()
            .filter(|(k, _)| sharding.owns(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match self {
            ShardOptimizer::Device(o, d) => o.load_state(&mine, d)?,
            ShardOptimizer::Host(o) => o.load_state(&mine, &CpuDevice::default())?,
        }
        Ok(())
    }

    /// One AdamW step of `params` with `grads` (host values by name); the updated values.
    fn step(
        &mut self,
        lr: f64,
        params: HostTensors,
        grads: &HostTensors,
    ) -> Result<BTreeMap<String, Vec<f32>>, TrainerError> {
        match self {
            ShardOptimizer::Device(o, d) => step_on(o, lr, params, grads, &d.clone()),
            ShardOptimizer::Host(o) => step_on(o, lr, params, grads, &CpuDevice::default()),
        }
    }
}

fn step_on<O: Backend>(
    opt: &mut AdamW<O>,
    lr: f64,
    params: HostTensors,
    grads: &HostTensors,
    device: &O::Device,
) -> Result<BTreeMap<String, Vec<f32>>, TrainerError> {
    let mut p = tensors_from_host::<O>(&params, device).map_err(TrainerError::Input)?;
    let g = tensors_from_host::<O>(grads, device).map_err(TrainerError::Input)?;
    opt.step(lr, &mut p, &g)?;
    Ok(p.into_iter().map(|(k, t)| (k, t.to_vec())).collect())
}

/// The state of one sharded update after the reduce-scatter: this rank's tensors' summed
/// gradients (those some rank had), and the global gradient norm.
pub(crate) struct Reduced {
    grads: HostTensors,
    pub(crate) norm: f64,
}

/// Reduce-scatters this rank's (weighted) gradients to their owners and all-reduces `extras`
/// with the owners' parts of the squared gradient norm.
pub(crate) fn reduce_scatter<B: Backend>(
    world: &dyn Collective,
    sharding: &Sharding,
    mut grads: BTreeMap<String, AdapterTensor<B>>,
    extras: &mut Vec<f32>,
) -> Result<Reduced, TrainerError> {
    let mut host = BTreeMap::new();
    for (name, shape, _, _, _) in &sharding.tensors {
        if let Some(g) = grads.remove(name) {
            let v = g.to_vec();
            let n = shape.iter().product::<usize>();
            if v.len() != n {
                return input(format!(
                    "the gradient of `{name}` has {} values, its parameter {n}",
                    v.len()
                ));
            }
            host.insert(name.clone(), v);
        }
    }
    if let Some(name) = grads.keys().next() {
        return input(format!(
            "a gradient for `{name}`, which is not a trainable parameter"
        ));
    }
    let buf = sharding.pack(Blocks::All, |n| host.get(n).map(Vec::as_slice));
    drop(host);
    let mine = world.reduce_scatter_sum(&buf);
    let out = sharding.unpack(Blocks::Mine, &mine);
    // As `total_grad_norm`: each tensor's norm in f32, squared and summed.
    let sum_sq: f64 = out
        .values()
        .map(|(_, v)| {
            let norm = (v
                .iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt()) as f32 as f64;
            norm * norm
        })
        .sum();
    extras.push(sum_sq as f32);
    world.all_reduce_sum(extras);
    let total = extras.pop().expect("pushed") as f64;
    Ok(Reduced {
        grads: out,
        norm: total.max(0.0).sqrt(),
    })
}

/// Clips this rank's gradients by the global norm (as `clip_grad_norm_`), steps its tensors
/// and all-gathers every updated tensor; returns them by name (those some rank had a gradient
/// for) to be written into the model.
pub(crate) fn step_and_gather(
    world: &dyn Collective,
    sharding: &Sharding,
    optimizer: &mut ShardOptimizer<impl Backend>,
    mut reduced: Reduced,
    params: &BTreeMap<String, Vec<f32>>,
    lr: f64,
    max_grad_norm: f64,
) -> Result<HostTensors, TrainerError> {
    if !reduced.norm.is_finite() {
        return input(format!(
            "the gradient norm is {} (non-finite gradients); lower the learning rate",
            reduced.norm
        ));
    }
    let coef = ((max_grad_norm as f32) / (reduced.norm as f32 + 1e-6)).min(1.0);
    if coef < 1.0 {
        for (_, v) in reduced.grads.values_mut() {
            v.iter_mut().for_each(|x| *x *= coef);
        }
    }
    let mine: HostTensors = reduced
        .grads
        .iter()
        .map(|(k, (shape, _))| {
            let p = params
                .get(k)
                .ok_or_else(|| TrainerError::Input(format!("no parameter `{k}`")))?;
            Ok((k.clone(), (shape.clone(), p.clone())))
        })
        .collect::<Result<_, TrainerError>>()?;
    let updated = optimizer.step(lr, mine, &reduced.grads)?;
    let buf = sharding.pack(Blocks::Mine, |n| updated.get(n).map(Vec::as_slice));
    let all = world.all_gather_f32(&buf);
    Ok(sharding.unpack(Blocks::All, &all))
}

/// Every rank's `values` of the tensors it owns (the f32 master weights) gathered at rank 0
/// (`None` on the others).
pub(crate) fn gather_values(
    world: &dyn Collective,
    sharding: &Sharding,
    values: &BTreeMap<String, Vec<f32>>,
) -> Option<HostTensors> {
    let buf = sharding.pack(Blocks::Mine, |n| values.get(n).map(Vec::as_slice));
    let all = world.gather_f32(&buf)?;
    Some(sharding.unpack(Blocks::All, &all))
}

/// Every rank's optimizer states gathered at rank 0 (`None` on the others), in the layout of a
/// replicated optimizer's checkpoint.
pub(crate) fn gather_states(
    world: &dyn Collective,
    sharding: &Sharding,
    optimizer: &ShardOptimizer<impl Backend>,
) -> Option<BTreeMap<String, HostAdamState>> {
    let states = optimizer.state_to_host();
    let block = sharding.state_block;
    let mut buf = vec![0f32; block];
    for (name, shape, owner, _, at) in &sharding.tensors {
        if *owner != sharding.rank {
            continue;
        }
        if let Some(s) = states.get(name) {
            let n = shape.iter().product::<usize>();
            buf[*at] = 1.0;
            buf[at + 1] = s.step as f32;
            buf[at + 2..at + 2 + n].copy_from_slice(&s.exp_avg);
            buf[at + 2 + n..at + 2 + 2 * n].copy_from_slice(&s.exp_avg_sq);
        }
    }
    let all = world.gather_f32(&buf)?;
    let mut out = BTreeMap::new();
    for (name, shape, owner, _, at) in &sharding.tensors {
        let at = owner * block + at;
        if all[at] > 0.0 {
            let n = shape.iter().product::<usize>();
            out.insert(
                name.clone(),
                HostAdamState {
                    step: all[at + 1].round() as u64,
                    shape: shape.clone(),
                    exp_avg: all[at + 2..at + 2 + n].to_vec(),
                    exp_avg_sq: all[at + 2 + n..at + 2 + 2 * n].to_vec(),
                },
            );
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(sizes: &[(&str, Vec<usize>)]) -> GradLayout {
        GradLayout {
            tensors: sizes
                .iter()
                .map(|(k, s)| (k.to_string(), s.clone()))
                .collect(),
        }
    }

    #[test]
    fn tensors_are_shared_out_whole_and_balanced_by_size() {
        let l = layout(&[
            ("a", vec![100]),
            ("b", vec![10, 10]),
            ("c", vec![60]),
            ("d", vec![40]),
            ("e", vec![1]),
        ]);
        let r0 = Sharding::new(&l, 2, 0);
        let r1 = Sharding::new(&l, 2, 1);
        // 100 (a) and 100 (b) first, then c to rank 0 (ties: lower rank), d to rank 1, e to rank 1.
        assert!(r0.owns("a") && r1.owns("b") && r0.owns("c") && r1.owns("d") && r1.owns("e"));
        assert_eq!((r0.owned_values(), r1.owned_values()), (160, 141));
        for name in ["a", "b", "c", "d", "e"] {
            assert!(r0.owns(name) != r1.owns(name), "{name} has one owner");
        }
        let one = Sharding::new(&l, 1, 0);
        assert_eq!(one.owned_values(), 301);
    }

    #[test]
    fn one_rank_steps_as_the_replicated_adamw_and_its_states_gather_whole() {
        type B = CpuBackend;
        let dev = CpuDevice::default();
        let l = layout(&[("w", vec![2, 2]), ("b", vec![2])]);
        let sh = Sharding::new(&l, 1, 0);
        let solo = cogvx_dist::Solo;
        let config = AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        };
        let params: BTreeMap<String, Vec<f32>> = [
            ("w".to_string(), vec![0.5, -0.5, 1.0, 2.0]),
            ("b".to_string(), vec![0.1, 0.2]),
        ]
        .into();
        let grads: BTreeMap<String, AdapterTensor<B>> = [
            (
                "w".to_string(),
                AdapterTensor::from_vec(&[2, 2], vec![3.0, -4.0, 0.0, 1.0], &dev).unwrap(),
            ),
            (
                "b".to_string(),
                AdapterTensor::from_vec(&[2], vec![1.0, 1.0], &dev).unwrap(),
            ),
        ]
        .into();
        // The replicated AdamW with clipping at 1.0, on the same values.
        let mut want_p: BTreeMap<String, AdapterTensor<B>> = params
            .iter()
            .map(|(k, v)| {
                let shape = if k == "w" { vec![2, 2] } else { vec![2] };
                (
                    k.clone(),
                    AdapterTensor::from_vec(&shape, v.clone(), &dev).unwrap(),
                )
            })
            .collect();
        let mut want_g = grads.clone();
        let want_norm = cogvx_train::clip_grad_norm(&mut want_g, 1.0).unwrap();
        let mut reference = AdamW::<B>::new(config);
        reference.step(1e-2, &mut want_p, &want_g).unwrap();

        for offload in [false, true] {
            let mut opt = ShardOptimizer::<B>::new(config, offload, &dev);
            let mut extras = vec![2.0f32];
            let reduced = reduce_scatter(&solo, &sh, grads.clone(), &mut extras).unwrap();
            assert_eq!(extras, [2.0]);
            assert!((reduced.norm - want_norm).abs() < 1e-6 * want_norm);
            let got = step_and_gather(&solo, &sh, &mut opt, reduced, &params, 1e-2, 1.0).unwrap();
            for (k, p) in &want_p {
                for (a, b) in got[k].1.iter().zip(p.to_vec()) {
                    assert!((a - b).abs() < 1e-6, "{k}: {a} vs {b}");
                }
            }
            let states = gather_states(&solo, &sh, &opt).unwrap();
            let want = reference.state_to_host();
            assert_eq!(
                states.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            );
            for (k, s) in &states {
                assert_eq!((s.step, &s.shape), (want[k].step, &want[k].shape));
                for (a, b) in s.exp_avg.iter().zip(&want[k].exp_avg) {
                    assert!((a - b).abs() < 1e-6);
                }
            }
            // Loading them back keeps this rank's tensors.
            let mut again = ShardOptimizer::<B>::new(config, offload, &dev);
            again.load_owned(&states, &sh).unwrap();
            assert_eq!(again.state_to_host().len(), 2);
        }
    }
}
