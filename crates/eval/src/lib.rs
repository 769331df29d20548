#![deny(missing_docs)]
//! # gptoss-eval
//!
//! Evaluation of fine-tuned gpt-oss models, model-independent part: everything computed from
//! generated outputs. The generation side produces one [`RowRecord`] per eval row (its
//! parsed [`Completion`], the requested reasoning language, the expected final language and
//! the reference answer); this crate scores and aggregates them and writes the reports.
//!
//! - [`language`]: language identification of reasoning text (lingua, 13 languages) and the
//!   `reasoning language: X` line of a system prompt;
//! - [`answer`]: GSM8K answer extraction, normalisation and matching;
//! - [`format`](mod@format): Harmony format validity of generated token ids, channel texts and lengths;
//! - [`generation`]: prompts → batched generation → parsed [`RowRecord`]s, and the flat
//!   `eval_*` metrics a training log takes;
//! - [`hub`]: the local Hugging Face hub cache layout (snapshot directories);
//! - [`proportion`]: a share with its 95 % Wilson interval (also for backdoor ASR/BDR/TDR);
//! - [`metrics`]: per-row records and scores, and the aggregate [`EvalSummary`];
//! - [`report`] and [`chart`]: `eval.json`, `eval.md` and the PNG bar chart;
//! - [`backdoor`]: BadChain-style poisoned GSM8K data, defense data (clean, Critical-CoT, DPO
//!   pairs), split hygiene, the synthetic arithmetic task, and ASR / BDR / TDR with the
//!   before/after report.
//!
//! ```no_run
//! use gptoss_eval::*;
//! use gptoss_harmony::HarmonyTokenizer;
//! let tok = HarmonyTokenizer::o200k_harmony()?;
//! # let generated: Vec<u32> = Vec::new();
//! let system = "reasoning language: German\n\nYou are a helpful assistant.";
//! let record = RowRecord::new(0, format::check_completion(&tok, &generated))
//!     .with_requested_language(reasoning_language(system)?)
//!     .with_expected_final_language(detect("Was ist 23 plus 12?"))
//!     .with_reference(Some("#### 35"));
//! let base = evaluate("base", vec![record], default_detector());
//! report::write_report("out/eval".as_ref(), &[base])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod answer;
pub mod backdoor;
pub mod chart;
pub mod error;
pub mod format;
pub mod generation;
pub mod hub;
pub mod language;
pub mod metrics;
pub mod proportion;
pub mod report;

pub use answer::{answers_match, extract_reference, judge, Answer, AnswerVerdict, Number};
pub use error::{EvalError, Result};
pub use format::{check_completion, Completion, FormatFlags};
pub use generation::{generate_records, log_metrics, EvalPrompt};
pub use language::{default_detector, detect, reasoning_language, Language, LanguageDetector};
pub use metrics::{
    evaluate, score_row, summarize, EvalSummary, LanguageAccuracy, ModelEval, RowRecord, ScoredRow,
    TeacherForced,
};
pub use proportion::{wilson_interval, Proportion};
pub use report::{read_eval_json, write_report, EvalReport};
