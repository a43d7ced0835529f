//! WASM transport: `cogvx:plugin` components run by wasmtime (component model, WASI p2).
//!
//! * One [`wasmtime::Engine`] per process; each `.wasm` is compiled once (cached by path,
//!   size and modification time) and pre-linked against the sandbox's WASI imports.
//! * Sandbox: no preopened directories, no environment, no arguments, no network (no TCP, UDP
//!   or name lookup), stdin closed; stdout and stderr go to `tracing` (target
//!   `cogvx::plugin`). Only `list-samples` runs in a separate instance that sees the dataset
//!   root read-only at [`GUEST_DATASET_ROOT`]; paths it returns are translated back.
//! * Limits ([`WasmLimits`]): a cap on the memory of an instance (all its linear memories and
//!   tables together; a `memory.grow` past it traps) and a time cap per call: epoch
//!   interruption (ticked by a background thread) stops guest code; a call blocked inside a
//!   WASI host call (e.g. a long sleep), which epochs cannot reach, is abandoned one second past
//!   the cap (each instance lives on its own worker thread, which keeps the instance's memory
//!   until the call ends). At most 3 worker threads of a plugin are alive at once, and after 3
//!   timed-out calls (interrupted or abandoned) the plugin is disabled for the run. Epochs
//!   follow the wall clock.
//! * What a plugin prints reaches the log escaped and bounded (64 KiB per call).
//! * A trap (panic, `unreachable`, timeout, out of memory) discards the instance; the next
//!   call instantiates a fresh one and re-applies the last `configure` parameters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use std::time::{Duration, SystemTime};

use cogvx_plugin_api::*;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::LoadError;

/// Bindings of the `cogvx:plugin@0.1.0` world and their conversions (one module per supported
/// API version: the next version gets a `v0_2_0.rs` beside it).
mod v0_1_0;

mod log;
use log::{GuestLog, GuestStream};

use v0_1_0::cogvx::plugin::types as w;

/// Where a dataset reader sees its (read-only) dataset root inside the sandbox.
pub const GUEST_DATASET_ROOT: &str = "/dataset";

/// The export name of the guest interface, without the version.
const GUEST_INTERFACE: &str = "cogvx:plugin/guest";

/// Resource caps of a WASM plugin instance.
#[derive(Clone, Debug, PartialEq)]
pub struct WasmLimits {
    /// Maximum size of the instance's linear memory, in bytes (default 512 MiB).
    pub max_memory_bytes: usize,
    /// Maximum wall time of one call, instantiation included (default 30 s).
    pub call_timeout: Duration,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits {
            max_memory_bytes: 512 << 20,
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// Period of the epoch ticker; the time cap is enforced to about this precision.
const TICK: Duration = Duration::from_millis(5);

fn deadline_ticks(limits: &WasmLimits) -> u64 {
    (limits.call_timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64).max(1)
}

fn mib(bytes: usize) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}

// ------------------------------------------------------------------ engine

/// A compiled file is reused while its canonical path, size and modification time match.
type CacheKey = (PathBuf, u64, Option<SystemTime>);

struct Runtime {
    engine: Engine,
    linker: Linker<WasmState>,
    /// Pre-linked components and their API version.
    compiled: Mutex<HashMap<CacheKey, (v0_1_0::PluginPre<WasmState>, String)>>,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

fn runtime() -> Result<&'static Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            let mut config = Config::new();
            config.wasm_component_model(true).epoch_interruption(true);
            let engine =
                Engine::new(&config).map_err(|e| format!("cannot start the WASM engine: {e}"))?;
            let mut linker = Linker::new(&engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
                .map_err(|e| format!("cannot link WASI into the WASM engine: {e}"))?;
            let ticker = engine.clone();
            std::thread::Builder::new()
                .name("cogvx-wasm-epoch".into())
                .spawn(move || {
                    // Epochs follow the wall clock, not the count of sleeps: a loaded machine
                    // oversleeps, and counted sleeps made a CPU-bound guest outlive its cap
                    // (then misreported as blocked in a host call).
                    let start = std::time::Instant::now();
                    let mut ticks: u128 = 0;
                    loop {
                        std::thread::sleep(TICK);
                        let due = start.elapsed().as_nanos() / TICK.as_nanos();
                        while ticks < due {
                            ticker.increment_epoch();
                            ticks += 1;
                        }
                    }
                })
                .map_err(|e| format!("cannot start the WASM epoch thread: {e}"))?;
            Ok(Runtime {
                engine,
                linker,
                compiled: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Compiles (once per process) and pre-links a component; returns it with its API version.
fn compile(path: &Path) -> Result<(v0_1_0::PluginPre<WasmState>, String), LoadError> {
    let unreadable = |e: std::io::Error| LoadError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    let canonical = std::fs::canonicalize(path).map_err(unreadable)?;
    let key = (canonical, meta.len(), meta.modified().ok());
    let rt = runtime().map_err(|reason| LoadError::Start {
        path: path.to_path_buf(),
        reason,
    })?;
    if let Some(hit) = rt
        .compiled
        .lock()
        .expect("compile cache poisoned")
        .get(&key)
    {
        return Ok(hit.clone());
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    let not_a_plugin = |reason: String| LoadError::NotAPlugin {
        path: path.to_path_buf(),
        reason,
    };
    if !bytes.starts_with(b"\0asm") {
        return Err(not_a_plugin("not a WASM file (no `\\0asm` header)".into()));
    }
    // Byte 4..8: 0x01 00 00 00 is a core module, 0x0d 00 01 00 a component.
    if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
        return Err(not_a_plugin(
            "a core WASM module, not a component; build the plugin with `cargo build --target wasm32-wasip2`".into(),
        ));
    }
    let started = std::time::Instant::now();
    let component = Component::from_binary(&rt.engine, &bytes)
        .map_err(|e| not_a_plugin(format!("not a valid WASM component: {e}")))?;
    tracing::debug!(path = %path.display(), elapsed = ?started.elapsed(), "compiled WASM plugin");
    let ty = component.component_type();
    let version = ty
        .exports(&rt.engine)
        .find_map(|(name, _)| name.strip_prefix(GUEST_INTERFACE).and_then(|v| v.strip_prefix('@')).map(str::to_string))
        .ok_or_else(|| {
            not_a_plugin(format!(
                "the component exports no `{GUEST_INTERFACE}` interface (call `cogvx_plugin_api::export_plugin!` in the plugin crate)"
            ))
        })?;
    if version != API_VERSION {
        return Err(LoadError::ApiVersion {
            path: path.to_path_buf(),
            found: version,
            expected: API_VERSION.into(),
        });
    }
    let pre = rt
        .linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Start {
            path: path.to_path_buf(),
            reason: format!("it needs imports the sandbox does not provide: {e}"),
        })?;
    let pre = v0_1_0::PluginPre::new(pre).map_err(|e| {
        not_a_plugin(format!(
            "its exports do not match cogvx:plugin@{API_VERSION}: {e}"
        ))
    })?;
    let entry = (pre, version);
    rt.compiled
        .lock()
        .expect("compile cache poisoned")
        .insert(key, entry.clone());
    Ok(entry)
}

// ------------------------------------------------------------------ store state

struct WasmState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
}

impl WasiView for WasmState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps the instance's memory: every linear memory and table together (a component can hold
/// several core instances, each with its own memory: 8 of them reached 3.5 GB under a 512 MiB
/// cap counted per memory). Remembers a refused growth so the error can say "out of memory".
struct MemoryCap {
    max_bytes: usize,
    /// Bytes of every memory and table of the instance.
    used: usize,
    refused: Option<usize>,
}

impl MemoryCap {
    fn new(max_bytes: usize) -> Self {
        MemoryCap {
            max_bytes,
            used: 0,
            refused: None,
        }
    }

    /// Grows the total by `desired - current`, or refuses (the total is left as it was).
    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.max_bytes {
            self.refused = Some(total);
            return false;
        }
        self.used = total;
        true
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if !self.grow(current, desired) {
            wasmtime::bail!(
                "memory cap of {} exceeded (all memories together would take {})",
                mib(self.max_bytes),
                mib(self.refused.unwrap_or(desired))
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables cost a pointer per element; counted against the same cap.
        let size = std::mem::size_of::<usize>();
        Ok(self.grow(current.saturating_mul(size), desired.saturating_mul(size)))
    }
}

// ------------------------------------------------------------------ plugin

struct Instance {
    store: Store<WasmState>,
    bindings: v0_1_0::Plugin,
}

/// How a call went wrong.
enum Failure {
    /// The plugin returned an error value; the instance is fine.
    Guest(PluginError),
    /// The instance trapped (or could not be created); it must be discarded.
    Trap(String),
    /// The call stayed blocked in a host call past its time cap: its worker thread was left to
    /// finish on its own, holding the instance's memory until it does.
    Abandoned(String),
}

/// Worker threads of one plugin alive at once (the current one and abandoned ones still blocked
/// in host calls, each holding its instance's memory): at most this many, so a plugin that
/// allocates and sleeps holds at most this many times its memory cap.
const MAX_LIVE_WORKERS: usize = 3;
/// wasmtime's default allowance of data copied in one call, kept for every call but
/// `transform-frames` (which gets twice its frames' size on top).
const HOSTCALL_FUEL_MIN: usize = 128 << 20;
/// Timed-out calls (abandoned, or interrupted past the cap) after which the plugin is disabled
/// for the rest of the process.
const MAX_ABANDONMENTS: u32 = 3;

/// A guest call, run on the worker thread that owns the instance.
type GuestCall<R> = Box<
    dyn FnOnce(
            &v0_1_0::Plugin,
            &mut Store<WasmState>,
        ) -> wasmtime::Result<Result<R, w::PluginError>>
        + Send,
>;

/// A job for a worker; returns `false` when the instance must be discarded.
type Job = Box<dyn FnOnce(&mut Instance) -> bool + Send>;

/// How long past its time cap a call may stay blocked in a host call (where epoch
/// interruption cannot reach it) before the host abandons its worker thread.
const BLOCKED_GRACE: Duration = Duration::from_secs(1);

/// A thread that owns one instance and runs calls on it. A call blocked inside a WASI host
/// call (e.g. a long sleep) cannot be interrupted; the host stops waiting for it after the
/// time cap plus [`BLOCKED_GRACE`] and drops the worker, whose thread ends when the call does.
struct Worker {
    jobs: mpsc::Sender<Job>,
}

/// What it takes to create an instance (cloned into each worker thread).
#[derive(Clone)]
struct Factory {
    pre: v0_1_0::PluginPre<WasmState>,
    limits: WasmLimits,
    log: GuestLog,
    params: Option<String>,
    /// Worker threads of this plugin alive now (see [`MAX_LIVE_WORKERS`]).
    live: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a worker thread as alive until it ends.
struct LiveGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Factory {
    /// A fresh sandboxed instance; with `dataset_root`, that directory is preopened read-only
    /// at [`GUEST_DATASET_ROOT`]. Re-applies the stored `configure` parameters.
    fn instantiate(&self, dataset_root: Option<&Path>) -> Result<Instance, String> {
        let mut b = WasiCtxBuilder::new();
        b.stdout(GuestStream {
            log: self.log.clone(),
            stderr: false,
        })
        .stderr(GuestStream {
            log: self.log.clone(),
            stderr: true,
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
        if let Some(root) = dataset_root {
            b.preopened_dir(root, GUEST_DATASET_ROOT, FsPerms::ReadOnly)
                .map_err(|e| {
                    format!(
                        "cannot open the dataset root {} for the plugin: {e}",
                        root.display()
                    )
                })?;
        }
        let state = WasmState {
            wasi: b.build(),
            table: ResourceTable::new(),
            limiter: MemoryCap::new(self.limits.max_memory_bytes),
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(&self.limits));
        self.log.begin_call();
        let bindings = self.pre.instantiate(&mut store);
        self.log.flush();
        let bindings = bindings.map_err(|e| {
            format!(
                "instantiation {}",
                describe_trap(&self.limits, &self.log, &store, e)
            )
        })?;
        let mut instance = Instance { store, bindings };
        if let Some(params) = &self.params {
            match run(&self.limits, &self.log, &mut instance, |b, s| {
                b.cogvx_plugin_guest().call_configure(s, params)
            }) {
                Ok(()) => {}
                Err(Failure::Guest(e)) => {
                    return Err(format!("re-applying `configure` failed: {e}"))
                }
                Err(Failure::Trap(m) | Failure::Abandoned(m)) => {
                    return Err(format!("re-applying `configure` failed: {m}"))
                }
            }
        }
        Ok(instance)
    }

    /// Starts a worker thread owning a fresh instance.
    fn spawn(&self, dataset_root: Option<PathBuf>) -> Result<Worker, String> {
        use std::sync::atomic::Ordering;
        let live = self.live.load(Ordering::SeqCst);
        if live >= MAX_LIVE_WORKERS {
            return Err(format!(
                "{live} earlier calls are still blocked in host calls past their time cap, each holding its instance's memory; \
                 no new instance until one of them ends"
            ));
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        let guard = LiveGuard(self.live.clone());
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let factory = self.clone();
        let (dispatch, span) = (
            tracing::dispatcher::get_default(Clone::clone),
            tracing::Span::current(),
        );
        std::thread::Builder::new()
            .name("cogvx-wasm-plugin".into())
            .spawn(move || {
                let _alive = guard;
                let instance = tracing::dispatcher::with_default(&dispatch, || {
                    span.in_scope(|| factory.instantiate(dataset_root.as_deref()))
                });
                drop((dispatch, span));
                let mut instance = match instance {
                    Ok(instance) => {
                        let _ = ready_tx.send(Ok(()));
                        instance
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    if !job(&mut instance) {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread for the instance: {e}"))?;
        match ready_rx.recv_timeout(self.limits.call_timeout + BLOCKED_GRACE) {
            Ok(Ok(())) => Ok(Worker { jobs }),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "instantiation timed out: it ran longer than the time cap of {:?}",
                self.limits.call_timeout
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the instance's thread ended unexpectedly".into())
            }
        }
    }
}

impl Worker {
    /// Runs one call on the worker's instance and waits for it (at most the time cap plus
    /// [`BLOCKED_GRACE`]).
    fn exec<R: Send + 'static>(
        &self,
        limits: &WasmLimits,
        log: &GuestLog,
        f: GuestCall<R>,
    ) -> Result<R, Failure> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (job_limits, job_log) = (limits.clone(), log.clone());
        // The guest's output is logged with the caller's subscriber and inside its span.
        let (dispatch, span) = (
            tracing::dispatcher::get_default(Clone::clone),
            tracing::Span::current(),
        );
        let job: Job = Box::new(move |instance| {
            let result = tracing::dispatcher::with_default(&dispatch, || {
                span.in_scope(|| run(&job_limits, &job_log, instance, f))
            });
            let keep = !matches!(result, Err(Failure::Trap(_)));
            let _ = tx.send(result);
            keep
        });
        if self.jobs.send(job).is_err() {
            return Err(Failure::Trap(
                "the instance's thread ended unexpectedly".into(),
            ));
        }
        match rx.recv_timeout(limits.call_timeout + BLOCKED_GRACE) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::Abandoned(format!(
                "timed out: the call ran longer than its time cap of {:?} (blocked in a host call, e.g. a sleep) \
                 and was abandoned",
                limits.call_timeout
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Failure::Trap("the instance's thread ended unexpectedly".into()))
            }
        }
    }
}

/// A WASM plugin: how to make instances, and the worker owning the current instance (absent
/// after a trap until the next call).
pub(crate) struct WasmPlugin {
    factory: Factory,
    worker: Option<Worker>,
    info: Option<PluginInfo>,
    /// Calls that timed out so far, abandoned or interrupted (see [`MAX_ABANDONMENTS`]).
    abandoned: u32,
}

impl WasmPlugin {
    /// Compiles (or reuses) the component, instantiates it and asks for its info.
    pub(crate) fn load(
        path: &Path,
        limits: &WasmLimits,
    ) -> Result<(Self, PluginInfo, String), LoadError> {
        let (pre, api_version) = compile(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut plugin = WasmPlugin {
            factory: Factory {
                pre,
                limits: limits.clone(),
                log: GuestLog::new(&name),
                params: None,
                live: Default::default(),
            },
            worker: None,
            info: None,
            abandoned: 0,
        };
        let start = |reason: String| LoadError::Start {
            path: path.to_path_buf(),
            reason,
        };
        let info = plugin
            .call(
                "info",
                Box::new(|b, s| b.cogvx_plugin_guest().call_info(s).map(Ok)),
            )
            .map_err(|e| start(format!("`info` failed: {e}")))?;
        let info: PluginInfo = info.into();
        if info.name.trim().is_empty() {
            return Err(start("the plugin's name is empty".into()));
        }
        plugin.factory.log.set_plugin(&info.name);
        plugin.info = Some(info.clone());
        Ok((plugin, info, api_version))
    }

    /// Runs one call on the current instance, recreating it first if a trap discarded it.
    fn call<R: Send + 'static>(&mut self, what: &str, f: GuestCall<R>) -> PluginResult<R> {
        if self.abandoned >= MAX_ABANDONMENTS {
            return Err(PluginError::Failed(format!(
                "disabled: {} of its calls ran past their time cap of {:?}; it is not called again in this run",
                self.abandoned, self.factory.limits.call_timeout
            )));
        }
        if self.worker.is_none() {
            let worker = self.factory.spawn(None).map_err(|e| {
                PluginError::Failed(format!(
                    "could not (re)create the instance for `{what}`: {e}"
                ))
            })?;
            self.worker = Some(worker);
        }
        let worker = self.worker.as_ref().expect("just created");
        match worker.exec(&self.factory.limits, &self.factory.log, f) {
            Ok(v) => Ok(v),
            Err(Failure::Guest(e)) => Err(e),
            Err(Failure::Trap(m)) => {
                self.worker = None;
                // A plugin that runs past its cap on every call costs the whole cap each time:
                // after a few timeouts it is not called again.
                if m.starts_with("timed out") {
                    self.abandoned += 1;
                    if self.abandoned >= MAX_ABANDONMENTS {
                        return Err(PluginError::Failed(format!(
                            "{m} (after {} timed-out calls the plugin is disabled for this run)",
                            self.abandoned
                        )));
                    }
                }
                Err(PluginError::Failed(format!(
                    "{m} (the instance was discarded; the next call gets a fresh one, re-configured)"
                )))
            }
            Err(Failure::Abandoned(m)) => {
                self.worker = None;
                self.abandoned += 1;
                let next = if self.abandoned >= MAX_ABANDONMENTS {
                    format!(
                        "after {} abandoned calls the plugin is disabled for this run",
                        self.abandoned
                    )
                } else {
                    "the next call gets a fresh instance, re-configured".to_string()
                };
                Err(PluginError::Failed(format!("{m} ({next})")))
            }
        }
    }
}

fn run<R>(
    limits: &WasmLimits,
    log: &GuestLog,
    instance: &mut Instance,
    f: impl FnOnce(
        &v0_1_0::Plugin,
        &mut Store<WasmState>,
    ) -> wasmtime::Result<Result<R, w::PluginError>>,
) -> Result<R, Failure> {
    instance.store.set_epoch_deadline(deadline_ticks(limits));
    instance.store.data_mut().limiter.refused = None;
    log.begin_call();
    let result = f(&instance.bindings, &mut instance.store);
    log.flush();
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Guest(e.into())),
        Err(e) => Err(Failure::Trap(describe_trap(
            limits,
            log,
            &instance.store,
            e,
        ))),
    }
}

/// Turns a trap into a sentence: out of memory, timeout, panic (with its message) or trap.
fn describe_trap(
    limits: &WasmLimits,
    log: &GuestLog,
    store: &Store<WasmState>,
    e: wasmtime::Error,
) -> String {
    let tail = log.stderr_tail();
    let mut msg = if let Some(wanted) = store.data().limiter.refused {
        format!(
            "ran out of memory: it tried to grow its memory to {}, past its cap of {} \
             (raise the WASM memory limit if the plugin really needs that much)",
            mib(wanted),
            mib(limits.max_memory_bytes)
        )
    } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        format!(
            "timed out: the call ran longer than its time cap of {:?} and was interrupted",
            limits.call_timeout
        )
    } else if tail.as_deref().is_some_and(|t| t.contains("panicked")) {
        "panicked".to_string()
    } else if let Some(trap) = e.downcast_ref::<Trap>() {
        format!("trapped: {trap}")
    } else {
        format!("failed: {}", e.root_cause())
    };
    if let Some(tail) = tail {
        msg.push_str(&format!(" (plugin stderr: {tail})"));
    }
    msg
}

/// Replaces the guest's dataset root by the host's in a path or message.
fn to_host_text(text: &str, root: &Path) -> String {
    text.replace(GUEST_DATASET_ROOT, &root.display().to_string())
}

/// Makes a path the guest returned relative to the dataset root.
fn to_relative(path: String) -> String {
    match path.strip_prefix(GUEST_DATASET_ROOT) {
        Some("") => ".".into(),
        Some(rest) if rest.starts_with('/') => rest.trim_start_matches('/').to_string(),
        _ => path,
    }
}

impl Plugin for WasmPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone().expect("set by `load`")
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        let params = params_json.to_string();
        self.call(
            "configure",
            Box::new(move |b, s| b.cogvx_plugin_guest().call_configure(s, &params)),
        )?;
        self.factory.params = Some(params_json.to_string());
        Ok(())
    }

    fn list_samples(&mut self, root: &str) -> PluginResult<Vec<Sample>> {
        let host_root = Path::new(root);
        if !host_root.is_dir() {
            return Err(PluginError::Invalid(format!(
                "the dataset root {root} is not a directory"
            )));
        }
        // A separate instance that sees the dataset root (and nothing else), read-only.
        let worker = self
            .factory
            .spawn(Some(host_root.to_path_buf()))
            .map_err(|e| {
                PluginError::Failed(to_host_text(
                    &format!("could not create the dataset-reader instance: {e}"),
                    host_root,
                ))
            })?;
        let result = worker.exec(
            &self.factory.limits,
            &self.factory.log,
            Box::new(|b, s| {
                b.cogvx_plugin_guest()
                    .call_list_samples(s, GUEST_DATASET_ROOT)
            }),
        );
        drop(worker);
        match result {
            Ok(samples) => Ok(samples
                .into_iter()
                .map(|s| Sample {
                    caption: s.caption,
                    video: to_relative(s.video),
                    image: s.image.map(to_relative),
                    frames: s.frames.map(|r| FrameRange {
                        start: r.start,
                        end: r.end,
                    }),
                    origin: to_host_text(&s.origin, host_root),
                })
                .collect()),
            Err(Failure::Guest(e)) => Err(match e {
                PluginError::Unsupported(m) => {
                    PluginError::Unsupported(to_host_text(&m, host_root))
                }
                PluginError::Invalid(m) => PluginError::Invalid(to_host_text(&m, host_root)),
                PluginError::Failed(m) => PluginError::Failed(to_host_text(&m, host_root)),
            }),
            Err(Failure::Trap(m)) => Err(PluginError::Failed(to_host_text(&m, host_root))),
            Err(Failure::Abandoned(m)) => {
                self.abandoned += 1;
                Err(PluginError::Failed(to_host_text(&m, host_root)))
            }
        }
    }

    fn plan_transform(&mut self, request: &TransformRequest) -> PluginResult<TransformPlan> {
        let request: w::TransformRequest = request.clone().into();
        self.call(
            "plan-transform",
            Box::new(move |b, s| b.cogvx_plugin_guest().call_plan_transform(s, &request)),
        )
        .map(Into::into)
    }

    fn transform_frames(&mut self, frames: Frames) -> PluginResult<Frames> {
        // The frames cross into the guest and back: wasmtime's default allowance for data
        // copied in one call (128 MiB) is below CogVideoX1.5's 81x768x1360 (254 MB each way).
        let fuel = (frames.rgb.len().saturating_mul(2))
            .max(HOSTCALL_FUEL_MIN)
            .saturating_add(HOSTCALL_FUEL_MIN);
        let frames: w::Frames = frames.into();
        self.call(
            "transform-frames",
            Box::new(move |b, s| {
                s.set_hostcall_fuel(fuel);
                let r = b
                    .cogvx_plugin_guest()
                    .call_transform_frames(&mut *s, &frames);
                s.set_hostcall_fuel(HOSTCALL_FUEL_MIN);
                r
            }),
        )
        .map(Into::into)
    }

    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        let caption = caption.to_string();
        self.call(
            "rewrite-prompt",
            Box::new(move |b, s| b.cogvx_plugin_guest().call_rewrite_prompt(s, &caption)),
        )
    }

    fn adapter_recipe(&mut self, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
        let json = serde_json::to_string(request)
            .map_err(|e| PluginError::Failed(format!("cannot encode the request: {e}")))?;
        let out = self.call(
            "adapter-recipe",
            Box::new(move |b, s| b.cogvx_plugin_guest().call_adapter_recipe(s, &json)),
        )?;
        serde_json::from_str(&out).map_err(|e| {
            PluginError::Failed(format!(
                "the plugin returned an invalid AdapterRecipe JSON: {e}"
            ))
        })
    }

    fn scheduler_tables(&mut self, config_json: &str) -> PluginResult<SchedulerTables> {
        let config = config_json.to_string();
        self.call(
            "scheduler-tables",
            Box::new(move |b, s| b.cogvx_plugin_guest().call_scheduler_tables(s, &config)),
        )
        .map(Into::into)
    }

    fn scheduler_plan(&mut self, request: &SchedulerPlanRequest) -> PluginResult<InferencePlan> {
        let request = w::SchedulerPlanRequest {
            config_json: request.config_json.clone(),
            num_inference_steps: request.num_inference_steps,
        };
        self.call(
            "scheduler-plan",
            Box::new(move |b, s| b.cogvx_plugin_guest().call_scheduler_plan(s, &request)),
        )
        .map(Into::into)
    }

    fn validate(&mut self, request: &ValidateRequest) -> PluginResult<Vec<Metric>> {
        let request = w::ValidateRequest {
            prompt: request.prompt.clone(),
            frames: request.frames.clone().into(),
            fps: request.fps,
        };
        self.call(
            "validate",
            Box::new(move |b, s| b.cogvx_plugin_guest().call_validate(s, &request)),
        )
        .map(|v| {
            v.into_iter()
                .map(|m| Metric {
                    name: m.name,
                    value: m.value,
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap holds for all memories together: 8 memories of 100 MiB under a 512 MiB cap get
    /// 5, and a refused growth leaves the total unchanged.
    #[test]
    fn the_memory_cap_counts_every_memory_of_the_instance() {
        let mib = 1usize << 20;
        let mut cap = MemoryCap::new(512 * mib);
        let granted = (0..8).filter(|_| cap.grow(0, 100 * mib)).count();
        assert_eq!(granted, 5);
        assert_eq!(cap.used, 500 * mib);
        assert!(cap.refused.is_some());
        // Growing one of them by 12 MiB fits exactly; one more byte does not.
        assert!(cap.grow(100 * mib, 112 * mib));
        assert!(!cap.grow(0, 1));
        assert_eq!(cap.used, 512 * mib);
    }

    #[test]
    fn guest_paths_become_relative() {
        assert_eq!(to_relative("/dataset/videos/a.mp4".into()), "videos/a.mp4");
        assert_eq!(to_relative("/dataset".into()), ".");
        assert_eq!(to_relative("videos/a.mp4".into()), "videos/a.mp4");
        assert_eq!(to_relative("/datasetx/a".into()), "/datasetx/a");
        assert_eq!(
            to_host_text("/dataset/prompts.txt:3", Path::new("/data/mini")),
            "/data/mini/prompts.txt:3"
        );
    }

    #[test]
    fn ticks_round_up() {
        let l = WasmLimits {
            call_timeout: Duration::from_millis(12),
            ..Default::default()
        };
        assert_eq!(deadline_ticks(&l), 3);
        let l = WasmLimits {
            call_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(deadline_ticks(&l), 1);
    }
}
