//! Checks of what plugins return, applied by [`crate::LoadedPlugin`] to every transport.

use std::path::{Component, Path};

use cogvx_plugin_api::{ClipInfo, Frames, Sample, TransformPlan};

/// Checks a transform plan against the clip it is for: at least one frame, every frame index
/// inside the clip, a non-empty crop box inside the frame, a non-zero output size.
/// The error says what is wrong; [`crate::LoadedPlugin`] prefixes it with the plugin's name.
pub fn validate_plan(clip: &ClipInfo, plan: &TransformPlan) -> Result<(), String> {
    if plan.frames.is_empty() {
        return Err("the plan selects no frames".into());
    }
    if let Some((pos, &index)) = plan.frames.iter().enumerate().find(|(_, &i)| i >= clip.frame_count) {
        return Err(format!(
            "frame index {index} (position {pos} of {}) is out of range: the clip has {} frames (valid: 0..{})",
            plan.frames.len(),
            clip.frame_count,
            clip.frame_count
        ));
    }
    if let Some(c) = plan.crop {
        if c.width == 0 || c.height == 0 {
            return Err(format!("the crop box {}x{} at ({}, {}) has a zero size", c.width, c.height, c.x, c.y));
        }
        let right = c.x as u64 + c.width as u64;
        let bottom = c.y as u64 + c.height as u64;
        if right > clip.width as u64 || bottom > clip.height as u64 {
            return Err(format!(
                "the crop box {}x{} at ({}, {}) lies outside the {}x{} frame (it reaches x={right}, y={bottom})",
                c.width, c.height, c.x, c.y, clip.width, clip.height
            ));
        }
    }
    if let Some(s) = plan.resize {
        if s.width == 0 || s.height == 0 {
            return Err(format!("the output size {}x{} has a zero side", s.width, s.height));
        }
    }
    Ok(())
}

/// Checks that a frames value is consistent: non-zero sizes and `count * height * width * 3`
/// bytes of RGB.
pub fn validate_frames(frames: &Frames) -> Result<(), String> {
    if frames.width == 0 || frames.height == 0 || frames.count == 0 {
        return Err(format!(
            "the frames have a zero size ({} frames of {}x{})",
            frames.count, frames.width, frames.height
        ));
    }
    let want = frames.count as u64 * frames.height as u64 * frames.width as u64 * 3;
    if frames.rgb.len() as u64 != want {
        return Err(format!(
            "{} frames of {}x{} RGB need {want} bytes, got {}",
            frames.count,
            frames.width,
            frames.height,
            frames.rgb.len()
        ));
    }
    Ok(())
}

/// Checks that every sample's paths are relative and stay inside the dataset root.
pub fn validate_samples(samples: &[Sample]) -> Result<(), String> {
    for s in samples {
        for (what, p) in std::iter::once(("video", &s.video)).chain(s.image.as_ref().map(|i| ("image", i))) {
            if p.is_empty() {
                return Err(format!("sample {}: the {what} path is empty", s.origin));
            }
            if !stays_inside(Path::new(p)) {
                return Err(format!(
                    "sample {}: the {what} path `{p}` leaves the dataset root (paths must be relative, without `..` above the root)",
                    s.origin
                ));
            }
        }
        if let Some(r) = s.frames {
            if r.start >= r.end {
                return Err(format!("sample {}: the frame range {}..{} is empty", s.origin, r.start, r.end));
            }
        }
    }
    Ok(())
}

fn stays_inside(p: &Path) -> bool {
    let mut depth = 0i32;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_plugin_api::{CropBox, FrameRange, ResizeFilter, Size};

    fn clip() -> ClipInfo {
        ClipInfo { width: 640, height: 360, frame_count: 10, fps: 24.0 }
    }

    fn plan() -> TransformPlan {
        TransformPlan {
            frames: vec![0, 5, 9],
            crop: Some(CropBox { x: 40, y: 0, width: 600, height: 360 }),
            resize: Some(Size { width: 720, height: 480 }),
            filter: ResizeFilter::Lanczos3,
        }
    }

    #[test]
    fn accepts_a_good_plan() {
        validate_plan(&clip(), &plan()).unwrap();
        validate_plan(&clip(), &TransformPlan::identity(&clip())).unwrap();
    }

    #[test]
    fn rejects_bad_plans_with_a_reason() {
        let mut p = plan();
        p.frames.clear();
        assert_eq!(validate_plan(&clip(), &p).unwrap_err(), "the plan selects no frames");

        let mut p = plan();
        p.frames = vec![0, 10];
        let e = validate_plan(&clip(), &p).unwrap_err();
        assert!(e.contains("frame index 10 (position 1 of 2) is out of range: the clip has 10 frames"), "{e}");

        let mut p = plan();
        p.crop = Some(CropBox { x: 100, y: 0, width: 600, height: 360 });
        let e = validate_plan(&clip(), &p).unwrap_err();
        assert!(e.contains("lies outside the 640x360 frame (it reaches x=700, y=360)"), "{e}");

        let mut p = plan();
        p.crop = Some(CropBox { x: u32::MAX, y: 0, width: 2, height: 1 });
        assert!(validate_plan(&clip(), &p).unwrap_err().contains("outside"));

        let mut p = plan();
        p.crop = Some(CropBox { x: 0, y: 0, width: 0, height: 360 });
        assert!(validate_plan(&clip(), &p).unwrap_err().contains("has a zero size"));

        let mut p = plan();
        p.resize = Some(Size { width: 720, height: 0 });
        assert_eq!(validate_plan(&clip(), &p).unwrap_err(), "the output size 720x0 has a zero side");
    }

    #[test]
    fn frames_must_match_their_size() {
        let f = Frames { width: 2, height: 2, count: 1, rgb: vec![0; 12] };
        validate_frames(&f).unwrap();
        let f = Frames { width: 2, height: 2, count: 1, rgb: vec![0; 11] };
        assert_eq!(validate_frames(&f).unwrap_err(), "1 frames of 2x2 RGB need 12 bytes, got 11");
    }

    #[test]
    fn sample_paths_stay_inside_the_root() {
        let s = |v: &str| Sample {
            caption: "c".into(),
            video: v.into(),
            image: None,
            frames: Some(FrameRange { start: 0, end: 4 }),
            origin: "videos.txt:1".into(),
        };
        validate_samples(&[s("videos/a.mp4"), s("./a/../b.mp4")]).unwrap();
        let e = validate_samples(&[s("../x.mp4")]).unwrap_err();
        assert!(e.contains("sample videos.txt:1: the video path `../x.mp4` leaves the dataset root"), "{e}");
        assert!(validate_samples(&[s("/etc/passwd")]).is_err());
        assert!(validate_samples(&[s("a/../../x")]).is_err());
    }
}
