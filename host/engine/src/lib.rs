//! # cogvx-engine
//!
//! Puts the CogVideoX components together:
//!
//! * [`model`]: a diffusers model folder (`model_index.json` and its component folders), checked,
//!   with the [`Variant`] (2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v) derived from the transformer config.
//! * [`pipeline`]: text- and image-to-video sampling as diffusers' `CogVideoXPipeline` and
//!   `CogVideoXImageToVideoPipeline` (one denoising loop: classifier-free guidance, dynamic CFG,
//!   image latents on channels, `ofs`, any scheduler plan through the coefficient executor, VAE
//!   decode); [`image`]: conditioning images and their preprocessing.
//! * [`lora`]: a diffusers LoRA file applied to a loaded transformer at `alpha / r`.
//! * [`sample`]: `.mp4` output of sampled frames and the whole `cogvx sample` job.
//! * [`parity`]: the runner behind `cogvx parity DIR` (every case file against diffusers'
//!   outputs, one row per output).

// `is_multiple_of` needs Rust 1.87; the workspace allows 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod error;
pub mod image;
pub mod lora;
pub mod model;
pub mod parity;
pub mod pipeline;
pub mod sample;

pub use error::EngineError;
pub use image::ConditionImage;
pub use lora::{apply_lora, default_alpha, load_and_apply_lora};
pub use model::{ModelFolder, ModelIndex, Variant};
pub use parity::{all_passed, run_dir, ParityRunner, Row, Status, Table};
pub use pipeline::{
    check_conditioning, check_request, dynamic_guidance_scale, plan_from_plugin, CogVideoXPipeline,
    NoiseSource, PromptSource, SampleRequest, SeededNoise, T2vRequest, I2V_OFS,
};
pub use sample::{check_output, frames_to_u8, sample, video_path, write_videos, SampleJob};
