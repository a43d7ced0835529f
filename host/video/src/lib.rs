//! # cogvx-video
//!
//! Video I/O for cogvx, on FFmpeg (ffmpeg-next):
//!
//! * [`probe`] / [`VideoReader::open`]: a clip's display size (rotation applied), frame
//!   count, average fps, duration, codec and pixel format, with errors that name the file
//!   (missing, empty, not a video, truncated, audio only, no frames);
//! * [`VideoReader::read`]: decodes only the frames a [`TransformPlan`] lists (seeking to
//!   keyframes; see [`decode`](mod@decode) for how indices map to timestamps), converts any
//!   pixel format to RGB8, applies rotation, crops and resizes with the plan's filter;
//! * [`encode_mp4`]: H.264 `.mp4` output, written atomically;
//! * [`write_contact_sheet`]: a PNG grid of frames, written atomically;
//! * [`VideoTransforms`] / [`preprocess_clip`]: a clip through a chain of video-transform
//!   plugins; [`bench`]: throughput of that path.
//!
//! [`TransformPlan`]: cogvx_plugin_api::TransformPlan

pub mod bench;
pub mod decode;
pub mod encode;
pub mod error;
pub mod pipeline;
pub mod plan;
pub mod sheet;

pub use decode::{decode, init, probe, ReadStats, VideoInfo, VideoReader};
pub use encode::{encode_mp4, EncodeOptions, Mp4Writer};
pub use error::{Result, VideoError};
pub use pipeline::{
    preprocess_clip, PreprocessError, Preprocessed, TransformError, VideoTransforms,
};
pub use plan::{output_size, FrameProcessor};
pub use sheet::{contact_sheet, evenly_spaced, frame_strip, write_contact_sheet, write_png};
