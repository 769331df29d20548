//! What the example binaries share: errors reported as sentences (the error, then each cause on
//! its own line) with exit status 1, and status 130 after a Ctrl-C, instead of Rust's `Debug`
//! print of a returned error.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     gptoss::cli::run(|| {
//!         // ... the example's work ...
//!         Ok(gptoss::cli::Outcome::Done)
//!     })
//! }
//! ```

use std::process::ExitCode;

/// Any error an example returns.
pub type Error = Box<dyn std::error::Error>;

/// How an example ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished its work: exit 0.
    Done,
    /// Stopped by Ctrl-C after saving what can be resumed: exit 130 (128 + SIGINT), as shells
    /// expect of an interrupted program.
    Interrupted,
}

/// Runs `main` and turns its result into the process exit status, printing an error as
/// `error: <message>` plus `  caused by: <source>` lines on stderr.
pub fn run(main: impl FnOnce() -> Result<Outcome, Error>) -> ExitCode {
    match main() {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("{}", describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `error: <message>` and one `  caused by: ...` line per source not already in the message.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut out = format!("error: {e}");
    let mut shown = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !shown.contains(&text) {
            out.push_str(&format!("\n  caused by: {text}"));
            shown.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The run dtype named by a `--dtype` flag: `f32` or `bf16`.
///
/// # Errors
/// Any other name, with the flag and what it accepts.
pub fn run_dtype(name: &str) -> Result<candle_core::DType, Error> {
    match name {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        other => Err(format!("--dtype: expected bf16 or f32, got {other}").into()),
    }
}

/// Loads the checkpoint `dir` onto `device` in `dtype` (MXFP4 experts resident where the device
/// allows it, unless `dequantize`), saying what it loads and how long it took.
///
/// # Errors
/// What [`gptoss_model::load_with`] reports (the file and tensor at fault).
pub fn load_model(
    dir: &std::path::Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    dequantize: bool,
) -> Result<gptoss_model::GptOssForCausalLM, Error> {
    let opts = gptoss_model::LoadOptions::dequantized_if(dtype, dequantize);
    let experts = if opts.resident_on(device) {
        "resident"
    } else {
        "dequantized"
    };
    println!(
        "loading {} ({dtype:?}, MXFP4 experts {experts}) ...",
        dir.display()
    );
    let t = std::time::Instant::now();
    let model = gptoss_model::load_with(dir, device, &opts)?;
    println!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    Ok(model)
}

/// The end of a training run as the examples print it: the steady-state step (`steady`:
/// median seconds and how many steps it covers; `batch` says what one micro-batch holds) and the
/// peak device memory when measured, then either where the interrupted run's checkpoint is and how
/// to resume it ([`Outcome::Interrupted`]) or where the adapter went ([`Outcome::Done`]).
pub fn report_run_end(
    steady: Option<(f64, usize)>,
    peak: Option<gptoss_kernels::PoolStats>,
    batch: &str,
    outcome: &gptoss_sft::trainer::TrainOutcome,
    adapter_dir: &std::path::Path,
) -> Outcome {
    if let Some((secs, n)) = steady {
        println!(
            "steady-state step: {secs:.4} s (median of {n} steps after the first two, {batch})"
        );
    }
    if let Some(m) = peak {
        const GIB: f64 = (1u64 << 30) as f64;
        println!(
            "peak device memory: {:.2} GiB allocated, {:.2} GiB reserved",
            m.peak_allocated as f64 / GIB,
            m.peak_reserved as f64 / GIB
        );
    }
    let dir = adapter_dir.display();
    if outcome.interrupted {
        println!(
            "interrupted at step {}: checkpoint {dir} holds the adapter, optimizer and schedule.\n\
             resume with the same command plus --resume-from-checkpoint {dir}",
            outcome.global_step
        );
        return Outcome::Interrupted;
    }
    println!("adapter saved to {dir}");
    Outcome::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_sentences_with_their_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = gptoss_sft::SftError::io("data/train.jsonl", io);
        assert_eq!(describe(&e), "error: data/train.jsonl: no such file");
        assert!(!describe(&e).contains("Io {"), "no Debug output");
    }
}
