//! Errors of the video I/O. Every variant names the file it is about.

use std::path::PathBuf;

/// Why a clip could not be probed, decoded, encoded or written.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The path does not exist.
    #[error("{path}: file not found", path = .path.display())]
    NotFound { path: PathBuf },
    /// The path exists but is not a regular file (a directory, a socket, ...).
    #[error("{path}: not a regular file", path = .path.display())]
    NotAFile { path: PathBuf },
    /// The file has zero bytes.
    #[error("{path}: file is empty (0 bytes); re-export or remove the clip", path = .path.display())]
    Empty { path: PathBuf },
    /// FFmpeg recognises no media container in the file.
    #[error("{path}: not a video file ({detail})", path = .path.display())]
    NotVideo { path: PathBuf, detail: String },
    /// The container is recognised but its data ends early or is damaged.
    #[error("{path}: truncated or corrupt video ({detail}); re-download or re-export the clip", path = .path.display())]
    Truncated { path: PathBuf, detail: String },
    /// The file has audio but no video stream.
    #[error("{path}: audio only, no video stream", path = .path.display())]
    AudioOnly { path: PathBuf },
    /// The video stream has no decodable frame.
    #[error("{path}: the video stream has no frames", path = .path.display())]
    NoFrames { path: PathBuf },
    /// The clip has fewer frames than needed.
    #[error("{path}: clip has {have} frames, fewer than the {need} required", path = .path.display())]
    TooFewFrames { path: PathBuf, have: u32, need: u32 },
    /// A transform plan does not fit the clip (index out of range, crop outside the frame, zero size).
    #[error("{path}: bad transform plan: {reason}", path = .path.display())]
    BadPlan { path: PathBuf, reason: String },
    /// FFmpeg failed while decoding.
    #[error("{path}: decoding failed: {detail}", path = .path.display())]
    Decode { path: PathBuf, detail: String },
    /// FFmpeg failed while encoding or muxing.
    #[error("{path}: encoding failed: {detail}", path = .path.display())]
    Encode { path: PathBuf, detail: String },
    /// Frames given to the encoder or the contact sheet are inconsistent.
    #[error("{path}: invalid frames: {reason}", path = .path.display())]
    BadFrames { path: PathBuf, reason: String },
    /// A file-system operation failed.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing an image failed.
    #[error("{path}: cannot write image: {detail}", path = .path.display())]
    Image { path: PathBuf, detail: String },
}

impl VideoError {
    /// The file this error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            VideoError::NotFound { path }
            | VideoError::NotAFile { path }
            | VideoError::Empty { path }
            | VideoError::NotVideo { path, .. }
            | VideoError::Truncated { path, .. }
            | VideoError::AudioOnly { path }
            | VideoError::NoFrames { path }
            | VideoError::TooFewFrames { path, .. }
            | VideoError::BadPlan { path, .. }
            | VideoError::Decode { path, .. }
            | VideoError::Encode { path, .. }
            | VideoError::BadFrames { path, .. }
            | VideoError::Io { path, .. }
            | VideoError::Image { path, .. } => path,
        }
    }
}

/// Result of the video I/O.
pub type Result<T, E = VideoError> = std::result::Result<T, E>;
