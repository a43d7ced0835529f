//! Image-to-video sampling (diffusers `CogVideoXImageToVideoPipeline`) on the tiny I2V models:
//! image latents (posterior sample, scaling, `invert_scale_latents`, zero padding, 1.5 first-frame
//! padding), the channel layout and `ofs` of the transformer input, seeding, output sizes, and
//! the refusal of images for text-to-video models and of text-only sampling for I2V models.
//! There is no I2V pipeline reference case; these tests check the port's structure.

use std::path::PathBuf;

use burn::tensor::Tensor;
use cogvx_engine::{
    CogVideoXPipeline, ConditionImage, NoiseSource, SampleRequest, SeededNoise, I2V_OFS,
};
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_scheduler::PlanExecutor;
use cogvx_vae::VaeOptions;

type B = CpuBackend;

fn model(name: &str) -> PathBuf {
    cogvx_fixtures::model(name)
}

/// A smooth colour gradient of `w x h` with a per-image `shift`.
fn gradient(w: u32, h: u32, shift: u32) -> ConditionImage {
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            rgb.push(((x * 255) / w.max(1)) as u8);
            rgb.push(((y * 255) / h.max(1)) as u8);
            rgb.push(((x + y + shift) % 256) as u8);
        }
    }
    ConditionImage::new(w, h, rgb).unwrap()
}

fn request(image: ConditionImage, steps: usize, guidance: f64, seed: u64) -> SampleRequest {
    SampleRequest {
        prompts: vec!["a boat drifting at dawn".into()],
        negative_prompt: Some("blurry".into()),
        images: vec![image],
        num_inference_steps: steps,
        guidance_scale: guidance,
        max_sequence_length: 16,
        seed,
        ..Default::default()
    }
}

fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn image_latents_are_scaled_padded_and_first_frame_padded_for_15() {
    let device = CpuDevice::default();
    for (name, invert) in [
        ("cogvideox-5b-i2v-tiny", false),
        ("cogvideox1.5-5b-i2v-tiny", true),
    ] {
        let dir = model(name);
        let pipe = CogVideoXPipeline::<B>::load(&dir, &device).unwrap();
        assert_eq!(pipe.vae.invert_scale_latents, invert, "{name}");
        let pixels = Tensor::stack::<4>(
            vec![
                gradient(96, 64, 0)
                    .preprocess::<B>(64, 96, &device)
                    .unwrap(),
                gradient(96, 64, 90)
                    .preprocess::<B>(64, 96, &device)
                    .unwrap(),
            ],
            0,
        );
        let opts = VaeOptions::default();
        // Reference: encode each image, posterior sample with the same noise stream, scale.
        let mut noise = SeededNoise::new(11);
        let mut want = Vec::new();
        for i in 0..2 {
            let img = pixels.clone().narrow(0, i, 1).unsqueeze_dim::<5>(2);
            let dist = pipe.vae.encode(img, &opts).unwrap();
            let eps = NoiseSource::<B>::sample(&mut noise, dist.mean.dims(), &device);
            let z = dist.mean.clone() + (dist.logvar.clone() * 0.5).exp() * eps;
            let sf = pipe.vae.scaling_factor;
            want.push(if invert { z * (1.0 / sf) } else { z * sf }.swap_dims(1, 2));
        }
        let want = Tensor::cat(want, 0); // [2, 1, C, h, w]

        // 3 latent frames: zero padding to 3; 1.5 (patch_size_t = 2) prepends 3 % 2 = 1 frame.
        let got = pipe
            .prepare_image_latents(pixels.clone(), 3, &mut SeededNoise::new(11), &opts)
            .unwrap();
        let c = pipe.transformer.config.in_channels / 2;
        let lead = if invert { 1 } else { 0 };
        assert_eq!(got.dims(), [2, 3 + lead, c, 8, 12], "{name}");
        for f in 0..=lead {
            assert_eq!(
                max_abs_diff(got.clone().narrow(1, f, 1), want.clone()),
                0.0,
                "{name}: frame {f} is the image latent"
            );
        }
        let rest = got.clone().narrow(1, lead + 1, 2).abs().max().into_scalar();
        assert_eq!(rest, 0.0, "{name}: later frames are zero");
        assert!(want.abs().max().into_scalar() > 1e-3);

        // An even latent frame count gets no leading frame.
        let even = pipe
            .prepare_image_latents(pixels, 4, &mut SeededNoise::new(11), &opts)
            .unwrap();
        assert_eq!(even.dims(), [2, 4, c, 8, 12], "{name}");
    }
}

/// One step without guidance, rebuilt from the public pieces in diffusers' order: image
/// posterior samples, then the starting latents, from one generator; `cat([latents,
/// image_latents], dim=2)`; `ofs = [2.0]` for 1.5; one scheduler step.
#[test]
fn denoise_concatenates_image_latents_on_channels_with_ofs() {
    let device = CpuDevice::default();
    for name in ["cogvideox-5b-i2v-tiny", "cogvideox1.5-5b-i2v-tiny"] {
        let dir = model(name);
        let pipe = CogVideoXPipeline::<B>::load(&dir, &device).unwrap();
        let req = request(gradient(70, 50, 3), 1, 1.0, 5);
        let plan = pipe.default_plan(1).unwrap();
        let (got, additional) = pipe
            .denoise(
                &req,
                plan.clone(),
                None,
                &mut SeededNoise::new(5),
                &mut |_, _| {},
                &device,
            )
            .unwrap();
        let tc = &pipe.transformer.config;
        let v15 = tc.patch_size_t.is_some();
        // 9 frames → 3 latent frames; 1.5 pads to 4 (one leading frame, dropped at decode).
        let frames = if v15 { 4 } else { 3 };
        assert_eq!(additional, if v15 { 1 } else { 0 }, "{name}");
        assert_eq!(got.dims(), [1, frames, tc.out_channels(), 8, 12], "{name}");

        let mut noise = SeededNoise::new(5);
        let pixels = req.images[0]
            .preprocess::<B>(64, 96, &device)
            .unwrap()
            .unsqueeze_dim::<4>(0);
        let image_latents = pipe
            .prepare_image_latents(pixels, frames, &mut noise, &req.vae_options)
            .unwrap();
        let latents = NoiseSource::<B>::sample(&mut noise, [1, frames, 4, 8, 12], &device);
        let input = Tensor::cat(vec![latents.clone(), image_latents], 2);
        assert_eq!(
            input.dims()[2],
            tc.in_channels,
            "{name}: channels of the transformer input"
        );
        let embeds = pipe
            .prompts
            .encode(&req.prompts, req.max_sequence_length, &device)
            .unwrap();
        let rotary = pipe
            .transformer
            .image_rotary_emb(frames, 8, 12, &device)
            .unwrap();
        let mut exec = PlanExecutor::<B, 5>::new(plan).unwrap();
        let t = exec.current_timestep().unwrap();
        let ofs = tc
            .ofs_embed_dim
            .map(|_| Tensor::<B, 1>::full([1], I2V_OFS, &device));
        assert_eq!(ofs.is_some(), v15, "{name}: ofs only for 1.5-I2V");
        let pred = pipe
            .transformer
            .forward(
                input,
                embeds,
                Tensor::full([1], t as f32, &device),
                ofs,
                rotary.as_ref(),
            )
            .unwrap();
        let want = exec.step(latents, pred, None).unwrap().prev_sample;
        assert_eq!(max_abs_diff(got, want), 0.0, "{name}");
    }
}

#[test]
fn i2v_tiny_models_sample_seeded_frames_of_the_requested_size() {
    let device = CpuDevice::default();
    for (name, num_frames, height, width) in [
        ("cogvideox-5b-i2v-tiny", 9, 64, 96),
        // 1.5 at another size: 17 frames → 5 latent frames, padded to 6 for patch_size_t = 2
        // and cut back to 5 before decoding; 48x80 pixels.
        ("cogvideox1.5-5b-i2v-tiny", 17, 48, 80),
    ] {
        let dir = model(name);
        let pipe = CogVideoXPipeline::<B>::load(&dir, &device).unwrap();
        let sized = |image, seed| SampleRequest {
            num_frames: Some(num_frames),
            height: Some(height),
            width: Some(width),
            ..request(image, 2, 6.0, seed)
        };
        let a = pipe
            .generate(&sized(gradient(40, 30, 0), 1), &device)
            .unwrap();
        assert_eq!(a.dims(), [1, num_frames, 3, height, width], "{name}");
        let (lo, hi) = (a.clone().min().into_scalar(), a.clone().max().into_scalar());
        assert!(
            (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && hi > lo,
            "{name}: {lo}..{hi}"
        );
        let b = pipe
            .generate(&sized(gradient(40, 30, 0), 1), &device)
            .unwrap();
        assert_eq!(
            max_abs_diff(a.clone(), b),
            0.0,
            "{name}: same seed, same video"
        );
        let c = pipe
            .generate(&sized(gradient(40, 30, 0), 2), &device)
            .unwrap();
        assert!(
            max_abs_diff(a.clone(), c) > 1e-4,
            "{name}: another seed, another video"
        );
        let d = pipe
            .generate(&sized(gradient(40, 30, 128), 1), &device)
            .unwrap();
        assert!(
            max_abs_diff(a, d) > 1e-5,
            "{name}: another image, another video"
        );
    }
}

#[test]
fn images_are_refused_by_text_to_video_models_and_required_by_i2v() {
    let device = CpuDevice::default();
    let (t2v, i2v) = (model("cogvideox-2b-tiny"), model("cogvideox-5b-i2v-tiny"));
    let pipe = CogVideoXPipeline::<B>::load(&t2v, &device).unwrap();
    let e = pipe
        .generate(&request(gradient(8, 8, 0), 1, 6.0, 0), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("text-to-video model") && e.contains("no conditioning image"),
        "{e}"
    );

    let pipe = CogVideoXPipeline::<B>::load(&i2v, &device).unwrap();
    let no_image = SampleRequest {
        images: Vec::new(),
        ..request(gradient(8, 8, 0), 1, 6.0, 0)
    };
    let e = pipe.generate(&no_image, &device).unwrap_err().to_string();
    assert!(
        e.contains("image-to-video model") && e.contains("--image"),
        "{e}"
    );
    let two_prompts = SampleRequest {
        prompts: vec!["a".into(), "b".into()],
        ..request(gradient(8, 8, 0), 1, 6.0, 0)
    };
    let e = pipe
        .generate(&two_prompts, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 conditioning images for 2 prompts"), "{e}");
}

#[test]
fn preprocess_resizes_to_the_target_and_maps_to_minus_one_one() {
    let device = CpuDevice::default();
    // At the target size: exactly x / 255 * 2 - 1, channels first.
    let img = gradient(12, 8, 0);
    let t = img.preprocess::<B>(8, 12, &device).unwrap();
    assert_eq!(t.dims(), [3, 8, 12]);
    let v = t.into_data().to_vec::<f32>().unwrap();
    for (i, px) in img.rgb.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            assert_eq!(v[ch * 96 + i], px[ch] as f32 / 255.0 * 2.0 - 1.0);
        }
    }
    // A flat colour stays flat through the Lanczos resize.
    let flat = ConditionImage::new(33, 17, [200u8, 10, 90].repeat(33 * 17)).unwrap();
    let t = flat.preprocess::<B>(16, 24, &device).unwrap();
    assert_eq!(t.dims(), [3, 16, 24]);
    for (ch, want) in [200.0f32, 10.0, 90.0].into_iter().enumerate() {
        let c = t.clone().narrow(0, ch, 1);
        let want = want / 255.0 * 2.0 - 1.0;
        assert!((c.clone().max().into_scalar() - want).abs() < 1e-6);
        assert!((c.min().into_scalar() - want).abs() < 1e-6);
    }
    assert!(ConditionImage::new(4, 4, vec![0; 10]).is_err());
}

#[test]
fn condition_images_are_read_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut png = image::RgbImage::new(20, 10);
    for (x, y, p) in png.enumerate_pixels_mut() {
        *p = image::Rgb([(x * 12) as u8, (y * 25) as u8, 77]);
    }
    let path = dir.path().join("cond.png");
    png.save(&path).unwrap();
    let img = ConditionImage::open(&path).unwrap();
    assert_eq!((img.width, img.height), (20, 10));
    assert_eq!(img.rgb, png.into_raw());
    let e = ConditionImage::open(dir.path().join("missing.png"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.png"), "{e}");
}
