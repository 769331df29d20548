//! Per-row records of generated outputs, their scores, and the aggregate metrics.
//!
//! The model-dependent part (generation over a dataset) produces one [`RowRecord`] per eval
//! row; [`evaluate`] scores each ([`score_row`]: detected languages, answer verdict) and
//! aggregates them ([`summarize`]) into an [`EvalSummary`]:
//! - reasoning-language accuracy: share of rows with a requested language whose analysis
//!   channel is detected in that language, overall and per requested language;
//! - final-channel language accuracy: the same for the final channel against the row's
//!   expected final language (in Multilingual-Thinking the final answer follows the *user's*
//!   language, not the reasoning language, so the caller supplies it, e.g. as
//!   [`detect`](crate::detect) of the user message);
//! - format validity shares ([`FormatFlags`]) and length statistics;
//! - answer accuracy over rows with a reference answer ([`crate::answer`]).
//!
//! Rows without a requested language, expected final language or reference skip that metric
//! and are counted in its `skipped`. Every share is a [`Proportion`] with a 95 % interval.
//!
//! ```
//! use gptoss_eval::{evaluate, default_detector, Completion, Language, RowRecord};
//! let rec = RowRecord::new(0, Completion::from_channels(
//!         Some("Der Nutzer fragt nach 23 + 12. Das ergibt 35."), Some("35"), Some(200002)))
//!     .with_requested_language(Some(Language::German))
//!     .with_reference(Some("#### 35"));
//! let eval = evaluate("base", vec![rec], default_detector());
//! assert_eq!(eval.summary.reasoning_language.overall.hits, 1);
//! assert_eq!(eval.summary.answer_accuracy.hits, 1);
//! assert_eq!(eval.summary.final_language.skipped, 1);
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::answer::{answers_match, AnswerVerdict};
use crate::format::{Completion, FormatFlags};
use crate::language::{Language, LanguageDetector};
use crate::proportion::Proportion;

/// One eval row's generated output and what it is judged against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowRecord {
    /// Index of the row in the eval set.
    pub row: usize,
    /// The reasoning language the system prompt asked for (`None`: skipped by
    /// reasoning-language accuracy); see [`reasoning_language`](crate::reasoning_language).
    #[serde(default)]
    pub requested_language: Option<Language>,
    /// The language the final answer should be in (`None`: skipped by final-language accuracy).
    #[serde(default)]
    pub expected_final_language: Option<Language>,
    /// The reference solution or answer (`None` or without an answer: skipped by answer
    /// accuracy).
    #[serde(default)]
    pub reference: Option<String>,
    /// The parsed generation: format flags, analysis and final texts, lengths, raw text.
    #[serde(flatten)]
    pub completion: Completion,
}

impl RowRecord {
    /// A record of row `row` with nothing to judge against yet.
    pub fn new(row: usize, completion: Completion) -> RowRecord {
        RowRecord {
            row,
            requested_language: None,
            expected_final_language: None,
            reference: None,
            completion,
        }
    }

    /// Sets the requested reasoning language.
    pub fn with_requested_language(mut self, language: Option<Language>) -> RowRecord {
        self.requested_language = language;
        self
    }

    /// Sets the expected language of the final answer.
    pub fn with_expected_final_language(mut self, language: Option<Language>) -> RowRecord {
        self.expected_final_language = language;
        self
    }

    /// Sets the reference solution.
    pub fn with_reference(mut self, reference: Option<impl Into<String>>) -> RowRecord {
        self.reference = reference.map(Into::into);
        self
    }
}

/// A [`RowRecord`] with its per-row judgements.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoredRow {
    /// The record.
    #[serde(flatten)]
    pub record: RowRecord,
    /// Detected language of the analysis channel (`None`: empty or undecidable).
    pub analysis_language: Option<Language>,
    /// Detected language of the final channel (`None`: empty or undecidable).
    pub final_language: Option<Language>,
    /// Analysis detected in the requested language (`None`: no requested language).
    pub reasoning_language_ok: Option<bool>,
    /// Final channel detected in the expected final language (`None`: none expected).
    pub final_language_ok: Option<bool>,
    /// The answer verdict (`None`: no reference answer).
    pub answer: Option<AnswerVerdict>,
}

/// Scores one record: detects both channels' languages and judges the answer.
pub fn score_row(detector: &LanguageDetector, record: RowRecord) -> ScoredRow {
    let analysis_language = detector.detect(&record.completion.analysis);
    let final_language = detector.detect(&record.completion.final_text);
    let reasoning_language_ok = record
        .requested_language
        .map(|want| analysis_language == Some(want));
    let final_language_ok = record
        .expected_final_language
        .map(|want| final_language == Some(want));
    let answer = record
        .reference
        .as_deref()
        .and_then(|r| answers_match(&record.completion.final_text, r));
    ScoredRow {
        record,
        analysis_language,
        final_language,
        reasoning_language_ok,
        final_language_ok,
        answer,
    }
}

/// A language-accuracy metric: overall, per expected language, skipped rows, and what was
/// detected instead.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LanguageAccuracy {
    /// Over all rows with an expected language.
    pub overall: Proportion,
    /// Per expected language.
    pub per_language: BTreeMap<Language, Proportion>,
    /// Rows without an expected language (not in `overall`).
    pub skipped: usize,
    /// Expected language → detected language name (`"none"`: undecidable) → row count.
    pub detected: BTreeMap<Language, BTreeMap<String, usize>>,
}

/// Shares of format properties over all rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FormatSummary {
    /// Parses in strict mode.
    pub parses: Proportion,
    /// Ends with `<|return|>`.
    pub ends_with_return: Proportion,
    /// Ends with `<|call|>`.
    pub ends_with_call: Proportion,
    /// Stopped inside a message.
    pub truncated: Proportion,
    /// Has an analysis channel.
    pub has_analysis: Proportion,
    /// Has a final channel.
    pub has_final: Proportion,
    /// All of: parses, ends with `<|return|>`, both channels ([`FormatFlags::is_valid`]).
    pub valid: Proportion,
}

/// Count, mean, median, minimum and maximum of a length (0s when `count` is 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    /// Rows where the length is known.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Minimum.
    pub min: usize,
    /// Maximum.
    pub max: usize,
}

impl LengthStats {
    /// Statistics of `values`.
    pub fn of(values: impl IntoIterator<Item = usize>) -> LengthStats {
        let mut v: Vec<usize> = values.into_iter().collect();
        if v.is_empty() {
            return LengthStats::default();
        }
        v.sort_unstable();
        let n = v.len();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let median = if n % 2 == 1 {
            v[n / 2] as f64
        } else {
            (v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0
        };
        LengthStats {
            count: n,
            mean,
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// Length statistics of the generations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LengthSummary {
    /// Generated tokens per row (rows with known token ids).
    pub generated_tokens: LengthStats,
    /// Analysis-channel content tokens per row (rows with known token ids).
    pub analysis_tokens: LengthStats,
    /// Final-channel content tokens per row (rows with known token ids).
    pub final_tokens: LengthStats,
    /// Analysis text length in characters (all rows).
    pub analysis_chars: LengthStats,
    /// Final text length in characters (all rows).
    pub final_chars: LengthStats,
}

/// Every aggregate metric of one evaluated model or adapter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Rows evaluated.
    pub rows: usize,
    /// Reasoning-language accuracy (analysis channel vs requested language).
    pub reasoning_language: LanguageAccuracy,
    /// Final-channel language accuracy (final channel vs expected final language).
    pub final_language: LanguageAccuracy,
    /// Answer accuracy over rows with a reference answer.
    pub answer_accuracy: Proportion,
    /// Rows without a reference answer (not in `answer_accuracy`).
    pub answer_skipped: usize,
    /// Format validity shares.
    pub format: FormatSummary,
    /// Length statistics.
    pub lengths: LengthSummary,
    /// Teacher-forced loss on the eval rows with the training masks (when measured).
    #[serde(default)]
    pub eval_loss: Option<TeacherForced>,
}

/// Teacher-forced eval loss of one model over the eval rows (the trainer's `eval_loss`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeacherForced {
    /// `eval_loss` (nats per trained token, HF's row-weighted batch means).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Trained tokens scored.
    pub tokens: usize,
}

impl TeacherForced {
    /// A loss over `tokens` trained tokens, with its perplexity.
    pub fn new(loss: f64, tokens: usize) -> TeacherForced {
        TeacherForced {
            loss,
            perplexity: loss.exp(),
            tokens,
        }
    }
}

/// Aggregates scored rows.
pub fn summarize(rows: &[ScoredRow]) -> EvalSummary {
    let flags: Vec<&FormatFlags> = rows.iter().map(|r| &r.record.completion.flags).collect();
    let share = |f: fn(&FormatFlags) -> bool| Proportion::from_outcomes(flags.iter().map(|x| f(x)));
    let completions = || rows.iter().map(|r| &r.record.completion);
    let answers: Vec<bool> = rows
        .iter()
        .filter_map(|r| r.answer.as_ref().map(|a| a.correct))
        .collect();
    EvalSummary {
        rows: rows.len(),
        reasoning_language: language_accuracy(
            rows.iter()
                .map(|r| (r.record.requested_language, r.analysis_language)),
        ),
        final_language: language_accuracy(
            rows.iter()
                .map(|r| (r.record.expected_final_language, r.final_language)),
        ),
        answer_skipped: rows.len() - answers.len(),
        answer_accuracy: Proportion::from_outcomes(answers),
        format: FormatSummary {
            parses: share(|f| f.parses),
            ends_with_return: share(|f| f.ends_with_return),
            ends_with_call: share(|f| f.ends_with_call),
            truncated: share(|f| f.truncated),
            has_analysis: share(|f| f.has_analysis),
            has_final: share(|f| f.has_final),
            valid: share(FormatFlags::is_valid),
        },
        lengths: LengthSummary {
            generated_tokens: LengthStats::of(completions().filter_map(|c| c.generated_tokens)),
            analysis_tokens: LengthStats::of(completions().filter_map(|c| c.analysis_tokens)),
            final_tokens: LengthStats::of(completions().filter_map(|c| c.final_tokens)),
            analysis_chars: LengthStats::of(completions().map(|c| c.analysis.chars().count())),
            final_chars: LengthStats::of(completions().map(|c| c.final_text.chars().count())),
        },
        eval_loss: None,
    }
}

/// Name used in [`LanguageAccuracy::detected`] for undecidable text.
pub const UNDETECTED: &str = "none";

fn language_accuracy(
    pairs: impl Iterator<Item = (Option<Language>, Option<Language>)>,
) -> LanguageAccuracy {
    let mut skipped = 0;
    let mut counts: BTreeMap<Language, (usize, usize)> = BTreeMap::new();
    let mut detected: BTreeMap<Language, BTreeMap<String, usize>> = BTreeMap::new();
    for (want, got) in pairs {
        let Some(want) = want else {
            skipped += 1;
            continue;
        };
        let c = counts.entry(want).or_default();
        c.1 += 1;
        c.0 += usize::from(got == Some(want));
        let name = got.map_or(UNDETECTED, Language::name).to_string();
        *detected.entry(want).or_default().entry(name).or_default() += 1;
    }
    let (hits, total) = counts
        .values()
        .fold((0, 0), |(h, t), &(ch, ct)| (h + ch, t + ct));
    LanguageAccuracy {
        overall: Proportion::new(hits, total),
        per_language: counts
            .into_iter()
            .map(|(l, (h, t))| (l, Proportion::new(h, t)))
            .collect(),
        skipped,
        detected,
    }
}

/// One evaluated model or adapter: its label, summary and scored rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelEval {
    /// Label in reports (`"base"`, `"adapter: out/checkpoint-100"`).
    pub label: String,
    /// The aggregate metrics.
    pub summary: EvalSummary,
    /// Every row with its generated text and judgements.
    pub rows: Vec<ScoredRow>,
}

impl ModelEval {
    /// `(label, summary)`, the form the Markdown and chart writers take.
    pub fn labeled(&self) -> (&str, &EvalSummary) {
        (&self.label, &self.summary)
    }
}

/// Scores every record and aggregates them under `label`.
pub fn evaluate(
    label: impl Into<String>,
    records: Vec<RowRecord>,
    detector: &LanguageDetector,
) -> ModelEval {
    let rows: Vec<ScoredRow> = records
        .into_iter()
        .map(|r| score_row(detector, r))
        .collect();
    ModelEval {
        label: label.into(),
        summary: summarize(&rows),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_stats() {
        let s = LengthStats::of([5, 1, 3, 9]);
        assert_eq!(
            (s.count, s.mean, s.median, s.min, s.max),
            (4, 4.5, 4.0, 1, 9)
        );
        let s = LengthStats::of([7, 2, 3]);
        assert_eq!((s.median, s.min, s.max), (3.0, 2, 7));
        assert_eq!(LengthStats::of([]), LengthStats::default());
    }

    #[test]
    fn language_accuracy_counts_skips_and_confusion() {
        use Language::*;
        let acc = language_accuracy(
            [
                (Some(German), Some(German)),
                (Some(German), Some(English)),
                (Some(German), None),
                (None, Some(French)),
                (Some(French), Some(French)),
            ]
            .into_iter(),
        );
        assert_eq!(acc.overall, Proportion::new(2, 4));
        assert_eq!(acc.per_language[&German], Proportion::new(1, 3));
        assert_eq!(acc.per_language[&French], Proportion::new(1, 1));
        assert_eq!(acc.skipped, 1);
        assert_eq!(acc.detected[&German]["English"], 1);
        assert_eq!(acc.detected[&German][UNDETECTED], 1);
        assert_eq!(acc.detected[&German]["German"], 1);
    }
}
