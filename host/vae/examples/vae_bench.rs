//! CPU timings of encode/decode on a VAE folder (default: the shared tiny 2B model).
//!
//! `cargo run -p cogvx-vae --example vae_bench [-- <vae dir> [repeats] [auto|native|gemm]]`

use burn::tensor::{Distribution, Tensor};
use cogvx_model_core::{CpuBackend as B, CpuDevice};
use cogvx_vae::{set_conv3d_algo, AutoencoderKLCogVideoX, Conv3dAlgo, Tiling, VaeOptions};
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/reference/models/cogvideox-2b-tiny/vae"
        ))
    });
    let repeats: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let algo = match args.get(3).map(|s| s.as_str()) {
        None | Some("auto") => Conv3dAlgo::Auto,
        Some("native") => Conv3dAlgo::Native,
        Some("gemm") => Conv3dAlgo::Gemm,
        Some(other) => {
            eprintln!("error: unknown conv algorithm `{other}` (auto, native, gemm)");
            std::process::exit(2);
        }
    };
    set_conv3d_algo(algo);
    println!("conv3d algorithm: {algo:?}");
    let device = CpuDevice::default();
    let t0 = Instant::now();
    let (vae, config) = match AutoencoderKLCogVideoX::<B>::from_dir(&dir, &device) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!("load {}: {:.3}s", dir.display(), t0.elapsed().as_secs_f64());
    let (h, w) = (config.sample_height, config.sample_width);
    let whole = VaeOptions::default();
    let tiled = VaeOptions {
        tiling: Some(Tiling::for_config(&config)),
        slicing: false,
    };
    let time = |name: &str, f: &dyn Fn()| {
        f(); // warm-up
        let t = Instant::now();
        for _ in 0..repeats {
            f();
        }
        println!(
            "{name:<40} {:.3}s",
            t.elapsed().as_secs_f64() / repeats as f64
        );
    };
    for frames in [9usize, 17] {
        let video = Tensor::<B, 5>::random(
            [1, config.in_channels, frames, h, w],
            Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        time(&format!("encode 1x3x{frames}x{h}x{w}"), &|| {
            let d = vae.encode(video.clone(), &whole).unwrap();
            let _ = d.mean.into_data();
        });
        time(
            &format!("encode 1x3x{frames}x{h}x{w} tiled (default)"),
            &|| {
                let d = vae.encode(video.clone(), &tiled).unwrap();
                let _ = d.mean.into_data();
            },
        );
    }
    let s = config.spatial_scale();
    for lat in [3usize, 5] {
        let z = Tensor::<B, 5>::random(
            [1, config.latent_channels, lat, h / s, w / s],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        time(
            &format!(
                "decode 1x{}x{lat}x{}x{}",
                config.latent_channels,
                h / s,
                w / s
            ),
            &|| {
                let _ = vae.decode(z.clone(), &whole).unwrap().into_data();
            },
        );
        time(
            &format!(
                "decode 1x{}x{lat}x{}x{} tiled (default)",
                config.latent_channels,
                h / s,
                w / s
            ),
            &|| {
                let _ = vae.decode(z.clone(), &tiled).unwrap().into_data();
            },
        );
    }
}
