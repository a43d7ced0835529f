//! Checkpoints: `output_dir/checkpoint-<step>/` with the trainable weights, the optimizer state
//! and `trainer_state.json` (step, data position, RNG position, LR schedule, configs).
//!
//! A checkpoint is written into a hidden temporary folder (`.checkpoint-<step>.tmp-<pid>`),
//! every file fsynced, then the folder is renamed to `checkpoint-<step>` and the parent fsynced:
//! a crash at any point leaves either no `checkpoint-<step>` or a complete one, and the
//! previous checkpoints untouched. Only folders named `checkpoint-<step>` whose state file
//! parses are listed; temporary folders are ignored (and removed by [`remove_stale_temp_dirs`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::config::{TrainConfig, ValidationConfig};
use crate::schedule::LrSchedule;
use crate::TrainerError;
use cogvx_train::HostAdamState;

/// `trainer_state.json`'s format tag.
pub const CHECKPOINT_FORMAT: &str = "cogvx-checkpoint/1";
/// The trainable weights, by PEFT / diffusers parameter name (float32).
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// AdamW `exp_avg.<name>` / `exp_avg_sq.<name>`, per-parameter step counts in the metadata.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Everything else, written last.
pub const STATE_FILE: &str = "trainer_state.json";
/// The sha256 of each file of a checkpoint.
pub const CHECKSUMS_FILE: &str = "checksums.json";

/// Host tensors by name: `(shape, values)`.
pub type HostTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Host tensors as backend tensors on `device`; the error names a tensor that is not a vector or
/// a matrix.
pub fn tensors_from_host<B: burn::tensor::backend::Backend>(
    t: &HostTensors,
    device: &B::Device,
) -> Result<BTreeMap<String, cogvx_model_core::adapter::AdapterTensor<B>>, String> {
    t.iter()
        .map(|(k, (shape, data))| {
            cogvx_model_core::adapter::AdapterTensor::from_vec(shape, data.clone(), device)
                .map(|v| (k.clone(), v))
                .ok_or_else(|| format!("tensor `{k}` has shape {shape:?}, not a vector or matrix"))
        })
        .collect()
}

/// Where the data loader stands: the next micro-batch is batch `batch` (0-based) of `epoch`'s
/// micro-batches ([`crate::rng::epoch_batches`] of its [`crate::rng::epoch_order`]), counted the
/// same way whatever the number of processes (each takes one micro-batch per micro-step).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub batch: u64,
}

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    /// Optimizer updates done.
    pub step: u64,
    /// The step the run was set to reach.
    pub total_steps: u64,
    /// Samples in the cache the run trained on (the data order depends on it).
    pub num_samples: u64,
    pub data: DataPosition,
    /// The schedule; the next update runs at `lr_schedule.lr_at(learning_rate, step)`.
    pub lr_schedule: LrSchedule,
    /// The learning rate of the last update.
    pub last_lr: f64,
    /// Seconds spent training so far (for step timing across resumes).
    pub elapsed_s: f64,
    pub config: TrainConfig,
    pub validation: ValidationConfig,
    /// fp16's loss scaler after the last update (`mixed_precision = "fp16"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<cogvx_model_core::precision::LossScaler>,
    /// The whole resolved config of the run ([`crate::TrainJob::run_config`]: model, data and
    /// plugin tables besides `[train]` and `[validation]`), so that a resume can tell that the
    /// data, the model or a plugin changed. Absent in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_config: Option<serde_json::Value>,
    /// The number of processes that trained up to this step (1 in checkpoints of older versions).
    #[serde(default = "one")]
    pub world_size: u64,
    /// The run was resumed with another world size at some point: its steps are no longer one
    /// world size's function of the data position (that check is skipped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resized: bool,
}

fn one() -> u64 {
    1
}

impl Checkpoint {
    /// Checks what a resume reads from this checkpoint against the run it continues: the data
    /// position against the epoch's batches, the step against that position, finite times and
    /// learning rates, and one optimizer state of the weight's shape per trained tensor. A
    /// hand-edited or corrupted `trainer_state.json` is an error naming the field, not a panic
    /// or a silently different run.
    pub fn check_resumable(
        &self,
        dir: &Path,
        batches_per_epoch: u64,
        accumulation: u64,
    ) -> Result<(), TrainerError> {
        let s = &self.state;
        let state = dir.join(STATE_FILE);
        let bad = |message: String| {
            Err(TrainerError::Io {
                path: state.clone(),
                message: format!("{message}; resume from another checkpoint or start a new run"),
            })
        };
        let accumulation = accumulation.max(1);
        if s.data.batch >= batches_per_epoch {
            return bad(format!(
                "`data.batch` = {} but an epoch has {batches_per_epoch} batches",
                s.data.batch
            ));
        }
        if s.world_size == 0 {
            return bad("`world_size` = 0".into());
        }
        // Each update takes `accumulation` micro-steps of `world_size` batches (the last of an
        // epoch fewer).
        let window = accumulation.saturating_mul(s.world_size);
        let updates_per_epoch = batches_per_epoch.div_ceil(window);
        if s.resized {
            // Resumed with another world size: the steps were made at several window sizes,
            // between one update per epoch and one per batch.
            let most = s
                .data
                .epoch
                .saturating_add(1)
                .saturating_mul(batches_per_epoch);
            if s.step < s.data.epoch || s.step > most {
                return bad(format!(
                    "`step` = {} does not fit `data` (epoch {}, batch {})",
                    s.step, s.data.epoch, s.data.batch
                ));
            }
        } else {
            let expected = s
                .data
                .epoch
                .checked_mul(updates_per_epoch)
                .and_then(|e| e.checked_add(s.data.batch.div_ceil(window)));
            if s.data.batch % window != 0 || expected != Some(s.step) {
                return bad(format!(
                    "`step` = {} does not match `data` (epoch {}, batch {}) at {updates_per_epoch} updates per epoch",
                    s.step, s.data.epoch, s.data.batch
                ));
            }
        }
        for (key, v) in [("elapsed_s", s.elapsed_s), ("last_lr", s.last_lr)] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!(
                    "`{key}` = {v} is not a finite, non-negative number"
                ));
            }
        }
        for (name, st) in &self.optimizer {
            let Some((shape, _)) = self.weights.get(name) else {
                return bad(format!(
                    "optimizer state for `{name}`, which the checkpoint's weights do not hold"
                ));
            };
            let n: usize = shape.iter().product();
            if &st.shape != shape || st.exp_avg.len() != n || st.exp_avg_sq.len() != n {
                return bad(format!(
                    "optimizer state of `{name}` has shape {:?} ({} values), its weight {shape:?}",
                    st.shape,
                    st.exp_avg.len()
                ));
            }
            if st.step > s.step {
                return bad(format!(
                    "optimizer state of `{name}` counts {} updates, the run {}",
                    st.step, s.step
                ));
            }
        }
        for (name, (shape, values)) in &self.weights {
            if shape.iter().product::<usize>() != values.len() {
                return bad(format!(
                    "weight `{name}` has shape {shape:?} but {} values",
                    values.len()
                ));
            }
        }
        Ok(())
    }
}

/// A checkpoint in memory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub state: TrainerState,
    pub weights: HostTensors,
    pub optimizer: BTreeMap<String, HostAdamState>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// `checkpoint-<step>` → `step`.
pub fn checkpoint_step(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

/// The folder of step `step`'s checkpoint.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

fn fsync_dir(dir: &Path) -> Result<(), TrainerError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(dir, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainerError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// Writes `checkpoint` to `output_dir/checkpoint-<step>/` atomically (see the module docs);
/// `on_file(path)` is called after each file is written and synced (fault-injection tests use
/// it). An existing checkpoint of the same step is replaced. Returns the folder.
pub fn write_checkpoint(
    output_dir: &Path,
    checkpoint: &Checkpoint,
    on_file: Option<&dyn Fn(&Path)>,
) -> Result<PathBuf, TrainerError> {
    let step = checkpoint.state.step;
    let dest = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let notify = |p: &Path| {
        if let Some(f) = on_file {
            f(p)
        }
    };

    let weights = tmp.join(WEIGHTS_FILE);
    let meta = BTreeMap::from([("format".to_string(), CHECKPOINT_FORMAT.to_string())]);
    cogvx_io::write_safetensors_f32(&weights, &checkpoint.weights, &meta)
        .map_err(|e| io(&weights, e))?;
    notify(&weights);

    let optimizer = tmp.join(OPTIMIZER_FILE);
    let mut tensors = HostTensors::new();
    let mut steps = BTreeMap::new();
    for (name, s) in &checkpoint.optimizer {
        tensors.insert(
            format!("exp_avg.{name}"),
            (s.shape.clone(), s.exp_avg.clone()),
        );
        tensors.insert(
            format!("exp_avg_sq.{name}"),
            (s.shape.clone(), s.exp_avg_sq.clone()),
        );
        steps.insert(name.clone(), s.step);
    }
    let meta = BTreeMap::from([
        ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
        (
            "steps".to_string(),
            serde_json::to_string(&steps).expect("map of numbers"),
        ),
    ]);
    cogvx_io::write_safetensors_f32(&optimizer, &tensors, &meta).map_err(|e| io(&optimizer, e))?;
    notify(&optimizer);

    let state = tmp.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(&checkpoint.state).map_err(|e| io(&state, e))?;
    write_file(&state, &json)?;
    notify(&state);

    // A checksum per file: a flipped bit is found when the checkpoint is read, not only if it
    // happens to give a NaN.
    let mut sums = BTreeMap::new();
    for name in [WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        sums.insert(name.to_string(), file_sha256(&tmp.join(name))?);
    }
    let checksums = tmp.join(CHECKSUMS_FILE);
    write_file(
        &checksums,
        &serde_json::to_vec_pretty(&sums).expect("a map of strings"),
    )?;
    notify(&checksums);
    fsync_dir(&tmp)?;

    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
    fsync_dir(output_dir)?;
    Ok(dest)
}

fn read_tensors(path: &Path) -> Result<(HostTensors, BTreeMap<String, String>), TrainerError> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| io(path, format!("not a valid safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| io(path, format!("unreadable header: {e}")))?;
    let meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
        return Err(io(
            path,
            format!("not a cogvx checkpoint file (header `format` is not `{CHECKPOINT_FORMAT}`)"),
        ));
    }
    let mut out = HostTensors::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(io(
                path,
                format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok((out, meta))
}

/// Reads `trainer_state.json` of a checkpoint folder.
pub fn read_state(dir: &Path) -> Result<TrainerState, TrainerError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
    let state: TrainerState = serde_json::from_slice(&bytes)
        .map_err(|e| io(&path, format!("not a trainer state: {e}")))?;
    if state.format != CHECKPOINT_FORMAT {
        return Err(io(
            &path,
            format!(
                "format {:?}, this build reads {CHECKPOINT_FORMAT:?}",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// The sha256 (hex) of a file.
fn file_sha256(path: &Path) -> Result<String, TrainerError> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks every file listed in the folder's `checksums.json` (checkpoints written before
/// checksums existed have none and are read as they are).
fn verify_checksums(dir: &Path) -> Result<(), TrainerError> {
    let path = dir.join(CHECKSUMS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let sums: BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|e| io(&path, format!("not a checksum list: {e}")))?;
    for (name, want) in sums {
        if name.contains('/') || name.contains("..") {
            return Err(io(
                &path,
                format!("lists `{name}`, which is not a file of the checkpoint"),
            ));
        }
        let file = dir.join(&name);
        if file_sha256(&file)? != want {
            return Err(io(&file, "its checksum does not match the one written with it: the file was damaged after it was saved"));
        }
    }
    Ok(())
}

/// Reads a whole checkpoint folder, checking its files' checksums.
pub fn read_checkpoint(dir: &Path) -> Result<Checkpoint, TrainerError> {
    verify_checksums(dir)?;
    let state = read_state(dir)?;
    let (weights, _) = read_tensors(&dir.join(WEIGHTS_FILE))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let (mut tensors, meta) = read_tensors(&opt_path)?;
    let steps: BTreeMap<String, u64> = meta
        .get("steps")
        .ok_or_else(|| io(&opt_path, "no `steps` in the header"))
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| io(&opt_path, format!("header `steps`: {e}")))
        })?;
    let mut optimizer = BTreeMap::new();
    for (name, step) in steps {
        let (shape, exp_avg) = tensors
            .remove(&format!("exp_avg.{name}"))
            .ok_or_else(|| io(&opt_path, format!("no exp_avg.{name}")))?;
        let (shape2, exp_avg_sq) = tensors
            .remove(&format!("exp_avg_sq.{name}"))
            .ok_or_else(|| io(&opt_path, format!("no exp_avg_sq.{name}")))?;
        if shape != shape2 {
            return Err(io(
                &opt_path,
                format!(
                    "exp_avg.{name} {shape:?} and exp_avg_sq.{name} {shape2:?} differ in shape"
                ),
            ));
        }
        optimizer.insert(
            name,
            HostAdamState {
                step,
                shape,
                exp_avg,
                exp_avg_sq,
            },
        );
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(io(
            &opt_path,
            format!("tensor `{extra}` has no step count in the header"),
        ));
    }
    Ok(Checkpoint {
        state,
        weights,
        optimizer,
    })
}

/// The complete checkpoints under `output_dir` (a `checkpoint-<step>` folder whose state file
/// parses), oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainerError> {
    let rd = match std::fs::read_dir(output_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(output_dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = checkpoint_step(&name) else {
            continue;
        };
        let dir = entry.path();
        match read_state(&dir) {
            Ok(s) if s.step == step => out.push((step, dir)),
            Ok(s) => tracing::warn!(
                "{}: holds step {}, not {step}; ignored",
                dir.display(),
                s.step
            ),
            Err(e) => tracing::warn!("ignoring incomplete checkpoint: {e}"),
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>, TrainerError> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// Removes all but the newest `keep` complete checkpoints; returns the removed folders.
pub fn prune_checkpoints(output_dir: &Path, keep: usize) -> Result<Vec<PathBuf>, TrainerError> {
    let all = list_checkpoints(output_dir)?;
    let n = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (step, dir) in all.into_iter().take(n) {
        // Renamed first (atomic), then removed: a run killed while removing leaves a
        // `.checkpoint-<step>.pruning-<pid>` folder, removed at the next start, never a
        // half-deleted `checkpoint-<step>` that looks complete.
        let doomed = output_dir.join(format!(".checkpoint-{step}.pruning-{}", std::process::id()));
        std::fs::rename(&dir, &doomed).map_err(|e| io(&dir, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| io(&doomed, e))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// Removes temporary checkpoint folders left by an interrupted write or prune.
pub fn remove_stale_temp_dirs(output_dir: &Path) -> Result<Vec<PathBuf>, TrainerError> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(output_dir) else {
        return Ok(removed);
    };
    for entry in rd.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".checkpoint-")
            && (name.contains(".tmp-") || name.contains(".pruning-"))
            && entry.path().is_dir()
        {
            std::fs::remove_dir_all(entry.path()).map_err(|e| io(&entry.path(), e))?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::LrScheduler;

    fn sample(step: u64) -> Checkpoint {
        Checkpoint {
            state: TrainerState {
                format: CHECKPOINT_FORMAT.into(),
                step,
                total_steps: 10,
                num_samples: 5,
                data: DataPosition { epoch: 1, batch: 2 },
                lr_schedule: LrSchedule {
                    kind: LrScheduler::Linear,
                    num_warmup_steps: 2,
                    num_training_steps: 10,
                    num_cycles: 1,
                },
                last_lr: 1e-5,
                elapsed_s: 1.5,
                config: TrainConfig::default(),
                validation: ValidationConfig::default(),
                loss_scaler: None,
                run_config: Some(serde_json::json!({"data": {"resolution": "9x64x96"}})),
                world_size: 1,
                resized: false,
            },
            weights: BTreeMap::from([(
                "a.lora_A.weight".to_string(),
                (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]),
            )]),
            optimizer: BTreeMap::from([(
                "a.lora_A.weight".to_string(),
                HostAdamState {
                    step: 4,
                    shape: vec![2, 3],
                    exp_avg: vec![0.1; 6],
                    exp_avg_sq: vec![0.2; 6],
                },
            )]),
        }
    }

    #[test]
    fn write_read_list_prune() {
        let dir = tempfile::tempdir().unwrap();
        for s in [2, 4, 6] {
            write_checkpoint(dir.path(), &sample(s), None).unwrap();
        }
        let c = read_checkpoint(&checkpoint_dir(dir.path(), 4)).unwrap();
        assert_eq!(c.state, sample(4).state);
        assert_eq!(c.weights, sample(4).weights);
        assert_eq!(c.optimizer, sample(4).optimizer);
        // A temp folder and a folder without a state file are not checkpoints.
        std::fs::create_dir_all(dir.path().join(".checkpoint-8.tmp-1")).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoint-9")).unwrap();
        let steps: Vec<u64> = list_checkpoints(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [2, 4, 6]);
        assert_eq!(
            latest_checkpoint(dir.path()).unwrap().unwrap(),
            checkpoint_dir(dir.path(), 6)
        );
        let removed = prune_checkpoints(dir.path(), 2).unwrap();
        assert_eq!(removed, [checkpoint_dir(dir.path(), 2)]);
        assert!(!checkpoint_dir(dir.path(), 2).exists());
        // What a run killed while pruning leaves is not a checkpoint, and goes at the next start.
        let pruning = dir.path().join(".checkpoint-1.pruning-77");
        std::fs::create_dir_all(&pruning).unwrap();
        std::fs::write(pruning.join(STATE_FILE), b"{}").unwrap();
        assert_eq!(remove_stale_temp_dirs(dir.path()).unwrap().len(), 2);
        assert!(!pruning.exists());
        // A corrupt optimizer file is an error naming it.
        std::fs::write(checkpoint_dir(dir.path(), 6).join(OPTIMIZER_FILE), b"junk").unwrap();
        let e = read_checkpoint(&checkpoint_dir(dir.path(), 6))
            .unwrap_err()
            .to_string();
        assert!(e.contains(OPTIMIZER_FILE), "{e}");
    }
}
