//! `vae/config.json` of a diffusers `AutoencoderKLCogVideoX` folder.

use serde::{Deserialize, Deserializer};
use std::path::Path;

use crate::VaeError;

/// The config of `AutoencoderKLCogVideoX`, with diffusers' defaults for absent keys.
///
/// Field names are the `config.json` keys; `_class_name` / `_diffusers_version` and keys of other
/// diffusers versions are accepted and ignored, as diffusers does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// `_class_name`; must be `AutoencoderKLCogVideoX` when present.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Channels of the input video (3).
    pub in_channels: usize,
    /// Channels of the decoded video (3).
    pub out_channels: usize,
    /// Encoder block types; only `CogVideoXDownBlock3D` exists.
    pub down_block_types: Vec<String>,
    /// Decoder block types; only `CogVideoXUpBlock3D` exists.
    pub up_block_types: Vec<String>,
    /// Output channels of each encoder block (reversed in the decoder).
    pub block_out_channels: Vec<usize>,
    /// Channels of the latent (16 on the hub checkpoints).
    pub latent_channels: usize,
    /// ResNet blocks per encoder block (the decoder has one more).
    pub layers_per_block: usize,
    /// Activation: `silu` / `swish` (the same function).
    pub act_fn: String,
    /// GroupNorm epsilon of the ResNet blocks.
    pub norm_eps: f64,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Time compression of the VAE (4: `log2(4)` blocks compress time).
    pub temporal_compression_ratio: f64,
    /// Height the VAE was trained on; the default tile height is half of it.
    pub sample_height: usize,
    /// Width the VAE was trained on; the default tile width is half of it.
    pub sample_width: usize,
    /// Latents fed to the transformer are `z * scaling_factor`.
    pub scaling_factor: f64,
    /// Unused by CogVideoX (kept for completeness of the config).
    pub shift_factor: Option<f64>,
    /// Unused by CogVideoX.
    pub latents_mean: Option<Vec<f64>>,
    /// Unused by CogVideoX.
    pub latents_std: Option<Vec<f64>>,
    /// Diffusers runs the VAE in float32 when set; we always compute in float32.
    #[serde(deserialize_with = "bool_or_number")]
    pub force_upcast: bool,
    /// Whether `quant_conv` exists (false on all CogVideoX checkpoints).
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists (false on all CogVideoX checkpoints).
    pub use_post_quant_conv: bool,
    /// CogVideoX 1.5: the I2V pipeline divides image latents by `scaling_factor` instead of
    /// multiplying (see [`crate::AutoencoderKLCogVideoX::scale_image_latents`]).
    pub invert_scale_latents: bool,
}

fn bool_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrNum {
        B(bool),
        N(f64),
    }
    Ok(match BoolOrNum::deserialize(d)? {
        BoolOrNum::B(b) => b,
        BoolOrNum::N(n) => n != 0.0,
    })
}

impl Default for VaeConfig {
    /// Diffusers' `AutoencoderKLCogVideoX.__init__` defaults (CogVideoX-2b).
    fn default() -> Self {
        VaeConfig {
            class_name: None,
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["CogVideoXDownBlock3D".into(); 4],
            up_block_types: vec!["CogVideoXUpBlock3D".into(); 4],
            block_out_channels: vec![128, 256, 256, 512],
            latent_channels: 16,
            layers_per_block: 3,
            act_fn: "silu".into(),
            norm_eps: 1e-6,
            norm_num_groups: 32,
            temporal_compression_ratio: 4.0,
            sample_height: 480,
            sample_width: 720,
            scaling_factor: 1.15258426,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: false,
            use_post_quant_conv: false,
            invert_scale_latents: false,
        }
    }
}

impl VaeConfig {
    /// Reads and validates `path` (a `vae/config.json`).
    pub fn from_file(path: &Path) -> Result<Self, VaeError> {
        let config: VaeConfig = cogvx_model_core::config::read_config(path)?;
        config.validate().map_err(|message| VaeError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// `log2(temporal_compression_ratio)`: how many blocks (from the top) compress time.
    pub fn temporal_compress_level(&self) -> usize {
        // diffusers: int(np.log2(temporal_compression_ratio))
        self.temporal_compression_ratio.log2().floor().max(0.0) as usize
    }

    /// Spatial downscale of the VAE: `2^(len(block_out_channels) - 1)`.
    pub fn spatial_scale(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// Checks the values diffusers would reject (or that would make the model unbuildable).
    /// The message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.class_name {
            if c != "AutoencoderKLCogVideoX" {
                return Err(format!(
                    "_class_name is `{c}`, expected `AutoencoderKLCogVideoX`"
                ));
            }
        }
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels must not be empty".into());
        }
        if self.down_block_types.len() != self.block_out_channels.len() {
            return Err(format!(
                "down_block_types has {} entries but block_out_channels has {}",
                self.down_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        if self.up_block_types.len() != self.block_out_channels.len() {
            return Err(format!(
                "up_block_types has {} entries but block_out_channels has {}",
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "CogVideoXDownBlock3D")
        {
            return Err(format!(
                "down_block_types: unknown block `{t}` (only `CogVideoXDownBlock3D` exists)"
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "CogVideoXUpBlock3D")
        {
            return Err(format!(
                "up_block_types: unknown block `{t}` (only `CogVideoXUpBlock3D` exists)"
            ));
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(format!(
                "act_fn: `{}` is not supported (CogVideoX uses `silu`)",
                self.act_fn
            ));
        }
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err("norm_num_groups must be positive".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c == 0 || **c % groups != 0)
        {
            return Err(format!(
                "block_out_channels: {c} is not divisible by norm_num_groups = {groups}"
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err("in_channels, out_channels and latent_channels must be positive".into());
        }
        if self.temporal_compression_ratio.is_nan()
            || self.temporal_compression_ratio < 1.0
            || !self.temporal_compression_ratio.is_finite()
        {
            return Err(format!(
                "temporal_compression_ratio must be >= 1, got {}",
                self.temporal_compression_ratio
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(format!(
                "scaling_factor must be a non-zero number, got {}",
                self.scaling_factor
            ));
        }
        if (self.use_quant_conv || self.use_post_quant_conv)
            && self.out_channels != self.latent_channels
        {
            // diffusers builds quant_conv with 2*out_channels and post_quant_conv with out_channels
            // channels; such a model cannot run in diffusers either.
            return Err(format!(
                "use_quant_conv/use_post_quant_conv need out_channels ({}) == latent_channels ({}) (diffusers sizes them by out_channels)",
                self.out_channels, self.latent_channels
            ));
        }
        Ok(())
    }
}
