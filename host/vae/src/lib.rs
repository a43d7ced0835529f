//! `AutoencoderKLCogVideoX` in burn: the 3D causal VAE of CogVideoX, a module-by-module port of
//! diffusers' `autoencoder_kl_cogvideox.py` (with `CogVideoXDownsample3D` / `CogVideoXUpsample3D`),
//! loading a diffusers `vae/` folder by checkpoint names.
//!
//! * [`AutoencoderKLCogVideoX::encode`]: video `[B, 3, T, H, W]` in [-1, 1] to [`DiagonalGaussianDistribution`]
//!   (unscaled mean / clamped logvar), with diffusers' frame batching (8 frames, the first batch
//!   takes the remainder) and causal-conv caching across batches.
//! * [`AutoencoderKLCogVideoX::decode`]: unscaled latents to video (2 latent frames a batch).
//! * Tiling ([`Tiling`], in [`VaeOptions`]) exactly as diffusers' `enable_tiling`.
//! * [`AutoencoderKLCogVideoX::scale_latents`] / [`AutoencoderKLCogVideoX::unscale_latents`] /
//!   [`AutoencoderKLCogVideoX::scale_image_latents`]: where `scaling_factor` and
//!   `invert_scale_latents` apply.
//! * [`run_case`]: the `vae_encode` / `vae_decode` parity cases.

pub mod case;
pub mod config;
pub mod layers;
pub mod model;
pub mod ops;

pub use case::{run_case, tiling_from_params};
pub use config::VaeConfig;
pub use layers::{conv3d_algo, set_conv3d_algo, Conv3dAlgo};
pub use model::{
    frame_batches, AutoencoderKLCogVideoX, CogVideoXDecoder3D, CogVideoXEncoder3D, DecoderCache,
    DiagonalGaussianDistribution, EncoderCache, Tiling, VaeOptions,
};

use cogvx_model_core::LoadError;
use std::path::PathBuf;

/// What can go wrong loading or running the VAE.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// The folder, its config or its weights could not be loaded (the message names the file/key).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `config.json` has a value this model does not support.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// An input tensor or option is unusable (wrong shape, bad tiling...).
    #[error("{0}")]
    Input(String),
}
