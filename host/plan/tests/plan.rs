//! The plan of the released models: token counts, what each setting changes, verdicts and the
//! errors a config can hit.

use cogvx_model_core::precision::MixedPrecision;
use cogvx_plan::{
    plan, DeviceKind, Distribution, ModelConfigs, PlanInput, Shape, Trainable, ValidationInput,
};

fn lora() -> Trainable {
    Trainable::Lora {
        rank: 128,
        targets: ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec(),
    }
}

fn input(model: &str, shape: Shape) -> PlanInput {
    PlanInput {
        models: ModelConfigs::released(model).unwrap(),
        shape,
        batch_size: 1,
        trainable: lora(),
        gradient_checkpointing: true,
        checkpoint_offload: false,
        recompute_feed_forward: false,
        mixed_precision: MixedPrecision::No,
        validation: None,
        device: DeviceKind::Cuda,
        distribution: Distribution::default(),
    }
}

const S480: Shape = Shape {
    frames: 49,
    height: 480,
    width: 720,
};
const S768: Shape = Shape {
    frames: 81,
    height: 768,
    width: 1360,
};

fn phase<'a>(p: &'a cogvx_plan::Plan, name: &str) -> &'a cogvx_plan::Phase {
    p.phases
        .iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("no phase {name}"))
}

fn item(p: &cogvx_plan::Phase, starts: &str) -> u64 {
    p.items
        .iter()
        .find(|i| i.name.starts_with(starts))
        .unwrap_or_else(|| panic!("no item {starts}: {:?}", p.items))
        .bytes
}

#[test]
fn token_counts_are_the_real_sequence_lengths() {
    let p = plan(&input("cogvideox-2b", S480)).unwrap();
    assert_eq!(
        (p.tokens.text, p.tokens.video, p.tokens.total),
        (226, 13 * 30 * 45, 17_776)
    );
    // CogVideoX 1.5: 21 latent frames in pairs (patch_size_t = 2) -> 11 x 48 x 85.
    let p = plan(&input("THUDM/CogVideoX1.5-5B", S768)).unwrap();
    assert_eq!(p.tokens.total, 45_106);
}

#[test]
fn weights_are_the_parameter_count_in_f32_and_lora_sizes_follow_the_rank() {
    let p = plan(&input("cogvideox-2b", S480)).unwrap();
    let train = phase(&p, "train");
    assert_eq!(
        item(train, "transformer weights"),
        p.transformer_parameters * 4
    );
    // rank 128 x (1920 + 1920) x 4 layers x 30 blocks.
    assert_eq!(p.trainable_parameters, 128 * 3840 * 4 * 30);
    assert_eq!(item(train, "AdamW states"), 2 * 4 * p.trainable_parameters);
    let mut half = input("cogvideox-2b", S480);
    half.trainable = Trainable::Lora {
        rank: 64,
        targets: vec![
            "to_q".into(),
            "to_k".into(),
            "to_v".into(),
            "to_out.0".into(),
        ],
    };
    assert_eq!(
        plan(&half).unwrap().trainable_parameters * 2,
        p.trainable_parameters
    );
    // SFT trains every weight but the 5B-I2V's learned positional table (a buffer, as in diffusers).
    let mut sft = input("cogvideox-5b-i2v", S480);
    sft.trainable = Trainable::Full;
    let s = plan(&sft).unwrap();
    assert!(s.trainable_parameters < s.transformer_parameters);
    assert_eq!(
        s.transformer_parameters - s.trainable_parameters,
        (226 + 13 * 30 * 45) * 3072
    );
    // The I2V model keeps the VAE for the image latents while it trains.
    assert!(phase(&s, "train")
        .items
        .iter()
        .any(|i| i.name.starts_with("VAE (I2V")));
}

#[test]
fn checkpointing_and_batch_change_the_activations_as_they_should() {
    let ck = plan(&input("cogvideox-5b", S480)).unwrap();
    let mut no = input("cogvideox-5b", S480);
    no.gradient_checkpointing = false;
    let no = plan(&no).unwrap();
    let act = |p: &cogvx_plan::Plan| item(phase(p, "train"), "activations");
    // 42 blocks kept whole (about 9 [tokens, 3072] tensors each, the feed-forward keeping only
    // its input) vs their inputs plus one block: at least 5x less.
    assert!(act(&no) > 5 * act(&ck), "{} vs {}", act(&no), act(&ck));
    let mut two = input("cogvideox-5b", S480);
    two.batch_size = 2;
    let two = plan(&two).unwrap();
    let ratio = act(&two) as f64 / act(&ck) as f64;
    assert!((ratio - 2.0).abs() < 1e-9, "{ratio}");
}

#[test]
fn validation_loads_the_vae_not_t5_and_the_verdict_follows_the_budget() {
    let mut i = input("cogvideox-2b", S480);
    i.validation = Some(ValidationInput {
        shape: S480,
        guidance: true,
    });
    let p = plan(&i).unwrap();
    let v = phase(&p, "validation");
    // The validation prompts are T5-encoded before training: T5 is counted in prepare only.
    assert!(
        v.items.iter().all(|i| !i.name.contains("T5")),
        "{:?}",
        v.items
    );
    assert!(item(phase(&p, "prepare-prompts"), "T5 encoder weights") > 4_700_000_000 * 4);
    // Under mixed precision T5 keeps bf16 weights (either half dtype: fp16 overflows in T5).
    for precision in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
        let mut half = i.clone();
        half.mixed_precision = precision;
        let half = plan(&half).unwrap();
        assert_eq!(
            item(phase(&half, "prepare-prompts"), "T5 encoder weights") * 2,
            item(phase(&p, "prepare-prompts"), "T5 encoder weights")
        );
    }
    assert!(item(v, "VAE weights") > 200_000_000 * 4);
    // The decode is tiled (240x360 tiles for 480x720): a whole-frame decode would keep 4x one tile.
    let vae = &ModelConfigs::released("cogvideox-2b").unwrap().vae;
    let tiled = cogvx_plan::activations::vae_decode_bytes(vae, S480);
    let small = cogvx_plan::activations::vae_decode_bytes(
        vae,
        Shape {
            frames: 49,
            height: 240,
            width: 352,
        },
    );
    assert!(
        tiled < 3 * small,
        "tiled decode {tiled} vs one tile {small}"
    );
    assert_eq!(
        p.peak_bytes,
        p.phases.iter().map(|p| p.peak_bytes).max().unwrap()
    );
    let fits = p.clone().with_budget(p.peak_gib + 0.01);
    assert_eq!(fits.fits, Some(true));
    let tight = p.with_budget(phase(&fits, "train").peak_gib + 0.01);
    assert_eq!(tight.fits, Some(false));
    assert_eq!(phase(&tight, "train").fits, Some(true));
    let text = tight.render();
    assert!(
        text.contains("does not fit in") && text.contains("DOES NOT FIT"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::to_value(&tight).unwrap();
    for p in json["phases"].as_array().unwrap() {
        assert!(
            p["peak_gib"].as_f64().unwrap() > 0.0 && p["fits"].is_boolean(),
            "{p}"
        );
    }
}

#[test]
fn bad_input_is_an_error_naming_the_key() {
    let e = plan(&input(
        "cogvideox-2b",
        Shape {
            frames: 50,
            height: 480,
            width: 720,
        },
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("frames must be 4k + 1"), "{e}");
    let e = plan(&input(
        "cogvideox-2b",
        Shape {
            frames: 49,
            height: 488,
            width: 720,
        },
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("multiples of 16"), "{e}");
    let mut i = input("cogvideox-2b", S480);
    i.trainable = Trainable::Lora {
        rank: 16,
        targets: vec!["to_qq".into()],
    };
    let e = plan(&i).unwrap_err().to_string();
    assert!(e.contains("target_modules") && e.contains("to_qq"), "{e}");
    i.batch_size = 0;
    assert!(plan(&i).unwrap_err().to_string().contains("batch_size"));
    let e = ModelConfigs::released("cogvideox-7b")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cogvideox-7b") && e.contains("cogvideox1.5-5b-i2v"),
        "{e}"
    );
}

/// Mixed precision: frozen weights in half (LoRA), f32 masters plus half copies cast at use
/// (SFT); the activations a block keeps shrink except the f32 norm statistics.
#[test]
fn mixed_precision_halves_the_frozen_weights_and_most_activations() {
    let f32_run = plan(&input("cogvideox-2b", S480)).unwrap();
    let bf16 = plan(&PlanInput {
        mixed_precision: MixedPrecision::Bf16,
        ..input("cogvideox-2b", S480)
    })
    .unwrap();
    let (a, b) = (phase(&f32_run, "train"), phase(&bf16, "train"));
    assert_eq!(
        item(b, "transformer weights") * 2,
        item(a, "transformer weights")
    );
    assert!(
        b.items.iter().any(|i| i.name.contains("bf16")),
        "{:?}",
        b.items
    );
    // Trainable parameters and AdamW states stay f32.
    assert_eq!(item(b, "AdamW states"), item(a, "AdamW states"));
    let (sa, sb) = (item(a, "activations"), item(b, "activations"));
    assert!(sb < sa && sb > sa / 2, "activations {sa} -> {sb}");
    // SFT keeps f32 masters and adds their half copies.
    let sft = |mp| {
        plan(&PlanInput {
            trainable: Trainable::Full,
            mixed_precision: mp,
            ..input("cogvideox-2b", S480)
        })
        .unwrap()
    };
    let (fa, fb) = (sft(MixedPrecision::No), sft(MixedPrecision::Fp16));
    let (ta, tb) = (phase(&fa, "train"), phase(&fb, "train"));
    assert_eq!(
        item(tb, "transformer weights"),
        item(ta, "transformer weights")
    );
    assert_eq!(
        item(tb, "half copies of the weights") * 2,
        item(ta, "transformer weights")
    );
    assert!(fb.render().contains("mixed precision fp16"));
}

#[test]
fn a_lora_on_the_feed_forward_keeps_its_hidden_layer() {
    let act = |targets: &[&str], recompute: bool| {
        let mut i = input("cogvideox-2b", S480);
        i.gradient_checkpointing = false;
        i.recompute_feed_forward = recompute;
        i.trainable = Trainable::Lora {
            rank: 128,
            targets: targets.iter().map(|t| t.to_string()).collect(),
        };
        item(phase(&plan(&i).unwrap(), "train"), "activations")
    };
    let attention = ["to_q", "to_k", "to_v", "to_out.0"];
    let with_ff = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"];
    // Layer by layer, each of the 30 blocks keeps the hidden layer [17776, 7680] and the LoRA's
    // `x A` [17776, 128]; the ff input it keeps either way (for the LoRA's A, or as the one
    // operation's saved input). The one operation keeps its pre-activation, of the hidden
    // layer's size, unless it recomputes it.
    assert_eq!(
        act(&with_ff, true) - act(&attention, true),
        30 * 17_776 * (7680 + 128) * 4
    );
    assert_eq!(
        act(&with_ff, false) - act(&attention, false),
        30 * 17_776 * 128 * 4
    );
    // A LoRA on the feed-forward runs it layer by layer: the setting changes nothing.
    assert_eq!(act(&with_ff, true), act(&with_ff, false));
}

/// `recompute_feed_forward` drops each block's kept pre-activation: every block's without
/// checkpointing, the recomputed block's with it.
#[test]
fn recomputing_the_feed_forward_drops_its_pre_activation() {
    let act = |checkpointing: bool, recompute: bool| {
        let i = PlanInput {
            gradient_checkpointing: checkpointing,
            recompute_feed_forward: recompute,
            ..input("cogvideox-2b", S480)
        };
        let p = plan(&i).unwrap();
        assert_eq!(
            phase(&p, "train").what.contains("feed-forwards recomputed"),
            recompute
        );
        item(phase(&p, "train"), "activations")
    };
    let pre = 17_776 * 7680 * 4;
    assert_eq!(act(false, false) - act(false, true), 30 * pre);
    assert_eq!(act(true, false) - act(true, true), pre);
}

#[test]
fn offloaded_block_inputs_leave_the_gpu_but_not_the_cpu() {
    let act = |offload: bool, device: DeviceKind| {
        let i = PlanInput {
            checkpoint_offload: offload,
            mixed_precision: MixedPrecision::Bf16,
            device,
            ..input("cogvideox-5b", S480)
        };
        item(phase(&plan(&i).unwrap(), "train"), "activations")
    };
    // 42 blocks: 41 of the bf16 [17776, 3072] inputs wait in host memory, the one being
    // recomputed is on the GPU.
    assert_eq!(
        act(false, DeviceKind::Cuda) - act(true, DeviceKind::Cuda),
        41 * 17_776 * 3072 * 2
    );
    // On the CPU host memory is the device's.
    assert_eq!(act(false, DeviceKind::Cpu), act(true, DeviceKind::Cpu));
}

/// ZeRO-2 over N processes keeps 1/N of the AdamW states per process; optimizer offload takes
/// them out of a GPU's budget (into host memory) but not out of the CPU's; the rest of the
/// train phase (weights, gradients, activations) is unchanged.
#[test]
fn zero_2_divides_the_adamw_states_and_offload_moves_them_to_the_host() {
    // f32 SFT: only the AdamW states move.
    let sft = |distribution: Distribution, device: DeviceKind| {
        plan(&PlanInput {
            trainable: Trainable::Full,
            distribution,
            device,
            ..input("cogvideox-2b", S480)
        })
        .unwrap()
    };
    let one = sft(Distribution::default(), DeviceKind::Cuda);
    let zero4 = sft(
        Distribution {
            world_size: 4,
            zero_stage: 2,
            optimizer_offload: false,
        },
        DeviceKind::Cuda,
    );
    let (a, b) = (phase(&one, "train"), phase(&zero4, "train"));
    let states = item(a, "AdamW states");
    assert_eq!(states, 2 * 4 * one.trainable_parameters);
    assert_eq!(item(b, "AdamW states"), states.div_ceil(4));
    assert_eq!(a.peak_bytes - b.peak_bytes, states - states.div_ceil(4));
    assert_eq!(item(b, "gradients"), item(a, "gradients"));
    assert!(zero4
        .render()
        .contains("4 processes (the plan is per process), ZeRO-2"));
    // Four processes without ZeRO each keep the whole state.
    let dp4 = sft(
        Distribution {
            world_size: 4,
            ..Distribution::default()
        },
        DeviceKind::Cuda,
    );
    assert_eq!(phase(&dp4, "train").peak_bytes, a.peak_bytes);

    let offload = Distribution {
        optimizer_offload: true,
        ..Distribution::default()
    };
    let off = sft(offload, DeviceKind::Cuda);
    let t = phase(&off, "train");
    assert_eq!(item(t, "AdamW states"), 0);
    assert_eq!(a.peak_bytes - t.peak_bytes, states);
    assert!(t
        .items
        .iter()
        .any(|i| i.name.contains("offloaded, 12.62 GiB of host memory")));
    // The validation phase keeps them where training does.
    let cpu = sft(offload, DeviceKind::Cpu);
    assert_eq!(item(phase(&cpu, "train"), "AdamW states"), states);
    // In f32 there are no masters apart from the weights.
    assert!(!t.items.iter().any(|i| i.name.contains("master")));

    // fp16 SFT with offload (DeepSpeed's layout): fp16 weights and gradients on the GPU, no
    // separate half copies, the f32 masters beside the AdamW states in host memory.
    let fp16 = |distribution: Distribution, device: DeviceKind| {
        plan(&PlanInput {
            trainable: Trainable::Full,
            mixed_precision: MixedPrecision::Fp16,
            distribution,
            device,
            ..input("cogvideox-2b", S480)
        })
        .unwrap()
    };
    let autocast = fp16(Distribution::default(), DeviceKind::Cuda);
    let off = fp16(offload, DeviceKind::Cuda);
    let (c, h) = (phase(&autocast, "train"), phase(&off, "train"));
    assert_eq!(
        item(h, "transformer weights"),
        item(c, "transformer weights") / 2
    );
    assert_eq!(item(h, "gradients"), item(c, "gradients") / 2);
    assert_eq!(item(h, "f32 master weights"), 0);
    assert!(!h.items.iter().any(|i| i.name.contains("half copies")));
    assert!(
        h.items.iter().any(|i| i
            .name
            .contains("f32 master weights: 6.31 GiB of host memory")),
        "{:?}",
        h.items
    );
    let cpu = fp16(offload, DeviceKind::Cpu);
    assert_eq!(
        item(phase(&cpu, "train"), "f32 master weights"),
        item(c, "transformer weights")
    );
}
