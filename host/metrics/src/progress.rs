//! The training progress bar.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const TEMPLATE: &str = "{spinner:.green} step {pos}/{len} [{wide_bar:.cyan/blue}] {elapsed_precise} ETA {eta_precise} {msg}";

/// A progress bar on stderr for a training run: step/total, elapsed time, ETA, loss and
/// learning rate. It is hidden when `enabled` is false or stderr is not a terminal (logs, CI);
/// then [`TrainProgress::println`] still prints to stderr.
#[derive(Debug)]
pub struct TrainProgress {
    bar: ProgressBar,
}

impl TrainProgress {
    /// A bar for a run of `total_steps` optimizer steps starting after `start_step` (0 for a
    /// fresh run, the checkpoint's step when resuming; the ETA counts only the steps run now).
    pub fn new(total_steps: u64, start_step: u64, enabled: bool) -> Self {
        let bar = if enabled && std::io::stderr().is_terminal() {
            ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template(TEMPLATE)
            .expect("the template is valid")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_length(total_steps);
        bar.set_position(start_step.min(total_steps));
        // The steps done before a resume took no time in this process.
        bar.reset_eta();
        crate::console::track(&bar);
        TrainProgress { bar }
    }

    /// Whether the bar is hidden (disabled or stderr is not a terminal).
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// The step the bar shows.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// Moves the bar to `step` (the last completed optimizer step) and shows its loss and lr.
    pub fn update(&self, step: u64, loss: f64, lr: f64) {
        self.bar.set_position(step);
        self.bar.set_message(format!("loss {loss:.4} lr {lr:.3e}"));
    }

    /// Prints a line above the bar (or to stderr when the bar is hidden).
    pub fn println(&self, msg: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", msg.as_ref());
        } else {
            self.bar.println(msg);
        }
    }

    /// Stops the bar and clears it (the caller reports the outcome; a finished bar would leave
    /// the cursor at the end of its line).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_bar_is_hidden_and_tracks_the_step() {
        let p = TrainProgress::new(100, 40, false);
        assert!(p.is_hidden());
        assert_eq!(p.position(), 40);
        p.update(41, 0.125, 2e-5);
        assert_eq!(p.position(), 41);
        p.println("validation at step 41");
        p.finish();
        // A start past the end is clamped.
        assert_eq!(TrainProgress::new(10, 20, false).position(), 10);
    }

    #[test]
    fn the_template_parses() {
        ProgressStyle::with_template(TEMPLATE).unwrap();
    }
}
