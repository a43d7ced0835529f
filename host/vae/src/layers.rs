//! The building blocks of `AutoencoderKLCogVideoX`, one struct per diffusers module with the same
//! parameter names (`conv1.conv.weight`, `norm1.norm_layer.weight`, `downsamplers.0.conv.bias`...).
//!
//! Causal convolutions keep a `conv_cache` between frame batches exactly like diffusers: the last
//! `kernel_t - 1` frames of the (padded) input of every causal conv are handed to the next call.
//! Caches are plain structs mirroring diffusers' nested dicts (see [`ResnetCache`]).
//! Module fields are named as the checkpoint keys (and diffusers' attributes).

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::module::{conv2d, conv3d};
use burn::tensor::ops::{ConvOptions, PadMode};
use burn::tensor::{backend::Backend, Tensor};
use cogvx_model_core::nn::GroupNorm;
use cogvx_model_core::weights::VarBuilder;
use cogvx_model_core::LoadError;

use std::sync::atomic::{AtomicU8, Ordering};

use crate::ops::{
    avg_pool_time2, batch_to_frames, frames_to_batch, interpolate_nearest, repeat_interleave2,
};

/// How the VAE's stride-1 3D convolutions are computed (same result, different speed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv3dAlgo {
    /// [`Conv3dAlgo::Gemm`] on burn's ndarray backend (whose direct convolution is slow),
    /// the backend's own `conv3d` elsewhere. The default.
    Auto,
    /// burn's `conv3d`.
    Native,
    /// im2col over height and width and one GEMM per frame chunk (the backend's matmul; needs
    /// a `kh * kw`-times input-sized buffer, bounded by splitting frames).
    Gemm,
}

static CONV3D_ALGO: AtomicU8 = AtomicU8::new(0);

/// Selects the convolution algorithm for all VAEs of this process.
pub fn set_conv3d_algo(algo: Conv3dAlgo) {
    let v = match algo {
        Conv3dAlgo::Auto => 0,
        Conv3dAlgo::Native => 1,
        Conv3dAlgo::Gemm => 2,
    };
    CONV3D_ALGO.store(v, Ordering::Relaxed);
}

/// The algorithm selected with [`set_conv3d_algo`].
pub fn conv3d_algo() -> Conv3dAlgo {
    match CONV3D_ALGO.load(Ordering::Relaxed) {
        1 => Conv3dAlgo::Native,
        2 => Conv3dAlgo::Gemm,
        _ => Conv3dAlgo::Auto,
    }
}

/// Stride-1 3D convolution of `x [B, C, T, H, W]` with `weight [O, C, kt, kh, kw]`, no time
/// padding and zero padding `pad_hw` on height and width (PyTorch `nn.Conv3d` semantics).
pub fn conv3d_s1<B: Backend>(
    x: Tensor<B, 5>,
    weight: Tensor<B, 5>,
    bias: Tensor<B, 1>,
    pad_hw: usize,
) -> Tensor<B, 5> {
    let gemm = match conv3d_algo() {
        Conv3dAlgo::Native => false,
        Conv3dAlgo::Gemm => true,
        Conv3dAlgo::Auto => B::name(&x.device()).contains("ndarray"),
    };
    if !gemm {
        let p = pad_hw;
        return conv3d(
            x,
            weight,
            Some(bias),
            ConvOptions::new([1, 1, 1], [0, p, p], [1, 1, 1], 1),
        );
    }
    let x = if pad_hw > 0 {
        x.pad([(pad_hw, pad_hw), (pad_hw, pad_hw)], PadMode::Constant(0.0))
    } else {
        x
    };
    gemm_conv3d_chunked(x, weight, bias, GEMM_CONV_MAX_ELEMENTS)
}

/// [`gemm_conv3d`] on frame chunks small enough that the im2col buffer and the GEMM output stay
/// under `max_elements` (each chunk repeats the `kt - 1` frames it shares with the next).
fn gemm_conv3d_chunked<B: Backend>(
    x: Tensor<B, 5>,
    weight: Tensor<B, 5>,
    bias: Tensor<B, 1>,
    max_elements: usize,
) -> Tensor<B, 5> {
    let [b, c, t, hp, wp] = x.dims();
    let [o, _, kt, kh, kw] = weight.dims();
    let per_frame = b * (hp + 1 - kh) * (wp + 1 - kw) * (kh * kw * c).max(kt * o);
    let frames_per_chunk = (max_elements / per_frame.max(1)).max(kt);
    if t <= frames_per_chunk {
        return gemm_conv3d(x, weight, bias);
    }
    let to = t + 1 - kt;
    let to_chunk = frames_per_chunk + 1 - kt;
    let mut outs = Vec::new();
    let mut start = 0;
    while start < to {
        let n = to_chunk.min(to - start);
        outs.push(gemm_conv3d(
            x.clone().narrow(2, start, n + kt - 1),
            weight.clone(),
            bias.clone(),
        ));
        start += n;
    }
    Tensor::cat(outs, 2)
}

/// Largest im2col buffer (elements) of the GEMM convolution before it splits the frames.
const GEMM_CONV_MAX_ELEMENTS: usize = 1 << 27;

/// Valid (unpadded) stride-1 3D convolution as one GEMM: the `kh * kw` shifted copies of the
/// input are stacked on channels (im2col over height and width), multiplied by the weight
/// arranged `[kt * O, kh * kw * C]`, and time tap `k` is read back at frames `k..k + To`.
fn gemm_conv3d<B: Backend>(
    x: Tensor<B, 5>,
    weight: Tensor<B, 5>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 5> {
    let [b, c, t, hp, wp] = x.dims();
    let [o, _, kt, kh, kw] = weight.dims();
    let (to, ho, wo) = (t + 1 - kt, hp + 1 - kh, wp + 1 - kw);
    let hw = ho * wo;
    // [B, kh*kw*C, T*Ho*Wo], offsets (i, j) outer, channels inner.
    let cols: Tensor<B, 3> = if kh == 1 && kw == 1 {
        x.reshape([b, c, t * hw])
    } else {
        let mut shifted = Vec::with_capacity(kh * kw);
        for i in 0..kh {
            for j in 0..kw {
                shifted.push(
                    x.clone()
                        .slice([0..b, 0..c, 0..t, i..i + ho, j..j + wo])
                        .reshape([b, c, t * hw]),
                );
            }
        }
        Tensor::cat(shifted, 1)
    };
    // [O, C, kt, kh, kw] -> [kt, O, kh, kw, C] -> [1, kt*O, kh*kw*C]
    let w: Tensor<B, 3> = weight
        .permute([2, 0, 3, 4, 1])
        .reshape([1, kt * o, kh * kw * c]);
    // [B, kt*O, T*Ho*Wo] -> [B, kt, O, T, Ho*Wo]
    let taps: Tensor<B, 5> = w.matmul(cols).reshape([b, kt, o, t, hw]);
    let mut out: Tensor<B, 4> = bias.reshape([1, o, 1, 1]).expand([b, o, to, hw]);
    for k in 0..kt {
        let tap: Tensor<B, 4> = taps
            .clone()
            .slice([0..b, k..k + 1, 0..o, k..k + to, 0..hw])
            .reshape([b, o, to, hw]);
        out = out + tap;
    }
    out.reshape([b, o, to, ho, wo])
}

/// `CogVideoXSafeConv3d`: a `nn.Conv3d` (stride 1, zero spatial padding `padding_hw`, no time
/// padding) that splits inputs above 2 GiB (counted as 2 bytes a value, as diffusers does) into
/// time chunks overlapping by `kernel_t - 1` frames. The result equals one big convolution.
#[derive(Module, Debug)]
pub struct SafeConv3d<B: Backend> {
    pub weight: Param<Tensor<B, 5>>,
    pub bias: Param<Tensor<B, 1>>,
    pub kernel_size: usize,
    pub padding_hw: usize,
}

impl<B: Backend> SafeConv3d<B> {
    /// Loads `weight [out, in, k, k, k]` and `bias [out]` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        padding_hw: usize,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let k = kernel_size;
        Ok(SafeConv3d {
            weight: Param::from_tensor(vb.tensor(
                "weight",
                [out_channels, in_channels, k, k, k],
                device,
            )?),
            bias: Param::from_tensor(vb.tensor("bias", [out_channels], device)?),
            kernel_size,
            padding_hw,
        })
    }

    fn conv(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        conv3d_s1(x, self.weight.val(), self.bias.val(), self.padding_hw)
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(&self, input: Tensor<B, 5>) -> Tensor<B, 5> {
        let dims = input.dims();
        let numel: usize = dims.iter().product();
        let memory_count = numel as f64 * 2.0 / 1024f64.powi(3);
        if memory_count <= 2.0 {
            return self.conv(input);
        }
        // torch.chunk(input, part_num, dim=2): chunks of ceil(T / part_num) frames.
        let part_num = (memory_count / 2.0) as usize + 1;
        let t = dims[2];
        let size = t.div_ceil(part_num).max(1);
        let k = self.kernel_size;
        let mut outputs = Vec::new();
        let mut start = 0;
        while start < t {
            let len = size.min(t - start);
            // Chunks after the first are prefixed with the last k-1 frames of the previous chunk.
            let overlap = if start == 0 || k <= 1 {
                0
            } else {
                (k - 1).min(size)
            };
            outputs.push(self.conv(input.clone().narrow(2, start - overlap, len + overlap)));
            start += len;
        }
        Tensor::cat(outputs, 2)
    }
}

/// `CogVideoXCausalConv3d` (`pad_mode="first"`, the only mode CogVideoX uses): time is padded on
/// the front with `kernel_t - 1` copies of the first frame on the first call, and with the cached
/// frames of the previous call afterwards; height/width are zero-padded by `(k - 1) / 2`.
#[derive(Module, Debug)]
pub struct CausalConv3d<B: Backend> {
    pub conv: SafeConv3d<B>,
    pub time_kernel_size: usize,
}

impl<B: Backend> CausalConv3d<B> {
    /// Loads `conv.weight` / `conv.bias` under `vb` (cubic kernel `kernel_size`, stride 1).
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let pad = (kernel_size - 1) / 2;
        let conv = SafeConv3d::load(
            &vb.pp("conv"),
            in_channels,
            out_channels,
            kernel_size,
            pad,
            device,
        )?;
        Ok(CausalConv3d {
            conv,
            time_kernel_size: kernel_size,
        })
    }

    /// Convolves `x [B, C, T, H, W]`; `conv_cache` is read (the previous call's frames, `None` on
    /// the first chunk) and replaced with this call's last `kernel_t - 1` padded input frames.
    pub fn forward(&self, x: Tensor<B, 5>, conv_cache: &mut Option<Tensor<B, 5>>) -> Tensor<B, 5> {
        let k = self.time_kernel_size;
        if k <= 1 {
            // diffusers caches the whole input here but never reads it back for kernel 1.
            return self.conv.forward(x);
        }
        let front = match conv_cache.take() {
            Some(cached) => cached,
            None => x.clone().narrow(2, 0, 1).repeat_dim(2, k - 1),
        };
        let x = Tensor::cat(vec![front, x], 2);
        let t = x.dims()[2];
        *conv_cache = Some(x.clone().narrow(2, t - (k - 1), k - 1));
        self.conv.forward(x)
    }
}

/// A frame-wise `nn.Conv2d` (the convolution of the up/down samplers).
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
    pub stride: usize,
    pub padding: usize,
}

impl<B: Backend> Conv2d<B> {
    /// Loads `weight [out, in, k, k]` and `bias [out]` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        stride: usize,
        padding: usize,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let k = kernel_size;
        Ok(Conv2d {
            weight: Param::from_tensor(vb.tensor(
                "weight",
                [out_channels, in_channels, k, k],
                device,
            )?),
            bias: Param::from_tensor(vb.tensor("bias", [out_channels], device)?),
            stride,
            padding,
        })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (s, p) = (self.stride, self.padding);
        conv2d(
            x,
            self.weight.val(),
            Some(self.bias.val()),
            ConvOptions::new([s, s], [p, p], [1, 1], 1),
        )
    }

    /// Applies the convolution to every frame of `x [B, C, T, H, W]`.
    pub fn forward_frames(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        if self.stride == 1 {
            // A 1 x k x k 3D convolution is the frame-wise 2D one.
            let w: Tensor<B, 5> = self.weight.val().unsqueeze_dim(2);
            return conv3d_s1(x, w, self.bias.val(), self.padding);
        }
        let b = x.dims()[0];
        batch_to_frames(self.forward(frames_to_batch(x)), b)
    }
}

/// `CogVideoXSpatialNorm3D`: `GroupNorm(f) * conv_y(zq) + conv_b(zq)` with `zq` resized (nearest)
/// to `f`; for an odd frame count above 1 the first frame of `zq` is resized on its own.
#[derive(Module, Debug)]
pub struct SpatialNorm3D<B: Backend> {
    pub norm_layer: GroupNorm<B>,
    pub conv_y: CausalConv3d<B>,
    pub conv_b: CausalConv3d<B>,
}

impl<B: Backend> SpatialNorm3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(
        vb: &VarBuilder,
        f_channels: usize,
        zq_channels: usize,
        groups: usize,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        Ok(SpatialNorm3D {
            norm_layer: GroupNorm::load(&vb.pp("norm_layer"), groups, f_channels, 1e-6, device)?,
            conv_y: CausalConv3d::load(&vb.pp("conv_y"), zq_channels, f_channels, 1, device)?,
            conv_b: CausalConv3d::load(&vb.pp("conv_b"), zq_channels, f_channels, 1, device)?,
        })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(&self, f: Tensor<B, 5>, zq: &Tensor<B, 5>) -> Tensor<B, 5> {
        let [_, _, t, h, w] = f.dims();
        let zt = zq.dims()[2];
        let zq = if t > 1 && t % 2 == 1 && zt > 1 {
            let z_first = interpolate_nearest(zq.clone().narrow(2, 0, 1), [1, h, w]);
            let z_rest = interpolate_nearest(zq.clone().narrow(2, 1, zt - 1), [t - 1, h, w]);
            Tensor::cat(vec![z_first, z_rest], 2)
        } else {
            interpolate_nearest(zq.clone(), [t, h, w])
        };
        // Kernel-1 convolutions: their conv cache is never read.
        let conv_y = self.conv_y.forward(zq.clone(), &mut None);
        let conv_b = self.conv_b.forward(zq, &mut None);
        self.norm_layer.forward(f) * conv_y + conv_b
    }
}

/// The norm of a ResNet block: GroupNorm in the encoder, SpatialNorm3D (conditioned on the
/// latent) in the decoder.
#[derive(Module, Debug)]
// A module field: burn's Module derive needs the layers inline, and there are few blocks.
#[allow(clippy::large_enum_variant)]
pub enum ResnetNorm<B: Backend> {
    /// `nn.GroupNorm` (encoder).
    Group(GroupNorm<B>),
    /// `CogVideoXSpatialNorm3D` (decoder).
    Spatial(SpatialNorm3D<B>),
}

impl<B: Backend> ResnetNorm<B> {
    fn forward(&self, x: Tensor<B, 5>, zq: Option<&Tensor<B, 5>>) -> Tensor<B, 5> {
        match (self, zq) {
            (ResnetNorm::Spatial(n), Some(zq)) => n.forward(x, zq),
            (ResnetNorm::Group(n), _) => n.forward(x),
            // diffusers only calls a spatial norm with zq; without it the block would crash there.
            (ResnetNorm::Spatial(n), None) => n.norm_layer.forward(x),
        }
    }
}

/// Conv caches of one [`ResnetBlock3D`] (diffusers' `{"conv1": .., "conv2": ..}`).
#[derive(Debug, Clone)]
pub struct ResnetCache<B: Backend> {
    /// Cached input frames of `conv1`.
    pub conv1: Option<Tensor<B, 5>>,
    /// Cached input frames of `conv2`.
    pub conv2: Option<Tensor<B, 5>>,
}

impl<B: Backend> Default for ResnetCache<B> {
    fn default() -> Self {
        ResnetCache {
            conv1: None,
            conv2: None,
        }
    }
}

/// `CogVideoXResnetBlock3D` without time embedding (`temb_channels=0` in the VAE); the shortcut
/// is a 1x1x1 `CogVideoXSafeConv3d` when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock3D<B: Backend> {
    pub norm1: ResnetNorm<B>,
    pub conv1: CausalConv3d<B>,
    pub norm2: ResnetNorm<B>,
    pub conv2: CausalConv3d<B>,
    pub conv_shortcut: Option<SafeConv3d<B>>,
}

impl<B: Backend> ResnetBlock3D<B> {
    /// `spatial_norm_dim`: `Some(latent_channels)` in the decoder (SpatialNorm3D norms).
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
        eps: f64,
        spatial_norm_dim: Option<usize>,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let norm = |name: &str, ch: usize| -> Result<ResnetNorm<B>, LoadError> {
            Ok(match spatial_norm_dim {
                None => ResnetNorm::Group(GroupNorm::load(&vb.pp(name), groups, ch, eps, device)?),
                Some(zq) => {
                    ResnetNorm::Spatial(SpatialNorm3D::load(&vb.pp(name), ch, zq, groups, device)?)
                }
            })
        };
        Ok(ResnetBlock3D {
            norm1: norm("norm1", in_channels)?,
            conv1: CausalConv3d::load(&vb.pp("conv1"), in_channels, out_channels, 3, device)?,
            norm2: norm("norm2", out_channels)?,
            conv2: CausalConv3d::load(&vb.pp("conv2"), out_channels, out_channels, 3, device)?,
            conv_shortcut: if in_channels != out_channels {
                Some(SafeConv3d::load(
                    &vb.pp("conv_shortcut"),
                    in_channels,
                    out_channels,
                    1,
                    0,
                    device,
                )?)
            } else {
                None
            },
        })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(
        &self,
        inputs: Tensor<B, 5>,
        zq: Option<&Tensor<B, 5>>,
        cache: &mut ResnetCache<B>,
    ) -> Tensor<B, 5> {
        let h = self.norm1.forward(inputs.clone(), zq);
        let h = self.conv1.forward(silu(h), &mut cache.conv1);
        let h = self.norm2.forward(h, zq);
        // Dropout is the identity at inference.
        let h = self.conv2.forward(silu(h), &mut cache.conv2);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(inputs),
            None => inputs,
        };
        h + shortcut
    }
}

/// `CogVideoXDownsample3D`: optional time compression (first frame kept, the rest averaged in
/// pairs), then a frame-wise 3x3 stride-2 Conv2d after padding right/bottom by one.
#[derive(Module, Debug)]
pub struct Downsample3D<B: Backend> {
    pub conv: Conv2d<B>,
    pub compress_time: bool,
}

impl<B: Backend> Downsample3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        compress_time: bool,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        Ok(Downsample3D {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, 0, device)?,
            compress_time,
        })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let mut x = x;
        if self.compress_time {
            let t = x.dims()[2];
            x = if t % 2 == 1 {
                let first = x.clone().narrow(2, 0, 1);
                if t > 1 {
                    let rest = avg_pool_time2(x.narrow(2, 1, t - 1));
                    Tensor::cat(vec![first, rest], 2)
                } else {
                    first
                }
            } else {
                avg_pool_time2(x)
            };
        }
        let x = x.pad((0, 1, 0, 1), PadMode::Constant(0.0));
        self.conv.forward_frames(x)
    }
}

/// `CogVideoXUpsample3D`: nearest 2x upsampling (also in time when `compress_time`, except the
/// first frame of an odd count), then a frame-wise 3x3 Conv2d.
#[derive(Module, Debug)]
pub struct Upsample3D<B: Backend> {
    pub conv: Conv2d<B>,
    pub compress_time: bool,
}

impl<B: Backend> Upsample3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        compress_time: bool,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        Ok(Upsample3D {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1, device)?,
            compress_time,
        })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(&self, inputs: Tensor<B, 5>) -> Tensor<B, 5> {
        let t = inputs.dims()[2];
        let up_hw = |x: Tensor<B, 5>| repeat_interleave2(repeat_interleave2(x, 3), 4);
        let x = if self.compress_time && t > 1 && t % 2 == 1 {
            let first = up_hw(inputs.clone().narrow(2, 0, 1));
            let rest = repeat_interleave2(up_hw(inputs.narrow(2, 1, t - 1)), 2);
            Tensor::cat(vec![first, rest], 2)
        } else if self.compress_time && t > 1 {
            repeat_interleave2(up_hw(inputs), 2)
        } else {
            up_hw(inputs)
        };
        self.conv.forward_frames(x)
    }
}

/// The constructor arguments of `CogVideoXDownBlock3D` that shape its weights, under diffusers'
/// keyword names.
#[derive(Clone, Copy, Debug)]
pub struct DownBlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub add_downsample: bool,
    pub compress_time: bool,
}

/// The constructor arguments of `CogVideoXUpBlock3D` that shape its weights, under diffusers'
/// keyword names.
#[derive(Clone, Copy, Debug)]
pub struct UpBlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    /// The latent channels the blocks' `SpatialNorm3D` is conditioned on.
    pub spatial_norm_dim: usize,
    pub add_upsample: bool,
    pub compress_time: bool,
}

/// `CogVideoXDownBlock3D` (also used for the encoder's blocks without a downsampler).
#[derive(Module, Debug)]
pub struct DownBlock3D<B: Backend> {
    pub resnets: Vec<ResnetBlock3D<B>>,
    pub downsamplers: Vec<Downsample3D<B>>,
}

impl<B: Backend> DownBlock3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(
        vb: &VarBuilder,
        c: &DownBlockConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let DownBlockConfig {
            in_channels,
            out_channels,
            num_layers,
            resnet_eps: eps,
            resnet_groups: groups,
            add_downsample,
            compress_time,
        } = *c;
        let resnets = (0..num_layers)
            .map(|i| {
                let ic = if i == 0 { in_channels } else { out_channels };
                ResnetBlock3D::load(
                    &vb.pp("resnets").pp(i),
                    ic,
                    out_channels,
                    groups,
                    eps,
                    None,
                    device,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let downsamplers = if add_downsample {
            vec![Downsample3D::load(
                &vb.pp("downsamplers").pp(0),
                out_channels,
                compress_time,
                device,
            )?]
        } else {
            vec![]
        };
        Ok(DownBlock3D {
            resnets,
            downsamplers,
        })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(&self, x: Tensor<B, 5>, cache: &mut Vec<ResnetCache<B>>) -> Tensor<B, 5> {
        cache.resize_with(self.resnets.len(), ResnetCache::default);
        let mut h = x;
        for (resnet, c) in self.resnets.iter().zip(cache.iter_mut()) {
            h = resnet.forward(h, None, c);
        }
        for down in &self.downsamplers {
            h = down.forward(h);
        }
        h
    }
}

/// `CogVideoXMidBlock3D`: ResNet blocks at the lowest resolution (spatial norms in the decoder).
#[derive(Module, Debug)]
pub struct MidBlock3D<B: Backend> {
    pub resnets: Vec<ResnetBlock3D<B>>,
}

impl<B: Backend> MidBlock3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        num_layers: usize,
        eps: f64,
        groups: usize,
        spatial_norm_dim: Option<usize>,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let resnets = (0..num_layers)
            .map(|i| {
                ResnetBlock3D::load(
                    &vb.pp("resnets").pp(i),
                    channels,
                    channels,
                    groups,
                    eps,
                    spatial_norm_dim,
                    device,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MidBlock3D { resnets })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(
        &self,
        x: Tensor<B, 5>,
        zq: Option<&Tensor<B, 5>>,
        cache: &mut Vec<ResnetCache<B>>,
    ) -> Tensor<B, 5> {
        cache.resize_with(self.resnets.len(), ResnetCache::default);
        let mut h = x;
        for (resnet, c) in self.resnets.iter().zip(cache.iter_mut()) {
            h = resnet.forward(h, zq, c);
        }
        h
    }
}

/// `CogVideoXUpBlock3D`: ResNet blocks with spatial norms, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpBlock3D<B: Backend> {
    pub resnets: Vec<ResnetBlock3D<B>>,
    pub upsamplers: Vec<Upsample3D<B>>,
}

impl<B: Backend> UpBlock3D<B> {
    /// Builds the module from the checkpoint tensors under `vb`.
    pub fn load(vb: &VarBuilder, c: &UpBlockConfig, device: &B::Device) -> Result<Self, LoadError> {
        let UpBlockConfig {
            in_channels,
            out_channels,
            num_layers,
            resnet_eps: eps,
            resnet_groups: groups,
            spatial_norm_dim,
            add_upsample,
            compress_time,
        } = *c;
        let resnets = (0..num_layers)
            .map(|i| {
                let ic = if i == 0 { in_channels } else { out_channels };
                ResnetBlock3D::load(
                    &vb.pp("resnets").pp(i),
                    ic,
                    out_channels,
                    groups,
                    eps,
                    Some(spatial_norm_dim),
                    device,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let upsamplers = if add_upsample {
            vec![Upsample3D::load(
                &vb.pp("upsamplers").pp(0),
                out_channels,
                compress_time,
                device,
            )?]
        } else {
            vec![]
        };
        Ok(UpBlock3D {
            resnets,
            upsamplers,
        })
    }

    /// Forward pass (`[B, C, T, H, W]` in and out), as the diffusers module.
    pub fn forward(
        &self,
        x: Tensor<B, 5>,
        zq: &Tensor<B, 5>,
        cache: &mut Vec<ResnetCache<B>>,
    ) -> Tensor<B, 5> {
        cache.resize_with(self.resnets.len(), ResnetCache::default);
        let mut h = x;
        for (resnet, c) in self.resnets.iter().zip(cache.iter_mut()) {
            h = resnet.forward(h, Some(zq), c);
        }
        for up in &self.upsamplers {
            h = up.forward(h);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use cogvx_model_core::{CpuBackend as Cb, CpuDevice};

    fn max_abs_diff(a: Tensor<Cb, 5>, b: Tensor<Cb, 5>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn gemm_equals_native_conv3d() {
        let dev = CpuDevice::default();
        for (kt, kh, kw, pad) in [(3, 3, 3, 1), (1, 1, 1, 0), (1, 3, 3, 1), (2, 3, 1, 0)] {
            let x = Tensor::<Cb, 5>::random([2, 3, 5, 6, 7], Distribution::Normal(0.0, 1.0), &dev);
            let w =
                Tensor::<Cb, 5>::random([4, 3, kt, kh, kw], Distribution::Normal(0.0, 1.0), &dev);
            let b = Tensor::<Cb, 1>::random([4], Distribution::Normal(0.0, 1.0), &dev);
            let native = conv3d(
                x.clone(),
                w.clone(),
                Some(b.clone()),
                ConvOptions::new([1, 1, 1], [0, pad, pad], [1, 1, 1], 1),
            );
            set_conv3d_algo(Conv3dAlgo::Gemm);
            let mm = conv3d_s1(x.clone(), w.clone(), b.clone(), pad);
            set_conv3d_algo(Conv3dAlgo::Auto);
            assert!(
                max_abs_diff(native.clone(), mm) < 1e-4,
                "kernel {kt}x{kh}x{kw}"
            );
            // Frame chunks (down to one output frame each) give the same result.
            let xp = x.pad([(pad, pad), (pad, pad)], PadMode::Constant(0.0));
            for limit in [1, 200, 2000] {
                let chunked = gemm_conv3d_chunked(xp.clone(), w.clone(), b.clone(), limit);
                assert!(
                    max_abs_diff(native.clone(), chunked) < 1e-4,
                    "kernel {kt}x{kh}x{kw}, limit {limit}"
                );
            }
        }
    }

    #[test]
    fn causal_conv_cache_equals_one_pass() {
        // Running frames in chunks with the cache gives the same frames as one causal pass.
        let dev = CpuDevice::default();
        let conv = CausalConv3d::<Cb> {
            conv: SafeConv3d {
                weight: Param::from_tensor(Tensor::random(
                    [2, 3, 3, 3, 3],
                    Distribution::Normal(0.0, 1.0),
                    &dev,
                )),
                bias: Param::from_tensor(Tensor::random([2], Distribution::Normal(0.0, 1.0), &dev)),
                kernel_size: 3,
                padding_hw: 1,
            },
            time_kernel_size: 3,
        };
        let x = Tensor::<Cb, 5>::random([1, 3, 7, 4, 5], Distribution::Normal(0.0, 1.0), &dev);
        let whole = conv.forward(x.clone(), &mut None);
        assert_eq!(whole.dims(), [1, 2, 7, 4, 5]);
        // The first output frame sees the first frame replicated.
        let mut cache = None;
        let a = conv.forward(x.clone().narrow(2, 0, 3), &mut cache);
        assert_eq!(cache.as_ref().unwrap().dims(), [1, 3, 2, 4, 5]);
        let b = conv.forward(x.clone().narrow(2, 3, 2), &mut cache);
        let c = conv.forward(x.narrow(2, 5, 2), &mut cache);
        assert!(max_abs_diff(whole, Tensor::cat(vec![a, b, c], 2)) < 1e-5);
    }
}
