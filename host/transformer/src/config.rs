//! `transformer/config.json` of a diffusers CogVideoX folder, mirroring the `__init__` arguments
//! of `CogVideoXTransformer3DModel` (diffusers `models/transformers/cogvideox_transformer_3d.py`)
//! with the same defaults for absent keys.

use serde::{Deserialize, Serialize};

/// The config of `CogVideoXTransformer3DModel`. Unknown keys (`_diffusers_version`, ...) are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    /// `_class_name`; when present it must be `CogVideoXTransformer3DModel`.
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    /// `null` is rejected by [`TransformerConfig::validate`] (diffusers cannot build it either).
    pub out_channels: Option<usize>,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub time_embed_dim: usize,
    /// Only CogVideoX1.5-5B-I2V has an `ofs` embedding.
    pub ofs_embed_dim: Option<usize>,
    pub text_embed_dim: usize,
    pub num_layers: usize,
    pub dropout: f64,
    pub attention_bias: bool,
    pub sample_width: usize,
    pub sample_height: usize,
    /// In pixel frames (`(latent_frames - 1) * temporal_compression_ratio + 1`), see diffusers' docs.
    pub sample_frames: usize,
    pub patch_size: usize,
    /// `Some(2)` for CogVideoX 1.5 (linear patch embedding over `p_t x p x p` patches).
    pub patch_size_t: Option<usize>,
    pub temporal_compression_ratio: usize,
    pub max_text_seq_length: usize,
    pub activation_fn: String,
    pub timestep_activation_fn: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
    pub spatial_interpolation_scale: f64,
    pub temporal_interpolation_scale: f64,
    pub use_rotary_positional_embeddings: bool,
    pub use_learned_positional_embeddings: bool,
    /// Bias of the 1.0 `Conv2d` patch projection (the 1.5 `Linear` always has one, as in diffusers).
    pub patch_bias: bool,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        TransformerConfig {
            class_name: None,
            num_attention_heads: 30,
            attention_head_dim: 64,
            in_channels: 16,
            out_channels: Some(16),
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            time_embed_dim: 512,
            ofs_embed_dim: None,
            text_embed_dim: 4096,
            num_layers: 30,
            dropout: 0.0,
            attention_bias: true,
            sample_width: 90,
            sample_height: 60,
            sample_frames: 49,
            patch_size: 2,
            patch_size_t: None,
            temporal_compression_ratio: 4,
            max_text_seq_length: 226,
            activation_fn: "gelu-approximate".into(),
            timestep_activation_fn: "silu".into(),
            norm_elementwise_affine: true,
            norm_eps: 1e-5,
            spatial_interpolation_scale: 1.875,
            temporal_interpolation_scale: 1.0,
            use_rotary_positional_embeddings: false,
            use_learned_positional_embeddings: false,
            patch_bias: true,
        }
    }
}

/// Activations accepted for `timestep_activation_fn` (diffusers' `get_activation`).
pub const TIMESTEP_ACTIVATIONS: &[&str] = &["silu", "swish", "mish", "gelu", "relu"];
/// Activations accepted for `activation_fn` of the feed-forward.
pub const FF_ACTIVATIONS: &[&str] = &["gelu", "gelu-approximate"];

impl TransformerConfig {
    /// `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// `out_channels` (validated to be present).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Whether the patch embedding adds a sincos table (2B) or a learned one (5B-I2V).
    pub fn uses_positional_table(&self) -> bool {
        !self.use_rotary_positional_embeddings || self.use_learned_positional_embeddings
    }

    /// Checks that the values describe a model this port (and diffusers) can build; the message
    /// names the offending key.
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; the workspace allows 1.85.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.class_name {
            if c != "CogVideoXTransformer3DModel" {
                return Err(format!(
                    "_class_name is `{c}`, expected `CogVideoXTransformer3DModel`"
                ));
            }
        }
        let positive = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("time_embed_dim", self.time_embed_dim),
            ("text_embed_dim", self.text_embed_dim),
            ("patch_size", self.patch_size),
            (
                "temporal_compression_ratio",
                self.temporal_compression_ratio,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("`{key}` must be positive"));
            }
        }
        match self.out_channels {
            None => return Err("`out_channels` is null; set it to the latent channel count".into()),
            Some(0) => return Err("`out_channels` must be positive".into()),
            Some(_) => {}
        }
        if self.patch_size_t == Some(0) {
            return Err("`patch_size_t` must be positive or null".into());
        }
        if self.ofs_embed_dim == Some(0) {
            return Err("`ofs_embed_dim` must be positive or null".into());
        }
        if !FF_ACTIVATIONS.contains(&self.activation_fn.as_str()) {
            return Err(format!(
                "`activation_fn` `{}` is not supported (supported: {})",
                self.activation_fn,
                FF_ACTIVATIONS.join(", ")
            ));
        }
        if !TIMESTEP_ACTIVATIONS.contains(&self.timestep_activation_fn.as_str()) {
            return Err(format!(
                "`timestep_activation_fn` `{}` is not supported (supported: {})",
                self.timestep_activation_fn,
                TIMESTEP_ACTIVATIONS.join(", ")
            ));
        }
        if !self.use_rotary_positional_embeddings && self.use_learned_positional_embeddings {
            // diffusers raises the same error in `__init__`.
            return Err(
                "`use_learned_positional_embeddings` requires `use_rotary_positional_embeddings` \
                        (no CogVideoX checkpoint has learned embeddings without RoPE)"
                    .into(),
            );
        }
        if self.uses_positional_table() && self.inner_dim() % 16 != 0 {
            return Err(format!(
                "the 3D sincos positional embedding needs `num_attention_heads * attention_head_dim` \
                 divisible by 16, got {}",
                self.inner_dim()
            ));
        }
        if self.use_rotary_positional_embeddings && self.attention_head_dim % 16 != 0 {
            return Err(format!(
                "3D RoPE needs `attention_head_dim` divisible by 16, got {}",
                self.attention_head_dim
            ));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return Err(format!(
                "`norm_eps` must be positive, got {}",
                self.norm_eps
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("`dropout` must be in [0, 1), got {}", self.dropout));
        }
        if self.spatial_interpolation_scale == 0.0 || self.temporal_interpolation_scale == 0.0 {
            return Err("interpolation scales must be non-zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_keys_take_diffusers_defaults() {
        let c: TransformerConfig =
            serde_json::from_str(r#"{"num_layers": 3, "_diffusers_version": "0.42.1"}"#).unwrap();
        assert_eq!(c.num_layers, 3);
        assert_eq!(c.num_attention_heads, 30);
        assert_eq!(c.out_channels, Some(16));
        assert_eq!(c.max_text_seq_length, 226);
        assert_eq!(c.patch_size_t, None);
        assert_eq!(c.inner_dim(), 1920);
        c.validate().unwrap();
    }

    #[test]
    fn unsupported_values_are_named() {
        let mut c = TransformerConfig {
            activation_fn: "geglu".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("activation_fn"));
        c.activation_fn = "gelu-approximate".into();
        c.use_learned_positional_embeddings = true;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("use_learned_positional_embeddings"));
        let c = TransformerConfig {
            class_name: Some("UNet2DConditionModel".into()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("_class_name"));
        let c = TransformerConfig {
            out_channels: None,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("out_channels"));
    }
}
