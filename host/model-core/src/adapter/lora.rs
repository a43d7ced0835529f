//! PEFT's LoRA: `lora_A [r, in]`, `lora_B [out, r]`, output `lora_B(lora_A(x)) * alpha / r`.

use crate::linear::linear;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor};

use super::*;

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
}

impl<B: ModelBackend> LoraAdapter<B> {
    /// The adapter's own output `(x A^T) B^T * scale` for `x [rows, in]`.
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // In x's dtype (autocast runs the LoRA matmuls in half too); the cast's backward
        // brings the gradients back to the f32 parameters.
        let a = crate::precision::like(self.lora_a.val(), &x);
        let b = crate::precision::like(self.lora_b.val(), &x);
        let y = linear(linear(x, a, None), b, None);
        // Exactly the product when alpha equals the rank (the common choice): no pass for it.
        if self.scale == 1.0 {
            y
        } else {
            y.mul_scalar(self.scale)
        }
    }

    pub(super) fn forward_with_base(
        &self,
        x: Tensor<B, 2>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        let a = crate::precision::like(self.lora_a.val(), &x);
        let b = crate::precision::like(self.lora_b.val(), &x);
        let prim = |t: Tensor<B, 2>| t.into_primitive().tensor();
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(B::lora_linear(
            crate::linear::LoraInputs {
                x: prim(x),
                weight: prim(weight),
                bias: bias.map(|b| b.into_primitive().tensor()),
                lora_a: prim(a),
                lora_b: prim(b),
                scale: self.scale,
            },
        )))
    }
}
