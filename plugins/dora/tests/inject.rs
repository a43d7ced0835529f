//! DoRA from this plugin injected into the shared tiny CogVideoX-2B transformer with
//! `cogvx_train::inject_recipe`: at initialisation the model's loss is the base model's
//! (W' = W), and training steps give a finite loss and non-zero gradients for every trainable
//! parameter, leaving the base weights untouched.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};
use cogvx_model_core::adapter::RecipeLimits;
use cogvx_model_core::{CpuAutodiffBackend, CpuDevice};
use cogvx_train::*;
use cogvx_transformer::CogVideoXTransformer3DModel;
use std::path::PathBuf;

type AD = CpuAutodiffBackend;

fn model_dir() -> PathBuf {
    cogvx_fixtures::model("cogvideox-2b-tiny")
}

#[test]
fn dora_plugin_trains_on_the_tiny_transformer() {
    let dir = model_dir();
    let dev = CpuDevice::default();
    let load = || {
        freeze(CogVideoXTransformer3DModel::<AD>::from_dir(&dir.join("transformer"), &dev).unwrap())
    };
    let schedule = load_schedule(&dir).unwrap();

    // A fixed batch (latents [B, C, F, H, W], as cogvx-train takes them).
    AD::seed(&dev, 5);
    let base = load();
    let c = &base.config;
    let latents = Tensor::<AD, 5>::random(
        [2, c.out_channels(), 3, 8, 12],
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let noise = Tensor::random(
        noise_shape(c, latents.dims()),
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let prompt_embeds = Tensor::random(
        [2, 16, c.text_embed_dim],
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let batch = TrainBatch {
        latents,
        prompt_embeds,
        image_latents: None,
    };
    let draw = NoiseDraw {
        timesteps: vec![150, 650],
        noise,
    };
    let base_loss: f64 = compute_loss(&base, &schedule, &batch, &draw)
        .unwrap()
        .into_scalar()
        .elem::<f64>();

    let mut plugin = cogvx_plugin_dora::builtin();
    plugin.configure("{}").unwrap();
    let mut model = load();
    let q_before = model.transformer_blocks[0]
        .attn1
        .to_q
        .weight
        .val()
        .into_data();
    let spec = AdapterSpec::lora(4, 8.0);
    let layers = inject_recipe(
        &mut model,
        &spec,
        RecipeLimits::default(),
        |req| plugin.adapter_recipe(req),
        &dev,
    )
    .unwrap();
    assert_eq!(layers.len(), 8, "{layers:?}");
    let names: Vec<String> = adapter_tensors(&mut model)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(
        &names[..3],
        [
            "transformer_blocks.0.attn1.to_q.lora_A.weight",
            "transformer_blocks.0.attn1.to_q.lora_B.weight",
            "transformer_blocks.0.attn1.to_q.lora_magnitude_vector",
        ]
    );

    // W' = W at init: the loss is the base model's.
    let (loss0, grads0) = loss_and_grads(&mut model, &schedule, &batch, &draw).unwrap();
    assert!(
        (loss0 - base_loss).abs() <= 1e-5 * base_loss.abs(),
        "DoRA at init {loss0} vs base {base_loss}"
    );
    assert_eq!(grads0.len(), 24, "8 layers x (lora_A, lora_B, magnitude)");
    for (k, g) in &grads0 {
        let v = g.to_vec();
        assert!(v.iter().all(|x| x.is_finite()), "{k}: non-finite gradient");
        // lora_B = 0 makes dL/dlora_A zero at init (as in PEFT); the others move.
        let zero = v.iter().all(|x| *x == 0.0);
        assert_eq!(
            zero,
            k.ends_with("lora_A.weight"),
            "{k}: gradient all zero = {zero}"
        );
    }

    // Two AdamW steps; then every trainable parameter has a non-zero gradient.
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 1e-4,
    });
    let mut losses = vec![loss0];
    for _ in 0..2 {
        let s = train_step(
            &mut model,
            &schedule,
            &batch,
            &draw,
            &mut opt,
            1e-2,
            Some(1.0),
        )
        .unwrap();
        assert!(s.loss.is_finite() && s.grad_norm.is_finite() && s.grad_norm > 0.0);
        losses.push(s.loss);
    }
    let (loss, grads) = loss_and_grads(&mut model, &schedule, &batch, &draw).unwrap();
    assert!(loss.is_finite());
    losses.push(loss);
    assert_eq!(grads.len(), 24);
    for (k, g) in &grads {
        let v = g.to_vec();
        assert!(
            v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0),
            "{k}: gradient {v:?}"
        );
    }
    assert!(losses[3] < losses[0], "the loss did not fall: {losses:?}");
    assert_eq!(
        model.transformer_blocks[0]
            .attn1
            .to_q
            .weight
            .val()
            .into_data(),
        q_before,
        "the base weight moved"
    );
}
