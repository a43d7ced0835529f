//! `cogvx dataset check`: every problem of a dataset, each with its file and line.

use std::fmt;
use std::path::{Path, PathBuf};

use cogvx_plugin_api::{Resolution, Sample};
use cogvx_video::{VideoError, VideoReader, VideoTransforms};

use crate::buckets::{Assignment, Buckets};
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
    /// With `[data] buckets`: each bucket's clips, in list order (empty otherwise, and from
    /// [`check_structure`]).
    pub buckets: Vec<BucketStats>,
}

/// The clips [`check`] placed in one bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketStats {
    pub bucket: Resolution,
    /// Clips placed in it.
    pub clips: usize,
    /// The clips it crops by more than 1% of their frame area: path and share cropped.
    pub cropped: Vec<(String, f64)>,
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
            write!(
                f,
                "{}: {} samples, no problems",
                self.root.display(),
                self.samples
            )?;
            return self.fmt_buckets(f);
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
        self.fmt_buckets(f)
    }
}

impl Report {
    /// The bucket histogram: clips per bucket, a bar, and the clips each crops (at most 5
    /// named per bucket), then the clips no bucket took.
    fn fmt_buckets(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.buckets.is_empty() {
            return Ok(());
        }
        let placed: usize = self.buckets.iter().map(|b| b.clips).sum();
        let most = self
            .buckets
            .iter()
            .map(|b| b.clips)
            .max()
            .unwrap_or(0)
            .max(1);
        let width = self
            .buckets
            .iter()
            .map(|b| b.bucket.to_string().len())
            .max()
            .unwrap_or(0);
        write!(f, "\nbuckets ({placed} of {} clips placed):", self.samples)?;
        for b in &self.buckets {
            let bar = "#".repeat((b.clips * 30).div_ceil(most));
            write!(
                f,
                "\n  {:<width$}  {:>5} clip{}  {bar}",
                b.bucket.to_string(),
                b.clips,
                if b.clips == 1 { " " } else { "s" },
            )?;
            if !b.cropped.is_empty() {
                let named: Vec<String> = b
                    .cropped
                    .iter()
                    .take(5)
                    .map(|(v, c)| format!("{v} ({:.0}%)", c * 100.0))
                    .collect();
                let more = b.cropped.len().saturating_sub(5);
                write!(
                    f,
                    "  crops {}: {}{}",
                    b.cropped.len(),
                    named.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                )?;
            }
        }
        let dropped = self.samples.saturating_sub(placed);
        if dropped > 0 {
            write!(
                f,
                "\n  {:<width$}  {dropped:>5} clip{}  (dropped: see the problems above)",
                "no bucket",
                if dropped == 1 { " " } else { "s" }
            )?;
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
        buckets: Vec::new(),
    }
}

/// Checks a dataset and reports every problem: the structure (see [`check_structure`]),
/// then for each sample its caption through the prompt rewriters, its image (exists, not
/// empty), its clip (missing, empty, not a video, truncated, audio only, no frames, frame
/// range), and its place among `buckets` (a [`Resolution`] is the one training resolution):
/// the video-transform plans (a plugin error, e.g. a frame-selection policy rejecting a short
/// clip, or a bad plan), a clip with fewer frames than the resolution after planning (with no
/// frame-selection plugin: its raw frame count), and with a bucket list a clip no bucket fits
/// or a plan of a size outside the list. With a bucket list the report holds each bucket's
/// clips ([`Report::buckets`]).
pub fn check(root: &Path, buckets: impl Into<Buckets>, chain: &mut Chain<'_>) -> Report {
    let buckets = buckets.into();
    let (samples, mut problems) = list(root, chain);
    let (mut rewriters, mut transforms) = chain.stages();
    let mut stats: Vec<BucketStats> = buckets
        .list()
        .iter()
        .map(|&bucket| BucketStats {
            bucket,
            clips: 0,
            cropped: Vec::new(),
        })
        .collect();
    for (i, sample) in samples.iter().enumerate() {
        let (file, line) = origin_location(root, sample);
        let (found, assigned) = check_sample(
            root,
            &buckets,
            &mut rewriters,
            &mut transforms,
            sample,
            i as u64,
        );
        problems.extend(found.into_iter().map(|m| Problem::new(&file, line, m)));
        if let Some(a) = assigned {
            if let Some(s) = stats.iter_mut().find(|s| s.bucket == a.bucket) {
                s.clips += 1;
                if a.cropped > 0.01 {
                    s.cropped.push((sample.video.clone(), a.cropped));
                }
            }
        }
    }
    Report {
        root: root.to_path_buf(),
        samples: samples.len(),
        problems,
        buckets: if buckets.is_bucketed() {
            stats
        } else {
            Vec::new()
        },
    }
}

fn check_sample(
    root: &Path,
    buckets: &Buckets,
    rewriters: &mut PromptRewriters<'_, '_>,
    transforms: &mut VideoTransforms<'_>,
    sample: &Sample,
    index: u64,
) -> (Vec<String>, Option<Assignment>) {
    let mut out = Vec::new();
    let mut assigned = None;
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
            return (out, None);
        }
    };
    let reader = match VideoReader::open(&path) {
        Ok(r) => r,
        Err(e) => {
            out.push(e.to_string());
            return (out, None);
        }
    };
    let clip = match reader.clip_info(sample.frames) {
        Ok(c) => c,
        Err(e) => {
            out.push(e.to_string());
            return (out, None);
        }
    };
    let seed = sample_seed(0, index);
    match buckets.assign(&clip, transforms, seed) {
        Ok(a) => assigned = Some(a),
        Err(e) => out.push(format!("{}: {e}", path.display())),
    }
    (out, assigned)
}
