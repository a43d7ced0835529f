//! What a guest prints: complete lines of stdout and stderr go to `tracing` (target
//! `cogvx::plugin`), escaped and bounded per call; the stderr of the current call is kept
//! (bounded) so that a trap's error can quote the panic message.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Guest stdout/stderr: complete lines go to `tracing`; the stderr of the current call is
/// kept (bounded) so a trap's error can quote the panic message.
#[derive(Clone)]
pub(super) struct GuestLog(Arc<Mutex<LogInner>>);

struct LogInner {
    plugin: String,
    partial: [Vec<u8>; 2],
    stderr_tail: String,
    /// Bytes logged in the current call.
    logged: usize,
    /// Bytes of the current call's output not logged.
    dropped: usize,
}

const TAIL_CHARS: usize = 2000;
/// Output of one call that reaches the log.
const MAX_CALL_LOG: usize = 64 * 1024;
const MAX_LINE: usize = 16 * 1024;

impl GuestLog {
    pub(super) fn new(plugin: &str) -> Self {
        GuestLog(Arc::new(Mutex::new(LogInner {
            plugin: plugin.to_string(),
            partial: [Vec::new(), Vec::new()],
            stderr_tail: String::new(),
            logged: 0,
            dropped: 0,
        })))
    }

    pub(super) fn set_plugin(&self, plugin: &str) {
        self.0.lock().expect("log poisoned").plugin = plugin.to_string();
    }

    fn write(&self, stderr: bool, bytes: &[u8]) {
        let mut inner = self.0.lock().expect("log poisoned");
        let i = stderr as usize;
        inner.partial[i].extend_from_slice(bytes);
        while let Some(pos) = inner.partial[i].iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = inner.partial[i].drain(..=pos).collect();
            inner.emit(stderr, &line[..line.len() - 1]);
        }
        if inner.partial[i].len() > MAX_LINE {
            let line = std::mem::take(&mut inner.partial[i]);
            inner.emit(stderr, &line);
        }
    }

    /// Starts a call: forgets the previous call's stderr and output budget.
    pub(super) fn begin_call(&self) {
        let mut inner = self.0.lock().expect("log poisoned");
        inner.stderr_tail.clear();
        inner.logged = 0;
        inner.dropped = 0;
    }

    /// Ends a call: emits unterminated lines, and says how much output was left out.
    pub(super) fn flush(&self) {
        let mut inner = self.0.lock().expect("log poisoned");
        for i in 0..2 {
            if !inner.partial[i].is_empty() {
                let line = std::mem::take(&mut inner.partial[i]);
                inner.emit(i == 1, &line);
            }
        }
        if inner.dropped > 0 {
            tracing::warn!(
                target: "cogvx::plugin",
                plugin = %inner.plugin,
                "{} more bytes of output in this call were not logged (at most {} KiB per call)",
                inner.dropped,
                MAX_CALL_LOG / 1024
            );
            inner.dropped = 0;
        }
    }

    /// The stderr of the current call, joined on one line, without Rust's backtrace hint.
    pub(super) fn stderr_tail(&self) -> Option<String> {
        let inner = self.0.lock().expect("log poisoned");
        let text = inner
            .stderr_tail
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ");
        (!text.is_empty()).then_some(text)
    }
}

impl LogInner {
    fn emit(&mut self, stderr: bool, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let stream = if stderr { "stderr" } else { "stdout" };
        // At most MAX_CALL_LOG bytes of output per call reach the log (a plugin wrote 1 GB in
        // a minute), without control characters; the rest is counted.
        if self.logged < MAX_CALL_LOG {
            self.logged += line.len();
            let shown = cogvx_plugin_api::text::display_safe(&line, MAX_LINE);
            tracing::info!(target: "cogvx::plugin", plugin = %self.plugin, stream, "{shown}");
        } else {
            self.dropped += line.len() + 1;
        }
        if stderr {
            self.stderr_tail.push_str(&line);
            self.stderr_tail.push('\n');
            if self.stderr_tail.len() > TAIL_CHARS {
                let mut cut = self.stderr_tail.len() - TAIL_CHARS;
                while !self.stderr_tail.is_char_boundary(cut) {
                    cut += 1;
                }
                self.stderr_tail.drain(..cut);
            }
        }
    }
}

/// One of the guest's output streams.
#[derive(Clone)]
pub(super) struct GuestStream {
    pub(super) log: GuestLog,
    pub(super) stderr: bool,
}

impl wasmtime_wasi::cli::IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        // Synchronous, so the output of a call is logged before the call returns.
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::Pollable for GuestStream {
    async fn ready(&mut self) {}
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::OutputStream for GuestStream {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.log.write(self.stderr, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.log.write(self.stderr, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
