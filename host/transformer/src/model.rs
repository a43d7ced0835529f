//! `CogVideoXTransformer3DModel` and `CogVideoXBlock`, mirroring diffusers
//! `models/transformers/cogvideox_transformer_3d.py` (and `FeedForward`/`GELU` of
//! `models/attention.py`, `models/activations.py`).

use crate::attention::{check_rotary, Attention};
use crate::config::TransformerConfig;
use crate::embeddings::{
    get_timestep_embedding, CogVideoXPatchEmbed, RotaryEmb, TimestepEmbedding,
};
use crate::error::{input_err, TransformerError};
use crate::normalization::{AdaLayerNorm, CogVideoXLayerNormZero};
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{
    activation, backend::Backend, FloatDType, Tensor, TensorCreationOptions, TensorData,
};
use cogvx_model_core::config::read_config;
use cogvx_model_core::feed_forward::feed_forward;
use cogvx_model_core::grad_checkpoint;
use cogvx_model_core::modulate::modulate;
use cogvx_model_core::nn::{LayerNorm, Linear};
use cogvx_model_core::precision::{float_dtype, to_dtype};
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::{ModelAutodiffBackend, ModelBackend};
use std::path::Path;

/// diffusers `GELU` (`net.0` of the feed-forward): `gelu(proj(x))`, tanh-approximated for
/// `activation_fn = "gelu-approximate"`.
#[derive(Module, Debug)]
pub struct Gelu<B: Backend> {
    pub proj: Linear<B>,
    pub approximate: bool,
}

impl<B: ModelBackend> Gelu<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.proj.forward(x);
        if self.approximate {
            gelu_tanh(x)
        } else {
            activation::gelu(x)
        }
    }
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (torch's `gelu(approximate="tanh")`): one
/// operation of [`ModelBackend`] that keeps only its input for the backward
/// ([`cogvx_model_core::activation::gelu_tanh`]).
pub fn gelu_tanh<B: ModelBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    cogvx_model_core::activation::gelu_tanh(x)
}

/// diffusers `FeedForward(dim, activation_fn, final_dropout=True)`: `net` is
/// `(GELU, Dropout, Linear, Dropout)`, so module paths are `net.0.proj` and `net.2` as in the checkpoint.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub net: (Gelu<B>, Dropout, Linear<B>, Dropout),
    /// As one operation, recompute the `[tokens, 4 x dim]` pre-activation in the backward
    /// instead of keeping it ([`CogVideoXTransformer3DModel::set_feed_forward_recompute`]).
    #[module(skip)]
    pub recompute: bool,
}

impl<B: Backend> FeedForward<B> {
    /// Loads `net.0.proj` (`dim -> 4 dim`) and `net.2` (`4 dim -> dim`), both with bias.
    pub fn load(
        vb: &VarBuilder,
        dim: usize,
        activation_fn: &str,
        dropout: f64,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        if !crate::config::FF_ACTIVATIONS.contains(&activation_fn) {
            return Err(TransformerError::Config {
                path: vb.key("net"),
                message: format!(
                    "activation_fn `{activation_fn}` is not supported (supported: {})",
                    crate::config::FF_ACTIVATIONS.join(", ")
                ),
            });
        }
        let inner = 4 * dim;
        let net = vb.pp("net");
        Ok(FeedForward {
            net: (
                Gelu {
                    proj: Linear::load(&net.pp(0).pp("proj"), dim, inner, true, device)?,
                    approximate: activation_fn == "gelu-approximate",
                },
                DropoutConfig::new(dropout).init(),
                Linear::load(&net.pp(2), inner, dim, true, device)?,
                DropoutConfig::new(dropout).init(),
            ),
            recompute: false,
        })
    }
}

impl<B: ModelBackend> FeedForward<B> {
    /// `net.2(gelu(net.0.proj(x)))` (dropouts in between).
    ///
    /// Without adapters on its two layers, with the tanh GELU and no active dropout (CogVideoX's
    /// configuration), this is one operation ([`cogvx_model_core::feed_forward`]) that keeps
    /// `x` and the pre-activation for the backward (only `x` with [`Self::recompute`]), never the
    /// hidden layer; otherwise the layers run one after the other.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gelu, drop1, out, drop2) = &self.net;
        let no_dropout = !B::ad_enabled(&x.device()) || (drop1.prob == 0.0 && drop2.prob == 0.0);
        if let (true, true, None, Some(b1), None, Some(b2)) = (
            gelu.approximate,
            no_dropout,
            &gelu.proj.adapter,
            &gelu.proj.bias,
            &out.adapter,
            &out.bias,
        ) {
            let [batch, len, dim] = x.dims();
            let dtype = float_dtype(&x);
            let cast = |w: &Param<Tensor<B, 2>>| to_dtype(w.val(), dtype);
            let y = feed_forward(
                x.reshape([batch * len, dim]),
                cast(&gelu.proj.weight),
                to_dtype(b1.val(), dtype),
                cast(&out.weight),
                to_dtype(b2.val(), dtype),
                self.recompute,
            );
            let out_dim = y.dims()[1];
            return y.reshape([batch, len, out_dim]);
        }
        let x = self.net.0.forward(x);
        let x = self.net.1.forward(x);
        let x = self.net.2.forward(x);
        self.net.3.forward(x)
    }
}

/// diffusers `CogVideoXBlock`: adaLN-zero norm, joint self-attention, adaLN-zero norm, joint
/// feed-forward, each added back to the text and video streams through their own gates.
#[derive(Module, Debug)]
pub struct CogVideoXBlock<B: Backend> {
    pub norm1: CogVideoXLayerNormZero<B>,
    pub attn1: Attention<B>,
    pub norm2: CogVideoXLayerNormZero<B>,
    pub ff: FeedForward<B>,
}

impl<B: Backend> CogVideoXBlock<B> {
    pub fn load(
        vb: &VarBuilder,
        c: &TransformerConfig,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        let dim = c.inner_dim();
        Ok(CogVideoXBlock {
            norm1: CogVideoXLayerNormZero::load(
                &vb.pp("norm1"),
                c.time_embed_dim,
                dim,
                c.norm_elementwise_affine,
                c.norm_eps,
                device,
            )?,
            attn1: Attention::load(
                &vb.pp("attn1"),
                dim,
                c.num_attention_heads,
                c.attention_head_dim,
                c.attention_bias,
                c.dropout,
                device,
            )?,
            norm2: CogVideoXLayerNormZero::load(
                &vb.pp("norm2"),
                c.time_embed_dim,
                dim,
                c.norm_elementwise_affine,
                c.norm_eps,
                device,
            )?,
            ff: FeedForward::load(&vb.pp("ff"), dim, &c.activation_fn, c.dropout, device)?,
        })
    }
}

impl<B: ModelBackend> CogVideoXBlock<B> {
    /// `hidden_states [B, Lv, D]`, `encoder_hidden_states [B, Lt, D]`, `temb [B, E]`; returns
    /// `(hidden_states, encoder_hidden_states)`.
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        encoder_hidden_states: Tensor<B, 3>,
        temb: Tensor<B, 2>,
        image_rotary_emb: Option<&RotaryEmb<B>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [_, text_len, _] = encoder_hidden_states.dims();
        let x = Tensor::cat(vec![encoder_hidden_states, hidden_states], 1);
        let x = self.forward_joint(x, text_len, temb, image_rotary_emb);
        let len = x.dims()[1];
        (
            x.clone().narrow(1, text_len, len - text_len),
            x.narrow(1, 0, text_len),
        )
    }

    /// [`Self::forward`] on the joint sequence `[B, Lt + Lv, D]` (text rows first, `text_len`
    /// of them), as the attention and the feed-forward see it: the model keeps its blocks'
    /// state joint, so no block splits and re-concatenates its streams, and each norm's
    /// modulation and each gated residual is one operation over both
    /// ([`cogvx_model_core::modulate`]).
    pub fn forward_joint(
        &self,
        x: Tensor<B, 3>,
        text_len: usize,
        temb: Tensor<B, 2>,
        image_rotary_emb: Option<&RotaryEmb<B>>,
    ) -> Tensor<B, 3> {
        let (normed, gates) = self.norm1.forward_joint(x.clone(), text_len, temb.clone());
        let attn = self.attn1.forward_joint(normed, text_len, image_rotary_emb);
        let x = modulate(attn, gates, None, Some(x), text_len);
        let (normed, gates) = self.norm2.forward_joint(x.clone(), text_len, temb);
        let ff_output = self.ff.forward(normed);
        modulate(ff_output, gates, None, Some(x), text_len)
    }
}

/// diffusers `CogVideoXTransformer3DModel`, all variants (2B, 5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V).
///
/// Field names are the checkpoint's, and so are burn's module paths (`transformer_blocks.3.attn1.to_q`,
/// `ff.net.0.proj`, ...); the weights load through [`VarBuilder`] without a renaming table.
#[derive(Module, Debug)]
pub struct CogVideoXTransformer3DModel<B: Backend> {
    pub patch_embed: CogVideoXPatchEmbed<B>,
    pub embedding_dropout: Dropout,
    pub time_embedding: TimestepEmbedding<B>,
    /// CogVideoX1.5-5B-I2V only.
    pub ofs_embedding: Option<TimestepEmbedding<B>>,
    pub transformer_blocks: Vec<CogVideoXBlock<B>>,
    pub norm_final: LayerNorm<B>,
    pub norm_out: AdaLayerNorm<B>,
    pub proj_out: Linear<B>,
    /// The config the model was built from.
    pub config: TransformerConfig,
    /// Recompute each block in the backward instead of keeping its activations
    /// ([`Self::set_gradient_checkpointing`]).
    #[module(skip)]
    pub gradient_checkpointing: bool,
    /// With gradient checkpointing, keep the blocks' inputs in host memory until the backward
    /// ([`Self::set_checkpoint_offload`]).
    #[module(skip)]
    pub checkpoint_offload: bool,
    /// The dtype the blocks compute in ([`cogvx_model_core::precision`]): the weights' load
    /// dtype unless set with [`Self::set_compute_dtype`]. The output is always f32.
    #[module(skip)]
    pub compute_dtype: FloatDType,
}

impl<B: Backend> CogVideoXTransformer3DModel<B> {
    /// Builds the model from `vb` (the root of a `transformer/` folder's weights). Problems with
    /// keys or shapes are collected in `vb`; call `vb.finish()` afterwards (as [`Self::from_dir`] does).
    pub fn load(
        vb: &VarBuilder,
        config: &TransformerConfig,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        config
            .validate()
            .map_err(|message| TransformerError::Config {
                path: "<config>".into(),
                message,
            })?;
        let c = config;
        let inner = c.inner_dim();
        let ofs_embedding = match c.ofs_embed_dim {
            Some(d) => Some(TimestepEmbedding::load(
                &vb.pp("ofs_embedding"),
                d,
                d,
                &c.timestep_activation_fn,
                device,
            )?),
            None => None,
        };
        let transformer_blocks = (0..c.num_layers)
            .map(|i| CogVideoXBlock::load(&vb.pp("transformer_blocks").pp(i), c, device))
            .collect::<Result<Vec<_>, _>>()?;
        let output_dim =
            c.patch_size * c.patch_size * c.patch_size_t.unwrap_or(1) * c.out_channels();
        Ok(CogVideoXTransformer3DModel {
            patch_embed: CogVideoXPatchEmbed::load(&vb.pp("patch_embed"), c, device)?,
            embedding_dropout: DropoutConfig::new(c.dropout).init(),
            time_embedding: TimestepEmbedding::load(
                &vb.pp("time_embedding"),
                inner,
                c.time_embed_dim,
                &c.timestep_activation_fn,
                device,
            )?,
            ofs_embedding,
            transformer_blocks,
            norm_final: LayerNorm::load(
                &vb.pp("norm_final"),
                inner,
                c.norm_eps,
                c.norm_elementwise_affine,
                true,
                device,
            )?,
            norm_out: AdaLayerNorm::load(
                &vb.pp("norm_out"),
                c.time_embed_dim,
                2 * inner,
                c.norm_elementwise_affine,
                c.norm_eps,
                device,
            )?,
            proj_out: Linear::load(&vb.pp("proj_out"), inner, output_dim, true, device)?,
            config: c.clone(),
            gradient_checkpointing: false,
            checkpoint_offload: false,
            compute_dtype: vb.dtype().unwrap_or(FloatDType::F32),
        })
    }

    /// Loads a diffusers `transformer/` folder: `config.json` plus single-file or sharded
    /// safetensors (fp16/bf16/fp32). Every missing, unexpected or wrong-shape key is reported at once.
    pub fn from_dir(dir: &Path, device: &B::Device) -> Result<Self, TransformerError> {
        Self::from_dir_in(dir, FloatDType::F32, device)
    }

    /// [`Self::from_dir`] with the weights created in `dtype` (mixed precision keeps frozen
    /// weights in bf16/f16) and the model computing in it.
    pub fn from_dir_in(
        dir: &Path,
        dtype: FloatDType,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        let config_path = dir.join("config.json");
        let config: TransformerConfig = read_config(&config_path)?;
        config
            .validate()
            .map_err(|message| TransformerError::Config {
                path: config_path.display().to_string(),
                message,
            })?;
        let vb = VarBuilder::from_dir(dir)?.with_dtype(Some(dtype));
        let model = Self::load(&vb, &config, device)?;
        vb.finish()?;
        Ok(model)
    }

    /// Block-level gradient checkpointing, as diffusers' `enable_gradient_checkpointing`: under
    /// autodiff each block keeps only its inputs and is recomputed in the backward (same
    /// gradients, one block's activations at a time). Without autodiff it changes nothing.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// With gradient checkpointing, moves each block's kept input to host memory as the forward
    /// passes it and back to the device when the backward reaches the block (DeepSpeed's
    /// `cpu_checkpointing`): the device then holds no per-block activations besides the one block
    /// being recomputed (4.3 GiB less for CogVideoX-5B at 49x480x720 in bf16), for one
    /// host-device copy of each input per step. On a CPU backend the copy changes nothing.
    pub fn set_checkpoint_offload(&mut self, on: bool) {
        self.checkpoint_offload = on;
    }

    /// Selective recomputation of the blocks' feed-forwards (Megatron-LM's for the MLP): each
    /// keeps only its input and recomputes its `[tokens, 4 x inner_dim]` pre-activation in the
    /// backward, for one more `net.0.proj` product per block (about 3% of a training step at
    /// preset M).
    /// Off, each keeps that pre-activation (546 MiB per block for CogVideoX-2B at 49x480x720 in
    /// f32; with gradient checkpointing only the block being recomputed holds one). The same
    /// values either way.
    pub fn set_feed_forward_recompute(&mut self, on: bool) {
        for block in &mut self.transformer_blocks {
            block.ff.recompute = on;
        }
    }

    /// Runs the model in `dtype` (mixed precision: f32 master weights are cast at use).
    pub fn set_compute_dtype(&mut self, dtype: FloatDType) {
        self.compute_dtype = dtype;
    }

    /// The RoPE tables for latent `hidden_states` of `frames x height x width`, when the config uses
    /// RoPE (`None` otherwise): see [`crate::rotary_tables`].
    pub fn image_rotary_emb(
        &self,
        frames: usize,
        height: usize,
        width: usize,
        device: &B::Device,
    ) -> Result<Option<RotaryEmb<B>>, TransformerError> {
        if !self.config.use_rotary_positional_embeddings {
            return Ok(None);
        }
        crate::embeddings::rotary_tables(&self.config, frames, height, width, device).map(Some)
    }
}

impl<B: ModelBackend> CogVideoXTransformer3DModel<B> {
    /// The forward pass of diffusers' `CogVideoXTransformer3DModel`.
    ///
    /// * `hidden_states` `[B, F, C_in, H, W]` latents (I2V: image latents concatenated on channels);
    ///   `H`, `W` divisible by `patch_size`, `F` by `patch_size_t` (1.5: the pipeline pads).
    /// * `encoder_hidden_states` `[B, S, text_embed_dim]`.
    /// * `timestep` `[B]` (or `[1]`, broadcast), as floats.
    /// * `ofs` `[1]` or `[B]`, required exactly when the config has `ofs_embed_dim` (1.5-I2V).
    /// * `image_rotary_emb` `(cos, sin)` `[F' * H/p * W/p, head_dim]` from [`Self::image_rotary_emb`];
    ///   as in diffusers, `None` runs without RoPE.
    ///
    /// Returns `sample` `[B, F, C_out, H, W]`.
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 5>,
        encoder_hidden_states: Tensor<B, 3>,
        timestep: Tensor<B, 1>,
        ofs: Option<Tensor<B, 1>>,
        image_rotary_emb: Option<&RotaryEmb<B>>,
    ) -> Result<Tensor<B, 5>, TransformerError> {
        let e = self.embed(
            hidden_states,
            encoder_hidden_states,
            timestep,
            ofs,
            image_rotary_emb,
        )?;
        // 3. Transformer blocks, on the joint sequence (text rows first, as each block's
        // attention and feed-forward concatenate them).
        let text_len = e.encoder_hidden_states.dims()[1];
        let mut x = Tensor::cat(vec![e.encoder_hidden_states, e.hidden_states], 1);
        for block in &self.transformer_blocks {
            x = block.forward_joint(x, text_len, e.emb.clone(), image_rotary_emb);
        }
        let len = x.dims()[1];
        Ok(self.head(x.narrow(1, text_len, len - text_len), e.emb, e.shape))
    }

    /// Steps 1 and 2 of the forward: input checks, time (and ofs) embedding, patch embedding.
    fn embed(
        &self,
        hidden_states: Tensor<B, 5>,
        encoder_hidden_states: Tensor<B, 3>,
        timestep: Tensor<B, 1>,
        ofs: Option<Tensor<B, 1>>,
        image_rotary_emb: Option<&RotaryEmb<B>>,
    ) -> Result<Embedded<B>, TransformerError> {
        let c = &self.config;
        let [batch_size, num_frames, channels, height, width] = hidden_states.dims();
        let [eb, text_len, text_dim] = encoder_hidden_states.dims();
        let p = c.patch_size;
        let p_t = c.patch_size_t.unwrap_or(1);
        if channels != c.in_channels {
            return input_err(format!(
                "hidden_states has {channels} channels, the model takes in_channels = {}",
                c.in_channels
            ));
        }
        if batch_size == 0
            || num_frames == 0
            || height % p != 0
            || width % p != 0
            || height == 0
            || width == 0
        {
            return input_err(format!(
                "hidden_states [B, F, C, H, W] = {:?}: H and W must be positive multiples of patch_size {p}",
                hidden_states.dims()
            ));
        }
        if num_frames % p_t != 0 {
            return input_err(format!(
                "{num_frames} latent frames are not divisible by patch_size_t {p_t}; pad the latents as the pipeline does"
            ));
        }
        if eb != batch_size || text_dim != c.text_embed_dim || text_len == 0 {
            return input_err(format!(
                "encoder_hidden_states has shape {:?}, expected [{batch_size}, S, {}]",
                encoder_hidden_states.dims(),
                c.text_embed_dim
            ));
        }
        let video_tokens = (num_frames / p_t) * (height / p) * (width / p);
        if let Some(rot) = image_rotary_emb {
            check_rotary(rot, video_tokens, c.attention_head_dim)?;
        }

        // 1. Time embedding
        let timestep = broadcast_batch(timestep, batch_size, "timestep")?;
        // As diffusers: the sinusoids in f32, then `t_emb.to(dtype=hidden_states.dtype)`.
        let dtype = self.compute_dtype;
        let t_emb = to_dtype(
            get_timestep_embedding(timestep, c.inner_dim(), c.flip_sin_to_cos, c.freq_shift),
            dtype,
        );
        let mut emb = self.time_embedding.forward(t_emb); // [B, E]
        match (&self.ofs_embedding, ofs) {
            (Some(ofs_embedding), Some(ofs)) => {
                let ofs = broadcast_batch(ofs, batch_size, "ofs")?;
                let d = c.ofs_embed_dim.expect("ofs_embedding exists");
                let ofs_emb = get_timestep_embedding(ofs, d, c.flip_sin_to_cos, c.freq_shift);
                let ofs_emb = ofs_embedding.forward(to_dtype(ofs_emb, dtype));
                if ofs_emb.dims()[1] != emb.dims()[1] {
                    return input_err(format!(
                        "ofs_embed_dim {d} differs from time_embed_dim {}; diffusers cannot add them either",
                        c.time_embed_dim
                    ));
                }
                emb = emb + ofs_emb;
            }
            (Some(_), None) => {
                return input_err(
                    "this model (CogVideoX1.5-I2V) needs `ofs` (the pipeline passes 2.0)",
                )
            }
            (None, _) => {}
        }

        // 2. Patch embedding
        let hidden = self.patch_embed.forward(
            to_dtype(encoder_hidden_states, dtype),
            to_dtype(hidden_states, dtype),
        )?;
        let hidden = self.embedding_dropout.forward(hidden);
        let len = hidden.dims()[1];
        let encoder_hidden_states = hidden.clone().narrow(1, 0, text_len);
        let hidden_states = hidden.narrow(1, text_len, len - text_len);
        Ok(Embedded {
            emb,
            hidden_states,
            encoder_hidden_states,
            shape: [batch_size, num_frames, height, width],
        })
    }

    /// Steps 4 and 5: the final norms and projection, and unpatchify to `[B, F, C_out, H, W]`
    /// (`shape` = the input's `[B, F, H, W]`).
    fn head(
        &self,
        hidden_states: Tensor<B, 3>,
        emb: Tensor<B, 2>,
        shape: [usize; 4],
    ) -> Tensor<B, 5> {
        let c = &self.config;
        let [batch_size, num_frames, height, width] = shape;
        let p = c.patch_size;
        let hidden_states = self.norm_final.forward(hidden_states);

        // 4. Final block
        let hidden_states = self.norm_out.forward(hidden_states, emb);
        let hidden_states = self.proj_out.forward(hidden_states); // [B, tokens, p_t * p * p * C_out]

        // 5. Unpatchify
        let (hp, wp) = (height / p, width / p);
        let c_out = c.out_channels();
        // Reshapes stay at rank <= 6 (burn's ndarray backend limit).
        let output = match c.patch_size_t {
            None => {
                let x = hidden_states.reshape([batch_size * num_frames, hp, wp, c_out, p, p]);
                let x = x.permute([0, 3, 1, 4, 2, 5]); // [B*F, C, H', p, W', p]
                x.reshape([batch_size, num_frames, c_out, height, width])
            }
            Some(pt) => {
                // diffusers: [B, F', H', W', C, p_t, p, p] permuted to [B, F', p_t, C, H', p, W', p].
                let f = num_frames / pt;
                let x = hidden_states.reshape([batch_size * f, hp * wp, c_out, pt, p * p]);
                let x = x.permute([0, 3, 2, 1, 4]); // [B*F', p_t, C, H'*W', p*p]
                let x = x.reshape([batch_size * num_frames * c_out, hp, wp, p, p]);
                let x = x.permute([0, 1, 3, 2, 4]); // [B*F*C, H', p, W', p]
                x.reshape([batch_size, num_frames, c_out, height, width])
            }
        };
        to_dtype(output, FloatDType::F32)
    }
}

/// The output of the embedding steps: what the blocks take.
struct Embedded<B: Backend> {
    /// Time (+ ofs) embedding `[B, E]`.
    emb: Tensor<B, 2>,
    hidden_states: Tensor<B, 3>,
    encoder_hidden_states: Tensor<B, 3>,
    /// The input's `[B, F, H, W]`.
    shape: [usize; 4],
}

impl<B: ModelAutodiffBackend> CogVideoXTransformer3DModel<B> {
    /// [`Self::forward`] for training. With gradient checkpointing on
    /// ([`Self::set_gradient_checkpointing`]) the blocks run without recording a graph and keep
    /// only their inputs; the returned [`BlockTape`] then runs the backward
    /// ([`BlockTape::backward`]), recomputing one block at a time. Without it the tape is plain
    /// `loss.backward()`. The output and the gradients are those of [`Self::forward`].
    pub fn forward_taped(
        &self,
        hidden_states: Tensor<B, 5>,
        encoder_hidden_states: Tensor<B, 3>,
        timestep: Tensor<B, 1>,
        ofs: Option<Tensor<B, 1>>,
        image_rotary_emb: Option<&RotaryEmb<B>>,
    ) -> Result<(Tensor<B, 5>, BlockTape<B>), TransformerError> {
        if !self.gradient_checkpointing || self.transformer_blocks.is_empty() {
            let out = self.forward(
                hidden_states,
                encoder_hidden_states,
                timestep,
                ofs,
                image_rotary_emb,
            )?;
            return Ok((out, BlockTape { segments: None }));
        }
        let e = self.embed(
            hidden_states,
            encoder_hidden_states,
            timestep,
            ofs,
            image_rotary_emb,
        )?;
        // The blocks see the embedding step's outputs as leaves, so the loss's backward stops
        // there and the embedding graph is backpropagated once, at the end.
        let emb = grad_checkpoint::leaf(&e.emb);
        let text_len = e.encoder_hidden_states.dims()[1];
        let x0 = Tensor::cat(vec![e.encoder_hidden_states, e.hidden_states], 1);
        let mut x = grad_checkpoint::leaf(&x0);
        let rope = image_rotary_emb.map(|(c, s)| {
            (
                Tensor::<B, 2>::from_inner(c.clone().inner()),
                Tensor::from_inner(s.clone().inner()),
            )
        });
        let mut inputs = Vec::with_capacity(self.transformer_blocks.len());
        let offload = self.checkpoint_offload;
        for block in &self.transformer_blocks {
            inputs.push(Stashed::new(x.clone().inner(), offload));
            let frozen = grad_checkpoint::detached(block);
            x = frozen.forward_joint(
                Tensor::from_inner(x.inner()),
                text_len,
                Tensor::from_inner(emb.clone().inner()),
                rope.as_ref(),
            );
        }
        let len = x.dims()[1];
        let h_out = grad_checkpoint::leaf(&x.narrow(1, text_len, len - text_len));
        let out = self.head(h_out.clone(), emb.clone(), e.shape);
        let segments = Segments {
            model: self.clone(),
            inputs,
            rope,
            text_len,
            pre: (e.emb, x0),
            emb_leaf: emb,
            h_out,
        };
        Ok((
            out,
            BlockTape {
                segments: Some(Box::new(segments)),
            },
        ))
    }
}

/// What [`CogVideoXTransformer3DModel::forward_taped`] recorded for the backward.
pub struct BlockTape<B: ModelAutodiffBackend> {
    segments: Option<Box<Segments<B>>>,
}

struct Segments<B: ModelAutodiffBackend> {
    /// The model (a cheap copy: tensors are shared), for its blocks and embedding parameters.
    model: CogVideoXTransformer3DModel<B>,
    /// Each block's input, the joint sequence (text rows, then video rows), kept for its
    /// recomputation.
    inputs: Vec<Stashed<B::InnerBackend>>,
    rope: Option<RotaryEmb<B>>,
    /// The text rows at the start of the joint sequence.
    text_len: usize,
    /// The embedding step's outputs (graph tensors): `emb` and the joint sequence.
    pre: (Tensor<B, 2>, Tensor<B, 3>),
    emb_leaf: Tensor<B, 2>,
    /// The last block's video output as the head's leaf.
    h_out: Tensor<B, 3>,
}

impl<B: ModelAutodiffBackend> BlockTape<B> {
    /// The gradients of `loss` (computed from the forward's output) for every parameter, as
    /// `loss.backward()` on an uncheckpointed forward gives them.
    pub fn backward(self, loss: Tensor<B, 1>) -> B::Gradients {
        let mut grads = loss.backward();
        let Some(s) = self.segments else { return grads };
        let d_h = s
            .h_out
            .grad_remove(&mut grads)
            .unwrap_or_else(|| s.h_out.zeros_like().inner());
        // The text rows of the last block's output are not used by the head.
        let [b, _, d] = d_h.dims();
        let text_zeros = Tensor::zeros(
            [b, s.text_len, d],
            TensorCreationOptions::new(d_h.device()).with_dtype(d_h.dtype()),
        );
        let mut d_x = Tensor::cat(vec![text_zeros, d_h], 1);
        let mut d_emb = s
            .emb_leaf
            .grad_remove(&mut grads)
            .unwrap_or_else(|| s.emb_leaf.zeros_like().inner());
        for (block, x) in s.model.transformer_blocks.iter().zip(s.inputs).rev() {
            let copy = grad_checkpoint::Recompute::new(block);
            let x = Tensor::<B, 3>::from_inner(x.restore()).require_grad();
            let emb = grad_checkpoint::leaf(&s.emb_leaf);
            let out =
                copy.module
                    .forward_joint(x.clone(), s.text_len, emb.clone(), s.rope.as_ref());
            let g = grad_checkpoint::backward_sum([grad_checkpoint::dot(out, d_x.clone())])
                .expect("the block input requires gradients");
            d_x = x.grad(&g).unwrap_or_else(|| d_x.zeros_like());
            if let Some(ge) = emb.grad(&g) {
                d_emb = d_emb + ge;
            }
            copy.transfer(&g, &mut grads);
        }
        // The embedding step, once, with the gradients of all its outputs.
        let (emb, x0) = s.pre;
        let terms = [
            grad_checkpoint::dot(x0, d_x),
            grad_checkpoint::dot(emb, d_emb),
        ];
        if let Some(g) = grad_checkpoint::backward_sum(terms) {
            grad_checkpoint::merge_param_grads(&s.model, &g, &mut grads);
        }
        grads
    }
}

/// A checkpointed block input: on the device, or offloaded to host memory until the backward.
enum Stashed<B: Backend> {
    Device(Tensor<B, 3>),
    Host { data: TensorData, device: B::Device },
}

impl<B: Backend> Stashed<B> {
    fn new(t: Tensor<B, 3>, offload: bool) -> Self {
        if offload {
            Stashed::Host {
                device: t.device(),
                data: t.into_data(),
            }
        } else {
            Stashed::Device(t)
        }
    }

    /// The input on its device again, in its dtype.
    fn restore(self) -> Tensor<B, 3> {
        match self {
            Stashed::Device(t) => t,
            Stashed::Host { data, device } => {
                let dtype = data.dtype;
                Tensor::from_data(data, TensorCreationOptions::new(device).with_dtype(dtype))
            }
        }
    }
}

/// `[1]` or `[B]` to `[B]`.
fn broadcast_batch<B: Backend>(
    t: Tensor<B, 1>,
    batch: usize,
    name: &str,
) -> Result<Tensor<B, 1>, TransformerError> {
    match t.dims()[0] {
        n if n == batch => Ok(t),
        1 => Ok(t.expand([batch])),
        n => input_err(format!("`{name}` has {n} values for a batch of {batch}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn gelu_tanh_matches_the_formula() {
        type B = cogvx_model_core::CpuBackend;
        let xs: Vec<f32> = (-40..40).map(|i| i as f32 * 0.15).collect();
        let x =
            Tensor::<B, 1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &Default::default());
        let got = gelu_tanh(x.clone()).into_data().to_vec::<f32>().unwrap();
        let burn = activation::gelu_approximate(x)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for ((x, g), b) in xs.iter().zip(&got).zip(&burn) {
            let x = *x as f64;
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!((*g as f64 - want).abs() < 1e-6, "x {x}: {g} vs {want}");
            assert!((g - b).abs() < 1e-6, "x {x}: {g} vs burn {b}");
        }
    }

    #[test]
    fn gelu_tanh_is_finite_with_finite_gradients_far_out() {
        type A = burn::backend::Autodiff<cogvx_model_core::CpuBackend>;
        let xs = vec![-1e4f32, -60.0, -20.0, 20.0, 60.0, 1e4];
        let x =
            Tensor::<A, 1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &Default::default())
                .require_grad();
        let y = gelu_tanh(x.clone());
        let grads = y.clone().sum().backward();
        let y = y.into_data().to_vec::<f32>().unwrap();
        let g = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        for ((x, y), g) in xs.iter().zip(&y).zip(&g) {
            let (want_y, want_g) = if *x < 0.0 { (0.0, 0.0) } else { (*x, 1.0) };
            assert!((y - want_y).abs() <= 1e-6 * x.abs(), "x {x}: gelu {y}");
            assert!((g - want_g).abs() < 1e-6, "x {x}: gradient {g}");
        }
    }
}
