//! `cogvx dataset preview`: runs the plugin chain over a dataset and writes what would be
//! trained on: `<out>/<index>_<stem>.mp4` per sample, `<out>/contact_sheet.png` and
//! `<out>/captions.txt`.

use std::path::{Path, PathBuf};

use cogvx_plugin_api::{Frames, ResizeFilter, Resolution, Size, TransformPlan};
use cogvx_video::{
    encode_mp4, evenly_spaced, preprocess_clip, write_contact_sheet, EncodeOptions, FrameProcessor,
    VideoError,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::buckets::Buckets;
use crate::chain::{sample_seed, Chain};
use crate::check::{check, Report};
use crate::layout::{origin_location, resolve_in_root, Problem};

/// Options of [`preview`].
#[derive(Clone, Debug)]
pub struct PreviewOptions {
    /// Base seed; sample `i` gets [`sample_seed`]`(seed, i)`.
    pub seed: u64,
    /// Frame rate of the written clips (CogVideoX clips are 8 fps).
    pub fps: f64,
    /// Frames per clip on the contact sheet.
    pub sheet_frames: usize,
    /// At most this many clips (rows) on the contact sheet.
    pub sheet_rows: usize,
    /// Gap between contact-sheet cells, pixels.
    pub sheet_gap: u32,
    /// Contact-sheet cells are scaled down (aspect kept) to at most this width, pixels.
    pub sheet_cell_width: u32,
    /// H.264 settings.
    pub encode: EncodeOptions,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for PreviewOptions {
    fn default() -> Self {
        PreviewOptions {
            seed: 0,
            fps: 8.0,
            sheet_frames: 8,
            sheet_rows: 64,
            sheet_gap: 4,
            sheet_cell_width: 240,
            encode: EncodeOptions::default(),
            progress: true,
        }
    }
}

/// What [`preview`] wrote.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Samples listed.
    pub samples: usize,
    /// The clips written, in sample order.
    pub clips: Vec<PathBuf>,
    /// The resolution (bucket) of each written clip.
    pub buckets: Vec<Resolution>,
    /// The rewritten caption of each written clip.
    pub captions: Vec<String>,
    /// `<out>/captions.txt`.
    pub captions_file: Option<PathBuf>,
    /// `<out>/contact_sheet.png`, if any clip was written.
    pub contact_sheet: Option<PathBuf>,
    /// Samples that failed while processing (nothing was written for them).
    pub failed: Vec<Problem>,
}

/// Why [`preview`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The dataset has problems; nothing was written.
    #[error("{0}")]
    Dataset(Report),
    /// Writing an output failed.
    #[error(transparent)]
    Output(#[from] VideoError),
    /// Creating the output folder failed.
    #[error("{path}: cannot create the output folder: {source}", path = .path.display())]
    OutDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks the dataset (every problem, see [`check`]; nothing is written if there is one),
/// then for each sample: rewrites its caption, plans its clip through the video transforms
/// (each plan validated), decodes the plan, runs the pixel transforms, and writes
/// `<out>/<index>_<stem>.mp4`; finally `<out>/captions.txt` (one caption per written clip,
/// in order) and `<out>/contact_sheet.png` (one row per clip; with a bucket list, one row per
/// bucket: the middle frame of each of its first clips). Each clip is processed at its bucket
/// of `buckets` (a [`Resolution`] is the one training resolution). A sample that fails later
/// is listed in [`Summary::failed`] and has no file.
pub fn preview(
    root: &Path,
    out: &Path,
    buckets: impl Into<Buckets>,
    chain: &mut Chain<'_>,
    options: &PreviewOptions,
) -> Result<Summary, PreviewError> {
    let buckets = buckets.into();
    let report = check(root, &buckets, chain);
    if !report.is_ok() {
        return Err(PreviewError::Dataset(report));
    }
    let (samples, problems) = crate::check::list(root, chain);
    if !problems.is_empty() {
        return Err(PreviewError::Dataset(Report {
            root: root.to_path_buf(),
            samples: samples.len(),
            problems,
            buckets: Vec::new(),
        }));
    }
    std::fs::create_dir_all(out).map_err(|source| PreviewError::OutDir {
        path: out.to_path_buf(),
        source,
    })?;
    let mut summary = Summary {
        samples: samples.len(),
        ..Default::default()
    };
    let bar = if options.progress {
        ProgressBar::new(samples.len() as u64)
    } else {
        ProgressBar::with_draw_target(Some(samples.len() as u64), ProgressDrawTarget::hidden())
    };
    cogvx_metrics::console::track(&bar);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} preview [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let digits = samples.len().saturating_sub(1).to_string().len();
    let mut sheet_rows: Vec<Frames> = Vec::new();
    let mut bucket_cells: Vec<Vec<Frames>> = vec![Vec::new(); buckets.list().len()];
    let (mut rewriters, mut transforms) = chain.stages();
    for (i, sample) in samples.iter().enumerate() {
        let (file, line) = origin_location(root, sample);
        let fail = |summary: &mut Summary, message: String| {
            tracing::error!(
                "{}{}: {message}",
                file.display(),
                line.map(|l| format!(":{l}")).unwrap_or_default()
            );
            summary.failed.push(Problem::new(&file, line, message));
        };
        bar.set_message(sample.video.clone());
        let caption = match rewriters.rewrite(&sample.caption) {
            Ok(c) => c.replace(['\n', '\r'], " "),
            Err(e) => {
                fail(&mut summary, e);
                bar.inc(1);
                continue;
            }
        };
        let path = match resolve_in_root(root, &sample.video) {
            Ok(p) => p,
            Err(e) => {
                fail(&mut summary, e);
                bar.inc(1);
                continue;
            }
        };
        let seed = sample_seed(options.seed, i as u64);
        let started = std::time::Instant::now();
        let target = if buckets.needs_assignment() {
            match buckets.assign_file(&path, sample.frames, &mut transforms, seed) {
                Ok(a) => a.bucket,
                Err(e) => {
                    fail(&mut summary, e);
                    bar.inc(1);
                    continue;
                }
            }
        } else {
            buckets.list()[0]
        };
        let pre = match preprocess_clip(&path, sample.frames, &mut transforms, target, seed) {
            Ok(p) => p,
            Err(e) => {
                fail(&mut summary, e.to_string());
                bar.inc(1);
                continue;
            }
        };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "clip".into());
        let dest = out.join(format!("{i:0digits$}_{stem}.mp4"));
        if let Err(e) = encode_mp4(&dest, &pre.frames, options.fps, &options.encode) {
            fail(&mut summary, e.to_string());
            bar.inc(1);
            continue;
        }
        tracing::info!(
            "{} -> {} ({} of {} frames, {}x{} -> {}x{}, {:.2} s)",
            path.display(),
            dest.display(),
            pre.frames.count,
            pre.clip.frame_count,
            pre.clip.width,
            pre.clip.height,
            pre.frames.width,
            pre.frames.height,
            started.elapsed().as_secs_f64()
        );
        if buckets.is_bucketed() {
            // One row per bucket: the middle frame of each of its first clips.
            let row = buckets
                .list()
                .iter()
                .position(|b| *b == target)
                .unwrap_or(0);
            let cells = &mut bucket_cells[row];
            if cells.len() < options.sheet_frames {
                let mid = pre.frames.count / 2;
                let size = (pre.frames.width * pre.frames.height * 3) as usize;
                let one = Frames {
                    count: 1,
                    width: pre.frames.width,
                    height: pre.frames.height,
                    rgb: pre.frames.rgb[mid as usize * size..(mid as usize + 1) * size].to_vec(),
                };
                cells.push(pick_frames(&one, 1, options.sheet_cell_width));
            }
        } else if sheet_rows.len() < options.sheet_rows {
            sheet_rows.push(pick_frames(
                &pre.frames,
                options.sheet_frames,
                options.sheet_cell_width,
            ));
        }
        summary.clips.push(dest);
        summary.buckets.push(target);
        summary.captions.push(caption);
        bar.inc(1);
    }
    bar.finish_and_clear();
    for cells in bucket_cells.into_iter().filter(|c| !c.is_empty()) {
        sheet_rows.push(Frames {
            count: cells.len() as u32,
            width: cells[0].width,
            height: cells[0].height,
            rgb: cells.into_iter().flat_map(|c| c.rgb).collect(),
        });
    }
    if !summary.clips.is_empty() {
        let sheet = out.join("contact_sheet.png");
        let rows: Vec<&Frames> = sheet_rows.iter().collect();
        write_contact_sheet(&sheet, &rows, options.sheet_frames, options.sheet_gap)?;
        summary.contact_sheet = Some(sheet);
    }
    let captions_file = out.join("captions.txt");
    let mut text = summary.captions.join("\n");
    text.push('\n');
    cogvx_io::write_atomically(&captions_file, text.as_bytes()).map_err(|source| {
        VideoError::Io {
            path: captions_file.clone(),
            source,
        }
    })?;
    summary.captions_file = Some(captions_file);
    Ok(summary)
}

/// The `n` evenly spaced frames a contact sheet shows.
/// `n` evenly spaced frames of `frames`, scaled down to at most `max_width` pixels wide.
fn pick_frames(frames: &Frames, n: usize, max_width: u32) -> Frames {
    let idx = evenly_spaced(frames.count, n);
    let size = (frames.width * frames.height * 3) as usize;
    let (width, height) = if frames.width > max_width && max_width > 0 {
        (
            max_width,
            ((frames.height as u64 * max_width as u64) / frames.width as u64).max(1) as u32,
        )
    } else {
        (frames.width, frames.height)
    };
    let plan = TransformPlan {
        frames: vec![0],
        crop: None,
        resize: Some(Size { width, height }),
        filter: ResizeFilter::Bilinear,
    };
    let mut thumbs = FrameProcessor::new(&plan);
    let mut rgb = Vec::with_capacity((width * height * 3) as usize * idx.len());
    for &i in &idx {
        let src = &frames.rgb[i as usize * size..(i as usize + 1) * size];
        if (width, height) == (frames.width, frames.height) {
            rgb.extend_from_slice(src);
        } else {
            let (thumb, _) = thumbs
                .process(src, frames.width, frames.height)
                .expect("a downscale of a valid frame");
            rgb.extend_from_slice(&thumb);
        }
    }
    Frames {
        width,
        height,
        count: idx.len() as u32,
        rgb,
    }
}
