//! Export, training-loop and error tests of the training core on the shared tiny models.

use burn::tensor::{Distribution, Tensor};
use cogvx_model_core::adapter::{AdapterTensor, RecipeLimits};
use cogvx_model_core::case::{rel_l2, Case, HostData, Tolerance};
use cogvx_model_core::{CpuAutodiffBackend, CpuDevice};
use cogvx_plugin_api::{AdapterOutput, AdapterRecipe, Dim, ExportKey, Init, Op, ParamSpec};
use cogvx_train::*;
use cogvx_transformer::CogVideoXTransformer3DModel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type AD = CpuAutodiffBackend;

fn reference() -> PathBuf {
    cogvx_fixtures::reference("")
}

/// Tensor name -> (dtype, shape, values).
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<f32>)>;

fn read_safetensors(path: &Path) -> (BTreeMap<String, String>, Tensors) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let header: BTreeMap<String, String> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let data: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, (format!("{:?}", v.dtype()), v.shape().to_vec(), data))
        })
        .collect();
    (header, tensors)
}

#[test]
fn export_reproduces_the_reference_lora_files() {
    let root = reference();
    let out = tempfile::tempdir().unwrap();
    for variant in [
        "cogvideox-2b",
        "cogvideox-5b",
        "cogvideox-5b-i2v",
        "cogvideox1.5-5b",
        "cogvideox1.5-5b-i2v",
    ] {
        let case =
            Case::load(&root.join(format!("cases/{variant}.train_step_lora.safetensors"))).unwrap();
        let got = run_case::<AD>(&case, &CpuDevice::default()).unwrap();
        let params: BTreeMap<String, AdapterTensor<cogvx_model_core::CpuBackend>> = got
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("lora_after_step.")?;
                let HostData::F32(d) = &v.data else {
                    return None;
                };
                Some((
                    name.to_string(),
                    AdapterTensor::from_vec(&v.shape, d.clone(), &CpuDevice::default()).unwrap(),
                ))
            })
            .collect();
        let spec = case_lora_spec(&case).unwrap();
        let meta = LoraMetadata {
            rank: spec.rank,
            alpha: spec.alpha,
            target_modules: spec.targets.clone(),
        };
        let dir = out.path().join(variant);
        let path = save_lora(&dir, &params, &meta).unwrap();
        assert_eq!(path, dir.join("pytorch_lora_weights.safetensors"));
        let (got_meta, got_t) = read_safetensors(&path);
        let (want_meta, want_t) = read_safetensors(&root.join(format!(
            "cases/{variant}.lora/pytorch_lora_weights.safetensors"
        )));
        assert_eq!(got_meta, want_meta, "{variant}: header metadata");
        assert_eq!(
            got_t.keys().collect::<Vec<_>>(),
            want_t.keys().collect::<Vec<_>>(),
            "{variant}: keys"
        );
        let Tolerance::RelL2(tol) = case.tolerance else {
            panic!()
        };
        for (k, (dtype, shape, data)) in &want_t {
            let (gd, gs, gv) = &got_t[k];
            assert_eq!((gd, gs), (dtype, shape), "{variant}: {k}");
            let err = rel_l2(gv, data);
            assert!(err <= tol, "{variant}: {k} rel L2 {err:.2e}");
        }
        // Reading the reference file back gives its rank, alpha and targets.
        let reread = load_lora(&root.join(format!(
            "cases/{variant}.lora/pytorch_lora_weights.safetensors"
        )))
        .unwrap();
        let mut want_targets = spec.targets.clone();
        want_targets.sort();
        assert_eq!(
            reread.metadata,
            Some(LoraMetadata {
                rank: 4,
                alpha: 2.0,
                target_modules: want_targets
            })
        );
        assert_eq!(reread.tensors.len(), params.len());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }
}

/// burn's backend RNG is process-wide: a seed and the draws that follow it are taken under
/// this lock, or a test running beside reseeds in between (two "differently seeded" adapters
/// came out equal).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny_batch(
    model: &CogVideoXTransformer3DModel<AD>,
    seed: u64,
) -> (TrainBatch<AD>, NoiseDraw<AD>) {
    use burn::tensor::backend::Backend;
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dev = CpuDevice::default();
    AD::seed(&dev, seed);
    let c = &model.config;
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
    (
        TrainBatch {
            latents,
            prompt_embeds,
            image_latents: None,
        },
        NoiseDraw {
            timesteps: vec![100, 700],
            noise,
        },
    )
}

#[test]
fn lora_training_lowers_the_loss_and_only_moves_the_adapter() {
    let root = reference();
    let model_dir = root.join("models/cogvideox-2b-tiny");
    let dev = CpuDevice::default();
    let mut model = freeze(
        CogVideoXTransformer3DModel::<AD>::from_dir(&model_dir.join("transformer"), &dev).unwrap(),
    );
    let base_before = model.transformer_blocks[0]
        .attn1
        .to_q
        .weight
        .val()
        .into_data();
    let names = inject_lora(&mut model, &AdapterSpec::lora(4, 4.0), &dev).unwrap();
    assert_eq!(names.len(), 8);
    assert_eq!(names[3], "transformer_blocks.0.attn1.to_out.0");
    let schedule = load_schedule(&model_dir).unwrap();
    let (batch, draw) = tiny_batch(&model, 7);
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 1e-4,
    });
    let mut losses = Vec::new();
    for _ in 0..8 {
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
        assert!(s.grad_norm.is_finite() && s.grad_norm > 0.0);
        // Only the adapter gets gradients: 8 layers x (A, B).
        assert_eq!(s.grads.len(), 16);
        losses.push(s.loss);
    }
    assert!(losses[7] < 0.9 * losses[0], "loss did not fall: {losses:?}");
    assert_eq!(
        model.transformer_blocks[0]
            .attn1
            .to_q
            .weight
            .val()
            .into_data(),
        base_before
    );
    assert_eq!(opt.state.values().next().unwrap().step, 8);
}

/// LoRA expressed as a plugin recipe trains exactly like the built-in LoRA.
#[test]
fn recipe_lora_gives_the_builtin_lora_loss_and_gradients() {
    let root = reference();
    let model_dir = root.join("models/cogvideox-5b-tiny");
    let dev = CpuDevice::default();
    let load = || {
        freeze(
            CogVideoXTransformer3DModel::<AD>::from_dir(&model_dir.join("transformer"), &dev)
                .unwrap(),
        )
    };
    let spec = AdapterSpec {
        rank: 2,
        alpha: 3.0,
        targets: vec!["to_q".into(), "attn1.to_v".into()],
    };
    let mut builtin = load();
    inject_lora(&mut builtin, &spec, &dev).unwrap();
    // Non-zero B so that every gradient is exercised.
    let mut values = trainable_values(&mut builtin);
    for (k, v) in values.iter_mut() {
        if k.ends_with("lora_B.weight") {
            let shape = v.shape();
            *v = AdapterTensor::Matrix(Tensor::random(
                [shape[0], shape[1]],
                Distribution::Normal(0.0, 0.1),
                &dev,
            ));
        }
    }
    set_adapter_values(&mut builtin, &values).unwrap();
    let recipe = AdapterRecipe {
        params: vec![
            ParamSpec {
                name: "A".into(),
                shape: vec![Dim::Rank, Dim::In],
                init: Init::KaimingUniform { a: 5f32.sqrt() },
                trainable: true,
            },
            ParamSpec {
                name: "B".into(),
                shape: vec![Dim::Out, Dim::Rank],
                init: Init::Zeros,
                trainable: true,
            },
        ],
        graph: vec![
            Op::Param("B".into()),
            Op::Param("A".into()),
            Op::Matmul(0, 1),
            Op::AlphaOverRank(2),
        ],
        output: 3,
        output_kind: AdapterOutput::WeightDelta,
        export: vec![
            ExportKey {
                param: "A".into(),
                suffix: "lora_A.weight".into(),
            },
            ExportKey {
                param: "B".into(),
                suffix: "lora_B.weight".into(),
            },
        ],
        peft_type: "LORA".into(),
    };
    let mut plugin = load();
    let layers = inject_recipe(
        &mut plugin,
        &spec,
        RecipeLimits::default(),
        |_| Ok::<_, String>(recipe.clone()),
        &dev,
    )
    .unwrap();
    assert_eq!(
        layers,
        vec![
            "transformer_blocks.0.attn1.to_q",
            "transformer_blocks.0.attn1.to_v",
            "transformer_blocks.1.attn1.to_q",
            "transformer_blocks.1.attn1.to_v"
        ]
    );
    set_adapter_values(&mut plugin, &values).unwrap();
    let schedule = load_schedule(&model_dir).unwrap();
    let (batch, draw) = tiny_batch(&builtin, 3);
    let (l1, g1) = loss_and_grads(&mut builtin, &schedule, &batch, &draw).unwrap();
    let (l2, g2) = loss_and_grads(&mut plugin, &schedule, &batch, &draw).unwrap();
    assert!((l1 - l2).abs() <= 1e-5 * l1.abs(), "{l1} vs {l2}");
    assert_eq!(g1.keys().collect::<Vec<_>>(), g2.keys().collect::<Vec<_>>());
    for (k, g) in &g1 {
        let err = rel_l2(&g2[k].to_vec(), &g.to_vec());
        assert!(err < 1e-4, "{k}: {err:.2e}");
    }
    // A recipe that refers to a later node is refused, naming the layer.
    let mut bad = recipe.clone();
    bad.graph[2] = Op::Matmul(0, 9);
    let e = inject_recipe(
        &mut load(),
        &spec,
        RecipeLimits::default(),
        |_| Ok::<_, String>(bad.clone()),
        &dev,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("transformer_blocks.0.attn1.to_q") && e.contains("not an earlier node"),
        "{e}"
    );
}

#[test]
fn bad_targets_and_batches_are_clear_errors() {
    let root = reference();
    let dev = CpuDevice::default();
    let dir = root.join("models/cogvideox-2b-tiny");
    let mut model = freeze(
        CogVideoXTransformer3DModel::<AD>::from_dir(&dir.join("transformer"), &dev).unwrap(),
    );
    let e = inject_lora(
        &mut model,
        &AdapterSpec {
            rank: 4,
            alpha: 4.0,
            targets: vec!["to_x".into()],
        },
        &dev,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`to_x` matches no linear layer"), "{e}");
    let e = inject_lora(
        &mut model,
        &AdapterSpec {
            rank: 4,
            alpha: 4.0,
            targets: vec!["proj".into()],
        },
        &dev,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Conv2d"), "{e}");
    inject_lora(&mut model, &AdapterSpec::lora(2, 2.0), &dev).unwrap();
    let e = inject_lora(&mut model, &AdapterSpec::lora(2, 2.0), &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already has an adapter"), "{e}");

    let schedule = load_schedule(&dir).unwrap();
    let (mut batch, draw) = tiny_batch(&model, 1);
    batch.image_latents = Some(batch.latents.clone().narrow(2, 0, 1));
    let e = compute_loss(&model, &schedule, &batch, &draw)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an image-to-video model"), "{e}");
    let (batch, mut draw) = tiny_batch(&model, 1);
    draw.timesteps = vec![5, 1000];
    let e = compute_loss(&model, &schedule, &batch, &draw)
        .unwrap_err()
        .to_string();
    assert!(e.contains("timestep 1000 is outside 0..1000"), "{e}");

    let i2v = root.join("models/cogvideox-5b-i2v-tiny");
    let model =
        CogVideoXTransformer3DModel::<AD>::from_dir(&i2v.join("transformer"), &dev).unwrap();
    let (batch, draw) = tiny_batch(&model, 1);
    let e = compute_loss(&model, &schedule, &batch, &draw)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs image latents"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// SFT (full fine-tuning)

const VARIANTS: [&str; 5] = [
    "cogvideox-2b",
    "cogvideox-5b",
    "cogvideox-5b-i2v",
    "cogvideox1.5-5b",
    "cogvideox1.5-5b-i2v",
];

/// The SFT parameter names are the checkpoint's keys (all but the persistent buffer
/// `patch_embed.pos_embedding` of 5B-I2V, which diffusers does not train), with the stored shapes.
#[test]
fn full_parameter_names_are_the_checkpoint_keys() {
    let root = reference();
    for variant in VARIANTS {
        let dir = root.join(format!("models/{variant}-tiny/transformer"));
        let model =
            CogVideoXTransformer3DModel::<AD>::from_dir(&dir, &CpuDevice::default()).unwrap();
        let weights = cogvx_model_core::weights::Weights::open(&dir).unwrap();
        let mut want: BTreeMap<String, Vec<usize>> = weights
            .keys()
            .map(|k| (k.to_string(), weights.shape(k).unwrap()))
            .collect();
        let buffer = want.remove("patch_embed.pos_embedding");
        assert_eq!(
            buffer.is_some(),
            model.config.use_learned_positional_embeddings,
            "{variant}"
        );
        assert_eq!(checkpoint_shapes(&model), want, "{variant}");
        let values = full_values(&model);
        assert_eq!(
            values.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{variant}"
        );
        let host: usize = full_host_values(&model)
            .iter()
            .map(|(_, _, d)| d.len())
            .sum();
        assert_eq!(
            host,
            burn::module::Module::num_params(&model),
            "{variant}: every parameter is listed"
        );
    }
}

#[test]
fn one_sft_step_changes_every_weight() {
    let root = reference();
    let model_dir = root.join("models/cogvideox-2b-tiny");
    let dev = CpuDevice::default();
    // Frozen first, as after an adapter run: enable_full_training makes everything trainable.
    let model = freeze(
        CogVideoXTransformer3DModel::<AD>::from_dir(&model_dir.join("transformer"), &dev).unwrap(),
    );
    let mut model = enable_full_training(model);
    let schedule = load_schedule(&model_dir).unwrap();
    let (batch, draw) = tiny_batch(&model, 11);
    let before = TrainMode::Full.values(&mut model);
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 1e-4,
    });
    let s = train_step_for(
        TrainMode::Full,
        &mut model,
        &schedule,
        &batch,
        &draw,
        &mut opt,
        1e-3,
        Some(1.0),
    )
    .unwrap();
    assert!(
        s.loss.is_finite() && s.grad_norm.is_finite() && s.grad_norm > 0.0,
        "{} {}",
        s.loss,
        s.grad_norm
    );
    assert_eq!(
        s.grads.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "every weight gets a gradient"
    );
    let after = full_values(&model);
    for (name, b) in &before {
        let (b, a) = (b.to_vec(), after[name].to_vec());
        assert!(
            b.iter().zip(&a).any(|(x, y)| x != y),
            "{name} did not change"
        );
        // One AdamW step moves each element by at most lr (plus decay).
        let max = b
            .iter()
            .zip(&a)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            max <= 1.01e-3 + 1e-4 * b.iter().fold(0f32, |m, x| m.max(x.abs())),
            "{name}: moved {max}"
        );
    }
    assert_eq!(opt.state.len(), before.len());
    // A second step lowers the loss on the same batch.
    let s2 = train_step_for(
        TrainMode::Full,
        &mut model,
        &schedule,
        &batch,
        &draw,
        &mut opt,
        1e-3,
        Some(1.0),
    )
    .unwrap();
    assert!(s2.loss < s.loss, "{} -> {}", s.loss, s2.loss);
}

/// The full gradient of a weight and the gradient of a zero-initialised LoRA on it agree:
/// dL/dB = alpha/r * dL/dW A^T (so full_grads names the right tensors).
#[test]
fn full_gradients_agree_with_lora_gradients() {
    let root = reference();
    let model_dir = root.join("models/cogvideox-5b-tiny");
    let dev = CpuDevice::default();
    let mut model =
        CogVideoXTransformer3DModel::<AD>::from_dir(&model_dir.join("transformer"), &dev).unwrap();
    inject_lora(
        &mut model,
        &AdapterSpec {
            rank: 2,
            alpha: 3.0,
            targets: vec!["to_v".into(), "ff.net.2".into()],
        },
        &dev,
    )
    .unwrap();
    let mut model = enable_full_training(model);
    let schedule = load_schedule(&model_dir).unwrap();
    let (batch, draw) = tiny_batch(&model, 5);
    let loss = compute_loss(&model, &schedule, &batch, &draw).unwrap();
    let grads = loss.backward();
    let full = full_grads(&model, &grads);
    let lora = adapter_grads(&mut model, &grads);
    let values = trainable_values(&mut model);
    assert!(full.keys().all(|k| !k.contains("lora")));
    for layer in [
        "transformer_blocks.1.attn1.to_v",
        "transformer_blocks.0.ff.net.2",
    ] {
        let g = match &full[&format!("{layer}.weight")] {
            AdapterTensor::Matrix(m) => m.clone(),
            _ => panic!(),
        };
        let a = match &values[&format!("{layer}.lora_A.weight")] {
            AdapterTensor::Matrix(m) => m.clone(),
            _ => panic!(),
        };
        let want = g
            .matmul(a.transpose())
            .mul_scalar(1.5)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let got = lora[&format!("{layer}.lora_B.weight")].to_vec();
        let err = rel_l2(&got, &want);
        assert!(err < 1e-4, "{layer}: {err:.2e}");
    }
}

#[test]
fn set_full_values_round_trips_and_refuses_bad_input() {
    let root = reference();
    let dev = CpuDevice::default();
    let dir = root.join("models/cogvideox-2b-tiny/transformer");
    let mut model = CogVideoXTransformer3DModel::<AD>::from_dir(&dir, &dev).unwrap();
    let mut values = full_values(&model);
    let key = "transformer_blocks.1.attn1.to_k.weight".to_string();
    let shape = values[&key].shape();
    let new: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| i as f32 * 0.01)
        .collect();
    // A flattened vector is accepted as well as the matrix.
    values.insert(
        key.clone(),
        AdapterTensor::from_vec(&[new.len()], new.clone(), &dev).unwrap(),
    );
    set_full_values(&mut model, &values).unwrap();
    assert_eq!(full_values(&model)[&key].to_vec(), new);
    assert_eq!(full_values(&model)[&key].shape(), shape);
    assert!(model.transformer_blocks[1]
        .attn1
        .to_k
        .weight
        .val()
        .is_require_grad());

    let bad = BTreeMap::from([(
        "transformer_blocks.9.attn1.to_k.weight".to_string(),
        values[&key].clone(),
    )]);
    let e = set_full_values(&mut model, &bad).unwrap_err().to_string();
    assert!(
        e.contains("no transformer parameter named transformer_blocks.9.attn1.to_k.weight"),
        "{e}"
    );
    let bad = BTreeMap::from([(
        key.clone(),
        AdapterTensor::from_vec(&[2, 2], vec![0.0; 4], &dev).unwrap(),
    )]);
    let e = set_full_values(&mut model, &bad).unwrap_err().to_string();
    assert!(e.contains(&key) && e.contains("[2, 2]"), "{e}");
    assert_eq!(
        full_values(&model)[&key].to_vec(),
        new,
        "a refused update changes nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// SFT export

/// Loading a reference model and exporting it in its stored dtype with the shard size it was
/// saved with reproduces diffusers' files byte for byte: weights, shard split and index.
#[test]
fn transformer_export_reproduces_the_reference_folders() {
    let root = reference();
    let out = tempfile::tempdir().unwrap();
    for (variant, dtype, shard) in [
        ("cogvideox-2b", ExportDtype::F16, DEFAULT_MAX_SHARD_BYTES),
        ("cogvideox-5b", ExportDtype::Bf16, 40_000),
        ("cogvideox-5b-i2v", ExportDtype::Bf16, 40_000),
        ("cogvideox1.5-5b", ExportDtype::Bf16, 40_000),
        ("cogvideox1.5-5b-i2v", ExportDtype::Bf16, 40_000),
    ] {
        let src = root.join(format!("models/{variant}-tiny/transformer"));
        let model =
            CogVideoXTransformer3DModel::<AD>::from_dir(&src, &CpuDevice::default()).unwrap();
        let dir = out.path().join(variant).join("transformer");
        let exported = save_transformer_folder(&model, &src, &dir, shard, dtype).unwrap();
        let mut want: Vec<String> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut got: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{variant}: files");
        for f in &want {
            assert!(
                std::fs::read(dir.join(f)).unwrap() == std::fs::read(src.join(f)).unwrap(),
                "{variant}: {f} differs"
            );
        }
        assert_eq!(exported.files.len(), if shard == 40_000 { 4 } else { 1 });
        // No temporary folder is left next to it.
        assert_eq!(std::fs::read_dir(dir.parent().unwrap()).unwrap().count(), 1);
    }
}

/// An SFT-trained model exported (fp32, sharded small) loads back with from_dir and gives the
/// same output; an existing export is replaced; bad targets and adapter models are refused.
#[test]
fn exported_sft_model_loads_back_with_the_same_output() {
    let root = reference();
    let model_dir = root.join("models/cogvideox-5b-i2v-tiny");
    let src = model_dir.join("transformer");
    let dev = CpuDevice::default();
    let mut model =
        enable_full_training(CogVideoXTransformer3DModel::<AD>::from_dir(&src, &dev).unwrap());
    let schedule = load_schedule(&model_dir).unwrap();
    let (mut batch, draw) = tiny_batch(&model, 2);
    batch.image_latents = Some(batch.latents.clone().narrow(2, 0, 1));
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 1e-4,
    });
    train_step_for(
        TrainMode::Full,
        &mut model,
        &schedule,
        &batch,
        &draw,
        &mut opt,
        1e-3,
        Some(1.0),
    )
    .unwrap();

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("transformer");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), b"stale").unwrap();
    let exported = save_transformer_folder(&model, &src, &dir, 20_000, ExportDtype::F32).unwrap();
    assert!(exported.files.len() > 4, "{:?}", exported.files);
    assert!(
        !dir.join("diffusion_pytorch_model.safetensors").exists(),
        "the stale file is gone with the old folder"
    );
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("diffusion_pytorch_model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["metadata"]["total_size"].as_u64(),
        Some(exported.total_size)
    );
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        state_dict_keys(&model.config).len()
    );

    let loaded = CogVideoXTransformer3DModel::<AD>::from_dir(&dir, &dev).unwrap();
    for (k, v) in full_values(&model) {
        assert_eq!(full_values(&loaded)[&k].to_vec(), v.to_vec(), "{k}");
    }
    let x = Tensor::<AD, 5>::random([1, 3, 8, 8, 12], Distribution::Normal(0.0, 1.0), &dev);
    let text = Tensor::<AD, 3>::random([1, 16, 32], Distribution::Normal(0.0, 1.0), &dev);
    let t = Tensor::<AD, 1>::from_floats([500.0], &dev);
    let run = |m: &CogVideoXTransformer3DModel<AD>| {
        let rot = m.image_rotary_emb(3, 8, 12, &dev).unwrap();
        m.forward(x.clone(), text.clone(), t.clone(), None, rot.as_ref())
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(run(&loaded), run(&model));

    // A folder with other files is not replaced; a config from another model is refused.
    let busy = out.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let e = save_transformer_folder(&model, &src, &busy, 20_000, ExportDtype::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("busy") && e.contains("other files"), "{e}");
    assert!(busy.join("notes.txt").exists());
    let e = save_transformer_folder(
        &model,
        &root.join("models/cogvideox-5b-tiny/transformer"),
        &out.path().join("x"),
        20_000,
        ExportDtype::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("config.json") && e.contains("differs from the model's"),
        "{e}"
    );
    inject_lora(&mut model, &AdapterSpec::lora(2, 2.0), &dev).unwrap();
    let e = save_transformer_folder(
        &model,
        &src,
        &out.path().join("y"),
        20_000,
        ExportDtype::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("transformer_blocks.0.attn1.to_q") && e.contains("adapter"),
        "{e}"
    );
    assert!(!out.path().join("x").exists() && !out.path().join("y").exists());
}

// ---------------------------------------------------------------------------------------------
// PEFT-named adapter export

fn dora_recipe() -> AdapterRecipe {
    AdapterRecipe {
        params: vec![
            ParamSpec {
                name: "A".into(),
                shape: vec![Dim::Rank, Dim::In],
                init: Init::KaimingUniform { a: 5f32.sqrt() },
                trainable: true,
            },
            ParamSpec {
                name: "B".into(),
                shape: vec![Dim::Out, Dim::Rank],
                init: Init::Normal { std: 0.1 },
                trainable: true,
            },
            ParamSpec {
                name: "m".into(),
                shape: vec![Dim::Out],
                init: Init::BaseRowNorm,
                trainable: true,
            },
        ],
        graph: vec![
            Op::BaseWeight,
            Op::Param("B".into()),
            Op::Param("A".into()),
            Op::Matmul(1, 2),
            Op::AlphaOverRank(3),
            Op::Add(0, 4),
            Op::RowNorm(5),
            Op::Detach(6), // PEFT detaches the weight norm (as plugins/dora does)
            Op::Div(5, 7),
            Op::Param("m".into()),
            Op::Mul(9, 8),
        ],
        output: 10,
        output_kind: AdapterOutput::Weight,
        export: vec![
            ExportKey {
                param: "A".into(),
                suffix: "lora_A.weight".into(),
            },
            ExportKey {
                param: "B".into(),
                suffix: "lora_B.weight".into(),
            },
            ExportKey {
                param: "m".into(),
                suffix: "lora_magnitude_vector".into(),
            },
        ],
        peft_type: "LORA".into(),
    }
}

fn loha_recipe() -> AdapterRecipe {
    let p = |n: &str, shape: Vec<Dim>| ParamSpec {
        name: n.into(),
        shape,
        init: Init::Normal { std: 0.1 },
        trainable: true,
    };
    AdapterRecipe {
        params: vec![
            p("hada_w1_a", vec![Dim::Out, Dim::Rank]),
            p("hada_w1_b", vec![Dim::Rank, Dim::In]),
            p("hada_w2_a", vec![Dim::Out, Dim::Rank]),
            p("hada_w2_b", vec![Dim::Rank, Dim::In]),
        ],
        graph: vec![
            Op::Param("hada_w1_a".into()),
            Op::Param("hada_w1_b".into()),
            Op::Matmul(0, 1),
            Op::Param("hada_w2_a".into()),
            Op::Param("hada_w2_b".into()),
            Op::Matmul(3, 4),
            Op::Mul(2, 5),
            Op::AlphaOverRank(6),
        ],
        output: 7,
        output_kind: AdapterOutput::WeightDelta,
        export: ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
            .iter()
            .map(|n| ExportKey {
                param: n.to_string(),
                suffix: n.to_string(),
            })
            .collect(),
        peft_type: "LOHA".into(),
    }
}

/// A built-in LoRA saved through save_adapter is byte-identical to save_lora's file.
#[test]
fn save_adapter_writes_a_builtin_lora_as_save_lora_does() {
    let root = reference();
    let dev = CpuDevice::default();
    let mut model = freeze(
        CogVideoXTransformer3DModel::<AD>::from_dir(
            &root.join("models/cogvideox-2b-tiny/transformer"),
            &dev,
        )
        .unwrap(),
    );
    let spec = AdapterSpec::lora(2, 3.0);
    inject_lora(&mut model, &spec, &dev).unwrap();
    let out = tempfile::tempdir().unwrap();
    let meta = adapter_metadata(&mut model, &spec, BTreeMap::new()).unwrap();
    assert_eq!((meta.peft_type.as_str(), meta.use_dora), ("LORA", false));
    let a = save_adapter(&mut model, &out.path().join("a"), &meta).unwrap();
    let lm = LoraMetadata {
        rank: 2,
        alpha: 3.0,
        target_modules: spec.targets.clone(),
    };
    let b = save_lora(&out.path().join("b"), &trainable_values(&mut model), &lm).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    let loaded = load_adapter(&a).unwrap();
    assert_eq!(loaded.metadata.as_ref().unwrap(), &meta_sorted(meta));
}

fn meta_sorted(mut m: AdapterMetadata) -> AdapterMetadata {
    m.target_modules.sort();
    m
}

/// DoRA and LoHa recipes export under PEFT's names with PEFT's config, and load back into a
/// fresh model to the same loss.
#[test]
fn recipe_adapters_export_under_peft_names_and_load_back() {
    let root = reference();
    let model_dir = root.join("models/cogvideox-5b-tiny");
    let dev = CpuDevice::default();
    let load = || {
        freeze(
            CogVideoXTransformer3DModel::<AD>::from_dir(&model_dir.join("transformer"), &dev)
                .unwrap(),
        )
    };
    let schedule = load_schedule(&model_dir).unwrap();
    let spec = AdapterSpec {
        rank: 2,
        alpha: 4.0,
        targets: vec!["to_q".into(), "to_out.0".into()],
    };
    let out = tempfile::tempdir().unwrap();
    for (name, recipe, settings) in [
        (
            "dora",
            dora_recipe(),
            serde_json::json!({"use_rslora": false, "init_lora_weights": "gaussian"}),
        ),
        (
            "loha",
            loha_recipe(),
            serde_json::json!({"init_weights": false}),
        ),
    ] {
        let mut model = load();
        inject_recipe(
            &mut model,
            &spec,
            RecipeLimits::default(),
            |_| Ok::<_, String>(recipe.clone()),
            &dev,
        )
        .unwrap();
        let settings = peft_settings(&recipe.peft_type, &settings);
        let meta = adapter_metadata(&mut model, &spec, settings).unwrap();
        let path = save_adapter(&mut model, &out.path().join(name), &meta).unwrap();
        let (header, tensors) = read_safetensors(&path);
        let dict: serde_json::Value =
            serde_json::from_str(&header["lora_adapter_metadata"]).unwrap();
        assert_eq!(header["format"], "pt");
        let layer = "transformer.transformer_blocks.1.attn1.to_out.0";
        match name {
            "dora" => {
                assert_eq!(tensors.len(), 4 * 3);
                assert_eq!(
                    tensors[&format!("{layer}.lora_magnitude_vector")].1,
                    vec![32]
                );
                assert_eq!(tensors[&format!("{layer}.lora_A.weight")].1, vec![2, 32]);
                assert_eq!(dict["transformer.use_dora"], serde_json::json!(true));
                assert_eq!(
                    dict["transformer.init_lora_weights"],
                    serde_json::json!("gaussian")
                );
                assert_eq!(dict["transformer.lora_alpha"], serde_json::json!(4));
                assert_eq!(dict["transformer.peft_type"], serde_json::json!("LORA"));
            }
            _ => {
                assert_eq!(tensors.len(), 4 * 4);
                assert_eq!(tensors[&format!("{layer}.hada_w1_a")].1, vec![32, 2]);
                assert_eq!(dict["transformer.peft_type"], serde_json::json!("LOHA"));
                assert_eq!(dict["transformer.alpha"], serde_json::json!(4));
                assert_eq!(dict["transformer.init_weights"], serde_json::json!(false));
                assert!(dict.get("transformer.lora_alpha").is_none());
            }
        }
        assert!(tensors.values().all(|(dtype, _, _)| dtype == "F32"));

        // Load into a freshly injected model: same adapter values, same loss.
        let loaded = load_adapter(&path).unwrap();
        assert_eq!(
            loaded.metadata.as_ref().unwrap(),
            &meta_sorted(meta.clone())
        );
        let mut fresh = load();
        inject_recipe(
            &mut fresh,
            &spec,
            RecipeLimits::default(),
            |_| Ok::<_, String>(recipe.clone()),
            &dev,
        )
        .unwrap();
        let values: BTreeMap<String, AdapterTensor<cogvx_model_core::CpuBackend>> =
            loaded.values(&dev).unwrap();
        set_adapter_values(&mut fresh, &values).unwrap();
        let (batch, draw) = tiny_batch(&model, 4);
        let l1 = compute_loss(&model, &schedule, &batch, &draw)
            .unwrap()
            .into_scalar();
        let l2 = compute_loss(&fresh, &schedule, &batch, &draw)
            .unwrap()
            .into_scalar();
        assert_eq!(l1, l2, "{name}");
    }

    // Refusals: metadata that disagrees with the model, an unexported trainable parameter, no adapter.
    let mut model = load();
    inject_recipe(
        &mut model,
        &spec,
        RecipeLimits::default(),
        |_| Ok::<_, String>(dora_recipe()),
        &dev,
    )
    .unwrap();
    let mut meta = adapter_metadata(&mut model, &spec, BTreeMap::new()).unwrap();
    meta.use_dora = false;
    let e = save_adapter(&mut model, out.path(), &meta)
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_dora = false"), "{e}");
    let mut bad = dora_recipe();
    bad.export.pop();
    let mut model = load();
    inject_recipe(
        &mut model,
        &spec,
        RecipeLimits::default(),
        |_| Ok::<_, String>(bad.clone()),
        &dev,
    )
    .unwrap();
    let e = adapter_metadata(&mut model, &spec, BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("transformer_blocks.0.attn1.to_q") && e.contains("`m` has no export key"),
        "{e}"
    );
    let e = adapter_metadata(&mut load(), &spec, BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no adapter"), "{e}");
}

/// A recipe with a frozen random parameter: all_adapter_values holds it (trainable_values does
/// not), and restoring them into a model injected under another seed gives the same loss.
#[test]
fn all_adapter_values_restore_frozen_recipe_parameters() {
    use burn::tensor::backend::Backend;
    let root = reference();
    let model_dir = root.join("models/cogvideox-2b-tiny");
    let dev = CpuDevice::default();
    let mut recipe = loha_recipe();
    recipe.params[0].trainable = false;
    recipe.export.remove(0);
    // Factors of std 1 (not the recipe's 0.1): with 0.1 the LoHa delta is ~1e-4 and the two
    // seeds' losses could round to the same f32 (CI saw 16.602932 twice), which says nothing
    // about the restore.
    for p in &mut recipe.params {
        p.init = Init::Normal { std: 1.0 };
    }
    let spec = AdapterSpec {
        rank: 2,
        alpha: 2.0,
        targets: vec!["to_k".into()],
    };
    let build = |seed: u64| {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        AD::seed(&dev, seed);
        let mut m = freeze(
            CogVideoXTransformer3DModel::<AD>::from_dir(&model_dir.join("transformer"), &dev)
                .unwrap(),
        );
        inject_recipe(
            &mut m,
            &spec,
            RecipeLimits::default(),
            |_| Ok::<_, String>(recipe.clone()),
            &dev,
        )
        .unwrap();
        m
    };
    let mut a = build(1);
    let mut b = build(2);
    let all = all_adapter_values(&mut a);
    assert_eq!(all.len(), 2 * 4);
    assert_eq!(trainable_values(&mut a).len(), 2 * 3);
    assert!(all.contains_key("transformer_blocks.0.attn1.to_k.hada_w1_a"));
    let schedule = load_schedule(&model_dir).unwrap();
    let (batch, draw) = tiny_batch(&a, 9);
    let la = compute_loss(&a, &schedule, &batch, &draw)
        .unwrap()
        .into_scalar();
    assert_ne!(
        la,
        compute_loss(&b, &schedule, &batch, &draw)
            .unwrap()
            .into_scalar()
    );
    set_adapter_values(&mut b, &all).unwrap();
    assert_eq!(
        la,
        compute_loss(&b, &schedule, &batch, &draw)
            .unwrap()
            .into_scalar()
    );
    // The frozen parameter has no export key: the export skips it, the trainable ones are saved.
    let out = tempfile::tempdir().unwrap();
    let meta = adapter_metadata(&mut a, &spec, BTreeMap::new()).unwrap();
    let path = save_adapter(&mut a, out.path(), &meta).unwrap();
    assert_eq!(load_adapter(&path).unwrap().tensors.len(), 2 * 3);
}
