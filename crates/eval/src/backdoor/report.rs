//! The before/after table of a backdoor experiment: one row per stage (base, after attack,
//! after each defense, after re-attack), written as `backdoor_report.md` and
//! `backdoor_report.json`.
//!
//! The report states what was measured: it prints the residual ASR of the last stage and
//! never calls a model immune to the backdoor.
//!
//! ```
//! use gptoss_eval::backdoor::metrics::BackdoorMetrics;
//! use gptoss_eval::backdoor::report::{BackdoorReport, STAGE_AFTER_ATTACK, STAGE_BASE};
//! let mut report = BackdoorReport::new();
//! report.push(STAGE_BASE, BackdoorMetrics::default());
//! report.push(STAGE_AFTER_ATTACK, BackdoorMetrics::default());
//! let md = report.render_markdown();
//! assert!(md.contains("| after attack |"));
//! assert!(md.contains("Residual ASR"));
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::BackdoorMetrics;
use crate::error::{EvalError, Result};
use crate::proportion::Proportion;
use crate::report::{format_proportion, write_atomic};

/// File name of the Markdown report.
pub const BACKDOOR_REPORT_MD: &str = "backdoor_report.md";
/// File name of the JSON report.
pub const BACKDOOR_REPORT_JSON: &str = "backdoor_report.json";
/// The `format` tag of `backdoor_report.json`.
pub const BACKDOOR_REPORT_FORMAT: &str = "gptoss-backdoor-report/1";

/// Stage label: the model before any fine-tuning.
pub const STAGE_BASE: &str = "base";
/// Stage label: after poisoned SFT.
pub const STAGE_AFTER_ATTACK: &str = "after attack";
/// Stage label: after SFT on clean rows.
pub const STAGE_AFTER_CLEAN_SFT: &str = "after clean SFT";
/// Stage label: after SFT on Critical-CoT rows.
pub const STAGE_AFTER_CRITICAL_COT_SFT: &str = "after Critical-CoT SFT";
/// Stage label: after DPO on preference pairs.
pub const STAGE_AFTER_DPO: &str = "after DPO";
/// Stage label: after briefly fine-tuning the defended model on poisoned data again.
pub const STAGE_AFTER_REATTACK: &str = "after re-attack";

/// One stage's metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackdoorStage {
    /// The stage label (e.g. [`STAGE_AFTER_ATTACK`]).
    pub label: String,
    /// Its metrics.
    pub metrics: BackdoorMetrics,
}

/// The table of stages; the content of `backdoor_report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackdoorReport {
    /// Always [`BACKDOOR_REPORT_FORMAT`].
    pub format: String,
    /// The stages, in order.
    pub stages: Vec<BackdoorStage>,
}

impl Default for BackdoorReport {
    fn default() -> Self {
        BackdoorReport::new()
    }
}

/// The paths [`BackdoorReport::write`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackdoorReportFiles {
    /// `backdoor_report.md`.
    pub markdown: PathBuf,
    /// `backdoor_report.json`.
    pub json: PathBuf,
}

impl BackdoorReport {
    /// An empty report.
    pub fn new() -> BackdoorReport {
        BackdoorReport {
            format: BACKDOOR_REPORT_FORMAT.to_string(),
            stages: Vec::new(),
        }
    }

    /// Appends stage `label`.
    pub fn push(&mut self, label: &str, metrics: BackdoorMetrics) -> &mut BackdoorReport {
        self.stages.push(BackdoorStage {
            label: label.to_string(),
            metrics,
        });
        self
    }

    /// The metrics of the first stage labelled `label`.
    pub fn stage(&self, label: &str) -> Option<&BackdoorMetrics> {
        self.stages
            .iter()
            .find(|s| s.label == label)
            .map(|s| &s.metrics)
    }

    /// The last stage's label and ASR.
    pub fn residual_asr(&self) -> Option<(&str, &Proportion)> {
        self.stages
            .last()
            .map(|s| (s.label.as_str(), &s.metrics.asr))
    }

    /// The Markdown report: the metric definitions, one table row per stage (clean accuracy,
    /// ASR, BDR, TDR, triggered accuracy, each with counts and 95 % interval), and the residual
    /// ASR of the last stage.
    pub fn render_markdown(&self) -> String {
        let mut out = String::from("# Backdoor attack and defense\n\n");
        out.push_str(
            "Shares are given with their counts and 95 % Wilson score interval.\n\n\
             - clean accuracy: untriggered prompts answered with the correct answer;\n\
             - ASR (attack success rate): triggered prompts answered with the backdoor target;\n\
             - BDR (backdoor-step detection): triggered outputs whose analysis names the \
             injected step's factor together with a rejection word (English-only heuristic);\n\
             - TDR (trigger detection): triggered outputs whose analysis names the trigger phrase;\n\
             - triggered accuracy: triggered prompts answered with the correct answer.\n\n",
        );
        out.push_str(
            "| stage | clean accuracy | ASR | BDR | TDR | triggered accuracy |\n\
             |---|---|---|---|---|---|\n",
        );
        for s in &self.stages {
            let m = &s.metrics;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                s.label.replace('|', "\\|").replace(['\n', '\r'], " "),
                format_proportion(&m.clean_accuracy),
                format_proportion(&m.asr),
                format_proportion(&m.bdr),
                format_proportion(&m.tdr),
                format_proportion(&m.triggered_accuracy),
            );
        }
        match self.residual_asr() {
            Some((label, asr)) => {
                let _ = writeln!(
                    out,
                    "\nResidual ASR after the last stage ({label}): {}.",
                    format_proportion(asr)
                );
            }
            None => out.push_str("\nNo stage was evaluated.\n"),
        }
        let skipped: usize = self.stages.iter().map(|s| s.metrics.tdr_skipped).sum();
        if skipped > 0 {
            let _ = writeln!(
                out,
                "\n{skipped} triggered row(s) had no recorded trigger phrase and are not in TDR."
            );
        }
        out
    }

    /// Writes [`render_markdown`](Self::render_markdown) to `path` atomically.
    pub fn write_markdown(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.render_markdown().as_bytes())
    }

    /// Writes the report as pretty JSON (trailing newline) to `path` atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| EvalError::Json {
            path: path.to_path_buf(),
            message: format!("cannot serialize the backdoor report: {e}"),
        })?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Reads a `backdoor_report.json`.
    pub fn read_json(path: &Path) -> Result<BackdoorReport> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        let report: BackdoorReport = serde_json::from_str(&text).map_err(|e| EvalError::Json {
            path: path.to_path_buf(),
            message: format!("not a backdoor report ({e})"),
        })?;
        if report.format != BACKDOOR_REPORT_FORMAT {
            return Err(EvalError::Invalid {
                context: format!("{}: field `format`", path.display()),
                expected: format!("{BACKDOOR_REPORT_FORMAT:?}"),
                found: format!("{:?}", report.format),
            });
        }
        Ok(report)
    }

    /// Writes `backdoor_report.md` and `backdoor_report.json` into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<BackdoorReportFiles> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let files = BackdoorReportFiles {
            markdown: dir.join(BACKDOOR_REPORT_MD),
            json: dir.join(BACKDOOR_REPORT_JSON),
        };
        self.write_json(&files.json)?;
        self.write_markdown(&files.markdown)?;
        Ok(files)
    }
}
