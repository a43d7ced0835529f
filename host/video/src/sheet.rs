//! Contact sheets: a PNG grid of frames, one row per clip.

use std::path::Path;

use cogvx_plugin_api::Frames;
use image::{Rgb, RgbImage};

use crate::error::{Result, VideoError};

/// The largest contact sheet, in pixels.
pub const MAX_SHEET_PIXELS: u64 = 1 << 28;

/// Indices of `n` frames spread evenly over `count` (first and last included); all of
/// them if `count <= n`.
pub fn evenly_spaced(count: u32, n: usize) -> Vec<u32> {
    if count as usize <= n || n == 0 {
        return (0..count)
            .take(if n == 0 { 0 } else { count as usize })
            .collect();
    }
    if n == 1 {
        return vec![0];
    }
    (0..n)
        .map(|j| ((j as f64 * (count - 1) as f64 / (n - 1) as f64).round()) as u32)
        .collect()
}

/// Lays out `per_row` evenly spaced frames of each clip in a row, on a dark grey
/// background with `gap` pixels between cells. Cells are as large as the largest frame;
/// smaller frames are centred.
pub fn contact_sheet(
    rows: &[&Frames],
    per_row: usize,
    gap: u32,
) -> std::result::Result<RgbImage, String> {
    if rows.is_empty() || per_row == 0 {
        return Err("a contact sheet needs at least one clip and one frame per row".into());
    }
    for (r, f) in rows.iter().enumerate() {
        f.check().map_err(|e| format!("row {r}: {e}"))?;
    }
    let cw = rows.iter().map(|f| f.width).max().unwrap();
    let ch = rows.iter().map(|f| f.height).max().unwrap();
    let cols = rows
        .iter()
        .map(|f| (f.count as usize).min(per_row))
        .max()
        .unwrap() as u32;
    let width = gap as u64 + cols as u64 * (cw as u64 + gap as u64);
    let height = gap as u64 + rows.len() as u64 * (ch as u64 + gap as u64);
    if width * height > MAX_SHEET_PIXELS {
        return Err(format!(
            "a {width}x{height} contact sheet is too large; use fewer or smaller frames"
        ));
    }
    let mut img = RgbImage::from_pixel(width as u32, height as u32, Rgb([32, 32, 32]));
    for (r, f) in rows.iter().enumerate() {
        let frame_bytes = (f.width * f.height * 3) as usize;
        let y0 = gap + r as u32 * (ch + gap) + (ch - f.height) / 2;
        for (c, idx) in evenly_spaced(f.count, per_row).into_iter().enumerate() {
            let x0 = gap + c as u32 * (cw + gap) + (cw - f.width) / 2;
            let px = &f.rgb[idx as usize * frame_bytes..(idx as usize + 1) * frame_bytes];
            for y in 0..f.height {
                for x in 0..f.width {
                    let i = ((y * f.width + x) * 3) as usize;
                    img.put_pixel(x0 + x, y0 + y, Rgb([px[i], px[i + 1], px[i + 2]]));
                }
            }
        }
    }
    Ok(img)
}

/// `n` evenly spaced frames of one clip side by side (a one-row [`contact_sheet`] with a
/// 2-pixel gap), scaled down (never up) to at most `max_height` pixels high: a glance at a
/// whole video in one image, as the validation logs show it.
pub fn frame_strip(
    clip: &Frames,
    n: usize,
    max_height: u32,
) -> std::result::Result<RgbImage, String> {
    let sheet = contact_sheet(&[clip], n, 2)?;
    if sheet.height() <= max_height || max_height == 0 {
        return Ok(sheet);
    }
    let width = (sheet.width() as u64 * max_height as u64 / sheet.height() as u64).max(1) as u32;
    Ok(image::imageops::resize(
        &sheet,
        width,
        max_height,
        image::imageops::FilterType::Triangle,
    ))
}

/// Writes an image as PNG, atomically (temporary file, then rename).
pub fn write_png(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    let path = path.as_ref();
    cogvx_io::write_via_temp(
        path,
        |tmp| {
            img.save_with_format(tmp, image::ImageFormat::Png)
                .map_err(|e| VideoError::Image {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })
        },
        |source| VideoError::Io {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// [`contact_sheet`] then [`write_png`].
pub fn write_contact_sheet(
    path: impl AsRef<Path>,
    rows: &[&Frames],
    per_row: usize,
    gap: u32,
) -> Result<()> {
    let path = path.as_ref();
    let img = contact_sheet(rows, per_row, gap).map_err(|reason| VideoError::BadFrames {
        path: path.to_path_buf(),
        reason,
    })?;
    write_png(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_is_one_row_scaled_down_only() {
        let clip = Frames {
            width: 40,
            height: 20,
            count: 9,
            rgb: (0..9 * 20 * 40 * 3)
                .map(|i| (i / (20 * 40 * 3)) as u8 * 20)
                .collect(),
        };
        // 4 frames of 40x20 with 2-pixel gaps: 2 + 4 * 42 = 170 wide, 24 high.
        let full = frame_strip(&clip, 4, 100).unwrap();
        assert_eq!(full.dimensions(), (170, 24));
        // Frames 0, 3, 5, 8 (evenly spaced), each filled with its index * 20.
        for (c, idx) in [0u8, 3, 5, 8].into_iter().enumerate() {
            assert_eq!(full.get_pixel(2 + c as u32 * 42 + 20, 12).0, [idx * 20; 3]);
        }
        let small = frame_strip(&clip, 4, 12).unwrap();
        assert_eq!(small.dimensions(), (85, 12));
        assert!(frame_strip(&clip, 0, 12).is_err());
    }

    #[test]
    fn spacing() {
        assert_eq!(evenly_spaced(49, 5), vec![0, 12, 24, 36, 48]);
        assert_eq!(evenly_spaced(3, 5), vec![0, 1, 2]);
        assert_eq!(evenly_spaced(10, 1), vec![0]);
    }

    #[test]
    fn grid_places_frames() {
        // Two clips: 2x2 frames valued by frame index, and one 4x2 frame.
        let a = Frames {
            width: 2,
            height: 2,
            count: 3,
            rgb: (0..3u8).flat_map(|i| [i * 100; 12]).collect(),
        };
        let b = Frames {
            width: 4,
            height: 2,
            count: 1,
            rgb: vec![77; 24],
        };
        let img = contact_sheet(&[&a, &b], 2, 1).unwrap();
        // cells 4x2, 2 columns: width = 1 + 2*(4+1) = 11, height = 1 + 2*(2+1) = 7
        assert_eq!(img.dimensions(), (11, 7));
        // row 0, col 0 is frame 0 centred in its cell (x offset 1): x = 1 + 1 = 2
        assert_eq!(img.get_pixel(2, 1).0, [0, 0, 0]);
        // row 0, col 1 is frame 2 (the last), at x = 1 + 5 + 1 = 7
        assert_eq!(img.get_pixel(7, 1).0, [200, 200, 200]);
        // row 1 is clip b at y = 1 + 3 = 4
        assert_eq!(img.get_pixel(1, 4).0, [77, 77, 77]);
        // background between cells
        assert_eq!(img.get_pixel(0, 0).0, [32, 32, 32]);
    }
}
