//! Writes a LoRA with `cogvx_train::save_lora` and the cogvx transformer's output with that LoRA
//! on a fixed input, for `scripts/check_lora_diffusers.py` (does diffusers' `load_lora_weights`
//! apply a cogvx LoRA at its alpha, with the same result?):
//!
//! ```text
//! cargo run -p cogvx-bench --example lora_export -- \
//!     --model ../shared/reference/models/cogvideox-2b-tiny --out /tmp/cogvx-lora [--rank 4] [--alpha 8] [--seed 0]
//! ```
//!
//! `OUT/pytorch_lora_weights.safetensors`: LoRA on `to_q`, `to_k`, `to_v`, `to_out.0` with PEFT's
//! `lora_A` initialisation and a random non-zero `lora_B` (N(0, 0.2)), so that the adapter changes
//! the output. `OUT/cogvx_forward.safetensors`: `hidden_states` `[1, F, C, H, W]`,
//! `encoder_hidden_states` `[1, S, D]`, `timestep` `[1]` and the transformer's `sample` with the LoRA.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use cogvx_model_core::adapter::AdapterTensor;
use cogvx_model_core::{CpuAutodiffBackend, CpuDevice};
use cogvx_train::{AdapterSpec, LoraMetadata};
use cogvx_transformer::CogVideoXTransformer3DModel;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

type AD = CpuAutodiffBackend;

struct Args {
    model: PathBuf,
    out: PathBuf,
    rank: usize,
    alpha: f64,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut model, mut out) = (None, None);
    let (mut rank, mut alpha, mut seed) = (4usize, 8.0f64, 0u64);
    let mut i = 0;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .ok_or_else(|| format!("`{}` needs a value", args[i]))?;
        let bad = |what: &str| format!("`{}` takes {what}, got `{value}`", args[i]);
        match args[i].as_str() {
            "--model" => model = Some(PathBuf::from(value)),
            "--out" => out = Some(PathBuf::from(value)),
            "--rank" => rank = value.parse().map_err(|_| bad("a whole number"))?,
            "--alpha" => alpha = value.parse().map_err(|_| bad("a number"))?,
            "--seed" => seed = value.parse().map_err(|_| bad("a whole number"))?,
            other => {
                return Err(format!(
                    "unknown argument `{other}` (expected --model, --out, --rank, --alpha, --seed)"
                ))
            }
        }
        i += 2;
    }
    Ok(Args {
        model: model.ok_or("--model DIR (a diffusers CogVideoX folder) is required")?,
        out: out.ok_or("--out DIR is required")?,
        rank,
        alpha,
        seed,
    })
}

fn write_tensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<(), String> {
    let map: cogvx_io::F32Tensors = tensors
        .iter()
        .map(|(n, s, d)| (n.to_string(), (s.clone(), d.clone())))
        .collect();
    cogvx_io::write_safetensors_f32(path, &map, &Default::default())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn values<const D: usize>(t: Tensor<AD, D>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    (
        dims,
        t.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 data"),
    )
}

fn run(a: &Args) -> Result<(), String> {
    let dev = CpuDevice::default();
    AD::seed(&dev, a.seed);
    let model = CogVideoXTransformer3DModel::<AD>::from_dir(&a.model.join("transformer"), &dev)
        .map_err(|e| e.to_string())?;
    let mut model = cogvx_train::freeze(model);
    let spec = AdapterSpec::lora(a.rank, a.alpha);
    let layers = cogvx_train::inject_lora(&mut model, &spec, &dev).map_err(|e| e.to_string())?;
    let mut params = cogvx_train::trainable_values(&mut model);
    for (name, v) in params.iter_mut() {
        if name.ends_with("lora_B.weight") {
            let s = v.shape();
            *v = AdapterTensor::Matrix(Tensor::random(
                [s[0], s[1]],
                Distribution::Normal(0.0, 0.2),
                &dev,
            ));
        }
    }
    cogvx_train::set_adapter_values(&mut model, &params).map_err(|e| e.to_string())?;
    let meta = LoraMetadata {
        rank: a.rank,
        alpha: a.alpha,
        target_modules: spec.targets.clone(),
    };
    let lora_path = cogvx_train::save_lora(&a.out, &params, &meta).map_err(|e| e.to_string())?;

    // A fixed input at the model's sample size (latent frames from sample_frames).
    let c = model.config.clone();
    let p_t = c.patch_size_t.unwrap_or(1);
    let frames = ((c.sample_frames - 1) / c.temporal_compression_ratio + 1).div_ceil(p_t) * p_t;
    let (h, w) = (c.sample_height, c.sample_width);
    let x = Tensor::<AD, 5>::random(
        [1, frames, c.in_channels, h, w],
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let ctx = Tensor::<AD, 3>::random(
        [1, c.max_text_seq_length, c.text_embed_dim],
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let t = Tensor::<AD, 1>::from_floats([500.0], &dev);
    let ofs = c
        .ofs_embed_dim
        .map(|_| Tensor::<AD, 1>::from_floats([cogvx_train::loss::OFS_VALUE], &dev));
    let rot = model
        .image_rotary_emb(frames, h, w, &dev)
        .map_err(|e| e.to_string())?;
    let sample = model
        .forward(x.clone(), ctx.clone(), t.clone(), ofs, rot.as_ref())
        .map_err(|e| e.to_string())?;
    let (xs, xv) = values(x);
    let (cs, cv) = values(ctx);
    let (ts, tv) = values(t);
    let (ss, sv) = values(sample);
    let fwd_path = a.out.join("cogvx_forward.safetensors");
    write_tensors(
        &fwd_path,
        &[
            ("hidden_states", xs, xv),
            ("encoder_hidden_states", cs, cv),
            ("timestep", ts, tv),
            ("sample", ss, sv),
        ],
    )?;
    println!(
        "{} LoRA layers (rank {}, alpha {})",
        layers.len(),
        a.rank,
        a.alpha
    );
    println!("wrote {}", lora_path.display());
    println!("wrote {}", fwd_path.display());
    Ok(())
}

fn main() -> ExitCode {
    let result = parse().and_then(|a| run(&a));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
