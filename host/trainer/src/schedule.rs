//! Learning-rate schedules exactly as diffusers' `get_scheduler` builds them
//! (`diffusers/optimization.py`), as pure functions of the step.
//!
//! diffusers returns a `torch.optim.lr_scheduler.LambdaLR`: the optimizer update number `k`
//! (0-based: the first update is `k = 0`) runs at `base_lr * lr_lambda(k)`, and
//! `lr_scheduler.step()` after each update advances `k`. [`lr_at`] is that learning rate, so a
//! resumed run needs only the number of updates done so far.

use serde::{Deserialize, Serialize};

/// The schedule names of diffusers' `SchedulerType` that the trainer supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// `get_constant_schedule`: always 1.
    Constant,
    /// `get_constant_schedule_with_warmup`: linear warmup from 0, then 1 (the finetune's default).
    #[default]
    ConstantWithWarmup,
    /// `get_linear_schedule_with_warmup`: warmup, then linear decay to 0 at the last step.
    Linear,
    /// `get_cosine_schedule_with_warmup` with diffusers' `num_cycles = 0.5` (`get_scheduler` does
    /// not pass `num_cycles` to it): warmup, then a half cosine to 0.
    Cosine,
    /// `get_cosine_with_hard_restarts_schedule_with_warmup(num_cycles)`.
    CosineWithRestarts,
}

impl LrScheduler {
    /// The diffusers name.
    pub fn as_str(&self) -> &'static str {
        match self {
            LrScheduler::Constant => "constant",
            LrScheduler::ConstantWithWarmup => "constant_with_warmup",
            LrScheduler::Linear => "linear",
            LrScheduler::Cosine => "cosine",
            LrScheduler::CosineWithRestarts => "cosine_with_restarts",
        }
    }
}

/// The arguments diffusers' `get_scheduler` receives from the finetune.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: LrScheduler,
    pub num_warmup_steps: u64,
    pub num_training_steps: u64,
    /// Only used by `cosine_with_restarts`.
    pub num_cycles: u64,
}

impl LrSchedule {
    /// The multiplier `lr_lambda(step)` of the base learning rate.
    pub fn lambda(&self, step: u64) -> f64 {
        let current = step as f64;
        let warmup = self.num_warmup_steps;
        let warm = || current / (warmup as f64).max(1.0);
        let progress = || {
            (current - warmup as f64) / ((self.num_training_steps as f64 - warmup as f64).max(1.0))
        };
        match self.kind {
            LrScheduler::Constant => 1.0,
            LrScheduler::ConstantWithWarmup => {
                if step < warmup {
                    warm()
                } else {
                    1.0
                }
            }
            LrScheduler::Linear => {
                if step < warmup {
                    return warm();
                }
                let p = (self.num_training_steps as f64 - current)
                    / ((self.num_training_steps as f64 - warmup as f64).max(1.0));
                p.max(0.0)
            }
            LrScheduler::Cosine => {
                if step < warmup {
                    return warm();
                }
                let num_cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress()).cos()))
                    .max(0.0)
            }
            LrScheduler::CosineWithRestarts => {
                if step < warmup {
                    return warm();
                }
                let p = progress();
                if p >= 1.0 {
                    return 0.0;
                }
                (0.5 * (1.0 + (std::f64::consts::PI * ((self.num_cycles as f64 * p) % 1.0)).cos()))
                    .max(0.0)
            }
        }
    }

    /// The learning rate of optimizer update `step` (0-based).
    pub fn lr_at(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.lambda(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: LrScheduler, warmup: u64, total: u64, cycles: u64) -> LrSchedule {
        LrSchedule {
            kind,
            num_warmup_steps: warmup,
            num_training_steps: total,
            num_cycles: cycles,
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn constant_and_warmup() {
        let c = s(LrScheduler::Constant, 100, 1000, 1);
        close(c.lambda(0), 1.0);
        close(c.lambda(5000), 1.0);
        let w = s(LrScheduler::ConstantWithWarmup, 100, 1000, 1);
        close(w.lambda(0), 0.0); // the first update runs at lr 0, as in diffusers
        close(w.lambda(1), 0.01);
        close(w.lambda(50), 0.5);
        close(w.lambda(99), 0.99);
        close(w.lambda(100), 1.0);
        close(w.lambda(5000), 1.0);
        // max(1.0, num_warmup_steps): no warmup means lr from the first step.
        close(s(LrScheduler::ConstantWithWarmup, 0, 10, 1).lambda(0), 1.0);
        close(w.lr_at(2e-5, 50), 1e-5);
    }

    #[test]
    fn linear() {
        let l = s(LrScheduler::Linear, 10, 110, 1);
        close(l.lambda(5), 0.5);
        // (110 - 10) / (110 - 10) = 1 at the end of warmup
        close(l.lambda(10), 1.0);
        // (110 - 35) / 100 = 0.75
        close(l.lambda(35), 0.75);
        close(l.lambda(110), 0.0);
        close(l.lambda(200), 0.0);
    }

    #[test]
    fn cosine_is_a_half_cosine() {
        let c = s(LrScheduler::Cosine, 10, 110, 7); // num_cycles is not passed by get_scheduler
        close(c.lambda(3), 0.3);
        close(c.lambda(10), 1.0);
        // progress 0.5: 0.5 * (1 + cos(pi * 0.5 * 2 * 0.5)) = 0.5 * (1 + cos(pi/2)) = 0.5
        close(c.lambda(60), 0.5);
        // progress 0.25: 0.5 * (1 + cos(pi/4))
        close(
            c.lambda(35),
            0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()),
        );
        close(c.lambda(110), 0.0);
        // Past the end the cosine rises again in diffusers (progress > 1), clamped at 0 only below.
        close(
            c.lambda(160),
            0.5 * (1.0 + (std::f64::consts::PI * 1.5).cos()),
        );
    }

    #[test]
    fn cosine_with_restarts() {
        let c = s(LrScheduler::CosineWithRestarts, 0, 100, 2);
        close(c.lambda(0), 1.0);
        // progress 0.25, 2 cycles: (2 * 0.25) % 1 = 0.5 -> 0.5 * (1 + cos(pi/2)) = 0.5
        close(c.lambda(25), 0.5);
        // progress 0.5: (1.0) % 1 = 0 -> restart at 1.0
        close(c.lambda(50), 1.0);
        // progress 0.6: 1.2 % 1 = 0.2 -> 0.5 * (1 + cos(0.2 pi))
        close(
            c.lambda(60),
            0.5 * (1.0 + (0.2 * std::f64::consts::PI).cos()),
        );
        close(c.lambda(100), 0.0);
        close(c.lambda(150), 0.0);
        let w = s(LrScheduler::CosineWithRestarts, 4, 104, 1);
        close(w.lambda(2), 0.5);
        close(w.lambda(54), 0.5);
    }

    #[test]
    fn names_are_diffusers() {
        for k in [
            LrScheduler::Constant,
            LrScheduler::ConstantWithWarmup,
            LrScheduler::Linear,
            LrScheduler::Cosine,
            LrScheduler::CosineWithRestarts,
        ] {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
    }
}
