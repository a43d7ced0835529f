//! Mixed precision, as accelerate's `mixed_precision = "bf16" | "fp16"` with the frozen weights
//! loaded in half precision (the official finetune's `weight_dtype`):
//!
//! * frozen weights live in the half dtype ([`crate::weights::VarBuilder::with_dtype`]);
//!   trainable parameters (LoRA, adapter and SFT master weights) and the optimizer stay f32;
//! * a model runs in its *compute dtype*: its entry casts the inputs, and every layer computes
//!   in the dtype of its input activations, casting its own parameters to it at use
//!   ([`to_dtype`], a no-op when they already are); the cast's backward brings gradients back
//!   to the parameters' f32;
//! * what autocast keeps in f32 stays f32 inside the operation: LayerNorm/GroupNorm statistics,
//!   the attention softmax and its accumulators, the GELU formula, RoPE; each returns its
//!   input's dtype, so the activations saved for the backward are half-size.

use burn::tensor::{backend::Backend, DType, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// `[train] mixed_precision`: the dtype the transformer computes in and keeps frozen weights in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// bfloat16 (the range of f32, 8 bits of mantissa): no loss scaling needed.
    Bf16,
    /// float16 (max 65504): the loss is scaled dynamically ([`LossScaler`]).
    Fp16,
}

impl MixedPrecision {
    /// The accepted spellings, for error messages.
    pub const NAMES: &'static str = "\"no\", \"bf16\", \"fp16\"";

    /// Parses `"no" | "bf16" | "fp16"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "no" => Some(MixedPrecision::No),
            "bf16" => Some(MixedPrecision::Bf16),
            "fp16" => Some(MixedPrecision::Fp16),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Bf16 => "bf16",
            MixedPrecision::Fp16 => "fp16",
        }
    }

    /// The compute (and frozen-weight) dtype.
    pub fn dtype(self) -> FloatDType {
        match self {
            MixedPrecision::No => FloatDType::F32,
            MixedPrecision::Bf16 => FloatDType::BF16,
            MixedPrecision::Fp16 => FloatDType::F16,
        }
    }

    /// Bytes per element of the compute dtype.
    pub fn bytes(self) -> u64 {
        match self {
            MixedPrecision::No => 4,
            MixedPrecision::Bf16 | MixedPrecision::Fp16 => 2,
        }
    }

    /// Whether this is half precision.
    pub fn is_half(self) -> bool {
        self != MixedPrecision::No
    }

    /// The dtype the T5 text encoder keeps its weights in under this setting: bf16 with either
    /// half precision (T5 v1.1 overflows in fp16), else f32 (`None`).
    pub fn text_encoder_dtype(self) -> Option<FloatDType> {
        self.is_half().then_some(FloatDType::BF16)
    }
}

/// The float dtype of `t`.
pub fn float_dtype<B: Backend, const D: usize>(t: &Tensor<B, D>) -> FloatDType {
    t.dtype().into()
}

/// `t` in `dtype`: `t` itself when it already is (no graph node, no copy).
pub fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if t.dtype() == DType::from(dtype) {
        t
    } else {
        t.cast(dtype)
    }
}

/// `t` in the dtype of `like`.
pub fn like<B: Backend, const D: usize, const E: usize>(
    t: Tensor<B, D>,
    like: &Tensor<B, E>,
) -> Tensor<B, D> {
    to_dtype(t, float_dtype(like))
}

/// `t` in f32 (for the statistics and accumulations autocast keeps in f32).
pub fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    to_dtype(t, FloatDType::F32)
}

/// Dynamic loss scaling for fp16, as PyTorch's `GradScaler` (and accelerate with
/// `mixed_precision="fp16"`): the loss is multiplied by `scale` before the backward and the
/// gradients divided by it after; a step whose gradients are not all finite is skipped and the
/// scale halved; after `growth_interval` finite steps in a row the scale doubles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Finite steps since the last change.
    pub good_steps: u64,
    /// Steps skipped so far (non-finite gradients).
    pub skipped: u64,
    /// Finite steps between two doublings (torch: 2000).
    pub growth_interval: u64,
}

impl Default for LossScaler {
    /// torch's defaults: initial scale 2^16, growth interval 2000.
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
            skipped: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// Records a step's outcome: `finite` = every gradient was finite (the step is taken).
    /// Returns whether the step is taken.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale = (self.scale * 2.0).min(f32::MAX as f64 / 2.0);
                self.good_steps = 0;
            }
        } else {
            self.skipped += 1;
            // torch has no lower bound; a scale below 2^-24 cannot recover anything in fp16.
            self.scale = (self.scale * 0.5).max(f64::from(half::f16::MIN_POSITIVE_SUBNORMAL));
            self.good_steps = 0;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaler_backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..LossScaler::default()
        };
        assert!(!s.update(false));
        assert_eq!((s.scale, s.skipped), (32768.0, 1));
        for _ in 0..2 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        // An overflow resets the run of good steps.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }

    #[test]
    fn names_round_trip() {
        for p in [
            MixedPrecision::No,
            MixedPrecision::Bf16,
            MixedPrecision::Fp16,
        ] {
            assert_eq!(MixedPrecision::parse(p.name()), Some(p));
        }
        assert_eq!(MixedPrecision::parse("fp32"), None);
    }
}
