//! The cache end to end with the tiny 2B model (`shared/reference/models/cogvideox-2b-tiny`),
//! generated 9-frame clips and the first-party `crop_resize` plugin, at 9x64x96.

use std::path::{Path, PathBuf};

use cogvx_cache::{plan, prepare, read_index, Cache, CacheError, PrepareOptions};
use cogvx_data::Chain;
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_plugin_api::{Frames, Plugin, Resolution};
use cogvx_plugin_crop_resize::CropResize;

const RES: Resolution = Resolution {
    frames: 9,
    height: 64,
    width: 96,
};

fn model_dir() -> PathBuf {
    cogvx_fixtures::model("cogvideox-2b-tiny")
}

/// A 9-frame `w`x`h` clip with a moving gradient, distinct per `salt`.
fn clip(w: u32, h: u32, salt: u32) -> Frames {
    clip_n(w, h, salt, 9)
}

fn clip_n(w: u32, h: u32, salt: u32, n: u32) -> Frames {
    let mut rgb = Vec::new();
    for f in 0..n {
        for y in 0..h {
            for x in 0..w {
                rgb.push(((x * 255 / w + f * 7 + salt * 40) % 256) as u8);
                rgb.push(((y * 255 / h + salt * 90) % 256) as u8);
                rgb.push((((x + y) * 3 + f * 11) % 256) as u8);
            }
        }
    }
    Frames {
        width: w,
        height: h,
        count: n,
        rgb,
    }
}

/// A dataset of two clips (160x96, cropped and resized to 96x64 by crop_resize).
fn dataset(dir: &Path) {
    std::fs::create_dir_all(dir.join("videos")).unwrap();
    for (i, name) in ["a.mp4", "b.mp4"].iter().enumerate() {
        let opts = cogvx_video::EncodeOptions {
            crf: 0,
            preset: "ultrafast".into(),
        };
        cogvx_video::encode_mp4(
            dir.join("videos").join(name),
            &clip(160, 96, i as u32),
            8.0,
            &opts,
        )
        .unwrap();
    }
    std::fs::write(dir.join("videos.txt"), "videos/a.mp4\nvideos/b.mp4\n").unwrap();
    std::fs::write(dir.join("prompts.txt"), "a red gradient\na blue gradient\n").unwrap();
}

fn options() -> PrepareOptions {
    PrepareOptions {
        progress: false,
        ..PrepareOptions::new(RES)
    }
}

fn run(
    cache: &Path,
    root: &Path,
    model: &Path,
    params: &str,
    opts: &PrepareOptions,
) -> cogvx_cache::Summary {
    let mut cr = CropResize::default();
    cr.configure(params).unwrap();
    let mut chain = Chain::new();
    chain.video_transforms.push(&mut cr);
    prepare::<CpuBackend>(
        cache,
        root,
        model,
        &mut chain,
        &[params.to_string()],
        opts,
        &CpuDevice::default(),
    )
    .unwrap()
}

fn planned(
    cache: &Path,
    root: &Path,
    model: &Path,
    params: &str,
    opts: &PrepareOptions,
) -> cogvx_cache::Plan {
    let mut cr = CropResize::default();
    cr.configure(params).unwrap();
    let mut chain = Chain::new();
    chain.video_transforms.push(&mut cr);
    plan(cache, root, model, &mut chain, &[params.to_string()], opts).unwrap()
}

#[test]
fn prepare_reuses_and_invalidates_only_what_changed() {
    let model = model_dir();
    let d = tempfile::tempdir().unwrap();
    let (root, cache) = (d.path().join("data"), d.path().join("cache"));
    dataset(&root);
    let opts = options();

    let p = planned(&cache, &root, &model, "{}", &opts);
    assert!(p.is_stale());
    assert_eq!((p.latents_to_encode(), p.prompts_to_encode()), (2, 2));

    let s = run(&cache, &root, &model, "{}", &opts);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert_eq!(
        (
            s.encoded_latents,
            s.encoded_prompts,
            s.reused_latents,
            s.reused_prompts
        ),
        (2, 2, 0, 0)
    );

    // Loader: shapes as the trainer needs them.
    let c = Cache::open(&cache).unwrap();
    assert_eq!(c.len(), 2);
    for e in c.entries() {
        let e = e.unwrap();
        assert_eq!(e.latent.shape, vec![4, 3, 8, 12]);
        assert_eq!(e.prompt_embedding.shape[0], 226);
        assert!(e.image.is_none());
        assert!(e.latent.data.iter().all(|v| v.is_finite()));
    }

    // Second run: nothing to do, and the plan says so (key order / whitespace of params do not matter).
    let p = planned(&cache, &root, &model, " { } ", &opts);
    assert!(!p.is_stale());
    let s = run(&cache, &root, &model, "{}", &opts);
    assert_eq!(
        (
            s.encoded_latents,
            s.encoded_prompts,
            s.reused_latents,
            s.reused_prompts
        ),
        (0, 0, 2, 2)
    );

    // Edit one caption: only that prompt is recomputed.
    std::fs::write(
        root.join("prompts.txt"),
        "a red gradient\na green gradient\n",
    )
    .unwrap();
    let p = planned(&cache, &root, &model, "{}", &opts);
    assert_eq!((p.latents_to_encode(), p.prompts_to_encode()), (0, 1));
    let s = run(&cache, &root, &model, "{}", &opts);
    assert_eq!(
        (
            s.encoded_latents,
            s.encoded_prompts,
            s.reused_latents,
            s.reused_prompts
        ),
        (0, 1, 2, 1)
    );
    assert_eq!(
        read_index(&cache).unwrap().samples[1].caption,
        "a green gradient"
    );

    // Edit one video: only its latent.
    let opts0 = cogvx_video::EncodeOptions {
        crf: 0,
        preset: "ultrafast".into(),
    };
    cogvx_video::encode_mp4(root.join("videos/b.mp4"), &clip(160, 96, 7), 8.0, &opts0).unwrap();
    let p = planned(&cache, &root, &model, "{}", &opts);
    assert_eq!((p.latents_to_encode(), p.prompts_to_encode()), (1, 0));

    // Pruning removes the superseded prompt entry (and stray temporary files), nothing in use.
    std::fs::write(cache.join("latents/.x.safetensors.tmp-1-0"), b"half").unwrap();
    let removed = Cache::open(&cache).unwrap().prune().unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    let s = run(&cache, &root, &model, "{}", &opts);
    assert_eq!(
        (s.encoded_latents, s.encoded_prompts),
        (1, 0),
        "only the edited video"
    );

    // A plugin setting changes every latent, no prompt.
    let p = planned(&cache, &root, &model, r#"{"filter": "bilinear"}"#, &opts);
    assert_eq!((p.latents_to_encode(), p.prompts_to_encode()), (2, 0));
    // So does the base seed.
    let p = planned(
        &cache,
        &root,
        &model,
        "{}",
        &PrepareOptions {
            seed: 7,
            ..options()
        },
    );
    assert_eq!((p.latents_to_encode(), p.prompts_to_encode()), (2, 0));
}

#[test]
fn corrupt_or_truncated_entries_are_detected_and_recomputed() {
    let model = model_dir();
    let d = tempfile::tempdir().unwrap();
    let (root, cache) = (d.path().join("data"), d.path().join("cache"));
    dataset(&root);
    let opts = options();
    run(&cache, &root, &model, "{}", &opts);
    let index = read_index(&cache).unwrap();
    let latent = cache
        .join("latents")
        .join(format!("{}.safetensors", index.samples[0].latent));
    let prompt = cache
        .join("prompts")
        .join(format!("{}.safetensors", index.samples[1].prompt));
    let good = std::fs::read(&latent).unwrap();

    // Truncated latent: the loader names the file, plan and prepare recompute it.
    std::fs::write(&latent, &good[..good.len() / 2]).unwrap();
    let err = Cache::open(&cache).unwrap().get(0).unwrap_err();
    assert!(matches!(err, CacheError::Entry { .. }));
    assert!(
        err.to_string().contains(&latent.display().to_string()),
        "{err}"
    );
    let p = planned(&cache, &root, &model, "{}", &opts);
    assert_eq!((p.latents_to_encode(), p.prompts_to_encode()), (1, 0));
    let s = run(&cache, &root, &model, "{}", &opts);
    assert_eq!((s.encoded_latents, s.encoded_prompts), (1, 0));
    let (before, after) = (
        cogvx_cache::store::read_entry_unchecked(&good).unwrap(),
        cogvx_cache::store::read_entry_unchecked(&std::fs::read(&latent).unwrap()).unwrap(),
    );
    // (The files' bytes may differ only in the header's metadata order.)
    assert!(
        before["latent"] == after["latent"],
        "the recomputed latent differs (it is seeded)"
    );

    // A flipped byte in the tensor data (a valid safetensors file): the checksum catches it.
    let mut bytes = std::fs::read(&prompt).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x40;
    std::fs::write(&prompt, &bytes).unwrap();
    let err = Cache::open(&cache).unwrap().get(1).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    let s = run(&cache, &root, &model, "{}", &opts);
    assert_eq!((s.encoded_latents, s.encoded_prompts), (0, 1));
    Cache::open(&cache).unwrap().entries().for_each(|e| {
        e.unwrap();
    });

    // No temporary files are left behind.
    for sub in ["", "latents", "prompts"] {
        for e in std::fs::read_dir(cache.join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "left over: {name}");
        }
    }
}

#[test]
fn stored_latent_equals_a_direct_seeded_encode_and_i2v_stores_the_first_frame() {
    let model = model_dir();
    let d = tempfile::tempdir().unwrap();
    let (root, cache) = (d.path().join("data"), d.path().join("cache"));
    dataset(&root);
    let opts = PrepareOptions {
        i2v: true,
        ..options()
    };
    let s = run(&cache, &root, &model, "{}", &opts);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    let c = Cache::open(&cache).unwrap();
    let e = c.get(0).unwrap();

    // Direct: the same clip through crop_resize, the VAE with the official options, the seed.
    let device = CpuDevice::default();
    let mut cr = CropResize::default();
    let mut transforms = cogvx_video::VideoTransforms::new(vec![&mut cr as &mut dyn Plugin]);
    let pre = cogvx_video::preprocess_clip(
        &root.join("videos/a.mp4"),
        None,
        &mut transforms,
        RES,
        e.sample.seed,
    )
    .unwrap();
    let (vae, cfg) =
        cogvx_vae::AutoencoderKLCogVideoX::<CpuBackend>::from_dir(&model.join("vae"), &device)
            .unwrap();
    // The official options are tiling + slicing; at 64x96 the tiny model's tiled encode gives 9
    // latent rows (diffusers' tiling does not crop), so the cache falls back to a whole-frame encode.
    let tiled = cogvx_vae::VaeOptions {
        tiling: Some(cogvx_vae::Tiling::for_config(&cfg)),
        slicing: true,
    };
    let x = cogvx_cache::frames_to_video::<CpuBackend>(&pre.frames, &device);
    assert_eq!(vae.encode(x, &tiled).unwrap().mean.dims(), [1, 4, 3, 9, 12]);
    let vopts = cogvx_vae::VaeOptions {
        tiling: None,
        slicing: true,
    };
    let x = cogvx_cache::frames_to_video::<CpuBackend>(&pre.frames, &device);
    let dist = vae.encode(x, &vopts).unwrap();
    let dims = dist.mean.dims();
    let noise = cogvx_scheduler::noise::gaussian_noise(e.sample.seed, dims.iter().product());
    let noise = burn::tensor::Tensor::<CpuBackend, 1>::from_data(
        burn::tensor::TensorData::new(noise, [dims.iter().product::<usize>()]),
        &device,
    )
    .reshape(dims);
    let want: Vec<f32> = ((dist.mean.clone() + (dist.logvar.clone() * 0.5).exp() * noise)
        * cfg.scaling_factor)
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(e.latent.data, want);
    // The posterior sample is not the mean: the noise is really there.
    let mean: Vec<f32> = (dist.mean * cfg.scaling_factor)
        .into_data()
        .to_vec()
        .unwrap();
    assert!(mean.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-4));

    // I2V without images.txt: the first preprocessed frame, [3, H, W] in [-1, 1].
    let img = e.image.expect("i2v entry has an image");
    assert_eq!(img.shape, vec![3, 64, 96]);
    let (h, w) = (64usize, 96usize);
    for (i, px) in pre.frames.rgb[..h * w * 3]
        .chunks_exact(3)
        .enumerate()
        .step_by(97)
    {
        for (ch, &v) in px.iter().enumerate() {
            assert_eq!(img.data[ch * h * w + i], v as f32 / 255.0 * 2.0 - 1.0);
        }
    }

    // With images.txt: a listed image (same size as the clip) goes through the same crop and resize.
    let mut png = image::RgbImage::new(160, 96);
    for (x, y, p) in png.enumerate_pixels_mut() {
        *p = image::Rgb([(x % 256) as u8, (y * 2 % 256) as u8, 200]);
    }
    png.save(root.join("a.png")).unwrap();
    png.save(root.join("b.png")).unwrap();
    std::fs::write(root.join("images.txt"), "a.png\nb.png\n").unwrap();
    let p = planned(&cache, &root, &model, "{}", &opts);
    assert_eq!(
        (p.latents_to_encode(), p.prompts_to_encode()),
        (2, 0),
        "a new image invalidates the latent entry"
    );
    let s = run(&cache, &root, &model, "{}", &opts);
    assert_eq!((s.encoded_latents, s.encoded_prompts), (2, 0));
    let img = Cache::open(&cache).unwrap().get(0).unwrap().image.unwrap();
    // Center crop of 160x96 to 3:2 is x in [8, 152); the blue channel is constant 200.
    assert!(img.data[2 * h * w..]
        .iter()
        .all(|&v| (v - (200.0 / 255.0 * 2.0 - 1.0)).abs() < 0.02));
    let red_left = img.data[0];
    assert!(
        red_left > -1.0 + 2.0 * 6.0 / 255.0 && red_left < -1.0 + 2.0 * 12.0 / 255.0,
        "{red_left}"
    );
}

#[test]
fn bad_samples_are_reported_and_left_out_of_the_index() {
    let model = model_dir();
    let d = tempfile::tempdir().unwrap();
    let (root, cache) = (d.path().join("data"), d.path().join("cache"));
    dataset(&root);
    let opts0 = cogvx_video::EncodeOptions {
        crf: 0,
        preset: "ultrafast".into(),
    };
    cogvx_video::encode_mp4(
        root.join("videos/long.mp4"),
        &clip_n(160, 96, 3, 12),
        8.0,
        &opts0,
    )
    .unwrap();
    std::fs::write(
        root.join("videos.txt"),
        "videos/a.mp4\nvideos/long.mp4\nvideos/missing.mp4\n",
    )
    .unwrap();
    std::fs::write(root.join("prompts.txt"), "one\ntwo\nthree\n").unwrap();
    let s = run(&cache, &root, &model, "{}", &options());
    assert_eq!(s.samples, 3);
    assert_eq!((s.encoded_latents, s.encoded_prompts), (1, 1));
    assert_eq!(s.failed.len(), 2, "{:?}", s.failed);
    let msgs: Vec<String> = s.failed.iter().map(|p| p.to_string()).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("videos.txt:2") && m.contains("the chain gives 12x64x96")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("videos.txt:3") && m.contains("missing.mp4")),
        "{msgs:?}"
    );
    let c = Cache::open(&cache).unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c.index.samples[0].caption, "one");

    // Bad arguments are refused before any work.
    let mut chain = Chain::new();
    let err = plan(
        &cache,
        &root,
        &model,
        &mut chain,
        &["{}".to_string()],
        &options(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("1 params strings given for 0 video-transform plugins"),
        "{err}"
    );
    let bad = PrepareOptions {
        resolution: Resolution {
            frames: 8,
            height: 64,
            width: 96,
        },
        ..options()
    };
    assert!(plan(&cache, &root, &model, &mut chain, &[], &bad).is_err());
    assert!(Cache::open(d.path())
        .unwrap_err()
        .to_string()
        .contains("index.json"));
}

fn res(s: &str) -> Resolution {
    s.parse().unwrap()
}

/// A wide, a tall and a square clip, each in its bucket: the entries have the bucket's latent
/// size, the keys follow the bucket (only the clip whose bucket changes is encoded again), a
/// list no clip fits is an error naming the list.
#[test]
fn buckets_place_each_clip_and_key_its_entry() {
    let model = model_dir();
    let d = tempfile::tempdir().unwrap();
    let (root, cache) = (d.path().join("data"), d.path().join("cache"));
    std::fs::create_dir_all(root.join("videos")).unwrap();
    let enc = cogvx_video::EncodeOptions {
        crf: 0,
        preset: "ultrafast".into(),
    };
    for (i, (name, w, h)) in [("wide", 160, 96), ("tall", 96, 160), ("square", 96, 96)]
        .into_iter()
        .enumerate()
    {
        cogvx_video::encode_mp4(
            root.join("videos").join(format!("{name}.mp4")),
            &clip(w, h, i as u32),
            8.0,
            &enc,
        )
        .unwrap();
    }
    std::fs::write(
        root.join("videos.txt"),
        "videos/wide.mp4\nvideos/tall.mp4\nvideos/square.mp4\n",
    )
    .unwrap();
    std::fs::write(root.join("prompts.txt"), "wide\ntall\nsquare\n").unwrap();
    let three =
        cogvx_data::Buckets::new(vec![res("9x64x96"), res("9x96x64"), res("9x64x64")], None)
            .unwrap();
    let opts = options().with_buckets(three);
    let s = run(&cache, &root, &model, "{}", &opts);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert_eq!(s.encoded_latents, 3);
    let c = Cache::open(&cache).unwrap();
    assert_eq!(c.index.resolution, [9, 64, 96]);
    assert_eq!(c.index.buckets, vec![[9, 64, 96], [9, 96, 64], [9, 64, 64]]);
    let got: Vec<(String, Option<[u32; 3]>, Vec<usize>)> = c
        .entries()
        .map(|e| {
            let e = e.unwrap();
            (e.sample.video, e.sample.resolution, e.latent.shape)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "videos/wide.mp4".into(),
                Some([9, 64, 96]),
                vec![4, 3, 8, 12]
            ),
            (
                "videos/tall.mp4".into(),
                Some([9, 96, 64]),
                vec![4, 3, 12, 8]
            ),
            (
                "videos/square.mp4".into(),
                Some([9, 64, 64]),
                vec![4, 3, 8, 8]
            ),
        ]
    );
    let keys: Vec<String> = c.index.samples.iter().map(|s| s.latent.clone()).collect();

    // Without the portrait bucket the tall clip goes to the square one: only its entry changes.
    let two = cogvx_data::Buckets::new(vec![res("9x64x96"), res("9x64x64")], None).unwrap();
    let opts2 = options().with_buckets(two);
    let p = planned(&cache, &root, &model, "{}", &opts2);
    let keys2: Vec<String> = p.samples.iter().map(|s| s.sample.latent.clone()).collect();
    assert_eq!(
        (
            keys2[0] == keys[0],
            keys2[1] == keys[1],
            keys2[2] == keys[2]
        ),
        (true, false, true)
    );
    assert_eq!(p.samples[1].sample.resolution, Some([9, 64, 64]));
    assert_eq!(p.latents_to_encode(), 1);

    // A list no clip fits (never upscaled past 1x): an error naming the buckets; nothing written.
    let before = std::fs::read(cache.join("index.json")).unwrap();
    let big = cogvx_data::Buckets::new(vec![res("9x480x720")], None).unwrap();
    let mut cr = CropResize::default();
    let mut chain = Chain::new();
    chain.video_transforms.push(&mut cr);
    let e = prepare::<CpuBackend>(
        &cache,
        &root,
        &model,
        &mut chain,
        &["{}".to_string()],
        &options().with_buckets(big),
        &CpuDevice::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no clip fits any bucket of [data] buckets (9x480x720)")
            && e.contains("more than [data] max_upscale = 1"),
        "{e}"
    );
    assert_eq!(std::fs::read(cache.join("index.json")).unwrap(), before);
}
