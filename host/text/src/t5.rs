//! `T5EncoderModel` (transformers' `modeling_t5.py`), as CogVideoX uses it: the encoder stack of
//! T5 v1.1 (gated-gelu feed-forward) or v1.0 (plain relu), with module and parameter names as in
//! the checkpoint (`shared`, `encoder.block.{i}.layer.{0,1}...`, `encoder.final_layer_norm`).
//!
//! Loaded in f32 by default ([`T5EncoderModel::load`]), like
//! `T5EncoderModel.from_pretrained(..., torch_dtype=torch.float32)`, which the parity cases use.
//! [`T5EncoderModel::load_in`] keeps the weights in bf16 (half the memory: 9 GB instead of 19 for
//! T5-XXL), as the official finetune's mixed precision does; the linear layers and attention then
//! compute in bf16 while the residual stream, the norms' statistics and the activation stay in
//! f32 (autocast's split), and the output is f32. fp16 is not offered: T5 v1.1 overflows in it
//! (transformers clamps it; bf16 has f32's range).

use crate::TextError;
use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, relu, silu};
use burn::tensor::FloatDType;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use cogvx_model_core::attention::attention;
use cogvx_model_core::config::read_config;
use cogvx_model_core::nn::{broadcast_last, Linear};
use cogvx_model_core::precision::{float_dtype, like, to_dtype, to_f32};
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::LoadError;
use cogvx_model_core::ModelBackend;
use serde::Deserialize;
use std::path::Path;

/// The fields of transformers' `T5Config` the encoder uses (defaults as in `T5Config`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct T5Config {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    #[serde(default = "defaults::d_kv")]
    pub d_kv: usize,
    #[serde(default = "defaults::d_ff")]
    pub d_ff: usize,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    #[serde(default = "defaults::num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "defaults::max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "defaults::eps")]
    pub layer_norm_epsilon: f64,
    /// `"relu"` (T5 v1.0), `"gated-gelu"` (v1.1), or `[gated-]ACT` with ACT one of
    /// `relu`, `gelu`, `gelu_new`, `silu`.
    #[serde(default = "defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
    /// `"t5"` when present.
    #[serde(default)]
    pub model_type: Option<String>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        32128
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        2048
    }
    pub fn num_layers() -> usize {
        6
    }
    pub fn num_heads() -> usize {
        8
    }
    pub fn num_buckets() -> usize {
        32
    }
    pub fn max_distance() -> usize {
        128
    }
    pub fn eps() -> f64 {
        1e-6
    }
    pub fn feed_forward_proj() -> String {
        "relu".into()
    }
}

/// The feed-forward activation (transformers' `ACT2FN` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// Exact (erf) GELU, `"gelu"`.
    Gelu,
    /// Tanh-approximated GELU, `"gelu_new"`.
    GeluNew,
    Silu,
}

impl Activation {
    fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::Relu => relu(x),
            Activation::Gelu => gelu(x),
            Activation::GeluNew => gelu_new(x),
            Activation::Silu => silu(x),
        }
    }
}

/// `NewGELUActivation`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_new<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner = x
        .clone()
        .add(x.clone().powi_scalar(3).mul_scalar(0.044715))
        .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.clone().mul_scalar(0.5).mul(inner.tanh().add_scalar(1.0))
}

impl T5Config {
    /// Reads `config.json` of a `text_encoder/` folder and checks it describes a T5 encoder.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let cfg: T5Config = read_config(path)?;
        let bad = |message: String| {
            TextError::Load(LoadError::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        if let Some(t) = cfg.model_type.as_deref() {
            if t != "t5" {
                return Err(bad(format!(
                    "`model_type` is {t:?}; cogvx's text encoder is T5 (`\"t5\"`)"
                )));
            }
        }
        cfg.activation().map_err(bad)?;
        for (key, v) in [
            ("d_model", cfg.d_model),
            ("d_kv", cfg.d_kv),
            ("d_ff", cfg.d_ff),
            ("num_heads", cfg.num_heads),
            ("vocab_size", cfg.vocab_size),
        ] {
            if v == 0 {
                return Err(bad(format!("`{key}` must be positive")));
            }
        }
        if cfg.relative_attention_num_buckets < 4
            || cfg.relative_attention_max_distance < cfg.relative_attention_num_buckets / 4
        {
            return Err(bad(format!(
                "`relative_attention_num_buckets` ({}) must be at least 4 and `relative_attention_max_distance` ({}) \
                 at least a quarter of it",
                cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )));
        }
        Ok(cfg)
    }

    /// `(is_gated, activation)` from `feed_forward_proj`, as `T5Config.__init__` derives them.
    pub fn activation(&self) -> Result<(bool, Activation), String> {
        let proj = self.feed_forward_proj.as_str();
        let parts: Vec<&str> = proj.split('-').collect();
        let (gated, name) = match parts[..] {
            [name] => (false, name),
            ["gated", name] => (true, name),
            _ => {
                return Err(format!(
                    "`feed_forward_proj` {proj:?} is not `ACT` or `gated-ACT`"
                ))
            }
        };
        // T5Config: "gated-gelu" means the tanh approximation (backwards compatibility).
        let act = match (proj, name) {
            ("gated-gelu", _) => Activation::GeluNew,
            (_, "relu") => Activation::Relu,
            (_, "gelu") => Activation::Gelu,
            (_, "gelu_new") => Activation::GeluNew,
            (_, "silu" | "swish") => Activation::Silu,
            _ => {
                return Err(format!(
                    "`feed_forward_proj` {proj:?}: unsupported activation {name:?}"
                ))
            }
        };
        Ok((gated, act))
    }
}

/// `T5LayerNorm`: RMS norm without mean subtraction or bias, variance in f32.
#[derive(Module, Debug)]
pub struct T5LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub variance_epsilon: f64,
}

impl<B: Backend> T5LayerNorm<B> {
    fn load(vb: &VarBuilder, dim: usize, eps: f64, device: &B::Device) -> Result<Self, LoadError> {
        Ok(T5LayerNorm {
            weight: Param::from_tensor(vb.tensor("weight", [dim], device)?),
            variance_epsilon: eps,
        })
    }

    /// Normalises in f32 and returns the weight's dtype (the dtype the next linear layer
    /// computes in).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.val();
        let dtype = float_dtype(&weight);
        let x = to_f32(x);
        let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
        let x = x * variance.add_scalar(self.variance_epsilon).sqrt().recip();
        to_dtype(x * broadcast_last::<B, D>(to_f32(weight)), dtype)
    }
}

/// `T5Attention` (encoder self-attention). Scores are not scaled by `1/sqrt(d_kv)`.
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    /// `[num_buckets, n_heads]`; only in the first block.
    pub relative_attention_bias: Option<Param<Tensor<B, 2>>>,
    pub n_heads: usize,
    pub key_value_proj_dim: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
}

impl<B: Backend> T5Attention<B> {
    fn load(
        vb: &VarBuilder,
        cfg: &T5Config,
        has_relative_attention_bias: bool,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_attention_bias = if has_relative_attention_bias {
            let w = vb.pp("relative_attention_bias").tensor(
                "weight",
                [cfg.relative_attention_num_buckets, cfg.num_heads],
                device,
            )?;
            Some(Param::from_tensor(w))
        } else {
            None
        };
        Ok(T5Attention {
            q: Linear::load(&vb.pp("q"), cfg.d_model, inner, false, device)?,
            k: Linear::load(&vb.pp("k"), cfg.d_model, inner, false, device)?,
            v: Linear::load(&vb.pp("v"), cfg.d_model, inner, false, device)?,
            o: Linear::load(&vb.pp("o"), inner, cfg.d_model, false, device)?,
            relative_attention_bias,
            n_heads: cfg.num_heads,
            key_value_proj_dim: cfg.d_kv,
            relative_attention_num_buckets: cfg.relative_attention_num_buckets,
            relative_attention_max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// `compute_bias(query_length, key_length)`: `[1, n_heads, q, k]`, or `None` without weights.
    pub fn compute_bias(
        &self,
        query_length: usize,
        key_length: usize,
        device: &B::Device,
    ) -> Option<Tensor<B, 4>> {
        let table = self.relative_attention_bias.as_ref()?.val();
        let mut buckets = Vec::with_capacity(query_length * key_length);
        for context in 0..query_length as i64 {
            for memory in 0..key_length as i64 {
                buckets.push(relative_position_bucket(
                    memory - context,
                    true,
                    self.relative_attention_num_buckets,
                    self.relative_attention_max_distance,
                ));
            }
        }
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(buckets, [query_length * key_length]),
            device,
        );
        let values = table
            .select(0, idx)
            .reshape([query_length, key_length, self.n_heads]);
        Some(values.permute([2, 0, 1]).unsqueeze::<4>())
    }
}

impl<B: ModelBackend> T5Attention<B> {
    /// `[B, L, d_model]` with `position_bias` `[1 or B, H, L, L]` to `[B, L, d_model]`.
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [b, l, _] = hidden_states.dims();
        let (h, d) = (self.n_heads, self.key_value_proj_dim);
        let shape = |x: Tensor<B, 3>| x.reshape([b, l, h, d]).swap_dims(1, 2);
        let q = shape(self.q.forward(hidden_states.clone()));
        let k = shape(self.k.forward(hidden_states.clone()));
        let v = shape(self.v.forward(hidden_states));
        let position_bias = like(position_bias, &q);
        let out = attention(q, k, v, Some(position_bias), Some(1.0));
        self.o.forward(out.swap_dims(1, 2).reshape([b, l, h * d]))
    }
}

/// T5's `_relative_position_bucket`, with the large-distance branch in f32 as PyTorch computes it.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> i64 {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let mut rp = relative_position;
    if bidirectional {
        num_buckets /= 2;
        if rp > 0 {
            bucket += num_buckets;
        }
        rp = rp.abs();
    } else {
        rp = -rp.min(0);
    }
    let max_exact = num_buckets / 2;
    if rp < max_exact {
        return bucket + rp;
    }
    let scaled = ((rp as f32) / (max_exact as f32)).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * ((num_buckets - max_exact) as f32);
    let large = (max_exact + scaled as i64).min(num_buckets - 1);
    bucket + large
}

/// `T5DenseActDense` (`wi`) or `T5DenseGatedActDense` (`wi_0`, `wi_1`), then `wo`.
#[derive(Module, Debug)]
pub struct T5DenseActDense<B: Backend> {
    pub wi: Option<Linear<B>>,
    pub wi_0: Option<Linear<B>>,
    pub wi_1: Option<Linear<B>>,
    pub wo: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> T5DenseActDense<B> {
    fn load(
        vb: &VarBuilder,
        cfg: &T5Config,
        gated: bool,
        act: Activation,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let lin = |name: &str, i, o| Linear::load(&vb.pp(name), i, o, false, device);
        let (wi, wi_0, wi_1) = if gated {
            (
                None,
                Some(lin("wi_0", cfg.d_model, cfg.d_ff)?),
                Some(lin("wi_1", cfg.d_model, cfg.d_ff)?),
            )
        } else {
            (Some(lin("wi", cfg.d_model, cfg.d_ff)?), None, None)
        };
        Ok(T5DenseActDense {
            wi,
            wi_0,
            wi_1,
            wo: lin("wo", cfg.d_ff, cfg.d_model)?,
            act,
        })
    }
}

impl<B: ModelBackend> T5DenseActDense<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // The activation and the gate's product in f32; `wo` in its weights' dtype.
        let hidden = match (&self.wi, &self.wi_0, &self.wi_1) {
            (Some(wi), _, _) => self.act.apply(to_f32(wi.forward(x))),
            (None, Some(wi_0), Some(wi_1)) => {
                self.act.apply(to_f32(wi_0.forward(x.clone()))) * to_f32(wi_1.forward(x))
            }
            _ => unreachable!("T5DenseActDense is built with `wi` or with `wi_0` and `wi_1`"),
        };
        self.wo.forward(like(hidden, &self.wo.weight.val()))
    }
}

/// `T5LayerSelfAttention`: pre-norm self-attention with a residual.
#[derive(Module, Debug)]
pub struct T5LayerSelfAttention<B: Backend> {
    pub self_attention: T5Attention<B>,
    pub layer_norm: T5LayerNorm<B>,
}

/// `T5LayerFF`: pre-norm feed-forward with a residual.
#[derive(Module, Debug)]
pub struct T5LayerFF<B: Backend> {
    pub dense_relu_dense: T5DenseActDense<B>,
    pub layer_norm: T5LayerNorm<B>,
}

/// `T5Block` of the encoder: `layer.0` self-attention, `layer.1` feed-forward.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    pub attention_layer: T5LayerSelfAttention<B>,
    pub ff_layer: T5LayerFF<B>,
}

impl<B: Backend> T5Block<B> {
    fn load(
        vb: &VarBuilder,
        cfg: &T5Config,
        first: bool,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let (gated, act) = cfg.activation().map_err(LoadError::Other)?;
        let l0 = vb.pp("layer").pp(0);
        let l1 = vb.pp("layer").pp(1);
        Ok(T5Block {
            attention_layer: T5LayerSelfAttention {
                self_attention: T5Attention::load(&l0.pp("SelfAttention"), cfg, first, device)?,
                layer_norm: T5LayerNorm::load(
                    &l0.pp("layer_norm"),
                    cfg.d_model,
                    cfg.layer_norm_epsilon,
                    device,
                )?,
            },
            ff_layer: T5LayerFF {
                dense_relu_dense: T5DenseActDense::load(
                    &l1.pp("DenseReluDense"),
                    cfg,
                    gated,
                    act,
                    device,
                )?,
                layer_norm: T5LayerNorm::load(
                    &l1.pp("layer_norm"),
                    cfg.d_model,
                    cfg.layer_norm_epsilon,
                    device,
                )?,
            },
        })
    }
}

impl<B: ModelBackend> T5Block<B> {
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let a = &self.attention_layer;
        let normed = a.layer_norm.forward(hidden_states.clone());
        // The residual stream stays f32 whatever dtype the layers compute in.
        let hidden_states = hidden_states + to_f32(a.self_attention.forward(normed, position_bias));
        let f = &self.ff_layer;
        let normed = f.layer_norm.forward(hidden_states.clone());
        hidden_states + to_f32(f.dense_relu_dense.forward(normed))
    }
}

/// `T5Stack` (encoder): blocks sharing block 0's position bias, then `final_layer_norm`.
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    pub block: Vec<T5Block<B>>,
    pub final_layer_norm: T5LayerNorm<B>,
}

/// `T5EncoderModel`: `shared` token embedding and the encoder stack.
#[derive(Module, Debug)]
pub struct T5EncoderModel<B: Backend> {
    /// `[vocab_size, d_model]`.
    pub shared: Param<Tensor<B, 2>>,
    pub encoder: T5Stack<B>,
    #[module(skip)]
    pub config: T5Config,
}

impl<B: Backend> T5EncoderModel<B> {
    /// Loads a diffusers `text_encoder/` folder (`config.json` and single-file or sharded
    /// safetensors, any float storage dtype). Every missing, unexpected or wrongly shaped
    /// weight is reported at once.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, TextError> {
        Self::load_in(dir, None, device)
    }

    /// [`T5EncoderModel::load`] with the weights kept in `dtype` (`None` or f32: f32; bf16: computed as
    /// the module doc says). fp16 is refused (T5 v1.1 overflows in it).
    pub fn load_in(
        dir: impl AsRef<Path>,
        dtype: Option<FloatDType>,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        if matches!(dtype, Some(FloatDType::F16)) {
            return Err(TextError::InvalidInput(
                "the T5 text encoder does not run in fp16 (T5 v1.1 overflows in it); use bf16 or f32".into(),
            ));
        }
        let dir = dir.as_ref();
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let vb = VarBuilder::from_dir(dir)?.with_dtype(dtype);
        let model = Self::load_with(&vb, config, device)?;
        vb.finish()?;
        Ok(model)
    }

    /// Builds the model from `vb` (rooted at the checkpoint's top level); call `vb.finish()` after.
    pub fn load_with(
        vb: &VarBuilder,
        config: T5Config,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        // `encoder.embed_tokens` is tied to `shared`: checkpoints hold one or both.
        let shape = [config.vocab_size, config.d_model];
        let embed_tokens = vb.pp("encoder").pp("embed_tokens");
        let shared = if !vb.contains("shared.weight") && embed_tokens.contains("weight") {
            embed_tokens.tensor::<B, 2>("weight", shape, device)?
        } else {
            embed_tokens.ignore("weight");
            vb.pp("shared").tensor::<B, 2>("weight", shape, device)?
        };
        let enc = vb.pp("encoder");
        let block = (0..config.num_layers)
            .map(|i| T5Block::load(&enc.pp("block").pp(i), &config, i == 0, device))
            .collect::<Result<Vec<_>, _>>()?;
        let final_layer_norm = T5LayerNorm::load(
            &enc.pp("final_layer_norm"),
            config.d_model,
            config.layer_norm_epsilon,
            device,
        )?;
        Ok(T5EncoderModel {
            shared: Param::from_tensor(shared),
            encoder: T5Stack {
                block,
                final_layer_norm,
            },
            config,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &T5Config {
        &self.config
    }
}

impl<B: ModelBackend> T5EncoderModel<B> {
    /// `last_hidden_state` `[N, L, d_model]` for token ids `[N, L]` (no attention mask, as the
    /// CogVideoX pipeline calls it). Ids must be below `vocab_size`; see [`T5EncoderModel::forward_ids`]
    /// for a checked entry point.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [n, l] = input_ids.dims();
        let device = input_ids.device();
        let d = self.config.d_model;
        let mut hidden = to_f32(
            self.shared
                .val()
                .select(0, input_ids.reshape([n * l]))
                .reshape([n, l, d]),
        );
        let Some(first) = self.encoder.block.first() else {
            return to_f32(self.encoder.final_layer_norm.forward(hidden));
        };
        let position_bias = first
            .attention_layer
            .self_attention
            .compute_bias(l, l, &device)
            .expect("block 0 has the relative attention bias");
        for block in &self.encoder.block {
            hidden = block.forward(hidden, position_bias.clone());
        }
        to_f32(self.encoder.final_layer_norm.forward(hidden))
    }

    /// [`T5EncoderModel::forward`] on host ids (rows of equal length), checked against the vocabulary.
    pub fn forward_ids(
        &self,
        ids: &[Vec<u32>],
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, TextError> {
        let n = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if n == 0 || l == 0 {
            return Err(TextError::InvalidInput(
                "the text encoder needs at least one non-empty row of ids".into(),
            ));
        }
        let vocab = self.config.vocab_size;
        let mut flat = Vec::with_capacity(n * l);
        for (i, row) in ids.iter().enumerate() {
            if row.len() != l {
                return Err(TextError::InvalidInput(format!(
                    "row {i} has {} ids, row 0 has {l}: pad to one length",
                    row.len()
                )));
            }
            if let Some(bad) = row.iter().find(|&&t| t as usize >= vocab) {
                return Err(TextError::InvalidInput(format!(
                    "row {i} has id {bad}, outside the text encoder's vocabulary of {vocab}: tokenizer and text_encoder \
                     do not belong together"
                )));
            }
            flat.extend(row.iter().map(|&t| t as i64));
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [n, l]), device);
        Ok(self.forward(ids))
    }
}
