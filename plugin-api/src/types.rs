//! The data types exchanged between the cogvx host and its plugins.
//!
//! Every type here has a twin in the WIT package (`wit/v0.1.0/cogvx-plugin.wit`) and is
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
    /// First frame of the range (inclusive).
    pub start: u32,
    /// One past the last frame of the range (exclusive); above `start`, at most the clip's
    /// frame count.
    pub end: u32,
}

/// One training sample as listed by a dataset reader. Paths are relative to the dataset root.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The caption (training prompt) of the clip.
    pub caption: String,
    /// Path of the video clip.
    pub video: String,
    /// Path of the conditioning image, for image-to-video; `None` without one.
    pub image: Option<String>,
    /// The part of the clip to use; `None` uses the whole clip.
    pub frames: Option<FrameRange>,
    /// Where the sample came from, for error messages (e.g. `videos.txt:3`).
    pub origin: String,
}

// ---------------------------------------------------------------- video transform

/// What the host knows about a clip before decoding it (display orientation, i.e. after rotation).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipInfo {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Number of frames in the clip (or in the sample's frame range).
    pub frame_count: u32,
    /// Average frame rate in frames per second.
    pub fps: f64,
}

/// The training resolution: frames x height x width (e.g. 49x480x720).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// Frames per clip, 8N+1 (the VAE compresses time by 4 after the first frame).
    pub frames: u32,
    /// Height in pixels, a multiple of 16.
    pub height: u32,
    /// Width in pixels, a multiple of 16.
    pub width: u32,
}

impl std::str::FromStr for Resolution {
    type Err = String;
    /// Parses `FRAMESxHEIGHTxWIDTH` (e.g. `49x480x720`), checking that the frame count is 8N+1
    /// and the sides are positive multiples of 16; the error says what to write.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(['x', 'X']).collect();
        let nums: Vec<u32> = parts.iter().filter_map(|p| p.trim().parse().ok()).collect();
        if parts.len() != 3 || nums.len() != 3 {
            return Err(format!(
                "`{s}` is not a resolution: write FRAMESxHEIGHTxWIDTH, e.g. 49x480x720"
            ));
        }
        let r = Resolution {
            frames: nums[0],
            height: nums[1],
            width: nums[2],
        };
        if r.frames == 0 || (r.frames - 1) % 8 != 0 {
            return Err(format!("resolution `{s}`: the frame count must be 8N+1 (9, 17, 25, 33, 41, 49, ...), got {}", r.frames));
        }
        if r.height == 0 || r.width == 0 || r.height % 16 != 0 || r.width % 16 != 0 {
            return Err(format!(
                "resolution `{s}`: height and width must be positive multiples of 16, got {}x{}",
                r.height, r.width
            ));
        }
        Ok(r)
    }
}

impl std::fmt::Display for Resolution {
    /// `FRAMESxHEIGHTxWIDTH`, the form [`FromStr`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.frames, self.height, self.width)
    }
}

/// A crop rectangle in source pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// Left edge, in pixels from the frame's left side.
    pub x: u32,
    /// Top edge, in pixels from the frame's top.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// An output size in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// The resampling filter the host uses to resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeFilter {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear interpolation.
    Bilinear,
    /// Bicubic interpolation (Catmull-Rom).
    Bicubic,
    /// Lanczos with three lobes; the default.
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
    /// The filter used for `resize`.
    pub filter: ResizeFilter,
}

/// The largest output side a plan may ask for, in pixels.
pub const MAX_PLAN_SIDE: u32 = 16_384;
/// The largest number of frame indices a plan may list.
pub const MAX_PLAN_FRAMES: usize = 100_000;

impl TransformPlan {
    /// The identity plan: every frame, no crop, no resize.
    pub fn identity(clip: &ClipInfo) -> Self {
        TransformPlan {
            frames: (0..clip.frame_count).collect(),
            crop: None,
            resize: None,
            filter: ResizeFilter::default(),
        }
    }

    /// Checks the plan against the clip it is for: at least one and at most
    /// [`MAX_PLAN_FRAMES`] frames, every index `< clip.frame_count`, a non-empty crop box
    /// inside the frame, an output size that is non-zero and at most [`MAX_PLAN_SIDE`].
    /// The message says what is wrong; the host prefixes it with the plugin's name.
    pub fn check(&self, clip: &ClipInfo) -> Result<(), String> {
        if self.frames.is_empty() {
            return Err("the plan selects no frames".into());
        }
        if self.frames.len() > MAX_PLAN_FRAMES {
            return Err(format!(
                "the plan selects {} frames, more than the limit of {MAX_PLAN_FRAMES}",
                self.frames.len()
            ));
        }
        if let Some((pos, &index)) = self
            .frames
            .iter()
            .enumerate()
            .find(|(_, &i)| i >= clip.frame_count)
        {
            return Err(format!(
                "frame index {index} (position {pos} of {}) is out of range: the clip has {} frames (valid: 0..{})",
                self.frames.len(),
                clip.frame_count,
                clip.frame_count
            ));
        }
        if let Some(c) = self.crop {
            if c.width == 0 || c.height == 0 {
                return Err(format!(
                    "the crop box {}x{} at ({}, {}) has a zero size",
                    c.width, c.height, c.x, c.y
                ));
            }
            let right = c.x as u64 + c.width as u64;
            let bottom = c.y as u64 + c.height as u64;
            if right > clip.width as u64 || bottom > clip.height as u64 {
                return Err(format!(
                    "the crop box {}x{} at ({}, {}) lies outside the {}x{} frame (it reaches x={right}, y={bottom})",
                    c.width, c.height, c.x, c.y, clip.width, clip.height
                ));
            }
        }
        if let Some(s) = self.resize {
            if s.width == 0 || s.height == 0 {
                return Err(format!(
                    "the output size {}x{} has a zero side",
                    s.width, s.height
                ));
            }
            if s.width > MAX_PLAN_SIDE || s.height > MAX_PLAN_SIDE {
                return Err(format!(
                    "the output size {}x{} exceeds the {MAX_PLAN_SIDE} px limit",
                    s.width, s.height
                ));
            }
        }
        Ok(())
    }
}

/// Input of [`crate::Plugin::plan_transform`]: the clip, the target resolution, the plan
/// built so far by earlier transforms in the chain, and a per-sample seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformRequest {
    /// The clip, restricted to the sample's frame range.
    pub clip: ClipInfo,
    /// The training resolution.
    pub target: Resolution,
    /// The plan so far; the identity plan for the first transform of the chain.
    pub plan: TransformPlan,
    /// Per-sample seed (from the run's seed, the video's content and the frame range), for
    /// deterministic random choices.
    pub seed: u64,
}

/// Decoded frames, RGB8, row-major, `count * height * width * 3` bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frames {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Number of frames.
    pub count: u32,
    /// The pixels, frame after frame: `count * height * width * 3` bytes.
    pub rgb: Vec<u8>,
}

impl Frames {
    /// Checks that the value is consistent: non-zero sizes and `count * height * width * 3`
    /// bytes of RGB.
    pub fn check(&self) -> Result<(), String> {
        if self.width == 0 || self.height == 0 || self.count == 0 {
            return Err(format!(
                "the frames have a zero size ({} frames of {}x{})",
                self.count, self.width, self.height
            ));
        }
        let want = self.count as u64 * self.height as u64 * self.width as u64 * 3;
        if self.rgb.len() as u64 != want {
            return Err(format!(
                "{} frames of {}x{} RGB need {want} bytes, got {}",
                self.count,
                self.width,
                self.height,
                self.rgb.len()
            ));
        }
        Ok(())
    }
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
    Factor {
        /// Factor `Out` when set, `In` otherwise.
        of_out: bool,
        /// The largest factor allowed (0 counts as 1).
        limit: u32,
        /// Take the cofactor (the dimension divided by the factor) instead of the factor.
        cofactor: bool,
    },
}

/// How an adapter parameter is initialised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal(0, std).
    Normal {
        /// Standard deviation.
        std: f32,
    },
    /// PyTorch's `kaiming_uniform_(a)` over the parameter's fan-in (last dim).
    KaimingUniform {
        /// The negative slope `a` of `kaiming_uniform_` (LoRA's `lora_A` uses `√5`).
        a: f32,
    },
    /// The row L2 norm of the base weight (DoRA's magnitude vector), shape `[Out]`.
    BaseRowNorm,
}

/// One trainable (or frozen) adapter parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Name, unique in the recipe; [`Op::Param`] and [`ExportKey::param`] refer to it.
    pub name: String,
    /// The shape: one dimension (a vector) or two (a matrix).
    pub shape: Vec<Dim>,
    /// How the parameter is initialised.
    pub init: Init,
    /// Whether training updates it; a frozen parameter keeps its initial value.
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
    /// Matrix product, `[m, k] x [k, n] -> [m, n]`.
    Matmul(u32, u32),
    /// Element-wise sum of two values of the same shape.
    Add(u32, u32),
    /// Element-wise difference (first minus second) of two values of the same shape.
    Sub(u32, u32),
    /// Element-wise product (with broadcasting of a `[Out]` vector over rows).
    Mul(u32, u32),
    /// Element-wise division (with broadcasting of a `[Out]` vector over rows).
    Div(u32, u32),
    /// Multiply by a constant.
    Scale(u32, f32),
    /// Multiply by `alpha / rank` of the configured adapter.
    AlphaOverRank(u32),
    /// Matrix transpose, `[m, n] -> [n, m]`.
    Transpose(u32),
    /// The L2 norm of each row, `[Out, In] -> [Out]`.
    RowNorm(u32),
    /// Kronecker product.
    Kron(u32, u32),
    /// The operand's value with no gradient flowing back through it (PyTorch's `.detach()`, a
    /// stop-gradient): same shape and forward value, treated as a constant in the backward pass.
    /// DoRA uses it for its weight norm (PEFT `lora/dora.py`, DoRA paper §4.3). JSON:
    /// `{"detach": 3}`; added after API 0.1.0's first release (a host that predates it refuses
    /// a recipe using it as invalid JSON).
    Detach(u32),
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
    /// The layer's input features (the base weight is `[Out, In]`).
    pub in_features: u32,
    /// The layer's output features.
    pub out_features: u32,
    /// The configured rank, positive.
    pub rank: u32,
    /// The configured alpha (PEFT's `lora_alpha`); [`Op::AlphaOverRank`] scales by `alpha / rank`.
    pub alpha: f32,
}

impl AdapterRequest {
    /// Checks what every adapter needs: a positive rank (PEFT's `update_layer`), non-zero
    /// features and a finite alpha. The message names the layer; callers prefix their name.
    pub fn check(&self) -> Result<(), String> {
        let layer = &self.layer;
        if self.rank == 0 {
            return Err(format!(
                "layer `{layer}`: the rank must be a positive integer, not 0"
            ));
        }
        if self.in_features == 0 || self.out_features == 0 {
            let (i, o) = (self.in_features, self.out_features);
            return Err(format!(
                "layer `{layer}` has {i} -> {o} features; both must be positive"
            ));
        }
        if !self.alpha.is_finite() {
            return Err(format!(
                "layer `{layer}`: alpha {} is not finite",
                self.alpha
            ));
        }
        Ok(())
    }
}

/// How a parameter is named in the exported file: `<prefix>.<layer>.<suffix>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportKey {
    /// The parameter's name ([`ParamSpec::name`]).
    pub param: String,
    /// The name after the layer, e.g. `lora_A.weight`; unique in the recipe.
    pub suffix: String,
}

/// A declarative adapter: parameters, a flat op graph the host lowers to differentiable ops,
/// and the names under which the parameters are exported (PEFT naming).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecipe {
    /// The adapter's parameters.
    pub params: Vec<ParamSpec>,
    /// The op graph; node `i` refers only to nodes before it.
    pub graph: Vec<Op>,
    /// Index of the node whose value is the adapter's output.
    pub output: u32,
    /// What the output node's value means.
    pub output_kind: AdapterOutput,
    /// The export names of the parameters; every trainable parameter needs one.
    pub export: Vec<ExportKey>,
    /// PEFT's adapter type for the export metadata, e.g. `LORA`, `LOHA`, `LOKR`.
    pub peft_type: String,
}

// ---------------------------------------------------------------- scheduler

/// Training-side tables of a noise schedule.
///
/// A plugin that only changes which timesteps training samples (logit-normal, shifted, ...)
/// leaves `alphas_cumprod` and `loss_weights` empty: the host then keeps the model folder's own
/// schedule and its loss weights, and `timestep_weights` must have `num_train_timesteps` values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerTables {
    /// `alphas_cumprod[t]` for `t in 0..num_train_timesteps`; empty: the model's own.
    pub alphas_cumprod: Vec<f64>,
    /// Unnormalised probability of sampling each training timestep; `None` is uniform.
    pub timestep_weights: Option<Vec<f64>>,
    /// Loss weight per timestep (CogVideoX: `1 / (1 - alphas_cumprod)`); empty with an empty
    /// `alphas_cumprod`.
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
    /// Coefficient of `sample` in `x0`.
    pub x0_sample: f64,
    /// Coefficient of `model_output` in `x0`.
    pub x0_model_output: f64,
    /// Coefficient of `sample` in `prev`.
    pub sample_coef: f64,
    /// Coefficient of `model_output` in `prev`.
    pub model_output_coef: f64,
    /// Coefficient of this step's `x0` in `prev`.
    pub x0_coef: f64,
    /// Coefficients of earlier steps' `x0` in `prev`, most recent first; empty for none.
    pub x0_history: Vec<f64>,
    /// Coefficient of fresh standard-normal noise in `prev`; `0` draws no noise.
    pub noise_coef: f64,
}

/// A whole inference schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferencePlan {
    /// The steps in the order they run, one model call each; at least one.
    pub steps: Vec<StepCoefficients>,
}

/// Input of [`crate::Plugin::scheduler_plan`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerPlanRequest {
    /// The model folder's `scheduler/scheduler_config.json`, verbatim.
    pub config_json: String,
    /// The number of inference steps asked for.
    pub num_inference_steps: u32,
}

// ---------------------------------------------------------------- validator

/// Input of [`crate::Plugin::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidateRequest {
    /// The prompt the video was generated from.
    pub prompt: String,
    /// The decoded video.
    pub frames: Frames,
    /// The video's frame rate in frames per second.
    pub fps: f64,
}

/// A named scalar a validator reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Name; the host logs it as `<validator>.<name>`.
    pub name: String,
    /// The value; a non-finite one is logged as null.
    pub value: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip() -> ClipInfo {
        ClipInfo {
            width: 640,
            height: 360,
            frame_count: 10,
            fps: 24.0,
        }
    }

    fn plan() -> TransformPlan {
        TransformPlan {
            frames: vec![0, 5, 9, 9],
            crop: Some(CropBox {
                x: 40,
                y: 0,
                width: 600,
                height: 360,
            }),
            resize: Some(Size {
                width: 720,
                height: 480,
            }),
            filter: ResizeFilter::Lanczos3,
        }
    }

    #[test]
    fn plan_check_accepts_good_plans() {
        assert_eq!(plan().check(&clip()), Ok(()));
        assert_eq!(TransformPlan::identity(&clip()).check(&clip()), Ok(()));
    }

    #[test]
    fn plan_check_rejects_each_bad_plan_with_a_reason() {
        let check = |f: &dyn Fn(&mut TransformPlan)| {
            let mut p = plan();
            f(&mut p);
            p.check(&clip()).unwrap_err()
        };
        assert_eq!(check(&|p| p.frames.clear()), "the plan selects no frames");
        assert_eq!(
            check(&|p| p.frames = vec![0; MAX_PLAN_FRAMES + 1]),
            format!(
                "the plan selects {} frames, more than the limit of {MAX_PLAN_FRAMES}",
                MAX_PLAN_FRAMES + 1
            )
        );
        assert_eq!(
            check(&|p| p.frames = vec![0, 10]),
            "frame index 10 (position 1 of 2) is out of range: the clip has 10 frames (valid: 0..10)"
        );
        assert_eq!(
            check(&|p| p.crop = Some(CropBox { x: 100, y: 0, width: 600, height: 360 })),
            "the crop box 600x360 at (100, 0) lies outside the 640x360 frame (it reaches x=700, y=360)"
        );
        assert!(check(&|p| p.crop = Some(CropBox {
            x: u32::MAX,
            y: 0,
            width: 2,
            height: 1
        }))
        .contains("lies outside"));
        assert_eq!(
            check(&|p| p.crop = Some(CropBox {
                x: 0,
                y: 0,
                width: 0,
                height: 360
            })),
            "the crop box 0x360 at (0, 0) has a zero size"
        );
        assert_eq!(
            check(&|p| p.resize = Some(Size {
                width: 720,
                height: 0
            })),
            "the output size 720x0 has a zero side"
        );
        assert_eq!(
            check(&|p| p.resize = Some(Size {
                width: 720,
                height: MAX_PLAN_SIDE + 1
            })),
            format!(
                "the output size 720x{} exceeds the {MAX_PLAN_SIDE} px limit",
                MAX_PLAN_SIDE + 1
            )
        );
    }

    #[test]
    fn ops_serialise_as_kebab_case_json() {
        let graph = vec![
            Op::BaseWeight,
            Op::Param("m".into()),
            Op::RowNorm(0),
            Op::Detach(2),
            Op::Div(1, 3),
            Op::Scale(4, 0.5),
        ];
        let json = serde_json::to_string(&graph).unwrap();
        assert_eq!(
            json,
            r#"["base-weight",{"param":"m"},{"row-norm":0},{"detach":2},{"div":[1,3]},{"scale":[4,0.5]}]"#
        );
        assert_eq!(serde_json::from_str::<Vec<Op>>(&json).unwrap(), graph);
        assert_eq!(
            serde_json::from_str::<Op>(r#"{"detach": 3}"#).unwrap(),
            Op::Detach(3)
        );
    }

    #[test]
    fn frames_check_matches_size_and_bytes() {
        assert_eq!(
            Frames {
                width: 2,
                height: 2,
                count: 1,
                rgb: vec![0; 12]
            }
            .check(),
            Ok(())
        );
        assert_eq!(
            Frames {
                width: 2,
                height: 2,
                count: 1,
                rgb: vec![0; 11]
            }
            .check()
            .unwrap_err(),
            "1 frames of 2x2 RGB need 12 bytes, got 11"
        );
        assert_eq!(
            Frames {
                width: 0,
                height: 2,
                count: 1,
                rgb: vec![]
            }
            .check()
            .unwrap_err(),
            "the frames have a zero size (1 frames of 0x2)"
        );
    }
}
