//! `cogvx plan`: the peak memory of `prepare`, training and validation for a config, before
//! anything runs, per component.
//!
//! Everything is computed from the model configs and the shapes, the way cogvx runs them today:
//! - **weights** from the parameter counts of the configs ([`params`]), in the dtype cogvx keeps
//!   them in (`mixed_precision`'s half dtype for frozen weights, f32 for trained ones);
//! - **trainable parameters, gradients and AdamW states** (LoRA: `rank x (in + out)` per targeted
//!   linear layer; SFT: every transformer weight), float32;
//! - **activations** the backward needs, counted op by op for one `CogVideoXBlock` as burn's
//!   autodiff keeps them ([`activations`]), for every block or, with gradient checkpointing, the
//!   blocks' inputs plus one recomputed block;
//! - the backward's **workspace** (the gradients alive while the largest op is differentiated)
//!   and the **attention workspace** (FlashAttention tiles);
//! - the **VAE** (tiled encode in `prepare`, tiled decode in validation) and the **T5**
//!   encoder (bf16 under mixed precision, else f32), loaded in `prepare` only (training encodes the validation prompts before it loads
//!   the transformer).
//!
//! The training phase is checked against the measured peak RSS of `cogvx bench train-step`
//! (docs/benchmarks.md, "Memory plan vs measured peaks"); the VAE and T5 terms are estimates of the same kind,
//! not yet checked against a measurement at the real sizes.

pub mod activations;
pub mod models;
pub mod params;

use cogvx_model_core::precision::MixedPrecision;
use cogvx_transformer::TransformerConfig;
use serde::Serialize;

pub use models::{released_names, ModelConfigs};

/// Bytes per element of what cogvx keeps in float32 (weights, activations, optimizer states).
pub const F32: u64 = 4;
const GIB: f64 = (1u64 << 30) as f64;

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A model config could not be read or named.
    #[error("{0}")]
    Model(String),
    /// The shapes or training settings do not fit the model, naming the key.
    #[error("{0}")]
    Input(String),
}

/// A video shape in pixels: `frames x height x width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.frames, self.height, self.width)
    }
}

/// What the optimizer trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Trainable {
    /// LoRA (or an adapter plugin, planned as a LoRA of its rank) on the linear layers whose
    /// diffusers name matches `targets` (PEFT's rule).
    Lora { rank: usize, targets: Vec<String> },
    /// Every transformer weight (SFT).
    Full,
}

/// Where the work runs: the device's runtime reserves memory of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// Validation sampling, when enabled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValidationInput {
    pub shape: Shape,
    /// Classifier-free guidance (`guidance_scale > 1`): the transformer runs on a batch of 2.
    pub guidance: bool,
}

/// What the training step keeps of the blocks' activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every block's activations (`gradient_checkpointing = false`).
    Off,
    /// Each block's input, one block recomputed at a time (`gradient_checkpointing = true`).
    Blocks,
    /// As [`Checkpointing::Blocks`] with the inputs in host memory
    /// (`gradient_checkpointing_offload = true`).
    Offloaded,
}

impl Checkpointing {
    /// From the config's two keys (offloading applies only with checkpointing).
    pub fn from_flags(gradient_checkpointing: bool, offload: bool) -> Self {
        match (gradient_checkpointing, offload) {
            (false, _) => Checkpointing::Off,
            (true, false) => Checkpointing::Blocks,
            (true, true) => Checkpointing::Offloaded,
        }
    }
}

/// What the training step keeps of its activations and what it recomputes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivationPolicy {
    /// `[train] gradient_checkpointing` and `gradient_checkpointing_offload`.
    pub checkpointing: Checkpointing,
    /// `[train] recompute_feed_forward`: the feed-forwards keep their input only, not their
    /// pre-activation.
    pub recompute_feed_forward: bool,
}

/// How the run is spread over processes and where its optimizer lives (`cogvx launch`,
/// `[train] zero_stage`, `[train] optimizer_offload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Distribution {
    /// Processes (one per GPU); the plan is of one of them.
    pub world_size: usize,
    /// 0: every process keeps the whole AdamW state; 2: its 1/N share of it (ZeRO-2).
    pub zero_stage: u8,
    /// The AdamW states live in host memory.
    pub optimizer_offload: bool,
}

impl Default for Distribution {
    fn default() -> Self {
        Distribution {
            world_size: 1,
            zero_stage: 0,
            optimizer_offload: false,
        }
    }
}

impl Distribution {
    /// The AdamW states one process keeps for `n` trainable values (f32, two per value): the
    /// whole, or with ZeRO-2 its share (cogvx gives whole tensors to processes, balanced by
    /// size: about 1/N).
    pub fn adam_state_bytes(&self, n: u64) -> u64 {
        let all = 2 * n * F32;
        if self.zero_stage == 2 {
            all.div_ceil(self.world_size.max(1) as u64)
        } else {
            all
        }
    }

    /// The AdamW states item (`what` and the share), on the device unless offloaded to a GPU's
    /// host.
    fn adam_item(&self, n: u64, device: DeviceKind, what: &str) -> Item {
        let bytes = self.adam_state_bytes(n);
        let share = if self.zero_stage == 2 && self.world_size > 1 {
            format!(", 1/{} (ZeRO-2)", self.world_size)
        } else {
            String::new()
        };
        if self.optimizer_offload && device == DeviceKind::Cuda {
            item(
                format!(
                    "{what}{share}: offloaded, {:.2} GiB of host memory",
                    bytes as f64 / GIB
                ),
                0,
            )
        } else {
            item(format!("{what}{share}"), bytes)
        }
    }

    /// SFT in half precision with ZeRO-2 or optimizer offload: the model holds half weights (and
    /// half gradients), the optimizer's shards the f32 master weights, in host memory.
    pub fn half_masters(&self, trainable: &Trainable, precision: MixedPrecision) -> bool {
        *trainable == Trainable::Full
            && precision.is_half()
            && (self.zero_stage == 2 || self.optimizer_offload)
    }

    /// The f32 master weights of this process's share (host memory: out of a GPU's budget).
    fn masters_item(&self, n: u64, device: DeviceKind) -> Item {
        let bytes = self.adam_state_bytes(n) / 2;
        let share = if self.zero_stage == 2 && self.world_size > 1 {
            format!(", 1/{} (ZeRO-2)", self.world_size)
        } else {
            String::new()
        };
        match device {
            DeviceKind::Cuda => item(
                format!(
                    "f32 master weights{share}: {:.2} GiB of host memory",
                    bytes as f64 / GIB
                ),
                0,
            ),
            DeviceKind::Cpu => item(format!("f32 master weights{share}"), bytes),
        }
    }

    /// "2 processes, ZeRO-2, optimizer offload"-style description; empty for one process
    /// without either.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.world_size > 1 {
            parts.push(format!(
                "{} processes (the plan is per process)",
                self.world_size
            ));
        }
        if self.zero_stage == 2 {
            parts.push("ZeRO-2".to_string());
        }
        if self.optimizer_offload {
            parts.push("optimizer offload".to_string());
        }
        parts.join(", ")
    }
}

/// Everything a plan is computed from.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub models: ModelConfigs,
    /// `[data] resolution`.
    pub shape: Shape,
    /// `[train] batch_size` (micro-batch).
    pub batch_size: usize,
    pub trainable: Trainable,
    /// `[train] gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// `[train] gradient_checkpointing_offload`: the blocks' kept inputs wait in host memory.
    pub checkpoint_offload: bool,
    /// `[train] recompute_feed_forward`.
    pub recompute_feed_forward: bool,
    /// `[train] mixed_precision`.
    pub mixed_precision: MixedPrecision,
    /// `None` when `[validation] steps = 0`.
    pub validation: Option<ValidationInput>,
    pub device: DeviceKind,
    /// Processes, ZeRO stage, optimizer offload.
    pub distribution: Distribution,
}

/// One line of a phase: a component and its bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Item {
    pub name: String,
    pub bytes: u64,
    pub gib: f64,
}

/// A phase (`prepare`, `train`, `validation`): what is resident at its peak.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase {
    pub name: String,
    /// What runs in the phase, for the reader.
    pub what: String,
    pub items: Vec<Item>,
    pub peak_bytes: u64,
    pub peak_gib: f64,
    /// Whether `peak_bytes` fits the budget (`None` without one).
    pub fits: Option<bool>,
}

/// Token counts of the transformer at the training shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tokens {
    pub text: usize,
    pub video: usize,
    /// `text + video`.
    pub total: usize,
}

/// The plan: the phases, the overall peak and the verdict for a budget.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub model: String,
    pub device: DeviceKind,
    pub shape: Shape,
    pub batch_size: usize,
    pub training: String,
    pub gradient_checkpointing: bool,
    /// The checkpointed blocks' inputs kept in host memory.
    pub checkpoint_offload: bool,
    /// The feed-forwards' pre-activations recomputed in the backward rather than kept.
    pub recompute_feed_forward: bool,
    pub mixed_precision: MixedPrecision,
    pub tokens: Tokens,
    /// Processes, ZeRO stage and optimizer offload (the plan is one process's).
    pub distribution: Distribution,
    pub transformer_parameters: u64,
    pub trainable_parameters: u64,
    pub phases: Vec<Phase>,
    /// The largest phase peak.
    pub peak_bytes: u64,
    pub peak_gib: f64,
    /// The phase with the largest peak.
    pub peak_phase: String,
    /// The budget the verdict is for, in GiB.
    pub budget_gib: Option<f64>,
    pub fits: Option<bool>,
}

fn gib(bytes: u64) -> f64 {
    (bytes as f64 / GIB * 1000.0).round() / 1000.0
}

fn item(name: impl Into<String>, bytes: u64) -> Item {
    Item {
        name: name.into(),
        bytes,
        gib: gib(bytes),
    }
}

fn phase(name: &str, what: impl Into<String>, items: Vec<Item>) -> Phase {
    let peak_bytes = items.iter().map(|i| i.bytes).sum();
    Phase {
        name: name.into(),
        what: what.into(),
        items,
        peak_bytes,
        peak_gib: gib(peak_bytes),
        fits: None,
    }
}

#[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; the workspace allows 1.85.
/// Token counts for `shape` (pixels): text `max_text_seq_length`, video
/// `ceil(latent_frames / patch_size_t) x (H / 8 / p) x (W / 8 / p)`.
pub fn tokens(models: &ModelConfigs, shape: Shape) -> Result<Tokens, PlanError> {
    let t = &models.transformer;
    let tc = t.temporal_compression_ratio.max(1);
    let scale = models.vae.spatial_scale();
    let p = t.patch_size.max(1);
    if shape.frames == 0 || (shape.frames - 1) % tc != 0 {
        return Err(PlanError::Input(format!(
            "resolution {shape}: frames must be {tc}k + 1 for a temporal compression of {tc}"
        )));
    }
    if shape.height % (scale * p) != 0
        || shape.width % (scale * p) != 0
        || shape.height == 0
        || shape.width == 0
    {
        return Err(PlanError::Input(format!(
            "resolution {shape}: height and width must be positive multiples of {} (VAE scale {scale} x patch size {p})",
            scale * p
        )));
    }
    let latent_frames = (shape.frames - 1) / tc + 1;
    let pt = t.patch_size_t.unwrap_or(1).max(1);
    let video = latent_frames.div_ceil(pt) * (shape.height / scale / p) * (shape.width / scale / p);
    let text = t.max_text_seq_length;
    Ok(Tokens {
        text,
        video,
        total: text + video,
    })
}

/// Runtime memory of the process or device context that no tensor accounts for: the binary, its
/// libraries and allocator on the CPU; the CUDA context and kernels on a GPU.
pub fn runtime_bytes(device: DeviceKind) -> u64 {
    match device {
        DeviceKind::Cpu => 64 << 20,
        DeviceKind::Cuda => 512 << 20,
    }
}

/// Computes the plan of `input`.
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    let m = &input.models;
    let t = &m.transformer;
    t.validate()
        .map_err(|e| PlanError::Model(format!("{}: transformer config: {e}", m.source)))?;
    if input.batch_size == 0 {
        return Err(PlanError::Input(
            "`[train] batch_size` must be at least 1".into(),
        ));
    }
    let tokens = tokens(m, input.shape)?;
    let weights = params::transformer_parameters(t);
    let vae_params = params::vae_parameters(&m.vae);
    let t5_params = params::t5_encoder_parameters(&m.text_encoder);
    let (trainable, training) = trainable_parameters(t, &input.trainable)?;
    let runtime = item(
        "runtime (process, libraries, device context)",
        runtime_bytes(input.device),
    );
    let weights_item = |name: &str, n: u64| {
        item(
            format!("{name} weights ({} parameters, f32)", human(n)),
            n * F32,
        )
    };
    let mut phases = Vec::new();

    // prepare, in two passes with one model each: every clip decoded and VAE-encoded (tiled
    // and sliced, diffusers' defaults), the VAE released, then every prompt T5-encoded.
    let video = 3 * (input.shape.frames * input.shape.height * input.shape.width) as u64 * F32;
    let encode = activations::vae_encode_bytes(&m.vae, input.shape);
    let t5_act = activations::t5_bytes(&m.text_encoder, t.max_text_seq_length);
    phases.push(phase(
        "prepare-latents",
        "VAE encode (tiled) of each clip, once, into the cache",
        vec![
            weights_item("VAE", vae_params),
            item(format!("video frames ({}, f32)", input.shape), video),
            item(
                "VAE encode activations (largest tile and frame batch)",
                encode,
            ),
            runtime.clone(),
        ],
    ));
    phases.push(phase(
        "prepare-prompts",
        "T5 encode of each caption, once, into the cache (after the VAE is released)",
        vec![
            // bf16 under mixed precision (`MixedPrecision::text_encoder_dtype`), else f32.
            match input.mixed_precision.text_encoder_dtype() {
                Some(_) => item(
                    format!("T5 encoder weights ({} parameters, bf16)", human(t5_params)),
                    t5_params * 2,
                ),
                None => weights_item("T5 encoder", t5_params),
            },
            item("T5 activations", t5_act),
            runtime.clone(),
        ],
    ));

    // train.
    let checkpointing =
        Checkpointing::from_flags(input.gradient_checkpointing, input.checkpoint_offload);
    let policy = ActivationPolicy {
        checkpointing,
        recompute_feed_forward: input.recompute_feed_forward,
    };
    let mut train = train_phase(
        t,
        tokens,
        input.batch_size,
        &input.trainable,
        policy,
        input.mixed_precision,
        input.device,
        &input.distribution,
    )?;
    if m.is_i2v() {
        train
            .items
            .insert(1, weights_item("VAE (I2V image latents)", vae_params));
        train = phase(&train.name, train.what, train.items);
    }
    phases.push(train);

    // validation: the pipeline loads the VAE next to the model being trained; the prompts were
    // T5-encoded before training (T5 is released before the transformer loads).
    if let Some(v) = input.validation {
        let vt = self::tokens(m, v.shape)?;
        let batch = if v.guidance { 2 } else { 1 };
        let sample = activations::inference_bytes(
            t,
            vt,
            batch,
            &input.trainable,
            input.mixed_precision.bytes(),
            input.device,
        );
        let decode = activations::vae_decode_bytes(&m.vae, v.shape);
        let frames = 3 * (v.shape.frames * v.shape.height * v.shape.width) as u64 * F32;
        let mut kept = Vec::new();
        if let Trainable::Lora { .. } = input.trainable {
            kept.push(item("adapter weights kept (f32)", trainable * F32));
        }
        if input
            .distribution
            .half_masters(&input.trainable, input.mixed_precision)
        {
            kept.push(input.distribution.masters_item(trainable, input.device));
        }
        // SFT: the weights are the trainables (counted above); AdamW's two states stay.
        kept.push(
            input
                .distribution
                .adam_item(trainable, input.device, "AdamW states kept (f32)"),
        );
        phases.push(phase(
            "validation",
            format!(
                "sampling {} ({} tokens, batch {batch}) and the VAE decode",
                v.shape, vt.total
            ),
            vec![
                transformer_weights_item(
                    weights,
                    &input.trainable,
                    input.mixed_precision,
                    input
                        .distribution
                        .half_masters(&input.trainable, input.mixed_precision),
                ),
                weights_item("VAE", vae_params),
            ]
            .into_iter()
            .chain(kept)
            .chain([
                item(
                    "largest activation (transformer step or tiled VAE decode)",
                    sample.max(decode),
                ),
                item("decoded frames (f32)", frames),
                runtime,
            ])
            .collect(),
        ));
    }

    let top = phases
        .iter()
        .max_by_key(|p| p.peak_bytes)
        .expect("at least two phases");
    Ok(Plan {
        model: m.source.clone(),
        device: input.device,
        shape: input.shape,
        batch_size: input.batch_size,
        training,
        gradient_checkpointing: input.gradient_checkpointing,
        checkpoint_offload: checkpointing == Checkpointing::Offloaded,
        recompute_feed_forward: input.recompute_feed_forward,
        mixed_precision: input.mixed_precision,
        tokens,
        distribution: input.distribution,
        transformer_parameters: weights,
        trainable_parameters: trainable,
        peak_bytes: top.peak_bytes,
        peak_gib: top.peak_gib,
        peak_phase: top.name.clone(),
        phases,
        budget_gib: None,
        fits: None,
    })
}

/// The transformer's weights as they are resident: frozen weights in the compute dtype, SFT's
/// trained (master) weights in f32.
fn transformer_weights_item(
    weights: u64,
    trainable: &Trainable,
    precision: MixedPrecision,
    half_masters: bool,
) -> Item {
    let (bytes, dtype) = match trainable {
        Trainable::Full if half_masters => (precision.bytes(), precision.name()),
        Trainable::Full => (F32, "f32"),
        Trainable::Lora { .. } => (
            precision.bytes(),
            if precision.is_half() {
                precision.name()
            } else {
                "f32"
            },
        ),
    };
    item(
        format!(
            "transformer weights ({} parameters, {dtype})",
            human(weights)
        ),
        weights * bytes,
    )
}

/// Trainable parameter count and a description of what is trained.
pub fn trainable_parameters(
    t: &TransformerConfig,
    trainable: &Trainable,
) -> Result<(u64, String), PlanError> {
    match trainable {
        Trainable::Lora { rank, targets } => {
            if *rank == 0 {
                return Err(PlanError::Input("`[train] rank` must be at least 1".into()));
            }
            let n = activations::lora_parameters(t, *rank, targets);
            if n == 0 {
                return Err(PlanError::Input(format!(
                    "`[train] target_modules` = {targets:?} matches no linear layer of the transformer"
                )));
            }
            Ok((n, format!("LoRA rank {rank} on {}", targets.join(", "))))
        }
        Trainable::Full => Ok((
            params::transformer_parameters(t) - params::learned_positional_parameters(t),
            "full fine-tuning (SFT)".to_string(),
        )),
    }
}

/// The training phase alone: transformer weights, trainable parameters, gradients, AdamW
/// states, activations and workspaces of one step at `tokens` x `batch` (what `cogvx bench
/// train-step` runs, and what it compares its measured peak with).
#[allow(clippy::too_many_arguments)]
pub fn train_phase(
    t: &TransformerConfig,
    tokens: Tokens,
    batch: usize,
    trainable: &Trainable,
    policy: ActivationPolicy,
    precision: MixedPrecision,
    device: DeviceKind,
    distribution: &Distribution,
) -> Result<Phase, PlanError> {
    let (n, _) = trainable_parameters(t, trainable)?;
    let weights = params::transformer_parameters(t);
    // On the CPU host memory is the device's: offloading moves nothing out of the budget.
    let checkpointing = match (policy.checkpointing, device) {
        (Checkpointing::Offloaded, DeviceKind::Cpu) => Checkpointing::Blocks,
        (c, _) => c,
    };
    let act = activations::training(
        t,
        tokens,
        batch,
        trainable,
        ActivationPolicy {
            checkpointing,
            ..policy
        },
        precision.bytes(),
        device,
    );
    let half_masters = distribution.half_masters(trainable, precision);
    let mut items = vec![transformer_weights_item(
        weights,
        trainable,
        precision,
        half_masters,
    )];
    if half_masters {
        items.push(distribution.masters_item(n, device));
    } else if *trainable == Trainable::Full && precision.is_half() {
        // autocast: each f32 master weight is cast to half at use, and the copy is kept for the
        // backward of its layer.
        items.push(item(
            format!("half copies of the weights ({})", precision.name()),
            weights * precision.bytes(),
        ));
    }
    if let Trainable::Lora { .. } = trainable {
        items.push(item(
            format!("trainable parameters ({}, f32)", human(n)),
            n * F32,
        ));
    }
    if half_masters {
        items.push(item(
            format!("gradients ({})", precision.name()),
            n * precision.bytes(),
        ));
    } else {
        items.push(item("gradients (f32)", n * F32));
    }
    items.push(distribution.adam_item(n, device, "AdamW states (2 per parameter, f32)"));
    items.push(item(
        match checkpointing {
            Checkpointing::Off => "activations kept for the backward (every block)".to_string(),
            Checkpointing::Blocks => "activations: block inputs, output layers, one recomputed block".to_string(),
            Checkpointing::Offloaded => format!(
                "activations: output layers, one recomputed block (block inputs in host memory: {:.2} GiB)",
                act.offloaded as f64 / GIB
            ),
        },
        act.saved,
    ));
    items.push(item(
        "backward workspace (gradients at the backward's peak, beside the tiles)",
        act.workspace,
    ));
    items.push(item(
        "attention workspace (FlashAttention tiles)",
        act.attention,
    ));
    items.push(item(
        "inputs (latents, noise, prompt embeddings)",
        act.inputs,
    ));
    items.push(item(
        "runtime (process, libraries, device context)",
        runtime_bytes(device),
    ));
    let what = format!(
        "{} tokens ({} text + {} video) x batch {batch}, {}{}",
        tokens.total,
        tokens.text,
        tokens.video,
        match checkpointing {
            Checkpointing::Off => "no checkpointing",
            Checkpointing::Blocks => "gradient checkpointing",
            Checkpointing::Offloaded =>
                "gradient checkpointing, block inputs offloaded to host memory",
        },
        if policy.recompute_feed_forward {
            ", feed-forwards recomputed"
        } else {
            ""
        }
    );
    Ok(phase("train", what, items))
}

impl Plan {
    /// Sets the verdict of every phase and of the whole plan for a budget of `gib` GiB.
    pub fn with_budget(mut self, gib: f64) -> Self {
        let budget = gib * GIB;
        for p in &mut self.phases {
            p.fits = Some(p.peak_bytes as f64 <= budget);
        }
        self.budget_gib = Some(gib);
        self.fits = Some(self.peak_bytes as f64 <= budget);
        self
    }

    /// The plan as a table for people.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let precision = if self.mixed_precision.is_half() {
            format!(", mixed precision {}", self.mixed_precision.name())
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "model {} on {}, {} x batch {}, {}{precision}",
            self.model, self.device, self.shape, self.batch_size, self.training
        );
        let _ = writeln!(
            s,
            "transformer {} parameters, {} trainable",
            human(self.transformer_parameters),
            human(self.trainable_parameters)
        );
        let spread = self.distribution.describe();
        if !spread.is_empty() {
            let _ = writeln!(s, "{spread}");
        }
        for p in &self.phases {
            let verdict = match p.fits {
                Some(true) => "  fits",
                Some(false) => "  DOES NOT FIT",
                None => "",
            };
            let _ = writeln!(s, "\n{}: {}", p.name, p.what);
            for i in &p.items {
                let _ = writeln!(s, "  {:<70} {:>8.2} GiB", i.name, i.gib);
            }
            let _ = writeln!(
                s,
                "  {:<70} {:>8.2} GiB{verdict}",
                format!("peak of {}", p.name),
                p.peak_gib
            );
        }
        let _ = write!(s, "\npeak {:.2} GiB ({})", self.peak_gib, self.peak_phase);
        match (self.budget_gib, self.fits) {
            (Some(b), Some(true)) => {
                let _ = write!(s, ": fits in {b} GiB");
            }
            (Some(b), Some(false)) => {
                let over: Vec<_> = self
                    .phases
                    .iter()
                    .filter(|p| p.fits == Some(false))
                    .map(|p| p.name.as_str())
                    .collect();
                let _ = write!(s, ": does not fit in {b} GiB ({} over)", over.join(", "));
            }
            _ => {}
        }
        s.push('\n');
        s
    }
}

/// `1.69e9`-style counts for labels.
fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
