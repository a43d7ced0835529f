//! Trainable adapters on [`crate::nn::Linear`].
//!
//! A `Linear` with an adapter computes `x W^T + b + adapter(x)` (or, for adapters whose output is
//! the effective weight, `x W'^T + b`). The base weight stays frozen; the adapter's parameters are
//! burn [`Param`]s, so `Module` visitors, autodiff and records see them.
//!
//! * [`LoraAdapter`]: PEFT's LoRA, `lora_A [r, in]`, `lora_B [out, r]`, output
//!   `lora_B(lora_A(x)) * alpha / r` in PEFT's order.
//! * [`RecipeAdapter`]: a generic interpreter of the plugin API's [`AdapterRecipe`] (parameters
//!   plus a flat op graph that yields `ΔW` or `W'`), validated once when built: operand indices,
//!   parameter names, shapes and size limits are checked and refused with a clear
//!   [`AdapterError`]. DoRA, LoHa and LoKr plugins are run through it. `Op::Detach` is a
//!   stop-gradient (burn's `Tensor::detach`): its node keeps the operand's value and shape, and
//!   no gradient flows back through it (PEFT's detached DoRA weight norm).

use crate::ModelBackend;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

mod lora;
mod recipe;
pub use lora::LoraAdapter;
pub use recipe::*;

/// PEFT's rule for a list of `target_modules`: the module name equals a target or ends with
/// `.<target>`.
pub fn matches_target(name: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| name == t || name.ends_with(&format!(".{t}")))
}

/// Why an adapter could not be built or updated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("adapter for `{layer}`: {message}")]
pub struct AdapterError {
    /// The target layer (diffusers module path).
    pub layer: String,
    pub message: String,
}

pub(crate) fn err<T>(layer: &str, message: impl Into<String>) -> Result<T, AdapterError> {
    Err(AdapterError {
        layer: layer.to_string(),
        message: message.into(),
    })
}

/// A rank-1 or rank-2 adapter tensor (parameters, gradients, optimizer state).
#[derive(Clone, Debug)]
pub enum AdapterTensor<B: Backend> {
    Vector(Tensor<B, 1>),
    Matrix(Tensor<B, 2>),
}

impl<B: Backend> std::ops::Add for AdapterTensor<B> {
    type Output = Self;
    /// The element-wise sum of two tensors of one shape (gradient accumulation).
    fn add(self, other: Self) -> Self {
        match (self, other) {
            (AdapterTensor::Vector(a), AdapterTensor::Vector(b)) => AdapterTensor::Vector(a + b),
            (AdapterTensor::Matrix(a), AdapterTensor::Matrix(b)) => AdapterTensor::Matrix(a + b),
            (a, b) => panic!(
                "adding tensors of different ranks: {:?} + {:?}",
                a.shape(),
                b.shape()
            ),
        }
    }
}

impl<B: Backend> AdapterTensor<B> {
    /// Every element times `s`.
    pub fn mul_scalar(self, s: f64) -> Self {
        match self {
            AdapterTensor::Vector(a) => AdapterTensor::Vector(a.mul_scalar(s)),
            AdapterTensor::Matrix(a) => AdapterTensor::Matrix(a.mul_scalar(s)),
        }
    }

    /// The tensor's shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            AdapterTensor::Vector(t) => t.dims().to_vec(),
            AdapterTensor::Matrix(t) => t.dims().to_vec(),
        }
    }

    /// The values, row-major, as f32.
    pub fn to_vec(&self) -> Vec<f32> {
        let data = match self {
            AdapterTensor::Vector(t) => t.to_data(),
            AdapterTensor::Matrix(t) => t.to_data(),
        };
        data.convert::<f32>()
            .to_vec::<f32>()
            .expect("converted to f32")
    }

    /// Builds a tensor of `shape` (rank 1 or 2) from row-major values.
    pub fn from_vec(shape: &[usize], values: Vec<f32>, device: &B::Device) -> Option<Self> {
        if shape.iter().product::<usize>() != values.len() {
            return None;
        }
        match *shape {
            [n] => Some(AdapterTensor::Vector(Tensor::from_data(
                TensorData::new(values, [n]),
                device,
            ))),
            [r, c] => Some(AdapterTensor::Matrix(Tensor::from_data(
                TensorData::new(values, [r, c]),
                device,
            ))),
            _ => None,
        }
    }
}

/// An adapter attached to a [`crate::nn::Linear`].
#[derive(Module, Debug)]
pub enum LinearAdapter<B: Backend> {
    /// Built-in LoRA.
    Lora(LoraAdapter<B>),
    /// An adapter described by a plugin's [`AdapterRecipe`].
    Recipe(RecipeAdapter<B>),
}

impl<B: Backend> LinearAdapter<B> {
    /// The adapter's parameters by export suffix (PEFT naming: `lora_A.weight`, ...), with
    /// whether each is trainable.
    pub fn tensors(&self) -> Vec<(String, AdapterTensor<B>, bool)> {
        match self {
            LinearAdapter::Lora(lora) => vec![
                (
                    "lora_A.weight".into(),
                    AdapterTensor::Matrix(lora.lora_a.val()),
                    true,
                ),
                (
                    "lora_B.weight".into(),
                    AdapterTensor::Matrix(lora.lora_b.val()),
                    true,
                ),
            ],
            LinearAdapter::Recipe(recipe) => recipe.tensors(),
        }
    }

    /// Replaces the parameter exported as `suffix` with `value` (same shape), keeping its
    /// parameter id and trainability.
    pub fn set_tensor(
        &mut self,
        layer: &str,
        suffix: &str,
        value: AdapterTensor<B>,
    ) -> Result<(), AdapterError> {
        match self {
            LinearAdapter::Lora(lora) => {
                let AdapterTensor::Matrix(m) = value else {
                    return err(layer, format!("`{suffix}` must be a matrix"));
                };
                let slot = match suffix {
                    "lora_A.weight" => &mut lora.lora_a,
                    "lora_B.weight" => &mut lora.lora_b,
                    _ => return err(layer, format!("LoRA has no parameter `{suffix}` (it has lora_A.weight, lora_B.weight)")),
                };
                replace_param(layer, suffix, slot, m)
            }
            LinearAdapter::Recipe(recipe) => recipe.set_tensor(layer, suffix, value),
        }
    }

    /// The PEFT adapter type written to export metadata (`LORA`, or the recipe's).
    pub fn peft_type(&self) -> String {
        match self {
            LinearAdapter::Lora(_) => "LORA".into(),
            LinearAdapter::Recipe(r) => r.program.recipe.peft_type.clone(),
        }
    }
}

impl<B: ModelBackend> LinearAdapter<B> {
    /// The adapted output for `x [rows, in]`, given the frozen base `weight [out, in]` and `bias`.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        match self {
            LinearAdapter::Lora(lora) => lora.forward_with_base(x, weight, bias),
            LinearAdapter::Recipe(recipe) => recipe.forward_with_base(x, weight, bias),
        }
    }
}

pub(crate) fn replace_param<B: Backend, const D: usize>(
    layer: &str,
    name: &str,
    slot: &mut Param<Tensor<B, D>>,
    value: Tensor<B, D>,
) -> Result<(), AdapterError> {
    let old = slot.val();
    if old.dims() != value.dims() {
        return err(
            layer,
            format!(
                "`{name}` has shape {:?}, the new value {:?}",
                old.dims(),
                value.dims()
            ),
        );
    }
    let require_grad = old.is_require_grad();
    let value = value.detach().set_require_grad(require_grad);
    *slot = Param::initialized(slot.id, value);
    Ok(())
}

/// `x W^T + b` for `x [rows, in]` ([`crate::linear`]: one operation, the bias fused).
pub fn base_linear<B: ModelBackend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    crate::linear::linear(x, weight, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use crate::{CpuAutodiffBackend, CpuBackend, CpuDevice};
    use cogvx_plugin_api::{AdapterOutput, AdapterRecipe, AdapterRequest, Dim, Init, Op};
    use cogvx_plugin_api::{ExportKey, ParamSpec};

    type B = CpuBackend;

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, shape), &CpuDevice::default())
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    fn lin() -> Linear<B> {
        Linear::new(
            t2(vec![1., 2., 3., 4., 5., 6.], [2, 3]),
            Some(Tensor::from_data(
                TensorData::new(vec![10f32, 20.], [2]),
                &CpuDevice::default(),
            )),
        )
    }

    fn request(rank: u32) -> AdapterRequest {
        AdapterRequest {
            layer: "blocks.0.to_q".into(),
            in_features: 3,
            out_features: 2,
            rank,
            alpha: 2.0,
        }
    }

    /// LoRA as a recipe: ΔW = B A * alpha / r.
    fn lora_recipe() -> AdapterRecipe {
        AdapterRecipe {
            params: vec![
                ParamSpec {
                    name: "A".into(),
                    shape: vec![Dim::Rank, Dim::In],
                    init: Init::KaimingUniform { a: 5f32.sqrt() },
                    trainable: true,
                },
                ParamSpec {
                    name: "B".into(),
                    shape: vec![Dim::Out, Dim::Rank],
                    init: Init::Zeros,
                    trainable: true,
                },
            ],
            graph: vec![
                Op::Param("B".into()),
                Op::Param("A".into()),
                Op::Matmul(0, 1),
                Op::AlphaOverRank(2),
            ],
            output: 3,
            output_kind: AdapterOutput::WeightDelta,
            export: vec![
                ExportKey {
                    param: "A".into(),
                    suffix: "lora_A.weight".into(),
                },
                ExportKey {
                    param: "B".into(),
                    suffix: "lora_B.weight".into(),
                },
            ],
            peft_type: "LORA".into(),
        }
    }

    #[test]
    fn lora_adds_scaled_low_rank_update() {
        let mut l = lin();
        let a = t2(vec![1., 0., 1., 0., 1., 0.], [2, 3]);
        let b = t2(vec![1., 0., 0., 2.], [2, 2]);
        l.adapter = Some(LinearAdapter::Lora(
            LoraAdapter::from_tensors("x", a, b, 1.0).unwrap(),
        ));
        let x = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1f32, 0., 1.], [1, 1, 3]),
            &CpuDevice::default(),
        );
        // base: [14, 30]; A x = [2, 0]; B (A x) = [2, 0]; scale 1/2 -> [1, 0]
        close(
            &l.forward(x).into_data().to_vec::<f32>().unwrap(),
            &[15.0, 30.0],
        );
    }

    #[test]
    fn lora_init_is_peft_default() {
        let l = LoraAdapter::<B>::new(64, 8, 4, 8.0, &CpuDevice::default()).unwrap();
        assert_eq!(l.scale, 2.0);
        let a = l.lora_a.val().into_data().to_vec::<f32>().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 1.0 / 8.0) && a.iter().any(|v| *v != 0.0));
        assert!(l
            .lora_b
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
    }

    #[test]
    fn recipe_lora_matches_builtin_lora_and_its_gradients() {
        type AD = CpuAutodiffBackend;
        let dev = CpuDevice::default();
        let w = Tensor::<AD, 2>::from_data(
            TensorData::new(vec![1f32, 2., 3., 4., 5., 6.], [2, 3]),
            &dev,
        );
        let mut rec =
            RecipeAdapter::<AD>::new(lora_recipe(), request(2), &w, RecipeLimits::default(), &dev)
                .unwrap();
        let a = Tensor::<AD, 2>::from_data(
            TensorData::new(vec![0.5f32, -1., 2., 1., 0.25, -0.5], [2, 3]),
            &dev,
        );
        let b = Tensor::<AD, 2>::from_data(TensorData::new(vec![1f32, -2., 0.5, 3.], [2, 2]), &dev);
        rec.set_tensor("l", "lora_A.weight", AdapterTensor::Matrix(a.clone()))
            .unwrap();
        rec.set_tensor("l", "lora_B.weight", AdapterTensor::Matrix(b.clone()))
            .unwrap();
        let lora = LoraAdapter::<AD>::from_tensors("l", a, b, 2.0).unwrap();
        let x = Tensor::<AD, 2>::from_data(
            TensorData::new(vec![1f32, -1., 2., 0.5, 0.5, 0.5], [2, 3]),
            &dev,
        );
        let y1 = LinearAdapter::Recipe(rec.clone()).forward(x.clone(), w.clone(), None);
        let y2 = LinearAdapter::Lora(lora.clone()).forward(x, w, None);
        close(
            &y1.clone().into_data().to_vec::<f32>().unwrap(),
            &y2.clone().into_data().to_vec::<f32>().unwrap(),
        );
        let g1 = y1.powi_scalar(2).sum().backward();
        let g2 = y2.powi_scalar(2).sum().backward();
        let ga1 = rec.matrices[0]
            .val()
            .grad(&g1)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let ga2 = lora
            .lora_a
            .val()
            .grad(&g2)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        close(&ga1, &ga2);
    }

    #[test]
    fn recipe_dora_kron_and_weight_output() {
        let dev = CpuDevice::default();
        let w = t2(vec![3., 4., 0., 0., 0., 5.], [2, 3]);
        // DoRA at init (B = 0): W' = m * (W + BA) / rownorm(W + BA) = W.
        let recipe = AdapterRecipe {
            params: vec![
                ParamSpec {
                    name: "A".into(),
                    shape: vec![Dim::Rank, Dim::In],
                    init: Init::Normal { std: 1.0 },
                    trainable: true,
                },
                ParamSpec {
                    name: "B".into(),
                    shape: vec![Dim::Out, Dim::Rank],
                    init: Init::Zeros,
                    trainable: true,
                },
                ParamSpec {
                    name: "m".into(),
                    shape: vec![Dim::Out],
                    init: Init::BaseRowNorm,
                    trainable: true,
                },
            ],
            graph: vec![
                Op::BaseWeight,
                Op::Param("B".into()),
                Op::Param("A".into()),
                Op::Matmul(1, 2),
                Op::AlphaOverRank(3),
                Op::Add(0, 4),
                Op::RowNorm(5),
                Op::Div(5, 6),
                Op::Param("m".into()),
                Op::Mul(8, 7),
            ],
            output: 9,
            output_kind: AdapterOutput::Weight,
            export: vec![],
            peft_type: "LORA".into(),
        };
        let rec =
            RecipeAdapter::<B>::new(recipe, request(1), &w, RecipeLimits::default(), &dev).unwrap();
        close(
            &rec.evaluate(w.clone()).into_data().to_vec::<f32>().unwrap(),
            &w.clone().into_data().to_vec::<f32>().unwrap(),
        );
        close(
            &rec.vectors[0].val().into_data().to_vec::<f32>().unwrap(),
            &[5.0, 5.0],
        );

        // Kron of [2,1] and [1,3] ones-scaled factors: LoKr-like ΔW [2,3].
        let recipe = AdapterRecipe {
            params: vec![
                ParamSpec {
                    name: "w1".into(),
                    shape: vec![
                        Dim::Factor {
                            of_out: true,
                            limit: 2,
                            cofactor: false,
                        },
                        Dim::Factor {
                            of_out: false,
                            limit: 1,
                            cofactor: false,
                        },
                    ],
                    init: Init::Ones,
                    trainable: true,
                },
                ParamSpec {
                    name: "w2".into(),
                    shape: vec![
                        Dim::Factor {
                            of_out: true,
                            limit: 2,
                            cofactor: true,
                        },
                        Dim::Factor {
                            of_out: false,
                            limit: 1,
                            cofactor: true,
                        },
                    ],
                    init: Init::Ones,
                    trainable: true,
                },
            ],
            graph: vec![
                Op::Param("w1".into()),
                Op::Param("w2".into()),
                Op::Kron(0, 1),
                Op::Scale(2, 0.5),
            ],
            output: 3,
            output_kind: AdapterOutput::WeightDelta,
            export: vec![],
            peft_type: "LOKR".into(),
        };
        let rec =
            RecipeAdapter::<B>::new(recipe, request(1), &w, RecipeLimits::default(), &dev).unwrap();
        assert_eq!(rec.program.slots[0].1, vec![2, 1]);
        assert_eq!(rec.program.slots[1].1, vec![1, 3]);
        close(
            &rec.evaluate(w).into_data().to_vec::<f32>().unwrap(),
            &[0.5; 6],
        );
    }

    #[test]
    fn bad_recipes_are_refused_with_a_clear_error() {
        let dev = CpuDevice::default();
        let w = t2(vec![0.; 6], [2, 3]);
        let build = |r: AdapterRecipe, limits: RecipeLimits| {
            RecipeAdapter::<B>::new(r, request(2), &w, limits, &dev)
                .map(|_| ())
                .unwrap_err()
                .message
        };

        let mut r = lora_recipe();
        r.graph[2] = Op::Matmul(0, 7);
        assert!(
            build(r, RecipeLimits::default()).contains("uses node 7, which is not an earlier node")
        );

        let mut r = lora_recipe();
        r.graph[2] = Op::Matmul(1, 0); // [r, in] x [out, r]
        assert!(build(r, RecipeLimits::default()).contains("shape mismatch"));

        let mut r = lora_recipe();
        r.graph[0] = Op::Param("C".into());
        assert!(build(r, RecipeLimits::default())
            .contains("parameter `C`, which the recipe does not declare"));

        let mut r = lora_recipe();
        r.output = 0;
        assert!(build(r, RecipeLimits::default()).contains("output node 0 has shape [2, 2]"));

        let r = lora_recipe();
        assert!(build(
            r,
            RecipeLimits {
                max_param_elements: Some(5),
                ..Default::default()
            }
        )
        .contains("more than the limit of 5"));
        let r = lora_recipe();
        assert!(build(
            r,
            RecipeLimits {
                max_params: 1,
                ..Default::default()
            }
        )
        .contains("2 parameters, more than the limit of 1"));
        let r = lora_recipe();
        assert!(build(
            r,
            RecipeLimits {
                max_nodes: 3,
                ..Default::default()
            }
        )
        .contains("4 graph nodes"));

        let mut r = lora_recipe();
        r.export[0].param = "Z".into();
        assert!(build(r, RecipeLimits::default()).contains("export key"));
    }

    /// `ΔW = (m / sg(‖P‖_row)) ⊙ P + sg(P) ⊙ P`: a detached vector and a detached matrix; with
    /// `identity = true` the detaches are replaced by `Scale(·, 1)` (same values, gradients flow).
    fn detach_recipe(identity: bool) -> AdapterRecipe {
        let cut = |j: u32| {
            if identity {
                Op::Scale(j, 1.0)
            } else {
                Op::Detach(j)
            }
        };
        AdapterRecipe {
            params: vec![
                ParamSpec {
                    name: "P".into(),
                    shape: vec![Dim::Out, Dim::In],
                    init: Init::Zeros,
                    trainable: true,
                },
                ParamSpec {
                    name: "m".into(),
                    shape: vec![Dim::Out],
                    init: Init::Ones,
                    trainable: true,
                },
            ],
            // 0 P, 1 ‖P‖_row, 2 sg(‖P‖_row), 3 m, 4 m / sg(‖P‖_row), 5 (m / sg(‖P‖_row)) ⊙ P,
            // 6 sg(P), 7 sg(P) ⊙ P, 8 the sum.
            graph: vec![
                Op::Param("P".into()),
                Op::RowNorm(0),
                cut(1),
                Op::Param("m".into()),
                Op::Div(3, 2),
                Op::Mul(4, 0),
                cut(0),
                Op::Mul(6, 0),
                Op::Add(5, 7),
            ],
            output: 8,
            output_kind: AdapterOutput::WeightDelta,
            export: vec![],
            peft_type: "LORA".into(),
        }
    }

    #[test]
    fn detach_keeps_the_value_and_stops_the_gradient() {
        type AD = CpuAutodiffBackend;
        let dev = CpuDevice::default();
        let w = Tensor::<AD, 2>::zeros([2, 3], &dev);
        // P rows [3, 4, 0] and [1, 2, 2] (norms 5 and 3), m = [2, 6], L = Σ G ⊙ ΔW.
        let p = vec![3f32, 4., 0., 1., 2., 2.];
        let m = vec![2f32, 6.];
        let g = Tensor::<AD, 2>::from_data(
            TensorData::new(vec![1f32, -1., 2., 0.5, 1., -2.], [2, 3]),
            &dev,
        );
        let run = |identity: bool| {
            let mut rec = RecipeAdapter::<AD>::new(
                detach_recipe(identity),
                request(1),
                &w,
                RecipeLimits::default(),
                &dev,
            )
            .unwrap();
            rec.set_tensor(
                "l",
                "P",
                AdapterTensor::from_vec(&[2, 3], p.clone(), &dev).unwrap(),
            )
            .unwrap();
            rec.set_tensor(
                "l",
                "m",
                AdapterTensor::from_vec(&[2], m.clone(), &dev).unwrap(),
            )
            .unwrap();
            assert_eq!(rec.program.node_shapes[2], vec![2]);
            assert_eq!(rec.program.node_shapes[6], vec![2, 3]);
            let dw = rec.evaluate(w.clone());
            let value = dw.clone().into_data().to_vec::<f32>().unwrap();
            let grads = (dw * g.clone()).sum().backward();
            let dp = rec.matrices[0]
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let dm = rec.vectors[0]
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            (value, dp, dm)
        };
        let (value, dp, dm) = run(false);
        let (value_id, dp_id, dm_id) = run(true);
        // Forward, by hand: row 0 0.4 [3, 4, 0] + [9, 16, 0]; row 1 2 [1, 2, 2] + [1, 4, 4].
        close(&value, &[10.2, 17.6, 0.0, 3.0, 8.0, 8.0]);
        close(&value_id, &value);
        // Detached: ∂L/∂P = (m / c) G + P ⊙ G (no term through the norm nor through sg(P)),
        // ∂L/∂m = ⟨G_i, P_i⟩ / c_i.
        close(&dp, &[3.4, -4.4, 0.8, 1.5, 4.0, -8.0]);
        close(&dm, &[-0.2, -0.5]);
        // Through the identity the norm's term -m ⟨G_i, P_i⟩ / c_i³ P_i and a second P ⊙ G appear;
        // ∂L/∂m does not involve a detached path.
        let want_id: Vec<f32> = {
            let (pv, gv) = (&p, [1f32, -1., 2., 0.5, 1., -2.]);
            let (c, gp) = ([5f32, 3.], [-1f32, -1.5]);
            (0..6)
                .map(|k| {
                    let i = k / 3;
                    m[i] / c[i] * gv[k] - m[i] * gp[i] / c[i].powi(3) * pv[k] + 2.0 * pv[k] * gv[k]
                })
                .collect()
        };
        close(&dp_id, &want_id);
        close(&dm_id, &dm);

        // A detach of a later node is refused like any other operand.
        let mut r = detach_recipe(false);
        r.graph[2] = Op::Detach(5);
        let e = RecipeAdapter::<AD>::new(r, request(1), &w, RecipeLimits::default(), &dev)
            .map(|_| ())
            .unwrap_err()
            .message;
        assert!(
            e.contains("graph node 2 (Detach(5)) uses node 5, which is not an earlier node"),
            "{e}"
        );
    }

    #[test]
    fn set_tensor_checks_shape_and_name() {
        let dev = CpuDevice::default();
        let mut a = LinearAdapter::Lora(LoraAdapter::<B>::new(3, 2, 2, 2.0, &dev).unwrap());
        assert!(a
            .set_tensor(
                "l",
                "lora_A.weight",
                AdapterTensor::Matrix(t2(vec![0.; 6], [3, 2]))
            )
            .is_err());
        assert!(a
            .set_tensor(
                "l",
                "lora_C.weight",
                AdapterTensor::Matrix(t2(vec![0.; 6], [2, 3]))
            )
            .is_err());
        a.set_tensor(
            "l",
            "lora_A.weight",
            AdapterTensor::Matrix(t2(vec![1.; 6], [2, 3])),
        )
        .unwrap();
        assert_eq!(a.tensors()[0].1.to_vec(), vec![1.0; 6]);
    }
}
