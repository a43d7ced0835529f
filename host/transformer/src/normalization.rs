//! Adaptive norms of CogVideoX, mirroring diffusers `models/normalization.py`
//! (`CogVideoXLayerNormZero`, `AdaLayerNorm` with `chunk_dim=1`).

use crate::error::TransformerError;
use burn::module::Module;
use burn::tensor::{activation::silu, backend::Backend, Tensor};
use cogvx_model_core::modulate::modulate;
use cogvx_model_core::nn::{LayerNorm, Linear};
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::ModelBackend;

/// diffusers `CogVideoXLayerNormZero`: one LayerNorm shared by the video and text streams, each
/// modulated by its own shift/scale from `linear(silu(temb))`, plus the two gates.
#[derive(Module, Debug)]
pub struct CogVideoXLayerNormZero<B: Backend> {
    /// `[6 * dim, conditioning_dim]`: shift, scale, gate, enc_shift, enc_scale, enc_gate.
    pub linear: Linear<B>,
    pub norm: LayerNorm<B>,
}

/// What [`CogVideoXLayerNormZero::forward`] returns.
pub struct NormZeroOut<B: Backend> {
    /// Modulated video tokens `[B, Lv, D]`.
    pub hidden_states: Tensor<B, 3>,
    /// Modulated text tokens `[B, Lt, D]`.
    pub encoder_hidden_states: Tensor<B, 3>,
    /// `[B, 1, D]`.
    pub gate: Tensor<B, 3>,
    /// `[B, 1, D]`.
    pub enc_gate: Tensor<B, 3>,
}

impl<B: Backend> CogVideoXLayerNormZero<B> {
    pub fn load(
        vb: &VarBuilder,
        conditioning_dim: usize,
        embedding_dim: usize,
        elementwise_affine: bool,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        Ok(CogVideoXLayerNormZero {
            linear: Linear::load(
                &vb.pp("linear"),
                conditioning_dim,
                6 * embedding_dim,
                true,
                device,
            )?,
            norm: LayerNorm::load(
                &vb.pp("norm"),
                embedding_dim,
                eps,
                elementwise_affine,
                true,
                device,
            )?,
        })
    }
}

impl<B: ModelBackend> CogVideoXLayerNormZero<B> {
    /// The six modulation rows `linear(silu(temb))` as `[B, 1, D]` each: shift, scale, gate,
    /// enc_shift, enc_scale, enc_gate.
    fn modulations(&self, temb: Tensor<B, 2>) -> [Tensor<B, 3>; 6] {
        self.linear
            .forward(silu(temb))
            .unsqueeze_dim::<3>(1)
            .chunk(6, 2)
            .try_into()
            .expect("chunk of 6 * D into 6")
    }

    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        encoder_hidden_states: Tensor<B, 3>,
        temb: Tensor<B, 2>,
    ) -> NormZeroOut<B> {
        let [shift, scale, gate, enc_shift, enc_scale, enc_gate] = self.modulations(temb);
        let hidden_states = self.norm.forward(hidden_states) * (scale + 1.0) + shift;
        let encoder_hidden_states =
            self.norm.forward(encoder_hidden_states) * (enc_scale + 1.0) + enc_shift;
        NormZeroOut {
            hidden_states,
            encoder_hidden_states,
            gate,
            enc_gate,
        }
    }

    /// [`Self::forward`] on the joint sequence `[B, Lt + Lv, D]` (text rows first, `text_len`
    /// of them): the modulated sequence, and the gates as `[B, 2, D]` (text's, then video's).
    /// One norm over all rows and one modulation pass ([`cogvx_model_core::modulate`]).
    pub fn forward_joint(
        &self,
        x: Tensor<B, 3>,
        text_len: usize,
        temb: Tensor<B, 2>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [shift, scale, gate, enc_shift, enc_scale, enc_gate] = self.modulations(temb);
        let a = Tensor::cat(vec![enc_scale + 1.0, scale + 1.0], 1);
        let c = Tensor::cat(vec![enc_shift, shift], 1);
        let x = modulate(self.norm.forward(x), a, Some(c), None, text_len);
        (x, Tensor::cat(vec![enc_gate, gate], 1))
    }
}

/// diffusers `AdaLayerNorm(embedding_dim, output_dim=2 * dim, chunk_dim=1)` (the final norm):
/// `norm(x) * (1 + scale) + shift` with `shift, scale = linear(silu(temb)).chunk(2)`.
#[derive(Module, Debug)]
pub struct AdaLayerNorm<B: Backend> {
    pub linear: Linear<B>,
    pub norm: LayerNorm<B>,
}

impl<B: Backend> AdaLayerNorm<B> {
    pub fn load(
        vb: &VarBuilder,
        embedding_dim: usize,
        output_dim: usize,
        elementwise_affine: bool,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        Ok(AdaLayerNorm {
            linear: Linear::load(&vb.pp("linear"), embedding_dim, output_dim, true, device)?,
            norm: LayerNorm::load(
                &vb.pp("norm"),
                output_dim / 2,
                eps,
                elementwise_affine,
                true,
                device,
            )?,
        })
    }
}

impl<B: ModelBackend> AdaLayerNorm<B> {
    /// `x [B, L, D]`, `temb [B, E]`.
    pub fn forward(&self, x: Tensor<B, 3>, temb: Tensor<B, 2>) -> Tensor<B, 3> {
        let mods = self
            .linear
            .forward(silu(temb))
            .unsqueeze_dim::<3>(1)
            .chunk(2, 2);
        let [shift, scale]: [Tensor<B, 3>; 2] = mods.try_into().expect("chunk of 2 * D into 2");
        self.norm.forward(x) * (scale + 1.0) + shift
    }
}
