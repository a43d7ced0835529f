//! `cogvx dataset check`: every problem of a dataset, each with its file and line.

use std::fmt;
use std::path::{Path, PathBuf};

use cogvx_plugin_api::{Resolution, Sample};
use cogvx_video::{VideoError, VideoReader, VideoTransforms};

use crate::chain::{sample_seed, Chain, PromptRewriters};
use crate::layout::{origin_location, read_layout, resolve_in_root, Problem};

/// The outcome of [`check`].
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The dataset root.
    pub root: PathBuf,
    /// Samples the reader listed.
    pub samples: usize,
    /// Every problem found, in file order.
    pub problems: Vec<Problem>,
}

impl Report {
    /// No problem found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        if n == 0 {
            return write!(
                f,
                "{}: {} samples, no problems",
                self.root.display(),
                self.samples
            );
        }
        write!(
            f,
            "{}: {} samples, {n} problem{}",
            self.root.display(),
            self.samples,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Lists the samples with the chain's reader. With the built-in reader every structural
/// problem comes back; a plugin reader's error is one problem at the root.
pub(crate) fn list(root: &Path, chain: &mut Chain<'_>) -> (Vec<Sample>, Vec<Problem>) {
    match chain.reader.as_mut() {
        None => {
            let layout = read_layout(root, &chain.columns);
            (layout.samples, layout.problems)
        }
        Some(reader) => {
            let name = reader.info().name;
            match reader.list_samples(&root.to_string_lossy()) {
                Ok(samples) => {
                    // A plugin's paths are checked like the built-in reader's.
                    let mut problems = Vec::new();
                    let mut kept = Vec::new();
                    for s in samples {
                        let (file, line) = origin_location(root, &s);
                        let mut ok = true;
                        for rel in std::iter::once(&s.video).chain(s.image.as_ref()) {
                            if let Err(m) = resolve_in_root(root, rel) {
                                problems.push(Problem::new(&file, line, m));
                                ok = false;
                            }
                        }
                        if crate::chain::is_blank_caption(&s.caption) {
                            problems.push(Problem::new(&file, line, "empty caption"));
                            ok = false;
                        }
                        if ok {
                            kept.push(s);
                        }
                    }
                    (kept, problems)
                }
                Err(e) => (
                    vec![],
                    vec![Problem::new(
                        root,
                        None,
                        format!("dataset reader `{name}` failed: {e}"),
                    )],
                ),
            }
        }
    }
}

/// The structural part of [`check`]: list files, line counts, empty captions and paths,
/// paths leaving the root. Reads no media.
pub fn check_structure(root: &Path, chain: &mut Chain<'_>) -> Report {
    let (samples, problems) = list(root, chain);
    Report {
        root: root.to_path_buf(),
        samples: samples.len(),
        problems,
    }
}

/// Checks a dataset and reports every problem: the structure (see [`check_structure`]),
/// then for each sample its caption through the prompt rewriters, its image (exists, not
/// empty), its clip (missing, empty, not a video, truncated, audio only, no frames, frame
/// range), the video-transform plans for `target` (a plugin error, e.g. a frame-selection
/// policy rejecting a short clip, or a bad plan), and finally a clip with fewer frames than
/// `target.frames` after planning (with no frame-selection plugin: its raw frame count).
pub fn check(root: &Path, target: Resolution, chain: &mut Chain<'_>) -> Report {
    let (samples, mut problems) = list(root, chain);
    let (mut rewriters, mut transforms) = chain.stages();
    for (i, sample) in samples.iter().enumerate() {
        let (file, line) = origin_location(root, sample);
        problems.extend(
            check_sample(
                root,
                target,
                &mut rewriters,
                &mut transforms,
                sample,
                i as u64,
            )
            .into_iter()
            .map(|m| Problem::new(&file, line, m)),
        );
    }
    Report {
        root: root.to_path_buf(),
        samples: samples.len(),
        problems,
    }
}

fn check_sample(
    root: &Path,
    target: Resolution,
    rewriters: &mut PromptRewriters<'_, '_>,
    transforms: &mut VideoTransforms<'_>,
    sample: &Sample,
    index: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    match rewriters.rewrite(&sample.caption) {
        Ok(c) if crate::chain::is_blank_caption(&c) => {
            out.push("the prompt rewriters left an empty caption".to_string())
        }
        Ok(_) => {}
        Err(e) => out.push(e),
    }
    if let Some(image) = &sample.image {
        match resolve_in_root(root, image) {
            Ok(p) => match std::fs::metadata(&p) {
                Ok(m) if !m.is_file() => {
                    out.push(format!("{}: image is not a regular file", p.display()))
                }
                Ok(m) if m.len() == 0 => {
                    out.push(format!("{}: image file is empty (0 bytes)", p.display()))
                }
                Ok(_) => {
                    // FFmpeg reads still images (PNG, JPEG, WebP, ...) as one-frame videos.
                    if let Err(e) = cogvx_video::probe(&p) {
                        let why = match e {
                            VideoError::NotVideo { detail, .. }
                            | VideoError::Truncated { detail, .. } => detail,
                            other => other.to_string(),
                        };
                        out.push(format!("{}: not a readable image ({why})", p.display()));
                    }
                }
                Err(_) => out.push(format!("{}: image file not found", p.display())),
            },
            Err(m) => out.push(m),
        }
    }
    let path = match resolve_in_root(root, &sample.video) {
        Ok(p) => p,
        Err(m) => {
            out.push(m);
            return out;
        }
    };
    let reader = match VideoReader::open(&path) {
        Ok(r) => r,
        Err(e) => {
            out.push(e.to_string());
            return out;
        }
    };
    let clip = match reader.clip_info(sample.frames) {
        Ok(c) => c,
        Err(e) => {
            out.push(e.to_string());
            return out;
        }
    };
    let seed = sample_seed(0, index);
    match transforms.plan(&clip, target, seed) {
        Ok(plan) if (plan.frames.len() as u64) < target.frames as u64 => {
            let untouched = plan.frames.iter().copied().eq(0..clip.frame_count);
            let how = if untouched {
                " (no plugin in the chain selects frames, so the raw frame count applies)"
            } else {
                " after frame selection"
            };
            out.push(format!(
                "{}: clip too short: {} frames{how}, the target resolution {}x{}x{} needs {}",
                path.display(),
                plan.frames.len(),
                target.frames,
                target.height,
                target.width,
                target.frames
            ));
        }
        Ok(_) => {}
        Err(e) => out.push(format!("{}: {e}", path.display())),
    }
    out
}
