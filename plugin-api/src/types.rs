//! The data types exchanged between the cogvx host and its plugins.
//!
//! Every type here has a twin in the WIT package (`wit/v0.1.0/cogvx.wit`) and is
//! serde-serialisable, so the same values cross the static, native (`.so`) and WASM
//! transports unchanged.

use serde::{Deserialize, Serialize};

/// The six kinds of plugin the host knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Lists samples (caption, video, optional image and frame range) under a dataset root.
    DatasetReader,
    /// Plans (or, for pixel transforms, performs) a change of a clip's frames, crop and size.
    VideoTransform,
    /// Rewrites a caption.
    PromptRewriter,
    /// Describes a trainable adapter (LoRA and variants) as parameters and an op graph.
    Adapter,
    /// Supplies noise-schedule tables and per-step sampling coefficients.
    Scheduler,
    /// Scores decoded validation frames.
    Validator,
}

impl PluginKind {
    /// All kinds, in declaration order.
    pub const ALL: [PluginKind; 6] = [
        PluginKind::DatasetReader,
        PluginKind::VideoTransform,
        PluginKind::PromptRewriter,
        PluginKind::Adapter,
        PluginKind::Scheduler,
        PluginKind::Validator,
    ];

    /// The kebab-case name used in configs and `cogvx plugins`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PluginKind::DatasetReader => "dataset-reader",
            PluginKind::VideoTransform => "video-transform",
            PluginKind::PromptRewriter => "prompt-rewriter",
            PluginKind::Adapter => "adapter",
            PluginKind::Scheduler => "scheduler",
            PluginKind::Validator => "validator",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a plugin says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Unique name; a loaded plugin replaces the built-in of the same name.
    pub name: String,
    /// The plugin's own version (semver); part of cache keys.
    pub version: String,
    /// The kinds this plugin implements.
    pub kinds: Vec<PluginKind>,
    /// One line for `cogvx plugins`.
    pub description: String,
}

// ---------------------------------------------------------------- dataset reader

/// A half-open frame range `[start, end)` in source-frame indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRange {
    pub start: u32,
    pub end: u32,
}

/// One training sample as listed by a dataset reader. Paths are relative to the dataset root.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub caption: String,
    pub video: String,
    pub image: Option<String>,
    pub frames: Option<FrameRange>,
    /// Where the sample came from, for error messages (e.g. `videos.txt:3`).
    pub origin: String,
}

// ---------------------------------------------------------------- video transform

/// What the host knows about a clip before decoding it (display orientation, i.e. after rotation).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipInfo {
    pub width: u32,
    pub height: u32,
    /// Number of frames in the clip (or in the sample's frame range).
    pub frame_count: u32,
    /// Average frame rate in frames per second.
    pub fps: f64,
}

/// The training resolution: frames x height x width (e.g. 49x480x720).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub frames: u32,
    pub height: u32,
    pub width: u32,
}

/// A crop rectangle in source pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// An output size in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

/// The resampling filter the host uses to resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeFilter {
    Nearest,
    Bilinear,
    Bicubic,
    #[default]
    Lanczos3,
}

/// A preprocessing plan that the host executes natively: which source frames to decode
/// (in order, repeats allowed), which rectangle of each to keep, and the size to resize it to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformPlan {
    /// Source frame indices, each `< ClipInfo::frame_count`.
    pub frames: Vec<u32>,
    /// The crop applied before resizing; `None` keeps the whole frame.
    pub crop: Option<CropBox>,
    /// The output size; `None` keeps the (cropped) size.
    pub resize: Option<Size>,
    pub filter: ResizeFilter,
}

impl TransformPlan {
    /// The identity plan: every frame, no crop, no resize.
    pub fn identity(clip: &ClipInfo) -> Self {
        TransformPlan { frames: (0..clip.frame_count).collect(), crop: None, resize: None, filter: ResizeFilter::default() }
    }
}

/// Input of [`crate::Plugin::plan_transform`]: the clip, the target resolution, the plan
/// built so far by earlier transforms in the chain, and a per-sample seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformRequest {
    pub clip: ClipInfo,
    pub target: Resolution,
    pub plan: TransformPlan,
    pub seed: u64,
}

/// Decoded frames, RGB8, row-major, `count * height * width * 3` bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frames {
    pub width: u32,
    pub height: u32,
    pub count: u32,
    pub rgb: Vec<u8>,
}

// ---------------------------------------------------------------- adapter

/// A symbolic dimension of an adapter parameter, resolved against the target layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dim {
    /// The target layer's input features.
    In,
    /// The target layer's output features.
    Out,
    /// The configured rank.
    Rank,
    /// A fixed size.
    Fixed(u32),
    /// A factor of `In` or `Out` (LoKr): the largest divisor of the dimension that is `<= limit`,
    /// or its cofactor when `cofactor` is set.
    Factor { of_out: bool, limit: u32, cofactor: bool },
}

/// How an adapter parameter is initialised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    Zeros,
    Ones,
    /// Normal(0, std).
    Normal { std: f32 },
    /// PyTorch's `kaiming_uniform_(a)` over the parameter's fan-in (last dim).
    KaimingUniform { a: f32 },
    /// The row L2 norm of the base weight (DoRA's magnitude vector), shape `[Out]`.
    BaseRowNorm,
}

/// One trainable (or frozen) adapter parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<Dim>,
    pub init: Init,
    pub trainable: bool,
}

/// One node of an adapter's flat op graph. Operands are indices of earlier nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// The frozen base weight `[Out, In]`.
    BaseWeight,
    /// A parameter by name.
    Param(String),
    Matmul(u32, u32),
    Add(u32, u32),
    Sub(u32, u32),
    /// Element-wise product (with broadcasting of a `[Out]` vector over rows).
    Mul(u32, u32),
    /// Element-wise division (with broadcasting of a `[Out]` vector over rows).
    Div(u32, u32),
    /// Multiply by a constant.
    Scale(u32, f32),
    /// Multiply by `alpha / rank` of the configured adapter.
    AlphaOverRank(u32),
    Transpose(u32),
    /// The L2 norm of each row, `[Out, In] -> [Out]`.
    RowNorm(u32),
    /// Kronecker product.
    Kron(u32, u32),
}

/// What the graph's output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterOutput {
    /// The output is `ΔW`; the effective weight is `W + ΔW`.
    WeightDelta,
    /// The output is the effective weight itself.
    Weight,
}

/// The layer an adapter is asked to wrap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterRequest {
    /// Module path in diffusers naming, e.g. `transformer_blocks.0.attn1.to_q`.
    pub layer: String,
    pub in_features: u32,
    pub out_features: u32,
    pub rank: u32,
    pub alpha: f32,
}

/// How a parameter is named in the exported file: `<prefix>.<layer>.<suffix>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportKey {
    pub param: String,
    pub suffix: String,
}

/// A declarative adapter: parameters, a flat op graph the host lowers to differentiable ops,
/// and the names under which the parameters are exported (PEFT naming).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecipe {
    pub params: Vec<ParamSpec>,
    pub graph: Vec<Op>,
    /// Index of the node whose value is the adapter's output.
    pub output: u32,
    pub output_kind: AdapterOutput,
    pub export: Vec<ExportKey>,
    /// PEFT's adapter type for the export metadata, e.g. `LORA`, `LOHA`, `LOKR`.
    pub peft_type: String,
}

// ---------------------------------------------------------------- scheduler

/// Training-side tables of a noise schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerTables {
    /// `alphas_cumprod[t]` for `t in 0..num_train_timesteps`.
    pub alphas_cumprod: Vec<f64>,
    /// Unnormalised probability of sampling each training timestep; `None` is uniform.
    pub timestep_weights: Option<Vec<f64>>,
    /// Loss weight per timestep (CogVideoX: `1 / (1 - alphas_cumprod)`).
    pub loss_weights: Vec<f64>,
}

/// Coefficients of one inference step, all linear:
///
/// ```text
/// x0   = x0_sample * sample + x0_model_output * model_output
/// prev = sample * sample_coef + model_output * model_output_coef + x0 * x0_coef
///        + Σ_k history[k] * x0_history[k] + noise * noise_coef
/// ```
///
/// `x0_history[k]` multiplies the x0 of the step `k + 1` steps earlier (DPM-Solver 2M uses one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepCoefficients {
    /// The model timestep for this step.
    pub timestep: u32,
    pub x0_sample: f64,
    pub x0_model_output: f64,
    pub sample_coef: f64,
    pub model_output_coef: f64,
    pub x0_coef: f64,
    pub x0_history: Vec<f64>,
    pub noise_coef: f64,
}

/// A whole inference schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferencePlan {
    pub steps: Vec<StepCoefficients>,
}

/// Input of [`crate::Plugin::scheduler_plan`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerPlanRequest {
    /// The model folder's `scheduler/scheduler_config.json`, verbatim.
    pub config_json: String,
    pub num_inference_steps: u32,
}

// ---------------------------------------------------------------- validator

/// Input of [`crate::Plugin::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidateRequest {
    pub prompt: String,
    pub frames: Frames,
    pub fps: f64,
}

/// A named scalar a validator reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
}
