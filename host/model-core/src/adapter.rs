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

use burn::module::{Module, Param, ParamId};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use cogvx_plugin_api::{AdapterOutput, AdapterRecipe, AdapterRequest, Dim, Init, Op};

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

fn err<T>(layer: &str, message: impl Into<String>) -> Result<T, AdapterError> {
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

fn replace_param<B: Backend, const D: usize>(
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

/// PEFT LoRA on a linear layer: `Δy = (x A^T) B^T * alpha / r`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `lora_A.weight` `[r, in]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `lora_B.weight` `[out, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `alpha / r` (PEFT's `scaling`, without rsLoRA).
    pub scale: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// PEFT's default initialisation: `lora_A` kaiming-uniform with `a = sqrt(5)` (uniform in
    /// `±1/sqrt(in)`, from the backend's RNG; seed it with `B::seed`), `lora_B` zeros.
    pub fn new(
        in_features: usize,
        out_features: usize,
        rank: usize,
        alpha: f64,
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        if rank == 0 || in_features == 0 || out_features == 0 {
            return err(
                "<lora>",
                format!(
                    "rank {rank} on a {in_features} -> {out_features} layer: all must be positive"
                ),
            );
        }
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = Tensor::random(
            [rank, in_features],
            Distribution::Uniform(-bound, bound),
            device,
        );
        let b = Tensor::zeros([out_features, rank], device);
        Self::from_tensors("<lora>", a, b, alpha)
    }

    /// A LoRA with given `lora_A [r, in]` and `lora_B [out, r]`; `layer` names the target in errors.
    pub fn from_tensors(
        layer: &str,
        lora_a: Tensor<B, 2>,
        lora_b: Tensor<B, 2>,
        alpha: f64,
    ) -> Result<Self, AdapterError> {
        let [r, _] = lora_a.dims();
        let [_, rb] = lora_b.dims();
        if r == 0 || r != rb {
            return err(
                layer,
                format!(
                    "lora_A {:?} and lora_B {:?} disagree on the rank",
                    lora_a.dims(),
                    lora_b.dims()
                ),
            );
        }
        if !alpha.is_finite() {
            return err(layer, format!("lora_alpha {alpha} is not finite"));
        }
        Ok(LoraAdapter {
            lora_a: Param::from_tensor(lora_a.detach()),
            lora_b: Param::from_tensor(lora_b.detach()),
            alpha,
            scale: alpha / r as f64,
        })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[0]
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        (self.lora_a.val().dims()[1], self.lora_b.val().dims()[0])
    }

    /// The adapter's own output `(x A^T) B^T * scale` for `x [rows, in]`.
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // In x's dtype (autocast runs the LoRA matmuls in half too); the cast's backward
        // brings the gradients back to the f32 parameters.
        let a = crate::precision::like(self.lora_a.val(), &x);
        let b = crate::precision::like(self.lora_b.val(), &x);
        x.matmul(a.transpose())
            .matmul(b.transpose())
            .mul_scalar(self.scale)
    }

    fn forward_with_base(
        &self,
        x: Tensor<B, 2>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        base_linear(x.clone(), weight, bias) + self.delta(x)
    }
}

/// `x W^T + b` for `x [rows, in]`.
pub fn base_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let y = x.matmul(weight.transpose());
    match bias {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    }
}

/// Limits a plugin's recipe must respect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecipeLimits {
    /// Most graph nodes.
    pub max_nodes: usize,
    /// Most parameters.
    pub max_params: usize,
    /// Most parameter elements; `None` means `2 * out * in + out + in` (an adapter over twice the
    /// size of the weight it adapts is refused: lower the rank or train all weights instead).
    pub max_param_elements: Option<usize>,
}

impl Default for RecipeLimits {
    fn default() -> Self {
        RecipeLimits {
            max_nodes: 256,
            max_params: 16,
            max_param_elements: None,
        }
    }
}

/// Where a recipe parameter lives in a [`RecipeAdapter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamSlot {
    Vector(usize),
    Matrix(usize),
}

/// A validated recipe: the plugin's recipe plus what was resolved against the target layer.
#[derive(Clone, Debug)]
pub struct RecipeProgram {
    pub recipe: AdapterRecipe,
    pub request: AdapterRequest,
    /// Per recipe parameter (same order): its slot and resolved shape.
    pub slots: Vec<(ParamSlot, Vec<usize>)>,
    /// Resolved shape of each graph node.
    pub node_shapes: Vec<Vec<usize>>,
}

/// An adapter computed by interpreting a plugin's [`AdapterRecipe`] with burn ops (so autodiff
/// differentiates it): the graph yields `ΔW` (added to the frozen weight's output) or the
/// effective weight `W'`.
#[derive(Module, Debug)]
pub struct RecipeAdapter<B: Backend> {
    /// Rank-1 parameters.
    pub vectors: Vec<Param<Tensor<B, 1>>>,
    /// Rank-2 parameters.
    pub matrices: Vec<Param<Tensor<B, 2>>>,
    /// The validated graph.
    pub program: RecipeProgram,
}

fn resolve_dim(
    layer: &str,
    pname: &str,
    dim: &Dim,
    req: &AdapterRequest,
) -> Result<usize, AdapterError> {
    let v = match dim {
        Dim::In => req.in_features as usize,
        Dim::Out => req.out_features as usize,
        Dim::Rank => req.rank as usize,
        Dim::Fixed(n) => *n as usize,
        Dim::Factor {
            of_out,
            limit,
            cofactor,
        } => {
            let n = if *of_out {
                req.out_features
            } else {
                req.in_features
            } as usize;
            let limit = (*limit as usize).max(1);
            #[allow(clippy::manual_is_multiple_of)]
            // `is_multiple_of` needs Rust 1.87; the workspace allows 1.85.
            let f = (1..=n.min(limit)).rev().find(|d| n % d == 0).unwrap_or(1);
            if *cofactor {
                n / f
            } else {
                f
            }
        }
    };
    if v == 0 {
        return err(
            layer,
            format!("parameter `{pname}`: dimension {dim:?} resolves to 0"),
        );
    }
    Ok(v)
}

fn rank_of(shape: &[usize]) -> usize {
    shape.len()
}

/// Infers the shape of every node, refusing bad operands and mismatched shapes.
fn infer_shapes(
    layer: &str,
    recipe: &AdapterRecipe,
    param_shapes: &[(String, Vec<usize>)],
    req: &AdapterRequest,
) -> Result<Vec<Vec<usize>>, AdapterError> {
    let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(recipe.graph.len());
    for (i, op) in recipe.graph.iter().enumerate() {
        let operand = |j: u32| -> Result<Vec<usize>, AdapterError> {
            if (j as usize) < i {
                Ok(shapes[j as usize].clone())
            } else {
                err(layer, format!("graph node {i} ({op:?}) uses node {j}, which is not an earlier node (operands must refer to nodes 0..{i})"))
            }
        };
        let mismatch = |what: &str, a: &[usize], b: &[usize]| AdapterError {
            layer: layer.to_string(),
            message: format!("graph node {i} ({op:?}): shape mismatch, {what} of {a:?} and {b:?}"),
        };
        let shape = match op {
            Op::BaseWeight => vec![req.out_features as usize, req.in_features as usize],
            Op::Param(name) => match param_shapes.iter().find(|(n, _)| n == name) {
                Some((_, s)) => s.clone(),
                None => {
                    let known: Vec<&str> = param_shapes.iter().map(|(n, _)| n.as_str()).collect();
                    return err(layer, format!("graph node {i} uses parameter `{name}`, which the recipe does not declare (declared: {})", known.join(", ")));
                }
            },
            Op::Matmul(a, b) => {
                let (sa, sb) = (operand(*a)?, operand(*b)?);
                if rank_of(&sa) != 2 || rank_of(&sb) != 2 || sa[1] != sb[0] {
                    return Err(mismatch("matmul", &sa, &sb));
                }
                vec![sa[0], sb[1]]
            }
            Op::Add(a, b) | Op::Sub(a, b) => {
                let (sa, sb) = (operand(*a)?, operand(*b)?);
                if sa != sb {
                    return Err(mismatch("element-wise op", &sa, &sb));
                }
                sa
            }
            Op::Mul(a, b) | Op::Div(a, b) => {
                let (sa, sb) = (operand(*a)?, operand(*b)?);
                if sa == sb {
                    sa
                } else if rank_of(&sa) == 1 && rank_of(&sb) == 2 && sa[0] == sb[0] {
                    sb
                } else if rank_of(&sa) == 2 && rank_of(&sb) == 1 && sb[0] == sa[0] {
                    sa
                } else {
                    return Err(mismatch("element-wise op (a [rows] vector broadcasts over the rows of a [rows, cols] matrix)", &sa, &sb));
                }
            }
            Op::Scale(a, f) => {
                if !f.is_finite() {
                    return err(
                        layer,
                        format!("graph node {i}: scale factor {f} is not finite"),
                    );
                }
                operand(*a)?
            }
            Op::AlphaOverRank(a) | Op::Detach(a) => operand(*a)?,
            Op::Transpose(a) => {
                let s = operand(*a)?;
                if rank_of(&s) != 2 {
                    return err(
                        layer,
                        format!(
                            "graph node {i}: transpose of a rank-{} value {s:?}",
                            s.len()
                        ),
                    );
                }
                vec![s[1], s[0]]
            }
            Op::RowNorm(a) => {
                let s = operand(*a)?;
                if rank_of(&s) != 2 {
                    return err(
                        layer,
                        format!("graph node {i}: row norm of a rank-{} value {s:?}", s.len()),
                    );
                }
                vec![s[0]]
            }
            Op::Kron(a, b) => {
                let (sa, sb) = (operand(*a)?, operand(*b)?);
                if rank_of(&sa) != 2 || rank_of(&sb) != 2 {
                    return Err(mismatch("kron (needs two matrices)", &sa, &sb));
                }
                vec![sa[0] * sb[0], sa[1] * sb[1]]
            }
        };
        shapes.push(shape);
    }
    Ok(shapes)
}

/// A node's value during interpretation.
#[derive(Clone)]
enum Value<B: Backend> {
    V(Tensor<B, 1>),
    M(Tensor<B, 2>),
}

impl<B: Backend> Value<B> {
    fn m(self) -> Tensor<B, 2> {
        match self {
            Value::M(t) => t,
            Value::V(_) => unreachable!("shapes were validated when the adapter was built"),
        }
    }

    /// The same value cut from the autodiff graph (a constant in the backward pass).
    fn detach(self) -> Self {
        match self {
            Value::V(t) => Value::V(t.detach()),
            Value::M(t) => Value::M(t.detach()),
        }
    }
}

fn binary<B: Backend>(
    a: Value<B>,
    b: Value<B>,
    f: impl Fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
    fv: impl Fn(Tensor<B, 1>, Tensor<B, 1>) -> Tensor<B, 1>,
) -> Value<B> {
    match (a, b) {
        (Value::V(a), Value::V(b)) => Value::V(fv(a, b)),
        (Value::M(a), Value::M(b)) => Value::M(f(a, b)),
        (Value::V(a), Value::M(b)) => {
            let n = a.dims()[0];
            Value::M(f(a.reshape([n, 1]), b))
        }
        (Value::M(a), Value::V(b)) => {
            let n = b.dims()[0];
            Value::M(f(a, b.reshape([n, 1])))
        }
    }
}

impl<B: Backend> RecipeAdapter<B> {
    /// Validates `recipe` for the layer in `request` and initialises its parameters (`base_weight`
    /// `[out, in]` is the frozen weight, for `BaseRowNorm` inits and for the check of its shape).
    pub fn new(
        recipe: AdapterRecipe,
        request: AdapterRequest,
        base_weight: &Tensor<B, 2>,
        limits: RecipeLimits,
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        let layer = request.layer.clone();
        let (inf, outf) = (request.in_features as usize, request.out_features as usize);
        if base_weight.dims() != [outf, inf] {
            return err(
                &layer,
                format!(
                    "the request says {inf} -> {outf} features but the weight is {:?}",
                    base_weight.dims()
                ),
            );
        }
        if recipe.graph.len() > limits.max_nodes {
            return err(
                &layer,
                format!(
                    "the recipe has {} graph nodes, more than the limit of {}",
                    recipe.graph.len(),
                    limits.max_nodes
                ),
            );
        }
        if recipe.params.len() > limits.max_params {
            return err(
                &layer,
                format!(
                    "the recipe has {} parameters, more than the limit of {}",
                    recipe.params.len(),
                    limits.max_params
                ),
            );
        }
        let mut param_shapes: Vec<(String, Vec<usize>)> = Vec::new();
        let mut total = 0usize;
        for p in &recipe.params {
            if param_shapes.iter().any(|(n, _)| n == &p.name) {
                return err(&layer, format!("parameter `{}` is declared twice", p.name));
            }
            if p.shape.is_empty() || p.shape.len() > 2 {
                return err(
                    &layer,
                    format!(
                        "parameter `{}` has rank {}; adapter parameters are vectors or matrices",
                        p.name,
                        p.shape.len()
                    ),
                );
            }
            let shape = p
                .shape
                .iter()
                .map(|d| resolve_dim(&layer, &p.name, d, &request))
                .collect::<Result<Vec<_>, _>>()?;
            if p.init == Init::BaseRowNorm && shape != [outf] {
                return err(&layer, format!("parameter `{}` is initialised from the base weight's row norms, so its shape must be [{outf}], not {shape:?}", p.name));
            }
            total = total.saturating_add(shape.iter().product());
            param_shapes.push((p.name.clone(), shape));
        }
        let max_elements = limits
            .max_param_elements
            .unwrap_or(2 * outf * inf + outf + inf);
        if total > max_elements {
            return err(&layer, format!("the recipe's parameters have {total} elements, more than the limit of {max_elements} for a {inf} -> {outf} layer (lower the rank)"));
        }
        let node_shapes = infer_shapes(&layer, &recipe, &param_shapes, &request)?;
        let out_idx = recipe.output as usize;
        match node_shapes.get(out_idx) {
            None => {
                return err(
                    &layer,
                    format!(
                        "output node {out_idx} does not exist (the graph has {} nodes)",
                        node_shapes.len()
                    ),
                )
            }
            Some(s) if s != &[outf, inf] => {
                return err(&layer, format!("output node {out_idx} has shape {s:?}, but a weight (delta) of this layer is [{outf}, {inf}]"));
            }
            _ => {}
        }
        let mut seen = Vec::new();
        for key in &recipe.export {
            if !param_shapes.iter().any(|(n, _)| n == &key.param) {
                return err(
                    &layer,
                    format!(
                        "export key `{}` names parameter `{}`, which the recipe does not declare",
                        key.suffix, key.param
                    ),
                );
            }
            if key.suffix.is_empty() || seen.contains(&key.suffix) {
                return err(
                    &layer,
                    format!("export suffix `{}` is empty or used twice", key.suffix),
                );
            }
            seen.push(key.suffix.clone());
        }

        let mut vectors = Vec::new();
        let mut matrices = Vec::new();
        let mut slots = Vec::new();
        let base = base_weight.clone().detach();
        for (spec, (_, shape)) in recipe.params.iter().zip(&param_shapes) {
            let fan_in = *shape.last().expect("rank >= 1");
            let fill = match &spec.init {
                Init::Zeros => Fill::Zeros,
                Init::Ones => Fill::Ones,
                Init::Normal { std } => Fill::Random(Distribution::Normal(0.0, *std as f64)),
                Init::KaimingUniform { a } => {
                    let bound = (6.0 / ((1.0 + (*a as f64).powi(2)) * fan_in as f64)).sqrt();
                    Fill::Random(Distribution::Uniform(-bound, bound))
                }
                Init::BaseRowNorm => Fill::BaseRowNorm,
            };
            let init = |shape: &[usize]| -> Value<B> {
                match (shape, fill) {
                    (_, Fill::BaseRowNorm) => Value::V(row_norm(base.clone())),
                    ([n], Fill::Zeros) => Value::V(Tensor::zeros([*n], device)),
                    ([r, c], Fill::Zeros) => Value::M(Tensor::zeros([*r, *c], device)),
                    ([n], Fill::Ones) => Value::V(Tensor::ones([*n], device)),
                    ([r, c], Fill::Ones) => Value::M(Tensor::ones([*r, *c], device)),
                    ([n], Fill::Random(d)) => Value::V(Tensor::random([*n], d, device)),
                    ([r, c], Fill::Random(d)) => Value::M(Tensor::random([*r, *c], d, device)),
                    _ => unreachable!("rank checked above"),
                }
            };
            match init(shape) {
                Value::V(t) => {
                    slots.push((ParamSlot::Vector(vectors.len()), shape.clone()));
                    // `Param::from_tensor` would mark a frozen parameter as requiring grad again.
                    vectors.push(Param::initialized(
                        ParamId::new(),
                        t.detach().set_require_grad(spec.trainable),
                    ));
                }
                Value::M(t) => {
                    slots.push((ParamSlot::Matrix(matrices.len()), shape.clone()));
                    matrices.push(Param::initialized(
                        ParamId::new(),
                        t.detach().set_require_grad(spec.trainable),
                    ));
                }
            }
        }
        Ok(RecipeAdapter {
            vectors,
            matrices,
            program: RecipeProgram {
                recipe,
                request,
                slots,
                node_shapes,
            },
        })
    }

    fn param_value(&self, i: usize) -> Value<B> {
        match self.program.slots[i].0 {
            ParamSlot::Vector(k) => Value::V(self.vectors[k].val()),
            ParamSlot::Matrix(k) => Value::M(self.matrices[k].val()),
        }
    }

    /// Evaluates the graph: `ΔW` or `W'` (`[out, in]`) for the frozen `weight`.
    pub fn evaluate(&self, weight: Tensor<B, 2>) -> Tensor<B, 2> {
        let recipe = &self.program.recipe;
        let alpha_over_rank =
            self.program.request.alpha as f64 / self.program.request.rank.max(1) as f64;
        let mut values: Vec<Value<B>> = Vec::with_capacity(recipe.graph.len());
        for op in &recipe.graph {
            let get = |j: &u32| values[*j as usize].clone();
            let v = match op {
                Op::BaseWeight => Value::M(weight.clone()),
                Op::Param(name) => {
                    let i = recipe
                        .params
                        .iter()
                        .position(|p| &p.name == name)
                        .expect("validated");
                    self.param_value(i)
                }
                Op::Matmul(a, b) => Value::M(get(a).m().matmul(get(b).m())),
                Op::Add(a, b) => binary(get(a), get(b), |x, y| x + y, |x, y| x + y),
                Op::Sub(a, b) => binary(get(a), get(b), |x, y| x - y, |x, y| x - y),
                Op::Mul(a, b) => binary(get(a), get(b), |x, y| x * y, |x, y| x * y),
                Op::Div(a, b) => binary(get(a), get(b), |x, y| x / y, |x, y| x / y),
                Op::Scale(a, f) => scale(get(a), *f as f64),
                Op::AlphaOverRank(a) => scale(get(a), alpha_over_rank),
                Op::Transpose(a) => Value::M(get(a).m().transpose()),
                Op::RowNorm(a) => Value::V(row_norm(get(a).m())),
                Op::Detach(a) => get(a).detach(),
                Op::Kron(a, b) => {
                    let (x, y) = (get(a).m(), get(b).m());
                    let ([p, q], [r, s]) = (x.dims(), y.dims());
                    let k = x.reshape([p, 1, q, 1]) * y.reshape([1, r, 1, s]);
                    Value::M(k.reshape([p * r, q * s]))
                }
            };
            values.push(v);
        }
        values.swap_remove(recipe.output as usize).m()
    }

    fn forward_with_base(
        &self,
        x: Tensor<B, 2>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        // A recipe is evaluated in f32 (its parameters are f32; norms of a half weight would
        // lose precision), then used in x's dtype.
        let w = crate::precision::like(self.evaluate(crate::precision::to_f32(weight.clone())), &x);
        match self.program.recipe.output_kind {
            AdapterOutput::WeightDelta => {
                base_linear(x.clone(), weight, bias) + x.matmul(w.transpose())
            }
            AdapterOutput::Weight => base_linear(x, w, bias),
        }
    }

    /// Parameters by export suffix (unexported parameters under their recipe name), with trainability.
    pub fn tensors(&self) -> Vec<(String, AdapterTensor<B>, bool)> {
        let recipe = &self.program.recipe;
        recipe
            .params
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let name = recipe
                    .export
                    .iter()
                    .find(|k| k.param == spec.name)
                    .map(|k| k.suffix.clone())
                    .unwrap_or_else(|| spec.name.clone());
                let t = match self.param_value(i) {
                    Value::V(t) => AdapterTensor::Vector(t),
                    Value::M(t) => AdapterTensor::Matrix(t),
                };
                (name, t, spec.trainable)
            })
            .collect()
    }

    fn set_tensor(
        &mut self,
        layer: &str,
        suffix: &str,
        value: AdapterTensor<B>,
    ) -> Result<(), AdapterError> {
        let recipe = &self.program.recipe;
        let pname = recipe
            .export
            .iter()
            .find(|k| k.suffix == suffix)
            .map(|k| k.param.clone())
            .unwrap_or_else(|| suffix.to_string());
        let Some(i) = recipe.params.iter().position(|p| p.name == pname) else {
            return err(layer, format!("the adapter has no parameter `{suffix}`"));
        };
        match (self.program.slots[i].0, value) {
            (ParamSlot::Vector(k), AdapterTensor::Vector(t)) => {
                replace_param(layer, suffix, &mut self.vectors[k], t)
            }
            (ParamSlot::Matrix(k), AdapterTensor::Matrix(t)) => {
                replace_param(layer, suffix, &mut self.matrices[k], t)
            }
            (_, v) => err(
                layer,
                format!(
                    "`{suffix}` has shape {:?}, the new value {:?}",
                    self.program.slots[i].1,
                    v.shape()
                ),
            ),
        }
    }
}

fn scale<B: Backend>(v: Value<B>, f: f64) -> Value<B> {
    match v {
        Value::V(t) => Value::V(t.mul_scalar(f)),
        Value::M(t) => Value::M(t.mul_scalar(f)),
    }
}

/// How a parameter is filled at creation.
#[derive(Clone, Copy)]
enum Fill {
    Zeros,
    Ones,
    Random(Distribution),
    BaseRowNorm,
}

/// The L2 norm of each row, `[rows, cols] -> [rows]`.
fn row_norm<B: Backend>(m: Tensor<B, 2>) -> Tensor<B, 1> {
    let rows = m.dims()[0];
    m.powi_scalar(2).sum_dim(1).sqrt().reshape([rows])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use crate::{CpuAutodiffBackend, CpuBackend, CpuDevice};
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
