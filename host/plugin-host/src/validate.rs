//! Checks of what plugins return, applied by [`crate::LoadedPlugin`] to every transport.

use std::path::{Component, Path};

use cogvx_plugin_api::Sample;

/// Checks that every sample's paths are relative and stay inside the dataset root.
pub fn validate_samples(samples: &[Sample]) -> Result<(), String> {
    for s in samples {
        for (what, p) in
            std::iter::once(("video", &s.video)).chain(s.image.as_ref().map(|i| ("image", i)))
        {
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
                return Err(format!(
                    "sample {}: the frame range {}..{} is empty",
                    s.origin, r.start, r.end
                ));
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
    use cogvx_plugin_api::FrameRange;

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
        assert!(
            e.contains("sample videos.txt:1: the video path `../x.mp4` leaves the dataset root"),
            "{e}"
        );
        assert!(validate_samples(&[s("/etc/passwd")]).is_err());
        assert!(validate_samples(&[s("a/../../x")]).is_err());
    }
}
