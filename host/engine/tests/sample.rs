//! LoRA application and the `cogvx sample` job on the 2B tiny model: a LoRA with zero B leaves
//! the frames unchanged, a nonzero one changes them, the applied scale is diffusers'
//! `alpha / r` (checked against merged weights), bad LoRA files and outputs are refused before
//! any work, and the job writes a playable `.mp4` of the requested size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Distribution, Tensor};
use cogvx_adapters::{linear_layers_mut, load_lora, save_lora, LoadedLora, LoraMetadata};
use cogvx_engine::{
    apply_lora, default_alpha, frames_to_u8, sample, CogVideoXPipeline, SampleJob, SampleRequest,
};
use cogvx_model_core::adapter::AdapterTensor;
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_transformer::CogVideoXTransformer3DModel;

type B = CpuBackend;

fn reference() -> PathBuf {
    cogvx_fixtures::reference("")
}

fn request() -> SampleRequest {
    SampleRequest {
        prompts: vec!["a red kite over the sea".into()],
        negative_prompt: Some("blurry".into()),
        num_inference_steps: 2,
        guidance_scale: 6.0,
        max_sequence_length: 16,
        seed: 3,
        ..Default::default()
    }
}

/// Writes a rank-2 LoRA on `to_q`/`to_v` of both blocks with random A and `b_scale * N(0, 1)` B.
fn write_lora(dir: &Path, b_scale: f32, alpha: f64) -> PathBuf {
    let device = CpuDevice::default();
    let mut params = BTreeMap::new();
    for i in 0..2 {
        for m in ["to_q", "to_v"] {
            let name = format!("transformer_blocks.{i}.attn1.{m}");
            let a = Tensor::<B, 2>::random([2, 32], Distribution::Normal(0.0, 0.5), &device);
            let b =
                Tensor::<B, 2>::random([32, 2], Distribution::Normal(0.0, 1.0), &device) * b_scale;
            params.insert(format!("{name}.lora_A.weight"), AdapterTensor::Matrix(a));
            params.insert(format!("{name}.lora_B.weight"), AdapterTensor::Matrix(b));
        }
    }
    let meta = LoraMetadata {
        rank: 2,
        alpha,
        target_modules: vec!["to_q".into(), "to_v".into()],
    };
    save_lora(dir, &params, &meta).unwrap()
}

fn max_abs_diff(a: Tensor<B, 5>, b: Tensor<B, 5>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn zero_b_lora_keeps_the_frames_and_a_nonzero_one_changes_them() {
    let reference = reference();
    let device = CpuDevice::default();
    let dir = reference.join("models/cogvideox-2b-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let mut pipe = CogVideoXPipeline::<B>::load(&dir, &device).unwrap();
    let base = pipe.generate(&request(), &device).unwrap();

    let zero_dir = tmp.path().join("zero");
    std::fs::create_dir(&zero_dir).unwrap();
    let zero = write_lora(&zero_dir, 0.0, 4.0);
    let plain = pipe.transformer.clone();
    let names = apply_lora(
        &mut pipe.transformer,
        &load_lora(&zero).unwrap(),
        &zero,
        1.0,
        &device,
    )
    .unwrap();
    assert_eq!(names.len(), 4);
    let with_zero = pipe.generate(&request(), &device).unwrap();
    assert_eq!(
        max_abs_diff(base.clone(), with_zero),
        0.0,
        "lora_B = 0 changes nothing"
    );

    let nz_dir = tmp.path().join("nonzero");
    std::fs::create_dir(&nz_dir).unwrap();
    let nonzero = write_lora(&nz_dir, 0.5, 4.0);
    pipe.transformer = plain.clone();
    apply_lora(
        &mut pipe.transformer,
        &load_lora(&nonzero).unwrap(),
        &nonzero,
        1.0,
        &device,
    )
    .unwrap();
    let with_lora = pipe.generate(&request(), &device).unwrap();
    assert!(
        max_abs_diff(base.clone(), with_lora.clone()) > 1e-3,
        "a LoRA changes the video"
    );
    // Strength 0 is no LoRA.
    pipe.transformer = plain;
    apply_lora(
        &mut pipe.transformer,
        &load_lora(&nonzero).unwrap(),
        &nonzero,
        0.0,
        &device,
    )
    .unwrap();
    let off = pipe.generate(&request(), &device).unwrap();
    assert_eq!(max_abs_diff(base, off), 0.0);
}

/// diffusers' `fuse_lora`: `W + (alpha / r) B A`.
fn merged(
    model: &CogVideoXTransformer3DModel<B>,
    lora: &LoadedLora,
    alpha: f64,
    device: &CpuDevice,
) -> CogVideoXTransformer3DModel<B> {
    let mut model = model.clone();
    for (name, layer) in linear_layers_mut(&mut model) {
        let Some((a_shape, a)) = lora.tensors.get(&format!("{name}.lora_A.weight")) else {
            continue;
        };
        let (b_shape, b) = &lora.tensors[&format!("{name}.lora_B.weight")];
        let a = Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(a.clone(), [a_shape[0], a_shape[1]]),
            device,
        );
        let b = Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(b.clone(), [b_shape[0], b_shape[1]]),
            device,
        );
        let delta = b.matmul(a) * (alpha / a_shape[0] as f64);
        let w = layer.weight.val() + delta;
        layer.weight = burn::module::Param::from_tensor(w);
    }
    model
}

#[test]
fn the_reference_lora_applies_at_alpha_over_rank_as_diffusers_fuses_it() {
    let reference = reference();
    let device = CpuDevice::default();
    let path = reference.join("cases/cogvideox-2b.lora/pytorch_lora_weights.safetensors");
    let lora = load_lora(&path).unwrap();
    let meta = lora.metadata.clone().unwrap();
    assert_eq!((meta.rank, meta.alpha), (4, 2.0));
    let base = CogVideoXTransformer3DModel::<B>::from_dir(
        &reference.join("models/cogvideox-2b-tiny/transformer"),
        &device,
    )
    .unwrap();
    let mut adapted = base.clone();
    let names = apply_lora(&mut adapted, &lora, &path, 1.0, &device).unwrap();
    assert_eq!(names.len(), 8, "to_q, to_k, to_v, to_out.0 of 2 blocks");
    let fused = merged(&base, &lora, meta.alpha, &device);

    let x = Tensor::<B, 5>::random([1, 3, 4, 8, 12], Distribution::Normal(0.0, 1.0), &device);
    let text = Tensor::<B, 3>::random([1, 16, 32], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::full([1], 500.0, &device);
    let run = |m: &CogVideoXTransformer3DModel<B>| {
        m.forward(x.clone(), text.clone(), t.clone(), None, None)
            .unwrap()
    };
    let (y_base, y_lora, y_fused) = (run(&base), run(&adapted), run(&fused));
    let err = (y_lora.clone() - y_fused.clone())
        .powf_scalar(2.0)
        .sum()
        .sqrt()
        .into_scalar()
        / y_fused.clone().powf_scalar(2.0).sum().sqrt().into_scalar();
    let change = (y_base - y_fused.clone())
        .powf_scalar(2.0)
        .sum()
        .sqrt()
        .into_scalar()
        / y_fused.powf_scalar(2.0).sum().sqrt().into_scalar();
    assert!(err < 1e-5, "adapter vs fused weights: rel l2 {err}");
    assert!(
        change > 10.0 * err,
        "the LoRA must change the output measurably ({change} vs {err})"
    );
}

#[test]
fn bad_lora_files_are_refused_with_the_key_and_leave_the_model_unchanged() {
    let reference = reference();
    let device = CpuDevice::default();
    let mut model = CogVideoXTransformer3DModel::<B>::from_dir(
        &reference.join("models/cogvideox-2b-tiny/transformer"),
        &device,
    )
    .unwrap();
    let path = Path::new("/x/lora.safetensors");
    let m = |k: &str, shape: Vec<usize>| {
        (
            k.to_string(),
            (shape.clone(), vec![0.1; shape.iter().product()]),
        )
    };
    let meta = Some(LoraMetadata {
        rank: 2,
        alpha: 2.0,
        target_modules: vec![],
    });
    let cases = [
        (
            vec![
                m("transformer_blocks.0.attn1.to_q.lora_A.weight", vec![2, 32]),
                m("transformer_blocks.0.attn1.to_q.lora_B.weight", vec![32, 2]),
                m("transformer_blocks.9.attn1.to_q.lora_A.weight", vec![2, 32]),
                m("transformer_blocks.9.attn1.to_q.lora_B.weight", vec![32, 2]),
            ],
            "transformer_blocks.9.attn1.to_q",
        ),
        (
            vec![m(
                "transformer_blocks.0.attn1.to_q.lora_A.weight",
                vec![2, 32],
            )],
            "to_q.lora_B.weight` is missing",
        ),
        (
            vec![
                m("transformer_blocks.0.attn1.to_q.lora_A.weight", vec![2, 31]),
                m("transformer_blocks.0.attn1.to_q.lora_B.weight", vec![32, 2]),
            ],
            "do not fit",
        ),
        (
            vec![
                m("transformer_blocks.0.attn1.to_q.lora_A.weight", vec![3, 32]),
                m("transformer_blocks.0.attn1.to_q.lora_B.weight", vec![32, 3]),
            ],
            "says r = 2",
        ),
    ];
    for (tensors, want) in cases {
        let lora = LoadedLora {
            tensors: tensors.into_iter().collect(),
            metadata: meta.clone(),
        };
        let e = apply_lora(&mut model, &lora, path, 1.0, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/lora.safetensors") && e.contains(want), "{e}");
    }
    assert!(
        linear_layers_mut(&mut model)
            .iter()
            .all(|(_, l)| l.adapter.is_none()),
        "nothing attached"
    );
    // Without metadata diffusers takes alpha = the (most common) rank: scale 1.
    let lora = LoadedLora {
        tensors: [
            m("a.lora_A.weight", vec![4, 8]),
            m("a.lora_B.weight", vec![8, 4]),
            m("b.lora_A.weight", vec![4, 8]),
            m("b.lora_B.weight", vec![8, 4]),
            m("c.lora_B.weight", vec![8, 2]),
        ]
        .into_iter()
        .collect(),
        metadata: None,
    };
    assert_eq!(default_alpha(&lora), Some(4.0));
}

#[test]
fn sample_job_writes_an_mp4_and_checks_inputs_first() {
    let reference = reference();
    let device = CpuDevice::default();
    let tmp = tempfile::tempdir().unwrap();
    let model = reference.join("models/cogvideox-2b-tiny");
    let lora = reference.join("cases/cogvideox-2b.lora/pytorch_lora_weights.safetensors");

    let mut job = SampleJob::new(
        &model,
        "a red kite over the sea",
        tmp.path().join("kite.mp4"),
    );
    job.lora = Some(lora.clone());
    job.request = SampleRequest {
        num_inference_steps: 2,
        max_sequence_length: 16,
        ..job.request
    };
    let mut steps = 0;
    let written = sample::<B>(&job, None, &mut |_, _| steps += 1, &device).unwrap();
    assert_eq!(written, vec![tmp.path().join("kite.mp4")]);
    assert_eq!(steps, 2);
    let info = cogvx_video::probe(&written[0]).unwrap();
    assert_eq!((info.width, info.height, info.frame_count), (96, 64, 9));
    assert_eq!(info.fps, 8.0);

    // Refused before any weight is loaded.
    let refuse = |job: &SampleJob, want: &str| {
        let e = sample::<B>(job, None, &mut |_, _| {}, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{want}: {e}");
    };
    refuse(
        &SampleJob {
            out: tmp.path().join("no/such/dir/x.mp4"),
            ..job.clone()
        },
        "does not exist",
    );
    refuse(
        &SampleJob {
            out: tmp.path().join("x.gif"),
            ..job.clone()
        },
        ".mp4",
    );
    refuse(
        &SampleJob {
            image: Some(tmp.path().join("kite.png")),
            ..job.clone()
        },
        "text-to-video model",
    );
    refuse(
        &SampleJob {
            lora: Some(tmp.path().join("none.safetensors")),
            ..job.clone()
        },
        "none.safetensors",
    );
    let i2v = reference.join("models/cogvideox1.5-5b-i2v-tiny");
    refuse(
        &SampleJob {
            model: i2v.clone(),
            lora: None,
            ..job.clone()
        },
        "--image",
    );
    refuse(
        &SampleJob {
            model: i2v,
            lora: None,
            image: Some(tmp.path().join("gone.png")),
            ..job.clone()
        },
        "gone.png",
    );
}

#[test]
fn sample_job_runs_image_to_video_and_batches() {
    let reference = reference();
    let device = CpuDevice::default();
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("start.png");
    image::RgbImage::from_fn(50, 30, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 8) as u8, 128])
    })
    .save(&png)
    .unwrap();
    let mut job = SampleJob::new(
        reference.join("models/cogvideox1.5-5b-i2v-tiny"),
        "a",
        tmp.path().join("i2v.mp4"),
    );
    job.image = Some(png);
    job.request = SampleRequest {
        prompts: vec!["a boat".into(), "a bird".into()],
        num_inference_steps: 1,
        max_sequence_length: 16,
        ..job.request
    };
    let written = sample::<B>(&job, None, &mut |_, _| {}, &device).unwrap();
    assert_eq!(
        written,
        vec![tmp.path().join("i2v-0.mp4"), tmp.path().join("i2v-1.mp4")]
    );
    for path in &written {
        let info = cogvx_video::probe(path).unwrap();
        assert_eq!(
            (info.width, info.height, info.frame_count, info.fps),
            (96, 64, 9, 16.0)
        );
    }
}

#[test]
fn frames_to_u8_rounds_and_lays_out_rgb() {
    let device = CpuDevice::default();
    // [B=2, T=1, 3, H=1, W=2]
    let values = vec![
        0.0, 1.0, 0.5, 0.2, 1.5, -0.1, /* video 2 */ 0.25, 0.75, 0.0, 0.0, 1.0, 1.0,
    ];
    let t = Tensor::<B, 5>::from_data(
        burn::tensor::TensorData::new(values, [2, 1, 3, 1, 2]),
        &device,
    );
    let clips = frames_to_u8(t).unwrap();
    assert_eq!(clips.len(), 2);
    assert_eq!((clips[0].width, clips[0].height, clips[0].count), (2, 1, 1));
    // pixel (0,0) = (r 0.0, g 0.5, b 1.5→1), pixel (0,1) = (1.0, 0.2, -0.1→0)
    assert_eq!(clips[0].rgb, vec![0, 128, 255, 255, 51, 0]);
    assert_eq!(clips[1].rgb, vec![64, 0, 255, 191, 0, 255]);
    assert!(frames_to_u8(Tensor::<B, 5>::zeros([1, 1, 4, 2, 2], &device)).is_err());
}
