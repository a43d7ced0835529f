//! The parity runner on a synthetic cases folder: it must report wrong outputs, unknown
//! components and unreadable files as failures, skip non-case files, and keep
//! `train_step_lora` out of the pass count.

use std::collections::HashMap;
use std::path::Path;

use cogvx_engine::parity::{all_passed, case_files, ParityRunner, Status, Table};
use cogvx_model_core::{CpuBackend, CpuDevice};
use safetensors::tensor::{Dtype, TensorView};

const SCHEDULER: &str = r#"{"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
 "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": true,
 "set_alpha_to_one": true, "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing"}"#;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_case(
    path: &Path,
    component: &str,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    tolerance: &str,
) {
    let meta = HashMap::from([
        ("component".to_string(), component.to_string()),
        ("model".to_string(), "models/m".to_string()),
        ("params".to_string(), "{}".to_string()),
        ("tolerance".to_string(), tolerance.to_string()),
    ]);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, dt, shape, bytes)| {
            (
                n.to_string(),
                TensorView::new(*dt, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn reports_failures_skips_and_non_cases() {
    let root = tempfile::tempdir().unwrap();
    let cases = root.path().join("cases");
    std::fs::create_dir_all(root.path().join("models/m/scheduler")).unwrap();
    std::fs::write(
        root.path().join("models/m/scheduler/scheduler_config.json"),
        SCHEDULER,
    )
    .unwrap();
    std::fs::create_dir_all(cases.join("x.lora")).unwrap();
    std::fs::write(
        cases.join("x.lora/pytorch_lora_weights.safetensors"),
        b"not a case",
    )
    .unwrap();
    std::fs::write(cases.join("index.json"), b"[]").unwrap();

    // add_noise at t = 0 and t = 999 (ᾱ_999 = 0: noisy = noise), from the real schedule.
    let sample = vec![1.0f32, 2.0, 3.0, 4.0];
    let noise = vec![0.5f32, -0.5, 0.25, -0.25];
    let ac = cogvx_scheduler::NoiseSchedule::from_json(SCHEDULER, "test")
        .unwrap()
        .alphas_cumprod;
    let a0 = (ac[0] as f32).sqrt();
    let b0 = (1.0 - ac[0] as f32).sqrt();
    let noisy: Vec<f32> = vec![a0 * 1.0 + b0 * 0.5, a0 * 2.0 - b0 * 0.5, 0.25, -0.25];
    // The case records get_velocity(noise, sample, t) = sqrt(ᾱ) * sample - sqrt(1 - ᾱ) * noise.
    let velocity: Vec<f32> = vec![a0 * 1.0 - b0 * 0.5, a0 * 2.0 + b0 * 0.5, -0.25, 0.25];
    let ac32: Vec<f32> = ac.iter().map(|a| *a as f32).collect();
    let ts: Vec<u8> = [0i64, 999].iter().flat_map(|t| t.to_le_bytes()).collect();
    let inputs = |noisy: &[f32]| {
        vec![
            ("in.sample", Dtype::F32, vec![2, 2], f32_bytes(&sample)),
            ("in.noise", Dtype::F32, vec![2, 2], f32_bytes(&noise)),
            ("in.timesteps", Dtype::I64, vec![2], ts.clone()),
            ("out.noisy", Dtype::F32, vec![2, 2], f32_bytes(noisy)),
            ("out.velocity", Dtype::F32, vec![2, 2], f32_bytes(&velocity)),
            (
                "out.alphas_cumprod",
                Dtype::F32,
                vec![1000],
                f32_bytes(&ac32),
            ),
        ]
    };
    write_case(
        &cases.join("a.good.safetensors"),
        "scheduler_train",
        &inputs(&noisy),
        r#"{"rel_l2": 1e-6}"#,
    );
    let mut wrong = noisy.clone();
    wrong[0] += 1e-3;
    write_case(
        &cases.join("b.wrong.safetensors"),
        "scheduler_train",
        &inputs(&wrong),
        r#"{"rel_l2": 1e-6}"#,
    );
    write_case(
        &cases.join("c.unknown.safetensors"),
        "hypernetwork",
        &inputs(&noisy),
        r#"{"rel_l2": 1e-6}"#,
    );
    write_case(
        &cases.join("d.lora.safetensors"),
        "train_step_lora",
        &inputs(&noisy),
        r#"{"rel_l2": 1e-4}"#,
    );
    std::fs::write(cases.join("e.broken.safetensors"), b"garbage").unwrap();

    assert_eq!(
        case_files(&cases).unwrap().len(),
        5,
        "only the top-level *.safetensors are cases"
    );
    let runner = ParityRunner::<CpuBackend>::new(CpuDevice::default());
    let rows = runner.run_dir(&cases).unwrap();
    eprintln!("{}", Table(&rows));
    let status = |case: &str, output: &str| {
        rows.iter()
            .find(|r| r.case == case && r.output == output)
            .unwrap_or_else(|| panic!("{case} {output}"))
            .status
            .clone()
    };
    assert_eq!(status("a.good", "noisy"), Status::Ok);
    assert_eq!(status("a.good", "velocity"), Status::Ok);
    assert_eq!(status("a.good", "alphas_cumprod"), Status::Ok);
    assert!(matches!(status("b.wrong", "noisy"), Status::Fail(m) if m.contains("rel L2")));
    assert_eq!(status("b.wrong", "velocity"), Status::Ok);
    assert!(
        matches!(status("c.unknown", "-"), Status::Fail(m) if m.contains("unknown component `hypernetwork`"))
    );
    assert!(matches!(status("d.lora", "-"), Status::NotImplemented(_)));
    assert!(
        matches!(status("e.broken", "-"), Status::Fail(m) if m.contains("cannot read the case"))
    );
    assert!(!all_passed(&rows));
    let good: Vec<_> = rows
        .iter()
        .filter(|r| r.case == "a.good" || r.case == "d.lora")
        .cloned()
        .collect();
    assert!(
        all_passed(&good),
        "a skipped training step does not fail the run"
    );
    assert!(
        !all_passed(&rows[rows.len() - 1..]),
        "a run with nothing passed is not a pass"
    );
    let table = Table(&rows).to_string();
    assert!(
        table.contains("FAIL")
            && table.contains("not implemented")
            && table.ends_with("5 cases, 9 rows: 5 ok, 3 FAIL, 1 skipped"),
        "{table}"
    );

    // A component handler can be added (the trainer registers train_step_lora this way).
    let runner = runner.with_component("train_step_lora", Box::new(|_, _| Err("boom".to_string())));
    let rows = runner.run_file(&cases.join("d.lora.safetensors"));
    assert!(matches!(&rows[0].status, Status::Fail(m) if m == "boom"));
}
