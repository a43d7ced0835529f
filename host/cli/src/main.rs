//! `cogvx`: fine-tune CogVideoX from a folder of videos and captions.

mod commands;
mod config;
mod plugins;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use config::Resolution;

/// Fine-tune CogVideoX (2B, 5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V) from a folder of videos and captions.
///
/// Dataset readers, preprocessing, prompt rewriting, adapters, schedulers and validators are
/// plugins: built in, or loaded with `--plugin FILE` (`.wasm` components run sandboxed, `.so`
/// native libraries run in-process). A loaded plugin replaces the built-in of the same name.
#[derive(Parser, Debug)]
#[command(name = "cogvx", version, propagate_version = true)]
pub struct Cli {
    /// Load a plugin file (`.wasm` or `.so`); repeatable. Added to the config's `plugins` list.
    #[arg(long = "plugin", value_name = "FILE", global = true)]
    pub plugins: Vec<PathBuf>,

    /// The TOML config file (see configs/). CLI flags override its values.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// The dataset root (overrides `[data] root`).
    #[arg(long, value_name = "DIR", global = true)]
    pub data_root: Option<PathBuf>,

    /// The diffusers model folder (overrides `[model] path`).
    #[arg(long, value_name = "DIR", global = true)]
    pub model: Option<PathBuf>,

    /// The training resolution FRAMESxHEIGHTxWIDTH, e.g. 49x480x720 (overrides `[data] resolution`).
    #[arg(long, value_name = "FxHxW", global = true)]
    pub resolution: Option<Resolution>,

    /// Where the models run: `cpu`, `cuda` or `cuda:N` (overrides `device` in the config, which
    /// overrides the COGVX_DEVICE variable; default cpu). CUDA needs a build with `--features cuda`.
    #[arg(long, value_name = "DEVICE", global = true)]
    pub device: Option<config::Device>,

    /// More log output: -v cogvx's debug lines, -vv its trace lines, -vvv everything's. RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the available plugins: name, version, kinds, transport, API version, source.
    Plugins,
    /// Inspect a dataset in the finetune layout (prompts.txt, videos.txt, optional images.txt).
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Fill the latent/prompt cache: decode each clip, run the plugin chain, VAE-encode it and
    /// T5-encode its caption. Entries are keyed by content (clip bytes, chain and its
    /// parameters, model, resolution): only what changed is recomputed.
    Prepare {
        /// The dataset root (else --data-root or `[data] root`).
        dir: Option<PathBuf>,
        /// The cache folder (else `[data] cache_dir`, else `<[train] output_dir>/cache`).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Fine-tune: prepares the cache when stale, then trains the `[train] adapter` (LoRA, SFT
    /// or an adapter plugin), with checkpoints, validation videos, metrics and the export.
    /// Everything is checked before any work starts.
    Train(TrainArgs),
    /// Generate a video with a model folder (--model or `[model] path`), optionally with a LoRA
    /// at its trained strength and, for image-to-video models, a conditioning image.
    Sample(SampleArgs),
    /// Run diffusers parity cases (a folder of `*.safetensors` case files) and print a table;
    /// exits 1 unless every case that ran passed.
    Parity {
        /// The cases folder, e.g. ../shared/reference/cases. Model folders are found relative
        /// to its parent.
        dir: PathBuf,
        /// Only run cases whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// The CPU backend: `flex` (burn's threaded SIMD backend, which every CPU run uses) or
        /// `ndarray`.
        #[arg(long, default_value = "flex")]
        backend: cogvx_bench::CpuBackendKind,
    },
    /// Print the peak memory of prepare, training and validation for the config, per
    /// component (weights, trainable parameters and AdamW states, activations, workspaces, VAE,
    /// T5), computed from the model's configs and the shapes before anything runs. Uses the
    /// model folder when it exists, else the released model named by --model-name or
    /// `[model] name`. Exits 1 when --gpu-memory is given and a phase does not fit.
    Plan {
        /// GPU memory in GiB (e.g. 24 for a 24 GB card): plans for a GPU and adds the verdict
        /// "fits" per phase.
        #[arg(long, value_name = "GIB")]
        gpu_memory: Option<f64>,
        /// Print the plan as JSON (per phase `peak_gib` and `fits`).
        #[arg(long)]
        json: bool,
        /// A released model: cogvideox-2b, cogvideox-5b, cogvideox-5b-i2v, cogvideox1.5-5b,
        /// cogvideox1.5-5b-i2v (overrides `[model] name`; a model folder takes precedence).
        #[arg(long, value_name = "NAME")]
        model_name: Option<String>,
        /// Plan one process of a run of N (`cogvx launch --nproc-per-node N`): with
        /// `[train] zero_stage = 2` each keeps 1/N of the AdamW states.
        #[arg(long, value_name = "N", default_value_t = 1)]
        nproc: usize,
    },
    /// Data-parallel training: start N processes of cogvx on this machine through Open MPI's
    /// `mpirun`, each with the arguments after `--` (e.g. `cogvx launch --nproc-per-node 2 --
    /// --config configs/quickstart.toml train`). Each process trains its share of every step; the
    /// gradients are summed before each update; rank 0 writes the output folder. Across machines,
    /// start `cogvx train` with `mpirun` or Slurm's `srun --mpi=pmix` directly.
    Launch(commands::launch::LaunchArgs),
    /// Benchmarks (throughput numbers for the docs; not tests).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

/// `cogvx train` flags (each overrides its `[train]` key).
#[derive(clap::Args, Debug, Default)]
pub struct TrainArgs {
    /// `lora`, `sft`, or an adapter plugin's name, e.g. `dora` with `--plugin plugins/dora.wasm`
    /// (`[train] adapter`).
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Optimizer steps to run (`[train] max_steps`).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Adapter rank (`[train] rank`).
    #[arg(long, value_name = "R")]
    pub rank: Option<usize>,
    /// Adapter alpha (`[train] alpha`); the update is scaled by alpha / rank.
    #[arg(long, value_name = "A")]
    pub alpha: Option<f64>,
    /// Output folder: checkpoints, metrics, validation videos, exported weights (`[train] output_dir`).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Continue a run: `latest` (the newest complete checkpoint in the output folder) or a
    /// checkpoint folder.
    #[arg(long, value_name = "latest|PATH")]
    pub resume: Option<String>,
    /// The cache folder (else `[data] cache_dir`, else `<output_dir>/cache`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Start even when `cogvx plan` says training or validation does not fit the device's
    /// memory (the check then only warns).
    #[arg(long)]
    pub force: bool,
}

/// `cogvx sample` flags (defaults: diffusers' `CogVideoXPipeline.__call__`).
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// The prompt; repeat for several videos (`<out stem>-<i>.mp4`).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// The negative prompt (classifier-free guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// A diffusers LoRA file (e.g. a run's pytorch_lora_weights.safetensors), applied at alpha / rank.
    #[arg(long, value_name = "FILE")]
    pub lora: Option<PathBuf>,
    /// Multiplies the LoRA's alpha / rank (1.0: the trained strength).
    #[arg(long, default_value_t = 1.0)]
    pub lora_strength: f64,
    /// The conditioning image (or a video, its first frame) for image-to-video models.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// The .mp4 to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (off at 1.0).
    #[arg(long, default_value_t = 6.0)]
    pub guidance_scale: f64,
    /// The cosine guidance ramp of the CogVideoX demos.
    #[arg(long)]
    pub dynamic_cfg: bool,
    /// Seed of the starting noise (and of any sampler noise).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Frames per second of the .mp4 (default 8, 16 for CogVideoX 1.5).
    #[arg(long)]
    pub fps: Option<f64>,
    /// A scheduler plugin by name (else `[model] scheduler`, else the folder's scheduler).
    #[arg(long)]
    pub scheduler: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Report every problem of a dataset (file and line); exits 1 if there is any.
    Check {
        /// The dataset root (else --data-root or `[data] root`).
        dir: Option<PathBuf>,
    },
    /// Run the plugin chain and write each preprocessed clip as .mp4, a contact sheet PNG and
    /// the rewritten captions, so you see what will be trained on.
    Preview {
        /// The dataset root (else --data-root or `[data] root`).
        dir: Option<PathBuf>,
        /// Output folder (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Decode + preprocess throughput (frames/s) of a generated 1080p clip to the target
    /// resolution, through the built-in, `.so` and `.wasm` crop_resize.
    Preprocess {
        /// Folder holding crop_resize.so and crop_resize.wasm (built by plugins/build.sh).
        #[arg(long, value_name = "DIR", default_value = "plugins")]
        plugins_dir: PathBuf,
        /// Seconds of 1080p video to generate.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Repetitions per transport.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
    /// One LoRA training step (loss, backward, clip, AdamW) of a random CogVideoX transformer
    /// with the shapes of shared/bench/torch_train_step.py; prints the same JSON fields, so the
    /// two are compared as a ratio (docs/benchmarks.md).
    TrainStep {
        /// `S` (4x64 heads, 4 layers, latent 5x16x24, rank 16), `M` (8x64, 8 layers, 7x30x44,
        /// rank 32) or `XL` (one CogVideoX-2B-width block, 30x64, 13x60x90 = 17,776 tokens, rank
        /// 128; minutes a step on a CPU: use --warmup 0 --steps 1), or `XL30` (XL with 30 blocks,
        /// CogVideoX-2B's depth; for a GPU, `--device cuda`); `wide` (XL's width, latent
        /// 5x30x44) and `long` (8x64 heads at XL's 17,776 tokens) check `cogvx plan`.
        #[arg(long, default_value = "S")]
        preset: String,
        /// CPU threads (the torch side's --threads).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Timed steps (the median and minimum are reported).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Recompute each block in the backward instead of keeping its activations.
        #[arg(long)]
        gradient_checkpointing: bool,
        /// With --gradient-checkpointing, keep the blocks' inputs in host memory until the
        /// backward, as `[train] gradient_checkpointing_offload`.
        #[arg(long, requires = "gradient_checkpointing")]
        checkpoint_offload: bool,
        /// Recompute the feed-forwards' pre-activations in the backward instead of keeping
        /// them, as `[train] recompute_feed_forward`.
        #[arg(long)]
        recompute_feed_forward: bool,
        /// "no" (f32), "bf16" or "fp16": frozen weights and compute in half precision, as
        /// `[train] mixed_precision` (on the CPU through burn's flex backend).
        #[arg(long, default_value = "no", value_parser = parse_mixed_precision)]
        mixed_precision: cogvx_model_core::precision::MixedPrecision,
        /// The CPU backend of an f32 step: `flex` (burn's threaded SIMD backend, which every CPU
        /// run uses) or `ndarray`; half precision always runs on flex.
        #[arg(long, default_value = "flex")]
        backend: cogvx_bench::CpuBackendKind,
    },
    /// Forward and backward of the attention operation alone at one shape (default:
    /// CogVideoX-2B at 49x480x720, [1, 30, 17776, 64]); prints time, GFLOP/s and peak RSS.
    Attention {
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 30)]
        heads: usize,
        /// Sequence length (text + video tokens).
        #[arg(long, default_value_t = 17_776)]
        len: usize,
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        /// The textbook formula, which keeps the [B, H, L, L] scores (for comparison).
        #[arg(long)]
        naive: bool,
        /// CPU threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Query rows per tile (with --block-k; default: sized to a 64 MiB tile; the CPU kernel
        /// runs at most 256 x 512 in the forward, 128 x 256 in the backward).
        #[arg(long, requires = "block_k")]
        block_q: Option<usize>,
        /// Key columns per tile (with --block-q).
        #[arg(long, requires = "block_q")]
        block_k: Option<usize>,
    },
    /// Matrix-product throughput ([M, K] x [K, N], default CogVideoX-2B's feed-forward at
    /// 17,776 tokens); prints the median time and GFLOP/s.
    Gemm {
        #[arg(long, default_value_t = 17_776)]
        m: usize,
        #[arg(long, default_value_t = 1920)]
        k: usize,
        #[arg(long, default_value_t = 7680)]
        n: usize,
        /// Timed products (after one warm-up).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// "no" (f32), "bf16" or "fp16".
        #[arg(long, default_value = "no", value_parser = parse_mixed_precision)]
        dtype: cogvx_model_core::precision::MixedPrecision,
        /// CPU threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

/// The tracing targets of cogvx's own crates (`-v` raises these, not wasmtime's or cranelift's).
const COGVX_TARGETS: &[&str] = &[
    "cogvx",
    "cogvx_adapters",
    "cogvx_bench",
    "cogvx_cache",
    "cogvx_data",
    "cogvx_dist",
    "cogvx_engine",
    "cogvx_io",
    "cogvx_kernels",
    "cogvx_metrics",
    "cogvx_model_core",
    "cogvx_plan",
    "cogvx_plugin_host",
    "cogvx_scheduler",
    "cogvx_text",
    "cogvx_train",
    "cogvx_trainer",
    "cogvx_transformer",
    "cogvx_vae",
    "cogvx_video",
];

/// The log filter of `-v` count `verbose`: info everywhere; `-v` debug and `-vv` trace for
/// cogvx's crates only (a dependency's debug lines, thousands from the WASM compiler, would
/// bury them); `-vvv` trace everywhere.
fn log_filter(verbose: u8) -> String {
    let ours = |level: &str| {
        let mut f = String::from("info");
        for t in COGVX_TARGETS {
            f.push_str(&format!(",{t}={level}"));
        }
        f
    };
    match verbose {
        0 => "info".into(),
        1 => ours("debug"),
        2 => ours("trace"),
        _ => "trace".into(),
    }
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    // In a data-parallel run, ranks other than 0 log warnings and errors only (unless -v).
    let quiet_rank = verbose == 0 && cogvx_dist::launcher_rank().is_some_and(|r| r > 0);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(if quiet_rank {
            "warn".into()
        } else {
            log_filter(verbose)
        })
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| cogvx_metrics::console::SuspendingStderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            match cogvx_dist::launcher_rank() {
                Some(r) => eprintln!("error (rank {r}): {e:#}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Launch(args) = cli.command {
        if cli.config.is_some()
            || !cli.plugins.is_empty()
            || cli.data_root.is_some()
            || cli.model.is_some()
            || cli.resolution.is_some()
            || cli.device.is_some()
        {
            anyhow::bail!("`launch` passes the arguments after `--` to each process: put --config, --plugin and the other options there (`cogvx launch --nproc-per-node N -- --config FILE train`)");
        }
        return commands::launch::run(args, cli.verbose);
    }
    let settings = commands::Settings::from_cli(&cli)?;
    match cli.command {
        Command::Plugins => commands::plugins::run(&settings),
        Command::Dataset {
            command: DatasetCommand::Check { dir },
        } => commands::dataset::check(&settings, dir),
        Command::Dataset {
            command: DatasetCommand::Preview { dir, out },
        } => commands::dataset::preview(&settings, dir, &out),
        Command::Prepare { dir, cache_dir } => commands::prepare::run(&settings, dir, cache_dir),
        Command::Train(args) => commands::train::run(&settings, args),
        Command::Launch(_) => unreachable!("handled above"),
        Command::Sample(args) => commands::sample::run(&settings, args),
        Command::Plan {
            gpu_memory,
            json,
            model_name,
            nproc,
        } => commands::plan::run(&settings, gpu_memory, json, model_name.as_deref(), nproc),
        Command::Parity {
            dir,
            filter,
            backend,
        } => commands::parity::run(&dir, filter.as_deref(), settings.device, backend),
        Command::Bench {
            command:
                BenchCommand::Preprocess {
                    plugins_dir,
                    seconds,
                    repeat,
                },
        } => commands::bench::preprocess(&settings, &plugins_dir, seconds, repeat),
        Command::Bench {
            command:
                BenchCommand::Attention {
                    batch,
                    heads,
                    len,
                    head_dim,
                    naive,
                    threads,
                    block_q,
                    block_k,
                },
        } => {
            let blocks = block_q
                .zip(block_k)
                .map(|(q, k)| cogvx_model_core::attention::BlockSizes { q, k });
            let options = cogvx_bench::attention::AttentionOptions {
                batch,
                heads,
                len,
                head_dim,
                naive,
                threads,
                blocks,
            };
            commands::bench::attention(&settings, options)
        }
        Command::Bench {
            command:
                BenchCommand::Gemm {
                    m,
                    k,
                    n,
                    repeat,
                    dtype,
                    threads,
                },
        } => commands::bench::gemm(
            &settings,
            cogvx_bench::gemm::GemmOptions {
                m,
                k,
                n,
                repeat,
                dtype: dtype.dtype(),
                threads,
            },
        ),
        Command::Bench {
            command:
                BenchCommand::TrainStep {
                    preset,
                    threads,
                    steps,
                    warmup,
                    gradient_checkpointing,
                    checkpoint_offload,
                    recompute_feed_forward,
                    mixed_precision,
                    backend,
                },
        } => commands::bench::train_step(
            &settings,
            &preset,
            cogvx_bench::StepOptions {
                threads,
                steps,
                warmup,
                gradient_checkpointing,
                checkpoint_offload,
                recompute_feed_forward,
                mixed_precision,
                cpu_backend: backend,
            },
        ),
    }
}

fn parse_mixed_precision(s: &str) -> Result<cogvx_model_core::precision::MixedPrecision, String> {
    use cogvx_model_core::precision::MixedPrecision;
    MixedPrecision::parse(s)
        .ok_or_else(|| format!("`{s}`: expected one of {}", MixedPrecision::NAMES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_raises_every_cogvx_crate_and_no_dependency() {
        // Every cogvx crate of the workspace is in COGVX_TARGETS.
        let manifest =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml"))
                .unwrap();
        let crates: Vec<String> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cogvx-"))
            .filter_map(|l| l.split_once(" = { path = \"host/"))
            .map(|(name, _)| format!("cogvx_{}", name.replace('-', "_")))
            .collect();
        assert!(crates.len() >= 15, "{crates:?}");
        for c in crates.iter().filter(|c| *c != "cogvx_fixtures") {
            assert!(
                COGVX_TARGETS.contains(&c.as_str()),
                "{c} is missing from COGVX_TARGETS"
            );
        }
        let v = log_filter(1);
        assert!(
            v.starts_with("info,") && v.contains(",cogvx_trainer=debug") && !v.contains("wasmtime"),
            "{v}"
        );
        assert_eq!(log_filter(0), "info");
        assert!(log_filter(2).contains(",cogvx_cache=trace"));
        assert_eq!(log_filter(3), "trace");
        // The filter parses.
        tracing_subscriber::EnvFilter::try_new(v).unwrap();
    }
}
