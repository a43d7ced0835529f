//! Loading and input errors name what is wrong instead of panicking.

use burn::tensor::{Distribution, Tensor};
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_vae::{AutoencoderKLCogVideoX, Tiling, VaeConfig, VaeError, VaeOptions};
use std::path::{Path, PathBuf};

fn tiny_vae_dir() -> PathBuf {
    cogvx_fixtures::reference("models/cogvideox-2b-tiny/vae")
}

/// A copy of the tiny VAE folder with `edit` applied to its config.
fn edited_copy(src: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn config_defaults_are_diffusers() {
    let c: VaeConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c.block_out_channels, vec![128, 256, 256, 512]);
    assert_eq!(c.latent_channels, 16);
    assert_eq!(c.scaling_factor, 1.15258426);
    assert!(!c.invert_scale_latents);
    assert_eq!(c.temporal_compress_level(), 2);
    assert_eq!(c.spatial_scale(), 8);
    let t = Tiling::for_config(&c);
    assert_eq!(
        (t.tile_sample_min_height, t.tile_sample_min_width),
        (240, 360)
    );
    assert_eq!(
        (t.tile_latent_min_height(8), t.tile_latent_min_width(8)),
        (30, 45)
    );
}

#[test]
fn unknown_block_type_names_file_and_key() {
    let src = tiny_vae_dir();
    let dir = edited_copy(&src, |c| {
        c["down_block_types"][1] = "DownEncoderBlock2D".into()
    });
    let err = AutoencoderKLCogVideoX::<CpuBackend>::from_dir(dir.path(), &CpuDevice::default())
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VaeError::Config { .. }), "{msg}");
    assert!(
        msg.contains("config.json")
            && msg.contains("down_block_types")
            && msg.contains("DownEncoderBlock2D"),
        "{msg}"
    );
}

#[test]
fn wrong_config_lists_every_weight_problem() {
    let src = tiny_vae_dir();
    // One more ResNet per block: the extra keys are missing, nothing else changes.
    let dir = edited_copy(&src, |c| c["layers_per_block"] = 2.into());
    let msg = AutoencoderKLCogVideoX::<CpuBackend>::from_dir(dir.path(), &CpuDevice::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing key `encoder.down_blocks.0.resnets.1.conv1.conv.weight`"),
        "{msg}"
    );
    assert!(
        msg.contains("missing key `decoder.up_blocks.3.resnets.2.norm1.conv_y.conv.bias`"),
        "{msg}"
    );
    // Fewer channels: wrong shapes, reported with both shapes.
    let dir = edited_copy(&src, |c| c["latent_channels"] = 8.into());
    let msg = AutoencoderKLCogVideoX::<CpuBackend>::from_dir(dir.path(), &CpuDevice::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("wrong shape for `decoder.conv_in.conv.weight`: file has [16, 4, 3, 3, 3], model expects [16, 8, 3, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let src = tiny_vae_dir();
    let device = CpuDevice::default();
    let (vae, config) = AutoencoderKLCogVideoX::<CpuBackend>::from_dir(&src, &device).unwrap();
    let video = Tensor::<CpuBackend, 5>::random(
        [1, 4, 1, 16, 16],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let msg = vae
        .encode(video, &VaeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("[B, 3, T, H, W]") && msg.contains("[1, 4, 1, 16, 16]"),
        "{msg}"
    );
    let z =
        Tensor::<CpuBackend, 5>::random([1, 3, 1, 2, 2], Distribution::Normal(0.0, 1.0), &device);
    assert!(vae.decode(z, &VaeOptions::default()).is_err());
    // Tiles smaller than the VAE's stride cannot be blended.
    let mut tiling = Tiling::for_config(&config);
    tiling.tile_sample_min_height = 4;
    let video = Tensor::<CpuBackend, 5>::random(
        [1, 3, 1, 16, 16],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let opts = VaeOptions {
        tiling: Some(tiling),
        slicing: false,
    };
    let msg = vae.encode(video, &opts).unwrap_err().to_string();
    assert!(msg.contains("tiling"), "{msg}");
    // Too small for the stride, whole or as an edge tile (PyTorch raises there as well).
    let tiny = Tensor::<CpuBackend, 5>::random(
        [1, 3, 1, 4, 16],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let msg = vae
        .encode(tiny, &VaeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("4x16 pixels"), "{msg}");
    let tiling = Tiling {
        tile_sample_min_height: 48,
        tile_sample_min_width: 64,
        ..Tiling::for_config(&config)
    };
    let video = Tensor::<CpuBackend, 5>::random(
        [1, 3, 1, 48, 105],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let msg = vae
        .encode(
            video,
            &VaeOptions {
                tiling: Some(tiling),
                slicing: false,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tile at (0, 102)"), "{msg}");
}

#[test]
fn single_frame_and_batch_slicing() {
    let src = tiny_vae_dir();
    let device = CpuDevice::default();
    let (vae, _) = AutoencoderKLCogVideoX::<CpuBackend>::from_dir(&src, &device).unwrap();
    // An image (T = 1) encodes to one latent frame and decodes back to one frame.
    let video = Tensor::<CpuBackend, 5>::random(
        [2, 3, 1, 16, 24],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let whole = vae.encode(video.clone(), &VaeOptions::default()).unwrap();
    assert_eq!(whole.mean.dims(), [2, 4, 1, 2, 3]);
    let sliced = vae
        .encode(
            video,
            &VaeOptions {
                tiling: None,
                slicing: true,
            },
        )
        .unwrap();
    let diff: f32 = (whole.mean.clone() - sliced.mean).abs().max().into_scalar();
    assert!(diff < 1e-5, "slicing changed the result by {diff}");
    let frames = vae.decode(whole.mean, &VaeOptions::default()).unwrap();
    assert_eq!(frames.dims(), [2, 3, 1, 16, 24]);
}

#[test]
fn latent_scaling_follows_the_pipelines() {
    let src = tiny_vae_dir();
    let device = CpuDevice::default();
    let (vae, config) = AutoencoderKLCogVideoX::<CpuBackend>::from_dir(&src, &device).unwrap();
    assert!(!config.invert_scale_latents);
    let z = Tensor::<CpuBackend, 5>::ones([1, 4, 1, 2, 2], &device);
    let s: f32 = vae.scale_latents(z.clone()).max().into_scalar();
    assert!((s as f64 - 1.15258426).abs() < 1e-6);
    let u: f32 = vae.unscale_latents(z.clone()).max().into_scalar();
    assert!((u as f64 - 1.0 / 1.15258426).abs() < 1e-6);
    let i: f32 = vae.scale_image_latents(z.clone()).max().into_scalar();
    assert!((i as f64 - 1.15258426).abs() < 1e-6);
    // CogVideoX 1.5 inverts the image-latent scale.
    let src15 = src
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("cogvideox1.5-5b-tiny/vae");
    let (vae15, c15) = AutoencoderKLCogVideoX::<CpuBackend>::from_dir(&src15, &device).unwrap();
    assert!(c15.invert_scale_latents);
    let i: f32 = vae15.scale_image_latents(z).max().into_scalar();
    assert!((i as f64 - 1.0 / 0.7).abs() < 1e-6);
}
