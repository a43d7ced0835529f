//! The JSONL metrics log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::{MetricsError, TensorBoardLog};

/// One optimizer step, as logged by the trainer (one line `{"type":"step", ...}`).
///
/// Non-finite values (a diverged loss) are written as JSON `null` and read back as NaN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Global optimizer step, counted from 1 for the first completed step.
    pub step: u64,
    /// Epoch the step belongs to.
    pub epoch: u64,
    /// Training loss of the step (mean over the accumulated micro-batches).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Learning rate used for the step.
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Wall-clock seconds the step took.
    #[serde(deserialize_with = "nan_if_null")]
    pub step_time_s: f64,
    /// Training samples per second over the step.
    #[serde(deserialize_with = "nan_if_null")]
    pub samples_per_s: f64,
    /// The timestep each sample of the step was trained at, in the order the samples were
    /// drawn (a histogram of these shows the timestep distribution the run follows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timesteps: Vec<u32>,
    /// How many of the step's samples trained on the empty prompt (`caption_dropout`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_captions: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// serde_json writes non-finite floats as `null`; read them back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A step record with its `"type":"step"` tag first.
#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

/// An event: its tag, its step, then its own fields.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    step: u64,
    #[serde(flatten)]
    fields: &'a serde_json::Map<String, serde_json::Value>,
}

/// An append-only JSONL metrics file (one JSON object per line, each with a `"type"` and a
/// `"step"`). Each line is written with a single `write` and flushed, so a killed run leaves at
/// most its last line torn, which [`read_steps`] skips. Lines are not fsynced one by one.
///
/// With a [`TensorBoardLog`] attached ([`MetricsLog::with_tensorboard`]), every step record is
/// written to it as well.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    tensorboard: Option<TensorBoardLog>,
}

impl MetricsLog {
    /// Opens the log at `path` for a run (creating the parent folder and the file):
    ///
    /// * `resume_step: None` — a fresh run: an existing file is **truncated**, so the log holds
    ///   only this run's steps.
    /// * `resume_step: Some(s)` — a run resumed from the checkpoint of step `s`: the file is
    ///   first rewritten (temp file + rename, atomically) keeping only the records with
    ///   `step <= s` (those after the checkpoint were made by the interrupted run and will be
    ///   redone), dropping a torn last line; then new records are appended, so the file holds one
    ///   continuous curve. A missing file is created empty.
    ///
    /// Errors name the file: an unreadable or unwritable path, or (when resuming) a line that
    /// is not a metrics record.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self, MetricsError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| MetricsError::io("cannot create the folder of", path, e))?;
        }
        let file = match resume_step {
            None => OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|e| MetricsError::io("cannot create", path, e))?,
            Some(step) => {
                if path.exists() {
                    truncate_after(path, step)?;
                }
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| MetricsError::io("cannot open for appending", path, e))?
            }
        };
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            tensorboard: None,
        })
    }

    /// Mirrors every step record to `tensorboard` from now on.
    pub fn with_tensorboard(mut self, tensorboard: TensorBoardLog) -> Self {
        self.tensorboard = Some(tensorboard);
        self
    }

    /// The attached TensorBoard log, for what only it shows (validation frames).
    pub fn tensorboard(&mut self) -> Option<&mut TensorBoardLog> {
        self.tensorboard.as_mut()
    }

    /// The file this log writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one step record as `{"type":"step","step":..,"epoch":..,"loss":..,...}` (and
    /// writes it to the attached TensorBoard log).
    pub fn log(&mut self, r: &StepRecord) -> Result<(), MetricsError> {
        let line = serde_json::to_string(&Tagged {
            kind: "step",
            body: r,
        })
        .expect("a StepRecord always serialises");
        self.append(line)?;
        if let Some(tb) = &mut self.tensorboard {
            tb.log_step(r)?;
        }
        Ok(())
    }

    /// Appends one event `{"type": kind, "step": step, ...fields}`, e.g. validation metrics
    /// (`kind = "validation"`, `fields = {"prompt": .., "video": .., "video_metrics.flicker": ..}`).
    /// `fields` must be a JSON object (or `null` for none) without the keys `type` and `step`;
    /// `kind` must not be empty nor `"step"` (reserved for [`StepRecord`]s).
    pub fn log_event(
        &mut self,
        kind: &str,
        step: u64,
        fields: serde_json::Value,
    ) -> Result<(), MetricsError> {
        let bad = |message: String| MetricsError::Event {
            path: self.path.clone(),
            kind: kind.to_string(),
            message,
        };
        if kind.is_empty() || kind == "step" {
            return Err(bad(
                "the event type must be a non-empty name other than `step`".into(),
            ));
        }
        let fields = match fields {
            serde_json::Value::Object(map) => map,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                return Err(bad(format!(
                    "the fields must be a JSON object, got {other}"
                )))
            }
        };
        if let Some(key) = ["type", "step"]
            .into_iter()
            .find(|k| fields.contains_key(*k))
        {
            return Err(bad(format!(
                "the fields must not contain the key `{key}` (set by the log)"
            )));
        }
        let line = serde_json::to_string(&Event {
            kind,
            step,
            fields: &fields,
        })
        .expect("JSON values always serialise");
        self.append(line)
    }

    fn append(&mut self, mut line: String) -> Result<(), MetricsError> {
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| MetricsError::io("cannot append to", &self.path, e))?;
        self.file
            .flush()
            .map_err(|e| MetricsError::io("cannot append to", &self.path, e))
    }
}

/// One parsed line of a metrics file: its 1-based line number, text and JSON object.
struct Line<'a> {
    number: usize,
    text: &'a str,
    value: serde_json::Map<String, serde_json::Value>,
}

/// Parses every line of `text` (the contents of `path`) into a JSON object with a string
/// `"type"`. Blank lines are skipped; so is a last line that does not parse and has no final
/// newline (a write torn by a kill). Any other bad line is an error naming `path:line`.
fn parse_lines<'a>(path: &Path, text: &'a str) -> Result<Vec<Line<'a>>, MetricsError> {
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let count = text.lines().count();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<serde_json::Value>(line);
        let err = |message: String| MetricsError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        match parsed {
            Ok(serde_json::Value::Object(value)) => {
                if !matches!(value.get("type"), Some(serde_json::Value::String(_))) {
                    return Err(err("the record has no string field `type`".into()));
                }
                out.push(Line {
                    number: i + 1,
                    text: line,
                    value,
                });
            }
            Ok(_) => return Err(err("the line is not a JSON object".into())),
            Err(_) if torn_tail && i + 1 == count => {
                tracing::warn!(
                    "{}:{}: skipping a torn last line (an interrupted write)",
                    path.display(),
                    i + 1
                );
            }
            Err(e) => return Err(err(format!("invalid JSON: {e}"))),
        }
    }
    Ok(out)
}

fn read_text(path: &Path) -> Result<String, MetricsError> {
    let bytes = std::fs::read(path).map_err(|e| MetricsError::io("cannot read", path, e))?;
    // A torn multi-byte character at the very end is part of the torn line; elsewhere the
    // parser reports the line.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Reads the step records of a metrics file in file order, skipping events (other `type`s)
/// and a torn last line.
pub fn read_steps(path: &Path) -> Result<Vec<StepRecord>, MetricsError> {
    let text = read_text(path)?;
    let mut steps = Vec::new();
    for line in parse_lines(path, &text)? {
        if line.value.get("type").and_then(|t| t.as_str()) != Some("step") {
            continue;
        }
        let record = serde_json::from_value::<StepRecord>(serde_json::Value::Object(line.value))
            .map_err(|e| MetricsError::Parse {
                path: path.to_path_buf(),
                line: line.number,
                message: format!("bad step record: {e}"),
            })?;
        steps.push(record);
    }
    Ok(steps)
}

/// Rewrites `path` keeping the records with `step <= last_step` (verbatim), atomically.
fn truncate_after(path: &Path, last_step: u64) -> Result<(), MetricsError> {
    let text = read_text(path)?;
    let mut kept = String::with_capacity(text.len());
    for line in parse_lines(path, &text)? {
        let step = line
            .value
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| MetricsError::Parse {
                path: path.to_path_buf(),
                line: line.number,
                message: "the record has no unsigned integer field `step`".into(),
            })?;
        if step <= last_step {
            kept.push_str(line.text);
            kept.push('\n');
        }
    }
    write_atomically(path, kept.as_bytes())
}

/// Writes `bytes` to `path` atomically ([`cogvx_io::write_atomically`]), so a reader (or a
/// crash) sees either the old or the new file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), MetricsError> {
    cogvx_io::write_atomically(path, bytes).map_err(|e| MetricsError::io("cannot write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: f64) -> StepRecord {
        StepRecord {
            step,
            epoch: step / 10,
            loss,
            lr: 1e-4 * step as f64,
            grad_norm: 0.5 + step as f64,
            step_time_s: 1.25,
            samples_per_s: 3.2,
            timesteps: vec![999, 0],
            dropped_captions: 1,
        }
    }

    #[test]
    fn step_lines_are_tagged_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        log.log(&record(1, 0.5)).unwrap();
        log.log_event(
            "validation",
            1,
            serde_json::json!({"prompt": "a cat", "flicker": 0.25}),
        )
        .unwrap();
        log.log(&record(2, 0.25)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with(r#"{"type":"step","step":1,"epoch":0,"loss":0.5,"lr":0.0001"#),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with(r#"{"type":"validation","step":1,"#),
            "{}",
            lines[1]
        );
        let event: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(event["prompt"], "a cat");
        assert_eq!(event["flicker"], 0.25);
        assert_eq!(
            read_steps(&path).unwrap(),
            vec![record(1, 0.5), record(2, 0.25)]
        );
    }

    #[test]
    fn non_finite_values_read_back_as_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        log.log(&record(1, f64::NAN)).unwrap();
        log.log(&StepRecord {
            grad_norm: f64::INFINITY,
            ..record(2, 1.0)
        })
        .unwrap();
        let steps = read_steps(&path).unwrap();
        assert!(steps[0].loss.is_nan());
        assert!(steps[1].grad_norm.is_nan());
        assert_eq!(steps[1].loss, 1.0);
    }

    #[test]
    fn torn_last_line_is_skipped_but_a_bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for s in 1..=3 {
            log.log(&record(s, 1.0 / s as f64)).unwrap();
        }
        drop(log);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(r#"{"type":"step","step":4,"epoch":0,"lo"#);
        std::fs::write(&path, &text).unwrap();
        let steps = read_steps(&path).unwrap();
        assert_eq!(
            steps.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );

        // The same broken line followed by a newline and more records is corruption.
        text.push_str("\n{\"type\":\"step\",\"step\":5}\n");
        std::fs::write(&path, &text).unwrap();
        let e = read_steps(&path).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:4: invalid JSON"), "{e}");
        // A well-formed step line with a missing field names its line too.
        std::fs::write(&path, "{\"type\":\"step\",\"step\":5}\n").unwrap();
        let e = read_steps(&path).unwrap_err().to_string();
        assert!(
            e.contains("m.jsonl:1: bad step record: missing field `epoch`"),
            "{e}"
        );
        std::fs::write(&path, "[1,2]\n").unwrap();
        assert!(read_steps(&path)
            .unwrap_err()
            .to_string()
            .contains("m.jsonl:1: the line is not a JSON object"));
        let e = read_steps(&dir.path().join("absent.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read ") && e.contains("absent.jsonl"),
            "{e}"
        );
    }

    #[test]
    fn resume_keeps_records_up_to_the_checkpoint_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for s in 1..=6 {
            log.log(&record(s, 1.0 / s as f64)).unwrap();
            if s % 2 == 0 {
                log.log_event("validation", s, serde_json::json!({"sharpness": s}))
                    .unwrap();
            }
        }
        drop(log);
        // The interrupted run was killed mid-line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"type":"step","ste"#).unwrap();
        drop(f);

        let mut log = MetricsLog::open(&path, Some(4)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().count(),
            6,
            "steps 1-4 and the validations at 2 and 4:\n{text}"
        );
        assert!(
            text.ends_with("{\"type\":\"validation\",\"step\":4,\"sharpness\":4}\n"),
            "{text}"
        );
        for s in 5..=7 {
            log.log(&record(s, 0.01 * s as f64)).unwrap();
        }
        let steps = read_steps(&path).unwrap();
        assert_eq!(
            steps.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6, 7]
        );
        assert_eq!(steps[3], record(4, 0.25));
        assert_eq!(steps[4], record(5, 0.05));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m.jsonl")]);

        // Resuming with a missing file creates it; a fresh open truncates.
        let other = dir.path().join("new.jsonl");
        MetricsLog::open(&other, Some(10))
            .unwrap()
            .log(&record(11, 0.1))
            .unwrap();
        assert_eq!(read_steps(&other).unwrap().len(), 1);
        drop(MetricsLog::open(&path, None).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn resume_refuses_a_corrupt_file_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(
            &path,
            "{\"type\":\"step\",\"step\":1}\n{\"type\":\"note\"}\n",
        )
        .unwrap();
        let e = MetricsLog::open(&path, Some(1)).unwrap_err().to_string();
        assert!(
            e.contains("m.jsonl:2: the record has no unsigned integer field `step`"),
            "{e}"
        );
        std::fs::write(&path, "{\"step\":1}\n").unwrap();
        let e = MetricsLog::open(&path, Some(1)).unwrap_err().to_string();
        assert!(
            e.contains("m.jsonl:1: the record has no string field `type`"),
            "{e}"
        );
    }

    #[test]
    fn bad_events_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        let e = log
            .log_event("step", 1, serde_json::Value::Null)
            .unwrap_err()
            .to_string();
        assert!(e.contains("other than `step`"), "{e}");
        let e = log
            .log_event("validation", 1, serde_json::json!([1]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a JSON object, got [1]"), "{e}");
        let e = log
            .log_event("validation", 1, serde_json::json!({"step": 2}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must not contain the key `step`"), "{e}");
        log.log_event("checkpoint", 3, serde_json::Value::Null)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"type\":\"checkpoint\",\"step\":3}\n"
        );
    }

    #[test]
    fn unwritable_path_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let e = MetricsLog::open(&blocker.join("m.jsonl"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file/m.jsonl"), "{e}");
    }
}
