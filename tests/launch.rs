//! End-to-end tests of data-parallel training (`cogvx launch`, several processes through Open
//! MPI's mpirun): two processes of batch 1 train as one of batch 2 and as one with accumulation
//! 2, a killed rank ends the run with an error and its last checkpoint resumes, a checkpoint of
//! two processes resumes with one, two and three, and bad starts are refused by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{cogvx, repo, s, text};

/// A run of the tiny 2B model on the four mini clips ([`common::tiny_run_config`]) named
/// `name` in `dir`, no TensorBoard, `extra` appended to `[train]`.
fn config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    common::tiny_run_config(
        &dir.join(format!("{name}.toml")),
        &dir.join("cache"),
        &dir.join(name),
        "",
        &format!("tensorboard = false\n{extra}"),
    )
}

/// `cogvx launch --nproc-per-node n -- <args>`.
fn launch(n: usize, args: &[&str]) -> Output {
    let n = n.to_string();
    let mut all = vec!["launch", "--nproc-per-node", &n, "--"];
    all.extend_from_slice(args);
    cogvx(&all)
}

/// Open MPI's mpirun with the flags a test machine needs (root, fewer cores than processes).
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_LOG", "warn")
        .current_dir(repo());
    c
}

fn ok(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// The step records of metrics.jsonl: (step, loss, timesteps).
fn steps(out_dir: &Path) -> Vec<(u64, f64, Vec<u64>)> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["timesteps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

/// The f32 tensors of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32", "{k}");
            let [a, b] = [0, 1].map(|i| v["data_offsets"][i].as_u64().unwrap() as usize);
            let values = data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k.clone(), values)
        })
        .collect()
}

const LORA: &str = "pytorch_lora_weights.safetensors";

/// The largest difference between two files' tensors, and the largest magnitude.
fn max_diff(a: &Path, b: &Path) -> (f32, f32) {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut d = 0f32;
    let mut m = 0f32;
    for (k, x) in &a {
        for (p, q) in x.iter().zip(&b[k]) {
            d = d.max((p - q).abs());
            m = m.max(q.abs());
        }
    }
    (d, m)
}

/// Two processes of batch 1 make the updates of one process of batch 2, and of one process of
/// batch 1 with gradient accumulation 2: the same samples and draws per step (the timesteps are
/// equal), losses within 1e-5 relative and LoRA weights within 1e-6 (they reach ~0.2) after 4
/// steps. Only rank 0 writes: one step record per step.
#[test]
fn two_processes_train_as_one_process_of_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let two = config(dir.path(), "two", "max_steps = 4\ncheckpointing_steps = 2");
    // The cache first (each run would otherwise prepare it; rank 0 does, the others wait).
    ok(&cogvx(&["--config", s(&two), "prepare"]));
    let out = launch(2, &["--config", s(&two), "train"]);
    let stdout = ok(&out);
    assert!(stdout.contains("trained steps 0..4 of 4"), "{stdout}");
    // Rank 1 reports nothing: one summary.
    assert_eq!(stdout.matches("trained steps").count(), 1, "{stdout}");
    let batch = config(
        dir.path(),
        "batch",
        "max_steps = 4\ncheckpointing_steps = 2\nbatch_size = 2",
    );
    ok(&cogvx(&["--config", s(&batch), "train"]));
    let accum = config(
        dir.path(),
        "accum",
        "max_steps = 4\ncheckpointing_steps = 2\ngradient_accumulation_steps = 2",
    );
    ok(&cogvx(&["--config", s(&accum), "train"]));

    let two_steps = steps(&dir.path().join("two"));
    assert_eq!(two_steps.len(), 4);
    for other in ["batch", "accum"] {
        let o = steps(&dir.path().join(other));
        assert_eq!(o.len(), 4);
        for (a, b) in two_steps.iter().zip(&o) {
            assert_eq!((a.0, &a.2), (b.0, &b.2), "{other}");
            assert_eq!(a.2.len(), 2);
            assert!(
                (a.1 - b.1).abs() <= 1e-5 * b.1.abs(),
                "{other}: {a:?} {b:?}"
            );
        }
        let (d, m) = max_diff(
            &dir.path().join("two").join(LORA),
            &dir.path().join(other).join(LORA),
        );
        assert!(
            d <= 1e-6 && m > 1e-2,
            "{other}: max difference {d}, magnitude {m}"
        );
    }
    // The checkpoints record the world size.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("two/checkpoint-4/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2);
}

/// A checkpoint of two processes resumes with one, two and three. With two it continues
/// exactly (losses and weights equal to the uninterrupted run's); with one and three the data
/// goes on at the next sample with its draws (the timesteps follow the uninterrupted run's
/// sequence), and the run trains to its end.
#[test]
fn a_two_process_checkpoint_resumes_with_one_two_and_three() {
    let dir = tempfile::tempdir().unwrap();
    let whole = config(
        dir.path(),
        "whole",
        "max_steps = 4\ncheckpointing_steps = 2",
    );
    ok(&cogvx(&["--config", s(&whole), "prepare"]));
    ok(&launch(2, &["--config", s(&whole), "train"]));
    let whole_steps = steps(&dir.path().join("whole"));
    let sequence: Vec<u64> = whole_steps.iter().flat_map(|s| s.2.clone()).collect();
    assert_eq!(sequence.len(), 8);

    for n in [1usize, 2, 3] {
        let name = format!("resumed{n}");
        let cfg = config(dir.path(), &name, "max_steps = 4\ncheckpointing_steps = 2");
        // The first two steps with two processes, then stopped.
        ok(&launch(
            2,
            &["--config", s(&cfg), "train", "--max-steps", "2"],
        ));
        let args = ["--config", s(&cfg), "train", "--resume", "latest"];
        let stdout = if n == 1 {
            ok(&cogvx(&args))
        } else {
            ok(&launch(n, &args))
        };
        assert!(
            stdout.contains("resumed from") && stdout.contains("checkpoint-2"),
            "{stdout}"
        );
        let got = steps(&dir.path().join(&name));
        assert_eq!(
            got.iter().map(|s| s.0).collect::<Vec<_>>(),
            [1, 2, 3, 4],
            "{n}"
        );
        // Steps 3 and 4 take n samples each (the last of the epoch's 4 fewer): the sequence goes on.
        let after: Vec<u64> = got[2..].iter().flat_map(|s| s.2.clone()).collect();
        let want = &sequence[4..4 + after.len()];
        assert_eq!(after, want, "{n} processes");
        assert_eq!(got[2].2.len(), n, "{n}");
        assert!(got.iter().all(|s| s.1.is_finite()));
        if n == 2 {
            assert_eq!(got, whole_steps);
            let (d, _) = max_diff(
                &dir.path().join("whole").join(LORA),
                &dir.path().join(&name).join(LORA),
            );
            assert_eq!(d, 0.0);
        }
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                dir.path()
                    .join(&name)
                    .join("checkpoint-4/trainer_state.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(state["world_size"], n);
        assert_eq!(state["resized"].as_bool().unwrap_or(false), n != 2);
    }
}

/// The processes of `config`'s run: their pids by rank (found by their command line and the
/// rank mpirun put in their environment).
fn rank_pid(config: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(s(config)) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// A rank killed with SIGKILL mid-run: mpirun ends the other and `launch` exits with an error
/// naming the rank within seconds (not a hang); `--resume latest` continues from the last
/// complete checkpoint.
#[test]
fn a_killed_rank_ends_the_run_and_its_last_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "run",
        "max_steps = 100000\ncheckpointing_steps = 2\ncheckpoints_total_limit = 2",
    );
    ok(&cogvx(&["--config", s(&cfg), "prepare"]));
    let mut child = Command::new(env!("CARGO_BIN_EXE_cogvx"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "--config",
            s(&cfg),
            "train",
        ])
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few checkpoints.
    let t0 = Instant::now();
    let out = dir.path().join("run");
    let has_checkpoint = || {
        std::fs::read_dir(&out).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        })
    };
    while !has_checkpoint() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = rank_pid(&cfg, 1).expect("rank 1 is running");
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t_kill = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t_kill.elapsed() < Duration::from_secs(30),
            "the run did not end within 30 s of a rank's death"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = child.wait_with_output().unwrap();
    let (_, stderr) = text(&result);
    assert!(!result.status.success());
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "{stderr}"
    );
    assert!(stderr.contains("the run's processes failed"), "{stderr}");
    assert!(rank_pid(&cfg, 0).is_none(), "rank 0 outlived the run");

    // The newest complete checkpoint resumes (one process, two more steps).
    let latest = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("checkpoint-")?.parse::<u64>().ok()
        })
        .filter(|step| {
            out.join(format!("checkpoint-{step}"))
                .join("trainer_state.json")
                .is_file()
        })
        .max()
        .unwrap();
    let until = (latest + 2).to_string();
    let stdout = ok(&cogvx(&[
        "--config",
        s(&cfg),
        "train",
        "--resume",
        "latest",
        "--max-steps",
        &until,
    ]));
    assert!(stdout.contains("resumed from"), "{stdout}");
    assert!(
        stdout.contains(&format!("trained steps {}..{until}", latest))
            || stdout.contains(&format!("trained steps {}..{until}", latest + 2)),
        "{stdout}"
    );
}

/// Bad starts, each refused by name before training: more processes than micro-batches,
/// processes started with different configs, a rank that never joins (within the rendezvous
/// timeout), `WORLD_SIZE` without an MPI launcher, cogvx's options before `launch`.
#[test]
fn bad_data_parallel_starts_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "run", "max_steps = 2");
    ok(&cogvx(&["--config", s(&cfg), "prepare"]));

    let out = launch(5, &["--config", s(&cfg), "train"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the run has 5 processes, but an epoch")
            && stderr.contains("4 micro-batches"),
        "{stderr}"
    );

    // Rank 1 with another max_steps (MPMD: one mpirun, two command lines).
    let exe = env!("CARGO_BIN_EXE_cogvx");
    let out = mpirun()
        .args(["-n", "1", exe, "--config", s(&cfg), "train", ":"])
        .args([
            "-n",
            "1",
            exe,
            "--config",
            s(&cfg),
            "train",
            "--max-steps",
            "3",
        ])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("different jobs") && stderr.contains("rank(s) 1 differ from rank 0"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("run/metrics.jsonl").exists(),
        "a refused run wrote its output"
    );

    // A rank that never joins (here not a cogvx at all): the others give up after the
    // rendezvous timeout, naming it, and mpirun ends the job.
    let t0 = Instant::now();
    let out = mpirun()
        .env("COGVX_RENDEZVOUS_TIMEOUT", "3")
        .args(["-n", "1", exe, "--config", s(&cfg), "train", ":"])
        .args(["-n", "1", "sleep", "60"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("did not all start and agree on the job within 3 s"),
        "{stderr}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());

    let out = Command::new(exe)
        .args(["--config", s(&cfg), "train"])
        .env("WORLD_SIZE", "2")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("WORLD_SIZE=2") && stderr.contains("cogvx launch --nproc-per-node 2"),
        "{stderr}"
    );

    let out = cogvx(&["--config", s(&cfg), "launch", "--", "train"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("put --config"), "{stderr}");
}

/// Runs `a` and `b` (output folders under `dir`) agree over `n` steps: the same steps and
/// timesteps, losses within `loss` relative, their `checkpoint-<n>` weights within `weights`
/// and AdamW states within `states` (absolute, each file's values non-zero).
fn assert_runs_agree(
    dir: &Path,
    (a, b): (&str, &str),
    n: usize,
    loss: f64,
    weights: f32,
    states: f32,
) {
    let (x, y) = (steps(&dir.join(a)), steps(&dir.join(b)));
    assert_eq!(x.len(), n);
    for (p, q) in x.iter().zip(&y) {
        assert_eq!((p.0, &p.2), (q.0, &q.2));
        assert!((p.1 - q.1).abs() <= loss * q.1.abs(), "{p:?} {q:?}");
    }
    let (xc, yc) = (
        dir.join(a).join(format!("checkpoint-{n}")),
        dir.join(b).join(format!("checkpoint-{n}")),
    );
    for (file, tolerance) in [
        ("weights.safetensors", weights),
        ("optimizer.safetensors", states),
    ] {
        let (d, m) = max_diff(&xc.join(file), &yc.join(file));
        assert!(
            d <= tolerance && m > 0.0,
            "{file}: max difference {d}, magnitude {m}"
        );
    }
}

/// SFT (every transformer weight trained) with ZeRO-2 over two processes of batch 1 makes the
/// updates of one process of batch 2 with a replicated optimizer: the same timesteps, losses
/// within 1e-5 relative, AdamW states within 1e-6 and weights within 1e-4 (0.1 x lr, see below)
/// after 3 steps. Each
/// process logs its share of the states; the checkpoint holds the whole state (gathered at
/// rank 0), so it resumes with one process without ZeRO and with three with it.
#[test]
fn sft_with_zero_2_over_two_processes_trains_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let sft = "adapter = \"sft\"\nmax_steps = 3\ncheckpointing_steps = 3";
    let zero = config(dir.path(), "zero", &format!("{sft}\nzero_stage = 2"));
    ok(&cogvx(&["--config", s(&zero), "prepare"]));
    let out = Command::new(env!("CARGO_BIN_EXE_cogvx"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "--config",
            s(&zero),
            "train",
        ])
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Rank 0's share (rank 1 logs warnings only): a part of the trainable values, not all.
    let line = stderr
        .lines()
        .find(|l| l.contains("ZeRO-2: this process keeps the optimizer states of"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (owned, total) = (nums[nums.len() - 2], nums[nums.len() - 1]);
    assert!(owned > total / 3 && owned < total * 2 / 3, "{line}");

    let plain = config(dir.path(), "plain", &format!("{sft}\nbatch_size = 2"));
    ok(&cogvx(&["--config", s(&plain), "train"]));
    // The AdamW states agree to 1e-8; the weights within 1e-4 = 0.1 x lr: AdamW divides each
    // moment by its root mean square, so a near-zero gradient element whose sum differs in the
    // last bits between one batch of 2 and two summed batches of 1 moves its weight by up to lr
    // either way (measured: 4.2e-5 for two processes without ZeRO, 4.4e-5 with it).
    assert_runs_agree(dir.path(), ("zero", "plain"), 3, 1e-5, 1e-4, 1e-6);
    let zc = dir.path().join("zero/checkpoint-3");

    // The ZeRO checkpoint resumes with one process (replicated) and with three (ZeRO-2).
    for (n, stage) in [(1usize, 0u8), (3, 2)] {
        let name = format!("resume{n}");
        let cfg = config(
            dir.path(),
            &name,
            &format!("{sft}\nzero_stage = {stage}").replace("max_steps = 3", "max_steps = 5"),
        );
        let dst = dir.path().join(&name);
        std::fs::create_dir_all(&dst).unwrap();
        let copied = Command::new("cp")
            .args(["-r", s(&zc), s(&dst)])
            .status()
            .unwrap();
        assert!(copied.success());
        let args = ["--config", s(&cfg), "train", "--resume", "latest"];
        let stdout = if n == 1 {
            ok(&cogvx(&args))
        } else {
            ok(&launch(n, &args))
        };
        assert!(stdout.contains("trained steps 3..5 of 5"), "{n}: {stdout}");
    }
}

/// `[train] optimizer_offload = true` (AdamW states in host memory, stepped on the CPU
/// backend) trains as the optimizer on the training device: LoRA losses within 1e-5 relative
/// and weights within 1e-6 after 4 steps, in one process.
#[test]
fn optimizer_offload_trains_as_the_device_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let base = "max_steps = 4\ncheckpointing_steps = 4";
    let offload = config(
        dir.path(),
        "offload",
        &format!("{base}\noptimizer_offload = true"),
    );
    ok(&cogvx(&["--config", s(&offload), "prepare"]));
    ok(&cogvx(&["--config", s(&offload), "train"]));
    let plain = config(dir.path(), "plain", base);
    ok(&cogvx(&["--config", s(&plain), "train"]));
    let (a, b) = (
        steps(&dir.path().join("offload")),
        steps(&dir.path().join("plain")),
    );
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() <= 1e-5 * y.1.abs(), "{x:?} {y:?}");
    }
    let (d, m) = max_diff(
        &dir.path().join("offload").join(LORA),
        &dir.path().join("plain").join(LORA),
    );
    assert!(d <= 1e-6 && m > 1e-2, "max difference {d}, magnitude {m}");
}

/// The f32 values of a checkpoint's weights that bf16 cannot hold (low 16 bits set).
fn share_beyond_bf16(checkpoint: &Path) -> f64 {
    let t = tensors(&checkpoint.join("weights.safetensors"));
    let all: Vec<f32> = t.into_values().flatten().collect();
    all.iter().filter(|v| v.to_bits() & 0xffff != 0).count() as f64 / all.len() as f64
}

/// SFT in bf16 with ZeRO-2 (DeepSpeed's layout): the model holds bf16 weights and each process
/// the f32 masters of its share. Two processes of batch 1 against one process of batch 2 with
/// optimizer offload (the same layout, one shard): the same timesteps, losses within 2e-3
/// relative, masters within 5e-3 (5 x lr) and AdamW states within 1e-3 after 3 steps: the
/// gradients are bf16 (as the weights), so splitting the batch changes their rounding and
/// AdamW's normalised step turns that into up to a few lr. The checkpoints hold the f32 masters
/// (all but a few values beyond bf16's precision), and resume with one process.
#[test]
fn bf16_sft_with_zero_2_keeps_f32_masters_beside_bf16_weights() {
    let dir = tempfile::tempdir().unwrap();
    let sft =
        "adapter = \"sft\"\nmixed_precision = \"bf16\"\nmax_steps = 3\ncheckpointing_steps = 3";
    let zero = config(dir.path(), "zero", &format!("{sft}\nzero_stage = 2"));
    ok(&cogvx(&["--config", s(&zero), "prepare"]));
    ok(&launch(2, &["--config", s(&zero), "train"]));
    let offload = config(
        dir.path(),
        "offload",
        &format!("{sft}\nbatch_size = 2\noptimizer_offload = true"),
    );
    ok(&cogvx(&["--config", s(&offload), "train"]));
    assert_runs_agree(dir.path(), ("zero", "offload"), 3, 2e-3, 5e-3, 1e-3);
    let (zc, oc) = (
        dir.path().join("zero/checkpoint-3"),
        dir.path().join("offload/checkpoint-3"),
    );
    for c in [&zc, &oc] {
        let share = share_beyond_bf16(c);
        assert!(
            share > 0.9,
            "{}: only {share} of the weights are beyond bf16",
            c.display()
        );
    }
    // Resumed with one process (offload): the masters come from the checkpoint.
    let args = [
        "--config",
        s(&zero),
        "train",
        "--resume",
        "latest",
        "--max-steps",
        "4",
    ];
    let stdout = ok(&cogvx(&args));
    assert!(stdout.contains("trained steps 3..4 of 4"), "{stdout}");
    assert!(share_beyond_bf16(&dir.path().join("zero/checkpoint-4")) > 0.9);
}
