//! CogVideoX self-attention over the joint `[text | video]` sequence: diffusers `Attention` with
//! `qk_norm="layer_norm"` (eps 1e-6) and `CogVideoXAttnProcessor2_0` (RoPE on the video part of
//! queries and keys only). The scaled-dot-product itself is
//! [`cogvx_model_core::attention::attention`], the project's single attention function.

use crate::embeddings::{apply_rotary_emb, RotaryEmb};
use crate::error::TransformerError;
use burn::module::Module;
use burn::nn::Dropout;
use burn::tensor::{backend::Backend, Tensor};
use cogvx_model_core::attention::attention;
use cogvx_model_core::layout::swap_dims_contiguous;
use cogvx_model_core::nn::{LayerNorm, Linear};
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::ModelBackend;

/// `attn1` of a CogVideoX block. Burn module paths equal the checkpoint keys (`to_q`, `norm_q`,
/// `to_out.0`, ...), so adapters can target them by their diffusers/PEFT names.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub norm_q: LayerNorm<B>,
    pub norm_k: LayerNorm<B>,
    /// `to_out.0` (Linear) and `to_out.1` (Dropout), as diffusers' `ModuleList`.
    pub to_out: (Linear<B>, Dropout),
    pub heads: usize,
}

impl<B: Backend> Attention<B> {
    /// Loads `attn1` of a block: `dim -> heads * head_dim` projections (bias `bias`), the QK
    /// LayerNorms over `head_dim` and the output projection (always with bias, `out_bias=True`).
    pub fn load(
        vb: &VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
        dropout: f64,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::load(&vb.pp("to_q"), dim, inner, bias, device)?,
            to_k: Linear::load(&vb.pp("to_k"), dim, inner, bias, device)?,
            to_v: Linear::load(&vb.pp("to_v"), dim, inner, bias, device)?,
            norm_q: LayerNorm::load(&vb.pp("norm_q"), head_dim, 1e-6, true, true, device)?,
            norm_k: LayerNorm::load(&vb.pp("norm_k"), head_dim, 1e-6, true, true, device)?,
            to_out: (
                Linear::load(&vb.pp("to_out").pp(0), inner, dim, true, device)?,
                burn::nn::DropoutConfig::new(dropout).init(),
            ),
            heads,
        })
    }
}

impl<B: ModelBackend> Attention<B> {
    /// `hidden_states [B, Lv, D]` (video), `encoder_hidden_states [B, Lt, D]` (text),
    /// `image_rotary_emb` `(cos, sin)` `[Lv, head_dim]`. Returns `(video, text)` outputs.
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        encoder_hidden_states: Tensor<B, 3>,
        image_rotary_emb: Option<&RotaryEmb<B>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [_, text_len, _] = encoder_hidden_states.dims();
        let x = Tensor::cat(vec![encoder_hidden_states, hidden_states], 1);
        let len = x.dims()[1];
        let out = self.forward_joint(x, text_len, image_rotary_emb);
        let text = out.clone().narrow(1, 0, text_len);
        let video = out.narrow(1, text_len, len - text_len);
        (video, text)
    }

    /// [`Self::forward`] on the joint sequence `[B, Lt + Lv, D]` (text rows first, `text_len`
    /// of them), returning the joint output.
    pub fn forward_joint(
        &self,
        x: Tensor<B, 3>,
        text_len: usize,
        image_rotary_emb: Option<&RotaryEmb<B>>,
    ) -> Tensor<B, 3> {
        let [b, len, _] = x.dims();
        // The heads' axis swapped with the tokens' as a contiguous copy: the norms, the rotary
        // embedding and their backward then run on burn-flex's fast paths (cogvx_model_core::layout).
        let split_heads = |t: Tensor<B, 3>| {
            let inner = t.dims()[2];
            swap_dims_contiguous(t.reshape([b, len, self.heads, inner / self.heads]), 1, 2)
            // [B, H, L, hd]
        };
        let query = split_heads(self.to_q.forward(x.clone()));
        let key = split_heads(self.to_k.forward(x.clone()));
        let value = split_heads(self.to_v.forward(x));
        let query = self.norm_q.forward(query);
        let key = self.norm_k.forward(key);
        let (query, key) = match image_rotary_emb {
            Some((cos, sin)) => {
                // RoPE on the video tokens only: the text rows of the tables are the identity
                // (cos 1, sin 0), which leaves the text tokens bit-for-bit unchanged.
                let (cos, sin) = pad_text_rows(cos, sin, text_len);
                (
                    apply_rotary_emb(query, cos.clone(), sin.clone()),
                    apply_rotary_emb(key, cos, sin),
                )
            }
            None => (query, key),
        };
        let out = attention(query, key, value, None, None); // [B, H, L, hd]
        let [_, h, _, hd] = out.dims();
        let out = swap_dims_contiguous(out, 1, 2).reshape([b, len, h * hd]);
        self.to_out.1.forward(self.to_out.0.forward(out))
    }
}

/// Prepends `text_len` identity rows (cos 1, sin 0) to the video RoPE tables `[Lv, hd]`.
fn pad_text_rows<B: Backend>(
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    text_len: usize,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let d = cos.dims()[1];
    let device = cos.device();
    (
        Tensor::cat(vec![Tensor::ones([text_len, d], &device), cos.clone()], 0),
        Tensor::cat(vec![Tensor::zeros([text_len, d], &device), sin.clone()], 0),
    )
}

/// Checks a RoPE table pair against the video token count and head dim.
pub(crate) fn check_rotary<B: Backend>(
    rot: &RotaryEmb<B>,
    video_tokens: usize,
    head_dim: usize,
) -> Result<(), TransformerError> {
    for (name, t) in [("cos", &rot.0), ("sin", &rot.1)] {
        if t.dims() != [video_tokens, head_dim] {
            return crate::error::input_err(format!(
                "RoPE table `{name}` has shape {:?}, expected [{video_tokens}, {head_dim}] (video tokens x head dim); \
                 compute it with rotary_tables() for this latent size",
                t.dims()
            ));
        }
    }
    Ok(())
}
