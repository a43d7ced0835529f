//! # cogvx-metrics
//!
//! What a training run reports about itself:
//!
//! * [`MetricsLog`]: a JSONL file with one [`StepRecord`] per optimizer step
//!   (`{"type":"step","step":..,"loss":..,...}`) and free-form events such as validation metrics
//!   (`{"type":"validation","step":..,...}`); [`read_steps`] reads the steps back, tolerating a
//!   line torn by a kill. Opening the log for a resumed run cuts it back to the checkpoint's
//!   step, so the file holds one clean loss curve.
//! * [`plot_loss_curve`]: the loss curve as a PNG (raw loss, faint, and its EMA), rendered
//!   with `plotters` and an embedded font, so it works on a machine with no system fonts.
//! * [`TensorBoardLog`]: the same steps, validation scores and validation frames as
//!   TensorBoard event files (`tensorboard --logdir <output_dir>`); [`read_events`] reads them
//!   back.
//! * [`TrainProgress`]: a progress bar with step/total, ETA, loss and learning rate.
//!
//! ```
//! use cogvx_metrics::{plot_loss_curve, read_steps, MetricsLog, StepRecord, TrainProgress};
//! # fn main() -> Result<(), cogvx_metrics::MetricsError> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let dir = tmp.path();
//! let mut log = MetricsLog::open(&dir.join("metrics.jsonl"), None)?;
//! let bar = TrainProgress::new(100, 0, true);
//! for step in 1..=3 {
//!     let loss = 0.2 / step as f64;
//!     log.log(&StepRecord { step, epoch: 0, loss, lr: 2e-5, grad_norm: 0.8, step_time_s: 1.4, samples_per_s: 0.7, timesteps: vec![], dropped_captions: 0 })?;
//!     bar.update(step, loss, 2e-5);
//! }
//! log.log_event("validation", 3, serde_json::json!({"video_metrics.flicker_luma": 0.01}))?;
//! plot_loss_curve(&dir.join("metrics.jsonl"), &dir.join("loss.png"))?;
//! bar.finish();
//! assert_eq!(read_steps(&dir.join("metrics.jsonl"))?.len(), 3);
//! # Ok(()) }
//! ```

pub mod console;
mod log;
mod plot;
mod progress;
mod tensorboard;

use std::path::PathBuf;

pub use log::{read_steps, MetricsLog, StepRecord};
pub use plot::{plot_loss_curve, PLOT_HEIGHT, PLOT_WIDTH};
pub use progress::TrainProgress;
pub use tensorboard::{event_files, read_events, scalar_series, TensorBoardLog, TensorBoardRecord};

/// What went wrong with a metrics file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Reading, writing or renaming a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot append to".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line of a JSONL metrics file is not a metrics record (not the torn last line of a
    /// killed run, which is skipped).
    #[error("{path}:{line}: {message}; fix or delete that line (the file is a cogvx metrics log, one JSON object per line)")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// [`MetricsLog::log_event`] was given something that cannot be logged.
    #[error("cannot log event `{kind}` to {path}: {message}")]
    Event {
        path: PathBuf,
        kind: String,
        message: String,
    },
    /// The metrics file holds no step with a finite loss, so there is no curve to draw.
    #[error("{path} has no step record with a finite loss; nothing to plot")]
    NoSteps { path: PathBuf },
    /// Writing or reading a TensorBoard event file failed.
    #[error("TensorBoard event file {path}: {message}")]
    TensorBoard { path: PathBuf, message: String },
    /// Rendering or encoding the plot failed.
    #[error("cannot draw the loss curve {path}: {message}")]
    Plot { path: PathBuf, message: String },
}

impl MetricsError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        MetricsError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
