//! `CogVideoXTransformer3DModel` in burn: a port of diffusers
//! `models/transformers/cogvideox_transformer_3d.py` for every CogVideoX variant (2B, 5B, 5B-I2V,
//! 1.5-5B, 1.5-5B-I2V), loading diffusers `transformer/` folders by checkpoint name.
//!
//! * [`CogVideoXTransformer3DModel::from_dir`] loads a folder; [`CogVideoXTransformer3DModel::forward`]
//!   runs it.
//! * [`rotary_tables`] computes the 3D RoPE tables exactly as the diffusers pipelines do, for the
//!   pipeline, the trainer and the parity runner alike.
//! * [`run_case`] runs a `transformer` parity case of `shared/reference/cases`.
//!
//! All attention goes through [`cogvx_model_core::attention::attention`].

pub mod attention;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod model;
pub mod normalization;
pub mod random;

pub use config::TransformerConfig;
pub use embeddings::{rotary_tables, rotary_tables_host, RotaryEmb};
pub use error::TransformerError;
pub use model::{BlockTape, CogVideoXBlock, CogVideoXTransformer3DModel};

use cogvx_model_core::case::{Case, HostTensor};
use cogvx_model_core::ModelBackend;
use std::collections::BTreeMap;

/// The case components this crate runs.
pub const COMPONENTS: &[&str] = &["transformer"];

/// Runs a `transformer` case: loads `<model>/transformer`, computes the RoPE tables itself (the
/// case's `rotary_cos/sin` are not used) and returns `{"sample": ...}`.
pub fn run_case<B: ModelBackend>(
    case: &Case,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, TransformerError> {
    run_case_in::<B>(case, burn::tensor::FloatDType::F32, device)
}

/// [`run_case`] with the weights loaded and the model computing in `dtype` (mixed precision);
/// the output is f32.
pub fn run_case_in<B: ModelBackend>(
    case: &Case,
    dtype: burn::tensor::FloatDType,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, TransformerError> {
    if case.component != "transformer" {
        return Err(TransformerError::Input(format!(
            "case {}: component `{}` is not run by the transformer crate",
            case.name, case.component
        )));
    }
    let model = CogVideoXTransformer3DModel::<B>::from_dir_in(
        &case.model_dir.join("transformer"),
        dtype,
        device,
    )?;
    let hidden_states = case.input("hidden_states")?.to_tensor::<B, 5>(device)?;
    let encoder_hidden_states = case
        .input("encoder_hidden_states")?
        .to_tensor::<B, 3>(device)?;
    let timestep = case.input("timestep")?.to_tensor::<B, 1>(device)?;
    let ofs = match case.inputs.get("ofs") {
        Some(t) => Some(t.to_tensor::<B, 1>(device)?),
        None => None,
    };
    let [_, f, _, h, w] = hidden_states.dims();
    let rotary = model.image_rotary_emb(f, h, w, device)?;
    let sample = model.forward(
        hidden_states,
        encoder_hidden_states,
        timestep,
        ofs,
        rotary.as_ref(),
    )?;
    Ok(BTreeMap::from([(
        "sample".to_string(),
        HostTensor::from_tensor(sample),
    )]))
}
