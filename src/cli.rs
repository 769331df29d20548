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
