//! End-to-end tests of cogvx-video on clips generated with the `ffmpeg` tool (and with the
//! crate's own encoder) in temporary folders, and on the shared mini dataset.

use std::path::{Path, PathBuf};
use std::process::Command;

use cogvx_plugin_api::{CropBox, Frames, ResizeFilter, Size, TransformPlan};
use cogvx_video::{
    decode, encode_mp4, probe, write_contact_sheet, EncodeOptions, Mp4Writer, VideoError,
    VideoReader,
};

/// Runs the `ffmpeg` tool (CI installs it; see the README's set-up).
fn ff(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .output()
        .expect("these tests need the `ffmpeg` command-line tool (apt-get install ffmpeg)");
    assert!(
        out.status.success(),
        "ffmpeg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A clip whose frame `i` is uniformly grey at level `8 * i` (0..=232 for 30 frames),
/// keyframes every 10 frames and B-frames, so selection needs real seeking.
fn grey_ramp(dir: &Path, extra: &[&str]) -> PathBuf {
    let path = p(dir, "ramp.mp4");
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        "color=black:s=64x48:r=25:d=1.2,format=rgb24,geq=r='N*8':g='N*8':b='N*8'",
        "-c:v",
        "libx264",
        "-g",
        "10",
        "-bf",
        "2",
        "-pix_fmt",
        "yuv420p",
    ];
    args.extend_from_slice(extra);
    args.push(s(&path));
    ff(&args);
    path
}

fn frame_mean(f: &Frames, i: usize) -> f64 {
    let n = (f.width * f.height * 3) as usize;
    f.rgb[i * n..(i + 1) * n]
        .iter()
        .map(|&v| v as f64)
        .sum::<f64>()
        / n as f64
}

fn plan(frames: Vec<u32>) -> TransformPlan {
    TransformPlan {
        frames,
        crop: None,
        resize: None,
        filter: ResizeFilter::Lanczos3,
    }
}

#[test]
fn frame_selection_returns_the_requested_frames() {
    let d = tmp();
    let clip = grey_ramp(d.path(), &[]);
    let info = probe(&clip).unwrap();
    assert_eq!((info.width, info.height, info.frame_count), (64, 48, 30));
    assert!((info.fps - 25.0).abs() < 1e-6, "fps {}", info.fps);
    assert!(
        (info.duration - 1.2).abs() < 0.05,
        "duration {}",
        info.duration
    );
    assert_eq!(info.codec, "h264");
    assert_eq!(info.pixel_format, "yuv420p");
    assert!(info.seekable);
    let wanted = vec![27u32, 3, 3, 29, 12, 0, 21];
    let frames = decode(&clip, &plan(wanted.clone())).unwrap();
    assert_eq!((frames.width, frames.height, frames.count), (64, 48, 7));
    for (k, &i) in wanted.iter().enumerate() {
        let m = frame_mean(&frames, k);
        assert!(
            (m - 8.0 * i as f64).abs() < 3.0,
            "position {k}: wanted frame {i} (grey {}), got mean {m:.1}",
            8 * i
        );
    }
}

#[test]
fn every_frame_decodes_in_order() {
    let d = tmp();
    let clip = grey_ramp(d.path(), &[]);
    let all: Vec<u32> = (0..30).collect();
    let frames = decode(&clip, &plan(all)).unwrap();
    for i in 0..30 {
        let m = frame_mean(&frames, i);
        assert!((m - 8.0 * i as f64).abs() < 3.0, "frame {i}: mean {m:.1}");
    }
}

#[test]
fn decoding_seeks_and_skips_unneeded_frames() {
    // 100 frames, grey level 2 * i, keyframes every 10 frames, B-frames.
    let d = tmp();
    let clip = p(d.path(), "long.mp4");
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:s=64x48:r=25:d=4,format=rgb24,geq=r='N*2':g='N*2':b='N*2'",
        "-c:v",
        "libx264",
        "-g",
        "10",
        "-bf",
        "2",
        "-pix_fmt",
        "yuv420p",
        s(&clip),
    ]);
    let mut r = VideoReader::open(&clip).unwrap();
    assert_eq!(r.info().frame_count, 100);
    let check = |f: &Frames, wanted: &[u32]| {
        for (k, &i) in wanted.iter().enumerate() {
            let m = frame_mean(f, k);
            assert!(
                (m - 2.0 * i as f64).abs() < 3.0,
                "wanted frame {i}, got mean {m:.1}"
            );
        }
    };
    // One late frame: a seek to its keyframe (90), then at most one GOP decoded.
    let f = r.read(&plan(vec![95])).unwrap();
    check(&f, &[95]);
    let st = r.last_read_stats();
    assert_eq!((st.seeks, st.restarts, st.frames_kept), (1, 0, 1), "{st:?}");
    assert!(st.frames_decoded <= 12, "{st:?}");
    // Spread frames: a seek per distant GOP, far fewer than 100 frames decoded.
    let wanted = [97u32, 3, 51, 3, 52, 28];
    let f = r.read(&plan(wanted.to_vec())).unwrap();
    check(&f, &wanted);
    let st = r.last_read_stats();
    assert!(st.seeks >= 3 && st.restarts == 0, "{st:?}");
    assert_eq!(st.frames_kept, 5, "{st:?}");
    assert!(st.frames_decoded <= 50, "{st:?}");
    // Every frame: no seek, each decoded once.
    let all: Vec<u32> = (0..100).collect();
    let f = r.read(&plan(all.clone())).unwrap();
    check(&f, &all);
    let st = r.last_read_stats();
    assert_eq!(
        (st.seeks, st.frames_decoded, st.frames_kept),
        (0, 100, 100),
        "{st:?}"
    );
}

#[test]
fn other_codecs_and_containers_select_frames() {
    // Raw H.264 (no timestamps: frames are counted), MPEG-4 Part 2 and MJPEG in AVI,
    // FFV1 in Matroska, MPEG-2 in MPEG-TS.
    let d = tmp();
    let src = "color=black:s=64x48:r=25:d=1.2,format=rgb24,geq=r='N*8':g='N*8':b='N*8'";
    let cases: [(&str, &[&str]); 5] = [
        (
            "raw.h264",
            &[
                "-c:v", "libx264", "-g", "10", "-bf", "2", "-pix_fmt", "yuv420p", "-f", "h264",
            ],
        ),
        ("mpeg4.avi", &["-c:v", "mpeg4", "-q:v", "2", "-g", "10"]),
        (
            "mjpeg.avi",
            &["-c:v", "mjpeg", "-q:v", "2", "-pix_fmt", "yuvj420p"],
        ),
        ("ffv1.mkv", &["-c:v", "ffv1", "-g", "10"]),
        (
            "mpeg2.ts",
            &["-c:v", "mpeg2video", "-q:v", "2", "-g", "10", "-bf", "2"],
        ),
    ];
    for (name, args) in cases {
        let clip = p(d.path(), name);
        let mut a = vec!["-f", "lavfi", "-i", src];
        a.extend_from_slice(args);
        a.push(s(&clip));
        ff(&a);
        let info = probe(&clip).unwrap();
        assert_eq!(
            (info.width, info.height, info.frame_count),
            (64, 48, 30),
            "{name}"
        );
        let wanted = vec![29u32, 0, 14, 14, 7];
        let f = decode(&clip, &plan(wanted.clone())).unwrap();
        for (k, &i) in wanted.iter().enumerate() {
            let m = frame_mean(&f, k);
            assert!(
                (m - 8.0 * i as f64).abs() < 4.0,
                "{name}: wanted frame {i}, got mean {m:.1}"
            );
        }
    }
}

#[test]
fn a_clip_with_an_audio_track_decodes_its_video() {
    let d = tmp();
    let clip = p(d.path(), "av.mp4");
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:s=64x48:r=25:d=1.2,format=rgb24,geq=r='N*8':g='N*8':b='N*8'",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=1.2",
        "-c:v",
        "libx264",
        "-g",
        "10",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-shortest",
        s(&clip),
    ]);
    let info = probe(&clip).unwrap();
    assert_eq!(info.frame_count, 30);
    let f = decode(&clip, &plan(vec![25, 5])).unwrap();
    assert!((frame_mean(&f, 0) - 200.0).abs() < 3.0 && (frame_mean(&f, 1) - 40.0).abs() < 3.0);
}

#[test]
fn variable_frame_rate_maps_indices_by_timestamp() {
    // Frames 0..9 at 1/25 s, then frames 10.. three times as far apart; the index of a
    // frame is still its position in presentation order (not time * fps).
    let d = tmp();
    let clip = p(d.path(), "vfr.mp4");
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:s=64x48:r=25:d=1.2,format=rgb24,geq=r='N*8':g='N*8':b='N*8',setpts='if(lt(N,10),N,10+(N-10)*3)/(25*TB)'",
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-g",
        "7",
        "-pix_fmt",
        "yuv420p",
        s(&clip),
    ]);
    let info = probe(&clip).unwrap();
    assert_eq!(info.frame_count, 30);
    // 10 frames over 0.4 s then 20 frames over 2.4 s.
    assert!(
        (info.duration - 2.8).abs() < 0.15,
        "duration {}",
        info.duration
    );
    let wanted = vec![29u32, 11, 9, 20, 0];
    let frames = decode(&clip, &plan(wanted.clone())).unwrap();
    for (k, &i) in wanted.iter().enumerate() {
        let m = frame_mean(&frames, k);
        assert!(
            (m - 8.0 * i as f64).abs() < 3.0,
            "wanted frame {i}, got mean {m:.1}"
        );
    }
}

#[test]
fn rotation_metadata_is_applied_like_the_ffmpeg_tool() {
    let d = tmp();
    let base = p(d.path(), "box.mp4");
    let rotated = p(d.path(), "rotated.mp4");
    // Landscape 320x240, a white square in the top-left corner.
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:s=320x240:r=25:d=0.4,drawbox=x=0:y=0:w=60:h=40:color=white:t=fill",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        s(&base),
    ]);
    ff(&[
        "-i",
        s(&base),
        "-c",
        "copy",
        "-metadata:s:v",
        "rotate=90",
        s(&rotated),
    ]);
    let info = probe(&rotated).unwrap();
    assert_eq!((info.coded_width, info.coded_height), (320, 240));
    assert_eq!(
        (info.width, info.height),
        (240, 320),
        "a rotate=90 clip must come out portrait"
    );
    assert!(info.rotation == 90 || info.rotation == 270);
    let ours = decode(&rotated, &plan(vec![0])).unwrap();
    assert_eq!((ours.width, ours.height), (240, 320));
    // The ffmpeg tool autorotates by the display matrix; our frame must match its frame.
    let raw = p(d.path(), "ref.rgb");
    ff(&[
        "-i",
        s(&rotated),
        "-frames:v",
        "1",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        s(&raw),
    ]);
    let reference = std::fs::read(&raw).unwrap();
    assert_eq!(reference.len(), ours.rgb.len());
    let diff = ours
        .rgb
        .iter()
        .zip(&reference)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / reference.len() as f64;
    assert!(
        diff < 3.0,
        "mean abs difference to the ffmpeg tool's rotated frame: {diff}"
    );
    // And the square moved out of the top-left corner (it was not simply transposed).
    let at = |x: u32, y: u32| ours.rgb[((y * ours.width + x) * 3) as usize];
    assert!(
        at(5, 5) < 50,
        "the top-left corner should be black after rotation"
    );
}

#[test]
fn ten_bit_and_odd_sizes_convert_to_rgb() {
    let d = tmp();
    let ten = p(d.path(), "ten.mp4");
    let odd = p(d.path(), "odd.mkv");
    let odd444 = p(d.path(), "odd444.mp4");
    let src = "nullsrc=s=34x18:r=25:d=0.4,format=rgb24,geq=r=192:g=128:b=64";
    ff(&[
        "-f",
        "lavfi",
        "-i",
        src,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p10le",
        s(&ten),
    ]);
    let src_odd = "nullsrc=s=33x17:r=25:d=0.4,format=rgb24,geq=r=192:g=128:b=64";
    ff(&[
        "-f",
        "lavfi",
        "-i",
        src_odd,
        "-c:v",
        "ffv1",
        "-pix_fmt",
        "yuv420p",
        s(&odd),
    ]);
    ff(&[
        "-f",
        "lavfi",
        "-i",
        src_odd,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv444p",
        s(&odd444),
    ]);
    for (clip, w, h, fmt) in [
        (&ten, 34, 18, "yuv420p10le"),
        (&odd, 33, 17, "yuv420p"),
        (&odd444, 33, 17, "yuv444p"),
    ] {
        let info = probe(clip).unwrap();
        assert_eq!(
            (info.width, info.height, info.frame_count),
            (w, h, 10),
            "{}",
            clip.display()
        );
        assert_eq!(info.pixel_format, fmt);
        let f = decode(clip, &plan(vec![0, 9])).unwrap();
        assert_eq!((f.width, f.height, f.count), (w, h, 2));
        let px = (w * h) as usize;
        let mean =
            |c: usize| f.rgb.chunks(3).take(px).map(|p| p[c] as f64).sum::<f64>() / px as f64;
        for (c, want) in [(0, 192.0), (1, 128.0), (2, 64.0)] {
            assert!(
                (mean(c) - want).abs() < 6.0,
                "{}: channel {c} mean {} != {want}",
                clip.display(),
                mean(c)
            );
        }
    }
}

/// Width / height of the bright blob's bounding box (pixels brighter than mid-grey).
fn blob_aspect(f: &Frames) -> (f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (u32::MAX, 0, u32::MAX, 0);
    for y in 0..f.height {
        for x in 0..f.width {
            if f.rgb[((y * f.width + x) * 3) as usize] > 128 {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
    }
    ((x1 - x0 + 1) as f64, (y1 - y0 + 1) as f64)
}

#[test]
fn a_circle_stays_a_circle_after_crop_and_resize() {
    let d = tmp();
    let clip = p(d.path(), "circle.mp4");
    // 640x360 (16:9) with a white disc of radius 100 in the centre.
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "nullsrc=s=640x360:r=25:d=0.2,format=gray,geq=lum='if(lt(hypot(X-320,Y-180),100),255,0)'",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        s(&clip),
    ]);
    // Crop to the 720x480 aspect (3:2) in the centre, then resize to 720x480.
    let crop_w = 360 * 720 / 480;
    let keep = TransformPlan {
        frames: vec![0, 4],
        crop: Some(CropBox {
            x: (640 - crop_w) / 2,
            y: 0,
            width: crop_w,
            height: 360,
        }),
        resize: Some(Size {
            width: 720,
            height: 480,
        }),
        filter: ResizeFilter::Lanczos3,
    };
    let f = decode(&clip, &keep).unwrap();
    assert_eq!((f.width, f.height, f.count), (720, 480, 2));
    let (w, h) = blob_aspect(&f);
    assert!(
        (w / h - 1.0).abs() < 0.03,
        "disc is {w}x{h} after crop+resize"
    );
    assert!((h - 200.0 * 480.0 / 360.0).abs() < 4.0, "disc height {h}");
    // The measurement does catch a stretch: resizing without the crop distorts the disc.
    let stretch = TransformPlan { crop: None, ..keep };
    let (w, h) = blob_aspect(&decode(&clip, &stretch).unwrap());
    assert!(
        (w / h - 1.0).abs() > 0.1,
        "a stretched disc measured {w}x{h}"
    );
}

#[test]
fn bad_files_are_named_and_explained() {
    let d = tmp();
    let missing = p(d.path(), "missing.mp4");
    let err = probe(&missing).unwrap_err();
    assert!(matches!(err, VideoError::NotFound { .. }));
    assert_eq!(
        err.to_string(),
        format!("{}: file not found", missing.display())
    );

    let empty = p(d.path(), "empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let err = probe(&empty).unwrap_err();
    assert!(matches!(err, VideoError::Empty { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("{}: file is empty (0 bytes)", empty.display())),
        "{err}"
    );

    let text = p(d.path(), "notes.mp4");
    std::fs::write(&text, "this is a text file, renamed to .mp4\nsecond line\n").unwrap();
    let err = probe(&text).unwrap_err();
    assert!(matches!(err, VideoError::NotVideo { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}: not a video file", text.display())),
        "{err}"
    );

    let audio = p(d.path(), "tone.mp4");
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=0.5",
        s(&audio),
    ]);
    let err = probe(&audio).unwrap_err();
    assert!(matches!(err, VideoError::AudioOnly { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{}: audio only, no video stream", audio.display())
    );

    let dir = d.path().join("adir.mp4");
    std::fs::create_dir(&dir).unwrap();
    assert!(matches!(
        probe(&dir).unwrap_err(),
        VideoError::NotAFile { .. }
    ));
}

#[test]
fn truncated_files_are_reported() {
    let d = tmp();
    let whole = grey_ramp(d.path(), &[]);
    let bytes = std::fs::read(&whole).unwrap();
    // moov at the end (ffmpeg's default): the first half has no index at all.
    let half = p(d.path(), "half.mp4");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    let err = probe(&half).unwrap_err();
    assert!(matches!(err, VideoError::Truncated { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}: truncated or corrupt video", half.display())),
        "{err}"
    );
    // moov first (faststart): the index lists frames whose data is missing.
    let fast = p(d.path(), "fast.mp4");
    ff(&[
        "-i",
        s(&whole),
        "-c",
        "copy",
        "-movflags",
        "+faststart",
        s(&fast),
    ]);
    let bytes = std::fs::read(&fast).unwrap();
    let cut = p(d.path(), "cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let err = probe(&cut).unwrap_err();
    assert!(matches!(err, VideoError::Truncated { .. }), "{err:?}");
}

/// A transform that answers every request with one plan (a hostile or broken plugin).
struct FixedPlan(TransformPlan);

impl cogvx_plugin_api::Plugin for FixedPlan {
    fn info(&self) -> cogvx_plugin_api::PluginInfo {
        cogvx_plugin_api::PluginInfo {
            name: "fixed-plan".into(),
            version: "0.0.1".into(),
            kinds: vec![cogvx_plugin_api::PluginKind::VideoTransform],
            description: String::new(),
        }
    }

    fn plan_transform(
        &mut self,
        _: &cogvx_plugin_api::TransformRequest,
    ) -> cogvx_plugin_api::PluginResult<TransformPlan> {
        Ok(self.0.clone())
    }
}

/// The plan bomb: 100,000 copies of one frame at 16384x16384 passes `TransformPlan::check`
/// (80 TB of output: the host aborted allocating it). The chain's plan is bounded by the
/// target before decoding, and `read` turns an allocation that cannot succeed into an error.
#[test]
fn a_plan_larger_than_the_target_is_refused_before_decoding() {
    let d = tmp();
    let clip = grey_ramp(d.path(), &[]);
    let mut bomb = plan(vec![0; cogvx_plugin_api::MAX_PLAN_FRAMES]);
    bomb.resize = Some(Size {
        width: 16_384,
        height: 16_384,
    });
    let target = cogvx_plugin_api::Resolution {
        frames: 9,
        height: 32,
        width: 48,
    };
    let mut fixed = FixedPlan(bomb.clone());
    let mut transforms =
        cogvx_video::VideoTransforms::new(vec![&mut fixed as &mut dyn cogvx_plugin_api::Plugin]);
    let e = cogvx_video::preprocess_clip(&clip, None, &mut transforms, target, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the chain gives 100000x16384x16384")
            && e.contains("9x32x48")
            && e.contains("fixed-plan"),
        "{e}"
    );
    // More frames than the target, each within it; and a frame larger than the target.
    for (frames, size) in [
        (
            vec![0; 10],
            Size {
                width: 48,
                height: 32,
            },
        ),
        (
            vec![0; 9],
            Size {
                width: 48,
                height: 48,
            },
        ),
    ] {
        let mut p = plan(frames);
        p.resize = Some(size);
        let mut fixed = FixedPlan(p);
        let mut transforms = cogvx_video::VideoTransforms::new(vec![
            &mut fixed as &mut dyn cogvx_plugin_api::Plugin,
        ]);
        let e = cogvx_video::preprocess_clip(&clip, None, &mut transforms, target, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than the resolution 9x32x48"), "{e}");
    }
    // The plan at the target decodes.
    let mut ok = plan(vec![0, 3, 6, 9, 12, 15, 18, 21, 24]);
    ok.resize = Some(Size {
        width: 48,
        height: 32,
    });
    let mut fixed = FixedPlan(ok);
    let mut transforms =
        cogvx_video::VideoTransforms::new(vec![&mut fixed as &mut dyn cogvx_plugin_api::Plugin]);
    let pre = cogvx_video::preprocess_clip(&clip, None, &mut transforms, target, 0).unwrap();
    assert_eq!(
        (pre.frames.count, pre.frames.height, pre.frames.width),
        (9, 32, 48)
    );
    // The reader alone, asked for the bomb: an error, not an abort.
    let e = VideoReader::open(&clip)
        .unwrap()
        .read(&bomb)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be allocated"), "{e}");
}

#[test]
fn bad_plans_are_refused_before_decoding() {
    let d = tmp();
    let clip = grey_ramp(d.path(), &[]);
    let mut r = VideoReader::open(&clip).unwrap();
    let err = r.read(&plan(vec![0, 30])).unwrap_err();
    assert!(matches!(err, VideoError::BadPlan { .. }));
    assert!(
        err.to_string()
            .contains("frame index 30 (position 1 of 2) is out of range: the clip has 30 frames"),
        "{err}"
    );
    let mut p2 = plan(vec![0]);
    p2.crop = Some(CropBox {
        x: 10,
        y: 0,
        width: 60,
        height: 48,
    });
    assert!(r
        .read(&p2)
        .unwrap_err()
        .to_string()
        .contains("crop box 60x48 at (10, 0) lies outside the 64x48 frame"));
    p2.crop = None;
    p2.resize = Some(Size {
        width: 0,
        height: 10,
    });
    assert!(r
        .read(&p2)
        .unwrap_err()
        .to_string()
        .contains("the output size 0x10 has a zero side"));
    // A frame range restricts and offsets the indices.
    let f = r
        .read_range(
            &plan(vec![0, 4]),
            Some(cogvx_plugin_api::FrameRange { start: 20, end: 25 }),
        )
        .unwrap();
    assert!((frame_mean(&f, 0) - 160.0).abs() < 3.0 && (frame_mean(&f, 1) - 192.0).abs() < 3.0);
    assert!(r
        .read_range(
            &plan(vec![5]),
            Some(cogvx_plugin_api::FrameRange { start: 20, end: 25 })
        )
        .is_err());
}

#[test]
fn encode_round_trips_and_writes_atomically() {
    let d = tmp();
    // 20 frames of 33x25 (odd: padded to 34x26), grey level 10 * i.
    let (w, h, n) = (33u32, 25u32, 20u32);
    let rgb: Vec<u8> = (0..n)
        .flat_map(|i| vec![(10 * i) as u8; (w * h * 3) as usize])
        .collect();
    let frames = Frames {
        width: w,
        height: h,
        count: n,
        rgb,
    };
    let out = p(d.path(), "out.mp4");
    encode_mp4(&out, &frames, 12.5, &EncodeOptions::default()).unwrap();
    let info = probe(&out).unwrap();
    assert_eq!((info.width, info.height, info.frame_count), (34, 26, 20));
    assert!((info.fps - 12.5).abs() < 1e-6, "fps {}", info.fps);
    let back = decode(&out, &plan((0..n).collect())).unwrap();
    for i in 0..n as usize {
        assert!(
            (frame_mean(&back, i) - 10.0 * i as f64).abs() < 3.0,
            "frame {i}"
        );
    }
    // Only the finished file is left in the folder.
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out.mp4")]);
    // Inconsistent frames are refused, naming the file, and nothing is written.
    let bad = Frames {
        width: 4,
        height: 4,
        count: 2,
        rgb: vec![0; 10],
    };
    let err = encode_mp4(
        p(d.path(), "bad.mp4"),
        &bad,
        25.0,
        &EncodeOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("bad.mp4: invalid frames: 2 frames of 4x4 RGB need 96 bytes, got 10"),
        "{err}"
    );
    assert!(!p(d.path(), "bad.mp4").exists());
    // A folder that does not exist: an error naming the file, no stray file.
    let err = encode_mp4(
        p(d.path(), "no/such/dir/x.mp4"),
        &frames,
        25.0,
        &EncodeOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("x.mp4"), "{err}");
}

#[test]
fn streaming_writer_appears_only_when_finished() {
    let d = tmp();
    let out = p(d.path(), "stream.mp4");
    let opts = EncodeOptions {
        crf: 23,
        preset: "ultrafast".into(),
    };
    // Abandoned: nothing is left behind.
    let mut w = Mp4Writer::create(&out, 16, 16, 25.0, &opts).unwrap();
    w.write_frame(&[0u8; 16 * 16 * 3]).unwrap();
    let err = w.write_frame(&[0u8; 10]).unwrap_err();
    assert!(
        err.to_string()
            .contains("stream.mp4: invalid frames: a frame of 10 bytes is not 16x16 RGB"),
        "{err}"
    );
    drop(w);
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    // Finished: the clip is complete.
    let mut w = Mp4Writer::create(&out, 16, 16, 25.0, &opts).unwrap();
    for i in 0..7u8 {
        w.write_frame(&[i * 30; 16 * 16 * 3]).unwrap();
    }
    assert!(!out.exists(), "the clip must not appear before finish()");
    w.finish().unwrap();
    assert_eq!(probe(&out).unwrap().frame_count, 7);
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn contact_sheet_is_a_png_grid() {
    let d = tmp();
    let a = Frames {
        width: 8,
        height: 6,
        count: 10,
        rgb: vec![200; 8 * 6 * 3 * 10],
    };
    let b = Frames {
        width: 8,
        height: 6,
        count: 3,
        rgb: vec![50; 8 * 6 * 3 * 3],
    };
    let out = p(d.path(), "sheet.png");
    write_contact_sheet(&out, &[&a, &b], 4, 2).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    // width = 2 + 4 * (8 + 2) = 42, height = 2 + 2 * (6 + 2) = 18 (IHDR fields).
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (42, 18));
}

fn mini() -> PathBuf {
    cogvx_fixtures::mini_dataset()
}

#[test]
fn mini_dataset_clips_probe_and_decode() {
    let root = mini();
    // From the dataset's README.
    let expected = [
        ("carphone.mp4", 176, 144, 120, 29.97),
        ("bikes.mp4", 640, 272, 250, 25.0),
        ("testsrc.mp4", 320, 240, 72, 24.0),
        ("mandelbrot.mp4", 256, 256, 75, 30.0),
    ];
    for (name, w, h, n, fps) in expected {
        let path = root.join("videos").join(name);
        let info = probe(&path).unwrap();
        assert_eq!(
            (info.width, info.height, info.frame_count),
            (w, h, n),
            "{name}"
        );
        assert!((info.fps - fps).abs() < 0.01, "{name}: fps {}", info.fps);
        let p = TransformPlan {
            frames: vec![n - 1, 0, n / 2],
            crop: None,
            resize: Some(Size {
                width: 96,
                height: 64,
            }),
            filter: ResizeFilter::Lanczos3,
        };
        let f = decode(&path, &p).unwrap();
        assert_eq!(
            (f.width, f.height, f.count, f.rgb.len()),
            (96, 64, 3, 96 * 64 * 3 * 3),
            "{name}"
        );
    }
}

/// Playlists and concat lists open further files: a `videos/x.m3u8` naming
/// `../../outside/secret.ts` (or an absolute path) was decoded. They are refused by content,
/// whatever their extension, before FFmpeg opens anything.
#[test]
fn playlists_and_concat_lists_are_refused() {
    let d = tmp();
    let outside = p(d.path(), "outside");
    let root = p(d.path(), "data/videos");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    let secret = p(&outside, "secret.ts");
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=25:d=1",
        "-c:v",
        "libx264",
        "-f",
        "mpegts",
        s(&secret),
    ]);
    let playlist = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n../../outside/secret.ts\n#EXT-X-ENDLIST\n";
    let concat = format!("ffconcat version 1.0\nfile '{}'\n", secret.display());
    for (name, text) in [
        ("x.m3u8", playlist.to_string()),
        ("looks-like.mp4", playlist.to_string()),
        ("list.mp4", concat),
    ] {
        let path = p(&root, name);
        std::fs::write(&path, text).unwrap();
        let e = VideoReader::open(&path)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not accepted") && e.contains(name),
            "{name}: {e}"
        );
    }
    // The segment itself, as a file in the dataset, is a video.
    assert!(VideoReader::open(&secret).is_ok());
}
