//! CPU forward timings of the transformer (numbers for the README):
//!
//! ```text
//! cargo run -p cogvx-transformer --example forward_timing [ITERS]
//! cargo run -p cogvx-transformer --features flex --example forward_timing [ITERS]   # also burn-flex
//! ```
//!
//! * the five tiny shared models (`shared/reference/models/*-tiny`) at their first case's sizes
//!   (batch 2, latent 3x8x12 or 4x8x12, 16 text tokens);
//! * a random 5B-style (RoPE) config with hidden size 256 (4 heads x 64), 2 layers and 512 tokens
//!   (32 text + 480 video: latent 5x16x24, batch 1).

#[path = "../tests/common/mod.rs"]
mod common;

use cogvx_model_core::ModelBackend;
use cogvx_transformer::{CogVideoXTransformer3DModel, TransformerConfig};
use common::{random_inputs_on, write_random_transformer};
use std::path::Path;
use std::time::{Duration, Instant};

/// Mean and min over `iters` timed forwards after one warm-up.
#[allow(clippy::too_many_arguments)]
fn time_forward<Bk: ModelBackend>(
    model: &CogVideoXTransformer3DModel<Bk>,
    batch: usize,
    f: usize,
    h: usize,
    w: usize,
    text: usize,
    iters: usize,
    device: &Bk::Device,
) -> (Duration, Duration) {
    let (x, ctx, t, ofs) = random_inputs_on::<Bk>(&model.config, batch, f, h, w, text, 0, device);
    let rot = model.image_rotary_emb(f, h, w, device).unwrap();
    let once = || {
        let out = model
            .forward(x.clone(), ctx.clone(), t.clone(), ofs.clone(), rot.as_ref())
            .unwrap();
        // Reading the values back forces the computation.
        out.into_data();
    };
    once();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        once();
        times.push(start.elapsed());
    }
    let mean = times.iter().sum::<Duration>() / iters as u32;
    (mean, *times.iter().min().unwrap())
}

fn bench_config() -> TransformerConfig {
    TransformerConfig {
        num_attention_heads: 4,
        attention_head_dim: 64,
        in_channels: 16,
        out_channels: Some(16),
        time_embed_dim: 512,
        text_embed_dim: 256,
        num_layers: 2,
        sample_height: 16,
        sample_width: 24,
        sample_frames: 17,
        max_text_seq_length: 32,
        use_rotary_positional_embeddings: true,
        ..Default::default()
    }
}

fn run_all<Bk: ModelBackend>(backend: &str, random_dir: &Path, iters: usize) {
    let device = Default::default();
    let reference = cogvx_fixtures::shared_dir().join("reference");
    if reference.join("cases").is_dir() {
        for (variant, f) in [
            ("cogvideox-2b", 3),
            ("cogvideox-5b", 3),
            ("cogvideox-5b-i2v", 3),
            ("cogvideox1.5-5b", 4),
            ("cogvideox1.5-5b-i2v", 4),
        ] {
            let dir = reference.join(format!("models/{variant}-tiny/transformer"));
            let model = CogVideoXTransformer3DModel::<Bk>::from_dir(&dir, &device).unwrap();
            let c = &model.config;
            let tokens = 16 + f / c.patch_size_t.unwrap_or(1) * 4 * 6;
            let (mean, min) = time_forward(&model, 2, f, 8, 12, 16, iters, &device);
            println!(
                "| {backend} | {variant}-tiny | 2 x {f} x {} x 8 x 12, 16 | {tokens} | {mean:.2?} | {min:.2?} |",
                c.in_channels
            );
        }
    }
    let model = CogVideoXTransformer3DModel::<Bk>::from_dir(random_dir, &device).unwrap();
    let (mean, min) = time_forward(&model, 1, 5, 16, 24, 32, iters, &device);
    println!("| {backend} | hidden 256 (4x64), 2 layers | 1 x 5 x 16 x 16 x 24, 32 | 512 | {mean:.2?} | {min:.2?} |");
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    write_random_transformer(tmp.path(), &bench_config(), 0, 1.0);
    println!("| backend | model | input (B x F x C x H x W, text) | tokens | mean | min |");
    println!("| --- | --- | --- | --- | --- | --- |");
    run_all::<cogvx_model_core::CpuBackend>("ndarray", tmp.path(), iters);
    #[cfg(feature = "flex")]
    run_all::<burn::backend::Flex>("flex", tmp.path(), iters);
}
