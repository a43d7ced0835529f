//! Parity cases `vae_encode` / `vae_decode` (see `shared/reference/README.md`).

use burn::tensor::backend::Backend;
use cogvx_model_core::case::{Case, HostTensor};
use std::collections::BTreeMap;

use crate::model::{AutoencoderKLCogVideoX, Tiling, VaeOptions};
use crate::{VaeConfig, VaeError};

/// `params.tiling` of a case as diffusers' `enable_tiling(**tiling)`: absent (or zero, Python's
/// `x or default`) entries keep the config's defaults.
pub fn tiling_from_params(
    params: &serde_json::Value,
    config: &VaeConfig,
) -> Result<Option<Tiling>, VaeError> {
    let Some(t) = params.get("tiling") else {
        return Ok(None);
    };
    if t.is_null() {
        return Ok(None);
    }
    let obj = t
        .as_object()
        .ok_or_else(|| VaeError::Input(format!("params.tiling: expected an object, got {t}")))?;
    let mut tiling = Tiling::for_config(config);
    for (key, value) in obj {
        let num = value.as_f64().ok_or_else(|| {
            VaeError::Input(format!(
                "params.tiling.{key}: expected a number, got {value}"
            ))
        })?;
        if num == 0.0 {
            continue;
        }
        match key.as_str() {
            "tile_sample_min_height" => tiling.tile_sample_min_height = num as usize,
            "tile_sample_min_width" => tiling.tile_sample_min_width = num as usize,
            "tile_overlap_factor_height" => tiling.tile_overlap_factor_height = num,
            "tile_overlap_factor_width" => tiling.tile_overlap_factor_width = num,
            other => {
                return Err(VaeError::Input(format!(
                    "params.tiling: unknown key `{other}`"
                )))
            }
        }
    }
    Ok(Some(tiling))
}

/// Runs a `vae_encode` (outputs `mean`, `logvar`) or `vae_decode` (output `video`) case with the
/// case's model folder (`<model>/vae`), honouring `params.tiling`. Returns output name -> tensor.
pub fn run_case<B: Backend>(
    case: &Case,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, VaeError> {
    let dir = case.model_dir.join("vae");
    let (vae, config) = AutoencoderKLCogVideoX::<B>::from_dir(&dir, device)?;
    let options = VaeOptions {
        tiling: tiling_from_params(&case.params, &config)?,
        slicing: false,
    };
    let mut out = BTreeMap::new();
    match case.component.as_str() {
        "vae_encode" => {
            let video = case.input("video")?.to_tensor::<B, 5>(device)?;
            let dist = vae.encode(video, &options)?;
            out.insert("mean".to_string(), HostTensor::from_tensor(dist.mean));
            out.insert("logvar".to_string(), HostTensor::from_tensor(dist.logvar));
        }
        "vae_decode" => {
            let latents = case.input("latents")?.to_tensor::<B, 5>(device)?;
            let video = vae.decode(latents, &options)?;
            out.insert("video".to_string(), HostTensor::from_tensor(video));
        }
        other => {
            return Err(VaeError::Input(format!(
                "case {}: component `{other}` is not a VAE component (vae_encode, vae_decode)",
                case.name
            )))
        }
    }
    Ok(out)
}
