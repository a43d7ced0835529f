//! Checking and executing [`TransformPlan`]s on RGB8 frames: crop, then resize with the
//! plan's filter (`fast_image_resize`, a convolution filter that averages over the whole
//! footprint when downscaling, not a point sampler).

use cogvx_plugin_api::{CropBox, ResizeFilter, Size, TransformPlan};
use fast_image_resize as fir;

/// The size of each output frame of a (valid) plan on a clip of `width` x `height`.
pub fn output_size(plan: &TransformPlan, width: u32, height: u32) -> Size {
    if let Some(s) = plan.resize {
        return s;
    }
    match plan.crop {
        Some(c) => Size {
            width: c.width,
            height: c.height,
        },
        None => Size { width, height },
    }
}

fn resize_alg(filter: ResizeFilter) -> fir::ResizeAlg {
    match filter {
        ResizeFilter::Nearest => fir::ResizeAlg::Nearest,
        ResizeFilter::Bilinear => fir::ResizeAlg::Convolution(fir::FilterType::Bilinear),
        ResizeFilter::Bicubic => fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom),
        ResizeFilter::Lanczos3 => fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3),
    }
}

/// Crops and resizes packed RGB8 frames as a plan says. Keeps its resampling buffers
/// between frames.
pub struct FrameProcessor {
    crop: Option<CropBox>,
    resize: Option<Size>,
    filter: ResizeFilter,
    resizer: fir::Resizer,
}

impl FrameProcessor {
    /// A processor for the crop, size and filter of `plan` (assumed validated).
    pub fn new(plan: &TransformPlan) -> Self {
        FrameProcessor {
            crop: plan.crop,
            resize: plan.resize,
            filter: plan.filter,
            resizer: fir::Resizer::new(),
        }
    }

    /// Crops then resizes one packed RGB8 frame of `width` x `height`; returns the output
    /// frame (packed RGB8) and its size. The crop must lie inside the frame.
    pub fn process(
        &mut self,
        rgb: &[u8],
        width: u32,
        height: u32,
    ) -> Result<(Vec<u8>, Size), String> {
        let crop = self.crop.unwrap_or(CropBox {
            x: 0,
            y: 0,
            width,
            height,
        });
        if crop.width == 0
            || crop.height == 0
            || crop.x as u64 + crop.width as u64 > width as u64
            || crop.y as u64 + crop.height as u64 > height as u64
        {
            return Err(format!(
                "crop box {}x{} at ({}, {}) lies outside the {width}x{height} frame",
                crop.width, crop.height, crop.x, crop.y
            ));
        }
        let out = self.resize.unwrap_or(Size {
            width: crop.width,
            height: crop.height,
        });
        if out.width == crop.width && out.height == crop.height {
            // Pure crop (or identity): copy rows.
            let row = crop.width as usize * 3;
            let mut dst = Vec::with_capacity(row * crop.height as usize);
            for y in crop.y..crop.y + crop.height {
                let start = (y as usize * width as usize + crop.x as usize) * 3;
                dst.extend_from_slice(&rgb[start..start + row]);
            }
            return Ok((dst, out));
        }
        let src = fir::images::ImageRef::new(width, height, rgb, fir::PixelType::U8x3)
            .map_err(|e| e.to_string())?;
        let mut dst = fir::images::Image::new(out.width, out.height, fir::PixelType::U8x3);
        let options = fir::ResizeOptions::new()
            .resize_alg(resize_alg(self.filter))
            .crop(
                crop.x as f64,
                crop.y as f64,
                crop.width as f64,
                crop.height as f64,
            );
        self.resizer
            .resize(&src, &mut dst, &options)
            .map_err(|e| e.to_string())?;
        Ok((dst.into_vec(), out))
    }
}

/// Rotates a packed RGB8 frame clockwise by `degrees_cw` (0, 90, 180 or 270); returns the
/// rotated pixels and their width and height.
pub fn rotate_rgb(src: &[u8], width: u32, height: u32, degrees_cw: u32) -> (Vec<u8>, u32, u32) {
    let (w, h) = (width as usize, height as usize);
    match degrees_cw % 360 {
        90 => {
            // (x, y) -> (h - 1 - y, x) in a h-wide frame.
            let mut dst = vec![0u8; w * h * 3];
            for y in 0..h {
                let src_row = &src[y * w * 3..(y + 1) * w * 3];
                let dx = h - 1 - y;
                for x in 0..w {
                    let d = (x * h + dx) * 3;
                    dst[d..d + 3].copy_from_slice(&src_row[x * 3..x * 3 + 3]);
                }
            }
            (dst, height, width)
        }
        180 => {
            let mut dst = vec![0u8; w * h * 3];
            for y in 0..h {
                let src_row = &src[y * w * 3..(y + 1) * w * 3];
                let dy = h - 1 - y;
                for x in 0..w {
                    let d = (dy * w + (w - 1 - x)) * 3;
                    dst[d..d + 3].copy_from_slice(&src_row[x * 3..x * 3 + 3]);
                }
            }
            (dst, width, height)
        }
        270 => {
            // (x, y) -> (y, w - 1 - x) in a h-wide frame.
            let mut dst = vec![0u8; w * h * 3];
            for y in 0..h {
                let src_row = &src[y * w * 3..(y + 1) * w * 3];
                for x in 0..w {
                    let d = ((w - 1 - x) * h + y) * 3;
                    dst[d..d + 3].copy_from_slice(&src_row[x * 3..x * 3 + 3]);
                }
            }
            (dst, height, width)
        }
        _ => (src.to_vec(), width, height),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_moves_corners() {
        // 3x2 frame, pixel value = index.
        let src: Vec<u8> = (0..6u8).flat_map(|i| [i, i, i]).collect();
        let (r90, w, h) = rotate_rgb(&src, 3, 2, 90);
        assert_eq!((w, h), (2, 3));
        // clockwise: top-left (0) goes to top-right; bottom-left (3) to top-left.
        let px = |v: &Vec<u8>, w: u32, x: u32, y: u32| v[((y * w + x) * 3) as usize];
        assert_eq!(px(&r90, w, 1, 0), 0);
        assert_eq!(px(&r90, w, 0, 0), 3);
        let (r270, w, _) = rotate_rgb(&src, 3, 2, 270);
        // counter-clockwise: top-left goes to bottom-left; top-right (2) to top-left.
        assert_eq!(px(&r270, w, 0, 2), 0);
        assert_eq!(px(&r270, w, 0, 0), 2);
        let (r180, w, _) = rotate_rgb(&src, 3, 2, 180);
        assert_eq!(px(&r180, w, 2, 1), 0);
        assert_eq!(px(&r180, w, 0, 0), 5);
    }

    #[test]
    fn lanczos_downscale_averages() {
        // A 1-pixel checkerboard downscaled 4x must come out mid-grey, not black or white
        // (which a nearest-neighbour sampler would give).
        let (w, h) = (64u32, 64u32);
        let mut src = vec![0u8; (w * h * 3) as usize];
        for y in 0..h {
            for x in 0..w {
                let v = if (x + y) % 2 == 0 { 255 } else { 0 };
                let i = ((y * w + x) * 3) as usize;
                src[i..i + 3].fill(v);
            }
        }
        let plan = TransformPlan {
            frames: vec![0],
            crop: None,
            resize: Some(Size {
                width: 16,
                height: 16,
            }),
            filter: ResizeFilter::Lanczos3,
        };
        let (out, size) = FrameProcessor::new(&plan).process(&src, w, h).unwrap();
        assert_eq!(
            size,
            Size {
                width: 16,
                height: 16
            }
        );
        let mean = out.iter().map(|&v| v as f64).sum::<f64>() / out.len() as f64;
        assert!((mean - 127.5).abs() < 3.0, "mean {mean}");
        assert!(
            out.iter().all(|&v| (100..=155).contains(&v)),
            "a pixel far from grey"
        );
    }

    #[test]
    fn pure_crop_copies_rows() {
        let (w, h) = (4u32, 3u32);
        let src: Vec<u8> = (0..(w * h) as u8).flat_map(|i| [i, 0, 0]).collect();
        let plan = TransformPlan {
            frames: vec![0],
            crop: Some(CropBox {
                x: 1,
                y: 1,
                width: 2,
                height: 2,
            }),
            resize: None,
            filter: ResizeFilter::Lanczos3,
        };
        let (out, size) = FrameProcessor::new(&plan).process(&src, w, h).unwrap();
        assert_eq!(
            size,
            Size {
                width: 2,
                height: 2
            }
        );
        let r: Vec<u8> = out.chunks(3).map(|p| p[0]).collect();
        assert_eq!(r, vec![5, 6, 9, 10]);
    }
}
