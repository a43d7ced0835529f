//! Training and validation settings, with the official finetune's defaults
//! (`finetune/schemas/args.py`).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::schedule::LrScheduler;
use crate::TrainerError;

fn default_adapter() -> String {
    "lora".into()
}
fn default_rank() -> usize {
    128
}
fn default_alpha() -> f64 {
    64.0
}
fn default_targets() -> Vec<String> {
    cogvx_train::DEFAULT_TARGETS
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_lr() -> f64 {
    2e-5
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_wd() -> f64 {
    1e-4
}
fn default_clip() -> f64 {
    1.0
}
fn default_warmup() -> u64 {
    100
}
fn default_one_u64() -> u64 {
    1
}
fn default_one_usize() -> usize {
    1
}
fn default_seed() -> u64 {
    42
}
fn default_ckpt_steps() -> u64 {
    200
}
fn default_ckpt_limit() -> Option<usize> {
    Some(10)
}
fn default_output_dir() -> PathBuf {
    PathBuf::from("train_results")
}

/// What to train and how (the keys of a config's training section).
///
/// Defaults are the official finetune's (`schemas/args.py`): LoRA rank 128, alpha 64 on
/// `to_q, to_k, to_v, to_out.0`, AdamW lr 2e-5, betas (0.9, 0.95), eps 1e-8, weight decay 1e-4,
/// global-norm clipping at 1.0, `constant_with_warmup` with 100 warmup steps, batch size 1,
/// no accumulation, seed 42, a checkpoint every 200 steps keeping the last 10.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `"lora"` (built in), `"sft"` (all transformer weights) or the name of an adapter plugin
    /// (e.g. `"dora"`), which the caller passes as [`crate::TrainJob::adapter_plugin`].
    #[serde(default = "default_adapter")]
    pub adapter: String,
    /// Adapter rank (PEFT `r`).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Adapter alpha (PEFT `lora_alpha`); the update is scaled by `alpha / rank`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Module names or suffixes the adapter goes on (PEFT `target_modules`).
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Base learning rate (the schedule multiplies it).
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// AdamW `(beta1, beta2)`.
    #[serde(default = "default_betas")]
    pub adam_betas: [f64; 2],
    /// AdamW `eps`.
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// AdamW decoupled weight decay.
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Global gradient-norm bound (`clip_grad_norm_`).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// diffusers `get_scheduler` name.
    #[serde(default)]
    pub lr_scheduler: LrScheduler,
    /// Linear warmup steps (all schedules but `constant`).
    #[serde(default = "default_warmup")]
    pub lr_warmup_steps: u64,
    /// Hard restarts of `cosine_with_restarts`.
    #[serde(default = "default_one_u64")]
    pub lr_num_cycles: u64,
    /// Optimizer steps to run; `None`: `epochs` full passes over the data.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Passes over the data when `max_steps` is not set.
    #[serde(default = "default_one_u64")]
    pub epochs: u64,
    /// Samples per micro-batch.
    #[serde(default = "default_one_usize")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (accelerate's `gradient_accumulation_steps`).
    #[serde(default = "default_one_usize")]
    pub gradient_accumulation_steps: usize,
    /// Seed of the data order, the noise and timestep draws and the adapter initialisation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Probability that a sample trains on the empty prompt's embedding instead of its
    /// caption's (classifier-free guidance dropout, as finetrainers and SimpleTuner offer; the
    /// official finetune has none). The empty prompt is T5-encoded once and cached.
    #[serde(default)]
    pub caption_dropout: f64,
    /// A checkpoint every this many optimizer steps (and one at the end).
    #[serde(default = "default_ckpt_steps")]
    pub checkpointing_steps: u64,
    /// Keep only the newest this many checkpoints (`None`: keep all).
    #[serde(default = "default_ckpt_limit")]
    pub checkpoints_total_limit: Option<usize>,
    /// Where checkpoints, metrics, validation videos and the exported weights go.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// SFT: the dtype of the exported transformer folder (`"fp32"`, lossless, the default;
    /// `"bf16"` as the 5B and 1.5 checkpoints are stored; `"fp16"` as the 2B one).
    #[serde(default = "default_export_dtype")]
    pub export_dtype: cogvx_train::ExportDtype,
    /// The layouts the built-in LoRA is exported in: `"diffusers"`
    /// (`pytorch_lora_weights.safetensors`, the default) and `"comfyui"`
    /// (`lora_comfyui.safetensors`, ComfyUI's native CogVideoX names). Each export is read back
    /// and checked (`export_report.json`).
    #[serde(default = "default_export_formats")]
    pub export_formats: Vec<crate::ExportFormat>,
    /// Also write TensorBoard event files (`<output_dir>/tensorboard/`): the step metrics,
    /// the timesteps' histogram, validation scores and frames (`tensorboard --logdir
    /// <output_dir>`). On by default; metrics.jsonl is written either way.
    #[serde(default = "default_true")]
    pub tensorboard: bool,
    /// Recompute each transformer block in the backward instead of keeping its activations
    /// (diffusers' `enable_gradient_checkpointing`; the official finetune always turns it on):
    /// the same gradients, in far less memory, for about one more forward pass of time.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`, keep the blocks' inputs in host memory until the backward
    /// reaches them (DeepSpeed's `cpu_checkpointing`): 4.3 GiB less GPU memory for CogVideoX-5B
    /// at 49x480x720, for one copy of each block input to the host and back per step.
    #[serde(default)]
    pub gradient_checkpointing_offload: bool,
    /// Recompute each feed-forward's `[tokens, 4 x inner_dim]` pre-activation in the backward
    /// instead of keeping it (Megatron-LM's selective recomputation of the MLP): 546 MiB less
    /// per block for CogVideoX-2B at 49x480x720 in f32 (only one block's with
    /// `gradient_checkpointing`), for one more `ff.net.0.proj` product per block (about 3% of a
    /// training step at the CPU benchmark's preset M). The same gradients either way.
    #[serde(default)]
    pub recompute_feed_forward: bool,
    /// DeepSpeed's ZeRO stage: `0` (each process keeps the whole AdamW state) or `2` (each
    /// process keeps the AdamW states of its share of the trainable tensors, about 1/N: the
    /// gradients are reduce-scattered to their owners, each steps its share, the updated
    /// parameters are all-gathered). Checkpoints hold the whole state either way, so a run
    /// resumes with any world size and stage.
    #[serde(default)]
    pub zero_stage: u8,
    /// Keep the AdamW states in host memory and step them on the CPU (DeepSpeed's
    /// `offload_optimizer`); with one process or several, with or without `zero_stage = 2`.
    #[serde(default)]
    pub optimizer_offload: bool,
    /// `"no"` (f32), `"bf16"` or `"fp16"`, as accelerate's `mixed_precision`: the transformer
    /// computes in half precision and keeps its frozen weights in it (half the memory);
    /// trainable parameters and AdamW states stay f32. fp16 scales the loss dynamically and
    /// skips a step whose gradients overflow. On the CPU it runs on burn's `flex` backend.
    #[serde(default)]
    pub mixed_precision: cogvx_model_core::precision::MixedPrecision,
    /// fp16: the loss scale of the first step (torch's `GradScaler(init_scale=65536)`); it
    /// halves after each step whose gradients overflow and doubles after 2000 clean ones.
    #[serde(default = "default_fp16_init_scale")]
    pub fp16_init_scale: f64,
}

fn default_fp16_init_scale() -> f64 {
    cogvx_model_core::precision::LossScaler::default().scale
}

fn default_true() -> bool {
    true
}

fn default_export_formats() -> Vec<crate::ExportFormat> {
    vec![crate::ExportFormat::Diffusers]
}

fn default_export_dtype() -> cogvx_train::ExportDtype {
    cogvx_train::ExportDtype::F32
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            adapter: default_adapter(),
            rank: default_rank(),
            alpha: default_alpha(),
            target_modules: default_targets(),
            learning_rate: default_lr(),
            adam_betas: default_betas(),
            adam_epsilon: default_eps(),
            weight_decay: default_wd(),
            max_grad_norm: default_clip(),
            lr_scheduler: LrScheduler::default(),
            lr_warmup_steps: default_warmup(),
            lr_num_cycles: default_one_u64(),
            max_steps: None,
            epochs: default_one_u64(),
            batch_size: default_one_usize(),
            gradient_accumulation_steps: default_one_usize(),
            seed: default_seed(),
            caption_dropout: 0.0,
            checkpointing_steps: default_ckpt_steps(),
            checkpoints_total_limit: default_ckpt_limit(),
            output_dir: default_output_dir(),
            export_dtype: default_export_dtype(),
            export_formats: default_export_formats(),
            tensorboard: true,
            gradient_checkpointing: false,
            gradient_checkpointing_offload: false,
            recompute_feed_forward: false,
            zero_stage: 0,
            optimizer_offload: false,
            mixed_precision: Default::default(),
            fp16_init_scale: default_fp16_init_scale(),
        }
    }
}

fn bad<T>(key: &str, message: impl std::fmt::Display) -> Result<T, TrainerError> {
    Err(TrainerError::Config(format!("`{key}`: {message}")))
}

fn finite_nonneg(key: &str, v: f64) -> Result<(), TrainerError> {
    if !v.is_finite() || v < 0.0 {
        return bad(key, format!("{v} must be a finite number >= 0"));
    }
    Ok(())
}

impl TrainConfig {
    /// Checks every value; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), TrainerError> {
        if self.adapter.trim().is_empty() {
            return bad(
                "adapter",
                "empty; use \"lora\", \"sft\" or an adapter plugin's name",
            );
        }
        if !matches!(self.zero_stage, 0 | 2) {
            return bad(
                "zero_stage",
                format!(
                    "{}: use 0 (replicated optimizer) or 2 (sharded optimizer states and gradients); parameters are not sharded (stage 3)",
                    self.zero_stage
                ),
            );
        }
        if self.gradient_checkpointing_offload && !self.gradient_checkpointing {
            return bad("gradient_checkpointing_offload", "offloads what gradient checkpointing keeps; set `gradient_checkpointing = true` too");
        }
        if !self.fp16_init_scale.is_finite()
            || self.fp16_init_scale < 1.0
            || self.fp16_init_scale > 1e30
        {
            return bad(
                "fp16_init_scale",
                format!(
                    "{} must be a number from 1 to 1e30 (torch's default is 65536)",
                    self.fp16_init_scale
                ),
            );
        }
        if !self.is_sft() {
            if self.rank == 0 {
                return bad("rank", "must be at least 1");
            }
            if !self.alpha.is_finite() || self.alpha <= 0.0 {
                return bad(
                    "alpha",
                    format!("{} must be a finite number > 0", self.alpha),
                );
            }
            if self.target_modules.is_empty() {
                return bad(
                    "target_modules",
                    "empty; diffusers' default is [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]",
                );
            }
            if let Some(t) = self.target_modules.iter().find(|t| t.trim().is_empty()) {
                return bad("target_modules", format!("{t:?} is not a module name"));
            }
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return bad(
                "learning_rate",
                format!("{} must be a finite number > 0", self.learning_rate),
            );
        }
        for (i, b) in self.adam_betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return bad(
                    "adam_betas",
                    format!("beta{} = {b} must be in [0, 1)", i + 1),
                );
            }
        }
        finite_nonneg("adam_epsilon", self.adam_epsilon)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        if !self.max_grad_norm.is_finite() || self.max_grad_norm <= 0.0 {
            return bad(
                "max_grad_norm",
                format!("{} must be a finite number > 0", self.max_grad_norm),
            );
        }
        if self.lr_scheduler == LrScheduler::CosineWithRestarts && self.lr_num_cycles == 0 {
            return bad(
                "lr_num_cycles",
                "must be at least 1 for cosine_with_restarts",
            );
        }
        match self.max_steps {
            Some(0) => {
                return bad(
                    "max_steps",
                    "must be at least 1 (or leave it out to train `epochs` epochs)",
                )
            }
            None if self.epochs == 0 => {
                return bad("epochs", "must be at least 1 when `max_steps` is not set")
            }
            _ => {}
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return bad(
                "caption_dropout",
                format!(
                    "{} must be a probability in [0, 1] (0.1 is common; 0 turns it off)",
                    self.caption_dropout
                ),
            );
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1");
        }
        if self.checkpointing_steps == 0 {
            return bad("checkpointing_steps", "must be at least 1");
        }
        if self.checkpoints_total_limit == Some(0) {
            return bad(
                "checkpoints_total_limit",
                "must be at least 1 (leave it out to keep every checkpoint)",
            );
        }
        if self.output_dir.as_os_str().is_empty() {
            return bad("output_dir", "empty");
        }
        if self.export_formats.is_empty() {
            return bad(
                "export_formats",
                "empty; name at least one of \"diffusers\", \"comfyui\"",
            );
        }
        let mut formats = self.export_formats.clone();
        formats.sort();
        formats.dedup();
        if formats.len() != self.export_formats.len() {
            return bad("export_formats", "names a format twice");
        }
        if !self.is_lora() && self.export_formats != [crate::ExportFormat::Diffusers] {
            return bad(
                "export_formats",
                format!(
                    "{:?} is for the built-in LoRA; `adapter = {:?}` exports {} (leave `export_formats` out)",
                    self.export_formats.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
                    self.adapter,
                    if self.is_sft() {
                        "a diffusers transformer folder"
                    } else {
                        "PEFT's layout"
                    }
                ),
            );
        }
        Ok(())
    }

    /// Full fine-tuning (`adapter = "sft"`).
    pub fn is_sft(&self) -> bool {
        self.adapter == "sft"
    }

    /// The built-in LoRA (`adapter = "lora"`).
    pub fn is_lora(&self) -> bool {
        self.adapter == "lora"
    }

    /// The AdamW settings.
    pub fn adamw(&self) -> cogvx_train::AdamWConfig {
        cogvx_train::AdamWConfig {
            lr: self.learning_rate,
            beta1: self.adam_betas[0],
            beta2: self.adam_betas[1],
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }
}

fn default_inference_steps() -> usize {
    50
}
fn default_guidance() -> f64 {
    6.0
}

/// Validation during training (the keys of a config's validation section).
///
/// Defaults follow the official finetune's validation, which calls the pipeline with its
/// defaults: 50 steps, guidance 6.0, no dynamic CFG, at the training resolution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every this many optimizer steps (and at the end); 0: never.
    #[serde(default)]
    pub steps: u64,
    /// Prompts to sample, one video each.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// I2V: one conditioning image per prompt.
    #[serde(default)]
    pub images: Vec<PathBuf>,
    #[serde(default = "default_inference_steps")]
    pub num_inference_steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    /// The pipeline's cosine guidance ramp.
    #[serde(default)]
    pub use_dynamic_cfg: bool,
    /// Seed of every validation video's starting noise (the same for each validation, so the
    /// videos of different steps are comparable).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Frame rate of the written `.mp4` files; `None`: the model's (8 for CogVideoX 1.0, 16 for
    /// 1.5, as the official demos export).
    #[serde(default)]
    pub fps: Option<f64>,
    /// Names of validator plugins to run on each video (passed as [`crate::TrainJob::validators`]).
    #[serde(default)]
    pub validators: Vec<String>,
    /// Pixel frames; `None`: the training resolution.
    #[serde(default)]
    pub num_frames: Option<usize>,
    /// Pixels; `None`: the training resolution.
    #[serde(default)]
    pub height: Option<usize>,
    /// Pixels; `None`: the training resolution.
    #[serde(default)]
    pub width: Option<usize>,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            steps: 0,
            prompts: Vec::new(),
            images: Vec::new(),
            num_inference_steps: default_inference_steps(),
            guidance_scale: default_guidance(),
            use_dynamic_cfg: false,
            seed: default_seed(),
            fps: None,
            validators: Vec::new(),
            num_frames: None,
            height: None,
            width: None,
        }
    }
}

impl ValidationConfig {
    /// Validation is on (`steps > 0`).
    pub fn enabled(&self) -> bool {
        self.steps > 0
    }

    /// Checks every value; the error names the key (`validation.<key>`).
    pub fn validate(&self) -> Result<(), TrainerError> {
        let key = |k: &str| format!("validation.{k}");
        if !self.enabled() {
            return Ok(());
        }
        if self.prompts.is_empty() {
            return bad(
                &key("prompts"),
                "validation is on (`steps` > 0) but there are no prompts",
            );
        }
        if !self.images.is_empty() && self.images.len() != self.prompts.len() {
            return bad(
                &key("images"),
                format!(
                    "{} images for {} prompts; give one per prompt",
                    self.images.len(),
                    self.prompts.len()
                ),
            );
        }
        if self.num_inference_steps == 0 {
            return bad(&key("num_inference_steps"), "must be at least 1");
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return bad(
                &key("guidance_scale"),
                format!("{} must be a finite number >= 0", self.guidance_scale),
            );
        }
        if let Some(fps) = self.fps {
            if !fps.is_finite() || fps <= 0.0 {
                return bad(&key("fps"), format!("{fps} must be a positive number"));
            }
        }
        if let Some(f) = self.num_frames {
            if f == 0 || (f - 1) % 8 != 0 {
                return bad(&key("num_frames"), format!("{f} is not 8N+1 (e.g. 49)"));
            }
        }
        for (k, v) in [("height", self.height), ("width", self.width)] {
            if let Some(v) = v {
                if v == 0 || v % 16 != 0 {
                    return bad(&key(k), format!("{v} is not a positive multiple of 16"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_official_finetunes() {
        let c: TrainConfig = toml::from_str("").unwrap();
        assert_eq!(c, TrainConfig::default());
        assert_eq!((c.rank, c.alpha, c.learning_rate), (128, 64.0, 2e-5));
        assert_eq!(c.adam_betas, [0.9, 0.95]);
        assert_eq!(
            (c.adam_epsilon, c.weight_decay, c.max_grad_norm),
            (1e-8, 1e-4, 1.0)
        );
        assert_eq!(
            (c.lr_scheduler, c.lr_warmup_steps, c.lr_num_cycles),
            (LrScheduler::ConstantWithWarmup, 100, 1)
        );
        assert_eq!(
            (c.batch_size, c.gradient_accumulation_steps, c.seed),
            (1, 1, 42)
        );
        assert_eq!(c.target_modules, ["to_q", "to_k", "to_v", "to_out.0"]);
        c.validate().unwrap();
        let v: ValidationConfig = toml::from_str("").unwrap();
        assert_eq!(v, ValidationConfig::default());
        assert_eq!(
            (v.num_inference_steps, v.guidance_scale, v.use_dynamic_cfg),
            (50, 6.0, false)
        );
        v.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = toml::from_str::<TrainConfig>("learnin_rate = 1e-4")
            .unwrap_err()
            .to_string();
        assert!(e.contains("learnin_rate"), "{e}");
        let e = toml::from_str::<TrainConfig>("lr_scheduler = \"cosine_forever\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cosine_forever"), "{e}");
        let e = toml::from_str::<ValidationConfig>("prompt = [\"x\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prompt"), "{e}");
        let cases: Vec<(&str, &str)> = vec![
            ("rank = 0", "`rank`"),
            ("alpha = -1.0", "`alpha`"),
            ("target_modules = []", "`target_modules`"),
            ("learning_rate = 0.0", "`learning_rate`"),
            ("adam_betas = [0.9, 1.0]", "`adam_betas`"),
            ("weight_decay = -1.0", "`weight_decay`"),
            ("max_grad_norm = 0.0", "`max_grad_norm`"),
            ("max_steps = 0", "`max_steps`"),
            ("epochs = 0", "`epochs`"),
            ("batch_size = 0", "`batch_size`"),
            ("caption_dropout = 1.5", "`caption_dropout`"),
            ("caption_dropout = -0.1", "`caption_dropout`"),
            ("caption_dropout = nan", "`caption_dropout`"),
            ("export_formats = []", "`export_formats`"),
            (
                "export_formats = [\"comfyui\", \"comfyui\"]",
                "`export_formats`",
            ),
            (
                "adapter = \"sft\"\nexport_formats = [\"comfyui\"]",
                "`export_formats`",
            ),
            (
                "adapter = \"dora\"\nexport_formats = [\"diffusers\", \"comfyui\"]",
                "`export_formats`",
            ),
            (
                "gradient_accumulation_steps = 0",
                "`gradient_accumulation_steps`",
            ),
            ("checkpointing_steps = 0", "`checkpointing_steps`"),
            ("checkpoints_total_limit = 0", "`checkpoints_total_limit`"),
            (
                "lr_scheduler = \"cosine_with_restarts\"\nlr_num_cycles = 0",
                "`lr_num_cycles`",
            ),
        ];
        for (text, key) in cases {
            let c: TrainConfig = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        // SFT ignores the adapter shape keys.
        let c: TrainConfig = toml::from_str("adapter = \"sft\"\nrank = 0").unwrap();
        c.validate().unwrap();
        let vcases: Vec<(&str, &str)> = vec![
            ("steps = 10", "validation.prompts"),
            (
                "steps = 10\nprompts = [\"a\"]\nimages = [\"a.png\", \"b.png\"]",
                "validation.images",
            ),
            (
                "steps = 10\nprompts = [\"a\"]\nnum_inference_steps = 0",
                "validation.num_inference_steps",
            ),
            (
                "steps = 10\nprompts = [\"a\"]\nnum_frames = 48",
                "validation.num_frames",
            ),
            (
                "steps = 10\nprompts = [\"a\"]\nheight = 100",
                "validation.height",
            ),
            ("steps = 10\nprompts = [\"a\"]\nfps = 0.0", "validation.fps"),
        ];
        for (text, key) in vcases {
            let c: ValidationConfig = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
