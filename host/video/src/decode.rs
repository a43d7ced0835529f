//! Probing and decoding clips with FFmpeg (ffmpeg-next).
//!
//! # Frame indices and timestamps
//!
//! Frame `i` of a clip is the `i`-th frame in *presentation* order. [`VideoReader::open`]
//! demuxes the video stream once (reading packets only, decoding nothing) and records every
//! packet's presentation timestamp; sorting them gives the timestamp of each frame index.
//! This holds for variable frame rate too: indices count frames, never `time * fps`.
//! Packets that the container marks as discarded (edit lists) are not frames.
//!
//! Decoding a plan then seeks to the last keyframe at or before the first needed frame,
//! decodes forward, maps each decoded frame back to its index through its timestamp,
//! converts and crops/resizes only the needed frames (each once), and seeks again when the
//! next needed frame lies beyond a later keyframe. A long clip is never held whole in memory.
//!
//! When timestamps are missing or repeated (some raw streams), or a seek lands after the
//! wanted frame, the reader falls back to decoding from the start and counting output frames.

// FFmpeg's constants have bindgen-chosen integer types that vary between FFmpeg versions;
// the casts below keep them portable.
#![allow(clippy::unnecessary_cast)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Once;

use cogvx_plugin_api::{ClipInfo, FrameRange, Frames, TransformPlan};
use ffmpeg::{codec, ffi, format, frame, media, software::scaling, Packet};
use ffmpeg_next as ffmpeg;

use crate::error::{Result, VideoError};
use crate::plan::{output_size, rotate_rgb, FrameProcessor};

/// The most one read may return: 64 GiB of RGB (81x768x1360 is 254 MB).
pub const MAX_READ_BYTES: usize = 64 << 30;

/// Initialises FFmpeg once (and keeps its own logging to fatal errors: every failure is
/// reported through [`VideoError`] instead).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = ffmpeg::init();
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    });
}

/// What probing a clip found.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoInfo {
    /// The file.
    pub path: PathBuf,
    /// Display width, after rotation.
    pub width: u32,
    /// Display height, after rotation.
    pub height: u32,
    /// Stored (coded) width, before rotation.
    pub coded_width: u32,
    /// Stored (coded) height, before rotation.
    pub coded_height: u32,
    /// Clockwise rotation applied for display: 0, 90, 180 or 270 degrees.
    pub rotation: u32,
    /// Number of frames (presentation timestamps) in the video stream.
    pub frame_count: u32,
    /// Average frame rate, frames per second.
    pub fps: f64,
    /// Duration of the video stream in seconds.
    pub duration: f64,
    /// FFmpeg's codec name, e.g. `h264`.
    pub codec: String,
    /// FFmpeg's pixel format name, e.g. `yuv420p10le`.
    pub pixel_format: String,
    /// Whether frames are located by timestamp (seeking possible); `false` means frames are
    /// counted from the start of the stream.
    pub seekable: bool,
}

impl VideoInfo {
    /// The plugin-facing summary (display size, frame count, fps).
    pub fn clip_info(&self) -> ClipInfo {
        ClipInfo {
            width: self.width,
            height: self.height,
            frame_count: self.frame_count,
            fps: self.fps,
        }
    }
}

/// Probes a clip: opens it, checks it has a decodable video stream and indexes its frames.
pub fn probe(path: impl AsRef<Path>) -> Result<VideoInfo> {
    Ok(VideoReader::open(path)?.info)
}

/// Decodes the frames of `plan` from the clip at `path` (see [`VideoReader::read`]).
pub fn decode(path: impl AsRef<Path>, plan: &TransformPlan) -> Result<Frames> {
    VideoReader::open(path)?.read(plan)
}

#[derive(Clone, Debug)]
struct KeyFrame {
    /// Display index of the keyframe.
    index: u32,
    /// Timestamp to seek to (the keyframe's pts).
    seek_ts: i64,
}

#[derive(Clone, Debug, Default)]
struct FrameIndex {
    /// Presentation timestamps in display order; `pts[i]` is frame `i`.
    pts: Vec<i64>,
    /// Keyframes in display order.
    keys: Vec<KeyFrame>,
}

impl FrameIndex {
    fn lookup(&self, ts: i64) -> Option<u32> {
        self.pts.binary_search(&ts).ok().map(|i| i as u32)
    }

    /// Position in `keys` of the last keyframe at or before frame `index`.
    fn key_for(&self, index: u32) -> Option<usize> {
        let p = self.keys.partition_point(|k| k.index <= index);
        p.checked_sub(1)
    }
}

/// An opened, indexed clip that decodes [`TransformPlan`]s.
pub struct VideoReader {
    info: VideoInfo,
    stream_index: usize,
    index: FrameIndex,
    stats: ReadStats,
}

/// What the last [`VideoReader::read`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Frames the decoder produced (needed or not).
    pub frames_decoded: u64,
    /// Frames converted, cropped and resized (each needed frame once).
    pub frames_kept: u64,
    /// Seeks to a keyframe.
    pub seeks: u32,
    /// Restarts from the beginning of the stream (after a seek overshot, or when the
    /// decoder's timestamps do not match the index).
    pub restarts: u32,
}

fn classify_open_error(path: &Path, err: ffmpeg::Error) -> VideoError {
    let detail = format!("ffmpeg: {err}");
    match probe_container(path) {
        Some(name) => VideoError::Truncated {
            path: path.to_path_buf(),
            detail: format!("{name} container, {detail}"),
        },
        None => VideoError::NotVideo {
            path: path.to_path_buf(),
            detail: format!("no media container recognised; {detail}"),
        },
    }
}

/// FFmpeg's content-only probe (the file name is withheld so that the extension does not
/// count): the container's name if the first bytes look like a known media format.
fn probe_container(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 16];
    let mut file = std::fs::File::open(path).ok()?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    buf.truncate(n);
    buf.resize(n + ffi::AVPROBE_PADDING_SIZE as usize, 0);
    let empty = c"";
    let pd = ffi::AVProbeData {
        filename: empty.as_ptr(),
        buf: buf.as_mut_ptr(),
        buf_size: n as i32,
        mime_type: std::ptr::null(),
    };
    let mut score: i32 = 0;
    // SAFETY: `pd` points at a readable buffer of `buf_size` bytes plus the required zero padding.
    let fmt = unsafe { ffi::av_probe_input_format2(&pd, 1, &mut score) };
    if fmt.is_null() || score < ffi::AVPROBE_SCORE_MAX as i32 / 4 {
        return None;
    }
    // SAFETY: a non-null AVInputFormat has a static, NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr((*fmt).name) };
    Some(name.to_string_lossy().into_owned())
}

fn check_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VideoError::NotFound {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(VideoError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(m) if !m.is_file() => Err(VideoError::NotAFile {
            path: path.to_path_buf(),
        }),
        Ok(m) if m.len() == 0 => Err(VideoError::Empty {
            path: path.to_path_buf(),
        }),
        Ok(_) => Ok(()),
    }
}

/// The demuxers a clip (or a conditioning image) may be read with: single-file containers and
/// single images (not `image2`, whose file patterns read sibling files). Formats that open
/// further files or URLs (HLS/DASH playlists, `concat` lists, image sequences, `tee`, network
/// protocols) are refused: a `videos/x.m3u8` naming `../../outside/secret.ts` read a file
/// outside the dataset root.
pub const ACCEPTED_CONTAINERS: &str =
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,mpeg,mpegvideo,ogg,asf,h264,hevc,m4v,ivf,gif,yuv4mpegpipe,nut,mxf,\
     png_pipe,jpeg_pipe,webp_pipe,bmp_pipe,tiff_pipe";

fn open_input(path: &Path) -> Result<format::context::Input> {
    init();
    check_file(path)?;
    if let Some(name) = probe_container(path) {
        if !name
            .split(',')
            .any(|n| ACCEPTED_CONTAINERS.split(',').any(|a| a == n))
        {
            return Err(VideoError::NotVideo {
                path: path.to_path_buf(),
                detail: format!(
                    "the `{name}` format is not accepted: playlists, concat lists and other formats that open further files \
                     or URLs are refused; accepted containers: {ACCEPTED_CONTAINERS}"
                ),
            });
        }
    }
    // The same whitelist inside FFmpeg (it probes by extension too), and only the file protocol.
    let mut options = ffmpeg::Dictionary::new();
    options.set("format_whitelist", ACCEPTED_CONTAINERS);
    options.set("protocol_whitelist", "file");
    let url = format!("file:{}", path.display());
    format::input_with_dictionary(&url, options).map_err(|e| classify_open_error(path, e))
}

/// Clockwise display rotation as the `ffmpeg` tool applies it (`get_rotation` in fftools):
/// `theta = -round(av_display_rotation_get(matrix))`, normalised to `[0, 360)`.
fn rotation_from_matrix(m: &[i32; 9]) -> Option<f64> {
    let conv = |v: i32| v as f64 / 65536.0;
    let s0 = conv(m[0]).hypot(conv(m[3]));
    let s1 = conv(m[1]).hypot(conv(m[4]));
    if s0 == 0.0 || s1 == 0.0 {
        return None;
    }
    let ccw = -(conv(m[1]) / s1).atan2(conv(m[0]) / s0).to_degrees();
    Some(-ccw.round())
}

fn snap_rotation(theta: f64, path: &Path) -> u32 {
    let theta = theta - 360.0 * (theta / 360.0 + 0.9 / 360.0).floor();
    for r in [90u32, 180, 270] {
        if (theta - r as f64).abs() < 1.0 {
            return r;
        }
    }
    if theta.abs() > 1.0 && (theta - 360.0).abs() > 1.0 {
        tracing::warn!(
            "{}: rotation of {theta:.1} degrees is not a multiple of 90; ignored",
            path.display()
        );
    }
    0
}

fn stream_rotation(stream: &format::stream::Stream, path: &Path) -> u32 {
    for sd in stream.side_data() {
        if sd.kind() == codec::packet::side_data::Type::DisplayMatrix {
            let data = sd.data();
            if data.len() >= 36 {
                let mut m = [0i32; 9];
                for (i, v) in m.iter_mut().enumerate() {
                    *v = i32::from_ne_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
                }
                if let Some(theta) = rotation_from_matrix(&m) {
                    return snap_rotation(theta, path);
                }
            }
        }
    }
    // Legacy "rotate" tag: degrees clockwise.
    if let Some(tag) = stream.metadata().get("rotate") {
        if let Ok(theta) = tag.trim().parse::<f64>() {
            return snap_rotation(theta, path);
        }
    }
    0
}

fn open_decoder(path: &Path, stream: &format::stream::Stream) -> Result<ffmpeg::decoder::Video> {
    let mut ctx = codec::context::Context::from_parameters(stream.parameters()).map_err(|e| {
        VideoError::Decode {
            path: path.to_path_buf(),
            detail: format!("cannot read codec parameters: {e}"),
        }
    })?;
    ctx.set_threading(codec::threading::Config {
        kind: codec::threading::Type::Frame,
        count: 0,
        ..Default::default()
    });
    let id = ctx.id();
    ctx.decoder().video().map_err(|e| VideoError::Decode {
        path: path.to_path_buf(),
        detail: format!(
            "no usable decoder for codec {} in this FFmpeg build: {e}",
            id.name()
        ),
    })
}

/// The clip's video stream (not a cover picture); the error says whether the file holds only
/// audio or no stream at all.
fn video_stream<'a>(
    input: &'a format::context::Input,
    path: &Path,
) -> Result<format::stream::Stream<'a>> {
    let video = input.streams().find(|s| {
        s.parameters().medium() == media::Type::Video
            && !s
                .disposition()
                .contains(format::stream::Disposition::ATTACHED_PIC)
    });
    video.ok_or_else(|| {
        let has_audio = input
            .streams()
            .any(|s| s.parameters().medium() == media::Type::Audio);
        if has_audio {
            VideoError::AudioOnly {
                path: path.to_path_buf(),
            }
        } else {
            VideoError::NotVideo {
                path: path.to_path_buf(),
                detail: "the file has no video stream".into(),
            }
        }
    })
}

/// One demuxed packet of the video stream.
struct Pkt {
    pts: Option<i64>,
    key: bool,
    duration: i64,
}

/// Demuxes the whole file once (no decoding) to list every frame's packet; a truncated or
/// corrupt file (fewer packets than the container lists, unreadable data) is an error.
fn index_packets(
    input: &mut format::context::Input,
    stream_index: usize,
    declared_frames: i64,
    path: &Path,
) -> Result<Vec<Pkt>> {
    let mut pkts: Vec<Pkt> = Vec::new();
    let mut discarded = 0u64;
    let mut bad_packets = 0u64;
    let mut first_error: Option<String> = None;
    let mut packet = Packet::empty();
    loop {
        match packet.read(input) {
            Ok(()) => {
                if packet.stream() != stream_index {
                    continue;
                }
                if packet.flags().bits() & ffi::AV_PKT_FLAG_DISCARD as i32 != 0 {
                    discarded += 1;
                    continue;
                }
                pkts.push(Pkt {
                    pts: packet.pts(),
                    key: packet.is_key(),
                    duration: packet.duration(),
                });
            }
            Err(ffmpeg::Error::Eof) => break,
            Err(ffmpeg::Error::InvalidData) => {
                bad_packets += 1;
                first_error.get_or_insert_with(|| "invalid data".into());
                if bad_packets > 100_000 {
                    break;
                }
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
                bad_packets += 1;
                break;
            }
        }
    }
    let counted = pkts.len() as u64;
    if bad_packets > 0 || (declared_frames > 0 && counted + discarded < declared_frames as u64) {
        let detail = if declared_frames > 0 {
            format!(
                "only {counted} of the {declared_frames} frames the container lists could be read"
            )
        } else {
            format!("{counted} frames read before the data ended")
        };
        let why = first_error
            .map(|e| format!(" (ffmpeg: {e})"))
            .unwrap_or_default();
        return Err(VideoError::Truncated {
            path: path.to_path_buf(),
            detail: format!("{detail}{why}"),
        });
    }
    if pkts.is_empty() {
        return Err(VideoError::NoFrames {
            path: path.to_path_buf(),
        });
    }
    if pkts.len() > u32::MAX as usize {
        return Err(VideoError::Decode {
            path: path.to_path_buf(),
            detail: "more than 2^32 frames".into(),
        });
    }
    Ok(pkts)
}

/// The presentation timestamps and keyframes of `pkts` for seeking, and whether seeking is
/// possible (every packet has a distinct timestamp and there is a keyframe); otherwise frames
/// are counted from the start.
fn frame_index(pkts: &[Pkt], path: &Path) -> (FrameIndex, bool) {
    let mut index = FrameIndex::default();
    let mut seekable = pkts.iter().all(|p| p.pts.is_some());
    if seekable {
        let mut pts: Vec<i64> = pkts.iter().map(|p| p.pts.unwrap()).collect();
        pts.sort_unstable();
        if pts.windows(2).any(|w| w[0] == w[1]) {
            tracing::debug!(
                "{}: repeated timestamps; frames are counted from the start",
                path.display()
            );
            seekable = false;
        } else {
            index.pts = pts;
            for p in pkts.iter().filter(|p| p.key) {
                let pts = p.pts.unwrap();
                let i = index.lookup(pts).unwrap();
                // Seek by presentation time, as `ffmpeg -ss` does: demuxers index a keyframe
                // at or before its pts, so the seek lands on it or on an earlier keyframe.
                index.keys.push(KeyFrame {
                    index: i,
                    seek_ts: pts,
                });
            }
            index.keys.sort_by_key(|k| k.index);
            if index.keys.is_empty() {
                seekable = false;
            }
        }
    }
    (index, seekable)
}

/// The clip's duration in seconds: from the timestamps when seekable, else the container's.
fn clip_duration(
    pkts: &[Pkt],
    index: &FrameIndex,
    seekable: bool,
    tb: f64,
    container_duration: i64,
) -> f64 {
    if seekable && !index.pts.is_empty() {
        let last = pkts
            .iter()
            .filter(|p| p.pts == index.pts.last().copied())
            .map(|p| p.duration)
            .next()
            .unwrap_or(0);
        let span = (index.pts.last().unwrap() - index.pts[0] + last.max(0)) as f64 * tb;
        if span > 0.0 {
            span
        } else {
            0.0
        }
    } else {
        let d = container_duration;
        if d > 0 {
            d as f64 / ffi::AV_TIME_BASE as f64
        } else {
            0.0
        }
    }
}

impl VideoReader {
    /// Opens and indexes a clip. Fails, naming the file, if it is missing, empty, not a
    /// video, truncated, audio-only or has no frames.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut input = open_input(path)?;
        let stream = video_stream(&input, path)?;
        let stream_index = stream.index();
        let time_base = stream.time_base();
        let declared_frames = stream.frames();
        let avg_rate = stream.avg_frame_rate();
        let rotation = stream_rotation(&stream, path);
        let decoder = open_decoder(path, &stream)?;
        let (coded_width, coded_height) = (decoder.width(), decoder.height());
        let pix = decoder.format();
        let codec_name = decoder.id().name().to_string();
        drop(decoder);
        if coded_width == 0 || coded_height == 0 {
            return Err(VideoError::NotVideo {
                path: path.to_path_buf(),
                detail: "the video stream has no frame size".into(),
            });
        }

        let pkts = index_packets(&mut input, stream_index, declared_frames, path)?;

        let (index, seekable) = frame_index(&pkts, path);
        let frame_count = pkts.len() as u32;
        let duration = clip_duration(
            &pkts,
            &index,
            seekable,
            f64::from(time_base),
            input.duration(),
        );
        let avg = f64::from(avg_rate);
        let fps = if avg.is_finite() && avg > 0.0 {
            avg
        } else if duration > 0.0 {
            frame_count as f64 / duration
        } else {
            0.0
        };
        let (width, height) = if rotation % 180 == 90 {
            (coded_height, coded_width)
        } else {
            (coded_width, coded_height)
        };
        let pixel_format = pix
            .descriptor()
            .map(|d| d.name().to_string())
            .unwrap_or_else(|| format!("{pix:?}"));
        Ok(VideoReader {
            info: VideoInfo {
                path: path.to_path_buf(),
                width,
                height,
                coded_width,
                coded_height,
                rotation,
                frame_count,
                fps,
                duration,
                codec: codec_name,
                pixel_format,
                seekable,
            },
            stream_index,
            index,
            stats: ReadStats::default(),
        })
    }

    /// What probing found.
    pub fn info(&self) -> &VideoInfo {
        &self.info
    }

    /// What the last read did (frames decoded, seeks).
    pub fn last_read_stats(&self) -> ReadStats {
        self.stats
    }

    /// Decodes the frames of `plan` (indices in any order, repeats allowed), cropped and
    /// resized as it says, into RGB8 [`Frames`] in plan order. The plan is validated first.
    pub fn read(&mut self, plan: &TransformPlan) -> Result<Frames> {
        self.read_range(plan, None)
    }

    /// Like [`VideoReader::read`], with the plan's indices relative to `range` (a sample's
    /// frame range) instead of the whole clip.
    pub fn read_range(
        &mut self,
        plan: &TransformPlan,
        range: Option<FrameRange>,
    ) -> Result<Frames> {
        let path = self.info.path.clone();
        let clip = self.clip_info(range)?;
        plan.check(&clip).map_err(|reason| VideoError::BadPlan {
            path: path.clone(),
            reason,
        })?;
        let offset = range.map_or(0, |r| r.start);
        let needed: BTreeSet<u32> = plan.frames.iter().map(|&i| i + offset).collect();
        let out = output_size(plan, self.info.width, self.info.height);
        let mut processor = FrameProcessor::new(plan);
        let mut converter = RgbConverter::default();
        let rotation = self.info.rotation;
        let mut got: HashMap<u32, Vec<u8>> = HashMap::with_capacity(needed.len());
        self.stats = ReadStats::default();
        let mut stats = ReadStats::default();
        let result = self.decode_indices(&needed, &mut stats, |idx, frame| {
            let (rgb, w, h) = converter.convert(frame)?;
            let (rgb, w, h) = if rotation == 0 {
                (rgb, w, h)
            } else {
                rotate_rgb(&rgb, w, h, rotation)
            };
            let (pixels, size) = processor.process(&rgb, w, h).map_err(|e| format!("frame {idx}: {e}"))?;
            if size.width != out.width || size.height != out.height {
                return Err(format!(
                    "frame {idx} is {w}x{h}, but the clip was probed as {}x{} (the frame size changes mid-stream)",
                    out.width, out.height
                ));
            }
            got.insert(idx, pixels);
            Ok(())
        });
        stats.frames_kept = got.len() as u64;
        self.stats = stats;
        result?;
        let frame_bytes = out.width as usize * out.height as usize * 3;
        let mut rgb = Vec::new();
        let total = frame_bytes.checked_mul(plan.frames.len());
        if total.is_none_or(|t| t > MAX_READ_BYTES || rgb.try_reserve_exact(t).is_err()) {
            return Err(VideoError::BadPlan {
                path,
                reason: format!(
                    "{} frames of {}x{} RGB ({:.1} GiB) cannot be allocated (at most 64 GiB per read)",
                    plan.frames.len(),
                    out.width,
                    out.height,
                    (frame_bytes as f64) * plan.frames.len() as f64 / (1u64 << 30) as f64
                ),
            });
        }
        for &i in &plan.frames {
            rgb.extend_from_slice(&got[&(i + offset)]);
        }
        Ok(Frames {
            width: out.width,
            height: out.height,
            count: plan.frames.len() as u32,
            rgb,
        })
    }

    /// The clip summary, restricted to `range` if given (checked against the clip).
    pub fn clip_info(&self, range: Option<FrameRange>) -> Result<ClipInfo> {
        let mut clip = self.info.clip_info();
        if let Some(r) = range {
            if r.start >= r.end || r.end > clip.frame_count {
                return Err(VideoError::BadPlan {
                    path: self.info.path.clone(),
                    reason: format!(
                        "frame range {}..{} does not fit the clip's {} frames",
                        r.start, r.end, clip.frame_count
                    ),
                });
            }
            clip.frame_count = r.end - r.start;
        }
        Ok(clip)
    }

    /// Decodes forward (seeking where it helps) and hands each needed frame, once, to `on_frame`.
    fn decode_indices(
        &self,
        needed: &BTreeSet<u32>,
        stats: &mut ReadStats,
        mut on_frame: impl FnMut(u32, &frame::Video) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let path = self.info.path.clone();
        let dec_err = |detail: String| VideoError::Decode {
            path: path.clone(),
            detail,
        };
        let mut remaining = needed.clone();
        let mut use_pts = self.info.seekable;
        let mut allow_seek = self.info.seekable;
        'restart: loop {
            let mut input = open_input(&path)?;
            let stream = input
                .stream(self.stream_index)
                .ok_or_else(|| dec_err("the video stream disappeared on reopening".into()))?;
            let mut decoder = open_decoder(&path, &stream)?;
            let seeks_before = stats.seeks;
            let mut await_key = false;
            let mut counter: u32 = 0;
            let mut last_key_sent: Option<usize> = None;
            let mut seek_target: Option<u32> = None;
            let seek_to = |input: &mut format::context::Input,
                           decoder: &mut ffmpeg::decoder::Video,
                           key: &KeyFrame,
                           stats: &mut ReadStats|
             -> bool {
                stats.seeks += 1;
                // SAFETY: a valid, opened input context and one of its stream indices.
                let r = unsafe {
                    ffi::av_seek_frame(
                        input.as_mut_ptr(),
                        self.stream_index as i32,
                        key.seek_ts,
                        ffi::AVSEEK_FLAG_BACKWARD as i32,
                    )
                };
                decoder.flush();
                r >= 0
            };
            if allow_seek {
                if let Some(k) = remaining
                    .first()
                    .and_then(|&first| self.index.key_for(first))
                {
                    if self.index.keys[k].index > 0 {
                        if !seek_to(&mut input, &mut decoder, &self.index.keys[k], stats) {
                            allow_seek = false;
                            stats.restarts += 1;
                            continue 'restart;
                        }
                        seek_target = remaining.first().copied();
                        await_key = true;
                    }
                    last_key_sent = Some(k);
                }
            }
            let mut packet = Packet::empty();
            let mut frame = frame::Video::empty();
            let mut eof = false;
            let mut last_error: Option<String> = None;
            let (mut decoded, mut matched) = (0u64, 0u64);
            let mut max_seen: Option<u32> = None;
            while !remaining.is_empty() {
                if !eof {
                    match packet.read(&mut input) {
                        Ok(()) => {
                            if packet.stream() != self.stream_index {
                                continue;
                            }
                            if use_pts && packet.is_key() {
                                if let Some(i) = packet.pts().and_then(|t| self.index.lookup(t)) {
                                    if let Some(k) = self.index.key_for(i) {
                                        last_key_sent = Some(last_key_sent.map_or(k, |l| l.max(k)));
                                    }
                                }
                            }
                            if use_pts {
                                // A frame nobody needs is skipped by the decoder if no other
                                // frame references it (non-reference B-frames).
                                let wanted = packet
                                    .pts()
                                    .and_then(|t| self.index.lookup(t))
                                    .is_none_or(|i| remaining.contains(&i));
                                let discard = if wanted {
                                    ffi::AVDiscard::AVDISCARD_DEFAULT
                                } else {
                                    ffi::AVDiscard::AVDISCARD_NONREF
                                };
                                // SAFETY: setting a plain field of the opened codec context between calls.
                                unsafe { (*decoder.as_mut_ptr()).skip_frame = discard };
                            }
                            match decoder.send_packet(&packet) {
                                Ok(()) => {}
                                Err(ffmpeg::Error::InvalidData) => {
                                    last_error = Some("invalid data in a packet".into());
                                }
                                Err(e) => return Err(dec_err(format!("ffmpeg: {e}"))),
                            }
                        }
                        Err(ffmpeg::Error::Eof) => {
                            eof = true;
                            let _ = decoder.send_eof();
                        }
                        Err(ffmpeg::Error::InvalidData) => {
                            last_error = Some("invalid data while demuxing".into());
                            continue;
                        }
                        Err(e) => {
                            last_error = Some(e.to_string());
                            eof = true;
                            let _ = decoder.send_eof();
                        }
                    }
                }
                let mut drained = false;
                loop {
                    match decoder.receive_frame(&mut frame) {
                        Ok(()) => {}
                        Err(ffmpeg::Error::Eof) => {
                            drained = true;
                            break;
                        }
                        Err(_) => break,
                    }
                    decoded += 1;
                    stats.frames_decoded += 1;
                    let idx = if use_pts {
                        match frame
                            .timestamp()
                            .or(frame.pts())
                            .and_then(|t| self.index.lookup(t))
                        {
                            Some(i) => {
                                matched += 1;
                                i
                            }
                            None => continue,
                        }
                    } else {
                        counter += 1;
                        counter - 1
                    };
                    // After a seek, frames before the first keyframe (open-GOP leading pictures)
                    // may miss references: skip them.
                    if await_key {
                        if !frame.is_key() {
                            continue;
                        }
                        await_key = false;
                    }
                    max_seen = Some(max_seen.map_or(idx, |m| m.max(idx)));
                    if let Some(target) = seek_target.take() {
                        if idx > target {
                            // The seek landed after the wanted frame: start over without seeking.
                            tracing::debug!(
                                "{}: seek overshot frame {target} (landed at {idx}); decoding from the start",
                                path.display()
                            );
                            allow_seek = false;
                            stats.restarts += 1;
                            continue 'restart;
                        }
                    }
                    if remaining.remove(&idx) {
                        on_frame(idx, &frame).map_err(dec_err)?;
                    }
                }
                if eof && drained {
                    break;
                }
                if eof {
                    // No more packets and the decoder returned neither a frame nor EOF.
                    if decoder.receive_frame(&mut frame).is_err() {
                        break;
                    }
                    continue;
                }
                // Seek ahead when the next needed frame lies past a keyframe we have not reached.
                if allow_seek {
                    if let Some(&next) = remaining.first() {
                        if let Some(k) = self.index.key_for(next) {
                            if last_key_sent.is_none_or(|l| k > l + 1) {
                                if !seek_to(&mut input, &mut decoder, &self.index.keys[k], stats) {
                                    allow_seek = false;
                                    stats.restarts += 1;
                                    continue 'restart;
                                }
                                seek_target = Some(next);
                                await_key = true;
                                last_key_sent = Some(k);
                            }
                        }
                    }
                }
            }
            if !remaining.is_empty() && use_pts && decoded > 0 && matched == 0 {
                // The decoder's timestamps do not match the container's: count frames instead.
                tracing::debug!(
                    "{}: decoded timestamps do not match the index; counting frames",
                    path.display()
                );
                use_pts = false;
                allow_seek = false;
                stats.restarts += 1;
                continue 'restart;
            }
            if !remaining.is_empty() && stats.seeks > seeks_before {
                // Some demuxers seek imprecisely (e.g. MPEG-TS); before calling frames missing,
                // try once more from the start without seeking.
                tracing::debug!(
                    "{}: frames missing after seeking; decoding from the start",
                    path.display()
                );
                allow_seek = false;
                stats.restarts += 1;
                continue 'restart;
            }
            if !remaining.is_empty()
                && remaining
                    .first()
                    .is_some_and(|&r| max_seen.is_none_or(|m| r > m))
            {
                // The stream ended before the needed frames: fewer frames than indexed.
                return Err(VideoError::TooFewFrames {
                    path: path.clone(),
                    have: max_seen.map_or(0, |m| m + 1),
                    need: remaining.last().unwrap() + 1,
                });
            }
            if !remaining.is_empty() {
                let list: Vec<String> = remaining.iter().take(8).map(|i| i.to_string()).collect();
                let more = if remaining.len() > 8 { ", ..." } else { "" };
                let why = last_error
                    .map(|e| format!(" (ffmpeg: {e})"))
                    .unwrap_or_default();
                return Err(dec_err(format!(
                    "frame(s) {}{more} could not be decoded{why}",
                    list.join(", ")
                )));
            }
            return Ok(());
        }
    }
}

/// Converts decoded frames of any pixel format (8/10/12-bit YUV, RGB, palettes, odd sizes)
/// to packed RGB24 with swscale, honouring the frame's colour matrix and range.
#[derive(Default)]
struct RgbConverter {
    scaler: Option<(scaling::Context, ffmpeg::format::Pixel, u32, u32, i32, i32)>,
    out: Option<frame::Video>,
}

impl RgbConverter {
    fn convert(&mut self, src: &frame::Video) -> std::result::Result<(Vec<u8>, u32, u32), String> {
        let (w, h, fmt) = (src.width(), src.height(), src.format());
        // SAFETY: reading plain fields of a valid decoded AVFrame.
        let (space, range) = unsafe {
            (
                (*src.as_ptr()).colorspace as i32,
                (*src.as_ptr()).color_range as i32,
            )
        };
        let stale = match &self.scaler {
            Some((_, f, sw, sh, sp, rg)) => {
                *f != fmt || *sw != w || *sh != h || *sp != space || *rg != range
            }
            None => true,
        };
        if stale {
            let mut ctx = scaling::Context::get(
                fmt,
                w,
                h,
                ffmpeg::format::Pixel::RGB24,
                w,
                h,
                scaling::Flags::BILINEAR,
            )
            .map_err(|e| format!("cannot convert pixel format {fmt:?} to RGB: {e}"))?;
            let full_range = range == ffi::AVColorRange::AVCOL_RANGE_JPEG as i32;
            // SAFETY: valid swscale context; coefficient tables are static.
            unsafe {
                let table = ffi::sws_getCoefficients(space);
                let dst_table = ffi::sws_getCoefficients(ffi::SWS_CS_DEFAULT as i32);
                ffi::sws_setColorspaceDetails(
                    ctx.as_mut_ptr(),
                    table,
                    full_range as i32,
                    dst_table,
                    1,
                    0,
                    1 << 16,
                    1 << 16,
                );
            }
            self.scaler = Some((ctx, fmt, w, h, space, range));
            self.out = None;
        }
        let (ctx, ..) = self.scaler.as_mut().unwrap();
        let out = self.out.get_or_insert_with(frame::Video::empty);
        ctx.run(src, out)
            .map_err(|e| format!("pixel conversion failed: {e}"))?;
        let stride = out.stride(0);
        let data = out.data(0);
        let row = w as usize * 3;
        let mut rgb = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            rgb.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        Ok((rgb, w, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_follows_ffmpeg_tool() {
        // The matrix FFmpeg 5.1 writes for `-metadata:s:v rotate=90` (ffprobe: rotation=90);
        // the ffmpeg tool turns it with `transpose=cclock`, i.e. 270 degrees clockwise.
        let m = [0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30];
        assert_eq!(
            snap_rotation(rotation_from_matrix(&m).unwrap(), Path::new("x")),
            270
        );
        let m = [0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30];
        assert_eq!(
            snap_rotation(rotation_from_matrix(&m).unwrap(), Path::new("x")),
            90
        );
        let m = [-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30];
        assert_eq!(
            snap_rotation(rotation_from_matrix(&m).unwrap(), Path::new("x")),
            180
        );
        let m = [65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30];
        assert_eq!(
            snap_rotation(rotation_from_matrix(&m).unwrap(), Path::new("x")),
            0
        );
        assert_eq!(snap_rotation(90.0, Path::new("x")), 90);
        assert_eq!(snap_rotation(-90.0, Path::new("x")), 270);
    }
}
