//! Gradient checkpointing (activation recomputation), as PyTorch's `torch.utils.checkpoint`
//! that diffusers' `enable_gradient_checkpointing` applies per transformer block.
//!
//! burn's autodiff cannot run a backward inside another one (its graph lock is held for the
//! whole backward), so checkpointing here is a *segmented* backward: a model runs its
//! checkpointed modules without recording a graph, keeping only their inputs, and joins the
//! segments with fresh leaves ([`leaf`]). The backward then runs segment by segment, from the
//! loss to the first input, each one a separate `backward()` over one recomputed module call;
//! the gradients of every parameter end up in the one container the loss's backward returned,
//! under the parameters' own nodes, so the caller reads them as usual. The transformer uses this
//! for its blocks (`CogVideoXTransformer3DModel::forward_taped`).
//!
//! What gets recomputed must be deterministic (dropout with p > 0 would draw other masks).

use crate::backend::ModelAutodiffBackend;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// `t` cut from its graph as a new leaf that requires a gradient.
pub fn leaf<B: AutodiffBackend, const D: usize>(t: &Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_inner(t.clone().inner()).require_grad()
}

/// Adds `value` to the gradient that `grads` holds for `t`.
pub fn accumulate<B: AutodiffBackend, const D: usize>(
    t: &Tensor<B, D>,
    grads: &mut B::Gradients,
    value: Tensor<B::InnerBackend, D>,
) {
    let sum = match t.grad_remove(grads) {
        Some(old) => old + value,
        None => value,
    };
    t.grad_replace(grads, sum);
}

type Transfer<B> =
    Box<dyn FnOnce(&<B as AutodiffBackend>::Gradients, &mut <B as AutodiffBackend>::Gradients)>;

/// A copy of a module whose trainable parameters are fresh leaves, for one recomputation;
/// [`Recompute::transfer`] moves their gradients to the original parameters.
pub struct Recompute<B: AutodiffBackend, M> {
    /// The copy to run.
    pub module: M,
    transfers: Vec<Transfer<B>>,
}

struct Fresh<B: AutodiffBackend> {
    transfers: Vec<Transfer<B>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Fresh<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let copy = Tensor::<B, D>::from_inner(tensor.clone().inner());
        let copy = if tensor.is_require_grad() {
            let copy = copy.require_grad();
            let fresh = copy.clone();
            self.transfers.push(Box::new(move |from, to| {
                if let Some(g) = fresh.grad(from) {
                    accumulate(&tensor, to, g);
                }
            }));
            copy
        } else {
            copy
        };
        Param::from_mapped_value(id, copy, mapper)
    }
}

impl<B: AutodiffBackend, M: Module<B>> Recompute<B, M> {
    /// Copies `module` (cheap: tensors are shared) with fresh leaves for its trainable parameters.
    pub fn new(module: &M) -> Self {
        let mut fresh = Fresh {
            transfers: Vec::new(),
        };
        let module = module.clone().map(&mut fresh);
        Recompute {
            module,
            transfers: fresh.transfers,
        }
    }

    /// Adds the copy's parameter gradients in `from` to the original parameters' in `to`.
    pub fn transfer(self, from: &B::Gradients, to: &mut B::Gradients) {
        for t in self.transfers {
            t(from, to);
        }
    }
}

/// `module` with every parameter detached (no graph is recorded through it).
pub fn detached<B: AutodiffBackend, M: Module<B>>(module: &M) -> M {
    struct Detach;
    impl<B: AutodiffBackend> ModuleMapper<B> for Detach {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, Tensor::from_inner(tensor.inner()), mapper)
        }
    }
    module.clone().map(&mut Detach)
}

/// Adds every gradient `from` holds for a trainable parameter of `module` to `to`.
pub fn merge_param_grads<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    from: &B::Gradients,
    to: &mut B::Gradients,
) {
    struct Merge<'a, B: AutodiffBackend> {
        from: &'a B::Gradients,
        to: &'a mut B::Gradients,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Merge<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                let t = param.val();
                if let Some(g) = t.grad(self.from) {
                    accumulate(&t, self.to, g);
                }
            }
        }
    }
    module.visit(&mut Merge { from, to });
}

/// `sum(out * grad)`: a scalar whose gradient with respect to `out` is `grad`, to backpropagate
/// a known output gradient ([`backward_sum`]); `None` when `out` requires no gradient.
pub fn dot<B: ModelAutodiffBackend, const D: usize>(
    out: Tensor<B, D>,
    grad: Tensor<B::InnerBackend, D>,
) -> Option<Tensor<B, 1>> {
    let tracked = B::is_tracked(&out.clone().into_primitive().tensor());
    tracked.then(|| (out * Tensor::from_inner(grad)).sum())
}

/// One backward through the sum of `terms` (from [`dot`]); `None` when there is none.
pub fn backward_sum<B: AutodiffBackend>(
    terms: impl IntoIterator<Item = Option<Tensor<B, 1>>>,
) -> Option<B::Gradients> {
    terms
        .into_iter()
        .flatten()
        .reduce(|a, b| a + b)
        .map(|t| t.backward())
}
