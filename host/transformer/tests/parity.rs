//! Parity with diffusers on the shared `transformer` cases (all five variants), and the RoPE tables.

mod common;

use cogvx_model_core::case::{rel_l2, Case, Tolerance};
use cogvx_model_core::weights::Weights;
use cogvx_transformer::random::checkpoint_keys;
use cogvx_transformer::{
    rotary_tables_host, run_case, CogVideoXTransformer3DModel, TransformerConfig,
};
use common::{reference_dir, B};
use std::path::PathBuf;

fn transformer_cases() -> Vec<PathBuf> {
    let dir = reference_dir().join("cases");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.contains(".transformer.") && name.ends_with(".safetensors")
        })
        .collect();
    cases.sort();
    cases
}

/// Runs every shared transformer case on backend `Bk`; panics listing the cases out of tolerance.
fn check_cases_on<Bk: cogvx_model_core::ModelBackend>(backend: &str) {
    let cases = transformer_cases();
    assert!(
        cases.len() >= 9,
        "expected the 9 shared transformer cases, found {}",
        cases.len()
    );
    let device = Default::default();
    let mut failures = Vec::new();
    for path in &cases {
        let case = Case::load(path).unwrap();
        let got = run_case::<Bk>(&case, &device).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for (name, want) in &case.outputs {
            let g = &got[name];
            assert_eq!(g.shape, want.shape, "{}: shape of {name}", case.name);
            let err = rel_l2(&g.to_f32(), &want.to_f32());
            let Tolerance::RelL2(tol) = case.tolerance else {
                panic!("{}: float output with exact tolerance", case.name)
            };
            eprintln!(
                "{backend:<8} {:<40} {name:<8} rel_l2 {err:.3e} (tolerance {tol:.0e})",
                case.name
            );
            if err.is_nan() || err > tol {
                failures.push(format!(
                    "{} {name}: rel_l2 {err:.3e} > {tol:.0e}",
                    case.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{backend}: {failures:#?}");
}

#[test]
fn all_transformer_cases_match_diffusers() {
    check_cases_on::<B>("ndarray");
}

/// The same on burn's `flex` CPU backend (the CPU backend of mixed precision).
#[test]
fn all_transformer_cases_match_diffusers_on_flex() {
    check_cases_on::<cogvx_model_core::FlexBackend>("flex");
}

/// Mixed precision: every case with the weights in bf16 (and in fp16) and the blocks computing
/// in them, against diffusers' f32 output. One rounding to bf16 has a relative error up to 2^-9
/// (0.2%), to fp16 2^-12 (0.024%); a forward rounds each activation after every layer, so a
/// few tenths of a percent of relative L2 error are expected. Measured: bf16 at most 6.4e-3,
/// fp16 at most 8.1e-4 over the nine cases; the bounds (2e-2, 3e-3) leave about 3x.
#[test]
fn all_transformer_cases_in_half_precision_stay_near_diffusers_f32() {
    use burn::tensor::FloatDType;
    let cases = transformer_cases();
    let device = Default::default();
    let mut failures = Vec::new();
    for (dtype, tol) in [(FloatDType::BF16, 2e-2), (FloatDType::F16, 3e-3)] {
        let mut worst = 0f64;
        for path in &cases {
            let case = Case::load(path).unwrap();
            let got = cogvx_transformer::run_case_in::<cogvx_model_core::FlexBackend>(
                &case, dtype, &device,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let (g, want) = (&got["sample"], &case.outputs["sample"]);
            let err = rel_l2(&g.to_f32(), &want.to_f32());
            eprintln!(
                "{dtype:?} {:<40} rel_l2 {err:.3e} (bound {tol:.0e})",
                case.name
            );
            worst = worst.max(err);
            if err.is_nan() || err > tol {
                failures.push(format!(
                    "{dtype:?} {}: rel_l2 {err:.3e} > {tol:.0e}",
                    case.name
                ));
            }
        }
        eprintln!("{dtype:?}: worst rel_l2 {worst:.3e}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn rotary_tables_match_the_cases() {
    let cases = transformer_cases();
    let mut checked = 0;
    for path in &cases {
        let case = Case::load(path).unwrap();
        let Some(want_cos) = case.inputs.get("rotary_cos") else {
            continue;
        };
        let want_sin = &case.inputs["rotary_sin"];
        let config: TransformerConfig =
            cogvx_model_core::config::read_config(&case.model_dir.join("transformer/config.json"))
                .unwrap();
        let shape = &case.inputs["hidden_states"].shape;
        let (cos, sin) = rotary_tables_host(&config, shape[1], shape[3], shape[4]).unwrap();
        assert_eq!(cos.len(), want_cos.to_f32().len(), "{}", case.name);
        for (name, got, want) in [
            ("cos", &cos, want_cos.to_f32()),
            ("sin", &sin, want_sin.to_f32()),
        ] {
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{:<40} rotary_{name} max |diff| {max:.2e}", case.name);
            assert!(max < 2e-6, "{}: rotary_{name} differs by {max}", case.name);
        }
        checked += 1;
    }
    assert!(checked >= 7, "expected 7 RoPE cases, checked {checked}");
}

/// Burn's module paths are the checkpoint keys (what adapters and saved LoRA files rely on), and
/// every key of every shared variant is used with its stored shape.
#[test]
fn module_paths_are_the_checkpoint_keys() {
    let reference = reference_dir();
    let device = Default::default();
    for variant in [
        "cogvideox-2b",
        "cogvideox-5b",
        "cogvideox-5b-i2v",
        "cogvideox1.5-5b",
        "cogvideox1.5-5b-i2v",
    ] {
        let dir = reference.join(format!("models/{variant}-tiny/transformer"));
        let model = CogVideoXTransformer3DModel::<B>::from_dir(&dir, &device).unwrap();
        let weights = Weights::open(&dir).unwrap();
        let mut ours: Vec<(String, Vec<usize>)> = checkpoint_keys(&model);
        ours.sort();
        let mut theirs: Vec<(String, Vec<usize>)> = weights
            .keys()
            .map(|k| (k.to_string(), weights.shape(k).unwrap()))
            .collect();
        theirs.sort();
        assert_eq!(ours, theirs, "{variant}");
    }
}
