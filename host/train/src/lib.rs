//! # cogvx-train
//!
//! The numerical core of CogVideoX fine-tuning, faithful to the official finetune
//! (`CogVideo/finetune`) and to PEFT/diffusers:
//!
//! * adapters (re-exported from [`cogvx_adapters`]): LoRA or a plugin's adapter recipe injected
//!   into the transformer by diffusers module name, their parameters and gradients by PEFT name,
//!   and their diffusers/PEFT files.
//! * [`loss`]: the finetune's `compute_loss` (T2V and I2V, CogVideoX 1.0 and 1.5).
//! * [`optim`]: `clip_grad_norm_` (global norm) and AdamW with PyTorch semantics.
//! * [`sft`]: full fine-tuning of every transformer weight (the finetune's `training_type = "sft"`),
//!   with the same name -> tensor interface as the adapters; [`TrainMode`] switches between them.
//! * [`sft_export`]: a fully fine-tuned transformer as a diffusers `transformer/` folder
//!   (config, single or sharded safetensors with index, fp32/bf16/fp16), written atomically.
//! * [`train_step`] ties them together; [`run_case`] runs the `train_step_lora` parity cases.

pub mod error;
pub mod loss;
pub mod optim;
pub mod sft;
pub mod sft_export;

pub use cogvx_adapters::{
    adapter_grads, adapter_tensors, all_adapter_values, freeze, inject_lora, inject_recipe,
    linear_layers_mut, matches_target, set_adapter_values, trainable_values, AdapterSpec,
    DEFAULT_TARGETS,
};
pub use cogvx_adapters::{
    adapter_metadata, load_adapter, peft_config_dict, peft_settings, save_adapter, AdapterMetadata,
    LoadedAdapter,
};
pub use cogvx_adapters::{load_lora, save_lora, LoadedLora, LoraMetadata, LORA_WEIGHTS_NAME};
pub use error::TrainError;
pub use loss::{
    compute_loss, compute_loss_taped, model_latents, noise_shape, NoiseDraw, TrainBatch,
};
pub use optim::{clip_grad_norm, total_grad_norm, AdamState, AdamW, AdamWConfig, HostAdamState};
pub use sft::{
    checkpoint_shapes, enable_full_training, first_adapter_layer, full_grads, full_host_values,
    full_param_shapes, full_values, set_full_values, TrainMode,
};
pub use sft_export::{
    save_transformer_folder, state_dict_keys, ExportDtype, ExportedFolder, DEFAULT_MAX_SHARD_BYTES,
};

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use cogvx_model_core::adapter::AdapterTensor;
use cogvx_model_core::case::{Case, HostTensor};
use cogvx_model_core::ModelAutodiffBackend;
use cogvx_scheduler::NoiseSchedule;
use cogvx_transformer::CogVideoXTransformer3DModel;
use std::collections::BTreeMap;
use std::path::Path;

/// The case components this crate runs.
pub const COMPONENTS: &[&str] = &["train_step_lora"];

/// Named adapter tensors on the inner (non-autodiff) backend of `B`.
pub type InnerTensors<B> = BTreeMap<String, AdapterTensor<<B as AutodiffBackend>::InnerBackend>>;

/// The loss of one batch and the gradient of every trainable adapter parameter.
pub fn loss_and_grads<B: ModelAutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
) -> Result<(f64, InnerTensors<B>), TrainError> {
    loss_and_grads_for(TrainMode::Adapter, model, schedule, batch, draw)
}

/// The loss of one batch and the gradient of every parameter `mode` trains.
pub fn loss_and_grads_for<B: ModelAutodiffBackend>(
    mode: TrainMode,
    model: &mut CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
) -> Result<(f64, InnerTensors<B>), TrainError> {
    loss_and_grads_scaled(mode, model, schedule, batch, draw, 1.0)
}

/// [`loss_and_grads_for`] with the loss multiplied by `loss_scale` before the backward and the
/// gradients divided by it after (fp16's dynamic loss scaling,
/// [`cogvx_model_core::precision::LossScaler`]): half-precision gradients that would underflow
/// stay representable; the returned loss and gradients are unscaled (non-finite on overflow).
pub fn loss_and_grads_scaled<B: ModelAutodiffBackend>(
    mode: TrainMode,
    model: &mut CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
    loss_scale: f64,
) -> Result<(f64, InnerTensors<B>), TrainError> {
    let (loss, tape) = compute_loss_taped(model, schedule, batch, draw)?;
    let value: f64 = loss.clone().inner().into_scalar().elem::<f64>();
    if loss_scale == 1.0 {
        let grads = tape.backward(loss);
        return Ok((value, mode.grads(model, &grads)));
    }
    let grads = tape.backward(loss.mul_scalar(loss_scale));
    let grads = mode
        .grads(model, &grads)
        .into_iter()
        .map(|(n, g)| (n, g.mul_scalar(1.0 / loss_scale)))
        .collect();
    Ok((value, grads))
}

/// Clips `grads` to `max_grad_norm` (global norm; `None`: no clipping), takes one AdamW step at
/// learning rate `lr` and writes the new values into the model's adapter. Returns the total
/// gradient norm before clipping.
pub fn apply_update<B: AutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    grads: InnerTensors<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    max_grad_norm: Option<f64>,
) -> Result<f64, TrainError> {
    apply_update_for(
        TrainMode::Adapter,
        model,
        grads,
        optimizer,
        lr,
        max_grad_norm,
    )
}

/// [`apply_update`] for the parameters `mode` trains.
pub fn apply_update_for<B: AutodiffBackend>(
    mode: TrainMode,
    model: &mut CogVideoXTransformer3DModel<B>,
    mut grads: InnerTensors<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    max_grad_norm: Option<f64>,
) -> Result<f64, TrainError> {
    let grad_norm = match max_grad_norm {
        Some(max) => clip_grad_norm(&mut grads, max)?,
        None => total_grad_norm(&grads),
    };
    let mut params = mode.values(model);
    optimizer.step(lr, &mut params, &grads)?;
    // Only the updated parameters are written back (as torch, those without a gradient stay).
    params.retain(|name, _| grads.contains_key(name));
    mode.set_values(model, &params)?;
    Ok(grad_norm)
}

/// What one training step produced.
#[derive(Clone, Debug)]
pub struct StepOutput<B: AutodiffBackend> {
    pub loss: f64,
    /// Total gradient norm before clipping.
    pub grad_norm: f64,
    /// Gradients before clipping.
    pub grads: InnerTensors<B>,
}

/// One optimisation step of the adapter: loss, gradients, global-norm clipping, AdamW.
pub fn train_step<B: ModelAutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    max_grad_norm: Option<f64>,
) -> Result<StepOutput<B>, TrainError> {
    train_step_for(
        TrainMode::Adapter,
        model,
        schedule,
        batch,
        draw,
        optimizer,
        lr,
        max_grad_norm,
    )
}

/// [`train_step`] for the parameters `mode` trains.
#[allow(clippy::too_many_arguments)]
pub fn train_step_for<B: ModelAutodiffBackend>(
    mode: TrainMode,
    model: &mut CogVideoXTransformer3DModel<B>,
    schedule: &NoiseSchedule,
    batch: &TrainBatch<B>,
    draw: &NoiseDraw<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    max_grad_norm: Option<f64>,
) -> Result<StepOutput<B>, TrainError> {
    let (loss, grads) = loss_and_grads_for(mode, model, schedule, batch, draw)?;
    let grad_norm = apply_update_for(mode, model, grads.clone(), optimizer, lr, max_grad_norm)?;
    Ok(StepOutput {
        loss,
        grad_norm,
        grads,
    })
}

/// Reads a model folder's `scheduler/scheduler_config.json`.
pub fn load_schedule(model_dir: &Path) -> Result<NoiseSchedule, TrainError> {
    let path = model_dir.join("scheduler").join("scheduler_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(NoiseSchedule::from_json(
        &text,
        &path.display().to_string(),
    )?)
}

fn host<B: burn::tensor::backend::Backend>(t: &AdapterTensor<B>) -> HostTensor {
    HostTensor::f32(t.shape(), t.to_vec())
}

fn param_f64(case: &Case, name: &str) -> Result<f64, TrainError> {
    case.param(name)?.as_f64().ok_or_else(|| {
        TrainError::Invalid(format!(
            "case {}: param `{name}` is not a number",
            case.name
        ))
    })
}

/// The LoRA spec of a `train_step_lora` case (`lora_rank`, `lora_alpha`, `lora_targets`).
pub fn case_lora_spec(case: &Case) -> Result<AdapterSpec, TrainError> {
    let rank = param_f64(case, "lora_rank")? as usize;
    let alpha = param_f64(case, "lora_alpha")?;
    let targets = match case.params.get("lora_targets") {
        None => DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
        Some(v) => v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                TrainError::Invalid(format!(
                    "case {}: `lora_targets` is not a list of strings",
                    case.name
                ))
            })?,
    };
    Ok(AdapterSpec {
        rank,
        alpha,
        targets,
    })
}

/// The batch (`in.encoded_videos`, `in.prompt_embedding`, `in.image_latents` for I2V) and the
/// draw (`in.timesteps`, `in.noise`) of a `train_step_lora` case.
pub fn case_batch<B: burn::tensor::backend::Backend>(
    case: &Case,
    device: &B::Device,
) -> Result<(TrainBatch<B>, NoiseDraw<B>), TrainError> {
    let batch = TrainBatch {
        latents: case.input("encoded_videos")?.to_tensor::<B, 5>(device)?,
        prompt_embeds: case.input("prompt_embedding")?.to_tensor::<B, 3>(device)?,
        image_latents: match case.inputs.get("image_latents") {
            Some(t) => Some(t.to_tensor::<B, 5>(device)?),
            None => None,
        },
    };
    let timesteps = case
        .input("timesteps")?
        .to_i64()
        .into_iter()
        .map(|t| {
            usize::try_from(t).map_err(|_| {
                TrainError::Invalid(format!("case {}: negative timestep {t}", case.name))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let draw = NoiseDraw {
        timesteps,
        noise: case.input("noise")?.to_tensor::<B, 5>(device)?,
    };
    Ok((batch, draw))
}

/// Runs a `train_step_lora` case: the transformer of the case's model folder with LoRA on the
/// case's targets initialised from `in.lora_init.*`, one step of the finetune's loss with the
/// given timesteps and noise, global-norm clipping at `max_grad_norm` and one AdamW step with
/// `params.optimizer`. Returns `loss`, `grad_norm` (before clipping), `grad.<param>` and
/// `lora_after_step.<param>`.
pub fn run_case<B: ModelAutodiffBackend>(
    case: &Case,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, TrainError> {
    run_case_with::<B>(case, false, device)
}

/// [`run_case`] with block-level gradient checkpointing on or off (the same outputs either way).
pub fn run_case_with<B: ModelAutodiffBackend>(
    case: &Case,
    gradient_checkpointing: bool,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, TrainError> {
    if case.component != "train_step_lora" {
        return Err(TrainError::Invalid(format!(
            "case {}: component `{}` is not run by the train crate ({})",
            case.name,
            case.component,
            COMPONENTS.join(", ")
        )));
    }
    let spec = case_lora_spec(case)?;
    let model =
        CogVideoXTransformer3DModel::<B>::from_dir(&case.model_dir.join("transformer"), device)?;
    let mut model = freeze(model);
    model.set_gradient_checkpointing(gradient_checkpointing);
    inject_lora(&mut model, &spec, device)?;

    // LoRA initial values from the case.
    let mut init: InnerTensors<B> = BTreeMap::new();
    for (name, t) in &case.inputs {
        if let Some(key) = name.strip_prefix("lora_init.") {
            let v =
                AdapterTensor::<B>::from_vec(&t.shape, t.to_f32(), device).ok_or_else(|| {
                    TrainError::Invalid(format!(
                        "case {}: `in.{name}` has shape {:?}",
                        case.name, t.shape
                    ))
                })?;
            let v = match v {
                AdapterTensor::Vector(x) => AdapterTensor::Vector(x.inner()),
                AdapterTensor::Matrix(x) => AdapterTensor::Matrix(x.inner()),
            };
            init.insert(key.to_string(), v);
        }
    }
    let missing: Vec<String> = trainable_values(&mut model)
        .into_keys()
        .filter(|k| !init.contains_key(k))
        .collect();
    if !missing.is_empty() {
        return Err(TrainError::Invalid(format!(
            "case {}: no `in.lora_init.*` for {}",
            case.name,
            missing.join(", ")
        )));
    }
    set_adapter_values(&mut model, &init)?;

    let schedule = load_schedule(&case.model_dir)?;
    let (batch, draw) = case_batch::<B>(case, device)?;
    let opt_config = AdamWConfig::from_json(case.param("optimizer")?)?;
    let max_grad_norm = match case.params.get("max_grad_norm") {
        Some(v) => Some(v.as_f64().ok_or_else(|| {
            TrainError::Invalid(format!(
                "case {}: `max_grad_norm` is not a number",
                case.name
            ))
        })?),
        None => None,
    };
    let mut optimizer = AdamW::new(opt_config);
    let step = train_step(
        &mut model,
        &schedule,
        &batch,
        &draw,
        &mut optimizer,
        opt_config.lr,
        max_grad_norm,
    )?;

    let mut out = BTreeMap::new();
    out.insert(
        "loss".to_string(),
        HostTensor::f32(vec![1], vec![step.loss as f32]),
    );
    out.insert(
        "grad_norm".to_string(),
        HostTensor::f32(vec![1], vec![step.grad_norm as f32]),
    );
    for (name, g) in &step.grads {
        out.insert(format!("grad.{name}"), host(g));
    }
    for (name, v) in trainable_values(&mut model) {
        out.insert(format!("lora_after_step.{name}"), host(&v));
    }
    Ok(out)
}
