//! Running a clip through video-transform plugins: each plugin's plan in chain order
//! (each validated against the clip, with the plugin's name in any error), the plan
//! executed natively by [`VideoReader`], then the pixel-path plugins in chain order.

use std::path::{Path, PathBuf};

use cogvx_plugin_api::{
    ClipInfo, FrameRange, Frames, Plugin, PluginError, Resolution, TransformPlan, TransformRequest,
};

use crate::decode::{VideoInfo, VideoReader};
use crate::error::VideoError;

/// A video-transform plugin failed or answered something unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransformError {
    /// The plugin returned an error.
    #[error("plugin `{plugin}` failed in `{call}`: {message}")]
    Plugin {
        plugin: String,
        call: &'static str,
        message: String,
    },
    /// The plugin's plan does not fit the clip.
    #[error("plugin `{plugin}` returned a bad plan: {reason}")]
    BadPlan { plugin: String, reason: String },
    /// The plugin's pixel output is inconsistent.
    #[error("plugin `{plugin}` returned bad frames: {reason}")]
    BadFrames { plugin: String, reason: String },
    /// The chain's final plan asks for more than the target: it is refused before decoding
    /// (a plan of 100,000 copies of a 16384x16384 frame asked for 80 TB).
    #[error(
        "the chain gives {frames}x{height}x{width} (frames x height x width), more than the resolution {target}: \
         add or configure frame selection / crop_resize so that clips match it (plan from: {planned_by})"
    )]
    PlanExceedsTarget {
        frames: usize,
        height: u32,
        width: u32,
        target: String,
        planned_by: String,
    },
}

/// The video-transform plugins of a chain, in order. Each takes part in the plan phase
/// (`plan_transform`) and/or the pixel phase (`transform_frames`); a plugin answering
/// [`PluginError::Unsupported`] to one of them is skipped there (remembered after the
/// first answer).
pub struct VideoTransforms<'a> {
    plugins: Vec<&'a mut dyn Plugin>,
    names: Vec<String>,
    plans: Vec<Option<bool>>,
    pixels: Vec<Option<bool>>,
}

impl<'a> VideoTransforms<'a> {
    /// Wraps the chain's video-transform plugins, in order.
    pub fn new(plugins: Vec<&'a mut dyn Plugin>) -> Self {
        let names = plugins.iter().map(|p| p.info().name).collect();
        let n = plugins.len();
        VideoTransforms {
            plugins,
            names,
            plans: vec![None; n],
            pixels: vec![None; n],
        }
    }

    /// The plugins' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Builds the plan for a clip: starts from the identity plan and lets each plugin
    /// update it, validating every returned plan against `clip`.
    pub fn plan(
        &mut self,
        clip: &ClipInfo,
        target: Resolution,
        seed: u64,
    ) -> Result<TransformPlan, TransformError> {
        let mut plan = TransformPlan::identity(clip);
        for i in 0..self.plugins.len() {
            if self.plans[i] == Some(false) {
                continue;
            }
            let request = TransformRequest {
                clip: *clip,
                target,
                plan: plan.clone(),
                seed,
            };
            match self.plugins[i].plan_transform(&request) {
                Ok(p) => {
                    self.plans[i] = Some(true);
                    p.check(clip).map_err(|reason| TransformError::BadPlan {
                        plugin: self.names[i].clone(),
                        reason,
                    })?;
                    plan = p;
                }
                Err(PluginError::Unsupported(_)) => self.plans[i] = Some(false),
                Err(e) => {
                    return Err(TransformError::Plugin {
                        plugin: self.names[i].clone(),
                        call: "plan-transform",
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(plan)
    }

    /// Checks a plan against the target before anything is decoded: at most its frames, each
    /// at most its size (a plan of 100,000 copies of a 16384x16384 frame asked for 80 TB).
    pub fn check_within(
        &self,
        plan: &TransformPlan,
        clip: &ClipInfo,
        target: Resolution,
    ) -> Result<(), TransformError> {
        let out = crate::plan::output_size(plan, clip.width, clip.height);
        if plan.frames.len() > target.frames as usize
            || out.width > target.width
            || out.height > target.height
        {
            let planned_by: Vec<&str> = self
                .names
                .iter()
                .zip(&self.plans)
                .filter(|(_, p)| **p == Some(true))
                .map(|(n, _)| n.as_str())
                .collect();
            return Err(TransformError::PlanExceedsTarget {
                frames: plan.frames.len(),
                height: out.height,
                width: out.width,
                target: format!("{}x{}x{}", target.frames, target.height, target.width),
                planned_by: if planned_by.is_empty() {
                    "no plugin: the whole clip".into()
                } else {
                    planned_by.join(", ")
                },
            });
        }
        Ok(())
    }

    /// Runs the pixel-path plugins on decoded frames, in order.
    pub fn transform_frames(&mut self, mut frames: Frames) -> Result<Frames, TransformError> {
        for i in 0..self.plugins.len() {
            if self.pixels[i] == Some(false) {
                continue;
            }
            // Until the plugin has answered once, keep a copy in case it declines.
            let backup = if self.pixels[i].is_none() {
                Some(frames.clone())
            } else {
                None
            };
            match self.plugins[i].transform_frames(frames) {
                Ok(out) => {
                    self.pixels[i] = Some(true);
                    out.check().map_err(|reason| TransformError::BadFrames {
                        plugin: self.names[i].clone(),
                        reason,
                    })?;
                    frames = out;
                }
                Err(PluginError::Unsupported(_)) if backup.is_some() => {
                    self.pixels[i] = Some(false);
                    frames = backup.unwrap();
                }
                Err(e) => {
                    return Err(TransformError::Plugin {
                        plugin: self.names[i].clone(),
                        call: "transform-frames",
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(frames)
    }
}

/// Why preprocessing a clip failed.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Probing or decoding failed.
    #[error(transparent)]
    Video(#[from] VideoError),
    /// A plugin failed or returned something unusable.
    #[error("{path}: {source}", path = .path.display())]
    Transform {
        path: PathBuf,
        #[source]
        source: TransformError,
    },
}

/// One preprocessed clip.
#[derive(Clone, Debug)]
pub struct Preprocessed {
    /// What probing found.
    pub info: VideoInfo,
    /// The clip as the plugins saw it (restricted to the sample's frame range).
    pub clip: ClipInfo,
    /// The final plan.
    pub plan: TransformPlan,
    /// The frames after the plan and the pixel transforms.
    pub frames: Frames,
}

/// Probes `path`, plans it through `transforms`, decodes the plan and runs the pixel
/// transforms. `range` restricts the clip to a sample's frame range.
pub fn preprocess_clip(
    path: &Path,
    range: Option<FrameRange>,
    transforms: &mut VideoTransforms<'_>,
    target: Resolution,
    seed: u64,
) -> Result<Preprocessed, PreprocessError> {
    let mut reader = VideoReader::open(path)?;
    let clip = reader.clip_info(range)?;
    let wrap = |source| PreprocessError::Transform {
        path: path.to_path_buf(),
        source,
    };
    let plan = transforms.plan(&clip, target, seed).map_err(wrap)?;
    transforms
        .check_within(&plan, &clip, target)
        .map_err(wrap)?;
    let frames = reader.read_range(&plan, range)?;
    let frames = transforms.transform_frames(frames).map_err(wrap)?;
    Ok(Preprocessed {
        info: reader.info().clone(),
        clip,
        plan,
        frames,
    })
}
