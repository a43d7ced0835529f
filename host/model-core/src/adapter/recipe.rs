//! The interpreter of a plugin's [`AdapterRecipe`]: parameters plus a flat op graph that yields
//! `ΔW` or `W'`, validated once when built (operand indices, parameter names, shapes, size
//! limits), then evaluated on every forward.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use cogvx_plugin_api::{AdapterOutput, AdapterRecipe, AdapterRequest, Dim, Init, Op};

use super::*;

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

    pub(super) fn set_tensor(
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

impl<B: ModelBackend> RecipeAdapter<B> {
    pub(super) fn forward_with_base(
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
