//! Every `vae_encode` / `vae_decode` case of `shared/reference/cases` (tiled ones included)
//! against its tolerance, on the CPU backend.

use cogvx_model_core::case::{rel_l2, Case, Tolerance};
use cogvx_model_core::{CpuBackend, CpuDevice};
use std::path::PathBuf;
use std::time::Instant;

fn cases_dir() -> PathBuf {
    cogvx_fixtures::case("")
}

fn vae_cases() -> Option<Vec<PathBuf>> {
    let dir = cases_dir();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".safetensors") && (n.contains(".vae_encode") || n.contains(".vae_decode"))
        })
        .collect();
    cases.sort();
    Some(cases)
}

fn run(filter: &str) {
    let Some(cases) = vae_cases() else { return };
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(filter))
        .collect();
    assert!(
        !cases.is_empty(),
        "no VAE case matching `{filter}` in {}",
        cases_dir().display()
    );
    let device = CpuDevice::default();
    let mut failures = Vec::new();
    for path in &cases {
        let case = Case::load(path).unwrap();
        let start = Instant::now();
        let got = cogvx_vae::run_case::<CpuBackend>(&case, &device)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(
            got.len(),
            case.outputs.len(),
            "{}: outputs {:?}",
            case.name,
            got.keys().collect::<Vec<_>>()
        );
        for (name, want) in &case.outputs {
            let g = got
                .get(name)
                .unwrap_or_else(|| panic!("{}: no output `{name}`", case.name));
            assert_eq!(g.shape, want.shape, "{}: shape of `{name}`", case.name);
            let err = rel_l2(&g.to_f32(), &want.to_f32());
            let Tolerance::RelL2(tol) = case.tolerance else {
                panic!("{}: float output with exact tolerance", case.name)
            };
            let ok = err <= tol;
            eprintln!(
                "{:<40} {:<7} rel_l2 {err:.3e} (tol {tol:.0e}) {} [{secs:.2}s]",
                case.name,
                name,
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failures.push(format!("{} {name}: {err:.3e} > {tol:.0e}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn vae_encode_cases() {
    run(".vae_encode.");
}

#[test]
fn vae_decode_cases() {
    run(".vae_decode.");
}

#[test]
fn vae_tiled_cases() {
    run("_tiled");
}
