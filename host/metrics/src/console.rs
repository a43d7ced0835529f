//! Log lines and progress bars on one terminal: bars register here, and a log writer prints
//! through [`suspend`], so a line never lands in the middle of a bar.

use std::sync::Mutex;

use indicatif::{ProgressBar, WeakProgressBar};

static BARS: Mutex<Vec<WeakProgressBar>> = Mutex::new(Vec::new());

/// Registers a visible bar; it is forgotten once dropped.
pub fn track(bar: &ProgressBar) {
    if bar.is_hidden() {
        return;
    }
    let mut bars = BARS.lock().unwrap_or_else(|e| e.into_inner());
    bars.retain(|b| b.upgrade().is_some());
    bars.push(bar.downgrade());
}

/// Runs `f` (e.g. writing a log line to stderr) with every live registered bar cleared from the
/// screen, then redraws them.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let live: Vec<ProgressBar> = {
        let mut bars = BARS.lock().unwrap_or_else(|e| e.into_inner());
        bars.retain(|b| b.upgrade().is_some());
        bars.iter().filter_map(|b| b.upgrade()).collect()
    };
    suspend_all(&live, f)
}

fn suspend_all<R>(bars: &[ProgressBar], f: impl FnOnce() -> R) -> R {
    match bars.split_first() {
        None => f(),
        Some((first, rest)) => first.suspend(|| suspend_all(rest, f)),
    }
}

/// A `std::io::Write` to stderr that suspends the registered bars around each write (for
/// `tracing_subscriber::fmt().with_writer(...)`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SuspendingStderr;

impl std::io::Write for SuspendingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn suspend_runs_the_closure_with_and_without_bars() {
        assert_eq!(suspend(|| 7), 7);
        let hidden = ProgressBar::hidden();
        track(&hidden); // hidden bars are not tracked
        let bars = [ProgressBar::hidden(), ProgressBar::hidden()];
        assert_eq!(suspend_all(&bars, || 8), 8);
        assert!(BARS
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.upgrade().is_none_or(|b| !b.is_hidden())));
        SuspendingStderr.write_all(b"").unwrap();
    }
}
