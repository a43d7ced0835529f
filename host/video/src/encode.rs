//! Encoding RGB8 [`Frames`] to H.264 `.mp4` (libx264, yuv420p) with ffmpeg-next.

use std::path::{Path, PathBuf};

use cogvx_plugin_api::Frames;
use ffmpeg::{codec, encoder, format, frame, software::scaling, Packet, Rational};
use ffmpeg_next as ffmpeg;

use crate::decode::init;
use crate::error::{Result, VideoError};
use cogvx_io::temp_path;

/// Encoder settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodeOptions {
    /// x264 constant rate factor (0 = lossless, 18 = visually lossless, 23 = x264's default).
    pub crf: u32,
    /// x264 preset (`ultrafast` ... `veryslow`).
    pub preset: String,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            crf: 18,
            preset: "fast".into(),
        }
    }
}

/// Writes `frames` as an H.264 (libx264, yuv420p, BT.601 limited range) `.mp4` at `fps`.
/// yuv420p needs even sizes: an odd width or height is padded by repeating the last
/// column or row. The file is written to a temporary name and renamed, so `path` is
/// either absent/old or complete.
pub fn encode_mp4(
    path: impl AsRef<Path>,
    frames: &Frames,
    fps: f64,
    options: &EncodeOptions,
) -> Result<()> {
    let path = path.as_ref();
    frames.check().map_err(|reason| VideoError::BadFrames {
        path: path.to_path_buf(),
        reason,
    })?;
    let mut writer = Mp4Writer::create(path, frames.width, frames.height, fps, options)?;
    let size = (frames.width * frames.height * 3) as usize;
    for frame in frames.rgb.chunks_exact(size) {
        writer.write_frame(frame)?;
    }
    writer.finish()
}

/// A streaming H.264 `.mp4` writer (see [`encode_mp4`]): frames are pushed one at a time,
/// so a long clip is never held in memory. The output appears at its path only when
/// [`Mp4Writer::finish`] succeeds; dropping an unfinished writer removes the temporary file.
pub struct Mp4Writer {
    path: PathBuf,
    tmp: PathBuf,
    width: u32,
    height: u32,
    frames: i64,
    time_base: Rational,
    ost_tb: Rational,
    octx: Option<format::context::Output>,
    enc: encoder::Video,
    scaler: scaling::Context,
    rgb: frame::Video,
    yuv: frame::Video,
}

impl Mp4Writer {
    /// Starts a `width` x `height` clip at `fps` frames per second.
    pub fn create(
        path: impl AsRef<Path>,
        width: u32,
        height: u32,
        fps: f64,
        options: &EncodeOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        init();
        let bad = |reason: String| VideoError::BadFrames {
            path: path.to_path_buf(),
            reason,
        };
        if width == 0 || height == 0 {
            return Err(bad(format!("frame size {width}x{height} is empty")));
        }
        if !(fps.is_finite() && fps > 0.0) {
            return Err(bad(format!("frame rate {fps} is not positive")));
        }
        let tmp = temp_path(path);
        match Self::open(path, &tmp, width, height, fps, options) {
            Ok(w) => Ok(w),
            Err(detail) => {
                let _ = std::fs::remove_file(&tmp);
                Err(VideoError::Encode {
                    path: path.to_path_buf(),
                    detail,
                })
            }
        }
    }

    fn open(
        path: &Path,
        tmp: &Path,
        w: u32,
        h: u32,
        fps: f64,
        options: &EncodeOptions,
    ) -> std::result::Result<Self, String> {
        let (ew, eh) = (w + w % 2, h + h % 2);
        let codec = encoder::find_by_name("libx264")
            .or_else(|| encoder::find(codec::Id::H264))
            .ok_or("this FFmpeg build has no H.264 encoder (install FFmpeg with libx264)")?;
        let mut octx = format::output_as(&tmp, "mp4")
            .map_err(|e| format!("cannot create the output file: {e}"))?;
        let global_header = octx.format().flags().contains(format::Flags::GLOBAL_HEADER);
        let rate = Rational::from(fps).reduce();
        let time_base = rate.invert();
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(|e| e.to_string())?;
        enc.set_width(ew);
        enc.set_height(eh);
        enc.set_format(format::Pixel::YUV420P);
        enc.set_time_base(time_base);
        enc.set_frame_rate(Some(rate));
        enc.set_colorspace(ffmpeg::color::Space::SMPTE170M);
        enc.set_color_range(ffmpeg::color::Range::MPEG);
        if global_header {
            enc.set_flags(codec::Flags::GLOBAL_HEADER);
        }
        let mut opts = ffmpeg::Dictionary::new();
        opts.set("preset", &options.preset);
        opts.set("crf", &options.crf.to_string());
        let enc = enc
            .open_as_with(codec, opts)
            .map_err(|e| format!("cannot open the H.264 encoder: {e}"))?;
        {
            let mut ost = octx.add_stream(codec).map_err(|e| e.to_string())?;
            ost.set_parameters(&enc);
            ost.set_time_base(time_base);
            ost.set_avg_frame_rate(rate);
        }
        octx.write_header()
            .map_err(|e| format!("cannot write the mp4 header: {e}"))?;
        let ost_tb = octx
            .stream(0)
            .ok_or("the output stream is missing")?
            .time_base();
        let scaler = scaling::Context::get(
            format::Pixel::RGB24,
            ew,
            eh,
            format::Pixel::YUV420P,
            ew,
            eh,
            scaling::Flags::BILINEAR,
        )
        .map_err(|e| format!("cannot set up RGB to YUV conversion: {e}"))?;
        Ok(Mp4Writer {
            path: path.to_path_buf(),
            tmp: tmp.to_path_buf(),
            width: w,
            height: h,
            frames: 0,
            time_base,
            ost_tb,
            octx: Some(octx),
            enc,
            scaler,
            rgb: frame::Video::new(format::Pixel::RGB24, ew, eh),
            yuv: frame::Video::empty(),
        })
    }

    fn err(&self, detail: String) -> VideoError {
        VideoError::Encode {
            path: self.path.clone(),
            detail,
        }
    }

    fn drain(&mut self) -> Result<()> {
        let mut packet = Packet::empty();
        let octx = self.octx.as_mut().expect("writer already finished");
        while self.enc.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            packet.rescale_ts(self.time_base, self.ost_tb);
            if let Err(e) = packet.write_interleaved(octx) {
                return Err(VideoError::Encode {
                    path: self.path.clone(),
                    detail: format!("cannot write a packet: {e}"),
                });
            }
        }
        Ok(())
    }

    /// Appends one packed RGB8 frame of the writer's size.
    pub fn write_frame(&mut self, rgb: &[u8]) -> Result<()> {
        let (w, h) = (self.width as usize, self.height as usize);
        let row = w * 3;
        if rgb.len() != row * h {
            return Err(VideoError::BadFrames {
                path: self.path.clone(),
                reason: format!(
                    "a frame of {} bytes is not {w}x{h} RGB ({} bytes)",
                    rgb.len(),
                    row * h
                ),
            });
        }
        let stride = self.rgb.stride(0);
        let eh = self.rgb.height() as usize;
        let padded = self.rgb.width() as usize > w;
        let data = self.rgb.data_mut(0);
        for y in 0..eh {
            let sy = y.min(h - 1);
            let dst = &mut data[y * stride..y * stride + row + if padded { 3 } else { 0 }];
            dst[..row].copy_from_slice(&rgb[sy * row..(sy + 1) * row]);
            if padded {
                let (head, tail) = dst.split_at_mut(row);
                tail[..3].copy_from_slice(&head[row - 3..row]);
            }
        }
        self.scaler
            .run(&self.rgb, &mut self.yuv)
            .map_err(|e| self.err(format!("RGB to YUV conversion failed: {e}")))?;
        self.yuv.set_pts(Some(self.frames));
        let n = self.frames;
        self.enc
            .send_frame(&self.yuv)
            .map_err(|e| self.err(format!("the encoder refused frame {n}: {e}")))?;
        self.frames += 1;
        self.drain()
    }

    /// Flushes the encoder, finishes the file and renames it into place.
    pub fn finish(mut self) -> Result<()> {
        if self.frames == 0 {
            return Err(VideoError::BadFrames {
                path: self.path.clone(),
                reason: "no frames were written".into(),
            });
        }
        self.enc.send_eof().map_err(|e| self.err(e.to_string()))?;
        self.drain()?;
        let mut octx = self.octx.take().expect("writer already finished");
        octx.write_trailer()
            .map_err(|e| self.err(format!("cannot finish the mp4: {e}")))?;
        drop(octx);
        std::fs::rename(&self.tmp, &self.path).map_err(|source| VideoError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for Mp4Writer {
    fn drop(&mut self) {
        if self.octx.take().is_some() || self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
