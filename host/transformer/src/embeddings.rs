//! Embeddings of CogVideoX, mirroring diffusers `models/embeddings.py`: `get_timestep_embedding`,
//! `Timesteps`/`TimestepEmbedding`, `get_3d_sincos_pos_embed`, `CogVideoXPatchEmbed`,
//! `get_3d_rotary_pos_embed` (grid types `linspace` and `slice`), `apply_rotary_emb`, and the
//! pipelines' `get_resize_crop_region_for_grid`.
//!
//! Tables that depend only on sizes (sincos, RoPE) are computed on the host with the same dtypes
//! torch uses (sincos in f64, RoPE in f32) and uploaded once.

use crate::config::TransformerConfig;
use crate::error::{input_err, TransformerError};
use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Tensor, TensorData, TensorPrimitive};
use cogvx_model_core::nn::Linear;
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::ModelBackend;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------------
// Timesteps

/// diffusers `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift)` with
/// `scale = 1`, `max_period = 10000`: `[N]` timesteps to `[N, dim]`.
pub fn get_timestep_embedding<B: Backend>(
    timesteps: Tensor<B, 1>,
    embedding_dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Tensor<B, 2> {
    let device = timesteps.device();
    let [n] = timesteps.dims();
    let half = embedding_dim / 2;
    // torch: exponent = -ln(10000) * arange(half, f32) / (half - shift), all in f32.
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::<B, 2>::from_data(TensorData::new(freqs, [1, half]), &device);
    let args = timesteps.reshape([n, 1]) * freqs; // [N, half]
    let (first, second) = if flip_sin_to_cos {
        (args.clone().cos(), args.sin())
    } else {
        (args.clone().sin(), args.cos())
    };
    let emb = Tensor::cat(vec![first, second], 1);
    if embedding_dim % 2 == 1 {
        Tensor::cat(vec![emb, Tensor::zeros([n, 1], &device)], 1)
    } else {
        emb
    }
}

/// The activations diffusers' `get_activation` offers (`silu`/`swish`, `mish`, `gelu`, `relu`).
pub(crate) fn apply_activation<B: Backend, const D: usize>(
    name: &str,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match name {
        "silu" | "swish" => activation::silu(x),
        "mish" => activation::mish(x),
        "gelu" => activation::gelu(x),
        "relu" => activation::relu(x),
        // The config is validated before any module is built.
        other => unreachable!("activation `{other}` passed TransformerConfig::validate"),
    }
}

/// diffusers `TimestepEmbedding`: `linear_2(act(linear_1(sample)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
    pub act_fn: String,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// Loads `linear_1` (`in_channels -> time_embed_dim`) and `linear_2` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act_fn: &str,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        if !crate::config::TIMESTEP_ACTIVATIONS.contains(&act_fn) {
            return Err(TransformerError::Config {
                path: vb.key("linear_1"),
                message: format!(
                    "activation `{act_fn}` is not supported (supported: {})",
                    crate::config::TIMESTEP_ACTIVATIONS.join(", ")
                ),
            });
        }
        Ok(TimestepEmbedding {
            linear_1: Linear::load(
                &vb.pp("linear_1"),
                in_channels,
                time_embed_dim,
                true,
                device,
            )?,
            linear_2: Linear::load(
                &vb.pp("linear_2"),
                time_embed_dim,
                time_embed_dim,
                true,
                device,
            )?,
            act_fn: act_fn.to_string(),
        })
    }
}

impl<B: ModelBackend> TimestepEmbedding<B> {
    pub fn forward(&self, sample: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = self.linear_1.forward(sample);
        let x = apply_activation(&self.act_fn, x);
        self.linear_2.forward(x)
    }
}

// ---------------------------------------------------------------------------------------------
// 3D sincos positional embedding

/// diffusers `get_1d_sincos_pos_embed_from_grid` (float64, no flip): `[M, D]` row-major, `[sin | cos]`.
fn sincos_1d(embed_dim: usize, pos: &[f64]) -> Vec<f64> {
    let half = embed_dim / 2;
    let omega: Vec<f64> = (0..half)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / (embed_dim as f64 / 2.0)))
        .collect();
    let mut out = Vec::with_capacity(pos.len() * embed_dim);
    for &p in pos {
        out.extend(omega.iter().map(|w| (p * w).sin()));
        out.extend(omega.iter().map(|w| (p * w).cos()));
    }
    out
}

/// diffusers `get_3d_sincos_pos_embed(embed_dim, spatial_size=(width, height), temporal_size, ...)`
/// (`output_type="pt"`): `[temporal_size * height * width, embed_dim]` row-major (tokens in
/// `t, h, w` order), each row `[temporal (D/4) | spatial from w (3D/8) | spatial from h (3D/8)]`.
///
/// `embed_dim` must be divisible by 16 (checked by [`TransformerConfig::validate`]).
pub fn get_3d_sincos_pos_embed(
    embed_dim: usize,
    spatial_size: (usize, usize),
    temporal_size: usize,
    spatial_interpolation_scale: f64,
    temporal_interpolation_scale: f64,
) -> Vec<f32> {
    let (w, h) = spatial_size;
    let dim_spatial = 3 * embed_dim / 4;
    let dim_temporal = embed_dim / 4;
    // Positions are computed in f32 (torch.arange(f32) / scale), the frequencies in f64.
    let s_scale = spatial_interpolation_scale as f32;
    let t_scale = temporal_interpolation_scale as f32;
    let mut pos_w = Vec::with_capacity(h * w);
    let mut pos_h = Vec::with_capacity(h * w);
    for i in 0..h {
        for j in 0..w {
            // meshgrid(grid_w, grid_h, indexing="xy"): grid[0] is the w coordinate, grid[1] the h one.
            pos_w.push((j as f32 / s_scale) as f64);
            pos_h.push((i as f32 / s_scale) as f64);
        }
    }
    let emb_a = sincos_1d(dim_spatial / 2, &pos_w); // [H*W, 3D/8]
    let emb_b = sincos_1d(dim_spatial / 2, &pos_h); // [H*W, 3D/8]
    let pos_t: Vec<f64> = (0..temporal_size)
        .map(|t| (t as f32 / t_scale) as f64)
        .collect();
    let emb_t = sincos_1d(dim_temporal, &pos_t); // [T, D/4]
    let q = dim_spatial / 2;
    let mut out = Vec::with_capacity(temporal_size * h * w * embed_dim);
    for t in 0..temporal_size {
        for s in 0..h * w {
            out.extend(
                emb_t[t * dim_temporal..(t + 1) * dim_temporal]
                    .iter()
                    .map(|x| *x as f32),
            );
            out.extend(emb_a[s * q..(s + 1) * q].iter().map(|x| *x as f32));
            out.extend(emb_b[s * q..(s + 1) * q].iter().map(|x| *x as f32));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Patch embedding

/// diffusers `CogVideoXPatchEmbed`: text projection, video patch projection, and (2B / 5B-I2V)
/// the joint positional table added to `[text | video]` tokens.
///
/// CogVideoX 1.0 projects patches with `Conv2d(kernel = stride = patch_size)`; that is exactly a
/// linear map over `(C, p, p)`-flattened patches, so `proj` holds the conv weight
/// `[D, C, p, p]` (loaded from `patch_embed.proj.weight` with its stored shape) as `[D, C*p*p]`.
/// CogVideoX 1.5 uses `Linear(C * p_t * p * p, D)` (with bias; `patch_bias` only affects the conv,
/// as in diffusers).
#[derive(Module, Debug)]
pub struct CogVideoXPatchEmbed<B: Backend> {
    pub proj: Linear<B>,
    pub text_proj: Linear<B>,
    /// The table for the config's sample size: the learned `pos_embedding` of the checkpoint
    /// (5B-I2V) or the sincos table diffusers registers as a non-persistent buffer (2B).
    /// `[1, max_text_seq_length + patches, D]`.
    pub pos_embedding: Option<Tensor<B, 3>>,
    pub patch_size: usize,
    pub patch_size_t: Option<usize>,
    pub embed_dim: usize,
    pub sample_height: usize,
    pub sample_width: usize,
    pub sample_frames: usize,
    pub temporal_compression_ratio: usize,
    pub max_text_seq_length: usize,
    pub spatial_interpolation_scale: f64,
    pub temporal_interpolation_scale: f64,
    pub use_positional_embeddings: bool,
    pub use_learned_positional_embeddings: bool,
    /// The last table recomputed for a size other than the sample size (diffusers recomputes it
    /// on every call; a sampling loop or a training run asks for the same size again and again).
    /// Held on the host so that the module stays backend-independent (autodiff, devices).
    pub recomputed: SincosCache,
}

/// `(latent height, latent width, pixel frames)` and the joint sincos table `[1, L, D]` for them.
pub type SincosCache = Arc<Mutex<Option<((usize, usize, usize), TensorData)>>>;

impl<B: Backend> CogVideoXPatchEmbed<B> {
    /// Loads `proj`, `text_proj` and (learned) `pos_embedding` under `vb` (`patch_embed`).
    pub fn load(
        vb: &VarBuilder,
        c: &TransformerConfig,
        device: &B::Device,
    ) -> Result<Self, TransformerError> {
        let d = c.inner_dim();
        let p = c.patch_size;
        let proj = match c.patch_size_t {
            None => {
                let pvb = vb.pp("proj");
                let w = pvb.tensor::<B, 4>("weight", [d, c.in_channels, p, p], device)?;
                let bias = if c.patch_bias {
                    Some(pvb.tensor::<B, 1>("bias", [d], device)?)
                } else {
                    None
                };
                Linear::new(w.reshape([d, c.in_channels * p * p]), bias)
            }
            Some(pt) => Linear::load(&vb.pp("proj"), c.in_channels * p * p * pt, d, true, device)?,
        };
        let text_proj = Linear::load(&vb.pp("text_proj"), c.text_embed_dim, d, true, device)?;
        let mut embed = CogVideoXPatchEmbed {
            proj,
            text_proj,
            pos_embedding: None,
            patch_size: p,
            patch_size_t: c.patch_size_t,
            embed_dim: d,
            sample_height: c.sample_height,
            sample_width: c.sample_width,
            sample_frames: c.sample_frames,
            temporal_compression_ratio: c.temporal_compression_ratio,
            max_text_seq_length: c.max_text_seq_length,
            spatial_interpolation_scale: c.spatial_interpolation_scale,
            temporal_interpolation_scale: c.temporal_interpolation_scale,
            use_positional_embeddings: !c.use_rotary_positional_embeddings,
            use_learned_positional_embeddings: c.use_learned_positional_embeddings,
            recomputed: Arc::default(),
        };
        if embed.use_positional_embeddings || embed.use_learned_positional_embeddings {
            let table =
                embed.sincos_table(c.sample_height, c.sample_width, c.sample_frames, device);
            embed.pos_embedding = Some(if embed.use_learned_positional_embeddings {
                // Persistent buffer: the checkpoint's values replace the sincos init.
                vb.tensor::<B, 3>("pos_embedding", table.dims(), device)?
            } else {
                table
            });
        }
        Ok(embed)
    }

    /// diffusers `_get_positional_embeddings(height, width, frames)`: the joint table
    /// `[1, max_text_seq_length + patches, D]` (zeros on the text positions) for latent
    /// `height x width` and pixel `frames`.
    pub fn sincos_table(
        &self,
        height: usize,
        width: usize,
        frames: usize,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        Tensor::from_data(self.sincos_data(height, width, frames), device)
    }

    /// [`Self::sincos_table`] on the host.
    fn sincos_data(&self, height: usize, width: usize, frames: usize) -> TensorData {
        let ph = height / self.patch_size;
        let pw = width / self.patch_size;
        let t = (frames.max(1) - 1) / self.temporal_compression_ratio + 1;
        let patches = ph * pw * t;
        let table = get_3d_sincos_pos_embed(
            self.embed_dim,
            (pw, ph),
            t,
            self.spatial_interpolation_scale,
            self.temporal_interpolation_scale,
        );
        let mut joint = vec![0f32; self.max_text_seq_length * self.embed_dim];
        joint.extend(table);
        TensorData::new(
            joint,
            [1, self.max_text_seq_length + patches, self.embed_dim],
        )
    }

    /// [`Self::sincos_table`], reusing the last recomputed table when the size matches.
    fn cached_sincos_table(
        &self,
        height: usize,
        width: usize,
        frames: usize,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let key = (height, width, frames);
        let mut cache = self.recomputed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, data)) = cache.as_ref() {
            if *k == key {
                return Tensor::from_data(data.clone(), device);
            }
        }
        let data = self.sincos_data(height, width, frames);
        *cache = Some((key, data.clone()));
        Tensor::from_data(data, device)
    }
}

impl<B: ModelBackend> CogVideoXPatchEmbed<B> {
    /// `text_embeds [B, S, Dt]`, `image_embeds [B, F, C, H, W]` to `[B, S + patches, D]`.
    pub fn forward(
        &self,
        text_embeds: Tensor<B, 3>,
        image_embeds: Tensor<B, 5>,
    ) -> Result<Tensor<B, 3>, TransformerError> {
        let text_embeds = self.text_proj.forward(text_embeds);
        let [b, f, c, h, w] = image_embeds.dims();
        let p = self.patch_size;
        let (hp, wp) = (h / p, w / p);
        // Reshapes stay at rank <= 6 (burn's ndarray backend limit).
        let image_embeds = match self.patch_size_t {
            None => {
                // Conv2d(kernel = stride = p) as a linear map over (C, p, p) patches.
                let x = image_embeds.reshape([b * f, c, hp, p, wp, p]);
                let x = x.permute([0, 2, 4, 1, 3, 5]); // [B*F, H', W', C, p, p]
                let x = x.reshape([b, f * hp * wp, c * p * p]);
                self.proj.forward(x)
            }
            Some(pt) => {
                // diffusers: permute to [B, F, H, W, C], view as [B, F', p_t, H', p, W', p, C] and
                // permute to [B, F', H', W', C, p_t, p, p]; done here in two rank-5 steps.
                let fp = f / pt;
                let x = image_embeds.reshape([b * fp * pt * c, hp, p, wp, p]);
                let x = x.permute([0, 1, 3, 2, 4]); // [B*F'*p_t*C, H', W', p, p]
                let x = x.reshape([b * fp, pt, c, hp * wp, p * p]);
                let x = x.permute([0, 3, 2, 1, 4]); // [B*F', H'*W', C, p_t, p*p]
                let x = x.reshape([b, fp * hp * wp, c * pt * p * p]);
                self.proj.forward(x)
            }
        };
        let embeds = Tensor::cat(vec![text_embeds, image_embeds], 1);
        if !(self.use_positional_embeddings || self.use_learned_positional_embeddings) {
            return Ok(embeds);
        }
        if self.use_learned_positional_embeddings
            && (self.sample_width != w || self.sample_height != h)
        {
            return input_err(format!(
                "this model has learned positional embeddings (CogVideoX-5b-I2V) for latent size {}x{}; \
                 it cannot run at {h}x{w}",
                self.sample_height, self.sample_width
            ));
        }
        let pre_time_compression_frames = (f - 1) * self.temporal_compression_ratio + 1;
        let pos = if self.sample_height != h
            || self.sample_width != w
            || self.sample_frames != pre_time_compression_frames
        {
            self.cached_sincos_table(h, w, pre_time_compression_frames, &embeds.device())
        } else {
            self.pos_embedding
                .clone()
                .expect("set in load when positional embeddings are used")
        };
        let [_, len, _] = embeds.dims();
        let [_, pos_len, _] = pos.dims();
        if len != pos_len {
            let text_len = len - f / self.patch_size_t.unwrap_or(1) * hp * wp;
            return input_err(format!(
                "the positional table covers {} text tokens + {} video patches, but the input has {text_len} \
                 text tokens + {} patches (the text length must be max_text_seq_length = {})",
                self.max_text_seq_length,
                pos_len - self.max_text_seq_length,
                len - text_len,
                self.max_text_seq_length
            ));
        }
        let pos = cogvx_model_core::precision::like(pos, &embeds);
        Ok(embeds + pos)
    }
}

// ---------------------------------------------------------------------------------------------
// 3D RoPE

/// The grid of [`get_3d_rotary_pos_embed`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeGrid {
    /// CogVideoX 1.0: positions spread over the crop region `((top, left), (bottom, right))`.
    Linspace {
        crops_coords: ((i64, i64), (i64, i64)),
    },
    /// CogVideoX 1.5: integer positions, at most `max_size = (max_h, max_w)`.
    Slice { max_size: (usize, usize) },
}

/// The pipelines' `get_resize_crop_region_for_grid((h, w), tgt_width, tgt_height)` (Python's
/// `round`, i.e. half to even).
pub fn get_resize_crop_region_for_grid(
    src: (usize, usize),
    tgt_width: usize,
    tgt_height: usize,
) -> ((i64, i64), (i64, i64)) {
    let (tw, th) = (tgt_width as f64, tgt_height as f64);
    let (h, w) = (src.0 as f64, src.1 as f64);
    let r = h / w;
    let (resize_height, resize_width) = if r > th / tw {
        (th, (th / h * w).round_ties_even())
    } else {
        ((tw / w * h).round_ties_even(), tw)
    };
    let crop_top = ((th - resize_height) / 2.0).round_ties_even();
    let crop_left = ((tw - resize_width) / 2.0).round_ties_even();
    (
        (crop_top as i64, crop_left as i64),
        (
            (crop_top + resize_height) as i64,
            (crop_left + resize_width) as i64,
        ),
    )
}

/// `torch.linspace(start, end, steps, dtype=float32)` as the CPU kernel computes it.
fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// diffusers `get_1d_rotary_pos_embed(dim, pos, theta, use_real=True, repeat_interleave_real=True)`:
/// `(cos, sin)`, each `[len(pos), dim]` row-major, every frequency repeated twice.
fn rotary_1d(dim: usize, pos: &[f32], theta: f32) -> (Vec<f32>, Vec<f32>) {
    let freqs: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(pos.len() * dim);
    let mut sin = Vec::with_capacity(pos.len() * dim);
    for &p in pos {
        for &f in &freqs {
            let a = p * f;
            cos.extend([a.cos(); 2]);
            sin.extend([a.sin(); 2]);
        }
    }
    (cos, sin)
}

/// diffusers `get_3d_rotary_pos_embed(embed_dim, crops_coords, grid_size=(h, w), temporal_size,
/// theta=10000, use_real=True, grid_type, max_size)`: `(cos, sin)`, each
/// `[temporal_size * h * w, embed_dim]` row-major (tokens in `t, h, w` order, channels
/// `[t (D/4) | h (3D/8) | w (3D/8)]`).
pub fn get_3d_rotary_pos_embed(
    embed_dim: usize,
    grid: RopeGrid,
    grid_size: (usize, usize),
    temporal_size: usize,
) -> Result<(Vec<f32>, Vec<f32>), TransformerError> {
    let theta = 10000f32;
    let (gh, gw) = grid_size;
    let (grid_h, grid_w, grid_t) = match grid {
        RopeGrid::Linspace {
            crops_coords: (start, stop),
        } => {
            let grid_h = linspace_f32(
                start.0 as f64,
                stop.0 as f64 * (gh as f64 - 1.0) / gh as f64,
                gh,
            );
            let grid_w = linspace_f32(
                start.1 as f64,
                stop.1 as f64 * (gw as f64 - 1.0) / gw as f64,
                gw,
            );
            let t = temporal_size as f64;
            let grid_t = linspace_f32(0.0, t * (t - 1.0) / t, temporal_size);
            (grid_h, grid_w, grid_t)
        }
        RopeGrid::Slice {
            max_size: (max_h, max_w),
        } => {
            if gh > max_h || gw > max_w {
                return input_err(format!(
                    "RoPE (slice grid): the patch grid {gh}x{gw} exceeds the model's maximum {max_h}x{max_w} \
                     (sample_height/width // patch_size)"
                ));
            }
            // arange(max)[:grid] is arange(grid).
            let grid_h = (0..gh).map(|i| i as f32).collect();
            let grid_w = (0..gw).map(|i| i as f32).collect();
            let grid_t = (0..temporal_size).map(|i| i as f32).collect();
            (grid_h, grid_w, grid_t)
        }
    };
    let dim_t = embed_dim / 4;
    let dim_h = embed_dim / 8 * 3;
    let dim_w = embed_dim / 8 * 3;
    let (t_cos, t_sin) = rotary_1d(dim_t, &grid_t, theta);
    let (h_cos, h_sin) = rotary_1d(dim_h, &grid_h, theta);
    let (w_cos, w_sin) = rotary_1d(dim_w, &grid_w, theta);
    let dim = dim_t + dim_h + dim_w;
    let n = temporal_size * gh * gw;
    let combine = |t: &[f32], h: &[f32], w: &[f32]| {
        let mut out = Vec::with_capacity(n * dim);
        for ti in 0..temporal_size {
            for hi in 0..gh {
                for wi in 0..gw {
                    out.extend_from_slice(&t[ti * dim_t..(ti + 1) * dim_t]);
                    out.extend_from_slice(&h[hi * dim_h..(hi + 1) * dim_h]);
                    out.extend_from_slice(&w[wi * dim_w..(wi + 1) * dim_w]);
                }
            }
        }
        out
    };
    Ok((
        combine(&t_cos, &h_cos, &w_cos),
        combine(&t_sin, &h_sin, &w_sin),
    ))
}

/// The RoPE tables the CogVideoX pipelines pass to the transformer (`_prepare_rotary_positional_embeddings`)
/// for a latent video of `frames x height x width` (the `hidden_states` dims `F, H, W`), as
/// host vectors `(cos, sin)`, each `[tokens, attention_head_dim]` row-major.
///
/// 1.0 (`patch_size_t` null): linspace grid over `get_resize_crop_region_for_grid` against
/// `sample_height/width // patch_size`, `frames` temporal positions. 1.5: `slice` grid with
/// `max_size = sample // patch_size` and `ceil(frames / patch_size_t)` temporal positions.
pub fn rotary_tables_host(
    config: &TransformerConfig,
    frames: usize,
    height: usize,
    width: usize,
) -> Result<(Vec<f32>, Vec<f32>), TransformerError> {
    let p = config.patch_size;
    let (gh, gw) = (height / p, width / p);
    if gh == 0 || gw == 0 || frames == 0 {
        return input_err(format!(
            "RoPE: latent size {frames}x{height}x{width} has no patches (patch_size {p})"
        ));
    }
    let base_w = config.sample_width / p;
    let base_h = config.sample_height / p;
    match config.patch_size_t {
        None => {
            let crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h);
            get_3d_rotary_pos_embed(
                config.attention_head_dim,
                RopeGrid::Linspace {
                    crops_coords: crops,
                },
                (gh, gw),
                frames,
            )
        }
        Some(pt) => {
            let base_frames = frames.div_ceil(pt);
            get_3d_rotary_pos_embed(
                config.attention_head_dim,
                RopeGrid::Slice {
                    max_size: (base_h, base_w),
                },
                (gh, gw),
                base_frames,
            )
        }
    }
}

/// A pair of RoPE tables `(cos, sin)`, each `[video tokens, attention_head_dim]`.
pub type RotaryEmb<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// [`rotary_tables_host`] uploaded to `device`: `(cos, sin)`, each `[tokens, attention_head_dim]`.
/// This is how the pipeline, the trainer and the parity runner compute the tables.
pub fn rotary_tables<B: Backend>(
    config: &TransformerConfig,
    frames: usize,
    height: usize,
    width: usize,
    device: &B::Device,
) -> Result<RotaryEmb<B>, TransformerError> {
    let (cos, sin) = rotary_tables_host(config, frames, height, width)?;
    let d = config.attention_head_dim;
    let n = cos.len() / d;
    Ok((
        Tensor::from_data(TensorData::new(cos, [n, d]), device),
        Tensor::from_data(TensorData::new(sin, [n, d]), device),
    ))
}

/// diffusers `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)` on
/// `x [B, H, S, D]` with `cos`, `sin` `[S, D]`: pairs `(x[2i], x[2i+1])` are rotated,
/// `x * cos + rotate_pairs(x) * sin`.
///
/// Computed in f32 and returned in x's dtype, as diffusers (`x.float()`, `.to(x.dtype)`).
pub fn apply_rotary_emb<B: ModelBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    use cogvx_model_core::precision::{float_dtype, to_dtype, to_f32};
    let dtype = float_dtype(&x);
    let prim = |t: Tensor<B, 2>| to_f32(t).into_primitive().tensor();
    let out = B::rotary(to_f32(x).into_primitive().tensor(), prim(cos), prim(sin));
    to_dtype(Tensor::from_primitive(TensorPrimitive::Float(out)), dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_region_rounds_half_to_even() {
        // r = 3/4 < 5/6: resize_width = 6, resize_height = round(6/4*3) = round(4.5) = 4,
        // crop_top = round(0.5) = 0.
        assert_eq!(
            get_resize_crop_region_for_grid((3, 4), 6, 5),
            ((0, 0), (4, 6))
        );
        // r = 3/4 > 4/6: resize_height = 4, resize_width = round(5.33) = 5, crop_left = round(0.5) = 0.
        assert_eq!(
            get_resize_crop_region_for_grid((3, 4), 6, 4),
            ((0, 0), (4, 5))
        );
        // r = 1 > 4/6: resize_height = 4, resize_width = 4, crop_left = 1.
        assert_eq!(
            get_resize_crop_region_for_grid((2, 2), 6, 4),
            ((0, 1), (4, 5))
        );
        // crop_top = round(0.5) = 0 (half to even).
        assert_eq!(
            get_resize_crop_region_for_grid((3, 6), 6, 4),
            ((0, 0), (3, 6))
        );
    }

    #[test]
    fn linspace_matches_torch_endpoints() {
        assert_eq!(linspace_f32(0.0, 2.0, 3), vec![0.0, 1.0, 2.0]);
        assert_eq!(linspace_f32(1.0, 5.0, 1), vec![1.0]);
        let v = linspace_f32(0.0, 3.5, 4);
        assert_eq!(v[3], 3.5);
        assert!((v[1] - 3.5 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn rotary_emb_rotates_interleaved_pairs() {
        type B = cogvx_model_core::CpuBackend;
        let dev = Default::default();
        let (s, d) = (3, 4);
        let xs: Vec<f32> = (0..2 * s * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let cs: Vec<f32> = (0..s * d).map(|i| (i as f32 * 0.11).cos()).collect();
        let sn: Vec<f32> = (0..s * d).map(|i| (i as f32 * 0.11).sin()).collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(xs.clone(), [1, 2, s, d]), &dev);
        let cos = Tensor::<B, 2>::from_data(TensorData::new(cs.clone(), [s, d]), &dev);
        let sin = Tensor::<B, 2>::from_data(TensorData::new(sn.clone(), [s, d]), &dev);
        let got = apply_rotary_emb(x, cos, sin)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for h in 0..2 {
            for t in 0..s {
                for j in 0..d {
                    let i = (h * s + t) * d + j;
                    // stack([-x_imag, x_real], -1): even slots take -x[j+1], odd slots x[j-1].
                    let rot = if j % 2 == 0 { -xs[i + 1] } else { xs[i - 1] };
                    let want = xs[i] * cs[t * d + j] + rot * sn[t * d + j];
                    assert_eq!(got[i], want, "h {h} t {t} j {j}");
                }
            }
        }
    }

    #[test]
    fn sincos_first_row_is_sin0_cos1() {
        // Position (0, 0, 0): every sin is 0, every cos 1.
        let t = get_3d_sincos_pos_embed(16, (2, 3), 2, 1.875, 1.0);
        assert_eq!(t.len(), 2 * 6 * 16);
        assert_eq!(
            &t[..16],
            &[0., 0., 1., 1., 0., 0., 0., 1., 1., 1., 0., 0., 0., 1., 1., 1.]
        );
        // Token 1 is (t=0, h=0, w=1): the w part moves, the h part does not.
        let row = &t[16..32];
        assert!((row[4] - (1.0f64 / 1.875).sin() as f32).abs() < 1e-7);
        assert_eq!(row[10], 0.0);
    }
}
