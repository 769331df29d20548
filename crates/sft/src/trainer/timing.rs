//! What the benchmarks time: the trainer's own steps ([`super::Trainer::train`] with a
//! [`StepTimer`] observer) on synthetic rows of a fixed length ([`synthetic_rows`]), so a
//! benchmark runs exactly the code a fine-tune runs.

use std::time::Instant;

use super::run::{TrainObserver, TrainOutcome};
use crate::collate::Example;
use crate::error::Result;

/// `count` rows of `len` token ids below `vocab` (a seeded xorshift stream), every position
/// trained (labels = ids), as a pre-tokenized dataset would give them.
pub fn synthetic_rows(count: usize, len: usize, vocab: usize, seed: u64) -> Vec<Example> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let input_ids: Vec<u32> = (0..len)
                .map(|_| (next() % vocab.max(1) as u64) as u32)
                .collect();
            let labels = input_ids.iter().map(|&t| t as i64).collect();
            Example { input_ids, labels }
        })
        .collect()
}

/// The median of `v` (the mean of the two middle values for an even count; NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// One timed optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct TimedStep {
    /// 1-based optimizer step.
    pub step: u64,
    /// Wall seconds from the end of the previous step (or the start of training) to the end of
    /// this one. The trainer reads the gradient norm back after the AdamW update is enqueued, so
    /// the device has finished the step when it ends.
    pub secs: f64,
    /// The step's loss.
    pub loss: f64,
}

/// A [`TrainObserver`] that records the wall time and loss of every step, optionally printing each.
#[derive(Debug, Default)]
pub struct StepTimer {
    last: Option<Instant>,
    /// The steps in order.
    pub steps: Vec<TimedStep>,
    /// Print `step N: secs s loss L` to stderr after each step.
    pub verbose: bool,
    /// Clear the `gptoss_kernels::profile` totals after this many steps, so that they cover
    /// the later (timed) steps only, not the first steps' compilation and pool growth.
    pub profile_after: Option<u64>,
}

impl StepTimer {
    /// A timer that prints every step when `verbose`.
    pub fn new(verbose: bool) -> Self {
        Self {
            verbose,
            ..Self::default()
        }
    }

    /// The median seconds of the steps after the first `warmup` (NaN when none).
    pub fn median_secs(&self, warmup: usize) -> f64 {
        median(self.steps.iter().skip(warmup).map(|s| s.secs).collect())
    }
}

impl TrainObserver for StepTimer {
    fn on_train_begin(&mut self, _total_steps: u64, _start_step: u64) -> Result<()> {
        self.last = Some(Instant::now());
        Ok(())
    }

    fn on_step_end(&mut self, global_step: u64, loss: f64) -> Result<()> {
        let now = Instant::now();
        let secs = self.last.map_or(0.0, |t| (now - t).as_secs_f64());
        self.last = Some(now);
        if self.verbose {
            eprintln!("  step {global_step}: {secs:.3} s loss {loss:.4}");
        }
        self.steps.push(TimedStep {
            step: global_step,
            secs,
            loss,
        });
        if self.profile_after == Some(global_step) {
            gptoss_kernels::profile::reset();
        }
        Ok(())
    }

    fn on_train_end(&mut self, _outcome: &TrainOutcome) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_rows_are_seeded_and_fully_trained() {
        let a = synthetic_rows(3, 16, 100, 7);
        let b = synthetic_rows(3, 16, 100, 7);
        let c = synthetic_rows(3, 16, 100, 8);
        assert_eq!(a[2].input_ids, b[2].input_ids);
        assert_ne!(a[0].input_ids, c[0].input_ids);
        assert!(a
            .iter()
            .all(|r| r.input_ids.len() == 16 && r.num_trained_tokens() == 15));
        assert!(a.iter().flat_map(|r| &r.input_ids).all(|&t| t < 100));
    }

    #[test]
    fn median_skips_warmup() {
        let mut t = StepTimer::default();
        for (i, s) in [9.0, 1.0, 3.0, 2.0].iter().enumerate() {
            t.steps.push(TimedStep {
                step: i as u64 + 1,
                secs: *s,
                loss: 0.0,
            });
        }
        assert_eq!(t.median_secs(1), 2.0);
        assert!(t.median_secs(4).is_nan());
    }
}
