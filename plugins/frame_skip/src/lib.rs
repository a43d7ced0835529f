//! # `frame_skip` — choose the training frames of a clip
//!
//! A video-transform plugin (plan only). It picks `target.frames` source frames, which must be
//! `8N + 1` (CogVideoX's VAE compresses time by 4 and keeps the first frame: 9, 17, …, 49),
//! from the frames of the current plan. The plan's frame list starts as every frame of the clip
//! (`0..clip.frame_count`); if an earlier transform in the chain narrowed it, the choice is made
//! among *its* frames, in its order. The crop, resize and filter of the plan are kept.
//!
//! ## Rules (`mode`)
//!
//! Let `n` be the number of frames available and `F` the target frame count.
//!
//! * **`uniform`** (default): spread `F` frames evenly over the whole clip, first and last frame
//!   included. Frame `i` (`0 <= i < F`) is position `round(i * (n - 1) / (F - 1))`, rounding
//!   halves up (integer arithmetic: `(2 i (n - 1) + F - 1) / (2 (F - 1))`). For `F = 1` it is
//!   position 0. When `n >= F` the positions are strictly increasing, so no frame repeats.
//! * **`stride`**: keep the source's motion speed for a target frame rate `fps` (default 8).
//!   The stride is `s = max(1, round(clip.fps / fps))` (halves rounded away from zero); the
//!   positions are `0, s, 2s, …` and the first `F` of them are used. The rule assumes the
//!   current frame list is consecutive frames at `clip.fps` (true unless an earlier transform
//!   thinned it).
//!
//! ## Short clips (`short_clip`)
//!
//! A clip has too few frames when `n < F` (`uniform`) or when `n < (F - 1) s + 1` (`stride`).
//!
//! * **`"repeat-last"`** (default): take every available frame (every `s`-th for `stride`), then
//!   repeat the last one up to `F` frames — what the official CogVideoX finetune does
//!   (`finetune/datasets/utils.py::preprocess_video_with_resize`).
//! * **`"reject"`**: the call fails with an error naming the clip's frame count and the count
//!   needed.
//!
//! ## Configuration (`[plugin.frame_skip]`)
//!
//! ```toml
//! [plugin.frame_skip]
//! mode = "uniform"          # or "stride"
//! fps = 8.0                 # target frame rate, used by mode = "stride" only
//! short_clip = "repeat-last" # or "reject"
//! ```
//!
//! Unknown keys are rejected by name.
//!
//! ## Relation to the official finetune
//!
//! The official trainer takes `range(0, n, n // F)[:F]` — a stride of `n // F` from frame 0,
//! which leaves up to `n // F + n % F - 1` frames at the end of the clip unused. `uniform`
//! covers the whole clip instead; `stride` gives a stride tied to the frame rate, not the length.

use cogvx_plugin_api::{
    Plugin, PluginError, PluginInfo, PluginKind, PluginResult, TransformPlan, TransformRequest,
};
use serde::Deserialize;

/// The plugin's name (its crate folder); a loaded plugin of this name replaces the built-in.
pub const NAME: &str = "frame_skip";

/// How frames are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Evenly over the whole clip, first and last frame included.
    #[default]
    Uniform,
    /// Every `round(clip.fps / fps)`-th frame from frame 0.
    Stride,
}

/// What to do with a clip that has too few frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShortClip {
    /// Pad with the last available frame (the official finetune's behaviour).
    #[default]
    RepeatLast,
    /// Fail with an error naming the counts.
    Reject,
}

/// The `[plugin.frame_skip]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mode: Mode,
    /// Target frame rate for `mode = "stride"`.
    pub fps: f64,
    pub short_clip: ShortClip,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Uniform,
            fps: 8.0,
            short_clip: ShortClip::RepeatLast,
        }
    }
}

/// The `frame_skip` plugin.
#[derive(Clone, Debug, Default)]
pub struct FrameSkip {
    config: Config,
}

impl FrameSkip {
    /// A plugin with the given configuration (the built-in default is `Config::default()`).
    pub fn new(config: Config) -> Self {
        FrameSkip { config }
    }
}

fn invalid(msg: String) -> PluginError {
    PluginError::Invalid(format!("{NAME}: {msg}"))
}

/// Parses the `[plugin.frame_skip]` table given as JSON (empty or `null` means all defaults).
pub fn parse_config(params_json: &str) -> PluginResult<Config> {
    let config: Config = cogvx_plugin_api::parse_params(NAME, params_json)?;
    if !(config.fps.is_finite() && config.fps > 0.0) {
        return Err(invalid(format!(
            "[plugin.{NAME}] fps = {} must be a positive number of frames per second",
            config.fps
        )));
    }
    Ok(config)
}

/// `round(i * (n - 1) / (f - 1))` for `i in 0..f`, halves rounded up, in integer arithmetic.
/// Requires `n >= 1`, `f >= 1`.
pub fn uniform_positions(n: u32, f: u32) -> Vec<u32> {
    if f == 1 {
        return vec![0];
    }
    let (n1, f1) = (u64::from(n) - 1, u64::from(f) - 1);
    (0..u64::from(f))
        .map(|i| ((2 * i * n1 + f1) / (2 * f1)) as u32)
        .collect()
}

/// The stride for `mode = "stride"`: `max(1, round(src_fps / target_fps))`.
pub fn stride(src_fps: f64, target_fps: f64) -> PluginResult<u32> {
    if !(src_fps.is_finite() && src_fps > 0.0) {
        return Err(invalid(format!(
            "mode = \"stride\" needs the clip's frame rate, but it is {src_fps}; use mode = \"uniform\" for this dataset"
        )));
    }
    let s = (src_fps / target_fps).round();
    Ok(if s < 1.0 {
        1
    } else if s > f64::from(u32::MAX) {
        u32::MAX
    } else {
        s as u32
    })
}

impl FrameSkip {
    /// Positions (into the current frame list of length `n`) of the `f` frames to keep.
    fn positions(&self, n: u32, f: u32, fps: f64) -> PluginResult<Vec<u32>> {
        let (available, step, rule) = match self.config.mode {
            Mode::Uniform => {
                if n >= f {
                    return Ok(uniform_positions(n, f));
                }
                (n, 1, String::new())
            }
            Mode::Stride => {
                let s = stride(fps, self.config.fps)?;
                let available = (n - 1) / s + 1;
                if available >= f {
                    return Ok((0..f).map(|i| i * s).collect());
                }
                let needed = u64::from(f - 1) * u64::from(s) + 1;
                (
                    available,
                    s,
                    format!(
                        " ({needed} at stride {s} for {fps} fps -> {} fps)",
                        self.config.fps
                    ),
                )
            }
        };
        match self.config.short_clip {
            ShortClip::Reject => Err(invalid(format!(
                "the clip has {n} frames but {f} are needed{rule}; use a longer clip, fewer frames \
                 (8N+1, e.g. --resolution 17x480x720) or short_clip = \"repeat-last\""
            ))),
            ShortClip::RepeatLast => {
                let last = (available - 1) * step;
                Ok((0..f)
                    .map(|i| if i < available { i * step } else { last })
                    .collect())
            }
        }
    }
}

impl Plugin for FrameSkip {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::VideoTransform],
            description: "chooses 8N+1 frames from a clip (uniform or fps stride), short clips repeat the last frame or are rejected".to_string(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.config = parse_config(params_json)?;
        Ok(())
    }

    fn plan_transform(&mut self, request: &TransformRequest) -> PluginResult<TransformPlan> {
        let f = request.target.frames;
        if f % 8 != 1 {
            return Err(invalid(format!(
                "the target frame count {f} is not 8N+1; CogVideoX needs 1, 9, 17, 25, 33, 41, 49, … frames \
                 (e.g. --resolution 49x480x720)"
            )));
        }
        let source = &request.plan.frames;
        if source.is_empty() {
            return Err(invalid(format!(
                "the clip has no frames to choose from (frame_count = {}, plan frames = 0)",
                request.clip.frame_count
            )));
        }
        if let Some(bad) = source.iter().find(|&&i| i >= request.clip.frame_count) {
            return Err(invalid(format!(
                "the incoming plan names frame {bad}, but the clip has {} frames (an earlier transform is wrong)",
                request.clip.frame_count
            )));
        }
        let n = u32::try_from(source.len())
            .map_err(|_| invalid("the plan has more than 2^32 frames".to_string()))?;
        let positions = self.positions(n, f, request.clip.fps)?;
        let mut plan = request.plan.clone();
        plan.frames = positions.into_iter().map(|p| source[p as usize]).collect();
        Ok(plan)
    }
}

cogvx_plugin_api::export_plugin!(FrameSkip);

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_plugin_api::{ClipInfo, CropBox, ResizeFilter, Resolution, Size};

    fn request(frame_count: u32, fps: f64, frames: u32) -> TransformRequest {
        let clip = ClipInfo {
            width: 720,
            height: 480,
            frame_count,
            fps,
        };
        TransformRequest {
            clip,
            target: Resolution {
                frames,
                height: 480,
                width: 720,
            },
            plan: TransformPlan::identity(&clip),
            seed: 7,
        }
    }

    fn plugin(json: &str) -> FrameSkip {
        let mut p = FrameSkip::default();
        p.configure(json).unwrap();
        p
    }

    fn err_text(r: PluginResult<TransformPlan>) -> String {
        match r {
            Err(PluginError::Invalid(m)) => m,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn info_reports_name_version_kind() {
        let info = FrameSkip::default().info();
        assert_eq!(info.name, "frame_skip");
        assert_eq!(info.version, "0.1.0");
        assert_eq!(info.kinds, vec![PluginKind::VideoTransform]);
    }

    #[test]
    fn uniform_spans_whole_clip_with_documented_rounding() {
        let plan = plugin("{}")
            .plan_transform(&request(100, 30.0, 49))
            .unwrap();
        assert_eq!(plan.frames.len(), 49);
        assert_eq!(plan.frames[0], 0);
        assert_eq!(plan.frames[48], 99);
        // i * 99 / 48: 1 -> 2.0625 -> 2, 2 -> 4.125 -> 4, 8 -> 16.5 -> 17 (half up), 24 -> 49.5 -> 50.
        assert_eq!(plan.frames[1], 2);
        assert_eq!(plan.frames[2], 4);
        assert_eq!(plan.frames[8], 17);
        assert_eq!(plan.frames[24], 50);
        assert!(
            plan.frames.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            plan.frames
        );
    }

    #[test]
    fn uniform_exact_length_is_identity_and_one_frame_is_first() {
        let plan = plugin("").plan_transform(&request(49, 24.0, 49)).unwrap();
        assert_eq!(plan.frames, (0..49).collect::<Vec<_>>());
        let plan = plugin("null")
            .plan_transform(&request(10, 24.0, 1))
            .unwrap();
        assert_eq!(plan.frames, vec![0]);
        assert_eq!(uniform_positions(9, 9), (0..9).collect::<Vec<_>>());
        assert_eq!(
            uniform_positions(17, 9),
            vec![0, 2, 4, 6, 8, 10, 12, 14, 16]
        );
    }

    #[test]
    fn short_clip_repeats_last_frame_like_official_finetune() {
        let plan = plugin("{}").plan_transform(&request(30, 30.0, 49)).unwrap();
        let mut want: Vec<u32> = (0..30).collect();
        want.extend(std::iter::repeat_n(29, 19));
        assert_eq!(plan.frames, want);
    }

    #[test]
    fn short_clip_reject_names_counts() {
        let msg =
            err_text(plugin(r#"{"short_clip":"reject"}"#).plan_transform(&request(30, 30.0, 49)));
        assert!(msg.contains("frame_skip"), "{msg}");
        assert!(msg.contains("has 30 frames but 49 are needed"), "{msg}");
    }

    #[test]
    fn stride_from_source_fps() {
        let mut p = plugin(r#"{"mode":"stride","fps":8}"#);
        // 30 / 8 = 3.75 -> stride 4.
        let plan = p.plan_transform(&request(300, 30.0, 49)).unwrap();
        assert_eq!(plan.frames, (0..49).map(|i| i * 4).collect::<Vec<_>>());
        // 25 / 8 = 3.125 -> stride 3; needs 145 frames, 145 available.
        let plan = p.plan_transform(&request(145, 25.0, 49)).unwrap();
        assert_eq!(plan.frames.last(), Some(&144));
        // A source slower than the target: stride 1.
        let plan = p.plan_transform(&request(60, 5.0, 9)).unwrap();
        assert_eq!(plan.frames, (0..9).collect::<Vec<_>>());
        assert_eq!(stride(23.976, 8.0).unwrap(), 3);
        assert_eq!(stride(60.0, 8.0).unwrap(), 8); // 7.5 rounds away from zero
    }

    #[test]
    fn stride_short_clip_pads_or_rejects() {
        // 100 frames at stride 4: positions 0..=96 (25 frames), then 96 repeated.
        let plan = plugin(r#"{"mode":"stride"}"#)
            .plan_transform(&request(100, 30.0, 49))
            .unwrap();
        let mut want: Vec<u32> = (0..25).map(|i| i * 4).collect();
        want.extend(std::iter::repeat_n(96, 24));
        assert_eq!(plan.frames, want);
        let msg = err_text(
            plugin(r#"{"mode":"stride","short_clip":"reject"}"#)
                .plan_transform(&request(100, 30.0, 49)),
        );
        assert!(
            msg.contains("has 100 frames but 49 are needed (193 at stride 4"),
            "{msg}"
        );
    }

    #[test]
    fn stride_needs_a_frame_rate() {
        let msg = err_text(plugin(r#"{"mode":"stride"}"#).plan_transform(&request(100, 0.0, 49)));
        assert!(msg.contains("frame rate"), "{msg}");
    }

    #[test]
    fn chooses_within_narrowed_plan_and_keeps_crop() {
        let mut req = request(200, 30.0, 9);
        req.plan.frames = (50..150).collect();
        req.plan.crop = Some(CropBox {
            x: 1,
            y: 2,
            width: 30,
            height: 20,
        });
        req.plan.resize = Some(Size {
            width: 720,
            height: 480,
        });
        req.plan.filter = ResizeFilter::Bilinear;
        let plan = plugin("{}").plan_transform(&req).unwrap();
        // 99 / 8 = 12.375 per step: 0, 12.4->12, 24.75->25, 37.1->37, 49.5->50, 61.9->62, 74.25->74, 86.6->87, 99.
        assert_eq!(plan.frames, vec![50, 62, 75, 87, 100, 112, 124, 137, 149]);
        assert_eq!(plan.crop, req.plan.crop);
        assert_eq!(plan.resize, req.plan.resize);
        assert_eq!(plan.filter, ResizeFilter::Bilinear);
    }

    #[test]
    fn rejects_non_8n_plus_1_targets() {
        for f in [0, 48, 50, 2] {
            let msg = err_text(plugin("{}").plan_transform(&request(100, 30.0, f)));
            assert!(
                msg.contains(&format!("target frame count {f} is not 8N+1")),
                "{msg}"
            );
        }
    }

    #[test]
    fn rejects_empty_clip_and_out_of_range_plan() {
        let msg = err_text(plugin("{}").plan_transform(&request(0, 30.0, 9)));
        assert!(msg.contains("no frames"), "{msg}");
        let mut req = request(10, 30.0, 9);
        req.plan.frames = vec![0, 5, 12];
        let msg = err_text(plugin("{}").plan_transform(&req));
        assert!(
            msg.contains("names frame 12, but the clip has 10 frames"),
            "{msg}"
        );
    }

    #[test]
    fn config_rejects_unknown_keys_and_bad_values() {
        let mut p = FrameSkip::default();
        let e = p
            .configure(r#"{"mode":"uniform","frames":49}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `frames`") && e.contains("[plugin.frame_skip]"),
            "{e}"
        );
        assert!(
            !e.contains("at line"),
            "JSON positions mean nothing to the user: {e}"
        );
        let e = p.configure(r#"{"mode":"random"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown variant `random`"), "{e}");
        let e = p.configure(r#"{"fps":0}"#).unwrap_err().to_string();
        assert!(e.contains("fps = 0"), "{e}");
        let e = p
            .configure(r#"{"short_clip":"pad"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `pad`"), "{e}");
        assert_eq!(
            parse_config(r#"{"mode":"stride","fps":12.5,"short_clip":"reject"}"#).unwrap(),
            Config {
                mode: Mode::Stride,
                fps: 12.5,
                short_clip: ShortClip::Reject
            }
        );
    }
}
