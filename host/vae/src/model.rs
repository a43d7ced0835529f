//! `CogVideoXEncoder3D`, `CogVideoXDecoder3D` and `AutoencoderKLCogVideoX` with diffusers' frame
//! batching, conv caching and tiling.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_model_core::nn::GroupNorm;
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::LoadError;
use std::path::Path;

use crate::config::VaeConfig;
use crate::layers::{
    CausalConv3d, DownBlock3D, DownBlockConfig, MidBlock3D, ResnetCache, SafeConv3d, SpatialNorm3D,
    UpBlock3D, UpBlockConfig,
};
use crate::VaeError;

/// Conv caches of the encoder between frame batches (diffusers' nested `conv_cache` dict).
/// Fields are named as diffusers' cache keys.
#[derive(Debug, Clone)]
pub struct EncoderCache<B: Backend> {
    pub conv_in: Option<Tensor<B, 5>>,
    pub down_blocks: Vec<Vec<ResnetCache<B>>>,
    pub mid_block: Vec<ResnetCache<B>>,
    pub conv_out: Option<Tensor<B, 5>>,
}

impl<B: Backend> Default for EncoderCache<B> {
    fn default() -> Self {
        EncoderCache {
            conv_in: None,
            down_blocks: Vec::new(),
            mid_block: Vec::new(),
            conv_out: None,
        }
    }
}

/// Conv caches of the decoder between frame batches.
/// Fields are named as diffusers' cache keys.
#[derive(Debug, Clone)]
pub struct DecoderCache<B: Backend> {
    pub conv_in: Option<Tensor<B, 5>>,
    pub mid_block: Vec<ResnetCache<B>>,
    pub up_blocks: Vec<Vec<ResnetCache<B>>>,
    pub conv_out: Option<Tensor<B, 5>>,
}

impl<B: Backend> Default for DecoderCache<B> {
    fn default() -> Self {
        DecoderCache {
            conv_in: None,
            mid_block: Vec::new(),
            up_blocks: Vec::new(),
            conv_out: None,
        }
    }
}

/// `CogVideoXEncoder3D`: video `[B, 3, T, H, W]` to the distribution parameters
/// `[B, 2 * latent_channels, 1 + (T - 1) / 4, H / 8, W / 8]` (mean and log-variance).
#[derive(Module, Debug)]
pub struct CogVideoXEncoder3D<B: Backend> {
    pub conv_in: CausalConv3d<B>,
    pub down_blocks: Vec<DownBlock3D<B>>,
    pub mid_block: MidBlock3D<B>,
    pub norm_out: GroupNorm<B>,
    pub conv_out: CausalConv3d<B>,
}

impl<B: Backend> CogVideoXEncoder3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(vb: &VarBuilder, c: &VaeConfig, device: &B::Device) -> Result<Self, LoadError> {
        let ch = &c.block_out_channels;
        let level = c.temporal_compress_level();
        let conv_in = CausalConv3d::load(&vb.pp("conv_in"), c.in_channels, ch[0], 3, device)?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut output_channel = ch[0];
        for i in 0..ch.len() {
            let input_channel = output_channel;
            output_channel = ch[i];
            let is_final = i == ch.len() - 1;
            let block = DownBlockConfig {
                in_channels: input_channel,
                out_channels: output_channel,
                num_layers: c.layers_per_block,
                resnet_eps: c.norm_eps,
                resnet_groups: c.norm_num_groups,
                add_downsample: !is_final,
                compress_time: i < level,
            };
            down_blocks.push(DownBlock3D::load(
                &vb.pp("down_blocks").pp(i),
                &block,
                device,
            )?);
        }
        let last = ch[ch.len() - 1];
        let mid_block = MidBlock3D::load(
            &vb.pp("mid_block"),
            last,
            2,
            c.norm_eps,
            c.norm_num_groups,
            None,
            device,
        )?;
        let norm_out = GroupNorm::load(&vb.pp("norm_out"), c.norm_num_groups, last, 1e-6, device)?;
        let conv_out =
            CausalConv3d::load(&vb.pp("conv_out"), last, 2 * c.latent_channels, 3, device)?;
        Ok(CogVideoXEncoder3D {
            conv_in,
            down_blocks,
            mid_block,
            norm_out,
            conv_out,
        })
    }

    /// One frame batch; `cache` carries the causal-conv frames to the next batch.
    pub fn forward(&self, sample: Tensor<B, 5>, cache: &mut EncoderCache<B>) -> Tensor<B, 5> {
        let mut h = self.conv_in.forward(sample, &mut cache.conv_in);
        cache
            .down_blocks
            .resize_with(self.down_blocks.len(), Vec::new);
        for (block, c) in self.down_blocks.iter().zip(cache.down_blocks.iter_mut()) {
            h = block.forward(h, c);
        }
        h = self.mid_block.forward(h, None, &mut cache.mid_block);
        let h = silu(self.norm_out.forward(h));
        self.conv_out.forward(h, &mut cache.conv_out)
    }
}

/// `CogVideoXDecoder3D`: latents `[B, C, F, h, w]` to video, every norm conditioned on the latents.
#[derive(Module, Debug)]
pub struct CogVideoXDecoder3D<B: Backend> {
    pub conv_in: CausalConv3d<B>,
    pub mid_block: MidBlock3D<B>,
    pub up_blocks: Vec<UpBlock3D<B>>,
    pub norm_out: SpatialNorm3D<B>,
    pub conv_out: CausalConv3d<B>,
}

impl<B: Backend> CogVideoXDecoder3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(vb: &VarBuilder, c: &VaeConfig, device: &B::Device) -> Result<Self, LoadError> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let zc = c.latent_channels;
        let g = c.norm_num_groups;
        let conv_in = CausalConv3d::load(&vb.pp("conv_in"), zc, rev[0], 3, device)?;
        let mid_block = MidBlock3D::load(
            &vb.pp("mid_block"),
            rev[0],
            2,
            c.norm_eps,
            g,
            Some(zc),
            device,
        )?;
        let level = c.temporal_compress_level();
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut output_channel = rev[0];
        for i in 0..rev.len() {
            let prev_output_channel = output_channel;
            output_channel = rev[i];
            let is_final = i == rev.len() - 1;
            let block = UpBlockConfig {
                in_channels: prev_output_channel,
                out_channels: output_channel,
                num_layers: c.layers_per_block + 1,
                resnet_eps: c.norm_eps,
                resnet_groups: g,
                spatial_norm_dim: zc,
                add_upsample: !is_final,
                compress_time: i < level,
            };
            up_blocks.push(UpBlock3D::load(&vb.pp("up_blocks").pp(i), &block, device)?);
        }
        let last = rev[rev.len() - 1];
        let norm_out = SpatialNorm3D::load(&vb.pp("norm_out"), last, zc, g, device)?;
        let conv_out = CausalConv3d::load(&vb.pp("conv_out"), last, c.out_channels, 3, device)?;
        Ok(CogVideoXDecoder3D {
            conv_in,
            mid_block,
            up_blocks,
            norm_out,
            conv_out,
        })
    }

    /// One latent frame batch; `cache` carries the causal-conv frames to the next batch.
    pub fn forward(&self, sample: Tensor<B, 5>, cache: &mut DecoderCache<B>) -> Tensor<B, 5> {
        let mut h = self.conv_in.forward(sample.clone(), &mut cache.conv_in);
        h = self
            .mid_block
            .forward(h, Some(&sample), &mut cache.mid_block);
        cache.up_blocks.resize_with(self.up_blocks.len(), Vec::new);
        for (block, c) in self.up_blocks.iter().zip(cache.up_blocks.iter_mut()) {
            h = block.forward(h, &sample, c);
        }
        let h = silu(self.norm_out.forward(h, &sample));
        self.conv_out.forward(h, &mut cache.conv_out)
    }
}

/// Tiled encode/decode settings, as diffusers' `enable_tiling(...)`.
///
/// [`Tiling::for_config`] gives diffusers' defaults: tiles of half the config's sample size
/// (240x360 for 480x720 checkpoints), overlap factors 1/6 (height) and 1/5 (width).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Tiling {
    /// Tile height in pixels (a video taller than this is tiled).
    pub tile_sample_min_height: usize,
    /// Tile width in pixels.
    pub tile_sample_min_width: usize,
    /// Fraction of a tile's height that overlaps the next tile and is blended.
    pub tile_overlap_factor_height: f64,
    /// Fraction of a tile's width that overlaps the next tile and is blended.
    pub tile_overlap_factor_width: f64,
}

impl Tiling {
    /// `enable_tiling()` with no arguments for a model of this config.
    pub fn for_config(c: &VaeConfig) -> Self {
        Tiling {
            tile_sample_min_height: c.sample_height / 2,
            tile_sample_min_width: c.sample_width / 2,
            tile_overlap_factor_height: 1.0 / 6.0,
            tile_overlap_factor_width: 1.0 / 5.0,
        }
    }

    /// Tile height in latent pixels: `int(tile_sample_min_height / 2^(levels - 1))`.
    pub fn tile_latent_min_height(&self, spatial_scale: usize) -> usize {
        (self.tile_sample_min_height as f64 / spatial_scale as f64) as usize
    }

    /// Tile width in latent pixels.
    pub fn tile_latent_min_width(&self, spatial_scale: usize) -> usize {
        (self.tile_sample_min_width as f64 / spatial_scale as f64) as usize
    }
}

/// How [`AutoencoderKLCogVideoX::encode`] / [`AutoencoderKLCogVideoX::decode`] run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VaeOptions {
    /// `Some`: tiled encode/decode (diffusers' `enable_tiling`); `None`: whole frames.
    pub tiling: Option<Tiling>,
    /// Encode/decode the batch one sample at a time (diffusers' `enable_slicing`): same result,
    /// less memory.
    pub slicing: bool,
}

/// `DiagonalGaussianDistribution` of the encoder: `mean` and `logvar` clamped to [-30, 20].
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution<B: Backend> {
    /// Mean `[B, C, F, h, w]` (unscaled latents).
    pub mean: Tensor<B, 5>,
    /// Log-variance, clamped to [-30, 20].
    pub logvar: Tensor<B, 5>,
}

impl<B: Backend> DiagonalGaussianDistribution<B> {
    /// Splits the encoder output on channels into mean and (clamped) logvar.
    pub fn from_parameters(parameters: Tensor<B, 5>) -> Self {
        let c = parameters.dims()[1] / 2;
        let mean = parameters.clone().narrow(1, 0, c);
        let logvar = parameters.narrow(1, c, c).clamp(-30.0, 20.0);
        DiagonalGaussianDistribution { mean, logvar }
    }

    /// `exp(0.5 * logvar)`.
    pub fn std(&self) -> Tensor<B, 5> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// `mean + std * noise` with the caller's standard-normal `noise` (diffusers' `sample()`).
    pub fn sample_with(&self, noise: Tensor<B, 5>) -> Tensor<B, 5> {
        self.mean.clone() + self.std() * noise
    }

    /// `mean + std * N(0, 1)` drawn from burn's RNG on the mean's device.
    pub fn sample(&self) -> Tensor<B, 5> {
        let noise = Tensor::random(
            self.mean.dims(),
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &self.mean.device(),
        );
        self.sample_with(noise)
    }

    /// The mode (= mean).
    pub fn mode(&self) -> Tensor<B, 5> {
        self.mean.clone()
    }
}

/// `AutoencoderKLCogVideoX`: the 3D causal VAE of CogVideoX (8x spatial, 4x temporal compression).
#[derive(Module, Debug)]
pub struct AutoencoderKLCogVideoX<B: Backend> {
    pub encoder: CogVideoXEncoder3D<B>,
    pub decoder: CogVideoXDecoder3D<B>,
    pub quant_conv: Option<SafeConv3d<B>>,
    pub post_quant_conv: Option<SafeConv3d<B>>,
    /// Number of video frames encoded per batch (diffusers' `num_sample_frames_batch_size`, 8).
    pub num_sample_frames_batch_size: usize,
    /// Number of latent frames decoded per batch (diffusers' `num_latent_frames_batch_size`, 2).
    pub num_latent_frames_batch_size: usize,
    /// `2^(len(block_out_channels) - 1)`.
    pub spatial_scale: usize,
    /// Channels of the latent.
    pub latent_channels: usize,
    /// `config.scaling_factor`.
    pub scaling_factor: f64,
    /// `config.invert_scale_latents`.
    pub invert_scale_latents: bool,
}

fn check_input(what: &str, dims: [usize; 5], channels: usize) -> Result<(), VaeError> {
    if dims[1] != channels || dims.contains(&0) {
        return Err(VaeError::Input(format!(
            "{what}: expected a non-empty [B, {channels}, T, H, W] tensor, got {dims:?}"
        )));
    }
    Ok(())
}

impl<B: Backend> AutoencoderKLCogVideoX<B> {
    /// Builds the model of `config` with weights from `vb` (rooted at the `vae/` folder).
    /// Call `vb.finish()` afterwards to get every missing / unexpected key reported.
    pub fn load(
        vb: &VarBuilder,
        config: &VaeConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        config
            .validate()
            .map_err(|m| LoadError::Other(format!("vae config: {m}")))?;
        let encoder = CogVideoXEncoder3D::load(&vb.pp("encoder"), config, device)?;
        let decoder = CogVideoXDecoder3D::load(&vb.pp("decoder"), config, device)?;
        let oc = config.out_channels;
        let quant_conv = if config.use_quant_conv {
            Some(SafeConv3d::load(
                &vb.pp("quant_conv"),
                2 * oc,
                2 * oc,
                1,
                0,
                device,
            )?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(SafeConv3d::load(
                &vb.pp("post_quant_conv"),
                oc,
                oc,
                1,
                0,
                device,
            )?)
        } else {
            None
        };
        let model = AutoencoderKLCogVideoX {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            num_sample_frames_batch_size: 8,
            num_latent_frames_batch_size: 2,
            spatial_scale: config.spatial_scale(),
            latent_channels: config.latent_channels,
            scaling_factor: config.scaling_factor,
            invert_scale_latents: config.invert_scale_latents,
        };
        // The VAE is frozen in CogVideoX training: never track gradients of its weights.
        Ok(model.no_grad())
    }

    /// Loads a diffusers `vae/` folder (`config.json` + safetensors), reporting every weight
    /// problem at once. Returns the model and its config.
    pub fn from_dir(dir: &Path, device: &B::Device) -> Result<(Self, VaeConfig), VaeError> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let vb = VarBuilder::from_dir(dir)?;
        let model = Self::load(&vb, &config, device)?;
        vb.finish()?;
        Ok((model, config))
    }

    /// Encodes `video [B, 3, T, H, W]` in [-1, 1] to the latent distribution (unscaled mean and
    /// logvar `[B, C, 1 + (T-1)/4, H/8, W/8]`). `T` should be 1, `8k` or `8k + 1`, as in diffusers.
    pub fn encode(
        &self,
        video: Tensor<B, 5>,
        options: &VaeOptions,
    ) -> Result<DiagonalGaussianDistribution<B>, VaeError> {
        check_input(
            "vae encode",
            video.dims(),
            self.encoder.conv_in.conv.weight.dims()[1],
        )?;
        let b = video.dims()[0];
        let h = if options.slicing && b > 1 {
            let parts = (0..b)
                .map(|i| self.encode_one(video.clone().narrow(0, i, 1), options))
                .collect::<Result<Vec<_>, _>>()?;
            Tensor::cat(parts, 0)
        } else {
            self.encode_one(video, options)?
        };
        Ok(DiagonalGaussianDistribution::from_parameters(h))
    }

    /// [`Self::encode`] with latents of exactly `H / spatial_scale x W / spatial_scale`.
    /// Diffusers' tiled encode keeps `tile_latent_stride` rows per tile without cropping the
    /// total: for frames not much larger than a tile (the tiny test models) that gives more
    /// rows or columns, a latent no transformer can use. Such an input is encoded again without
    /// tiling (logged as a warning); every other input is [`Self::encode`]'s.
    pub fn encode_exact(
        &self,
        video: Tensor<B, 5>,
        options: &VaeOptions,
    ) -> Result<DiagonalGaussianDistribution<B>, VaeError> {
        let [_, _, _, h, w] = video.dims();
        let want = [h / self.spatial_scale, w / self.spatial_scale];
        if options.tiling.is_none() {
            return self.encode(video, options);
        }
        let dist = self.encode(video.clone(), options)?;
        if dist.mean.dims()[3..] == want {
            return Ok(dist);
        }
        tracing::warn!(
            "tiled VAE encode gives latent {:?} for {h}x{w} frames; encoding without tiling",
            dist.mean.dims()
        );
        self.encode(
            video,
            &VaeOptions {
                tiling: None,
                ..*options
            },
        )
    }

    /// Diffusers' `_encode`: tiled if enabled and the frame is larger than a tile, else frame batches.
    fn encode_one(&self, x: Tensor<B, 5>, options: &VaeOptions) -> Result<Tensor<B, 5>, VaeError> {
        let [_, _, _, height, width] = x.dims();
        if let Some(t) = &options.tiling {
            if width > t.tile_sample_min_width || height > t.tile_sample_min_height {
                return self.tiled_encode(x, t);
            }
        }
        self.check_encode_size(height, width, "video")?;
        Ok(self.encode_frames(x))
    }

    /// The stride-2 downsamplers need at least `spatial_scale` pixels (PyTorch would raise too).
    fn check_encode_size(&self, height: usize, width: usize, what: &str) -> Result<(), VaeError> {
        let s = self.spatial_scale;
        if height < s || width < s {
            return Err(VaeError::Input(format!(
                "vae encode: a {what} of {height}x{width} pixels is smaller than the VAE's {s}x{s} stride; \
                 use a larger video (or, when tiling, a size that leaves no edge tile under {s} pixels)"
            )));
        }
        Ok(())
    }

    /// Frame batches of `num_sample_frames_batch_size`, the first one taking the remainder
    /// (`T % batch`), with the conv cache carried across batches.
    fn encode_frames(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let num_frames = x.dims()[2];
        let mut cache = EncoderCache::default();
        let parts = frame_batches(num_frames, self.num_sample_frames_batch_size)
            .into_iter()
            .map(|(start, end)| {
                let h = self
                    .encoder
                    .forward(x.clone().narrow(2, start, end - start), &mut cache);
                match &self.quant_conv {
                    Some(q) => q.forward(h),
                    None => h,
                }
            })
            .collect();
        Tensor::cat(parts, 2)
    }

    /// Decodes unscaled `latents [B, C, F, h, w]` to video `[B, 3, 1 + 4(F-1), 8h, 8w]`
    /// (roughly in [-1, 1]).
    pub fn decode(
        &self,
        latents: Tensor<B, 5>,
        options: &VaeOptions,
    ) -> Result<Tensor<B, 5>, VaeError> {
        check_input("vae decode", latents.dims(), self.latent_channels)?;
        let b = latents.dims()[0];
        if options.slicing && b > 1 {
            let parts = (0..b)
                .map(|i| self.decode_one(latents.clone().narrow(0, i, 1), options))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Tensor::cat(parts, 0))
        } else {
            self.decode_one(latents, options)
        }
    }

    /// [`Self::decode`] with video of exactly `spatial_scale * h x spatial_scale * w`: as for
    /// [`Self::encode_exact`], diffusers' tiled decode of latents barely larger than a tile (the
    /// tiny models) gives too many rows or columns; such latents are decoded again without
    /// tiling (logged as a warning).
    pub fn decode_exact(
        &self,
        latents: Tensor<B, 5>,
        options: &VaeOptions,
    ) -> Result<Tensor<B, 5>, VaeError> {
        let [_, _, _, h, w] = latents.dims();
        let want = [h * self.spatial_scale, w * self.spatial_scale];
        if options.tiling.is_none() {
            return self.decode(latents, options);
        }
        let video = self.decode(latents.clone(), options)?;
        if video.dims()[3..] == want {
            return Ok(video);
        }
        tracing::warn!(
            "tiled VAE decode gives {:?} for {h}x{w} latents; decoding without tiling",
            video.dims()
        );
        self.decode(
            latents,
            &VaeOptions {
                tiling: None,
                ..*options
            },
        )
    }

    fn decode_one(&self, z: Tensor<B, 5>, options: &VaeOptions) -> Result<Tensor<B, 5>, VaeError> {
        let [_, _, _, height, width] = z.dims();
        if let Some(t) = &options.tiling {
            if width > t.tile_latent_min_width(self.spatial_scale)
                || height > t.tile_latent_min_height(self.spatial_scale)
            {
                return self.tiled_decode(z, t);
            }
        }
        Ok(self.decode_frames(z))
    }

    fn decode_frames(&self, z: Tensor<B, 5>) -> Tensor<B, 5> {
        let num_frames = z.dims()[2];
        let mut cache = DecoderCache::default();
        let parts = frame_batches(num_frames, self.num_latent_frames_batch_size)
            .into_iter()
            .map(|(start, end)| {
                let zi = z.clone().narrow(2, start, end - start);
                let zi = match &self.post_quant_conv {
                    Some(q) => q.forward(zi),
                    None => zi,
                };
                self.decoder.forward(zi, &mut cache)
            })
            .collect();
        Tensor::cat(parts, 2)
    }

    /// Diffusers' `tiled_encode`: overlapping tiles of `tile_sample_min_*` pixels, each encoded
    /// with frame batching, blended into their upper and left neighbours and cropped.
    pub fn tiled_encode(&self, x: Tensor<B, 5>, tiling: &Tiling) -> Result<Tensor<B, 5>, VaeError> {
        check_input(
            "vae tiled encode",
            x.dims(),
            self.encoder.conv_in.conv.weight.dims()[1],
        )?;
        let [_, _, _, height, width] = x.dims();
        let s = self.spatial_scale;
        let (lat_h, lat_w) = (
            tiling.tile_latent_min_height(s),
            tiling.tile_latent_min_width(s),
        );
        let overlap_height = (tiling.tile_sample_min_height as f64
            * (1.0 - tiling.tile_overlap_factor_height)) as usize;
        let overlap_width = (tiling.tile_sample_min_width as f64
            * (1.0 - tiling.tile_overlap_factor_width)) as usize;
        let blend_h = (lat_h as f64 * tiling.tile_overlap_factor_height) as usize;
        let blend_w = (lat_w as f64 * tiling.tile_overlap_factor_width) as usize;
        check_tiling(tiling, overlap_height, overlap_width, lat_h, lat_w)?;
        let mut rows: Vec<Vec<Tensor<B, 5>>> = Vec::new();
        for i in (0..height).step_by(overlap_height) {
            let mut row = Vec::new();
            for j in (0..width).step_by(overlap_width) {
                let th = tiling.tile_sample_min_height.min(height - i);
                let tw = tiling.tile_sample_min_width.min(width - j);
                self.check_encode_size(th, tw, &format!("tile at ({i}, {j})"))?;
                row.push(self.encode_frames(x.clone().narrow(3, i, th).narrow(4, j, tw)));
            }
            rows.push(row);
        }
        Ok(blend_tiles(
            rows,
            blend_h,
            blend_w,
            lat_h - blend_h,
            lat_w - blend_w,
        ))
    }

    /// Diffusers' `tiled_decode`: overlapping latent tiles of `tile_latent_min_*`, each decoded
    /// with frame batching, blended and cropped to `tile_sample_min_* - blend` pixels.
    pub fn tiled_decode(&self, z: Tensor<B, 5>, tiling: &Tiling) -> Result<Tensor<B, 5>, VaeError> {
        check_input("vae tiled decode", z.dims(), self.latent_channels)?;
        let [_, _, _, height, width] = z.dims();
        let s = self.spatial_scale;
        let (lat_h, lat_w) = (
            tiling.tile_latent_min_height(s),
            tiling.tile_latent_min_width(s),
        );
        let overlap_height = (lat_h as f64 * (1.0 - tiling.tile_overlap_factor_height)) as usize;
        let overlap_width = (lat_w as f64 * (1.0 - tiling.tile_overlap_factor_width)) as usize;
        let blend_h =
            (tiling.tile_sample_min_height as f64 * tiling.tile_overlap_factor_height) as usize;
        let blend_w =
            (tiling.tile_sample_min_width as f64 * tiling.tile_overlap_factor_width) as usize;
        check_tiling(tiling, overlap_height, overlap_width, lat_h, lat_w)?;
        let rows: Vec<Vec<Tensor<B, 5>>> = (0..height)
            .step_by(overlap_height)
            .map(|i| {
                (0..width)
                    .step_by(overlap_width)
                    .map(|j| {
                        let th = lat_h.min(height - i);
                        let tw = lat_w.min(width - j);
                        self.decode_frames(z.clone().narrow(3, i, th).narrow(4, j, tw))
                    })
                    .collect()
            })
            .collect();
        Ok(blend_tiles(
            rows,
            blend_h,
            blend_w,
            tiling.tile_sample_min_height - blend_h,
            tiling.tile_sample_min_width - blend_w,
        ))
    }

    /// Latents for the transformer from an encoded video: `z * scaling_factor` (the official
    /// trainer's `latent_dist.sample() * vae.config.scaling_factor`).
    pub fn scale_latents(&self, z: Tensor<B, 5>) -> Tensor<B, 5> {
        z * self.scaling_factor
    }

    /// Latents for [`Self::decode`] from the transformer's: `1 / scaling_factor * z`, as the
    /// pipelines' `decode_latents`.
    pub fn unscale_latents(&self, z: Tensor<B, 5>) -> Tensor<B, 5> {
        z * (1.0 / self.scaling_factor)
    }

    /// The I2V pipeline's image-latent scaling: `z * scaling_factor`, or `z / scaling_factor` when
    /// `invert_scale_latents` (CogVideoX 1.5, whose I2V model was trained that way). Note that
    /// the official finetune multiplies image latents by `scaling_factor` for every model.
    pub fn scale_image_latents(&self, z: Tensor<B, 5>) -> Tensor<B, 5> {
        if self.invert_scale_latents {
            z * (1.0 / self.scaling_factor)
        } else {
            z * self.scaling_factor
        }
    }
}

/// `(start, end)` frame ranges of diffusers' frame batching: `max(T // batch, 1)` batches, the
/// first one `batch + T % batch` frames long.
pub fn frame_batches(num_frames: usize, batch: usize) -> Vec<(usize, usize)> {
    let num_batches = (num_frames / batch).max(1);
    let remaining = num_frames % batch;
    (0..num_batches)
        .map(|i| {
            let start = batch * i + if i == 0 { 0 } else { remaining };
            let end = (batch * (i + 1) + remaining).min(num_frames);
            (start, end)
        })
        .collect()
}

fn check_tiling(
    t: &Tiling,
    overlap_h: usize,
    overlap_w: usize,
    lat_h: usize,
    lat_w: usize,
) -> Result<(), VaeError> {
    let ok_factor = |f: f64| (0.0..1.0).contains(&f);
    if !ok_factor(t.tile_overlap_factor_height) || !ok_factor(t.tile_overlap_factor_width) {
        return Err(VaeError::Input(format!(
            "tiling: overlap factors must be in [0, 1), got height {} width {}",
            t.tile_overlap_factor_height, t.tile_overlap_factor_width
        )));
    }
    if overlap_h == 0 || overlap_w == 0 || lat_h == 0 || lat_w == 0 {
        return Err(VaeError::Input(format!(
            "tiling: tiles of {}x{} pixels are too small for this VAE (need at least one latent pixel of stride)",
            t.tile_sample_min_height, t.tile_sample_min_width
        )));
    }
    Ok(())
}

/// Blends every tile with its upper (`blend_v`) and left (`blend_h`) neighbour, the neighbours
/// already blended (diffusers modifies tiles in place), crops each to `limit_h x limit_w` and
/// concatenates.
fn blend_tiles<B: Backend>(
    mut rows: Vec<Vec<Tensor<B, 5>>>,
    blend_extent_h: usize,
    blend_extent_w: usize,
    limit_h: usize,
    limit_w: usize,
) -> Tensor<B, 5> {
    let mut result_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut result_row = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend(&rows[i - 1][j], tile, blend_extent_h, 3);
            }
            if j > 0 {
                tile = blend(&rows[i][j - 1], tile, blend_extent_w, 4);
            }
            rows[i][j] = tile.clone();
            let [_, _, _, h, w] = tile.dims();
            result_row.push(
                tile.narrow(3, 0, limit_h.min(h))
                    .narrow(4, 0, limit_w.min(w)),
            );
        }
        result_rows.push(Tensor::cat(result_row, 4));
    }
    Tensor::cat(result_rows, 3)
}

/// `blend_v` (dim 3) / `blend_h` (dim 4): the first `e` rows of `b` become
/// `a[-e + y] * (1 - y / e) + b[y] * (y / e)`.
fn blend<B: Backend>(a: &Tensor<B, 5>, b: Tensor<B, 5>, extent: usize, dim: usize) -> Tensor<B, 5> {
    let e = extent.min(a.dims()[dim]).min(b.dims()[dim]);
    if e == 0 {
        return b;
    }
    let device = b.device();
    let mut shape = [1usize; 5];
    shape[dim] = e;
    let w: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let w_b = Tensor::<B, 5>::from_data(TensorData::new(w.clone(), shape), &device);
    let w_a = Tensor::<B, 5>::from_data(
        TensorData::new(
            (0..e)
                .map(|y| (1.0 - y as f64 / e as f64) as f32)
                .collect::<Vec<f32>>(),
            shape,
        ),
        &device,
    );
    let a_len = a.dims()[dim];
    let b_len = b.dims()[dim];
    let a_part = a.clone().narrow(dim, a_len - e, e);
    let head = a_part * w_a + b.clone().narrow(dim, 0, e) * w_b;
    if b_len == e {
        head
    } else {
        Tensor::cat(vec![head, b.narrow(dim, e, b_len - e)], dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_batches_match_diffusers() {
        // 49 frames, batch 8: (0, 9), (9, 17), ..., (41, 49).
        let b = frame_batches(49, 8);
        assert_eq!(b.len(), 6);
        assert_eq!(b[0], (0, 9));
        assert_eq!(b[1], (9, 17));
        assert_eq!(b[5], (41, 49));
        assert_eq!(frame_batches(9, 8), vec![(0, 9)]);
        assert_eq!(frame_batches(1, 8), vec![(0, 1)]);
        // 13 latent frames, batch 2: (0, 3), (3, 5), ..., (11, 13).
        let d = frame_batches(13, 2);
        assert_eq!(d.len(), 6);
        assert_eq!(d[0], (0, 3));
        assert_eq!(d[5], (11, 13));
        assert_eq!(frame_batches(3, 2), vec![(0, 3)]);
        assert_eq!(frame_batches(5, 2), vec![(0, 3), (3, 5)]);
    }
}
