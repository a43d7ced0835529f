//! The `train_step_lora` parity cases of `shared/reference/cases` (all five variants): loss,
//! gradient norm, every LoRA gradient and the LoRA after one AdamW step.

use cogvx_model_core::case::{rel_l2, Case, Tolerance};
use cogvx_model_core::{CpuAutodiffBackend, CpuDevice};

fn check(variant: &str) {
    let path = cogvx_fixtures::case(&format!("{variant}.train_step_lora.safetensors"));
    let case = Case::load(&path).unwrap();
    let got = cogvx_train::run_case::<CpuAutodiffBackend>(&case, &CpuDevice::default()).unwrap();
    assert_eq!(
        got.len(),
        case.outputs.len(),
        "outputs: {:?}",
        got.keys().collect::<Vec<_>>()
    );
    let mut worst = (0.0f64, String::new());
    let mut scalars = Vec::new();
    for (name, want) in &case.outputs {
        let g = got
            .get(name)
            .unwrap_or_else(|| panic!("{variant}: output `{name}` not computed"));
        assert_eq!(g.shape, want.shape, "{variant}: `{name}` shape");
        let err = rel_l2(&g.to_f32(), &want.to_f32());
        if std::env::var("COGVX_PARITY_VERBOSE").is_ok() {
            eprintln!("{variant} {name} {err:.2e}");
        }
        let Tolerance::RelL2(tol) = case.tolerance_for(name) else {
            panic!("float output `{name}` with exact tolerance")
        };
        assert!(
            err <= tol,
            "{variant}: `{name}` rel L2 {err:.3e} > {tol:.0e} (got {:?}.. want {:?}..)",
            &g.to_f32()[..2.min(g.to_f32().len())],
            &want.to_f32()[..2.min(want.to_f32().len())]
        );
        if name == "loss" || name == "grad_norm" {
            scalars.push(format!("{name} {err:.1e}"));
        }
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!(
        "{variant}: {} outputs, {}, worst rel L2 {:.2e} ({})",
        case.outputs.len(),
        scalars.join(", "),
        worst.0,
        worst.1
    );
}

#[test]
fn train_step_lora_2b() {
    check("cogvideox-2b");
}

#[test]
fn train_step_lora_5b() {
    check("cogvideox-5b");
}

#[test]
fn train_step_lora_5b_i2v() {
    check("cogvideox-5b-i2v");
}

#[test]
fn train_step_lora_1_5_5b() {
    check("cogvideox1.5-5b");
}

#[test]
fn train_step_lora_1_5_5b_i2v() {
    check("cogvideox1.5-5b-i2v");
}
