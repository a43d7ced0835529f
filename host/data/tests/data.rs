//! Dataset check and preview on tiny generated datasets (clips made with the `ffmpeg`
//! tool in temporary folders) and on the shared mini dataset.

use std::path::{Path, PathBuf};
use std::process::Command;

use cogvx_data::{check, preview, Chain, PreviewError, PreviewOptions, Report};
use cogvx_plugin_api::{
    CropBox, Frames, Plugin, PluginError, PluginInfo, PluginKind, PluginResult, Resolution, Sample,
    Size, TransformPlan, TransformRequest,
};

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

fn info(name: &str, kind: PluginKind) -> PluginInfo {
    PluginInfo {
        name: name.into(),
        version: "0.0.0".into(),
        kinds: vec![kind],
        description: String::new(),
    }
}

/// Test frame selection: `target.frames` indices spread uniformly; a short clip is
/// rejected (`reject`) or padded by repeating its last frame.
struct Uniform {
    reject: bool,
}
impl Plugin for Uniform {
    fn info(&self) -> PluginInfo {
        info("test-uniform", PluginKind::VideoTransform)
    }
    fn plan_transform(&mut self, r: &TransformRequest) -> PluginResult<TransformPlan> {
        let (n, f) = (r.clip.frame_count, r.target.frames);
        let frames = if n >= f {
            (0..f as u64)
                .map(|j| (j * (n as u64 - 1) / (f as u64 - 1).max(1)) as u32)
                .collect()
        } else if self.reject {
            return Err(PluginError::Invalid(format!(
                "clip has {n} frames, fewer than the {f} required (policy: reject)"
            )));
        } else {
            (0..f).map(|j| j.min(n - 1)).collect()
        };
        Ok(TransformPlan {
            frames,
            ..r.plan.clone()
        })
    }
}

/// Test crop/resize: centre crop to the target aspect, then resize.
struct CenterCrop;
impl Plugin for CenterCrop {
    fn info(&self) -> PluginInfo {
        info("test-center-crop", PluginKind::VideoTransform)
    }
    fn plan_transform(&mut self, r: &TransformRequest) -> PluginResult<TransformPlan> {
        let (w, h) = (r.clip.width as u64, r.clip.height as u64);
        let (tw, th) = (r.target.width as u64, r.target.height as u64);
        let (cw, ch) = if w * th > h * tw {
            (h * tw / th, h)
        } else {
            (w, w * th / tw)
        };
        let crop = CropBox {
            x: ((w - cw) / 2) as u32,
            y: ((h - ch) / 2) as u32,
            width: cw as u32,
            height: ch as u32,
        };
        Ok(TransformPlan {
            crop: Some(crop),
            resize: Some(Size {
                width: r.target.width,
                height: r.target.height,
            }),
            ..r.plan.clone()
        })
    }
}

/// A plugin returning a plan with an index past the end.
struct BadPlan;
impl Plugin for BadPlan {
    fn info(&self) -> PluginInfo {
        info("test-bad-plan", PluginKind::VideoTransform)
    }
    fn plan_transform(&mut self, r: &TransformRequest) -> PluginResult<TransformPlan> {
        Ok(TransformPlan {
            frames: vec![0, r.clip.frame_count],
            ..r.plan.clone()
        })
    }
}

/// A pixel-path transform: paints every frame white.
struct White;
impl Plugin for White {
    fn info(&self) -> PluginInfo {
        info("test-white", PluginKind::VideoTransform)
    }
    fn transform_frames(&mut self, mut frames: Frames) -> PluginResult<Frames> {
        frames.rgb.fill(255);
        Ok(frames)
    }
}

/// A prompt rewriter that appends a tag.
struct Tag;
impl Plugin for Tag {
    fn info(&self) -> PluginInfo {
        info("test-tag", PluginKind::PromptRewriter)
    }
    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        Ok(format!("{caption} [tagged]"))
    }
}

const TARGET: Resolution = Resolution {
    frames: 9,
    height: 32,
    width: 48,
};

/// A 96x64 testsrc2 clip of `frames` frames at 8 fps.
fn clip(path: &Path, frames: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=s=96x64:r=8",
        "-frames:v",
        &frames.to_string(),
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        path.to_str().unwrap(),
    ]);
}

/// A dataset folder with the given list files; clips are made by the caller.
fn dataset(prompts: &str, videos: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("prompts.txt"), prompts).unwrap();
    std::fs::write(d.path().join("videos.txt"), videos).unwrap();
    d
}

fn messages(r: &Report) -> Vec<String> {
    r.problems.iter().map(|p| p.to_string()).collect()
}

/// Asserts that check reports `expected` (a substring) at videos.txt:`line` (or at `file`
/// when given), and that preview refuses with the same report and writes nothing.
fn assert_refused(
    root: &Path,
    chain: &mut Chain<'_>,
    file: &str,
    line: Option<usize>,
    expected: &str,
) {
    let report = check(root, TARGET, chain);
    let loc = match line {
        Some(l) => format!("{}:{l}: ", root.join(file).display()),
        None => format!("{}: ", root.join(file).display()),
    };
    let msgs = messages(&report);
    assert!(
        msgs.iter()
            .any(|m| m.starts_with(&loc) && m.contains(expected)),
        "expected a problem at `{loc}` containing `{expected}`, got {msgs:#?}"
    );
    assert!(report.to_string().contains(expected));
    let out = root.join("out");
    let opts = PreviewOptions {
        progress: false,
        ..Default::default()
    };
    match preview(root, &out, TARGET, chain, &opts) {
        Err(PreviewError::Dataset(r)) => assert!(r.to_string().contains(expected)),
        Err(e) => panic!("unexpected preview error {e}"),
        Ok(s) => panic!("preview of a bad dataset succeeded: {s:?}"),
    }
    assert!(
        !out.exists(),
        "preview wrote {} for a bad dataset",
        out.display()
    );
}

#[test]
fn line_counts_differ() {
    let d = dataset("one\ntwo\n", "videos/a.mp4\n");
    clip(&d.path().join("videos/a.mp4"), 12);
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        None,
        "has 1 lines but prompts.txt has 2",
    );
}

#[test]
fn missing_clip() {
    let d = dataset("a\nb\n", "videos/a.mp4\nvideos/gone.mp4\n");
    clip(&d.path().join("videos/a.mp4"), 12);
    let gone = d.path().join("videos/gone.mp4");
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        Some(2),
        &format!("{}: file not found", gone.display()),
    );
}

#[test]
fn zero_byte_clip_and_empty_caption() {
    let d = dataset("\nb\n", "videos/a.mp4\nvideos/empty.mp4\n");
    clip(&d.path().join("videos/a.mp4"), 12);
    std::fs::write(d.path().join("videos/empty.mp4"), b"").unwrap();
    // The caption of line 1 is empty (a blank line at the end would just be ignored).
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "prompts.txt",
        Some(1),
        "empty caption",
    );
    std::fs::write(d.path().join("prompts.txt"), "a\nb\n").unwrap();
    let empty = d.path().join("videos/empty.mp4");
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        Some(2),
        &format!("{}: file is empty (0 bytes)", empty.display()),
    );
}

#[test]
fn empty_list_file() {
    let d = dataset("", "");
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        None,
        "file is empty",
    );
}

#[test]
fn text_file_renamed_to_mp4() {
    let d = dataset("a\n", "videos/notes.mp4\n");
    std::fs::create_dir_all(d.path().join("videos")).unwrap();
    std::fs::write(d.path().join("videos/notes.mp4"), "just some text\n").unwrap();
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        Some(1),
        "notes.mp4: not a video file",
    );
}

#[test]
fn truncated_clip() {
    let d = dataset("a\n", "videos/half.mp4\n");
    let whole = d.path().join("whole.mp4");
    clip(&whole, 24);
    let bytes = std::fs::read(&whole).unwrap();
    std::fs::create_dir_all(d.path().join("videos")).unwrap();
    std::fs::write(d.path().join("videos/half.mp4"), &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        Some(1),
        "half.mp4: truncated or corrupt video",
    );
}

#[test]
fn audio_only_file() {
    let d = dataset("a\n", "videos/tone.mp4\n");
    std::fs::create_dir_all(d.path().join("videos")).unwrap();
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=0.5",
        d.path().join("videos/tone.mp4").to_str().unwrap(),
    ]);
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        Some(1),
        "tone.mp4: audio only, no video stream",
    );
}

#[test]
fn too_short_clip_under_each_policy() {
    let d = dataset("a\n", "videos/short.mp4\n");
    clip(&d.path().join("videos/short.mp4"), 5);
    // No frame-selection plugin: the raw count (5) against F (9).
    assert_refused(d.path(), &mut Chain::new(), "videos.txt", Some(1), "clip too short: 5 frames (no plugin in the chain selects frames, so the raw frame count applies), the target resolution 9x32x48 needs 9");
    // A selection plugin with the reject policy: its message, with its name.
    let mut u = Uniform { reject: true };
    let mut chain = Chain {
        video_transforms: vec![&mut u],
        ..Chain::new()
    };
    assert_refused(
        d.path(),
        &mut chain,
        "videos.txt",
        Some(1),
        "plugin `test-uniform` failed in `plan-transform`: invalid input: clip has 5 frames, fewer than the 9 required",
    );
    // With the repeat-last-frame policy the clip is fine.
    let mut u = Uniform { reject: false };
    let mut chain = Chain {
        video_transforms: vec![&mut u],
        ..Chain::new()
    };
    assert!(check(d.path(), TARGET, &mut chain).is_ok());
}

#[test]
fn paths_escaping_the_root() {
    let outside = tempfile::tempdir().unwrap();
    clip(&outside.path().join("x.mp4"), 12);
    let d = dataset("a\nb\nc\n", "../x.mp4\n/etc/hosts\nvideos/link.mp4\n");
    std::fs::create_dir_all(d.path().join("videos")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        outside.path().join("x.mp4"),
        d.path().join("videos/link.mp4"),
    )
    .unwrap();
    let mut chain = Chain::new();
    assert_refused(
        d.path(),
        &mut chain,
        "videos.txt",
        Some(1),
        "path `../x.mp4` leaves the dataset root",
    );
    assert_refused(
        d.path(),
        &mut chain,
        "videos.txt",
        Some(2),
        "path `/etc/hosts` is absolute",
    );
    #[cfg(unix)]
    assert_refused(
        d.path(),
        &mut chain,
        "videos.txt",
        Some(3),
        "outside the dataset root",
    );
}

#[test]
fn check_reports_every_problem_at_once() {
    let d = dataset(
        "a\nb\n\nd\ne\n",
        "videos/ok.mp4\nvideos/gone.mp4\nvideos/ok.mp4\nvideos/text.mp4\n../up.mp4\n",
    );
    clip(&d.path().join("videos/ok.mp4"), 12);
    std::fs::write(d.path().join("videos/text.mp4"), "text").unwrap();
    let report = check(d.path(), TARGET, &mut Chain::new());
    let msgs = messages(&report);
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    let v = d.path().join("videos.txt").display().to_string();
    let p = d.path().join("prompts.txt").display().to_string();
    assert!(msgs.iter().any(|m| m == &format!("{p}:3: empty caption")));
    assert!(msgs
        .iter()
        .any(|m| m.starts_with(&format!("{v}:5: path `../up.mp4` leaves"))));
    assert!(msgs
        .iter()
        .any(|m| m.starts_with(&format!("{v}:2: ")) && m.contains("file not found")));
    assert!(msgs
        .iter()
        .any(|m| m.starts_with(&format!("{v}:4: ")) && m.contains("not a video file")));
    let shown = report.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}: 3 samples, 4 problems\n  ",
            d.path().display()
        )),
        "{shown}"
    );
}

#[test]
fn image_lists_are_checked() {
    let d = dataset("a\nb\n", "videos/a.mp4\nvideos/a.mp4\n");
    clip(&d.path().join("videos/a.mp4"), 12);
    std::fs::create_dir_all(d.path().join("images")).unwrap();
    ff(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=s=96x64",
        "-frames:v",
        "1",
        d.path().join("images/a.png").to_str().unwrap(),
    ]);
    std::fs::write(d.path().join("images/b.png"), "not an image").unwrap();
    std::fs::write(d.path().join("images.txt"), "images/a.png\n").unwrap();
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "images.txt",
        None,
        "has 1 lines but videos.txt has 2",
    );
    std::fs::write(d.path().join("images.txt"), "images/a.png\nimages/b.png\n").unwrap();
    let b = d.path().join("images/b.png");
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "videos.txt",
        Some(2),
        &format!("{}: not a readable image", b.display()),
    );
    std::fs::write(d.path().join("images.txt"), "images/a.png\nimages/a.png\n").unwrap();
    assert!(check(d.path(), TARGET, &mut Chain::new()).is_ok());
}

#[test]
fn bad_plan_names_the_plugin_and_writes_nothing() {
    let d = dataset("a\n", "videos/a.mp4\n");
    clip(&d.path().join("videos/a.mp4"), 12);
    let mut bad = BadPlan;
    let mut chain = Chain {
        video_transforms: vec![&mut bad],
        ..Chain::new()
    };
    assert_refused(
        d.path(),
        &mut chain,
        "videos.txt",
        Some(1),
        "plugin `test-bad-plan` returned a bad plan: frame index 12 (position 1 of 2) is out of range: the clip has 12 frames",
    );
}

#[test]
fn a_plugin_reader_is_checked_too() {
    struct Reader;
    impl Plugin for Reader {
        fn info(&self) -> PluginInfo {
            info("test-reader", PluginKind::DatasetReader)
        }
        fn list_samples(&mut self, _root: &str) -> PluginResult<Vec<Sample>> {
            Ok(vec![Sample {
                caption: "c".into(),
                video: "../../etc/x.mp4".into(),
                image: None,
                frames: None,
                origin: "list.json:7".into(),
            }])
        }
    }
    let d = tempfile::tempdir().unwrap();
    let mut r = Reader;
    let mut chain = Chain {
        reader: Some(&mut r),
        ..Chain::new()
    };
    assert_refused(
        d.path(),
        &mut chain,
        "list.json",
        Some(7),
        "path `../../etc/x.mp4` leaves the dataset root",
    );
}

#[test]
fn preview_runs_pixel_transforms_and_rewriters() {
    let d = dataset("first\nsecond\n", "videos/a.mp4\nvideos/b.mp4\n");
    clip(&d.path().join("videos/a.mp4"), 20);
    clip(&d.path().join("videos/b.mp4"), 9);
    let (mut u, mut c, mut w, mut t) = (Uniform { reject: true }, CenterCrop, White, Tag);
    let mut chain = Chain {
        reader: None,
        columns: Default::default(),
        prompt_rewriters: vec![&mut t],
        video_transforms: vec![&mut u, &mut c, &mut w],
    };
    let out = d.path().join("out");
    let s = preview(
        d.path(),
        &out,
        TARGET,
        &mut chain,
        &PreviewOptions {
            progress: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(s.failed.is_empty());
    assert_eq!(s.clips, vec![out.join("0_a.mp4"), out.join("1_b.mp4")]);
    assert_eq!(
        std::fs::read_to_string(out.join("captions.txt")).unwrap(),
        "first [tagged]\nsecond [tagged]\n"
    );
    let f = cogvx_video::decode(
        out.join("1_b.mp4"),
        &TransformPlan::identity(&cogvx_video::probe(out.join("1_b.mp4")).unwrap().clip_info()),
    )
    .unwrap();
    assert_eq!((f.width, f.height, f.count), (48, 32, 9));
    let mean = f.rgb.iter().map(|&v| v as f64).sum::<f64>() / f.rgb.len() as f64;
    assert!(
        mean > 250.0,
        "the pixel transform's white frames came back with mean {mean}"
    );
}

fn mini() -> PathBuf {
    cogvx_fixtures::mini_dataset()
}

#[test]
fn mini_dataset_check_and_preview_end_to_end() {
    let root = mini();
    let target = Resolution {
        frames: 9,
        height: 64,
        width: 96,
    };
    let (mut u, mut c, mut t) = (Uniform { reject: true }, CenterCrop, Tag);
    let mut chain = Chain {
        reader: None,
        columns: Default::default(),
        prompt_rewriters: vec![&mut t],
        video_transforms: vec![&mut u, &mut c],
    };
    let report = check(&root, target, &mut chain);
    assert!(report.is_ok(), "{report}");
    assert_eq!(
        report.to_string(),
        format!("{}: 4 samples, no problems", root.display())
    );
    let out = tempfile::tempdir().unwrap();
    let s = preview(
        &root,
        out.path(),
        target,
        &mut chain,
        &PreviewOptions {
            progress: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    let names: Vec<String> = s
        .clips
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![
            "0_carphone.mp4",
            "1_bikes.mp4",
            "2_testsrc.mp4",
            "3_mandelbrot.mp4"
        ]
    );
    for clip in &s.clips {
        let info = cogvx_video::probe(clip).unwrap();
        assert_eq!(
            (info.width, info.height, info.frame_count),
            (96, 64, 9),
            "{}",
            clip.display()
        );
        assert!((info.fps - 8.0).abs() < 1e-6);
    }
    let captions = std::fs::read_to_string(out.path().join("captions.txt")).unwrap();
    assert_eq!(captions.lines().count(), 4);
    assert!(captions
        .lines()
        .all(|l| l.starts_with("BW_STYLE ") && l.ends_with(" [tagged]")));
    let sheet = std::fs::read(out.path().join("contact_sheet.png")).unwrap();
    assert_eq!(&sheet[1..4], b"PNG");
    // 8 columns of 96 px and 4 rows of 64 px with 4 px gaps.
    let w = u32::from_be_bytes(sheet[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(sheet[20..24].try_into().unwrap());
    assert_eq!((w, h), (4 + 8 * 100, 4 + 4 * 68));
    // Only the outputs: no temporary files left behind.
    let mut files: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 6, "{files:?}");
}

/// A rewriter that returns a fixed text.
struct Returns(String);

impl Plugin for Returns {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "returns".into(),
            version: "0.0.1".into(),
            kinds: vec![PluginKind::PromptRewriter],
            description: String::new(),
        }
    }
    fn rewrite_prompt(&mut self, _: &str) -> PluginResult<String> {
        Ok(self.0.clone())
    }
}

/// Captions are bounded: a caption of NULs is empty; a 20 MB caption (from the dataset or a
/// rewriter) is cut to `MAX_CAPTION_BYTES` at a character boundary before it reaches the
/// tokenizer or the cache index.
#[test]
fn huge_and_blank_captions_are_bounded() {
    let d = dataset("\0\0\0\n", "videos/a.mp4\n");
    clip(&d.path().join("videos/a.mp4"), 12);
    assert_refused(
        d.path(),
        &mut Chain::new(),
        "prompts.txt",
        Some(1),
        "empty caption",
    );

    let max = cogvx_data::chain::MAX_CAPTION_BYTES;
    let huge = "é".repeat(10 << 20); // 20 MB of two-byte characters
    let mut chain = Chain::new();
    let cut = chain.rewrite_prompt(&huge).unwrap();
    assert!(
        cut.len() <= max && cut.len() >= max - 1 && cut.chars().all(|c| c == 'é'),
        "{}",
        cut.len()
    );
    let mut rewriter = Returns("a".repeat(50 << 20));
    let mut chain = Chain::new();
    chain.prompt_rewriters.push(&mut rewriter);
    assert_eq!(chain.rewrite_prompt("a cat").unwrap().len(), max);
    let mut blank = Returns(" \0\t\u{1b}".into());
    let mut chain = Chain::new();
    chain.prompt_rewriters.push(&mut blank);
    let e = chain.rewrite_prompt("a cat").unwrap_err();
    assert!(
        e.contains("plugin `returns`") && e.contains("empty caption"),
        "{e}"
    );
}
