//! # cogvx-engine
//!
//! Puts the CogVideoX components together:
//!
//! * [`model`]: a diffusers model folder (`model_index.json` and its component folders), checked,
//!   with the [`Variant`] (2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v) derived from the transformer config.
//! * [`pipeline`]: text-to-video sampling as diffusers' `CogVideoXPipeline` (classifier-free
//!   guidance, dynamic CFG, any scheduler plan through the coefficient executor, VAE decode).
//! * [`parity`]: the runner behind `cogvx parity DIR` (every case file against diffusers'
//!   outputs, one row per output).

pub mod error;
pub mod model;
pub mod parity;
pub mod pipeline;

pub use error::EngineError;
pub use model::{ModelFolder, ModelIndex, Variant};
pub use parity::{all_passed, run_dir, ParityRunner, Row, Status, Table};
pub use pipeline::{
    dynamic_guidance_scale, plan_from_plugin, CogVideoXPipeline, NoiseSource, SeededNoise,
    T2vRequest,
};
