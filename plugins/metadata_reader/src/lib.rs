//! # `metadata_reader` — a CSV, JSON or JSONL file listing each clip and its caption
//!
//! A dataset-reader plugin for metadata files as finetrainers and Hugging Face's `videofolder`
//! write them: one record per clip with a caption column and a clip-path column (paths relative
//! to the dataset root), optionally a conditioning-image column.
//!
//! ```text
//! <root>/metadata.csv     caption,video            (a header row, then one row per clip)
//! <root>/metadata.jsonl   {"caption": "...", "video": "clips/a.mp4"}   (one object per line)
//! <root>/metadata.json    [{"caption": "...", "video": "clips/a.mp4"}, ...]
//! ```
//!
//! ## Configuration (`[plugin.metadata_reader]`, or the `[data]` keys of the same names)
//!
//! ```toml
//! [data]
//! reader = "metadata_reader"
//! caption_column = "caption"   # default: the first of caption, prompt, text the file has
//! video_column = "video"       # default: the first of video, file_name, video_path, path
//! image_column = "image"       # optional: image-to-video conditioning images
//!
//! [plugin.metadata_reader]
//! file = "metadata.csv"        # default: the first of metadata.csv, metadata.jsonl, metadata.json
//! ```
//!
//! Every problem is reported at once, naming the file, the row (CSV and JSONL: the line; JSON:
//! the entry, counted from 1) and the column: a missing column, an empty caption or path, a path
//! that is absolute or climbs out of the root, a row that is not an object. Unknown keys are
//! rejected by name.

use std::path::{Component, Path};

use cogvx_plugin_api::{Plugin, PluginError, PluginInfo, PluginKind, PluginResult, Sample};
use serde::Deserialize;

/// The plugin's name (its crate folder); a loaded plugin of this name replaces the built-in.
pub const NAME: &str = "metadata_reader";

/// The files looked for in the root when `file` is not set, in this order.
pub const DEFAULT_FILES: [&str; 3] = ["metadata.csv", "metadata.jsonl", "metadata.json"];
const CAPTION_COLUMNS: [&str; 3] = ["caption", "prompt", "text"];
const VIDEO_COLUMNS: [&str; 4] = ["video", "file_name", "video_path", "path"];

/// The `[plugin.metadata_reader]` table (the column keys may come from `[data]`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The metadata file, relative to the root; its extension picks the format.
    #[serde(default)]
    pub file: Option<String>,
    /// The caption column (default: the first of `caption`, `prompt`, `text`).
    #[serde(default)]
    pub caption_column: Option<String>,
    /// The clip-path column (default: the first of `video`, `file_name`, `video_path`, `path`).
    #[serde(default)]
    pub video_column: Option<String>,
    /// The conditioning-image column (image-to-video); none unless named.
    #[serde(default)]
    pub image_column: Option<String>,
}

fn invalid(msg: String) -> PluginError {
    PluginError::Invalid(format!("{NAME}: {msg}"))
}

/// The `metadata_reader` plugin.
#[derive(Clone, Debug, Default)]
pub struct MetadataReader {
    config: Config,
}

impl MetadataReader {
    /// A reader with `config`.
    pub fn new(config: Config) -> Self {
        MetadataReader { config }
    }
}

/// One record of the file: where it is (`file:N`) and its fields as text.
struct Record {
    origin: String,
    fields: Vec<(String, String)>,
}

fn field_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn object_fields(
    v: serde_json::Value,
    origin: &str,
    problems: &mut Vec<String>,
) -> Option<Vec<(String, String)>> {
    match v {
        serde_json::Value::Object(map) => Some(
            map.iter()
                .map(|(k, v)| (k.clone(), field_text(v)))
                .collect(),
        ),
        other => {
            let kind = match other {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            };
            problems.push(format!(
                "{origin}: the entry is {kind}, not an object with the columns"
            ));
            None
        }
    }
}

fn read_records(name: &str, text: &str, problems: &mut Vec<String>) -> Vec<Record> {
    let text = text.trim_start_matches('\u{feff}');
    let lower = name.to_ascii_lowercase();
    let mut records = Vec::new();
    if lower.ends_with(".csv") {
        let mut reader = csv::ReaderBuilder::new()
            .flexible(false)
            .from_reader(text.as_bytes());
        let header: Vec<String> = match reader.headers() {
            Ok(h) => h.iter().map(|c| c.trim().to_string()).collect(),
            Err(e) => {
                problems.push(format!("{name}:1: cannot read the header row: {e}"));
                return records;
            }
        };
        for row in reader.records() {
            match row {
                Ok(row) => {
                    let line = row.position().map_or(0, |p| p.line());
                    records.push(Record {
                        origin: format!("{name}:{line}"),
                        fields: header
                            .iter()
                            .cloned()
                            .zip(row.iter().map(str::to_string))
                            .collect(),
                    });
                }
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line());
                    problems.push(format!("{name}:{line}: {e}"));
                }
            }
        }
    } else if lower.ends_with(".jsonl") {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let origin = format!("{name}:{}", i + 1);
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) => {
                    if let Some(fields) = object_fields(v, &origin, problems) {
                        records.push(Record { origin, fields });
                    }
                }
                Err(e) => problems.push(format!("{origin}: invalid JSON: {e}")),
            }
        }
    } else if lower.ends_with(".json") {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Array(items)) => {
                for (i, v) in items.into_iter().enumerate() {
                    let origin = format!("{name}:{}", i + 1);
                    if let Some(fields) = object_fields(v, &origin, problems) {
                        records.push(Record { origin, fields });
                    }
                }
            }
            Ok(_) => problems.push(format!(
                "{name}: the file must hold a JSON array of objects, one per clip"
            )),
            Err(e) => problems.push(format!("{name}: invalid JSON: {e}")),
        }
    } else {
        problems.push(format!(
            "{name}: unknown metadata format; use a .csv, .jsonl or .json file"
        ));
    }
    records
}

/// The column to read: the configured one, else the first candidate some record has.
fn pick_column(
    configured: &Option<String>,
    candidates: &[&str],
    records: &[Record],
) -> Option<String> {
    if let Some(c) = configured {
        return Some(c.clone());
    }
    candidates
        .iter()
        .find(|c| {
            records
                .iter()
                .any(|r| r.fields.iter().any(|(k, _)| k == *c))
        })
        .map(|c| c.to_string())
}

/// A path from the file: relative and inside the root.
fn check_path(rel: &str) -> Result<(), String> {
    let p = Path::new(rel);
    if p.is_absolute() || rel.starts_with('/') || rel.starts_with('\\') {
        return Err(format!(
            "path `{rel}` is absolute; paths must be relative to the dataset root"
        ));
    }
    let mut depth = 0i32;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            _ => depth = -1,
        }
        if depth < 0 {
            return Err(format!("path `{rel}` leaves the dataset root"));
        }
    }
    Ok(())
}

impl Plugin for MetadataReader {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: vec![PluginKind::DatasetReader],
            description: "CSV, JSON or JSONL metadata: a caption and a clip path per record".into(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        let config: Config = cogvx_plugin_api::parse_params(NAME, params_json)?;
        for (key, value) in [
            ("file", &config.file),
            ("caption_column", &config.caption_column),
            ("video_column", &config.video_column),
            ("image_column", &config.image_column),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(format!(
                    "`{key}` is empty; name it or leave it out"
                )));
            }
        }
        self.config = config;
        Ok(())
    }

    /// Lists the records' clips and captions; fails with every problem, one per line.
    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        let root = Path::new(root);
        let name = match &self.config.file {
            Some(f) => {
                check_path(f).map_err(|e| invalid(format!("`file`: {e}")))?;
                f.clone()
            }
            None => DEFAULT_FILES
                .iter()
                .find(|f| root.join(f).is_file())
                .map(|f| f.to_string())
                .ok_or_else(|| {
                    invalid(format!(
                        "no {} in the dataset root {}; add one or name it with [plugin.{NAME}] file",
                        DEFAULT_FILES.join(", "),
                        root.display()
                    ))
                })?,
        };
        let bytes = std::fs::read(root.join(&name))
            .map_err(|e| invalid(format!("{name}: cannot read: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| invalid(format!("{name}: not valid UTF-8; save the file as UTF-8")))?;
        let mut problems = Vec::new();
        let records = read_records(&name, &text, &mut problems);
        let caption_col = pick_column(&self.config.caption_column, &CAPTION_COLUMNS, &records);
        let video_col = pick_column(&self.config.video_column, &VIDEO_COLUMNS, &records);
        let (Some(caption_col), Some(video_col)) = (caption_col, video_col) else {
            if problems.is_empty() {
                problems.push(format!(
                    "{name}: no caption column ({}) or no clip column ({}); name them with `caption_column` and `video_column`",
                    CAPTION_COLUMNS.join(", "),
                    VIDEO_COLUMNS.join(", ")
                ));
            }
            return Err(invalid(problems.join("\n")));
        };
        let mut samples = Vec::new();
        for r in records {
            let get = |col: &str| {
                r.fields
                    .iter()
                    .find(|(k, _)| k == col)
                    .map(|(_, v)| v.trim())
            };
            let mut value = |col: &str, what: &str, path: bool| -> Option<String> {
                match get(col) {
                    None => {
                        problems.push(format!("{}: no column `{col}`", r.origin));
                        None
                    }
                    Some("") => {
                        problems.push(format!("{}: column `{col}`: empty {what}", r.origin));
                        None
                    }
                    Some(v) => match path.then(|| check_path(v)) {
                        Some(Err(e)) => {
                            problems.push(format!("{}: column `{col}`: {e}", r.origin));
                            None
                        }
                        _ => Some(v.to_string()),
                    },
                }
            };
            let caption = value(&caption_col, "caption", false);
            let video = value(&video_col, "path", true);
            let image = match &self.config.image_column {
                Some(col) => value(col, "path", true).map(Some),
                None => Some(None),
            };
            if let (Some(caption), Some(video), Some(image)) = (caption, video, image) {
                samples.push(Sample {
                    caption,
                    video,
                    image,
                    frames: None,
                    origin: r.origin.clone(),
                });
            }
        }
        if samples.is_empty() && problems.is_empty() {
            problems.push(format!("{name}: lists no clips"));
        }
        if problems.is_empty() {
            Ok(samples)
        } else {
            Err(invalid(problems.join("\n")))
        }
    }
}

cogvx_plugin_api::export_plugin!(MetadataReader);

#[cfg(test)]
mod tests {
    use super::*;

    fn list(files: &[(&str, &str)], params: &str) -> Result<Vec<Sample>, String> {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        let mut r = MetadataReader::default();
        r.configure(params).map_err(|e| e.to_string())?;
        r.list_samples(d.path().to_str().unwrap())
            .map_err(|e| e.to_string())
    }

    fn triples(samples: &[Sample]) -> Vec<(String, String, String)> {
        samples
            .iter()
            .map(|s| (s.caption.clone(), s.video.clone(), s.origin.clone()))
            .collect()
    }

    #[test]
    fn csv_jsonl_and_json_give_the_same_samples() {
        let csv = "caption,video\n\"a cat, sleeping\",clips/a.mp4\n\"two\nlines\",clips/b.mp4\n";
        let jsonl = "{\"caption\":\"a cat, sleeping\",\"video\":\"clips/a.mp4\"}\n\n{\"caption\":\"two\\nlines\",\"video\":\"clips/b.mp4\"}\n";
        let json = "[{\"caption\":\"a cat, sleeping\",\"video\":\"clips/a.mp4\"},{\"caption\":\"two\\nlines\",\"video\":\"clips/b.mp4\"}]";
        let a = list(&[("metadata.csv", csv)], "{}").unwrap();
        let b = list(&[("metadata.jsonl", jsonl)], "{}").unwrap();
        let c = list(&[("metadata.json", json)], "{}").unwrap();
        let strip = |s: &[Sample]| -> Vec<(String, String)> {
            s.iter()
                .map(|s| (s.caption.clone(), s.video.clone()))
                .collect()
        };
        assert_eq!(strip(&a), strip(&b));
        assert_eq!(strip(&a), strip(&c));
        assert_eq!(
            triples(&a).iter().map(|t| t.2.as_str()).collect::<Vec<_>>(),
            ["metadata.csv:2", "metadata.csv:3"]
        );
        assert_eq!(
            triples(&b).iter().map(|t| t.2.as_str()).collect::<Vec<_>>(),
            ["metadata.jsonl:1", "metadata.jsonl:3"]
        );
        assert_eq!(c[1].origin, "metadata.json:2");
    }

    #[test]
    fn columns_are_named_or_found() {
        // Hugging Face videofolder's names are found without configuration.
        let s = list(
            &[(
                "metadata.jsonl",
                "{\"file_name\":\"a.mp4\",\"text\":\"hi\",\"n\":3}\n",
            )],
            "{}",
        )
        .unwrap();
        assert_eq!(
            triples(&s),
            [("hi".into(), "a.mp4".into(), "metadata.jsonl:1".into())]
        );
        // Named columns, an image column, another file name.
        let s = list(
            &[("clips.csv", "desc,clip,first\nx,v/1.mp4,i/1.png\n")],
            r#"{"file":"clips.csv","caption_column":"desc","video_column":"clip","image_column":"first"}"#,
        )
        .unwrap();
        assert_eq!(
            (
                s[0].caption.as_str(),
                s[0].video.as_str(),
                s[0].image.as_deref()
            ),
            ("x", "v/1.mp4", Some("i/1.png"))
        );
    }

    #[test]
    fn every_problem_names_file_row_and_column() {
        let csv = "caption,video\n,a.mp4\nok,../b.mp4\nok,/c.mp4\nok,\nfine,d.mp4\n";
        let e = list(&[("metadata.csv", csv)], "{}").unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(
            lines[0].contains("metadata.csv:2: column `caption`: empty caption"),
            "{e}"
        );
        assert!(
            lines[1].contains(
                "metadata.csv:3: column `video`: path `../b.mp4` leaves the dataset root"
            ),
            "{e}"
        );
        assert!(
            lines[2].contains("metadata.csv:4: column `video`: path `/c.mp4` is absolute"),
            "{e}"
        );
        assert!(
            lines[3].contains("metadata.csv:5: column `video`: empty path"),
            "{e}"
        );

        let jsonl = "{\"caption\":\"a\",\"video\":\"a.mp4\"}\n[1]\n{\"caption\":\"b\"}\nnot json\n";
        let e = list(&[("metadata.jsonl", jsonl)], "{}").unwrap_err();
        assert!(e.contains("metadata.jsonl:2: the entry is an array"), "{e}");
        assert!(e.contains("metadata.jsonl:3: no column `video`"), "{e}");
        assert!(e.contains("metadata.jsonl:4: invalid JSON"), "{e}");

        let e = list(&[("metadata.csv", "caption,video\na,b.mp4,extra\n")], "{}").unwrap_err();
        assert!(e.contains("metadata.csv:2:"), "{e}");
        let e = list(&[("metadata.csv", "name,clip\na,b.mp4\n")], "{}").unwrap_err();
        assert!(
            e.contains("no caption column (caption, prompt, text)"),
            "{e}"
        );
        let e = list(
            &[("metadata.csv", "caption,video\na,b.mp4\n")],
            r#"{"caption_column":"desc"}"#,
        )
        .unwrap_err();
        assert!(e.contains("metadata.csv:2: no column `desc`"), "{e}");
        let e = list(&[], "{}").unwrap_err();
        assert!(
            e.contains("no metadata.csv, metadata.jsonl, metadata.json"),
            "{e}"
        );
        let e = list(&[("m.txt", "x")], r#"{"file":"m.txt"}"#).unwrap_err();
        assert!(e.contains("unknown metadata format"), "{e}");
        let e = list(&[], r#"{"file":"../m.csv"}"#).unwrap_err();
        assert!(e.contains("`file`: path `../m.csv` leaves"), "{e}");
        let e = list(&[], r#"{"files":"m.csv"}"#).unwrap_err();
        assert!(e.contains("unknown field `files`"), "{e}");
        let e = list(&[], r#"{"video_column":" "}"#).unwrap_err();
        assert!(e.contains("`video_column` is empty"), "{e}");
    }
}
