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
    pub fn plan(&mut self, clip: &ClipInfo, target: Resolution, seed: u64) -> Result<TransformPlan, TransformError> {
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
    let frames = reader.read_range(&plan, range)?;
    let frames = transforms.transform_frames(frames).map_err(wrap)?;
    Ok(Preprocessed {
        info: reader.info().clone(),
        clip,
        plan,
        frames,
    })
}
