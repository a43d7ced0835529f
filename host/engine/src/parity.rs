//! The parity runner behind `cogvx parity DIR`: runs every case file of a folder (format in
//! `shared/reference/README.md`) through the component crates and compares each output with
//! diffusers' (rel L2 for floats, exact equality for integers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use cogvx_model_core::case::{rel_l2, Case, HostData, HostTensor, Tolerance};
use cogvx_model_core::{CpuBackend, CpuDevice};

use crate::EngineError;

/// The outcome of one output (or of a whole case when it could not run).
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Within tolerance.
    Ok,
    /// Out of tolerance, wrong shape, missing, or the case failed to run (the reason).
    Fail(String),
    /// Deliberately not run (the reason); does not count as passed or failed.
    Skipped(String),
    /// The component has no implementation yet (the reason); reported, not passed.
    NotImplemented(String),
}

impl Status {
    /// Whether this row makes the run fail.
    pub fn is_failure(&self) -> bool {
        matches!(self, Status::Fail(_))
    }

    /// Whether this row is skipped (not run, neither passed nor failed).
    pub fn is_skipped(&self) -> bool {
        matches!(self, Status::Skipped(_) | Status::NotImplemented(_))
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Ok => f.write_str("ok"),
            Status::Fail(r) => write!(f, "FAIL: {r}"),
            Status::Skipped(r) => write!(f, "skipped: {r}"),
            Status::NotImplemented(r) => write!(f, "not implemented: {r}"),
        }
    }
}

/// One line of the parity table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Case file stem, e.g. `cogvideox-2b.transformer.0`.
    pub case: String,
    pub component: String,
    /// Output name (without `out.`); `-` for a row about the whole case.
    pub output: String,
    /// `None` when not computed.
    pub rel_l2: Option<f64>,
    pub tolerance: Option<Tolerance>,
    pub status: Status,
    /// Wall time of the whole case, on every row of the case.
    pub seconds: f64,
}

/// Output name (without `out.`) -> computed tensor.
pub type CaseOutputs = BTreeMap<String, HostTensor>;

/// Runs one case's component and returns output name -> computed tensor.
pub type CaseFn<B> =
    Box<dyn Fn(&Case, &burn::tensor::Device<B>) -> Result<CaseOutputs, String> + Send + Sync>;

/// What the runner does with a component.
enum Handler<B: Backend> {
    Run(CaseFn<B>),
    NotImplemented(String),
}

/// Dispatches cases by component. [`ParityRunner::new`] registers every component of the
/// reference set; [`ParityRunner::with_component`] adds or replaces one (the trainer registers
/// `train_step_lora` this way).
pub struct ParityRunner<B: Backend> {
    device: B::Device,
    handlers: BTreeMap<String, Handler<B>>,
}

fn run<B: Backend, E: std::fmt::Display + 'static>(
    f: fn(&Case, &B::Device) -> Result<CaseOutputs, E>,
) -> Handler<B> {
    Handler::Run(Box::new(move |case, device| {
        f(case, device).map_err(|e| e.to_string())
    }))
}

impl<B: cogvx_model_core::ModelBackend> ParityRunner<B> {
    /// A runner with `transformer`, `vae_encode`, `vae_decode`, `text_encoder`,
    /// `scheduler_train`, `scheduler_ddim`, `scheduler_dpm` and `pipeline_t2v`;
    /// `train_step_lora` is reported as not implemented.
    pub fn new(device: B::Device) -> Self {
        let mut handlers: BTreeMap<String, Handler<B>> = BTreeMap::new();
        handlers.insert(
            "transformer".into(),
            run::<B, _>(cogvx_transformer::run_case::<B>),
        );
        handlers.insert("vae_encode".into(), run::<B, _>(cogvx_vae::run_case::<B>));
        handlers.insert("vae_decode".into(), run::<B, _>(cogvx_vae::run_case::<B>));
        handlers.insert(
            "text_encoder".into(),
            run::<B, _>(cogvx_text::run_case::<B>),
        );
        for c in cogvx_scheduler::CASE_COMPONENTS {
            handlers.insert(c.into(), run::<B, _>(cogvx_scheduler::run_case::<B>));
        }
        handlers.insert(
            "pipeline_t2v".into(),
            run::<B, _>(crate::pipeline::run_case::<B>),
        );
        handlers.insert(
            "train_step_lora".into(),
            Handler::<B>::NotImplemented("the LoRA training step comes with the trainer".into()),
        );
        ParityRunner { device, handlers }
    }

    /// Adds or replaces the handler of `component`.
    pub fn with_component(mut self, component: &str, f: CaseFn<B>) -> Self {
        self.handlers.insert(component.to_string(), Handler::Run(f));
        self
    }

    /// The components this runner knows.
    pub fn components(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// Runs every case file (`*.safetensors` directly in `cases_dir`; sub-folders such as the
    /// `*.lora` ones are not cases) in name order. `on_case` is called after each case with its rows.
    pub fn run_dir_with_progress(
        &self,
        cases_dir: &Path,
        mut on_case: impl FnMut(&[Row]),
    ) -> Result<Vec<Row>, EngineError> {
        let mut rows = Vec::new();
        for path in case_files(cases_dir)? {
            let case_rows = self.run_file(&path);
            on_case(&case_rows);
            rows.extend(case_rows);
        }
        Ok(rows)
    }

    /// [`Self::run_dir_with_progress`] without progress.
    pub fn run_dir(&self, cases_dir: &Path) -> Result<Vec<Row>, EngineError> {
        self.run_dir_with_progress(cases_dir, |_| {})
    }

    /// Runs one case file and returns its rows.
    pub fn run_file(&self, path: &Path) -> Vec<Row> {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let start = Instant::now();
        let case = match Case::load(path) {
            Ok(c) => c,
            Err(e) => {
                return vec![case_row(
                    &stem,
                    "?",
                    Status::Fail(format!("cannot read the case: {e}")),
                    0.0,
                )]
            }
        };
        let handler = match self.handlers.get(&case.component) {
            Some(h) => h,
            None => {
                return vec![case_row(
                    &case.name,
                    &case.component,
                    Status::Fail(format!(
                        "unknown component `{}` (known: {})",
                        case.component,
                        self.components().join(", ")
                    )),
                    0.0,
                )]
            }
        };
        let result = match handler {
            Handler::NotImplemented(reason) => {
                return vec![case_row(
                    &case.name,
                    &case.component,
                    Status::NotImplemented(reason.clone()),
                    0.0,
                )]
            }
            Handler::Run(f) => f(&case, &self.device),
        };
        let seconds = start.elapsed().as_secs_f64();
        match result {
            Err(e) => vec![case_row(
                &case.name,
                &case.component,
                Status::Fail(e),
                seconds,
            )],
            Ok(got) => compare(&case, &got, seconds),
        }
    }
}

fn case_row(case: &str, component: &str, status: Status, seconds: f64) -> Row {
    Row {
        case: case.to_string(),
        component: component.to_string(),
        output: "-".into(),
        rel_l2: None,
        tolerance: None,
        status,
        seconds,
    }
}

/// The case files of a folder, sorted.
pub fn case_files(cases_dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let entries = std::fs::read_dir(cases_dir).map_err(|source| EngineError::Io {
        path: cases_dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| EngineError::Io {
            path: cases_dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Compares one expected tensor with the computed one.
fn compare_one(
    got: Option<&HostTensor>,
    want: &HostTensor,
    tolerance: Tolerance,
) -> (Option<f64>, Tolerance, Status) {
    let Some(got) = got else {
        let tol = if matches!(want.data, HostData::I64(_)) {
            Tolerance::Exact
        } else {
            tolerance
        };
        return (None, tol, Status::Fail("not computed".into()));
    };
    if got.shape != want.shape {
        let tol = if matches!(want.data, HostData::I64(_)) {
            Tolerance::Exact
        } else {
            tolerance
        };
        return (
            None,
            tol,
            Status::Fail(format!("shape {:?}, expected {:?}", got.shape, want.shape)),
        );
    }
    match &want.data {
        HostData::I64(w) => {
            let g = got.to_i64();
            let differing = g.iter().zip(w).filter(|(a, b)| a != b).count();
            let float_got = matches!(got.data, HostData::F32(_));
            let status = if differing == 0 && !float_got {
                Status::Ok
            } else if float_got {
                Status::Fail("integer output computed as floats".into())
            } else {
                Status::Fail(format!("{differing} of {} values differ", w.len()))
            };
            (None, Tolerance::Exact, status)
        }
        HostData::F32(w) => {
            let err = rel_l2(&got.to_f32(), w);
            let tol = match tolerance {
                Tolerance::RelL2(t) => t,
                Tolerance::Exact => 0.0,
            };
            let status = if err <= tol {
                Status::Ok
            } else {
                Status::Fail(format!("rel L2 {err:.3e} > {tol:.0e}"))
            };
            (Some(err), tolerance, status)
        }
    }
}

/// Rows for every expected output of `case`, plus exact rows for computed outputs that echo an
/// integer input (the text encoder's `input_ids` from the tokenizer).
fn compare(case: &Case, got: &BTreeMap<String, HostTensor>, seconds: f64) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |output: String, (rel, tol, status): (Option<f64>, Tolerance, Status)| {
        rows.push(Row {
            case: case.name.clone(),
            component: case.component.clone(),
            output,
            rel_l2: rel,
            tolerance: Some(tol),
            status,
            seconds,
        })
    };
    for (name, want) in &case.outputs {
        push(
            name.clone(),
            compare_one(got.get(name), want, case.tolerance_for(name)),
        );
    }
    for (name, g) in got {
        if case.outputs.contains_key(name) {
            continue;
        }
        if let Some(want) = case.inputs.get(name) {
            if matches!(want.data, HostData::I64(_)) {
                push(
                    format!("in.{name}"),
                    compare_one(Some(g), want, case.tolerance_for(name)),
                );
            }
        }
    }
    if rows.is_empty() {
        rows.push(case_row(
            &case.name,
            &case.component,
            Status::Fail("the case has no outputs".into()),
            seconds,
        ));
    }
    rows
}

/// Runs every case of `cases_dir` on the CPU backend (see [`ParityRunner`]).
pub fn run_dir(cases_dir: &Path) -> Result<Vec<Row>, EngineError> {
    ParityRunner::<CpuBackend>::new(CpuDevice::default()).run_dir(cases_dir)
}

/// Whether a run passed: no failed rows and at least one row that ran and passed.
pub fn all_passed(rows: &[Row]) -> bool {
    rows.iter().any(|r| r.status == Status::Ok) && !rows.iter().any(|r| r.status.is_failure())
}

/// The rows as an aligned text table with a summary line (`format!("{}", Table(&rows))`).
pub struct Table<'a>(pub &'a [Row]);

impl std::fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let header = [
            "case",
            "component",
            "output",
            "rel L2",
            "tolerance",
            "time",
            "status",
        ];
        let cells: Vec<[String; 7]> = self
            .0
            .iter()
            .map(|r| {
                [
                    r.case.clone(),
                    r.component.clone(),
                    r.output.clone(),
                    r.rel_l2.map_or("-".into(), |e| format!("{e:.2e}")),
                    r.tolerance.map_or("-".into(), |t| t.to_string()),
                    format!("{:.1}s", r.seconds),
                    r.status.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row.iter()).take(6) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |f: &mut std::fmt::Formatter<'_>, cols: &[&str]| -> std::fmt::Result {
            for (i, c) in cols.iter().enumerate() {
                if i == cols.len() - 1 {
                    writeln!(f, "{c}")?;
                } else {
                    write!(f, "{c:<w$}  ", w = widths[i])?;
                }
            }
            Ok(())
        };
        line(f, &header)?;
        for row in &cells {
            line(f, &row.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        let ok = self.0.iter().filter(|r| r.status == Status::Ok).count();
        let failed = self.0.iter().filter(|r| r.status.is_failure()).count();
        let skipped = self.0.iter().filter(|r| r.status.is_skipped()).count();
        let cases: std::collections::BTreeSet<&str> =
            self.0.iter().map(|r| r.case.as_str()).collect();
        write!(
            f,
            "{} cases, {} rows: {ok} ok, {failed} FAIL, {skipped} skipped",
            cases.len(),
            self.0.len()
        )
    }
}
