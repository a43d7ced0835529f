//! Runs every scheduler case of `shared/reference/cases` through `run_case` and checks the
//! outputs against diffusers' at the case's tolerance.

use std::path::PathBuf;

use cogvx_model_core::case::{rel_l2, Case, HostData, Tolerance};
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_scheduler::{run_case, CASE_COMPONENTS};

fn cases_dir() -> PathBuf {
    cogvx_fixtures::case("")
}

fn scheduler_cases(dir: &PathBuf) -> Vec<Case> {
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let case = Case::load(&path).unwrap();
            if CASE_COMPONENTS.contains(&case.component.as_str()) {
                cases.push(case);
            }
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

#[test]
fn all_shared_scheduler_cases_pass() {
    let dir = cases_dir();
    let cases = scheduler_cases(&dir);
    assert!(
        cases.len() >= 6,
        "expected the 6 scheduler cases, found {}",
        cases.len()
    );
    let device = CpuDevice::default();
    let mut failures = Vec::new();
    for case in &cases {
        let got =
            run_case::<CpuBackend>(case, &device).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            case.outputs.keys().collect::<Vec<_>>(),
            "{}: output names differ",
            case.name
        );
        for (name, want) in &case.outputs {
            let g = &got[name];
            assert_eq!(g.shape, want.shape, "{} {name}: shape", case.name);
            match (&want.data, case.tolerance) {
                (HostData::I64(w), _) => {
                    assert_eq!(
                        &g.to_i64(),
                        w,
                        "{} {name}: integer output differs",
                        case.name
                    );
                    eprintln!("{:40} {name:16} exact ok", case.name);
                }
                (HostData::F32(w), Tolerance::RelL2(tol)) => {
                    let err = rel_l2(&g.to_f32(), w);
                    eprintln!(
                        "{:40} {name:16} rel_l2 {err:.2e} (tol {tol:.0e})",
                        case.name
                    );
                    if err.is_nan() || err > tol {
                        failures.push(format!(
                            "{} {name}: rel_l2 {err:.3e} > {tol:.0e}",
                            case.name
                        ));
                    }
                }
                (HostData::F32(_), Tolerance::Exact) => {
                    panic!("{}: float output with exact tolerance", case.name)
                }
            }
        }
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}
