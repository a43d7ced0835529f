//! # cogvx-adapters
//!
//! Adapters on the CogVideoX transformer, below both training and sampling:
//!
//! * [`inject`]: LoRA (or a plugin's adapter recipe) injected into the transformer's linear
//!   layers by diffusers module name (default targets `to_q`, `to_k`, `to_v`, `to_out.0`), with
//!   the base weights frozen; adapter parameters, gradients and updates by PEFT name.
//! * [`lora_file`]: `pytorch_lora_weights.safetensors` as diffusers' `save_lora_weights` writes
//!   it, and its loader (what `cogvx sample --lora` applies).
//! * [`comfyui_file`]: the same LoRA under ComfyUI's names (`lora_comfyui.safetensors`,
//!   `diffusion_model.blocks.{i}.q.lora_A.weight` with `alpha`), and its loader.
//! * [`peft_file`]: any adapter (LoRA, DoRA, LoHa, LoKr from plugins) under PEFT's names with
//!   PEFT's config in the header, and its loader.

pub mod comfyui_file;
pub mod error;
pub mod inject;
pub mod lora_file;
pub mod peft_file;

pub use comfyui_file::{
    comfyui_keys, comfyui_module, diffusers_module, load_lora_comfyui, save_lora_comfyui,
    COMFYUI_LORA_NAME,
};
pub use error::AdaptersError;
pub use inject::{
    adapter_grads, adapter_tensors, all_adapter_values, freeze, inject_lora, inject_recipe,
    linear_layers_mut, matches_target, set_adapter_values, trainable_values, AdapterSpec,
    DEFAULT_TARGETS,
};
pub use lora_file::{
    load_lora, load_lora_any, python_json_dumps, save_lora, LoadedLora, LoraMetadata,
    LORA_WEIGHTS_NAME,
};
pub use peft_file::{
    adapter_metadata, load_adapter, peft_config_dict, peft_settings, save_adapter, AdapterMetadata,
    LoadedAdapter,
};
