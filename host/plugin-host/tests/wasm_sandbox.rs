//! WASM transport: misbehaving plugins become errors naming the plugin and the call, the
//! instance is recreated (and re-configured) afterwards, and the sandbox holds.

mod common;

use std::time::{Duration, Instant};

use cogvx_plugin_api::{Plugin, PluginError};
use cogvx_plugin_host::{LoadedPlugin, Transport, WasmLimits};

fn limits() -> WasmLimits {
    WasmLimits {
        max_memory_bytes: 64 << 20,
        call_timeout: Duration::from_millis(500),
    }
}

fn load() -> LoadedPlugin {
    LoadedPlugin::load(common::misbehave_wasm(), &limits()).unwrap()
}

fn prefix() -> String {
    format!(
        "plugin `misbehave` 0.3.1 (wasm, {})",
        common::misbehave_wasm().display()
    )
}

fn failed(e: PluginError) -> String {
    match e {
        PluginError::Failed(m) => m,
        other => panic!("expected a Failed error, got {other:?}"),
    }
}

/// After a failure the same `LoadedPlugin` answers again, with its configuration re-applied.
fn assert_recovered(p: &mut LoadedPlugin) {
    assert_eq!(p.rewrite_prompt("a cat").unwrap(), "[cfg] a cat");
    assert_eq!(
        p.plan_transform(&common::request(0)).unwrap(),
        common::good_plan()
    );
}

#[test]
fn loads_and_answers() {
    let mut p = load();
    assert_eq!(p.name(), "misbehave");
    assert_eq!(p.version(), "0.3.1");
    assert_eq!(p.transport(), Transport::Wasm);
    assert_eq!(p.api_version(), "0.1.0");
    assert_eq!(p.source(), Some(common::misbehave_wasm()));
    assert_eq!(
        p.plan_transform(&common::request(0)).unwrap(),
        common::good_plan()
    );
    assert_eq!(p.rewrite_prompt("x").unwrap(), "x");
    // A call the plugin does not implement.
    let e = p.scheduler_tables("{}").unwrap_err();
    assert_eq!(
        e,
        PluginError::Unsupported(format!(
            "{}: `scheduler-tables`: this plugin does not implement `scheduler-tables`",
            prefix()
        ))
    );
}

#[test]
fn infinite_loop_times_out() {
    let mut p = load();
    p.configure(r#"{"prefix": "[cfg] "}"#).unwrap();
    let start = Instant::now();
    let e = failed(p.plan_transform(&common::request(1)).unwrap_err());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the time cap did not fire: {:?}",
        start.elapsed()
    );
    assert!(
        e.starts_with(&format!(
            "{}: `plan-transform` failed: timed out: the call ran longer than its time cap of 500ms and was interrupted",
            prefix()
        )),
        "{e}"
    );
    assert_recovered(&mut p);
}

#[test]
fn a_call_blocked_in_the_host_is_abandoned() {
    let mut p = load();
    p.configure(r#"{"prefix": "[cfg] "}"#).unwrap();
    let start = Instant::now();
    let e = failed(p.plan_transform(&common::request(8)).unwrap_err());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the call was not abandoned: {:?}",
        start.elapsed()
    );
    assert!(
        e.starts_with(&format!(
            "{}: `plan-transform` failed: timed out: the call ran longer than its time cap of 500ms \
             (blocked in a host call, e.g. a sleep) and was abandoned",
            prefix()
        )),
        "{e}"
    );
    assert_recovered(&mut p);
}

#[test]
fn allocation_past_the_cap_is_out_of_memory() {
    let mut p = load();
    p.configure(r#"{"prefix": "[cfg] "}"#).unwrap();
    let e = failed(p.plan_transform(&common::request(2)).unwrap_err());
    assert!(
        e.starts_with(&format!(
            "{}: `plan-transform` failed: ran out of memory: it tried to grow its memory to ",
            prefix()
        )),
        "{e}"
    );
    assert!(e.contains("past its cap of 64 MiB"), "{e}");
    assert_recovered(&mut p);
}

#[test]
fn trap_is_an_error() {
    let mut p = load();
    p.configure(r#"{"prefix": "[cfg] "}"#).unwrap();
    let e = failed(p.plan_transform(&common::request(3)).unwrap_err());
    assert!(
        e.starts_with(&format!("{}: `plan-transform` failed: trapped: ", prefix())),
        "{e}"
    );
    assert!(e.contains("unreachable"), "{e}");
    assert!(
        e.contains("the instance was discarded; the next call gets a fresh one, re-configured"),
        "{e}"
    );
    assert_recovered(&mut p);
}

#[test]
fn panic_is_an_error_quoting_the_message() {
    let mut p = load();
    p.configure(r#"{"prefix": "[cfg] "}"#).unwrap();
    let e = failed(p.plan_transform(&common::request(4)).unwrap_err());
    assert!(
        e.starts_with(&format!(
            "{}: `plan-transform` failed: panicked (plugin stderr: ",
            prefix()
        )),
        "{e}"
    );
    assert!(e.contains("misbehave: deliberate panic for seed 4"), "{e}");
    assert_recovered(&mut p);
}

#[test]
fn bad_plans_are_rejected_naming_the_plugin() {
    let mut p = load();
    p.configure(r#"{"prefix": "[cfg] "}"#).unwrap();
    let cases = [
        (5, "the crop box 10x10 at (320, 0) lies outside the 320x240 frame (it reaches x=330, y=10)"),
        (6, "frame index 10 (position 1 of 2) is out of range: the clip has 10 frames (valid: 0..10)"),
        (7, "the output size 0x32 has a zero side"),
    ];
    for (seed, why) in cases {
        let e = failed(p.plan_transform(&common::request(seed)).unwrap_err());
        assert_eq!(
            e,
            format!("{}: `plan-transform` returned a bad plan: {why}", prefix())
        );
        assert_recovered(&mut p);
    }
}

#[test]
fn guest_errors_are_wrapped() {
    let mut p = load();
    let e = p.configure("not json").unwrap_err();
    match e {
        PluginError::Invalid(m) => {
            assert!(
                m.starts_with(&format!("{}: `configure`: bad params: ", prefix())),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn dataset_reader_reads_inside_its_grant() {
    let dir = common::dataset();
    let root = dir.path().join("data");
    let mut p = load();
    let samples = p.list_samples(root.to_str().unwrap()).unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].caption, "a cat");
    assert_eq!(samples[0].video, "videos/cat.mp4");
    assert_eq!(samples[1].video, "videos/dog.mp4");
    assert_eq!(
        samples[1].origin,
        format!("{}/videos.txt:2", root.display())
    );

    p.configure(r#"{"probe": "inside.txt"}"#).unwrap();
    let samples = p.list_samples(root.to_str().unwrap()).unwrap();
    assert_eq!(samples[0].caption, "readable inside the grant");
}

#[test]
fn dataset_reader_cannot_read_outside_its_grant() {
    let dir = common::dataset();
    let root = dir.path().join("data");
    let secret = dir.path().join("secret.txt");
    let mut p = load();
    for probe in [
        "/etc/passwd",
        "../secret.txt",
        secret.to_str().unwrap(),
        "/dataset/../secret.txt",
    ] {
        p.configure(&serde_json::json!({ "probe": probe }).to_string())
            .unwrap();
        let e = failed(p.list_samples(root.to_str().unwrap()).unwrap_err());
        assert!(
            e.starts_with(&format!(
                "{}: `list-samples` failed: cannot read ",
                prefix()
            )),
            "{probe}: {e}"
        );
        assert!(
            !e.contains("SECRET") && !e.contains("root:x:0:0"),
            "{probe}: {e}"
        );
    }
    // The grant is read-only.
    p.configure(r#"{"write": "new.txt"}"#).unwrap();
    let e = failed(p.list_samples(root.to_str().unwrap()).unwrap_err());
    assert!(
        e.starts_with(&format!(
            "{}: `list-samples` failed: cannot write {}/new.txt: ",
            prefix(),
            root.display()
        )),
        "{e}"
    );
    assert!(!root.join("new.txt").exists());

    // A root that is not a directory is refused before the plugin runs.
    let missing = dir.path().join("missing");
    let e = p.list_samples(missing.to_str().unwrap()).unwrap_err();
    assert_eq!(
        e,
        PluginError::Invalid(format!(
            "{}: `list-samples`: the dataset root {} is not a directory",
            prefix(),
            missing.display()
        ))
    );
}

#[test]
fn files_that_are_not_components_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("x.wasm");
    std::fs::write(&text, "hello").unwrap();
    let e = LoadedPlugin::load(&text, &limits())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "{} is not a cogvx plugin: not a WASM file (no `\\0asm` header)",
            text.display()
        )
    );

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let e = LoadedPlugin::load(&core, &limits())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "{} is not a cogvx plugin: a core WASM module, not a component; build the plugin with `cargo build --target wasm32-wasip2`",
            core.display()
        )
    );

    let missing = dir.path().join("missing.wasm");
    let e = LoadedPlugin::load(&missing, &limits())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("cannot load plugin {}: ", missing.display())),
        "{e}"
    );
}

/// Collects formatted tracing output.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn guest_stderr_goes_to_the_log() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let mut p = load();
        p.plan_transform(&common::request(4)).unwrap_err();
    });
    let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("misbehave: deliberate panic for seed 4"))
        .unwrap_or_else(|| panic!("the guest's panic message is not in the log:\n{log}"));
    assert!(line.contains("cogvx::plugin"), "{line}");
    assert!(line.contains("plugin=misbehave"), "{line}");
    assert!(line.contains("stream=\"stderr\""), "{line}");
}

#[test]
fn a_component_of_another_api_version_is_refused() {
    let path = common::old_wit_wasm();
    let e = LoadedPlugin::load(path, &limits()).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{} was built for cogvx plugin API 0.0.7, but this host supports API 0.1.0; \
             rebuild the plugin against cogvx-plugin-api 0.1.0",
            path.display()
        )
    );
}

/// A plugin's error message and its output are bounded and escaped: a 10 MB message with
/// escape sequences (it was printed per sample, and could clear the screen) and a 10 MB stderr
/// flood in one call (1 GB of log in a minute).
#[test]
fn plugin_messages_and_output_are_bounded_and_escaped() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let mut p = load();
        let e = p
            .plan_transform(&common::request(9))
            .unwrap_err()
            .to_string();
        assert!(
            e.len() < 4096
                && !e.contains('\u{1b}')
                && e.contains("\\u{1b}[2J")
                && e.contains("more bytes)"),
            "{}",
            &e[..e.len().min(300)]
        );
        assert!(p.plan_transform(&common::request(10)).is_ok());
    });
    let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(log.len() < 200 * 1024, "{} bytes of log", log.len());
    assert!(!log.contains('\u{1b}'), "raw ESC in the log");
    assert!(
        log.contains("flood \\u{1b}[31m")
            && log.contains("bytes of output in this call were not logged"),
        "{}",
        &log[log.len().saturating_sub(500)..]
    );
}

/// A plugin whose calls block in host calls (it sleeps) is abandoned at most a few times: the
/// abandoned instances are bounded (each holds its memory until its call ends), and after
/// three the plugin is disabled, answering at once (a plugin that allocated 400 MiB and slept
/// took the host past 8 GB in a minute).
#[test]
fn repeated_abandonments_disable_the_plugin() {
    let mut p = load();
    for i in 1..=3 {
        let e = failed(p.plan_transform(&common::request(8)).unwrap_err());
        assert!(e.contains("was abandoned"), "call {i}: {e}");
        if i == 3 {
            assert!(
                e.contains("after 3 abandoned calls the plugin is disabled"),
                "{e}"
            );
        }
    }
    let start = Instant::now();
    let e = failed(p.plan_transform(&common::request(0)).unwrap_err());
    assert!(
        e.contains("disabled: 3 of its calls ran past their time cap"),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "the disabled plugin was called: {:?}",
        start.elapsed()
    );
}

/// A pixel transform at CogVideoX1.5's resolution (81x768x1360: 254 MB of frames each way)
/// goes through the sandbox; it failed past wasmtime's default hostcall allowance ("too much
/// data is being copied").
#[test]
fn real_size_frames_cross_the_sandbox() {
    let limits = cogvx_plugin_host::WasmLimits {
        max_memory_bytes: 1200 << 20,
        call_timeout: Duration::from_secs(120),
    };
    let mut p = LoadedPlugin::load(common::misbehave_wasm(), &limits).unwrap();
    let (count, height, width) = (81u32, 768u32, 1360u32);
    let n = (count * height * width * 3) as usize;
    let rgb: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let out = p
        .transform_frames(cogvx_plugin_api::Frames {
            width,
            height,
            count,
            rgb,
        })
        .unwrap();
    assert_eq!(
        (out.count, out.height, out.width, out.rgb.len()),
        (count, height, width, n)
    );
    assert!(out
        .rgb
        .iter()
        .enumerate()
        .step_by(9973)
        .all(|(i, &v)| v == 255 - (i % 251) as u8));
}

/// A guest that loops past its cap on every call costs the whole cap each time: after three
/// timeouts it is disabled and answers at once.
#[test]
fn repeated_timeouts_disable_the_plugin() {
    let mut p = load();
    for i in 1..=3 {
        let e = failed(p.plan_transform(&common::request(1)).unwrap_err());
        assert!(
            e.contains("timed out") && !e.contains("abandoned"),
            "call {i}: {e}"
        );
    }
    let start = Instant::now();
    let e = failed(p.plan_transform(&common::request(0)).unwrap_err());
    assert!(
        e.contains("disabled: 3 of its calls ran past their time cap"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_millis(100));
}
