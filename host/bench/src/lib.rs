//! # cogvx-bench
//!
//! The cogvx side of the CPU training-step benchmark of `shared/bench/torch_train_step.py`: one
//! LoRA training step of a CogVideoX transformer with random (seeded) weights, the 5B-style block
//! with 3D RoPE, float32 on the CPU, with exactly the script's shapes ([`PRESETS`]):
//!
//! * `time_embed_dim = inner / 2`, `text_embed_dim = inner`, 16 latent channels, batch 1;
//! * LoRA with rank = alpha = the preset's rank on `to_q`, `to_k`, `to_v`, `to_out.0`
//!   (`cogvx_train::freeze` + `inject_lora`, PEFT's initialisation);
//! * the official finetune's loss, global-norm clipping at 1.0 and AdamW (lr 1e-4, betas
//!   0.9/0.95, eps 1e-8, weight decay 1e-4) through [`cogvx_train::train_step`], with a
//!   `CogVideoXDDIMScheduler(snr_shift_scale=1.0, rescale_betas_zero_snr=True,
//!   prediction_type="v_prediction", timestep_spacing="trailing")` schedule;
//! * each timed step draws its timestep and noise, as the script's loop does.
//!
//! [`train_step`] returns a [`BenchReport`] whose [`BenchReport::to_json_line`] has the script's
//! JSON fields, so that the two are compared as a ratio on one machine.

pub mod attention;
pub mod gemm;

use burn::tensor::{Distribution, Tensor};
use cogvx_model_core::precision::MixedPrecision;
use cogvx_model_core::{CpuAutodiffBackend, CpuDevice, FlexAutodiffBackend, ModelAutodiffBackend};
use cogvx_scheduler::{
    NoiseSchedule, PredictionType, SchedulerConfig, SchedulerError, TimestepSpacing,
};
use cogvx_train::{AdamW, AdamWConfig, AdapterSpec, NoiseDraw, TrainBatch, TrainError};
use cogvx_transformer::{CogVideoXTransformer3DModel, TransformerConfig, TransformerError};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

pub use cogvx_transformer::random::write_random_transformer;

/// The `impl` field of the report.
pub const IMPL_NAME: &str = "cogvx-burn-ndarray";
/// The burn version cogvx is built with (the report's counterpart of the script's `torch` field).
pub const BURN_VERSION: &str = "0.21.0";
/// Learning rate, betas, eps and weight decay of the script's `torch.optim.AdamW`.
pub const ADAMW: AdamWConfig = AdamWConfig {
    lr: 1e-4,
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 1e-4,
};
/// The script's `clip_grad_norm_(params, 1.0)`.
pub const MAX_GRAD_NORM: f64 = 1.0;
/// Latent channels of every preset.
pub const LATENT_CHANNELS: usize = 16;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A preset name that is not in [`PRESETS`].
    #[error("unknown preset `{0}` (known: {known})", known = PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))]
    UnknownPreset(String),
    /// Arguments or a preset that cannot be run, with what to change.
    #[error("{0}")]
    Invalid(String),
    /// The rayon pool for `threads` could not be built.
    #[error("cannot start a pool of {threads} threads: {message}")]
    ThreadPool { threads: usize, message: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Transformer(#[from] TransformerError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Adapters(#[from] cogvx_adapters::AdaptersError),
}

/// The shapes of one benchmark preset (`PRESETS` of `torch_train_step.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    /// Text tokens (`encoder_hidden_states` length).
    pub text_len: usize,
    /// Latent frames, height, width (16 channels).
    pub lat: (usize, usize, usize),
    /// LoRA rank (alpha is the same number).
    pub rank: usize,
}

/// The script's presets: S (480 video tokens), M (2310 video tokens) and XL (one block of
/// CogVideoX-2B's width, 30 heads x 64, at 49x480x720: 226 text + 13x30x45 video = 17,776 tokens),
/// and XL30 (XL with CogVideoX-2B's 30 blocks; a GPU's size).
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "S",
        heads: 4,
        head_dim: 64,
        layers: 4,
        text_len: 32,
        lat: (5, 16, 24),
        rank: 16,
    },
    Preset {
        name: "M",
        heads: 8,
        head_dim: 64,
        layers: 8,
        text_len: 64,
        lat: (7, 30, 44),
        rank: 32,
    },
    Preset {
        name: "XL",
        heads: 30,
        head_dim: 64,
        layers: 1,
        text_len: 226,
        lat: (13, 60, 90),
        rank: 128,
    },
    // cogvx only: XL at CogVideoX-2B's depth (30 blocks), for a GPU (scripts/gpu-check.sh).
    Preset {
        name: "XL30",
        heads: 30,
        head_dim: 64,
        layers: 30,
        text_len: 226,
        lat: (13, 60, 90),
        rank: 128,
    },
    // cogvx only, for checking `cogvx plan` against measured peaks: XL's width at 1,876 tokens,
    // and 8 heads at XL's 17,776 tokens (minutes a step).
    Preset {
        name: "wide",
        heads: 30,
        head_dim: 64,
        layers: 1,
        text_len: 226,
        lat: (5, 30, 44),
        rank: 128,
    },
    Preset {
        name: "long",
        heads: 8,
        head_dim: 64,
        layers: 1,
        text_len: 226,
        lat: (13, 60, 90),
        rank: 128,
    },
];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Result<Preset, BenchError> {
    PRESETS
        .iter()
        .find(|p| p.name == name)
        .copied()
        .ok_or_else(|| BenchError::UnknownPreset(name.to_string()))
}

impl Preset {
    /// `heads * head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// The script's `CogVideoXTransformer3DModel(...)` arguments (every other key at diffusers'
    /// default: patch size 2, no `patch_size_t`, no learned positional embedding).
    pub fn transformer_config(&self) -> TransformerConfig {
        let (f, h, w) = self.lat;
        let inner = self.inner_dim();
        TransformerConfig {
            num_attention_heads: self.heads,
            attention_head_dim: self.head_dim,
            in_channels: LATENT_CHANNELS,
            out_channels: Some(LATENT_CHANNELS),
            time_embed_dim: inner / 2,
            text_embed_dim: inner,
            num_layers: self.layers,
            sample_width: w,
            sample_height: h,
            sample_frames: (f - 1) * 4 + 1,
            max_text_seq_length: self.text_len,
            use_rotary_positional_embeddings: true,
            ..Default::default()
        }
    }

    /// Tokens the attention sees: `F * (H/2) * (W/2) + text_len` (the script's `tokens`).
    pub fn tokens(&self) -> usize {
        let (f, h, w) = self.lat;
        f * (h / 2) * (w / 2) + self.text_len
    }

    fn check(&self) -> Result<(), BenchError> {
        let (f, h, w) = self.lat;
        if f == 0 || h == 0 || w == 0 || h % 2 != 0 || w % 2 != 0 {
            return Err(BenchError::Invalid(format!(
                "preset {}: latent {f}x{h}x{w} must be positive with even height and width (patch size 2)",
                self.name
            )));
        }
        if self.rank == 0 || self.text_len == 0 || self.layers == 0 {
            return Err(BenchError::Invalid(format!(
                "preset {}: rank, text_len and layers must be positive",
                self.name
            )));
        }
        if (self.inner_dim() / 2) == 0 {
            return Err(BenchError::Invalid(format!(
                "preset {}: hidden size {} is too small",
                self.name,
                self.inner_dim()
            )));
        }
        Ok(())
    }
}

/// The script's scheduler: `CogVideoXDDIMScheduler(snr_shift_scale=1.0, rescale_betas_zero_snr=True,
/// prediction_type="v_prediction", timestep_spacing="trailing")`.
pub fn bench_schedule() -> Result<NoiseSchedule, BenchError> {
    Ok(NoiseSchedule::new(SchedulerConfig {
        class_name: Some("CogVideoXDDIMScheduler".into()),
        snr_shift_scale: 1.0,
        rescale_betas_zero_snr: true,
        prediction_type: PredictionType::VPrediction,
        timestep_spacing: TimestepSpacing::Trailing,
        ..Default::default()
    })?)
}

/// The result of one benchmark run. [`BenchReport::to_json_line`] prints the fields of
/// `torch_train_step.py` (`impl`, `preset`, `threads`, `tokens`, `median_s`, `min_s`,
/// `peak_rss_mib`), with `burn` (the burn version) in place of the script's `torch`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    /// `cogvx-burn-ndarray`.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// burn's version.
    pub burn: String,
    pub preset: String,
    pub threads: usize,
    /// `F * (H/2) * (W/2) + text_len`.
    pub tokens: usize,
    /// Median seconds per timed step, rounded to 4 decimals (as the script).
    pub median_s: f64,
    /// Fastest timed step in seconds, rounded to 4 decimals.
    pub min_s: f64,
    /// Peak resident set of the process in MiB (`getrusage` `ru_maxrss`), rounded to 0.1;
    /// `None` where the platform has no `getrusage`.
    pub peak_rss_mib: Option<f64>,
    /// The loss of every step, warm-up included (not part of the JSON line).
    #[serde(skip)]
    pub losses: Vec<f64>,
    /// Threads of the rayon pool the steps ran on (equals `threads`; not part of the JSON line).
    #[serde(skip)]
    pub rayon_threads: usize,
    /// Whether the blocks ran with gradient checkpointing (after the script's fields).
    pub gradient_checkpointing: bool,
    /// Whether the checkpointed blocks' inputs waited in host memory.
    pub checkpoint_offload: bool,
    /// Whether the feed-forwards recomputed their pre-activations in the backward.
    pub recompute_feed_forward: bool,
    /// The peak `cogvx plan` predicts for this step (its training phase), in MiB, to hold
    /// next to `peak_rss_mib`.
    pub plan_peak_mib: Option<f64>,
    /// `"no"`, `"bf16"` or `"fp16"`.
    pub mixed_precision: String,
    /// The transformer's weights as loaded, in MiB: each parameter tensor's elements times the
    /// size of the dtype it holds (half with mixed precision).
    pub weights_mib: f64,
}

impl BenchReport {
    /// One JSON line with the script's field names and order.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }
}

pub(crate) fn round_to(x: f64, decimals: i32) -> f64 {
    let s = 10f64.powi(decimals);
    (x * s).round() / s
}

/// Median as Python's `statistics.median` (mean of the two middle values for an even count).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The peak resident set size of this process in MiB (`getrusage(RUSAGE_SELF).ru_maxrss`, which
/// Linux gives in KiB and macOS in bytes).
#[cfg(unix)]
pub fn peak_rss_mib() -> Option<f64> {
    // SAFETY: getrusage only writes into the zero-initialised struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let raw = usage.ru_maxrss as f64;
    let kib = if cfg!(target_os = "macos") {
        raw / 1024.0
    } else {
        raw
    };
    Some(kib / 1024.0)
}

/// The peak resident set size: not available on this platform.
#[cfg(not(unix))]
pub fn peak_rss_mib() -> Option<f64> {
    None
}

/// Runs `f` on a rayon pool of `threads` threads, the pool burn-ndarray's kernels use.
///
/// Matrix products also go through `matrixmultiply`, whose own pool reads `MATMUL_NUM_THREADS`
/// once per process (at its first product): when that variable is unset it is set to `threads`
/// here, which takes effect if no product ran in this process before.
pub fn run_with_threads<R: Send>(
    threads: usize,
    f: impl FnOnce() -> R + Send,
) -> Result<R, BenchError> {
    if threads == 0 {
        return Err(BenchError::Invalid("threads must be at least 1".into()));
    }
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cogvx-bench-{i}"))
        .build()
        .map_err(|e| BenchError::ThreadPool {
            threads,
            message: e.to_string(),
        })?;
    Ok(pool.install(f))
}

/// The CPU backend of an f32 benchmark step (half precision always runs on flex).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuBackendKind {
    /// burn-ndarray (`CpuBackend`, the library tests' backend).
    Ndarray,
    /// burn's flex (threads, SIMD, gemm, half types): what `cogvx` runs on the CPU.
    #[default]
    Flex,
}

impl std::str::FromStr for CpuBackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ndarray" => Ok(CpuBackendKind::Ndarray),
            "flex" => Ok(CpuBackendKind::Flex),
            _ => Err(format!(
                "`{s}` is not a CPU backend: write `ndarray` or `flex`"
            )),
        }
    }
}

/// How a benchmark step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOptions {
    /// CPU threads.
    pub threads: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Block-level gradient checkpointing.
    pub gradient_checkpointing: bool,
    /// With checkpointing, keep the blocks' inputs in host memory (`[train]
    /// gradient_checkpointing_offload`).
    pub checkpoint_offload: bool,
    /// Recompute the feed-forwards' pre-activations in the backward (`[train]
    /// recompute_feed_forward`).
    pub recompute_feed_forward: bool,
    /// `"no"`, `"bf16"` or `"fp16"`: frozen weights and compute in half precision (on the
    /// CPU through burn's flex backend).
    pub mixed_precision: MixedPrecision,
    /// The CPU backend of an f32 step.
    pub cpu_backend: CpuBackendKind,
}

/// One LoRA training step of preset `preset` (`"S"`, `"M"` or `"XL"`): `warmup` untimed steps,
/// then `steps` timed ones; the report has their median and minimum and the process's peak RSS.
pub fn train_step(preset: &str, options: StepOptions) -> Result<BenchReport, BenchError> {
    train_step_with(&self::preset(preset)?, options)
}

/// [`train_step`] for any [`Preset`] (e.g. a tiny one in tests).
pub fn train_step_with(preset: &Preset, options: StepOptions) -> Result<BenchReport, BenchError> {
    check_step(preset, options)?;
    run_with_threads(options.threads, || {
        if options.mixed_precision.is_half() || options.cpu_backend == CpuBackendKind::Flex {
            // ndarray has no half types.
            run::<FlexAutodiffBackend>(
                preset,
                options,
                "cogvx-burn-flex",
                cogvx_plan::DeviceKind::Cpu,
                &Default::default(),
            )
        } else {
            run::<CpuAutodiffBackend>(
                preset,
                options,
                IMPL_NAME,
                cogvx_plan::DeviceKind::Cpu,
                &CpuDevice::default(),
            )
        }
    })?
}

/// [`train_step_with`] on any autodiff backend and device (the GPU check runs it on CUDA);
/// `options.threads` is only reported. The report's `impl` is `cogvx-burn-<backend name>`.
pub fn train_step_on<B: ModelAutodiffBackend>(
    preset: &Preset,
    options: StepOptions,
    device: &B::Device,
) -> Result<BenchReport, BenchError> {
    check_step(preset, options)?;
    let kind = if B::name(device).contains("cuda") {
        cogvx_plan::DeviceKind::Cuda
    } else {
        cogvx_plan::DeviceKind::Cpu
    };
    run::<B>(
        preset,
        options,
        &format!("cogvx-burn-{}", B::name(device)),
        kind,
        device,
    )
}

/// The checks both entry points make before any work.
fn check_step(preset: &Preset, options: StepOptions) -> Result<(), BenchError> {
    if options.steps == 0 {
        return Err(BenchError::Invalid(
            "steps must be at least 1 (the number of timed steps)".into(),
        ));
    }
    preset.check()
}

fn run<AD: ModelAutodiffBackend>(
    preset: &Preset,
    options: StepOptions,
    implementation: &str,
    kind: cogvx_plan::DeviceKind,
    device: &AD::Device,
) -> Result<BenchReport, BenchError> {
    let StepOptions {
        threads,
        steps,
        warmup,
        gradient_checkpointing,
        checkpoint_offload,
        recompute_feed_forward,
        mixed_precision,
        cpu_backend: _,
    } = options;
    let checkpointing =
        cogvx_plan::Checkpointing::from_flags(gradient_checkpointing, checkpoint_offload);
    let checkpoint_offload = checkpointing == cogvx_plan::Checkpointing::Offloaded;
    let policy = cogvx_plan::ActivationPolicy {
        checkpointing,
        recompute_feed_forward,
    };
    let rayon_threads = rayon::current_num_threads();
    let config = preset.transformer_config();
    let (f, h, w) = preset.lat;

    // Random weights through the real loading path: a diffusers folder in a temp dir.
    let tmp = tempfile::tempdir().map_err(|e| BenchError::Io {
        path: std::env::temp_dir(),
        message: e.to_string(),
    })?;
    write_random_transformer(tmp.path(), &config, 0, 1.0)?;
    let model = CogVideoXTransformer3DModel::<AD>::from_dir_in(
        tmp.path(),
        mixed_precision.dtype(),
        device,
    )?;
    let weights_mib = round_to(tensor_bytes(&model) as f64 / (1u64 << 20) as f64, 1);
    drop(tmp);

    AD::seed(device, 0);
    let mut model = cogvx_train::freeze(model);
    model.set_gradient_checkpointing(gradient_checkpointing);
    model.set_checkpoint_offload(checkpoint_offload);
    model.set_feed_forward_recompute(recompute_feed_forward);
    cogvx_train::inject_lora(
        &mut model,
        &AdapterSpec::lora(preset.rank, preset.rank as f64),
        device,
    )?;
    let schedule = bench_schedule()?;
    let latents = Tensor::<AD, 5>::random(
        [1, LATENT_CHANNELS, f, h, w],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let prompt_embeds = Tensor::<AD, 3>::random(
        [1, preset.text_len, preset.inner_dim()],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let noise_shape = cogvx_train::noise_shape(&config, latents.dims());
    let batch = TrainBatch {
        latents,
        prompt_embeds,
        image_latents: None,
    };
    let mut optimizer = AdamW::new(ADAMW);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let num_train_timesteps = schedule.num_train_timesteps();

    let mut times = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(warmup + steps);
    for i in 0..warmup + steps {
        let start = Instant::now();
        let draw = NoiseDraw {
            timesteps: vec![rng.random_range(0..num_train_timesteps)],
            noise: Tensor::random(noise_shape, Distribution::Normal(0.0, 1.0), device),
        };
        let out = cogvx_train::train_step(
            &mut model,
            &schedule,
            &batch,
            &draw,
            &mut optimizer,
            ADAMW.lr,
            Some(MAX_GRAD_NORM),
        )?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
        if !out.loss.is_finite() {
            return Err(BenchError::Invalid(format!(
                "step {i}: the loss is {} (timestep {})",
                out.loss, draw.timesteps[0]
            )));
        }
        losses.push(out.loss);
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchReport {
        implementation: implementation.into(),
        burn: BURN_VERSION.into(),
        preset: preset.name.into(),
        threads,
        tokens: preset.tokens(),
        median_s: round_to(median(&times), 4),
        min_s: round_to(times[0], 4),
        peak_rss_mib: peak_rss_mib().map(|m| round_to(m, 1)),
        losses,
        rayon_threads,
        gradient_checkpointing,
        checkpoint_offload,
        recompute_feed_forward,
        plan_peak_mib: planned_peak_mib(preset, policy, mixed_precision, kind),
        mixed_precision: mixed_precision.name().into(),
        weights_mib,
    })
}

/// The bytes held by a module's parameter tensors, each at the size of its own dtype.
pub fn tensor_bytes<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: &M,
) -> u64 {
    struct Count(u64);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let t = param.val();
            self.0 += (t.shape().num_elements() * t.dtype().size()) as u64;
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}

/// The training-phase peak `cogvx plan` computes for one step of `preset`, in MiB.
pub fn planned_peak_mib(
    preset: &Preset,
    policy: cogvx_plan::ActivationPolicy,
    precision: MixedPrecision,
    device: cogvx_plan::DeviceKind,
) -> Option<f64> {
    let (f, h, w) = preset.lat;
    let video = f * (h / 2) * (w / 2);
    let tokens = cogvx_plan::Tokens {
        text: preset.text_len,
        video,
        total: video + preset.text_len,
    };
    let targets = cogvx_train::DEFAULT_TARGETS
        .iter()
        .map(|t| t.to_string())
        .collect();
    let trainable = cogvx_plan::Trainable::Lora {
        rank: preset.rank,
        targets,
    };
    let phase = cogvx_plan::train_phase(
        &preset.transformer_config(),
        tokens,
        1,
        &trainable,
        policy,
        precision,
        device,
        &cogvx_plan::Distribution::default(),
    )
    .ok()?;
    Some(round_to(phase.peak_bytes as f64 / (1u64 << 20) as f64, 1))
}

/// The benchmarks seed and draw from burn's process-wide backend RNG: tests that run them take
/// turns, or one test's draws change another's losses.
#[cfg(test)]
pub(crate) static TEST_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: Preset = Preset {
        name: "tiny",
        heads: 2,
        head_dim: 16,
        layers: 1,
        text_len: 4,
        lat: (2, 4, 6),
        rank: 2,
    };

    use crate::TEST_RNG as RNG;
    use burn::module::Module;

    fn opts(threads: usize, steps: usize, warmup: usize) -> StepOptions {
        StepOptions {
            threads,
            steps,
            warmup,
            gradient_checkpointing: false,
            checkpoint_offload: false,
            recompute_feed_forward: false,
            mixed_precision: MixedPrecision::No,
            cpu_backend: CpuBackendKind::Ndarray,
        }
    }

    #[test]
    fn checkpointed_and_recomputed_steps_give_the_same_losses() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let two = Preset { layers: 2, ..TINY };
        let plain = train_step_with(&two, opts(1, 2, 1)).unwrap();
        let ck = train_step_with(
            &two,
            StepOptions {
                gradient_checkpointing: true,
                ..opts(1, 2, 1)
            },
        )
        .unwrap();
        // Recomputing the feed-forwards' pre-activations, with and without checkpointing.
        let recomputed = |gradient_checkpointing| {
            train_step_with(
                &two,
                StepOptions {
                    gradient_checkpointing,
                    recompute_feed_forward: true,
                    ..opts(1, 2, 1)
                },
            )
            .unwrap()
        };
        let (rc, rc_ck) = (recomputed(false), recomputed(true));
        assert!(ck.gradient_checkpointing && !plain.gradient_checkpointing);
        assert!(rc.recompute_feed_forward && !plain.recompute_feed_forward);
        for other in [&ck, &rc, &rc_ck] {
            for (a, b) in plain.losses.iter().zip(&other.losses) {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs(),
                    "{:?} vs {:?}",
                    plain.losses,
                    other.losses
                );
            }
        }
    }

    /// The planner's list of linear layers and LoRA sizes mirror the model the trainer builds.
    #[test]
    fn the_plan_counts_the_layers_and_lora_parameters_the_trainer_builds() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let device = CpuDevice::default();
        for (config, targets) in [
            (
                TINY.transformer_config(),
                vec!["to_q", "to_k", "to_v", "to_out.0"],
            ),
            (
                TransformerConfig {
                    patch_size_t: Some(2),
                    patch_bias: false,
                    ofs_embed_dim: Some(8),
                    in_channels: 2 * LATENT_CHANNELS,
                    sample_frames: 9,
                    ..TINY.transformer_config()
                },
                vec!["ff.net.0.proj", "attn1.to_out.0", "proj_out", "linear_1"],
            ),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            write_random_transformer(tmp.path(), &config, 0, 1.0).unwrap();
            let mut model =
                CogVideoXTransformer3DModel::<CpuAutodiffBackend>::from_dir(tmp.path(), &device)
                    .unwrap();
            let built: Vec<(String, usize, usize)> = cogvx_train::linear_layers_mut(&mut model)
                .into_iter()
                .map(|(n, l)| {
                    let (i, o) = l.dims();
                    (n, i, o)
                })
                .collect();
            assert_eq!(built, cogvx_plan::activations::linear_layers(&config));
            let targets: Vec<String> = targets.into_iter().map(String::from).collect();
            let spec = AdapterSpec {
                rank: 3,
                alpha: 3.0,
                targets: targets.clone(),
            };
            let mut model = cogvx_train::freeze(model);
            cogvx_train::inject_lora(&mut model, &spec, &device).unwrap();
            let trained: usize = cogvx_train::trainable_values(&mut model)
                .values()
                .map(|t| t.shape().iter().product::<usize>())
                .sum();
            assert_eq!(
                trained as u64,
                cogvx_plan::activations::lora_parameters(&config, 3, &targets)
            );
            let stored: u64 = model.num_params() as u64;
            assert_eq!(
                stored - trained as u64,
                cogvx_plan::params::transformer_parameters(&config),
                "frozen weights"
            );
        }
    }

    /// `cogvx plan`'s training phase against the peak RSS `cogvx bench train-step` measured
    /// (docs/benchmarks.md, "Memory plan vs measured peaks"): within 20% for S, M and two
    /// one-block shapes (XL's width, XL's length) and XL itself, with and without checkpointing
    /// and feed-forward recomputation, and S and M in bf16. Re-measure and update the table
    /// when the step's memory changes.
    #[test]
    fn the_plan_is_within_20_percent_of_the_measured_peaks() {
        // Beside the script's presets: XL's width at 1,876 tokens, and 8 heads at XL's 17,776.
        let (wide, long) = (preset("wide").unwrap(), preset("long").unwrap());
        let (s, m, xl) = (
            preset("S").unwrap(),
            preset("M").unwrap(),
            preset("XL").unwrap(),
        );
        use MixedPrecision::{Bf16, No};
        // (preset, gradient checkpointing, recompute_feed_forward, precision, peak RSS MiB):
        // 2026-12-07, flex, 2 threads, the feed-forward one CPU kernel.
        let measured = [
            (s, false, false, No, 126.7),
            (s, true, false, No, 105.6),
            (m, false, false, No, 876.8),
            (m, true, false, No, 417.3),
            (m, false, true, No, 725.3),
            (wide, false, false, No, 670.8),
            (wide, true, false, No, 754.1),
            (wide, false, true, No, 648.1),
            (long, false, false, No, 774.7),
            (xl, false, false, No, 2683.4),
            (xl, true, false, No, 3602.1),
            // Mixed precision (flex): frozen weights and activations in bf16.
            (s, false, false, Bf16, 115.1),
            (s, true, false, Bf16, 101.3),
            (m, false, false, Bf16, 673.7),
            (m, true, false, Bf16, 376.8),
        ];
        let mut report = String::new();
        let mut worst: f64 = 0.0;
        for (p, ck, recompute, mp, rss) in measured {
            let name = p.name;
            let plan = planned_peak_mib(
                &p,
                cogvx_plan::ActivationPolicy {
                    checkpointing: cogvx_plan::Checkpointing::from_flags(ck, false),
                    recompute_feed_forward: recompute,
                },
                mp,
                cogvx_plan::DeviceKind::Cpu,
            )
            .unwrap();
            let err = plan / rss - 1.0;
            report += &format!(
                "{name} checkpointing={ck} recompute_ff={recompute} {}: plan {plan} MiB, \
                 measured {rss} MiB ({:+.1}%)\n",
                mp.name(),
                100.0 * err
            );
            worst = worst.max(err.abs());
        }
        eprintln!("{report}");
        assert!(worst <= 0.20, "{report}");
    }

    #[test]
    fn presets_have_the_script_shapes() {
        let s = preset("S").unwrap();
        assert_eq!(
            (s.inner_dim(), s.tokens(), s.rank),
            (256, 5 * 8 * 12 + 32, 16)
        );
        let m = preset("M").unwrap();
        assert_eq!(
            (m.inner_dim(), m.tokens(), m.rank),
            (512, 7 * 15 * 22 + 64, 32)
        );
        let c = m.transformer_config();
        assert_eq!(
            (
                c.time_embed_dim,
                c.text_embed_dim,
                c.num_layers,
                c.sample_frames
            ),
            (256, 512, 8, 25)
        );
        assert!(
            c.use_rotary_positional_embeddings
                && !c.use_learned_positional_embeddings
                && c.patch_size_t.is_none()
        );
        let xl = preset("XL").unwrap();
        assert_eq!(
            (xl.inner_dim(), xl.tokens(), xl.rank, xl.layers),
            (1920, 17_776, 128, 1)
        );
        let e = preset("L").unwrap_err().to_string();
        assert!(
            e.contains("unknown preset `L`") && e.contains("S, M, XL, XL30, wide, long"),
            "{e}"
        );
        assert_eq!(preset("XL30").unwrap().layers, 30);
    }

    #[test]
    fn tiny_step_reports_the_script_fields_with_a_finite_loss() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let r = train_step_with(&TINY, opts(1, 1, 1)).unwrap();
        assert_eq!(r.rayon_threads, 1);
        assert_eq!(r.losses.len(), 2);
        assert!(
            r.losses.iter().all(|l| l.is_finite() && *l > 0.0),
            "{:?}",
            r.losses
        );
        assert_eq!(r.tokens, 2 * 2 * 3 + 4);
        assert!(r.median_s > 0.0 && r.min_s == r.median_s, "{r:?}");
        let line = r.to_json_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 14, "{line}");
        // The script's field order (`burn` where it has `torch`), then cogvx's own.
        let fields = [
            "impl",
            "burn",
            "preset",
            "threads",
            "tokens",
            "median_s",
            "min_s",
            "peak_rss_mib",
            "gradient_checkpointing",
            "checkpoint_offload",
            "recompute_feed_forward",
            "plan_peak_mib",
            "mixed_precision",
            "weights_mib",
        ];
        let at: Vec<usize> = fields
            .iter()
            .map(|f| {
                line.find(&format!("\"{f}\":"))
                    .unwrap_or_else(|| panic!("{f}: {line}"))
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert_eq!(v["impl"], "cogvx-burn-ndarray");
        assert_eq!(v["preset"], "tiny");
        assert_eq!(v["threads"], 1);
        assert!(v["peak_rss_mib"].as_f64().unwrap() > 1.0);
        assert!(!line.contains('\n'));
    }

    /// `--mixed-precision bf16` runs on flex with bf16 frozen weights: the same losses as f32
    /// within bf16's precision (a broken cast would give a different or non-finite loss).
    #[test]
    fn a_bf16_step_runs_on_flex_near_the_f32_losses() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let f32_run = train_step_with(&TINY, opts(1, 2, 0)).unwrap();
        let bf16 = train_step_with(
            &TINY,
            StepOptions {
                mixed_precision: MixedPrecision::Bf16,
                ..opts(1, 2, 0)
            },
        )
        .unwrap();
        assert_eq!(
            (bf16.implementation.as_str(), bf16.mixed_precision.as_str()),
            ("cogvx-burn-flex", "bf16")
        );
        // The loaded weights take half the bytes.
        assert!(
            f32_run.weights_mib > 0.0
                && (bf16.weights_mib * 2.0 - f32_run.weights_mib).abs() <= 0.1,
            "{} vs {}",
            bf16.weights_mib,
            f32_run.weights_mib
        );
        for (a, b) in bf16.losses.iter().zip(&f32_run.losses) {
            assert!(
                a.is_finite() && ((a - b) / b).abs() < 2e-2,
                "{:?} vs {:?}",
                bf16.losses,
                f32_run.losses
            );
        }
    }

    /// `--backend flex` runs the f32 step on flex: the same losses as ndarray's up to f32
    /// rounding (other GEMM and reduction orders).
    #[test]
    fn an_f32_step_on_flex_gives_the_ndarray_losses() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let nd = train_step_with(&TINY, opts(1, 2, 0)).unwrap();
        let flex = train_step_with(
            &TINY,
            StepOptions {
                cpu_backend: CpuBackendKind::Flex,
                ..opts(1, 2, 0)
            },
        )
        .unwrap();
        assert_eq!(
            (flex.implementation.as_str(), flex.mixed_precision.as_str()),
            ("cogvx-burn-flex", "no")
        );
        assert_eq!(flex.weights_mib, nd.weights_mib);
        for (a, b) in flex.losses.iter().zip(&nd.losses) {
            assert!(
                ((a - b) / b).abs() < 1e-4,
                "{:?} vs {:?}",
                flex.losses,
                nd.losses
            );
        }
        assert_eq!("Flex".parse::<CpuBackendKind>(), Ok(CpuBackendKind::Flex));
        assert!("cuda"
            .parse::<CpuBackendKind>()
            .unwrap_err()
            .contains("ndarray` or `flex"));
    }

    #[test]
    fn the_pool_has_the_requested_threads_and_bad_arguments_are_refused() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(run_with_threads(2, rayon::current_num_threads).unwrap(), 2);
        assert_eq!(run_with_threads(1, rayon::current_num_threads).unwrap(), 1);
        assert!(train_step("S", opts(0, 1, 0))
            .unwrap_err()
            .to_string()
            .contains("threads"));
        assert!(train_step("S", opts(1, 0, 0))
            .unwrap_err()
            .to_string()
            .contains("steps"));
        let bad = Preset {
            lat: (2, 5, 6),
            ..TINY
        };
        assert!(train_step_with(&bad, opts(1, 1, 0))
            .unwrap_err()
            .to_string()
            .contains("even"));
    }

    #[test]
    fn median_and_rounding_follow_python() {
        assert_eq!(median(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), 2.5);
        assert_eq!(round_to(1.234_56, 4), 1.2346);
        assert_eq!(round_to(881.04, 1), 881.0);
    }
}
