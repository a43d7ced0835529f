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
//!
//! The three file names are the official finetune's `--caption_column`, `--video_column` and
//! `--image_column` ([`Columns`]; `[data] caption_column` etc. in a cogvx config).

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

/// Which files of the dataset root hold the captions, the clip paths and the image paths: the
/// official finetune's `--caption_column`, `--video_column` and `--image_column`, as the
/// reader's parameters (`{"caption_column": "captions.txt", ...}`). Each is a path relative to
/// the root that must stay inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns {
    /// The captions file (default `prompts.txt`).
    pub caption: String,
    /// The clip list (default `videos.txt`).
    pub video: String,
    /// The image list; `None`: `images.txt` when it exists. Named, the file is required.
    pub image: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            caption: PROMPTS.into(),
            video: VIDEOS.into(),
            image: None,
        }
    }
}

impl Columns {
    /// Reads `{"caption_column": .., "video_column": .., "image_column": ..}` (each optional,
    /// no other key); an empty value is an error naming the key.
    pub fn from_params(params_json: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(params_json)
            .map_err(|e| format!("the parameters are not JSON: {e}"))?;
        let map = match value {
            serde_json::Value::Object(map) => map,
            serde_json::Value::Null => Default::default(),
            other => return Err(format!("the parameters must be a table, got {other}")),
        };
        let mut columns = Columns::default();
        for (key, v) in map {
            let name = match v {
                serde_json::Value::String(n) if !n.trim().is_empty() => n.trim().to_string(),
                other => {
                    return Err(format!(
                        "`{key}` must name a file of the dataset root (a non-empty string), got {other}"
                    ))
                }
            };
            match key.as_str() {
                "caption_column" => columns.caption = name,
                "video_column" => columns.video = name,
                "image_column" => columns.image = Some(name),
                _ => {
                    return Err(format!(
                    "unknown parameter `{key}` (known: caption_column, video_column, image_column)"
                ))
                }
            }
        }
        Ok(columns)
    }
}

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

/// Reads one list file; `required`: the message when it is missing (`None`: optional).
fn read_list(path: &Path, required: Option<&str>, problems: &mut Vec<Problem>) -> Option<ListFile> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(message) = required {
                problems.push(Problem::new(path, None, message));
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

/// Reads a dataset root in the finetune layout with the list files `columns` names,
/// collecting every problem.
pub fn read_layout(root: &Path, columns: &Columns) -> Layout {
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
    // The list files themselves must stay inside the root, as the paths they list.
    let mut list_path = |key: &str, name: &str| match resolve_in_root(root, name) {
        Ok(p) => Some(p),
        Err(m) => {
            problems.push(Problem::new(root, None, format!("`{key}`: {m}")));
            None
        }
    };
    let prompts_path = list_path("caption_column", &columns.caption);
    let videos_path = list_path("video_column", &columns.video);
    let images_path = list_path("image_column", columns.image.as_deref().unwrap_or(IMAGES));
    let (Some(prompts_path), Some(videos_path), Some(images_path)) =
        (prompts_path, videos_path, images_path)
    else {
        return Layout {
            root: root.to_path_buf(),
            samples: vec![],
            problems,
        };
    };
    let needed = "file not found; the finetune layout needs a captions file and a clip list in the dataset root (prompts.txt and videos.txt unless `[data] caption_column`/`video_column` name others)";
    let prompts = read_list(&prompts_path, Some(needed), &mut problems);
    let videos = read_list(&videos_path, Some(needed), &mut problems);
    let images = read_list(
        &images_path,
        columns
            .image
            .is_some()
            .then_some("file not found; `[data] image_column` names it as the image list"),
        &mut problems,
    );
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
            format!(
                "has {nv} lines but {p} has {np}; line i of {p} must caption line i of {v}",
                p = columns.caption,
                v = columns.video
            ),
        ));
    }
    if let Some(im) = &images {
        if im.lines.len() != nv {
            problems.push(Problem::new(
                &images_path,
                None,
                format!(
                    "has {} lines but {} has {nv}",
                    im.lines.len(),
                    columns.video
                ),
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
            origin: format!("{}:{}", columns.video, i + 1),
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

/// The built-in `finetune-layout` dataset reader as a [`Plugin`]; its parameters are the
/// [`Columns`].
#[derive(Clone, Debug, Default)]
pub struct FinetuneLayout {
    columns: Columns,
}

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

    /// Takes the [`Columns`] (`caption_column`, `video_column`, `image_column`).
    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.columns = Columns::from_params(params_json)
            .map_err(|e| PluginError::Invalid(format!("{READER_NAME}: {e}")))?;
        Ok(())
    }

    /// Lists the samples; if the layout has problems, fails with all of them, one per line.
    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        let layout = read_layout(Path::new(root), &self.columns);
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
        let layout = read_layout(root, &Columns::default());
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
        let err = FinetuneLayout::default()
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
        let layout = read_layout(d.path(), &Columns::default());
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

    /// `[data] caption_column`, `video_column`, `image_column` (the official finetune's flags)
    /// name the list files; they stay inside the root, a named image list is required, and a
    /// bad parameter is refused naming the key.
    #[test]
    fn columns_name_the_list_files() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("meta")).unwrap();
        std::fs::write(root.join("meta/captions.txt"), "a cat\na dog\n").unwrap();
        std::fs::write(root.join("clips.txt"), "c/1.mp4\nc/2.mp4\n").unwrap();
        std::fs::write(root.join("firsts.txt"), "i/1.png\ni/2.png\n").unwrap();
        let mut reader = FinetuneLayout::default();
        reader
            .configure(
                r#"{"caption_column": "meta/captions.txt", "video_column": "clips.txt", "image_column": "firsts.txt"}"#,
            )
            .unwrap();
        let samples = reader.list_samples(root.to_str().unwrap()).unwrap();
        let got: Vec<_> = samples
            .iter()
            .map(|s| {
                (
                    s.caption.as_str(),
                    s.video.as_str(),
                    s.image.as_deref(),
                    s.origin.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a cat", "c/1.mp4", Some("i/1.png"), "clips.txt:1"),
                ("a dog", "c/2.mp4", Some("i/2.png"), "clips.txt:2")
            ]
        );

        // Without image_column, no images.txt: text-to-video samples.
        let columns = Columns::from_params(
            r#"{"caption_column": "meta/captions.txt", "video_column": "clips.txt"}"#,
        )
        .unwrap();
        let layout = read_layout(root, &columns);
        assert!(layout.problems.is_empty(), "{:?}", layout.problems);
        assert!(layout.samples.iter().all(|s| s.image.is_none()));

        // A named image list that is missing, a list file outside the root.
        let columns = Columns {
            image: Some("missing.txt".into()),
            caption: "../captions.txt".into(),
            ..Columns::default()
        };
        let msgs: Vec<String> = read_layout(root, &columns)
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(msgs.len(), 1, "{msgs:#?}");
        assert!(
            msgs[0].contains("`caption_column`: path `../captions.txt` leaves the dataset root"),
            "{msgs:#?}"
        );
        let columns = Columns {
            image: Some("missing.txt".into()),
            caption: "meta/captions.txt".into(),
            video: "clips.txt".into(),
        };
        let msgs: Vec<String> = read_layout(root, &columns)
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            msgs,
            [format!(
                "{}: file not found; `[data] image_column` names it as the image list",
                root.join("missing.txt").display()
            )]
        );

        for (params, expected) in [
            (
                r#"{"caption_colum": "x"}"#,
                "unknown parameter `caption_colum`",
            ),
            (r#"{"video_column": ""}"#, "`video_column` must name a file"),
            (r#"{"image_column": 3}"#, "`image_column` must name a file"),
        ] {
            let err = FinetuneLayout::default().configure(params).unwrap_err();
            assert!(err.to_string().contains(expected), "{params}: {err}");
        }
    }
}
