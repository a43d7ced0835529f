//! Conditioning images of image-to-video sampling, and the pipeline's image preprocessing
//! (diffusers `VideoProcessor.preprocess` of a PIL image: resize to `height x width` with
//! Lanczos, `x / 255`, then `2x - 1`).

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use cogvx_plugin_api::{Frames, ResizeFilter, Size, TransformPlan};
use cogvx_video::FrameProcessor;

use crate::EngineError;

/// A conditioning image: packed RGB8 pixels of any size (resized by the pipeline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionImage {
    pub width: u32,
    pub height: u32,
    /// `height * width * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
}

impl ConditionImage {
    /// Checks the pixel count against the size.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self, EngineError> {
        let want = width as u64 * height as u64 * 3;
        if width == 0 || height == 0 || rgb.len() as u64 != want {
            return Err(EngineError::Input(format!(
                "a conditioning image of {width}x{height} needs {want} RGB bytes, got {}",
                rgb.len()
            )));
        }
        Ok(ConditionImage { width, height, rgb })
    }

    /// Reads an image file (PNG, JPEG, ... anything FFmpeg decodes) or the first frame of a
    /// video, at its own size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EngineError> {
        let path = path.as_ref();
        let mut reader = cogvx_video::VideoReader::open(path)?;
        let plan = TransformPlan {
            frames: vec![0],
            crop: None,
            resize: None,
            filter: ResizeFilter::Lanczos3,
        };
        let frames = reader.read(&plan)?;
        Self::from_frames(&frames, 0)
    }

    /// Frame `index` of `frames`.
    pub fn from_frames(frames: &Frames, index: u32) -> Result<Self, EngineError> {
        frames.check().map_err(EngineError::Input)?;
        if index >= frames.count {
            return Err(EngineError::Input(format!(
                "frame {index} of {} frames requested as the conditioning image",
                frames.count
            )));
        }
        let size = frames.width as usize * frames.height as usize * 3;
        let start = index as usize * size;
        Self::new(
            frames.width,
            frames.height,
            frames.rgb[start..start + size].to_vec(),
        )
    }

    /// `video_processor.preprocess(image, height, width)`: resized to `width x height` with
    /// Lanczos-3 (Pillow's filter, as the PIL path of diffusers; no resize when the size already
    /// matches), `x / 255 * 2 - 1`, as `[3, height, width]`.
    pub fn preprocess<B: Backend>(
        &self,
        height: usize,
        width: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, EngineError> {
        let plan = TransformPlan {
            frames: vec![0],
            crop: None,
            resize: Some(Size {
                width: width as u32,
                height: height as u32,
            }),
            filter: ResizeFilter::Lanczos3,
        };
        let (rgb, size) = FrameProcessor::new(&plan)
            .process(&self.rgb, self.width, self.height)
            .map_err(|e| EngineError::Input(format!("conditioning image: {e}")))?;
        if (size.width as usize, size.height as usize) != (width, height) {
            return Err(EngineError::Input(format!(
                "conditioning image resized to {}x{}, expected {width}x{height}",
                size.width, size.height
            )));
        }
        let data: Vec<f32> = rgb.iter().map(|&v| v as f32 / 255.0 * 2.0 - 1.0).collect();
        Ok(
            Tensor::<B, 3>::from_data(TensorData::new(data, [height, width, 3]), device)
                .permute([2, 0, 1]),
        )
    }
}
