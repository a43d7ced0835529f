//! Full fine-tuning (SFT, the official finetune's `training_type = "sft"`): every parameter of
//! the transformer is trained (`transformer.requires_grad_(True)`, the optimizer over
//! `transformer.parameters()`); buffers such as 5B-I2V's learned `patch_embed.pos_embedding`
//! are not parameters in diffusers and stay fixed.
//!
//! Parameters are named by their diffusers checkpoint key (`transformer_blocks.0.attn1.to_q.weight`),
//! which is also their burn module path. Values and gradients are [`AdapterTensor`]s, so the
//! optimizer, the global-norm clipping and the checkpoints treat SFT and adapters alike; a
//! parameter of rank other than 1 or 2 would be flattened to a vector (AdamW and the norm are
//! element-wise). CogVideoX 1.0's `patch_embed.proj` (a `Conv2d`, `[D, C, p, p]` in the
//! checkpoint) is held by the model as the equivalent `[D, C*p*p]` matrix and handed out as such;
//! [`checkpoint_shapes`] gives the stored shapes for export.

use crate::error::{invalid, TrainError};
use crate::InnerTensors;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use cogvx_adapters::{adapter_grads, set_adapter_values, trainable_values};
use cogvx_model_core::adapter::AdapterTensor;
use cogvx_transformer::CogVideoXTransformer3DModel;
use std::collections::BTreeMap;

/// What a training run optimises.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// The adapter parameters (built-in LoRA or a plugin recipe); the base weights are frozen.
    #[default]
    #[serde(alias = "lora")]
    Adapter,
    /// Every transformer weight (SFT).
    #[serde(alias = "sft")]
    Full,
}

impl TrainMode {
    /// The trainable parameters by name, on the inner backend ([`trainable_values`] or [`full_values`]).
    pub fn values<B: AutodiffBackend>(
        self,
        model: &mut CogVideoXTransformer3DModel<B>,
    ) -> InnerTensors<B> {
        match self {
            TrainMode::Adapter => trainable_values(model),
            TrainMode::Full => full_values(model),
        }
    }

    /// The gradients of the trainable parameters the loss reached ([`adapter_grads`] or [`full_grads`]).
    pub fn grads<B: AutodiffBackend>(
        self,
        model: &mut CogVideoXTransformer3DModel<B>,
        grads: &B::Gradients,
    ) -> InnerTensors<B> {
        match self {
            TrainMode::Adapter => adapter_grads(model, grads),
            TrainMode::Full => full_grads(model, grads),
        }
    }

    /// Writes parameters by name ([`set_adapter_values`] or [`set_full_values`]).
    pub fn set_values<B: AutodiffBackend>(
        self,
        model: &mut CogVideoXTransformer3DModel<B>,
        values: &InnerTensors<B>,
    ) -> Result<(), TrainError> {
        match self {
            TrainMode::Adapter => Ok(set_adapter_values(model, values)?),
            TrainMode::Full => set_full_values(model, values),
        }
    }
}

/// The module path while a visitor or mapper walks the model; adapters (fields named `adapter`
/// of a `Linear`) are not part of the base weights.
#[derive(Default)]
struct PathTracker {
    stack: Vec<String>,
}

impl PathTracker {
    fn enter(&mut self, name: &str) {
        self.stack.push(name.to_string());
    }
    fn exit(&mut self) {
        self.stack.pop();
    }
    fn in_adapter(&self) -> bool {
        self.stack.iter().any(|s| s == "adapter")
    }
    fn name(&self) -> String {
        self.stack.join(".")
    }
}

/// A rank-`D` tensor as an [`AdapterTensor`]: rank 1 and 2 as they are, other ranks flattened.
fn to_adapter<B: Backend, const D: usize>(t: Tensor<B, D>) -> AdapterTensor<B> {
    let dims = t.dims();
    match D {
        2 => AdapterTensor::Matrix(t.reshape([dims[0], dims[1]])),
        _ => AdapterTensor::Vector(t.reshape([dims.iter().product::<usize>()])),
    }
}

struct Shapes {
    path: PathTracker,
    out: Vec<(String, Vec<usize>)>,
}

impl<B: Backend> ModuleVisitor<B> for Shapes {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.path.in_adapter() {
            self.out
                .push((self.path.name(), param.val().dims().to_vec()));
        }
    }
}

/// Every base parameter as `(diffusers name, shape as the model holds it)`, in module order.
pub fn full_param_shapes<B: Backend>(
    model: &CogVideoXTransformer3DModel<B>,
) -> Vec<(String, Vec<usize>)> {
    let mut v = Shapes {
        path: PathTracker::default(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// The shape each base parameter has in a diffusers checkpoint (differs from
/// [`full_param_shapes`] only for CogVideoX 1.0's `Conv2d` `patch_embed.proj.weight`, `[D, C, p, p]`).
pub fn checkpoint_shapes<B: Backend>(
    model: &CogVideoXTransformer3DModel<B>,
) -> BTreeMap<String, Vec<usize>> {
    let c = &model.config;
    full_param_shapes(model)
        .into_iter()
        .map(|(name, shape)| {
            if name == "patch_embed.proj.weight" && c.patch_size_t.is_none() {
                (
                    name,
                    vec![shape[0], c.in_channels, c.patch_size, c.patch_size],
                )
            } else {
                (name, shape)
            }
        })
        .collect()
}

struct Values<B: AutodiffBackend> {
    path: PathTracker,
    out: InnerTensors<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Values<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.path.in_adapter() {
            self.out
                .insert(self.path.name(), to_adapter(param.val().inner()));
        }
    }
}

/// Host copies of tensors on any backend (for export).
struct HostValues {
    path: PathTracker,
    out: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl<B: Backend> ModuleVisitor<B> for HostValues {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.path.in_adapter() {
            let t = param.val();
            let shape = t.dims().to_vec();
            let data = t
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("converted to f32");
            self.out.push((self.path.name(), shape, data));
        }
    }
}

/// Every base parameter as `(diffusers name, model shape, f32 values)`, in module order, on any
/// backend (the export reads the model through this).
pub fn full_host_values<B: Backend>(
    model: &CogVideoXTransformer3DModel<B>,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut v = HostValues {
        path: PathTracker::default(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// The module path of the first layer that carries an adapter, if any.
pub fn first_adapter_layer<B: Backend>(model: &CogVideoXTransformer3DModel<B>) -> Option<String> {
    struct Find {
        path: PathTracker,
        found: Option<String>,
    }
    impl<B: Backend> ModuleVisitor<B> for Find {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
            if self.found.is_none() {
                if let Some(i) = self.path.stack.iter().position(|s| s == "adapter") {
                    self.found = Some(self.path.stack[..i].join("."));
                }
            }
        }
    }
    let mut v = Find {
        path: PathTracker::default(),
        found: None,
    };
    model.visit(&mut v);
    v.found
}

/// Makes every base weight of the transformer trainable (`requires_grad_(True)`), undoing a
/// [`crate::freeze`]. Adapter parameters keep their own trainability.
pub fn enable_full_training<B: Backend>(
    model: CogVideoXTransformer3DModel<B>,
) -> CogVideoXTransformer3DModel<B> {
    struct RequireGrad {
        path: PathTracker,
    }
    impl<B: Backend> ModuleMapper<B> for RequireGrad {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if self.path.in_adapter() {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.detach().require_grad(), mapper)
        }
    }
    model.map(&mut RequireGrad {
        path: PathTracker::default(),
    })
}

/// Every base parameter by diffusers name, on the inner (non-autodiff) backend.
pub fn full_values<B: AutodiffBackend>(model: &CogVideoXTransformer3DModel<B>) -> InnerTensors<B> {
    let mut v = Values {
        path: PathTracker::default(),
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// The gradient of every base parameter the loss reached (parameters without one, e.g. frozen
/// ones, are absent, as `p.grad is None` in torch).
pub fn full_grads<B: AutodiffBackend>(
    model: &CogVideoXTransformer3DModel<B>,
    grads: &B::Gradients,
) -> InnerTensors<B> {
    struct Grads<'a, B: AutodiffBackend> {
        path: PathTracker,
        grads: &'a B::Gradients,
        out: InnerTensors<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.path.in_adapter() {
                return;
            }
            if let Some(g) = param.val().grad(self.grads) {
                self.out.insert(self.path.name(), to_adapter(g));
            }
        }
    }
    let mut v = Grads {
        path: PathTracker::default(),
        grads,
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Sets base parameters by diffusers name. Each value must have the parameter's shape as
/// [`full_values`] hands it out, or be its flattened vector. Parameter ids and trainability are
/// kept. Unknown names or wrong shapes are refused before anything is changed.
pub fn set_full_values<B: AutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    values: &InnerTensors<B>,
) -> Result<(), TrainError> {
    let shapes: BTreeMap<String, Vec<usize>> = full_param_shapes(model).into_iter().collect();
    let mut unknown = Vec::new();
    for (name, v) in values {
        match shapes.get(name) {
            None => unknown.push(name.as_str()),
            Some(shape) => {
                let vs = v.shape();
                let numel: usize = shape.iter().product();
                if vs != *shape && vs != [numel] {
                    return invalid(format!(
                        "`{name}`: the model's parameter has shape {shape:?}, the new value {vs:?}"
                    ));
                }
            }
        }
    }
    if !unknown.is_empty() {
        let sample: Vec<&str> = shapes.keys().take(4).map(String::as_str).collect();
        return invalid(format!(
            "no transformer parameter named {} (parameters are named by their diffusers key, e.g. {}, ...)",
            unknown.join(", "),
            sample.join(", ")
        ));
    }

    struct Set<'a, B: AutodiffBackend> {
        path: PathTracker,
        values: &'a InnerTensors<B>,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Set<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if self.path.in_adapter() {
                return param;
            }
            let Some(v) = self.values.get(&self.path.name()) else {
                return param;
            };
            let (id, old, mapper) = param.consume();
            let dims = old.dims();
            let require_grad = old.is_require_grad();
            // The parameter keeps its dtype (half weights take f32 masters' values rounded).
            let dtype = old.dtype();
            let new: Tensor<B, D> = match v.clone() {
                AdapterTensor::Vector(t) => Tensor::<B, 1>::from_inner(t).reshape(dims),
                AdapterTensor::Matrix(t) => Tensor::<B, 2>::from_inner(t).reshape(dims),
            }
            .cast(dtype);
            Param::from_mapped_value(id, new.detach().set_require_grad(require_grad), mapper)
        }
    }
    let taken = model.clone();
    *model = taken.map(&mut Set {
        path: PathTracker::default(),
        values,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_model_core::{CpuAutodiffBackend, CpuBackend};

    #[test]
    fn other_ranks_are_flattened() {
        let t = Tensor::<CpuBackend, 4>::ones([2, 3, 1, 2], &Default::default());
        assert_eq!(to_adapter(t).shape(), vec![12]);
        let t = Tensor::<CpuBackend, 2>::ones([2, 3], &Default::default());
        assert_eq!(to_adapter(t).shape(), vec![2, 3]);
        let t = Tensor::<CpuAutodiffBackend, 1>::ones([5], &Default::default());
        assert_eq!(to_adapter(t).shape(), vec![5]);
    }

    #[test]
    fn train_mode_reads_from_config_names() {
        assert_eq!(
            serde_json::from_str::<TrainMode>("\"full\"").unwrap(),
            TrainMode::Full
        );
        assert_eq!(
            serde_json::from_str::<TrainMode>("\"adapter\"").unwrap(),
            TrainMode::Adapter
        );
        // The official finetune's `training_type` names.
        assert_eq!(
            serde_json::from_str::<TrainMode>("\"sft\"").unwrap(),
            TrainMode::Full
        );
        assert_eq!(
            serde_json::from_str::<TrainMode>("\"lora\"").unwrap(),
            TrainMode::Adapter
        );
    }
}
