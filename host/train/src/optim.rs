//! Global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`) and AdamW with PyTorch's
//! semantics (`torch.optim.AdamW`, single-tensor path), over named adapter tensors.

use crate::error::{invalid, TrainError};
use burn::tensor::{backend::Backend, ElementConversion, Tensor};
use cogvx_model_core::adapter::AdapterTensor;
use std::collections::BTreeMap;

fn sum_sq<B: Backend>(t: &AdapterTensor<B>) -> f64 {
    match t {
        AdapterTensor::Vector(t) => t.clone().powi_scalar(2).sum().into_scalar().elem::<f64>(),
        AdapterTensor::Matrix(t) => t.clone().powi_scalar(2).sum().into_scalar().elem::<f64>(),
    }
}

fn scale<B: Backend>(t: AdapterTensor<B>, f: f64) -> AdapterTensor<B> {
    match t {
        AdapterTensor::Vector(t) => AdapterTensor::Vector(t.mul_scalar(f)),
        AdapterTensor::Matrix(t) => AdapterTensor::Matrix(t.mul_scalar(f)),
    }
}

/// The global L2 norm of all gradients: the norm of the per-tensor norms, as `clip_grad_norm_`.
pub fn total_grad_norm<B: Backend>(grads: &BTreeMap<String, AdapterTensor<B>>) -> f64 {
    grads
        .values()
        .map(|g| {
            let n = sum_sq(g).sqrt() as f32 as f64;
            n * n
        })
        .sum::<f64>()
        .sqrt()
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: computes the total norm over all
/// gradients, scales every gradient by `min(1, max_norm / (total + 1e-6))` and returns the
/// total norm before clipping. A non-finite norm is an error (torch's `error_if_nonfinite`).
pub fn clip_grad_norm<B: Backend>(
    grads: &mut BTreeMap<String, AdapterTensor<B>>,
    max_norm: f64,
) -> Result<f64, TrainError> {
    let total = total_grad_norm(grads);
    if !total.is_finite() {
        let bad: Vec<&str> = grads
            .iter()
            .filter(|(_, g)| !sum_sq(*g).is_finite())
            .map(|(n, _)| n.as_str())
            .collect();
        return invalid(format!(
            "the gradient norm is {total} (non-finite gradients in {}); lower the learning rate",
            bad.join(", ")
        ));
    }
    // torch computes the coefficient in float32.
    let coef = ((max_norm as f32) / (total as f32 + 1e-6)).min(1.0) as f64;
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = scale(g.clone(), coef);
        }
    }
    Ok(total)
}

/// `torch.optim.AdamW` hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Reads `{"lr", "betas": [b1, b2], "eps", "weight_decay"}` (missing keys keep PyTorch's defaults).
    pub fn from_json(v: &serde_json::Value) -> Result<Self, TrainError> {
        let mut c = AdamWConfig::default();
        let num = |k: &str| -> Result<Option<f64>, TrainError> {
            match v.get(k) {
                None => Ok(None),
                Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                    TrainError::Invalid(format!("optimizer `{k}` is not a number: {x}"))
                }),
            }
        };
        if let Some(x) = num("lr")? {
            c.lr = x;
        }
        if let Some(x) = num("eps")? {
            c.eps = x;
        }
        if let Some(x) = num("weight_decay")? {
            c.weight_decay = x;
        }
        if let Some(b) = v.get("betas") {
            match b
                .as_array()
                .map(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
            {
                Some(Some(a)) if a.len() == 2 => {
                    c.beta1 = a[0];
                    c.beta2 = a[1];
                }
                _ => return invalid(format!("optimizer `betas` must be two numbers, got {b}")),
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Refuses values torch refuses.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.lr.is_nan() || self.lr < 0.0 {
            return invalid(format!("invalid learning rate {}", self.lr));
        }
        if self.eps.is_nan() || self.eps < 0.0 {
            return invalid(format!("invalid epsilon {}", self.eps));
        }
        for (i, b) in [self.beta1, self.beta2].iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return invalid(format!(
                    "invalid beta parameter at index {i}: {b} (must be in [0, 1))"
                ));
            }
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return invalid(format!("invalid weight_decay {}", self.weight_decay));
        }
        Ok(())
    }
}

/// AdamW state of one parameter (`step`, `exp_avg`, `exp_avg_sq`, as torch's state dict).
#[derive(Clone, Debug)]
pub struct AdamState<B: Backend> {
    pub step: u64,
    pub exp_avg: AdapterTensor<B>,
    pub exp_avg_sq: AdapterTensor<B>,
}

/// AdamW over named parameters; state is kept per name.
#[derive(Clone, Debug)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub state: BTreeMap<String, AdamState<B>>,
}

fn zeros_like<B: Backend>(t: &AdapterTensor<B>) -> AdapterTensor<B> {
    match t {
        AdapterTensor::Vector(t) => AdapterTensor::Vector(t.zeros_like()),
        AdapterTensor::Matrix(t) => AdapterTensor::Matrix(t.zeros_like()),
    }
}

/// One AdamW update of a single tensor (torch `_single_tensor_adamw`); returns `(param, exp_avg, exp_avg_sq)`.
#[allow(clippy::too_many_arguments)]
fn update<B: Backend, const D: usize>(
    p: Tensor<B, D>,
    g: Tensor<B, D>,
    m: Tensor<B, D>,
    v: Tensor<B, D>,
    c: &AdamWConfig,
    lr: f64,
    step: u64,
) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
    let p = p.mul_scalar(1.0 - lr * c.weight_decay);
    // exp_avg.lerp_(grad, 1 - beta1)
    let m = m.clone() + (g.clone() - m).mul_scalar(1.0 - c.beta1);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v = v.mul_scalar(c.beta2) + (g.clone() * g).mul_scalar(1.0 - c.beta2);
    let bc1 = 1.0 - c.beta1.powi(step as i32);
    let bc2 = 1.0 - c.beta2.powi(step as i32);
    let step_size = lr / bc1;
    let denom = v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(c.eps);
    let p = p - (m.clone() / denom).mul_scalar(step_size);
    (p, m, v)
}

/// Host copy of one parameter's AdamW state, for checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct HostAdamState {
    pub step: u64,
    pub shape: Vec<usize>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            state: BTreeMap::new(),
        }
    }

    /// The state of every parameter on the host (what a checkpoint stores).
    pub fn state_to_host(&self) -> BTreeMap<String, HostAdamState> {
        self.state
            .iter()
            .map(|(k, s)| {
                let h = HostAdamState {
                    step: s.step,
                    shape: s.exp_avg.shape(),
                    exp_avg: s.exp_avg.to_vec(),
                    exp_avg_sq: s.exp_avg_sq.to_vec(),
                };
                (k.clone(), h)
            })
            .collect()
    }

    /// Restores the state saved by [`Self::state_to_host`] (replacing the current one).
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, HostAdamState>,
        device: &B::Device,
    ) -> Result<(), TrainError> {
        let mut out = BTreeMap::new();
        for (k, h) in state {
            let make = |v: &Vec<f32>| {
                AdapterTensor::from_vec(&h.shape, v.clone(), device).ok_or_else(|| {
                    TrainError::Invalid(format!(
                        "optimizer state of `{k}`: shape {:?} does not fit {} values",
                        h.shape,
                        v.len()
                    ))
                })
            };
            out.insert(
                k.clone(),
                AdamState {
                    step: h.step,
                    exp_avg: make(&h.exp_avg)?,
                    exp_avg_sq: make(&h.exp_avg_sq)?,
                },
            );
        }
        self.state = out;
        Ok(())
    }

    /// Updates every parameter that has a gradient (as torch, parameters without one are left
    /// alone and their step count does not advance), at learning rate `lr` (the schedule's
    /// current value; `config.lr` is the base).
    pub fn step(
        &mut self,
        lr: f64,
        params: &mut BTreeMap<String, AdapterTensor<B>>,
        grads: &BTreeMap<String, AdapterTensor<B>>,
    ) -> Result<(), TrainError> {
        for (name, g) in grads {
            let Some(p) = params.get_mut(name) else {
                return invalid(format!(
                    "gradient for `{name}`, which is not a parameter being optimised"
                ));
            };
            if p.shape() != g.shape() {
                return invalid(format!(
                    "`{name}`: parameter {:?} and gradient {:?} differ in shape",
                    p.shape(),
                    g.shape()
                ));
            }
            let st = self.state.entry(name.clone()).or_insert_with(|| AdamState {
                step: 0,
                exp_avg: zeros_like(g),
                exp_avg_sq: zeros_like(g),
            });
            if st.exp_avg.shape() != g.shape() {
                return invalid(format!(
                    "`{name}`: optimizer state {:?} does not match the parameter {:?}",
                    st.exp_avg.shape(),
                    g.shape()
                ));
            }
            st.step += 1;
            let c = self.config;
            let (np, nm, nv) = match (
                p.clone(),
                g.clone(),
                st.exp_avg.clone(),
                st.exp_avg_sq.clone(),
            ) {
                (
                    AdapterTensor::Vector(p),
                    AdapterTensor::Vector(g),
                    AdapterTensor::Vector(m),
                    AdapterTensor::Vector(v),
                ) => {
                    let (p, m, v) = update(p, g, m, v, &c, lr, st.step);
                    (
                        AdapterTensor::Vector(p),
                        AdapterTensor::Vector(m),
                        AdapterTensor::Vector(v),
                    )
                }
                (
                    AdapterTensor::Matrix(p),
                    AdapterTensor::Matrix(g),
                    AdapterTensor::Matrix(m),
                    AdapterTensor::Matrix(v),
                ) => {
                    let (p, m, v) = update(p, g, m, v, &c, lr, st.step);
                    (
                        AdapterTensor::Matrix(p),
                        AdapterTensor::Matrix(m),
                        AdapterTensor::Matrix(v),
                    )
                }
                _ => {
                    return invalid(format!(
                        "`{name}`: parameter, gradient and state disagree in rank"
                    ))
                }
            };
            *p = np;
            st.exp_avg = nm;
            st.exp_avg_sq = nv;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_model_core::{CpuBackend, CpuDevice};

    fn vec_t(v: &[f32]) -> AdapterTensor<CpuBackend> {
        AdapterTensor::from_vec(&[v.len()], v.to_vec(), &CpuDevice::default()).unwrap()
    }

    /// torch.optim.AdamW's single-tensor update, in f64.
    fn reference(
        p: &mut [f64],
        m: &mut [f64],
        v: &mut [f64],
        g: &[f64],
        c: &AdamWConfig,
        step: i32,
    ) {
        for i in 0..p.len() {
            p[i] *= 1.0 - c.lr * c.weight_decay;
            m[i] += (g[i] - m[i]) * (1.0 - c.beta1);
            v[i] = v[i] * c.beta2 + g[i] * g[i] * (1.0 - c.beta2);
            let bc1 = 1.0 - c.beta1.powi(step);
            let bc2 = 1.0 - c.beta2.powi(step);
            p[i] -= c.lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + c.eps);
        }
    }

    #[test]
    fn adamw_follows_torch_over_several_steps() {
        let c = AdamWConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::<CpuBackend>::new(c);
        let mut params = BTreeMap::from([("w".to_string(), vec_t(&[1.0, -2.0, 0.5]))]);
        let (mut p, mut m, mut v) = (vec![1.0, -2.0, 0.5], vec![0.0; 3], vec![0.0; 3]);
        for (step, g) in [[0.3, -0.1, 2.0], [-0.2, 0.4, 1.0], [0.0, 0.1, -3.0]]
            .iter()
            .enumerate()
        {
            let grads = BTreeMap::from([("w".to_string(), vec_t(&g.map(|x| x as f32)))]);
            opt.step(c.lr, &mut params, &grads).unwrap();
            reference(&mut p, &mut m, &mut v, g, &c, step as i32 + 1);
        }
        for (a, b) in params["w"].to_vec().iter().zip(&p) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(opt.state["w"].step, 3);
        // The state survives a host round trip (checkpoint/resume).
        let mut resumed = AdamW::<CpuBackend>::new(c);
        resumed
            .load_state(&opt.state_to_host(), &CpuDevice::default())
            .unwrap();
        assert_eq!(resumed.state_to_host(), opt.state_to_host());
        // A gradient for an unknown parameter is an error.
        let grads = BTreeMap::from([("x".to_string(), vec_t(&[1.0]))]);
        assert!(opt.step(c.lr, &mut params, &grads).is_err());
    }

    #[test]
    fn clipping_uses_the_global_norm() {
        let mut grads = BTreeMap::from([
            ("a".to_string(), vec_t(&[3.0, 0.0])),
            ("b".to_string(), vec_t(&[0.0, 4.0])),
        ]);
        let total = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((total - 5.0).abs() < 1e-6);
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((grads["a"].to_vec()[0] as f64 - 3.0 * coef).abs() < 1e-6);
        assert!((grads["b"].to_vec()[1] as f64 - 4.0 * coef).abs() < 1e-6);
        // Below the bound nothing changes.
        let mut small = BTreeMap::from([("a".to_string(), vec_t(&[0.3, 0.4]))]);
        assert!((clip_grad_norm(&mut small, 1.0).unwrap() - 0.5).abs() < 1e-6);
        assert_eq!(small["a"].to_vec(), vec![0.3, 0.4]);
        let mut bad = BTreeMap::from([("a".to_string(), vec_t(&[f32::NAN]))]);
        assert!(clip_grad_norm(&mut bad, 1.0)
            .unwrap_err()
            .to_string()
            .contains("non-finite gradients in a"));
    }

    #[test]
    fn config_from_json_and_validation() {
        let c = AdamWConfig::from_json(&serde_json::json!({"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-4})).unwrap();
        assert_eq!(
            (c.lr, c.beta1, c.beta2, c.weight_decay),
            (2e-5, 0.9, 0.95, 1e-4)
        );
        assert!(AdamWConfig::from_json(&serde_json::json!({"betas": [0.9]})).is_err());
        assert!(AdamWConfig::from_json(&serde_json::json!({"betas": [0.9, 1.0]})).is_err());
        assert!(AdamWConfig::from_json(&serde_json::json!({"lr": "fast"})).is_err());
    }
}
