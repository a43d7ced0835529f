//! Encoding RGB8 [`Frames`] to H.264 `.mp4` (libx264, yuv420p) with ffmpeg-next.

use std::path::Path;

use cogvx_plugin_api::Frames;
use ffmpeg::{codec, encoder, format, frame, software::scaling, Packet, Rational};
use ffmpeg_next as ffmpeg;

use crate::atomic::write_atomically;
use crate::decode::init;
use crate::error::{Result, VideoError};

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

/// Checks that `frames` is consistent: non-zero sizes and count, and `rgb` of the right length.
pub fn check_frames(frames: &Frames) -> std::result::Result<(), String> {
    if frames.width == 0 || frames.height == 0 || frames.count == 0 {
        return Err(format!(
            "{} frames of {}x{}: nothing to write",
            frames.count, frames.width, frames.height
        ));
    }
    let want = frames.count as u64 * frames.height as u64 * frames.width as u64 * 3;
    if frames.rgb.len() as u64 != want {
        return Err(format!(
            "{} bytes of RGB for {} frames of {}x{} (expected {want})",
            frames.rgb.len(),
            frames.count,
            frames.width,
            frames.height
        ));
    }
    Ok(())
}

/// Writes `frames` as an H.264 (libx264, yuv420p, BT.601 limited range) `.mp4` at `fps`.
/// yuv420p needs even sizes: an odd width or height is padded by repeating the last
/// column or row. The file is written to a temporary name and renamed, so `path` is
/// either absent/old or complete.
pub fn encode_mp4(path: impl AsRef<Path>, frames: &Frames, fps: f64, options: &EncodeOptions) -> Result<()> {
    let path = path.as_ref();
    init();
    check_frames(frames).map_err(|reason| VideoError::BadFrames {
        path: path.to_path_buf(),
        reason,
    })?;
    if !(fps.is_finite() && fps > 0.0) {
        return Err(VideoError::BadFrames {
            path: path.to_path_buf(),
            reason: format!("frame rate {fps} is not positive"),
        });
    }
    write_atomically(path, |tmp| {
        encode_to(tmp, frames, fps, options).map_err(|detail| VideoError::Encode {
            path: path.to_path_buf(),
            detail,
        })
    })
}

fn encode_to(tmp: &Path, frames: &Frames, fps: f64, options: &EncodeOptions) -> std::result::Result<(), String> {
    let (w, h) = (frames.width, frames.height);
    let (ew, eh) = (w + w % 2, h + h % 2);
    let codec = encoder::find_by_name("libx264")
        .or_else(|| encoder::find(codec::Id::H264))
        .ok_or("this FFmpeg build has no H.264 encoder (install FFmpeg with libx264)")?;
    let mut octx = format::output_as(&tmp, "mp4").map_err(|e| format!("cannot create the output file: {e}"))?;
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
    let mut enc = enc
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
    let ost_tb = octx.stream(0).ok_or("the output stream is missing")?.time_base();

    let mut scaler = scaling::Context::get(
        format::Pixel::RGB24,
        ew,
        eh,
        format::Pixel::YUV420P,
        ew,
        eh,
        scaling::Flags::BILINEAR,
    )
    .map_err(|e| format!("cannot set up RGB to YUV conversion: {e}"))?;
    let mut rgb = frame::Video::new(format::Pixel::RGB24, ew, eh);
    let mut yuv = frame::Video::empty();
    let frame_bytes = (w * h * 3) as usize;
    let mut packet = Packet::empty();
    let mut write_packets =
        |enc: &mut encoder::Video, octx: &mut format::context::Output| -> std::result::Result<(), String> {
            while enc.receive_packet(&mut packet).is_ok() {
                packet.set_stream(0);
                packet.rescale_ts(time_base, ost_tb);
                packet
                    .write_interleaved(octx)
                    .map_err(|e| format!("cannot write a packet: {e}"))?;
            }
            Ok(())
        };
    for i in 0..frames.count as usize {
        let src = &frames.rgb[i * frame_bytes..(i + 1) * frame_bytes];
        let stride = rgb.stride(0);
        let data = rgb.data_mut(0);
        let row = (w * 3) as usize;
        for y in 0..eh as usize {
            let sy = y.min(h as usize - 1);
            let dst = &mut data[y * stride..y * stride + (ew * 3) as usize];
            dst[..row].copy_from_slice(&src[sy * row..(sy + 1) * row]);
            if ew > w {
                let last = row - 3;
                let (head, tail) = dst.split_at_mut(row);
                tail[..3].copy_from_slice(&head[last..last + 3]);
            }
        }
        scaler
            .run(&rgb, &mut yuv)
            .map_err(|e| format!("RGB to YUV conversion failed: {e}"))?;
        yuv.set_pts(Some(i as i64));
        enc.send_frame(&yuv)
            .map_err(|e| format!("the encoder refused frame {i}: {e}"))?;
        write_packets(&mut enc, &mut octx)?;
    }
    enc.send_eof().map_err(|e| e.to_string())?;
    write_packets(&mut enc, &mut octx)?;
    octx.write_trailer()
        .map_err(|e| format!("cannot finish the mp4: {e}"))?;
    drop(octx);
    Ok(())
}
