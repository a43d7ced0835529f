//! The data pipeline with the first-party `frame_skip` and `crop_resize` plugins linked as
//! built-ins: the issue's end-to-end preview (four 49x480x720 clips and a contact sheet
//! from the mini dataset) and the circle test through the real `crop_resize`.

use std::path::{Path, PathBuf};
use std::process::Command;

use cogvx_data::{check, preview, Chain, PreviewOptions};
use cogvx_plugin_api::{Frames, Plugin, Resolution};
use cogvx_plugin_crop_resize::CropResize;
use cogvx_plugin_frame_skip::FrameSkip;
use cogvx_video::{preprocess_clip, VideoTransforms};

fn mini() -> PathBuf {
    cogvx_fixtures::mini_dataset()
}

#[test]
fn mini_preview_writes_four_49x480x720_clips_and_a_contact_sheet() {
    let root = mini();
    let target = Resolution {
        frames: 49,
        height: 480,
        width: 720,
    };
    let (mut fs, mut cr) = (FrameSkip::default(), CropResize::default());
    let mut chain = Chain {
        video_transforms: vec![&mut fs, &mut cr],
        ..Chain::new()
    };
    let report = check(&root, target, &mut chain);
    assert!(report.is_ok(), "{report}");
    let out = tempfile::tempdir().unwrap();
    let opts = PreviewOptions {
        progress: false,
        encode: cogvx_video::EncodeOptions {
            crf: 23,
            preset: "ultrafast".into(),
        },
        ..Default::default()
    };
    let s = preview(&root, out.path(), target, &mut chain, &opts).unwrap();
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert_eq!(s.clips.len(), 4);
    for clip in &s.clips {
        let info = cogvx_video::probe(clip).unwrap();
        assert_eq!(
            (info.frame_count, info.height, info.width),
            (49, 480, 720),
            "{}",
            clip.display()
        );
    }
    assert!(out.path().join("contact_sheet.png").is_file());
    assert_eq!(
        std::fs::read_to_string(out.path().join("captions.txt"))
            .unwrap()
            .lines()
            .count(),
        4
    );
}

fn blob(f: &Frames) -> (f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (u32::MAX, 0, u32::MAX, 0);
    for y in 0..f.height {
        for x in 0..f.width {
            if f.rgb[((y * f.width + x) * 3) as usize] > 128 {
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
        }
    }
    ((x1 - x0 + 1) as f64, (y1 - y0 + 1) as f64)
}

fn circle_clip(path: &Path, w: u32, h: u32) {
    let src = format!(
        "nullsrc=s={w}x{h}:r=25:d=0.4,format=gray,geq=lum='if(lt(hypot(X-{},Y-{}),{}),255,0)'",
        w / 2,
        h / 2,
        h.min(w) / 4
    );
    let out = Command::new("ffmpeg")
        .args([
            "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", &src, "-c:v", "libx264",
            "-pix_fmt", "yuv420p",
        ])
        .arg(path)
        .output()
        .expect("these tests need the `ffmpeg` command-line tool (apt-get install ffmpeg)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_circle_stays_a_circle_through_crop_resize() {
    let d = tempfile::tempdir().unwrap();
    // Wide (16:9), tall (9:16) and square sources, all to 480x720.
    for (w, h) in [(640u32, 360u32), (360, 640), (400, 400)] {
        let path = d.path().join(format!("circle_{w}x{h}.mp4"));
        circle_clip(&path, w, h);
        let (mut fs, mut cr) = (FrameSkip::default(), CropResize::default());
        let mut t = VideoTransforms::new(vec![&mut fs as &mut dyn Plugin, &mut cr]);
        let target = Resolution {
            frames: 9,
            height: 480,
            width: 720,
        };
        let p = preprocess_clip(&path, None, &mut t, target, 0).unwrap();
        assert_eq!(
            (p.frames.count, p.frames.height, p.frames.width),
            (9, 480, 720)
        );
        let (bw, bh) = blob(&p.frames);
        assert!(
            (bw / bh - 1.0).abs() < 0.04,
            "{w}x{h}: the circle came out {bw}x{bh}"
        );
    }
}

fn r(s: &str) -> Resolution {
    s.parse().unwrap()
}

/// The mini clips are 176x144 (carphone), 640x272 (bikes), 320x240 (testsrc) and 256x256
/// (mandelbrot): two land in the landscape bucket, two in the square one, none in the portrait.
#[test]
fn mini_clips_go_to_the_bucket_of_their_aspect_and_preview_shows_a_row_per_bucket() {
    let root = mini();
    let buckets = cogvx_data::Buckets::new(
        vec![r("9x64x96"), r("9x64x64"), r("9x96x64"), r("17x64x96")],
        None,
    )
    .unwrap();
    let (mut fs, mut cr) = (FrameSkip::default(), CropResize::default());
    let mut chain = Chain {
        video_transforms: vec![&mut fs, &mut cr],
        ..Chain::new()
    };
    let report = check(&root, &buckets, &mut chain);
    assert!(report.is_ok(), "{report}");
    let clips: Vec<(String, usize)> = report
        .buckets
        .iter()
        .map(|b| (b.bucket.to_string(), b.clips))
        .collect();
    // Landscape clips take the longest landscape bucket.
    assert_eq!(
        clips,
        [
            ("9x64x96", 0),
            ("9x64x64", 2),
            ("9x96x64", 0),
            ("17x64x96", 2)
        ]
        .map(|(b, n)| (b.to_string(), n))
    );
    // bikes (2.35:1) loses a third of its frame to the 3:2 crop; carphone (11:9) a little.
    let landscape = &report.buckets[3];
    assert!(
        landscape
            .cropped
            .iter()
            .any(|(v, c)| v.ends_with("bikes.mp4") && (*c - (1.0 - 1.5 / 2.353)).abs() < 0.02),
        "{:?}",
        landscape.cropped
    );
    let text = report.to_string();
    assert!(text.contains("buckets (4 of 4 clips placed):"), "{text}");
    assert!(text.contains("17x64x96      2 clips"), "{text}");

    let out = tempfile::tempdir().unwrap();
    let opts = PreviewOptions {
        progress: false,
        ..Default::default()
    };
    let s = preview(&root, out.path(), &buckets, &mut chain, &opts).unwrap();
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    for (clip, bucket) in s.clips.iter().zip(&s.buckets) {
        let info = cogvx_video::probe(clip).unwrap();
        assert_eq!(
            (info.frame_count, info.height, info.width),
            (bucket.frames, bucket.height, bucket.width),
            "{}",
            clip.display()
        );
    }
    // Two buckets hold clips: two rows of two cells (4-pixel gaps around 96x64 cells).
    let sheet = image::open(out.path().join("contact_sheet.png")).unwrap();
    assert_eq!(
        (sheet.width(), sheet.height()),
        (4 + 2 * (96 + 4), 4 + 2 * (64 + 4))
    );
}

#[test]
fn buckets_no_clip_fits_and_plans_outside_the_list_are_named() {
    let root = mini();
    let (mut fs, mut cr) = (FrameSkip::default(), CropResize::default());
    let mut chain = Chain {
        video_transforms: vec![&mut fs, &mut cr],
        ..Chain::new()
    };
    // Never upscaled: no mini clip (at most 640x272) reaches 480x720 or 720x480.
    let big = cogvx_data::Buckets::new(vec![r("9x480x720"), r("9x720x480")], Some(1.0)).unwrap();
    let report = check(&root, &big, &mut chain);
    assert_eq!(report.problems.len(), 4, "{report}");
    for p in &report.problems {
        let m = p.to_string();
        assert!(
            m.contains("fits no bucket") && m.contains("more than [data] max_upscale = 1"),
            "{m}"
        );
    }
    assert!(
        report.to_string().contains("no bucket      4 clips"),
        "{report}"
    );
    // At most twice: only carphone's 176-pixel-wide crop (176x117) falls short of 288x432 (2.46x).
    let twice = cogvx_data::Buckets::new(vec![r("9x288x432")], Some(2.0)).unwrap();
    let report = check(&root, &twice, &mut chain);
    let failed: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].contains("carphone.mp4") && failed[0].contains("upscaled 2.46x"),
        "{failed:?}"
    );

    // crop_resize told to make 112x208 makes a size no bucket has.
    let mut fixed = CropResize::default();
    fixed.configure(r#"{"width": 208, "height": 112}"#).unwrap();
    let mut fs = FrameSkip::default();
    let mut chain = Chain {
        video_transforms: vec![&mut fs, &mut fixed],
        ..Chain::new()
    };
    let buckets = cogvx_data::Buckets::new(vec![r("9x64x96"), r("9x64x64")], None).unwrap();
    let report = check(&root, &buckets, &mut chain);
    assert_eq!(report.problems.len(), 4, "{report}");
    let m = report.problems[0].to_string();
    assert!(
        m.contains("planned 112x208 (height x width)")
            && m.contains("no bucket of [data] buckets has"),
        "{m}"
    );
}
