//! # cogvx-dist
//!
//! The processes of a data-parallel run and the collective operations between them.
//! [`Collective`] is what the trainer sees: its rank, the world size, an element-wise sum over
//! every rank, a gather and a barrier. [`Solo`] is the one-process run; [`Mpi`] (feature `mpi`)
//! is MPI's world communicator, for processes started by `mpirun` (`cogvx launch` runs it) or by a
//! scheduler with an MPI launcher (Slurm's `srun --mpi=pmix`). The engine is MPI's: nothing here
//! moves bytes between processes itself.
//!
//! [`from_env`] picks the implementation from the environment the process was started in.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the processes of a run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The environment asks for several processes, but they cannot be joined.
    #[error("{0}")]
    Setup(String),
    /// The processes run different jobs.
    #[error("{0}")]
    Mismatch(String),
}

/// Refuses to go on unless every rank runs the same job: `job` (e.g. the resolved config)
/// hashed on each rank and compared with rank 0's, naming the ranks that differ.
pub fn check_same_job(world: &dyn Collective, job: &[u8]) -> Result<(), DistError> {
    // FNV-1a, 64 bits: equal inputs give equal hashes on every rank.
    let mine = job.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let all = world.all_gather_u64(&[mine]);
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, h)| **h != all[0])
        .map(|(r, _)| r.to_string())
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(DistError::Mismatch(format!(
        "the processes of this run were started with different jobs: rank(s) {} differ from rank 0 in their config, cache or checkpoint \
         (hashes {all:016x?}); start every process with the same arguments, config file and output folder",
        differ.join(", ")
    )))
}

/// Seconds the processes of a run have to find each other at start-up
/// (`COGVX_RENDEZVOUS_TIMEOUT`, default 300).
pub fn rendezvous_timeout() -> Duration {
    let s = std::env::var("COGVX_RENDEZVOUS_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(s)
}

/// Ends the process with an error unless disarmed within its time: a rendezvous that never
/// completes (a rank that was not started, or cannot reach the others) is an error naming the
/// wait, not a hang. MPI's launcher then ends the other processes.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts the timer; after `timeout`, prints `error (rank r): {what}` and exits with status 3.
    pub fn arm(what: String, timeout: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let t0 = Instant::now();
        std::thread::spawn(move || {
            while t0.elapsed() < timeout {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50).min(timeout));
            }
            if !flag.load(Ordering::SeqCst) {
                let rank = launcher_rank().map_or("?".to_string(), |r| r.to_string());
                eprintln!("error (rank {rank}): {what}");
                std::process::exit(3);
            }
        });
        Watchdog { done }
    }

    /// Stops the timer.
    pub fn disarm(self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// The processes of a run as seen from one of them. Every rank calls the same operations in the
/// same order (a rank that skips one blocks the others: MPI's launcher ends the job when a rank
/// dies or exits with an error).
pub trait Collective {
    /// This process's rank, `0..world_size()`; rank 0 writes the run's files.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn world_size(&self) -> usize;
    /// Replaces `values` by their element-wise sum over the ranks (the same on every rank;
    /// every rank passes the same length).
    fn all_reduce_sum(&self, values: &mut [f32]);
    /// Every rank's `values` (the same length on each), concatenated in rank order.
    fn all_gather_u64(&self, values: &[u64]) -> Vec<u64>;
    /// `values` is `world_size()` blocks of equal length; returns this rank's block summed
    /// over the ranks (ZeRO's gradient reduce-scatter).
    fn reduce_scatter_sum(&self, values: &[f32]) -> Vec<f32>;
    /// Every rank's `values` (the same length on each), concatenated in rank order (ZeRO's
    /// parameter all-gather).
    fn all_gather_f32(&self, values: &[f32]) -> Vec<f32>;
    /// Every rank's `values` (the same length on each) concatenated in rank order at rank 0,
    /// `None` on the others.
    fn gather_f32(&self, values: &[f32]) -> Option<Vec<f32>>;
    /// Returns when every rank has called it.
    fn barrier(&self);
    /// What joins the processes, for logs ("one process", "MPI (Open MPI v4.1.4)").
    fn describe(&self) -> String;
}

impl fmt::Debug for dyn Collective + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} of {} ({})",
            self.rank(),
            self.world_size(),
            self.describe()
        )
    }
}

/// A run of one process: rank 0 of 1, every collective a no-op.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) {}
    fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
        values.to_vec()
    }
    fn reduce_scatter_sum(&self, values: &[f32]) -> Vec<f32> {
        values.to_vec()
    }
    fn all_gather_f32(&self, values: &[f32]) -> Vec<f32> {
        values.to_vec()
    }
    fn gather_f32(&self, values: &[f32]) -> Option<Vec<f32>> {
        Some(values.to_vec())
    }
    fn barrier(&self) {}
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// Environment variables an MPI launcher sets in each process it starts (Open MPI's `mpirun`,
/// PMI-1/2 and PMIx launchers such as Slurm's `srun --mpi=pmix`, MPICH's Hydra).
pub const MPI_LAUNCHER_VARS: &[&str] =
    &["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"];

/// Whether this process was started by an MPI launcher (one of [`MPI_LAUNCHER_VARS`] is set).
pub fn launched_by_mpi() -> bool {
    MPI_LAUNCHER_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// This process's rank as its MPI launcher set it (before MPI is initialised: for log lines).
pub fn launcher_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// This process's index among the run's processes on its machine, as the launcher set it
/// (each takes the GPU of that index).
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// The processes this one belongs to: MPI's world when an MPI launcher started it (this build
/// must have the `mpi` feature), else one process. `WORLD_SIZE` > 1 without an MPI launcher (a
/// torchrun-style start) is an error naming the launchers that work: the rendezvous is MPI's.
pub fn from_env() -> Result<Box<dyn Collective>, DistError> {
    if launched_by_mpi() {
        return mpi_world();
    }
    if let Some(n) = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if n > 1 {
            return Err(DistError::Setup(format!(
                "WORLD_SIZE={n} is set, but this process was not started by an MPI launcher: cogvx joins its processes through MPI; \
                 start them with `cogvx launch --nproc-per-node {n} -- <arguments>` on one machine, `cogvx launch --hosts a:N,b:N` \
                 or `mpirun` across machines, or `srun --mpi=pmix` under Slurm"
            )));
        }
    }
    Ok(Box::new(Solo))
}

#[cfg(feature = "mpi")]
fn mpi_world() -> Result<Box<dyn Collective>, DistError> {
    Ok(Box::new(Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world() -> Result<Box<dyn Collective>, DistError> {
    Err(DistError::Setup(
        "this process was started by an MPI launcher, but this cogvx was built without the `mpi` feature; \
         build it with `cargo build --release --features mpi` (needs libopenmpi-dev)"
            .into(),
    ))
}

#[cfg(feature = "mpi")]
pub use self::mpi_impl::Mpi;

#[cfg(all(feature = "mpi", feature = "nccl"))]
pub use self::nccl_impl::Nccl;

/// The processes of a CUDA run whose process uses GPU `device_index`: with an MPI launcher, NCCL
/// between the GPUs (MPI starts them and hands out NCCL's id; builds with `mpi` and `nccl`),
/// else as [`from_env`].
pub fn from_env_for_gpu(device_index: usize) -> Result<Box<dyn Collective>, DistError> {
    #[cfg(all(feature = "mpi", feature = "nccl"))]
    if launched_by_mpi() {
        let mpi = Mpi::init()?;
        if mpi.world_size() > 1 {
            return Ok(Box::new(Nccl::init(mpi, device_index)?));
        }
        return Ok(Box::new(mpi));
    }
    let _ = device_index;
    from_env()
}

#[cfg(feature = "mpi")]
mod mpi_impl {
    use super::{Collective, DistError};
    use mpi::collective::SystemOperation;
    use mpi::traits::*;

    /// MPI counts are C `int`s: buffers go in pieces of at most this many elements.
    const CHUNK: usize = 1 << 28;

    /// MPI's world communicator (initialised once per process; finalised when dropped).
    pub struct Mpi {
        world: mpi::topology::SimpleCommunicator,
        version: String,
        // Dropped last: MPI_Finalize.
        _universe: mpi::environment::Universe,
    }

    impl Mpi {
        /// Initialises MPI (`MPI_Init`; the launcher's rendezvous) and joins its world.
        pub fn init() -> Result<Self, DistError> {
            let universe = mpi::initialize().ok_or_else(|| {
                DistError::Setup("MPI was already initialised in this process".into())
            })?;
            let world = universe.world();
            let version = mpi::environment::library_version()
                .map(|v| {
                    v.split([',', '\n'])
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                })
                .unwrap_or_else(|_| "MPI".into());
            Ok(Mpi {
                world,
                version,
                _universe: universe,
            })
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world_size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum(&self, values: &mut [f32]) {
            for chunk in values.chunks_mut(CHUNK) {
                let send = chunk.to_vec();
                self.world
                    .all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
        }
        fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
            let mut out = vec![0u64; values.len() * self.world_size()];
            self.world.all_gather_into(values, &mut out[..]);
            out
        }
        fn reduce_scatter_sum(&self, values: &[f32]) -> Vec<f32> {
            let n = self.world_size();
            assert_eq!(
                values.len() % n,
                0,
                "reduce_scatter_sum: blocks of unequal length"
            );
            let block = values.len() / n;
            let mut out = vec![0f32; block];
            // In pieces of at most CHUNK elements per block: each piece's send buffer is the
            // piece of every block, in rank order.
            for start in (0..block.max(1)).step_by(CHUNK) {
                let len = CHUNK.min(block - start.min(block));
                if len == 0 {
                    break;
                }
                let send: Vec<f32> = (0..n)
                    .flat_map(|r| {
                        values[r * block + start..r * block + start + len]
                            .iter()
                            .copied()
                    })
                    .collect();
                self.world.reduce_scatter_block_into(
                    &send[..],
                    &mut out[start..start + len],
                    SystemOperation::sum(),
                );
            }
            out
        }
        fn all_gather_f32(&self, values: &[f32]) -> Vec<f32> {
            let n = self.world_size();
            let block = values.len();
            let mut out = vec![0f32; block * n];
            for start in (0..block.max(1)).step_by(CHUNK) {
                let len = CHUNK.min(block - start.min(block));
                if len == 0 {
                    break;
                }
                let mut piece = vec![0f32; len * n];
                self.world
                    .all_gather_into(&values[start..start + len], &mut piece[..]);
                for r in 0..n {
                    out[r * block + start..r * block + start + len]
                        .copy_from_slice(&piece[r * len..(r + 1) * len]);
                }
            }
            out
        }
        fn gather_f32(&self, values: &[f32]) -> Option<Vec<f32>> {
            let n = self.world_size();
            let block = values.len();
            let root = self.world.process_at_rank(0);
            let mut out = (self.rank() == 0).then(|| vec![0f32; block * n]);
            for start in (0..block.max(1)).step_by(CHUNK) {
                let len = CHUNK.min(block - start.min(block));
                if len == 0 {
                    break;
                }
                let send = &values[start..start + len];
                match &mut out {
                    Some(out) => {
                        let mut piece = vec![0f32; len * n];
                        root.gather_into_root(send, &mut piece[..]);
                        for r in 0..n {
                            out[r * block + start..r * block + start + len]
                                .copy_from_slice(&piece[r * len..(r + 1) * len]);
                        }
                    }
                    None => root.gather_into(send),
                }
            }
            out
        }
        fn barrier(&self) {
            self.world.barrier();
        }
        fn describe(&self) -> String {
            format!("MPI ({})", self.version)
        }
    }
}

#[cfg(all(feature = "mpi", feature = "nccl"))]
mod nccl_impl {
    use super::{Collective, DistError, Mpi};
    use cudarc::driver::{CudaContext, CudaStream};
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use std::sync::Arc;

    /// NCCL between the GPUs of the run's processes (one GPU each), bootstrapped through MPI;
    /// the bulk collectives (gradients, parameters) run on the GPUs, the rest on MPI. Each call
    /// copies its host values to the GPU and back: a failure of the device is fatal (the
    /// process panics naming the call, and MPI's launcher ends the others).
    pub struct Nccl {
        comm: Comm,
        stream: Arc<CudaStream>,
        mpi: Mpi,
    }

    impl Nccl {
        /// Joins NCCL's communicator of every rank on GPU `device_index` (rank 0 makes the id,
        /// MPI gives it to the others).
        pub fn init(mpi: Mpi, device_index: usize) -> Result<Self, DistError> {
            let setup = |what: &str, e: &dyn std::fmt::Debug| {
                DistError::Setup(format!(
                    "NCCL on cuda:{device_index}: {what}: {e:?} (is libnccl installed, and does each process have its own GPU?)"
                ))
            };
            let ctx = CudaContext::new(device_index).map_err(|e| setup("no CUDA context", &e))?;
            let stream = ctx.default_stream();
            let mine = if mpi.rank() == 0 {
                Id::new().map_err(|e| setup("no unique id", &e))?
            } else {
                Id::uninit([0; 128])
            };
            // The id's 128 bytes as 16 words; rank 0's are everyone's.
            let words: Vec<u64> = mine
                .internal()
                .chunks(8)
                .map(|c| u64::from_le_bytes(std::array::from_fn(|i| c[i] as u8)))
                .collect();
            let all = mpi.all_gather_u64(&words);
            let mut internal = [0 as std::ffi::c_char; 128];
            for (i, w) in all[..16].iter().enumerate() {
                for (j, b) in w.to_le_bytes().iter().enumerate() {
                    internal[i * 8 + j] = *b as std::ffi::c_char;
                }
            }
            let comm = Comm::from_rank(
                stream.clone(),
                mpi.rank(),
                mpi.world_size(),
                Id::uninit(internal),
            )
            .map_err(|e| setup("communicator", &e))?;
            Ok(Nccl { comm, stream, mpi })
        }

        fn fail(&self, what: &str, e: impl std::fmt::Debug) -> ! {
            panic!("NCCL {what} failed on rank {}: {e:?}", self.mpi.rank())
        }

        fn to_device(&self, values: &[f32]) -> cudarc::driver::CudaSlice<f32> {
            self.stream
                .clone_htod(values)
                .unwrap_or_else(|e| self.fail("copy to the GPU", e))
        }

        fn to_host(&self, buf: &cudarc::driver::CudaSlice<f32>, out: &mut [f32]) {
            self.stream
                .memcpy_dtoh(buf, out)
                .unwrap_or_else(|e| self.fail("copy to the host", e));
            self.stream
                .synchronize()
                .unwrap_or_else(|e| self.fail("synchronize", e));
        }
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.mpi.rank()
        }
        fn world_size(&self) -> usize {
            self.mpi.world_size()
        }
        fn all_reduce_sum(&self, values: &mut [f32]) {
            if values.is_empty() {
                return;
            }
            let mut buf = self.to_device(values);
            self.comm
                .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
                .unwrap_or_else(|e| self.fail("all-reduce", e));
            self.to_host(&buf, values);
        }
        fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
            self.mpi.all_gather_u64(values)
        }
        fn reduce_scatter_sum(&self, values: &[f32]) -> Vec<f32> {
            let block = values.len() / self.world_size();
            let mut out = vec![0f32; block];
            if block == 0 {
                return out;
            }
            let send = self.to_device(values);
            let mut recv = self
                .stream
                .alloc_zeros::<f32>(block)
                .unwrap_or_else(|e| self.fail("allocation", e));
            self.comm
                .reduce_scatter(&send, &mut recv, &ReduceOp::Sum)
                .unwrap_or_else(|e| self.fail("reduce-scatter", e));
            self.to_host(&recv, &mut out);
            out
        }
        fn all_gather_f32(&self, values: &[f32]) -> Vec<f32> {
            let mut out = vec![0f32; values.len() * self.world_size()];
            if values.is_empty() {
                return out;
            }
            let send = self.to_device(values);
            let mut recv = self
                .stream
                .alloc_zeros::<f32>(out.len())
                .unwrap_or_else(|e| self.fail("allocation", e));
            self.comm
                .all_gather(&send, &mut recv)
                .unwrap_or_else(|e| self.fail("all-gather", e));
            self.to_host(&recv, &mut out);
            out
        }
        fn gather_f32(&self, values: &[f32]) -> Option<Vec<f32>> {
            // Checkpoints only: MPI.
            self.mpi.gather_f32(values)
        }
        fn barrier(&self) {
            self.mpi.barrier();
        }
        fn describe(&self) -> String {
            format!("NCCL, bootstrapped by {}", self.mpi.describe())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_is_rank_zero_of_one_and_its_collectives_keep_the_values() {
        let c: Box<dyn Collective> = Box::new(Solo);
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let mut v = [1.0f32, -2.5];
        c.all_reduce_sum(&mut v);
        assert_eq!(v, [1.0, -2.5]);
        assert_eq!(c.all_gather_u64(&[7, 8]), vec![7, 8]);
        c.barrier();
        assert_eq!(format!("{c:?}"), "rank 0 of 1 (one process)");
    }

    /// Rank 0 and a rank whose gathered hash is another: named.
    struct OtherRank;

    impl Collective for OtherRank {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _values: &mut [f32]) {}
        fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
            vec![values[0], values[0] ^ 1]
        }
        fn reduce_scatter_sum(&self, values: &[f32]) -> Vec<f32> {
            values[..values.len() / 2].to_vec()
        }
        fn all_gather_f32(&self, values: &[f32]) -> Vec<f32> {
            [values, values].concat()
        }
        fn gather_f32(&self, values: &[f32]) -> Option<Vec<f32>> {
            Some(self.all_gather_f32(values))
        }
        fn barrier(&self) {}
        fn describe(&self) -> String {
            "two".into()
        }
    }

    #[test]
    fn a_rank_with_another_job_is_named() {
        check_same_job(&Solo, b"job").unwrap();
        let e = check_same_job(&OtherRank, b"job").unwrap_err().to_string();
        assert!(e.contains("rank(s) 1 differ from rank 0"), "{e}");
    }

    #[test]
    fn a_disarmed_watchdog_does_not_fire() {
        let w = Watchdog::arm("never".into(), Duration::from_millis(200));
        w.disarm();
        std::thread::sleep(Duration::from_millis(400));
        // Still running: the process did not exit.
    }
}
