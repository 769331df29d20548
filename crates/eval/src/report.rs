//! Report files: `eval.json` (every metric and every scored row with its generated text),
//! `eval.md` (Markdown tables, one column per compared model or adapter) and the
//! reasoning-language bar chart ([`crate::chart`]). Every file is written atomically:
//! to `<path>.tmp`, synced, then renamed over `<path>`.
//!
//! ```no_run
//! use gptoss_eval::{evaluate, default_detector, report::write_report};
//! # let (base_records, tuned_records) = (Vec::new(), Vec::new());
//! let base = evaluate("base", base_records, default_detector());
//! let tuned = evaluate("adapter", tuned_records, default_detector());
//! let files = write_report("out/eval".as_ref(), &[base, tuned])?;
//! println!("{}", files.markdown.display());
//! # Ok::<(), gptoss_eval::EvalError>(())
//! ```

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chart::write_language_chart;
use crate::error::{EvalError, Result};
use crate::language::Language;
use crate::metrics::{EvalSummary, LanguageAccuracy, LengthStats, ModelEval};
use crate::proportion::Proportion;

/// File name of the JSON report.
pub const EVAL_JSON: &str = "eval.json";
/// File name of the Markdown report.
pub const EVAL_MD: &str = "eval.md";
/// File name of the reasoning-language chart.
pub const LANGUAGE_CHART: &str = "reasoning_language.png";
/// The `format` tag of `eval.json`.
pub const REPORT_FORMAT: &str = "gptoss-eval/1";

/// The content of `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Always [`REPORT_FORMAT`].
    pub format: String,
    /// Every evaluated model or adapter, in the order given.
    pub models: Vec<ModelEval>,
}

#[derive(Serialize)]
struct EvalReportRef<'a> {
    format: &'a str,
    models: &'a [ModelEval],
}

/// The paths [`write_report`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportFiles {
    /// `eval.json`.
    pub json: PathBuf,
    /// `eval.md`.
    pub markdown: PathBuf,
    /// The chart PNG.
    pub chart: PathBuf,
}

/// Writes `eval.json`, `eval.md` and the chart into `dir` (created if missing).
pub fn write_report(dir: &Path, models: &[ModelEval]) -> Result<ReportFiles> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let files = ReportFiles {
        json: dir.join(EVAL_JSON),
        markdown: dir.join(EVAL_MD),
        chart: dir.join(LANGUAGE_CHART),
    };
    let labeled: Vec<(&str, &EvalSummary)> = models.iter().map(ModelEval::labeled).collect();
    write_eval_json(&files.json, models)?;
    write_eval_markdown(&files.markdown, &labeled)?;
    write_language_chart(&files.chart, &labeled)?;
    Ok(files)
}

/// Writes `eval.json` (pretty-printed, trailing newline) to `path`.
pub fn write_eval_json(path: &Path, models: &[ModelEval]) -> Result<()> {
    let report = EvalReportRef {
        format: REPORT_FORMAT,
        models,
    };
    let mut text = serde_json::to_string_pretty(&report).map_err(|e| EvalError::Json {
        path: path.to_path_buf(),
        message: format!("cannot serialize the report: {e}"),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads an `eval.json` back; errors name the file and, for malformed JSON, line and column.
pub fn read_eval_json(path: &Path) -> Result<EvalReport> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let report: EvalReport = serde_json::from_str(&text).map_err(|e| EvalError::Json {
        path: path.to_path_buf(),
        message: format!("not an eval report ({e})"),
    })?;
    if report.format != REPORT_FORMAT {
        return Err(EvalError::Invalid {
            context: format!("{}: field `format`", path.display()),
            expected: format!("{REPORT_FORMAT:?}"),
            found: format!("{:?}", report.format),
        });
    }
    Ok(report)
}

/// Writes [`render_markdown`] to `path`.
pub fn write_eval_markdown(path: &Path, models: &[(&str, &EvalSummary)]) -> Result<()> {
    write_atomic(path, render_markdown(models).as_bytes())
}

/// Writes `bytes` to `<path>.tmp`, syncs it, then renames it over `path`; on error the
/// temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| EvalError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| EvalError::io(&tmp, e))?;
        f.sync_all().map_err(|e| EvalError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| EvalError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A proportion as `80.0 % (8/10; 95 % CI 49.0–94.3 %)`, or `– (0 rows)` when empty.
pub fn format_proportion(p: &Proportion) -> String {
    if p.is_empty() {
        return "– (0 rows)".to_string();
    }
    format!(
        "{:.1} % ({}/{}; 95 % CI {:.1}–{:.1} %)",
        p.rate * 100.0,
        p.hits,
        p.total,
        p.ci95.0 * 100.0,
        p.ci95.1 * 100.0
    )
}

fn format_lengths(s: &LengthStats) -> String {
    if s.count == 0 {
        return "–".to_string();
    }
    format!("{:.1} / {:.1} (n={})", s.mean, s.median, s.count)
}

/// Escapes a table cell (pipes, line breaks).
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn table_header(out: &mut String, first: &str, models: &[(&str, &EvalSummary)]) {
    let _ = write!(out, "| {first} |");
    for (label, _) in models {
        let _ = write!(out, " {} |", cell(label));
    }
    out.push_str("\n|---|");
    for _ in models {
        out.push_str("---|");
    }
    out.push('\n');
}

fn table_row(out: &mut String, name: &str, values: impl IntoIterator<Item = String>) {
    let _ = write!(out, "| {name} |");
    for v in values {
        let _ = write!(out, " {} |", cell(&v));
    }
    out.push('\n');
}

fn per_language_table(
    out: &mut String,
    models: &[(&str, &EvalSummary)],
    pick: fn(&EvalSummary) -> &LanguageAccuracy,
) {
    let languages: Vec<Language> = Language::ALL
        .into_iter()
        .filter(|l| {
            models
                .iter()
                .any(|(_, s)| pick(s).per_language.contains_key(l))
        })
        .collect();
    if languages.is_empty() {
        out.push_str("No row has an expected language.\n");
        return;
    }
    table_header(out, "language", models);
    for l in languages {
        table_row(
            out,
            l.name(),
            models.iter().map(|(_, s)| {
                pick(s)
                    .per_language
                    .get(&l)
                    .map_or_else(|| "– (0 rows)".to_string(), format_proportion)
            }),
        );
    }
}

fn detected_table(out: &mut String, models: &[(&str, &EvalSummary)]) {
    let languages: Vec<Language> = Language::ALL
        .into_iter()
        .filter(|l| {
            models
                .iter()
                .any(|(_, s)| s.reasoning_language.detected.contains_key(l))
        })
        .collect();
    if languages.is_empty() {
        return;
    }
    out.push_str("\n## Language the analysis channel was detected in\n\n");
    table_header(out, "requested", models);
    for l in languages {
        table_row(
            out,
            l.name(),
            models
                .iter()
                .map(|(_, s)| match s.reasoning_language.detected.get(&l) {
                    Some(counts) => {
                        let mut v: Vec<(&String, &usize)> = counts.iter().collect();
                        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                        v.iter()
                            .map(|(name, n)| format!("{name} {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                    None => "–".to_string(),
                }),
        );
    }
}

/// The Markdown report: an overall table (one column per model), the per-language tables of
/// reasoning-language and final-language accuracy, and what the analysis channel was detected
/// as per requested language.
pub fn render_markdown(models: &[(&str, &EvalSummary)]) -> String {
    let mut out = String::from("# Evaluation\n\n");
    let sizes: Vec<String> = models
        .iter()
        .map(|(l, s)| format!("{} ({} rows)", cell(l), s.rows))
        .collect();
    let _ = writeln!(out, "Models: {}.", sizes.join(", "));
    out.push_str(
        "Shares are given with their 95 % Wilson score interval; rows without the needed \
         input are skipped by a metric and counted below.\n\n## Overall\n\n",
    );
    table_header(&mut out, "metric", models);
    let prop = |f: fn(&EvalSummary) -> &Proportion| {
        models
            .iter()
            .map(move |(_, s)| format_proportion(f(s)))
            .collect::<Vec<_>>()
    };
    let len = |f: fn(&EvalSummary) -> &LengthStats| {
        models
            .iter()
            .map(move |(_, s)| format_lengths(f(s)))
            .collect::<Vec<_>>()
    };
    let count = |f: fn(&EvalSummary) -> usize| {
        models
            .iter()
            .map(move |(_, s)| f(s).to_string())
            .collect::<Vec<_>>()
    };
    table_row(
        &mut out,
        "reasoning language",
        prop(|s| &s.reasoning_language.overall),
    );
    table_row(
        &mut out,
        "final-channel language",
        prop(|s| &s.final_language.overall),
    );
    table_row(&mut out, "answer accuracy", prop(|s| &s.answer_accuracy));
    if models.iter().any(|(_, s)| s.eval_loss.is_some()) {
        let tf = |f: fn(&crate::metrics::TeacherForced) -> String| {
            models
                .iter()
                .map(move |(_, s)| s.eval_loss.as_ref().map_or("–".to_string(), f))
                .collect::<Vec<_>>()
        };
        table_row(
            &mut out,
            "eval loss (teacher-forced)",
            tf(|t| format!("{:.4} ({} tokens)", t.loss, t.tokens)),
        );
        table_row(
            &mut out,
            "perplexity",
            tf(|t| format!("{:.2}", t.perplexity)),
        );
    }
    table_row(&mut out, "format valid", prop(|s| &s.format.valid));
    table_row(&mut out, "parses", prop(|s| &s.format.parses));
    table_row(
        &mut out,
        "ends with `<\\|return\\|>`",
        prop(|s| &s.format.ends_with_return),
    );
    table_row(
        &mut out,
        "ends with `<\\|call\\|>`",
        prop(|s| &s.format.ends_with_call),
    );
    table_row(
        &mut out,
        "has analysis channel",
        prop(|s| &s.format.has_analysis),
    );
    table_row(&mut out, "has final channel", prop(|s| &s.format.has_final));
    table_row(&mut out, "truncated", prop(|s| &s.format.truncated));
    table_row(
        &mut out,
        "generated tokens (mean / median)",
        len(|s| &s.lengths.generated_tokens),
    );
    table_row(
        &mut out,
        "analysis tokens (mean / median)",
        len(|s| &s.lengths.analysis_tokens),
    );
    table_row(
        &mut out,
        "final tokens (mean / median)",
        len(|s| &s.lengths.final_tokens),
    );
    table_row(
        &mut out,
        "analysis characters (mean / median)",
        len(|s| &s.lengths.analysis_chars),
    );
    table_row(
        &mut out,
        "final characters (mean / median)",
        len(|s| &s.lengths.final_chars),
    );
    table_row(
        &mut out,
        "skipped: no requested language",
        count(|s| s.reasoning_language.skipped),
    );
    table_row(
        &mut out,
        "skipped: no expected final language",
        count(|s| s.final_language.skipped),
    );
    table_row(
        &mut out,
        "skipped: no reference answer",
        count(|s| s.answer_skipped),
    );
    out.push_str("\n## Reasoning language per requested language\n\n");
    per_language_table(&mut out, models, |s| &s.reasoning_language);
    out.push_str("\n## Final-channel language per expected language\n\n");
    per_language_table(&mut out, models, |s| &s.final_language);
    detected_table(&mut out, models);
    out
}

/// The headline metrics of several models side by side as plain aligned text for a terminal:
/// reasoning-language and final-language accuracy, format validity, answer accuracy (when any
/// row had a reference), eval loss and perplexity (when measured), generated tokens.
pub fn render_console(models: &[(&str, &EvalSummary)]) -> String {
    let short = |p: &Proportion| {
        if p.is_empty() {
            "–".to_string()
        } else {
            format!("{:.1} % ({}/{})", p.rate * 100.0, p.hits, p.total)
        }
    };
    let mut rows: Vec<(String, Vec<String>)> = vec![(
        "metric".into(),
        models.iter().map(|(l, _)| l.to_string()).collect(),
    )];
    let mut add = |name: &str, f: &dyn Fn(&EvalSummary) -> String| {
        rows.push((name.to_string(), models.iter().map(|(_, s)| f(s)).collect()));
    };
    add("reasoning language", &|s| {
        short(&s.reasoning_language.overall)
    });
    add("final-channel language", &|s| {
        short(&s.final_language.overall)
    });
    add("format valid", &|s| short(&s.format.valid));
    if models.iter().any(|(_, s)| !s.answer_accuracy.is_empty()) {
        add("answer accuracy", &|s| short(&s.answer_accuracy));
    }
    if models.iter().any(|(_, s)| s.eval_loss.is_some()) {
        add("eval loss", &|s| {
            s.eval_loss.map_or("–".into(), |t| format!("{:.4}", t.loss))
        });
        add("perplexity", &|s| {
            s.eval_loss
                .map_or("–".into(), |t| format!("{:.1}", t.perplexity))
        });
    }
    add("generated tokens (mean)", &|s| {
        format!("{:.1}", s.lengths.generated_tokens.mean)
    });
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..models.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.1[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (name, vals) in &rows {
        let _ = write!(out, "{name:<w0$}");
        for (v, w) in vals.iter().zip(&widths) {
            let _ = write!(out, "  {v:>w$}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert!(!dir.path().join("a.txt.tmp").exists());
        // A destination that cannot be created leaves nothing behind.
        let bad = dir.path().join("missing-dir").join("b.txt");
        assert!(matches!(
            write_atomic(&bad, b"x"),
            Err(EvalError::Io { .. })
        ));
    }

    #[test]
    fn proportion_cells() {
        assert_eq!(
            format_proportion(&Proportion::new(8, 10)),
            "80.0 % (8/10; 95 % CI 49.0–94.3 %)"
        );
        assert_eq!(format_proportion(&Proportion::new(0, 0)), "– (0 rows)");
        assert_eq!(cell("a|b\nc"), "a\\|b c");
    }
}
