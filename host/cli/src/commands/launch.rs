//! `cogvx launch`: a data-parallel run of N processes of this cogvx on this machine, started by
//! Open MPI's `mpirun` (the processes join through MPI, see `cogvx_dist`).

use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// `cogvx launch` flags.
#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// Processes to start on this machine (one per GPU, or several CPU processes).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nproc_per_node: usize,
    /// The `mpirun` to start them with (default: the COGVX_MPIRUN variable, else `mpirun` on
    /// the PATH).
    #[arg(long, value_name = "FILE")]
    pub mpirun: Option<PathBuf>,
    /// The arguments of every process, after `--`: e.g. `-- --config configs/quickstart.toml train`.
    #[arg(last = true, required = true, value_name = "COGVX ARGUMENTS")]
    pub args: Vec<String>,
}

/// The `mpirun` command line: `-n N`, no core binding (each rank runs its own thread pool),
/// `--oversubscribe` when there are more processes than cores, `--allow-run-as-root` as root.
pub fn mpirun_args(n: usize, cores: usize, root: bool, exe: &str, args: &[String]) -> Vec<String> {
    let mut a = vec![
        "-n".to_string(),
        n.to_string(),
        "--bind-to".into(),
        "none".into(),
    ];
    if n > cores {
        a.push("--oversubscribe".into());
    }
    if root {
        a.push("--allow-run-as-root".into());
    }
    a.push(exe.into());
    a.extend(args.iter().cloned());
    a
}

/// Starts the processes and waits for them; the exit status is mpirun's (it ends every process
/// when one dies or fails, naming it).
pub fn run(args: LaunchArgs, verbose: u8) -> Result<ExitCode> {
    if !cfg!(feature = "mpi") {
        bail!("this cogvx was built without the `mpi` feature, which `launch` needs; build it with `cargo build --release --features mpi` (needs libopenmpi-dev)");
    }
    if args.nproc_per_node == 0 {
        bail!("--nproc-per-node 0: give at least 1");
    }
    let mpirun = args
        .mpirun
        .clone()
        .or_else(|| std::env::var_os("COGVX_MPIRUN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("mpirun"));
    let exe = std::env::current_exe()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut forwarded = Vec::new();
    if verbose > 0 {
        forwarded.push(format!("-{}", "v".repeat(verbose as usize)));
    }
    forwarded.extend(args.args.iter().cloned());
    let argv = mpirun_args(
        args.nproc_per_node,
        cores,
        root,
        &exe.to_string_lossy(),
        &forwarded,
    );
    let mut cmd = Command::new(&mpirun);
    cmd.args(&argv);
    // Each process's thread pool gets its share of the cores (unless set), and a rank waiting in
    // a collective yields its core to the others.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env(
            "RAYON_NUM_THREADS",
            (cores / args.nproc_per_node).max(1).to_string(),
        );
    }
    if std::env::var_os("OMPI_MCA_mpi_yield_when_idle").is_none() {
        cmd.env("OMPI_MCA_mpi_yield_when_idle", "1");
    }
    tracing::info!("{} {}", mpirun.display(), argv.join(" "));
    let status = cmd.status().map_err(|e| {
        anyhow::anyhow!(
            "cannot run `{}`: {e}; install Open MPI (`apt install openmpi-bin`) or name its mpirun with --mpirun / COGVX_MPIRUN",
            mpirun.display()
        )
    })?;
    match status.code() {
        Some(0) => Ok(ExitCode::SUCCESS),
        Some(c) => {
            eprintln!("error: the run's processes failed (mpirun exited with {c}; see the messages above)");
            Ok(ExitCode::from(c.clamp(1, 255) as u8))
        }
        None => bail!("mpirun was killed by a signal ({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpirun_gets_the_count_and_oversubscribes_only_past_the_cores() {
        let args = vec!["--config".to_string(), "c.toml".into(), "train".into()];
        let a = mpirun_args(2, 2, false, "/bin/cogvx", &args);
        assert_eq!(
            a.join(" "),
            "-n 2 --bind-to none /bin/cogvx --config c.toml train"
        );
        let a = mpirun_args(3, 2, true, "/bin/cogvx", &args);
        assert_eq!(
            a.join(" "),
            "-n 3 --bind-to none --oversubscribe --allow-run-as-root /bin/cogvx --config c.toml train"
        );
    }
}
