//! Decode + preprocess throughput, for `benches/preprocess.rs` and `cogvx bench preprocess`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cogvx_plugin_api::{Frames, Plugin, Resolution};

use crate::encode::{EncodeOptions, Mp4Writer};
use crate::pipeline::{preprocess_clip, PreprocessError, VideoTransforms};

/// Result of [`preprocess_throughput`].
#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    /// Runs timed.
    pub iterations: u32,
    /// Output frames produced over all runs.
    pub frames: u64,
    /// Source frames in the clip (each run decodes up to all of them).
    pub source_frames: u32,
    /// Wall time over all runs, seconds.
    pub seconds: f64,
    /// Output frames per second (decode + plan + crop/resize + pixel transforms).
    pub frames_per_second: f64,
    /// Output frame size.
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} frames/s ({} frames of {}x{} in {:.2} s over {} runs; clip of {} source frames)",
            self.frames_per_second,
            self.frames,
            self.width,
            self.height,
            self.seconds,
            self.iterations,
            self.source_frames
        )
    }
}

/// Times `iterations` full preprocessings of `clip` (probe, plan through `chain`, decode
/// only the planned frames, crop/resize, pixel transforms) after one untimed warm-up run.
pub fn preprocess_throughput(
    clip: &Path,
    target: Resolution,
    chain: Vec<&mut dyn Plugin>,
    iterations: u32,
) -> Result<Throughput, PreprocessError> {
    let mut transforms = VideoTransforms::new(chain);
    let warm = preprocess_clip(clip, None, &mut transforms, target, 0)?;
    let start = Instant::now();
    let mut frames = 0u64;
    let mut last: Frames = warm.frames;
    for i in 0..iterations.max(1) {
        let p = preprocess_clip(clip, None, &mut transforms, target, i as u64 + 1)?;
        frames += p.frames.count as u64;
        last = p.frames;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Throughput {
        iterations: iterations.max(1),
        frames,
        source_frames: warm.clip.frame_count,
        seconds,
        frames_per_second: frames as f64 / seconds.max(1e-9),
        width: last.width,
        height: last.height,
    })
}

/// Makes a benchmark clip `dir/bench_<w>x<h>_<frames>.mp4` (H.264): FFmpeg's `testsrc2`
/// through the `ffmpeg` tool when it is installed, otherwise a moving synthetic pattern
/// streamed to [`Mp4Writer`]. Reuses an existing file.
pub fn make_bench_clip(
    dir: &Path,
    width: u32,
    height: u32,
    frames: u32,
    fps: u32,
) -> Result<PathBuf, PreprocessError> {
    let path = dir.join(format!("bench_{width}x{height}_{frames}.mp4"));
    if path.is_file() {
        return Ok(path);
    }
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=s={width}x{height}:r={fps}"))
        .args([
            "-frames:v",
            &frames.to_string(),
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if matches!(status, Ok(s) if s.success()) && path.is_file() {
        return Ok(path);
    }
    let _ = std::fs::remove_file(&path);
    // Fallback: a synthetic moving gradient with a sweeping bar, streamed to the encoder.
    let mut writer = Mp4Writer::create(
        &path,
        width,
        height,
        fps as f64,
        &EncodeOptions {
            crf: 23,
            preset: "veryfast".into(),
        },
    )?;
    let mut px = vec![0u8; (width * height * 3) as usize];
    for f in 0..frames {
        for y in 0..height {
            for x in 0..width {
                let i = ((y * width + x) * 3) as usize;
                let bar = ((x + f * 8) / 64) % 2 == 0;
                px[i] = ((x + f * 4) % 256) as u8;
                px[i + 1] = ((y + f * 2) % 256) as u8;
                px[i + 2] = if bar { 220 } else { ((x ^ y) % 256) as u8 };
            }
        }
        writer.write_frame(&px)?;
    }
    writer.finish()?;
    Ok(path)
}
