//! TensorBoard event files: what `tensorboard --logdir <output_dir>` shows of a run.
//!
//! The framing (TFRecord: length, CRCs) and TensorFlow's `Event`/`Summary` protobufs come from
//! the `tfrecord` crate; this module only decides what goes in: one scalar per step metric,
//! the step's timesteps as a histogram, validation scores as scalars and validation frames as
//! PNG images.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use image::RgbImage;
use tfrecord::protobuf::event::What;
use tfrecord::protobuf::session_log::SessionStatus;
use tfrecord::protobuf::summary::{value, Image, Value};
use tfrecord::protobuf::{Event, SessionLog, Summary};
use tfrecord::{EventIter, EventMeta, EventWriter, EventWriterConfig, RecordReaderConfig};

use crate::{MetricsError, StepRecord};

/// What every TensorBoard event file of ours has in its name (TensorBoard reads any file whose
/// name contains `tfevents`; the suffix marks the files cogvx may delete when a fresh run starts).
const FILE_PREFIX: &str = "events.out.tfevents.";
const FILE_SUFFIX: &str = ".cogvx";

/// An event file being written for one run (or one resumed segment of a run).
///
/// Each event is flushed as it is written, so `tensorboard` sees a live run, and a killed run
/// leaves at most its last record torn (TensorBoard stops reading there).
pub struct TensorBoardLog {
    path: PathBuf,
    writer: EventWriter<BufWriter<File>>,
}

impl std::fmt::Debug for TensorBoardLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorBoardLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TensorBoardLog {
    /// Starts a new event file `events.out.tfevents.<µs>.<host>.cogvx` in `dir` (created if
    /// missing), beginning with the `brain.Event:2` file-version record.
    ///
    /// * `resume_step: None` — a fresh run: the event files an earlier cogvx run left in `dir`
    ///   are deleted first (as the JSONL log is truncated), so TensorBoard shows this run alone.
    /// * `resume_step: Some(s)` — a run resumed from the checkpoint of step `s`: earlier files are
    ///   kept and the new one starts with a `SessionLog START` at step `s + 1`, which makes
    ///   TensorBoard drop what the interrupted run logged after its checkpoint (the steps that
    ///   are redone), so the curves continue without a fold.
    pub fn open(dir: &Path, resume_step: Option<u64>) -> Result<Self, MetricsError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| MetricsError::io("cannot create the TensorBoard folder", dir, e))?;
        if resume_step.is_none() {
            for old in event_files(dir)?
                .into_iter()
                .filter(|p| name_of(p).ends_with(FILE_SUFFIX))
            {
                std::fs::remove_file(&old)
                    .map_err(|e| MetricsError::io("cannot remove the old event file", &old, e))?;
            }
        }
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            .unwrap_or_else(|| "localhost".into());
        // Microseconds, zero-padded: TensorBoard reads a folder's files in name order, and a
        // resumed segment must come after the segment it continues, even within one second.
        let mut micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let (path, file) = loop {
            let path = dir.join(format!("{FILE_PREFIX}{micros:016}.{host}{FILE_SUFFIX}"));
            match File::create_new(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => micros += 1,
                Err(e) => return Err(MetricsError::io("cannot create", &path, e)),
            }
        };
        let writer =
            EventWriter::from_writer(BufWriter::new(file), EventWriterConfig { auto_flush: true })
                .map_err(|e| tb_error(&path, e))?;
        let mut log = TensorBoardLog { path, writer };
        log.write(
            EventMeta::with_step(0).build_empty_with(What::FileVersion("brain.Event:2".into())),
        )?;
        if let Some(step) = resume_step {
            log.write(
                EventMeta::with_step(step as i64 + 1).build_empty_with(What::SessionLog(
                    SessionLog {
                        status: SessionStatus::Start as i32,
                        checkpoint_path: String::new(),
                        msg: format!("resumed from the checkpoint of step {step}"),
                    },
                )),
            )?;
        }
        Ok(log)
    }

    /// The event file this log writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One optimizer step: `train/loss`, `train/lr`, `train/grad_norm`, `train/step_time_s`,
    /// `train/samples_per_s`, `train/dropped_captions` as scalars and `train/timesteps` as a
    /// histogram (when the step recorded them).
    pub fn log_step(&mut self, r: &StepRecord) -> Result<(), MetricsError> {
        for (tag, value) in [
            ("train/loss", r.loss),
            ("train/lr", r.lr),
            ("train/grad_norm", r.grad_norm),
            ("train/step_time_s", r.step_time_s),
            ("train/samples_per_s", r.samples_per_s),
            ("train/dropped_captions", r.dropped_captions as f64),
        ] {
            self.log_scalar(tag, r.step, value)?;
        }
        if !r.timesteps.is_empty() {
            let histogram = tfrecord::HistogramProto::try_from_iter(r.timesteps.iter().copied())
                .map_err(|e| tb_error(&self.path, e))?;
            let summary = Summary::from_histogram("train/timesteps", histogram)
                .map_err(|e| tb_error(&self.path, e))?;
            self.write(EventMeta::with_step(r.step as i64).build_with_summary(summary))?;
        }
        Ok(())
    }

    /// One scalar (TensorBoard stores it as f32; non-finite values are kept as such).
    pub fn log_scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<(), MetricsError> {
        let summary =
            Summary::from_scalar(tag, value as f32).map_err(|e| tb_error(&self.path, e))?;
        self.write(EventMeta::with_step(step as i64).build_with_summary(summary))
    }

    /// Every number of `fields` as the scalar `<prefix>/<key>` (other values are skipped):
    /// e.g. a validation event's scores.
    pub fn log_numbers(
        &mut self,
        prefix: &str,
        step: u64,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), MetricsError> {
        for (key, value) in fields {
            if let Some(x) = value.as_f64() {
                self.log_scalar(&format!("{prefix}/{key}"), step, x)?;
            }
        }
        Ok(())
    }

    /// An RGB image (PNG-encoded) under `tag`, shown in TensorBoard's Images tab with a step
    /// slider.
    pub fn log_image(&mut self, tag: &str, step: u64, img: &RgbImage) -> Result<(), MetricsError> {
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| MetricsError::TensorBoard {
                path: self.path.clone(),
                message: format!("cannot encode the image `{tag}` as PNG: {e}"),
            })?;
        let summary = Summary {
            value: vec![Value {
                node_name: String::new(),
                tag: tag.to_string(),
                metadata: None,
                value: Some(value::Value::Image(Image {
                    height: img.height() as i32,
                    width: img.width() as i32,
                    colorspace: 3,
                    encoded_image_string: png,
                })),
            }],
        };
        self.write(EventMeta::with_step(step as i64).build_with_summary(summary))
    }

    fn write(&mut self, event: Event) -> Result<(), MetricsError> {
        self.writer
            .write_event(event)
            .map_err(|e| tb_error(&self.path, e))
    }
}

/// Builds an event without a summary (file version, session log).
trait BuildWith {
    fn build_empty_with(&self, what: What) -> Event;
}

impl BuildWith for EventMeta {
    fn build_empty_with(&self, what: What) -> Event {
        Event {
            what: Some(what),
            ..self.build_empty()
        }
    }
}

fn tb_error(path: &Path, e: tfrecord::Error) -> MetricsError {
    MetricsError::TensorBoard {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The TensorBoard event files in `dir` (any writer's), in the order TensorBoard reads them.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>, MetricsError> {
    let entries = std::fs::read_dir(dir).map_err(|e| MetricsError::io("cannot list", dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| MetricsError::io("cannot list", dir, e))?
            .path();
        if path.is_file() && name_of(&path).contains("tfevents") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// One record of an event file, as [`read_events`] returns it.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorBoardRecord {
    /// The file-version record every event file starts with.
    FileVersion(String),
    /// A `SessionLog START` at `step`: TensorBoard drops the earlier files' records at `step`
    /// and after.
    Start { step: i64 },
    /// A scalar.
    Scalar { tag: String, step: i64, value: f32 },
    /// A histogram: how many values it holds and their sum.
    Histogram {
        tag: String,
        step: i64,
        count: f64,
        sum: f64,
    },
    /// An encoded image.
    Image {
        tag: String,
        step: i64,
        width: i32,
        height: i32,
        png: Vec<u8>,
    },
}

/// Reads back every record of the event files in `dir`, file after file in the order
/// TensorBoard reads them (for tests and tools; checksums are verified).
pub fn read_events(dir: &Path) -> Result<Vec<TensorBoardRecord>, MetricsError> {
    let mut out = Vec::new();
    for path in event_files(dir)? {
        let events = EventIter::open(&path, RecordReaderConfig::default())
            .map_err(|e| tb_error(&path, e))?;
        for event in events {
            let event = event.map_err(|e| tb_error(&path, e))?;
            let step = event.step;
            match event.what {
                Some(What::FileVersion(v)) => out.push(TensorBoardRecord::FileVersion(v)),
                Some(What::SessionLog(s)) if s.status == SessionStatus::Start as i32 => {
                    out.push(TensorBoardRecord::Start { step })
                }
                Some(What::Summary(summary)) => {
                    for v in summary.value {
                        let tag = v.tag;
                        match v.value {
                            Some(value::Value::SimpleValue(value)) => {
                                out.push(TensorBoardRecord::Scalar { tag, step, value })
                            }
                            Some(value::Value::Histo(h)) => {
                                out.push(TensorBoardRecord::Histogram {
                                    tag,
                                    step,
                                    count: h.num,
                                    sum: h.sum,
                                })
                            }
                            Some(value::Value::Image(img)) => out.push(TensorBoardRecord::Image {
                                tag,
                                step,
                                width: img.width,
                                height: img.height,
                                png: img.encoded_image_string,
                            }),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// What TensorBoard shows for a scalar `tag` after reading `records` in order: `(step, value)`
/// pairs, where a `Start` at step `s` first drops the pairs with step `>= s` (its
/// purge-orphaned-data rule for a restarted run).
pub fn scalar_series(records: &[TensorBoardRecord], tag: &str) -> Vec<(i64, f32)> {
    let mut series: Vec<(i64, f32)> = Vec::new();
    for r in records {
        match r {
            TensorBoardRecord::Start { step } => series.retain(|(s, _)| s < step),
            TensorBoardRecord::Scalar {
                tag: t,
                step,
                value,
            } if t == tag => series.push((*step, *value)),
            _ => {}
        }
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: f64) -> StepRecord {
        StepRecord {
            step,
            epoch: 0,
            loss,
            lr: 1e-4,
            grad_norm: 0.5,
            step_time_s: 1.0,
            samples_per_s: 2.0,
            timesteps: vec![10, 500, 990],
            dropped_captions: 1,
        }
    }

    #[test]
    fn steps_scalars_histogram_and_images_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoardLog::open(dir.path(), None).unwrap();
        for step in 1..=3 {
            tb.log_step(&record(step, 1.0 / step as f64)).unwrap();
        }
        let img = RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        tb.log_image("validation/0", 3, &img).unwrap();
        let mut fields = serde_json::Map::new();
        fields.insert("prompt".into(), "a cat".into());
        fields.insert("video_metrics.flicker".into(), 0.25.into());
        tb.log_numbers("validation/0", 3, &fields).unwrap();
        drop(tb);

        let records = read_events(dir.path()).unwrap();
        assert_eq!(
            records[0],
            TensorBoardRecord::FileVersion("brain.Event:2".into())
        );
        assert_eq!(
            scalar_series(&records, "train/loss"),
            vec![(1, 1.0), (2, 0.5), (3, 1.0 / 3.0)]
        );
        assert_eq!(
            scalar_series(&records, "train/dropped_captions"),
            vec![(1, 1.0), (2, 1.0), (3, 1.0)]
        );
        assert_eq!(
            scalar_series(&records, "validation/0/video_metrics.flicker"),
            vec![(3, 0.25)]
        );
        assert!(scalar_series(&records, "validation/0/prompt").is_empty());
        let histograms: Vec<_> = records
            .iter()
            .filter_map(|r| match r {
                TensorBoardRecord::Histogram { count, sum, .. } => Some((*count, *sum)),
                _ => None,
            })
            .collect();
        assert_eq!(histograms, vec![(3.0, 1500.0); 3]);
        let png = records
            .iter()
            .find_map(|r| match r {
                TensorBoardRecord::Image {
                    tag,
                    step: 3,
                    width: 6,
                    height: 4,
                    png,
                } if tag == "validation/0" => Some(png.clone()),
                _ => None,
            })
            .expect("the image record");
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded, img);
    }

    #[test]
    fn a_resumed_run_purges_the_redone_steps_and_a_fresh_run_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoardLog::open(dir.path(), None).unwrap();
        for step in 1..=5 {
            tb.log_step(&record(step, step as f64)).unwrap();
        }
        drop(tb);
        // Resume from the checkpoint of step 3: steps 4 and 5 are redone with other losses.
        let mut tb = TensorBoardLog::open(dir.path(), Some(3)).unwrap();
        for step in 4..=6 {
            tb.log_step(&record(step, 10.0 * step as f64)).unwrap();
        }
        drop(tb);
        assert_eq!(event_files(dir.path()).unwrap().len(), 2);
        let records = read_events(dir.path()).unwrap();
        assert!(records.contains(&TensorBoardRecord::Start { step: 4 }));
        assert_eq!(
            scalar_series(&records, "train/loss"),
            vec![
                (1, 1.0),
                (2, 2.0),
                (3, 3.0),
                (4, 40.0),
                (5, 50.0),
                (6, 60.0)
            ]
        );

        // Another writer's file is left alone; ours are replaced by the fresh run's.
        std::fs::write(dir.path().join("events.out.tfevents.1.other"), b"").unwrap();
        let mut tb = TensorBoardLog::open(dir.path(), None).unwrap();
        tb.log_step(&record(1, 7.0)).unwrap();
        let files = event_files(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files.contains(&tb.path().to_path_buf()));
        drop(tb);
        std::fs::remove_file(dir.path().join("events.out.tfevents.1.other")).unwrap();
        let records = read_events(dir.path()).unwrap();
        assert_eq!(scalar_series(&records, "train/loss"), vec![(1, 7.0)]);
    }

    #[test]
    fn an_unwritable_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = TensorBoardLog::open(&blocker.join("tb"), None).unwrap_err();
        assert!(err.to_string().contains("file/tb"), "{err}");
    }
}
