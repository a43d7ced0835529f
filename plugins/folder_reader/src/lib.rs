//! # `folder_reader` — a folder of clips, each captioned by its same-name `.txt`
//!
//! A dataset-reader plugin for the layout most people start from (and that finetrainers,
//! musubi-tuner and diffusion-pipe read): every clip under the dataset root, at any depth, with
//! its caption in the text file of the same name beside it.
//!
//! ```text
//! <root>/beach/wave.mp4
//! <root>/beach/wave.txt      "waves roll onto a sandy beach at sunset"
//! <root>/city.mov
//! <root>/city.txt
//! ```
//!
//! Samples come in path order (so the same folder always gives the same list). Hidden files and
//! folders (a leading `.`) are skipped, as are text files without a clip. A clip without its
//! caption file, an empty caption, a caption that is not UTF-8 and a root without clips are
//! errors naming the file; every problem is reported at once.
//!
//! ## Configuration (`[plugin.folder_reader]`, all optional)
//!
//! ```toml
//! [data]
//! reader = "folder_reader"
//!
//! [plugin.folder_reader]
//! extensions = ["mp4", "mov", "webm", "mkv", "avi", "m4v"]   # clip file extensions (any case)
//! caption_extension = "txt"
//! ```
//!
//! The `[data] caption_column`/`video_column`/`image_column` keys name list files of the
//! finetune layout and are refused here by name. Unknown keys are rejected by name.

use std::path::{Path, PathBuf};

use cogvx_plugin_api::{Plugin, PluginError, PluginInfo, PluginKind, PluginResult, Sample};
use serde::Deserialize;

/// The plugin's name (its crate folder); a loaded plugin of this name replaces the built-in.
pub const NAME: &str = "folder_reader";

fn default_extensions() -> Vec<String> {
    ["mp4", "mov", "webm", "mkv", "avi", "m4v"]
        .map(String::from)
        .to_vec()
}

fn default_caption_extension() -> String {
    "txt".into()
}

/// The `[plugin.folder_reader]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Clip file extensions, without the dot, matched case-insensitively.
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    /// The caption file's extension.
    #[serde(default = "default_caption_extension")]
    pub caption_extension: String,
    /// Refused (see the module docs); present so the message can say why.
    #[serde(default)]
    caption_column: Option<String>,
    #[serde(default)]
    video_column: Option<String>,
    #[serde(default)]
    image_column: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        parse_config("{}").expect("the defaults are valid")
    }
}

fn invalid(msg: String) -> PluginError {
    PluginError::Invalid(format!("{NAME}: {msg}"))
}

fn parse_config(params_json: &str) -> PluginResult<Config> {
    validate(cogvx_plugin_api::parse_params(NAME, params_json)?)
}

fn validate(mut config: Config) -> PluginResult<Config> {
    for (key, value) in [
        ("caption_column", &config.caption_column),
        ("video_column", &config.video_column),
        ("image_column", &config.image_column),
    ] {
        if value.is_some() {
            return Err(invalid(format!(
                "`{key}` names a list file of the finetune layout; this reader pairs each clip with the .{} file of the same name, so remove `{key}` (or use reader = \"finetune-layout\")",
                config.caption_extension
            )));
        }
    }
    let clean = |e: &str| e.trim().trim_start_matches('.').to_ascii_lowercase();
    config.extensions = config.extensions.iter().map(|e| clean(e)).collect();
    config.caption_extension = clean(&config.caption_extension);
    if config.extensions.is_empty() || config.extensions.iter().any(|e| e.is_empty()) {
        return Err(invalid(
            "`extensions` must list at least one non-empty clip extension, e.g. [\"mp4\"]".into(),
        ));
    }
    if config.caption_extension.is_empty() || config.extensions.contains(&config.caption_extension)
    {
        return Err(invalid(format!(
            "`caption_extension` = {:?} must be non-empty and not a clip extension",
            config.caption_extension
        )));
    }
    Ok(config)
}

/// The `folder_reader` plugin.
#[derive(Clone, Debug, Default)]
pub struct FolderReader {
    config: Config,
}

impl FolderReader {
    /// A reader with `config` (validated as [`Plugin::configure`] would).
    pub fn new(config: Config) -> PluginResult<Self> {
        Ok(FolderReader {
            config: validate(config)?,
        })
    }
}

/// `path` relative to `root`, with `/` separators (as the host expects sample paths).
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Every file under `dir` (not following symlinked folders), skipping hidden entries, sorted.
fn walk(dir: &Path, root: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!(
                "{}: cannot list the folder: {e}",
                relative(root, dir)
            ));
            return;
        }
    };
    let mut paths: Vec<(PathBuf, bool)> = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!(
                    "{}: cannot list the folder: {e}",
                    relative(root, dir)
                ));
                continue;
            }
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        paths.push((entry.path(), is_dir));
    }
    paths.sort();
    for (path, is_dir) in paths {
        if is_dir {
            walk(&path, root, files, problems);
        } else {
            files.push(path);
        }
    }
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
}

impl Plugin for FolderReader {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: vec![PluginKind::DatasetReader],
            description: "a folder of clips, each captioned by the .txt file of the same name"
                .into(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.config = parse_config(params_json)?;
        Ok(())
    }

    /// Lists the clips under `root` with their captions; fails with every problem, one per line.
    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        let root = Path::new(root);
        if !root.is_dir() {
            return Err(invalid(format!(
                "the dataset root {} is not a folder",
                root.display()
            )));
        }
        let mut files = Vec::new();
        let mut problems = Vec::new();
        walk(root, root, &mut files, &mut problems);
        let mut samples = Vec::new();
        for clip in files
            .iter()
            .filter(|f| extension(f).is_some_and(|e| self.config.extensions.contains(&e)))
        {
            let caption_path = clip.with_extension(&self.config.caption_extension);
            let video = relative(root, clip);
            let origin = relative(root, &caption_path);
            let bytes = match std::fs::read(&caption_path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    problems.push(format!(
                        "{video}: no caption file {origin}; write the clip's caption there"
                    ));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("{origin}: cannot read: {e}"));
                    continue;
                }
            };
            let caption = match String::from_utf8(bytes) {
                Ok(text) => text.trim_start_matches('\u{feff}').trim().to_string(),
                Err(_) => {
                    problems.push(format!("{origin}: not valid UTF-8; save the file as UTF-8"));
                    continue;
                }
            };
            if caption.is_empty() {
                problems.push(format!("{origin}: empty caption"));
                continue;
            }
            samples.push(Sample {
                caption,
                video,
                image: None,
                frames: None,
                origin,
            });
        }
        if samples.is_empty() && problems.is_empty() {
            problems.push(format!(
                "no clips ({}) under the dataset root {}",
                self.config
                    .extensions
                    .iter()
                    .map(|e| format!(".{e}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                root.display()
            ));
        }
        if problems.is_empty() {
            Ok(samples)
        } else {
            Err(invalid(problems.join("\n")))
        }
    }
}

cogvx_plugin_api::export_plugin!(FolderReader);

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn clips_pair_with_their_same_name_captions_in_path_order() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        write(root, "b/wave.MP4", b"x");
        write(root, "b/wave.txt", b"\xef\xbb\xbf  waves roll in \n");
        write(root, "a.mov", b"x");
        write(root, "a.txt", b"a city");
        write(root, "notes.txt", b"no clip: ignored");
        write(root, ".hidden/c.mp4", b"x");
        write(root, "b/.d.mp4", b"x");
        let mut r = FolderReader::default();
        let samples = r.list_samples(root.to_str().unwrap()).unwrap();
        let got: Vec<_> = samples
            .iter()
            .map(|s| (s.video.as_str(), s.caption.as_str(), s.origin.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a.mov", "a city", "a.txt"),
                ("b/wave.MP4", "waves roll in", "b/wave.txt")
            ]
        );
        // Only the configured extensions are clips.
        r.configure(r#"{"extensions": [".MOV"]}"#).unwrap();
        let samples = r.list_samples(root.to_str().unwrap()).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].video, "a.mov");
    }

    #[test]
    fn every_problem_names_its_file() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        write(root, "1.mp4", b"x");
        write(root, "2.mp4", b"x");
        write(root, "2.txt", b" \n");
        write(root, "3.mp4", b"x");
        write(root, "3.txt", b"\xff\xfe");
        write(root, "4.mp4", b"x");
        write(root, "4.txt", b"fine");
        let err = FolderReader::default()
            .list_samples(root.to_str().unwrap())
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 3, "{err}");
        assert!(lines[0].contains("1.mp4: no caption file 1.txt"), "{err}");
        assert!(lines[1].contains("2.txt: empty caption"), "{err}");
        assert!(lines[2].contains("3.txt: not valid UTF-8"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let err = FolderReader::default()
            .list_samples(empty.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no clips (.mp4, .mov"), "{err}");
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let mut r = FolderReader::default();
        for (params, expected) in [
            (
                r#"{"caption_column": "prompts.txt"}"#,
                "`caption_column` names a list file",
            ),
            (r#"{"extensions": []}"#, "`extensions` must list"),
            (r#"{"caption_extension": "mp4"}"#, "`caption_extension`"),
            (r#"{"extension": ["mp4"]}"#, "unknown field `extension`"),
        ] {
            let e = r.configure(params).unwrap_err().to_string();
            assert!(e.contains(expected), "{params}: {e}");
        }
        assert!(FolderReader::new(Config::default()).is_ok());
    }
}
