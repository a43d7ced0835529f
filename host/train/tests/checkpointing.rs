//! Block-level gradient checkpointing gives the gradients of the plain backward, on the tiny
//! models of all five variants: LoRA (the shared `train_step_lora` cases, whose diffusers
//! outputs must still match) and full fine-tuning (every transformer weight, including those
//! before and after the blocks, whose gradients pass through the recomputed blocks), also with
//! the blocks' inputs offloaded to host memory.

use cogvx_model_core::case::{rel_l2, Case, HostTensor, Tolerance};
use cogvx_model_core::{CpuAutodiffBackend, CpuDevice};
use cogvx_train::{
    case_batch, enable_full_training, load_schedule, loss_and_grads_for, run_case_with, TrainMode,
};
use cogvx_transformer::CogVideoXTransformer3DModel;
use std::collections::BTreeMap;

type AD = CpuAutodiffBackend;

const VARIANTS: [&str; 5] = [
    "cogvideox-2b",
    "cogvideox-5b",
    "cogvideox-5b-i2v",
    "cogvideox1.5-5b",
    "cogvideox1.5-5b-i2v",
];

/// The shared reference cases; CI has them beside the repository, so their absence fails.
fn case(variant: &str) -> Case {
    let p = cogvx_fixtures::case(&format!("{variant}.train_step_lora.safetensors"));
    Case::load(&p).unwrap()
}

fn assert_same(
    variant: &str,
    what: &str,
    plain: &BTreeMap<String, Vec<f32>>,
    ck: &BTreeMap<String, Vec<f32>>,
) {
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        ck.keys().collect::<Vec<_>>(),
        "{variant} {what}: names"
    );
    for (name, want) in plain {
        let err = rel_l2(&ck[name], want);
        assert!(
            err <= 1e-6,
            "{variant} {what}: {name} rel L2 {err:.2e} with checkpointing"
        );
    }
}

fn f32s(t: &BTreeMap<String, HostTensor>) -> BTreeMap<String, Vec<f32>> {
    t.iter().map(|(k, v)| (k.clone(), v.to_f32())).collect()
}

#[test]
fn lora_gradients_with_checkpointing_equal_the_plain_ones_and_diffusers() {
    let device = CpuDevice::default();
    for variant in VARIANTS {
        let case = case(variant);
        let plain = run_case_with::<AD>(&case, false, &device).unwrap();
        let ck = run_case_with::<AD>(&case, true, &device).unwrap();
        assert!(
            plain.keys().filter(|k| k.starts_with("grad.")).count() >= 8,
            "{variant}: {:?}",
            plain.keys()
        );
        assert_same(variant, "LoRA step", &f32s(&plain), &f32s(&ck));
        let Tolerance::RelL2(tol) = case.tolerance else {
            panic!("{variant}: tolerance")
        };
        for (name, want) in &case.outputs {
            let err = rel_l2(&ck[name].to_f32(), &want.to_f32());
            assert!(
                err <= tol,
                "{variant}: {name} rel L2 {err:.2e} against diffusers with checkpointing"
            );
        }
    }
}

#[test]
fn full_finetuning_gradients_with_checkpointing_equal_the_plain_ones() {
    let device = CpuDevice::default();
    for variant in VARIANTS {
        let case = case(variant);
        let schedule = load_schedule(&case.model_dir).unwrap();
        let (batch, draw) = case_batch::<AD>(&case, &device).unwrap();
        let grads = |checkpointing: bool, offload: bool| {
            let model = CogVideoXTransformer3DModel::<AD>::from_dir(
                &case.model_dir.join("transformer"),
                &device,
            )
            .unwrap();
            let mut model = enable_full_training(model);
            model.set_gradient_checkpointing(checkpointing);
            model.set_checkpoint_offload(offload);
            let (loss, grads) =
                loss_and_grads_for(TrainMode::Full, &mut model, &schedule, &batch, &draw).unwrap();
            let mut out: BTreeMap<String, Vec<f32>> =
                grads.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
            out.insert("loss".into(), vec![loss as f32]);
            out
        };
        let plain = grads(false, false);
        // Weights before the blocks (patch embedding, time embedding) and in them are there.
        assert!(
            plain.keys().any(|k| k.starts_with("patch_embed.")),
            "{variant}: {:?}",
            plain.keys().take(5).collect::<Vec<_>>()
        );
        assert!(
            plain.keys().any(|k| k.starts_with("transformer_blocks.1.")),
            "{variant}"
        );
        assert_same(variant, "SFT", &plain, &grads(true, false));
        // The block inputs through host memory and back: the same gradients.
        assert_same(variant, "SFT, inputs offloaded", &plain, &grads(true, true));
    }
}
