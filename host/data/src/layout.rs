//! The built-in dataset reader for the CogVideoX finetune layout (`finetune-layout`):
//!
//! ```text
//! <root>/prompts.txt   one caption per line; line i describes line i of videos.txt
//! <root>/videos.txt    one clip path per line, relative to <root>
//! <root>/images.txt    optional: one image path per line (image-to-video), relative to <root>
//! ```
//!
//! Lines are trimmed; blank lines at the end of a file are ignored, a blank line elsewhere is
//! an empty caption or path (the official trainer drops blank lines, which silently pairs
//! captions with the wrong clips). A path that leaves the root (`..`, absolute, or a
//! symlink resolving outside) is an error. A validation set uses the same layout in its
//! own root.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use cogvx_plugin_api::{Plugin, PluginError, PluginInfo, PluginKind, PluginResult, Sample};

/// The reader's plugin name.
pub const READER_NAME: &str = "finetune-layout";
/// Captions file name.
pub const PROMPTS: &str = "prompts.txt";
/// Clip list file name.
pub const VIDEOS: &str = "videos.txt";
/// Optional image list file name.
pub const IMAGES: &str = "images.txt";

/// One problem with a dataset: the file (and line, 1-based) it is about and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    /// A problem at `file` (and `line`).
    pub fn new(file: impl Into<PathBuf>, line: Option<usize>, message: impl Into<String>) -> Self {
        Problem {
            file: file.into(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths and messages can come from a dataset or a plugin: printed without control
        // characters, and bounded.
        let file = cogvx_plugin_api::text::display_safe(&self.file.display().to_string(), 4096);
        let message = cogvx_plugin_api::text::display_safe(&self.message, 4096);
        match self.line {
            Some(l) => write!(f, "{file}:{l}: {message}"),
            None => write!(f, "{file}: {message}"),
        }
    }
}

/// The lines of one list file.
#[derive(Clone, Debug, Default)]
struct ListFile {
    lines: Vec<String>,
}

fn read_list(path: &Path, required: bool, problems: &mut Vec<Problem>) -> Option<ListFile> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if required {
                problems.push(Problem::new(
                    path,
                    None,
                    "file not found; the finetune layout needs prompts.txt and videos.txt in the dataset root",
                ));
            }
            return None;
        }
        Err(e) => {
            problems.push(Problem::new(path, None, format!("cannot read: {e}")));
            return None;
        }
    };
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            problems.push(Problem::new(
                path,
                Some(line),
                "not valid UTF-8; save the file as UTF-8",
            ));
            return None;
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines: Vec<String> = text.split('\n').map(|l| l.trim().to_string()).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.is_empty() {
        problems.push(Problem::new(path, None, "file is empty"));
    }
    Some(ListFile { lines })
}

/// Resolves `rel` (a path from a list file) inside `root`: it must be relative, must not
/// climb out with `..`, and, if it exists, must not resolve (through symlinks) outside the
/// root. Returns `root` joined with the normalised path.
pub fn resolve_in_root(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let leaves = || {
        format!(
            "path `{rel}` leaves the dataset root {}; paths must be relative to it and stay inside",
            root.display()
        )
    };
    let p = Path::new(rel);
    if p.is_absolute() || rel.starts_with('/') || rel.starts_with('\\') {
        return Err(format!(
            "path `{rel}` is absolute; paths must be relative to the dataset root {}",
            root.display()
        ));
    }
    let mut normal = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => normal.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                if !normal.pop() {
                    return Err(leaves());
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(leaves()),
        }
    }
    if normal.as_os_str().is_empty() {
        return Err(format!(
            "path `{rel}` names the dataset root itself, not a file"
        ));
    }
    let joined = root.join(&normal);
    if std::fs::symlink_metadata(&joined).is_ok() {
        if let (Ok(real), Ok(real_root)) = (joined.canonicalize(), root.canonicalize()) {
            if !real.starts_with(&real_root) {
                return Err(format!(
                    "path `{rel}` resolves (through a symlink) to {}, outside the dataset root {}",
                    real.display(),
                    root.display()
                ));
            }
        }
    }
    Ok(joined)
}

/// What reading a dataset root found: the samples whose lines are sound, and every
/// structural problem (missing list files, line counts, empty captions or paths, paths
/// leaving the root).
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub root: PathBuf,
    pub samples: Vec<Sample>,
    pub problems: Vec<Problem>,
}

/// Reads a dataset root in the finetune layout, collecting every problem.
pub fn read_layout(root: &Path) -> Layout {
    let mut problems = Vec::new();
    if !root.is_dir() {
        problems.push(Problem::new(
            root,
            None,
            "dataset root is not a folder (or does not exist)",
        ));
        return Layout {
            root: root.to_path_buf(),
            samples: vec![],
            problems,
        };
    }
    let prompts_path = root.join(PROMPTS);
    let videos_path = root.join(VIDEOS);
    let images_path = root.join(IMAGES);
    let prompts = read_list(&prompts_path, true, &mut problems);
    let videos = read_list(&videos_path, true, &mut problems);
    let images = read_list(&images_path, false, &mut problems);
    let (Some(prompts), Some(videos)) = (prompts, videos) else {
        return Layout {
            root: root.to_path_buf(),
            samples: vec![],
            problems,
        };
    };
    let (np, nv) = (prompts.lines.len(), videos.lines.len());
    if np != nv {
        problems.push(Problem::new(
            &videos_path,
            None,
            format!("has {nv} lines but {PROMPTS} has {np}; line i of {PROMPTS} must caption line i of {VIDEOS}"),
        ));
    }
    if let Some(im) = &images {
        if im.lines.len() != nv {
            problems.push(Problem::new(
                &images_path,
                None,
                format!("has {} lines but {VIDEOS} has {nv}", im.lines.len()),
            ));
        }
    }
    for (i, caption) in prompts.lines.iter().enumerate() {
        if crate::chain::is_blank_caption(caption) {
            problems.push(Problem::new(&prompts_path, Some(i + 1), "empty caption"));
        }
    }
    let check_path = |file: &Path, i: usize, rel: &str, problems: &mut Vec<Problem>| -> bool {
        if rel.is_empty() {
            problems.push(Problem::new(file, Some(i + 1), "empty path"));
            return false;
        }
        match resolve_in_root(root, rel) {
            Ok(_) => true,
            Err(m) => {
                problems.push(Problem::new(file, Some(i + 1), m));
                false
            }
        }
    };
    let mut video_ok = Vec::with_capacity(nv);
    for (i, rel) in videos.lines.iter().enumerate() {
        video_ok.push(check_path(&videos_path, i, rel, &mut problems));
    }
    let mut image_ok = vec![true; nv];
    if let Some(im) = &images {
        for (i, rel) in im.lines.iter().enumerate() {
            let ok = check_path(&images_path, i, rel, &mut problems);
            if i < nv {
                image_ok[i] = ok;
            }
        }
    }
    let mut samples = Vec::new();
    for i in 0..np.min(nv) {
        let image = images.as_ref().and_then(|im| im.lines.get(i).cloned());
        if prompts.lines[i].is_empty()
            || !video_ok[i]
            || !image_ok[i]
            || (images.is_some() && image.is_none())
        {
            continue;
        }
        samples.push(Sample {
            caption: prompts.lines[i].clone(),
            video: videos.lines[i].clone(),
            image,
            frames: None,
            origin: format!("{VIDEOS}:{}", i + 1),
        });
    }
    Layout {
        root: root.to_path_buf(),
        samples,
        problems,
    }
}

/// Where a sample came from, as a file and line: its `origin` (`file:line`, the file
/// relative to `root`), else the root itself.
pub fn origin_location(root: &Path, sample: &Sample) -> (PathBuf, Option<usize>) {
    if let Some((file, line)) = sample.origin.rsplit_once(':') {
        if let Ok(n) = line.parse::<usize>() {
            return (root.join(file), Some(n));
        }
    }
    if sample.origin.is_empty() {
        (root.to_path_buf(), None)
    } else {
        (root.join(&sample.origin), None)
    }
}

/// The built-in `finetune-layout` dataset reader as a [`Plugin`].
#[derive(Clone, Debug, Default)]
pub struct FinetuneLayout;

impl Plugin for FinetuneLayout {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: READER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: vec![PluginKind::DatasetReader],
            description: "CogVideoX finetune layout: prompts.txt, videos.txt, optional images.txt"
                .into(),
        }
    }

    /// Lists the samples; if the layout has problems, fails with all of them, one per line.
    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        let layout = read_layout(Path::new(root));
        if layout.problems.is_empty() {
            Ok(layout.samples)
        } else {
            let lines: Vec<String> = layout.problems.iter().map(|p| p.to_string()).collect();
            Err(PluginError::Invalid(lines.join("\n")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        assert_eq!(
            resolve_in_root(root, "videos/a.mp4").unwrap(),
            root.join("videos/a.mp4")
        );
        assert_eq!(
            resolve_in_root(root, "./videos/../b.mp4").unwrap(),
            root.join("b.mp4")
        );
        assert!(resolve_in_root(root, "../x.mp4")
            .unwrap_err()
            .contains("path `../x.mp4` leaves the dataset root"));
        assert!(resolve_in_root(root, "videos/../../x.mp4")
            .unwrap_err()
            .contains("leaves the dataset root"));
        assert!(resolve_in_root(root, "/etc/passwd")
            .unwrap_err()
            .contains("path `/etc/passwd` is absolute"));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.mp4"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.mp4"), d.path().join("link.mp4"))
            .unwrap();
        let err = resolve_in_root(d.path(), "link.mp4").unwrap_err();
        assert!(
            err.contains("resolves (through a symlink) to")
                && err.contains("outside the dataset root"),
            "{err}"
        );
        // A symlink that stays inside is fine.
        std::fs::write(d.path().join("real.mp4"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("real.mp4"), d.path().join("alias.mp4")).unwrap();
        assert!(resolve_in_root(d.path(), "alias.mp4").is_ok());
    }

    #[test]
    fn layout_reports_every_structural_problem() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join(PROMPTS), "a cat\n\nthird caption\nfourth\n").unwrap();
        std::fs::write(root.join(VIDEOS), "v/1.mp4\n../escape.mp4\nv/3.mp4\n\n\n").unwrap();
        let layout = read_layout(root);
        let msgs: Vec<String> = layout.problems.iter().map(|p| p.to_string()).collect();
        let vp = root.join(VIDEOS).display().to_string();
        let pp = root.join(PROMPTS).display().to_string();
        assert!(
            msgs.contains(&format!(
                "{vp}: has 3 lines but prompts.txt has 4; line i of prompts.txt must caption line i of videos.txt"
            )),
            "{msgs:#?}"
        );
        assert!(
            msgs.contains(&format!("{pp}:2: empty caption")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter().any(|m| m.starts_with(&format!(
                "{vp}:2: path `../escape.mp4` leaves the dataset root"
            ))),
            "{msgs:#?}"
        );
        assert_eq!(msgs.len(), 3, "{msgs:#?}");
        // Only the sound lines become samples.
        let videos: Vec<&str> = layout.samples.iter().map(|s| s.video.as_str()).collect();
        assert_eq!(videos, vec!["v/1.mp4", "v/3.mp4"]);
        assert_eq!(layout.samples[1].origin, "videos.txt:3");
        // Through the plugin trait, all problems come back in one error.
        let err = FinetuneLayout
            .list_samples(root.to_str().unwrap())
            .unwrap_err();
        assert!(
            matches!(&err, PluginError::Invalid(m) if m.lines().count() == 3),
            "{err}"
        );
    }

    #[test]
    fn missing_list_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let layout = read_layout(d.path());
        let msgs: Vec<String> = layout.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(msgs.len(), 2);
        assert!(msgs[0].starts_with(&format!(
            "{}: file not found",
            d.path().join(PROMPTS).display()
        )));
        assert!(msgs[1].starts_with(&format!(
            "{}: file not found",
            d.path().join(VIDEOS).display()
        )));
    }
}
