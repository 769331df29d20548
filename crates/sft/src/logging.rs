//! Per-step training logs, as the HF Trainer / TRL 1.16 record them: the [`LogRecord`] of each
//! logging step (loss, grad_norm, learning_rate, entropy, num_tokens, mean_token_accuracy,
//! aux_loss, epoch, step, plus tokens/s), the end-of-training [`TrainSummary`], and
//! [`TrainLogger`], which sends them to the console (HF dict-style lines), an indicatif progress
//! bar with ETA, and an MLflow run; [`write_loss_curve_png`] draws the loss curve.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::config::{ReportTo, TrainingConfig};
use crate::error::{Result, SftError};
use crate::mlflow::{MlflowClient, MlflowRun, RunStatus};

/// One `log_history` entry of a logging step (HF/TRL key names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Mean optimizer-step loss since the previous log.
    pub loss: f64,
    /// Pre-clip total gradient L2 norm of the last optimizer step.
    pub grad_norm: f64,
    /// The lr used by the last update (`base · λ(step − 1)`, HF's logged convention).
    pub learning_rate: f64,
    /// Mean next-token entropy (nats) at trained positions.
    pub entropy: f64,
    /// Cumulative non-padding tokens seen (trained or not); HF writes it as a float, both read.
    #[serde(deserialize_with = "u64_from_number")]
    pub num_tokens: u64,
    /// Fraction of trained positions whose label is the argmax.
    pub mean_token_accuracy: f64,
    /// Router aux loss, when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Fractional epoch.
    pub epoch: f64,
    /// Global optimizer step (1-based).
    pub step: u64,
    /// Non-padding tokens per second over the logging window (not an HF key).
    #[serde(default)]
    pub tokens_per_second: f64,
}

/// Accepts `400` or `400.0` (HF logs `num_tokens` as a float).
fn u64_from_number<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 {
        Ok(v as u64)
    } else {
        Err(serde::de::Error::custom(format!(
            "expected a non-negative whole number, got {v}"
        )))
    }
}

impl LogRecord {
    /// `(key, value)` pairs for MLflow (HF's `MLflowCallback` logs these names; `step` is the
    /// metric step, not a metric).
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut m = vec![
            ("loss".to_string(), self.loss),
            ("grad_norm".to_string(), self.grad_norm),
            ("learning_rate".to_string(), self.learning_rate),
            ("entropy".to_string(), self.entropy),
            ("num_tokens".to_string(), self.num_tokens as f64),
            ("mean_token_accuracy".to_string(), self.mean_token_accuracy),
            ("epoch".to_string(), self.epoch),
            ("tokens_per_second".to_string(), self.tokens_per_second),
        ];
        if let Some(a) = self.aux_loss {
            m.push(("aux_loss".to_string(), a));
        }
        m
    }
}

/// The last `log_history` entry HF writes when training ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Wall seconds of the whole run.
    pub train_runtime: f64,
    /// Rows per second.
    pub train_samples_per_second: f64,
    /// Optimizer steps per second.
    pub train_steps_per_second: f64,
    /// HF's FLOP estimate of the run ([`crate::flos`]: 6 × padded tokens × non-embedding parameters).
    pub total_flos: f64,
    /// Mean loss over all steps.
    pub train_loss: f64,
    /// Final fractional epoch.
    pub epoch: f64,
    /// Final global step.
    pub step: u64,
}

impl TrainSummary {
    /// MLflow metrics of the summary.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        vec![
            ("train_runtime".to_string(), self.train_runtime),
            (
                "train_samples_per_second".to_string(),
                self.train_samples_per_second,
            ),
            (
                "train_steps_per_second".to_string(),
                self.train_steps_per_second,
            ),
            ("total_flos".to_string(), self.total_flos),
            ("train_loss".to_string(), self.train_loss),
        ]
    }
}

/// One `log_history` entry of an evaluation (HF/TRL key names: the metrics of the eval loop
/// prefixed `eval_`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Teacher-forced loss on the eval rows: the mean over rows of their batch's token-mean loss
    /// (HF's eval loop: each batch's loss repeated batch-size times, then averaged).
    pub eval_loss: f64,
    /// Mean over eval batches of the token-mean next-token entropy (nats), as TRL logs it.
    pub eval_entropy: f64,
    /// Mean over eval batches of the share of trained positions whose argmax is the label.
    pub eval_mean_token_accuracy: f64,
    /// Wall seconds of the evaluation.
    pub eval_runtime: f64,
    /// Eval rows per second.
    pub eval_samples_per_second: f64,
    /// Eval batches per second.
    pub eval_steps_per_second: f64,
    /// Generation metrics of the evaluation (`eval_reasoning_language_accuracy`, ...), when
    /// `eval_generate` is on.
    #[serde(flatten)]
    pub generation: std::collections::BTreeMap<String, f64>,
    /// Fractional epoch.
    pub epoch: f64,
    /// Global optimizer step.
    pub step: u64,
}

impl EvalRecord {
    /// `(key, value)` pairs for MLflow.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut m = vec![
            ("eval_loss".to_string(), self.eval_loss),
            ("eval_entropy".to_string(), self.eval_entropy),
            (
                "eval_mean_token_accuracy".to_string(),
                self.eval_mean_token_accuracy,
            ),
            ("eval_runtime".to_string(), self.eval_runtime),
            (
                "eval_samples_per_second".to_string(),
                self.eval_samples_per_second,
            ),
            (
                "eval_steps_per_second".to_string(),
                self.eval_steps_per_second,
            ),
        ];
        m.extend(self.generation.iter().map(|(k, v)| (k.clone(), *v)));
        m
    }

    /// One console line in the HF dict style.
    pub fn console_line(&self) -> String {
        let mut s = format!(
            "{{'eval_loss': {:.4}, 'eval_entropy': {:.4}, 'eval_mean_token_accuracy': {:.4}, \
             'eval_runtime': {:.2}",
            self.eval_loss, self.eval_entropy, self.eval_mean_token_accuracy, self.eval_runtime
        );
        for (k, v) in &self.generation {
            s.push_str(&format!(", '{k}': {v:.4}"));
        }
        s.push_str(&format!(
            ", 'epoch': {:.4}, 'step': {}}}",
            self.epoch, self.step
        ));
        s
    }
}

/// A `log_history` entry: a step record, an evaluation, or the final summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogEntry {
    /// A logging step of the DPO trainer (first: its `rewards/*` keys tell it apart).
    Dpo(crate::dpo::DpoLogRecord),
    /// A logging step.
    Step(LogRecord),
    /// The end-of-training summary.
    Summary(TrainSummary),
    /// An evaluation.
    Eval(EvalRecord),
}

impl LogEntry {
    /// The step record, if this is one.
    pub fn as_step(&self) -> Option<&LogRecord> {
        match self {
            LogEntry::Step(r) => Some(r),
            LogEntry::Summary(_) | LogEntry::Eval(_) | LogEntry::Dpo(_) => None,
        }
    }
}

/// One console line per record, in the HF dict style
/// (`{'loss': 2.1234, 'grad_norm': 0.5, 'learning_rate': 2.000e-04, …}`).
pub fn format_record(r: &LogRecord) -> String {
    let mut s = format!(
        "{{'loss': {:.4}, 'grad_norm': {:.4}, 'learning_rate': {:.3e}, 'entropy': {:.4}, \
         'num_tokens': {}, 'mean_token_accuracy': {:.4}",
        r.loss, r.grad_norm, r.learning_rate, r.entropy, r.num_tokens, r.mean_token_accuracy
    );
    if let Some(a) = r.aux_loss {
        s.push_str(&format!(", 'aux_loss': {a:.4}"));
    }
    s.push_str(&format!(
        ", 'epoch': {:.4}, 'step': {}, 'tokens/s': {:.1}}}",
        r.epoch, r.step, r.tokens_per_second
    ));
    s
}

/// Console + progress bar + MLflow + the in-memory `log_history`.
pub struct TrainLogger {
    bar: Option<ProgressBar>,
    mlflow: Option<MlflowRun>,
    history: Vec<LogEntry>,
    print: bool,
    started: Instant,
}

impl TrainLogger {
    /// A logger for `total_steps` optimizer steps. With `report_to: mlflow` it opens a run
    /// (`MLFLOW_TRACKING_URI`, else `./mlruns`; experiment `experiment_name`, else
    /// `$MLFLOW_EXPERIMENT_NAME`, else `Default`) and logs the config as params.
    pub fn new(cfg: &TrainingConfig, total_steps: u64) -> Result<Self> {
        let mlflow = match cfg.report_to {
            ReportTo::Mlflow => {
                let client = MlflowClient::from_env(Path::new("mlruns"))?;
                let experiment = cfg
                    .experiment_name
                    .clone()
                    .or_else(|| std::env::var("MLFLOW_EXPERIMENT_NAME").ok())
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "Default".to_string());
                let name = cfg
                    .run_name
                    .clone()
                    .unwrap_or_else(|| format!("sft-{}", crate::mlflow::now_ms()));
                let run = MlflowRun::start(client, &experiment, &name)?;
                run.log_params(&cfg.params())?;
                Some(run)
            }
            ReportTo::None => None,
        };
        Ok(Self::with_parts(
            mlflow,
            total_steps,
            cfg.progress_bar,
            true,
        ))
    }

    /// A logger from parts: an optional open MLflow run, a progress bar when `show_bar`
    /// (hidden when stderr is not a terminal), console lines when `print`.
    pub fn with_parts(
        mlflow: Option<MlflowRun>,
        total_steps: u64,
        show_bar: bool,
        print: bool,
    ) -> Self {
        let bar = show_bar.then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            mlflow,
            history: Vec::new(),
            print,
            started: Instant::now(),
        }
    }

    /// Restores the history of a resumed run (from its trainer_state.json) and moves the bar.
    pub fn resume(&mut self, history: Vec<LogEntry>, global_step: u64) {
        self.history = history;
        if let Some(b) = &self.bar {
            b.set_position(global_step);
            b.reset_eta();
        }
    }

    /// Where the MLflow run went (`<store or server> (experiment …, run … "name")`), if any.
    pub fn mlflow_location(&self) -> Option<String> {
        self.mlflow.as_ref().map(|r| {
            format!(
                "{} (experiment {}, run {} \"{}\")",
                r.client().location(),
                r.experiment_id,
                r.run_id,
                r.run_name
            )
        })
    }

    /// Advances the progress bar to `global_step`.
    pub fn tick(&self, global_step: u64) {
        if let Some(b) = &self.bar {
            b.set_position(global_step);
        }
    }

    /// Prints a line above the bar (or to stdout without one).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => println!("{line}"),
        }
    }

    /// Records a logging step: history, console line, MLflow metrics at `record.step`.
    pub fn log(&mut self, record: &LogRecord) -> Result<()> {
        if self.print {
            self.println(&format_record(record));
        }
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {:.4}", record.loss));
        }
        if let Some(run) = &self.mlflow {
            run.log_metrics(record.step as i64, &record.metrics())?;
        }
        self.history.push(LogEntry::Step(record.clone()));
        Ok(())
    }

    /// Records a DPO logging step: history, console line, MLflow metrics at `record.step`.
    pub fn log_dpo(&mut self, record: &crate::dpo::DpoLogRecord) -> Result<()> {
        if self.print {
            self.println(&record.console_line());
        }
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {:.4}", record.loss));
        }
        if let Some(run) = &self.mlflow {
            run.log_metrics(record.step as i64, &record.metrics())?;
        }
        self.history.push(LogEntry::Dpo(record.clone()));
        Ok(())
    }

    /// Records an evaluation: history, console line, MLflow metrics at `record.step`.
    pub fn log_eval(&mut self, record: &EvalRecord) -> Result<()> {
        if self.print {
            self.println(&record.console_line());
        }
        if let Some(run) = &self.mlflow {
            run.log_metrics(record.step as i64, &record.metrics())?;
        }
        self.history.push(LogEntry::Eval(record.clone()));
        Ok(())
    }

    /// Appends the summary, prints it, logs it to MLflow and ends the run FINISHED.
    pub fn finish(&mut self, summary: &TrainSummary) -> Result<()> {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        if self.print {
            println!(
                "{{'train_runtime': {:.2}, 'train_samples_per_second': {:.3}, \
                 'train_steps_per_second': {:.3}, 'train_loss': {:.4}, 'epoch': {:.4}}}",
                summary.train_runtime,
                summary.train_samples_per_second,
                summary.train_steps_per_second,
                summary.train_loss,
                summary.epoch
            );
        }
        if let Some(run) = &mut self.mlflow {
            run.log_metrics(summary.step as i64, &summary.metrics())?;
            run.finish(RunStatus::Finished)?;
        }
        self.history.push(LogEntry::Summary(summary.clone()));
        Ok(())
    }

    /// The MLflow run, taken out of the logger (to log artifacts after training).
    pub fn take_mlflow_run(&mut self) -> Option<MlflowRun> {
        self.mlflow.take()
    }

    /// Ends the MLflow run with `status` (FAILED on errors, KILLED on Ctrl-C) without a summary.
    pub fn abort(&mut self, status: RunStatus) -> Result<()> {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
        if let Some(run) = &mut self.mlflow {
            if !run.is_finished() {
                run.finish(status)?;
            }
        }
        Ok(())
    }

    /// Seconds since the logger was created.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The `log_history` so far.
    pub fn history(&self) -> &[LogEntry] {
        &self.history
    }

    /// `(step, loss)` of every step record.
    pub fn loss_points(&self) -> Vec<(u64, f64)> {
        loss_points(&self.history)
    }
}

/// `(step, loss)` of every step record of `history`.
pub fn loss_points(history: &[LogEntry]) -> Vec<(u64, f64)> {
    history
        .iter()
        .filter_map(|e| match e {
            LogEntry::Step(r) => Some((r.step, r.loss)),
            LogEntry::Dpo(r) => Some((r.step, r.loss)),
            LogEntry::Summary(_) | LogEntry::Eval(_) => None,
        })
        .collect()
}

/// `(step, eval_loss)` of every evaluation of `history`.
pub fn eval_loss_points(history: &[LogEntry]) -> Vec<(u64, f64)> {
    history
        .iter()
        .filter_map(|e| match e {
            LogEntry::Eval(r) => Some((r.step, r.eval_loss)),
            _ => None,
        })
        .collect()
}

/// `(step, learning_rate)` of every step record of `history`.
pub fn learning_rate_points(history: &[LogEntry]) -> Vec<(u64, f64)> {
    history
        .iter()
        .filter_map(|e| e.as_step().map(|r| (r.step, r.learning_rate)))
        .collect()
}

/// The `[lo, hi]` range of `v` padded by 5 % (a flat or empty series gets a unit-free pad).
fn padded_range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs().max(1e-12) * 1e-3);
    (lo - pad, hi + pad)
}

/// Draws the training curves of `history` as a 900×640 PNG, written atomically: on top the
/// training loss per logged step (blue) and the eval loss per evaluation (red, with markers),
/// below the learning rate; titled, with labelled axes and ticks (text in the embedded DejaVu
/// Sans of `gptoss-eval`). Non-finite values are skipped; an error if there is no finite loss.
pub fn write_loss_curve_png(path: &Path, history: &[LogEntry]) -> Result<()> {
    use plotters::prelude::*;
    let finite = |v: Vec<(u64, f64)>| -> Vec<(f64, f64)> {
        v.into_iter()
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| (x as f64, y))
            .collect()
    };
    let train = finite(loss_points(history));
    let eval = finite(eval_loss_points(history));
    let lr = finite(learning_rate_points(history));
    if train.is_empty() && eval.is_empty() {
        return Err(SftError::Trainer(format!(
            "{}: no finite loss points to plot",
            path.display()
        )));
    }
    gptoss_eval::chart::register_fonts()?;
    let steps = train.iter().chain(&eval).chain(&lr).map(|p| p.0);
    let (x0, x1) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (x0, x1) = (x0.min(1.0), x1.max(x0 + 1.0));
    let (y0, y1) = padded_range(train.iter().chain(&eval).map(|p| p.1));
    let (l0, l1) = padded_range(lr.iter().map(|p| p.1));
    let plot_err = |e: String| SftError::format(path, format!("cannot draw the loss curve: {e}"));
    atomic::write_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
        let (top, bottom) = root.split_vertically(430);
        draw_loss_panel(&top, &train, &eval, (x0..x1, y0..y1)).map_err(plot_err)?;
        draw_lr_panel(&bottom, &lr, (x0..x1, l0..l1)).map_err(plot_err)?;
        root.present().map_err(|e| plot_err(e.to_string()))?;
        Ok(())
    })
}

/// A drawing area of the loss-curve bitmap.
type PlotArea<'a> =
    plotters::drawing::DrawingArea<plotters::prelude::BitMapBackend<'a>, plotters::coord::Shift>;

/// The chart of one panel: margins, label areas, the `optimizer step` x axis and `y_desc`.
fn panel<'a, 'b>(
    area: &'a PlotArea<'b>,
    caption: Option<&str>,
    y_desc: &str,
    y_format: Option<&dyn Fn(&f64) -> String>,
    (xs, ys): (std::ops::Range<f64>, std::ops::Range<f64>),
) -> std::result::Result<
    plotters::chart::ChartContext<
        'a,
        plotters::prelude::BitMapBackend<'b>,
        plotters::coord::cartesian::Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
    String,
> {
    let mut builder = plotters::prelude::ChartBuilder::on(area);
    if let Some(c) = caption {
        builder.caption(c, ("sans-serif", 22));
    }
    let mut chart = builder
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(xs, ys)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("optimizer step")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14));
    if let Some(f) = y_format {
        mesh.y_label_formatter(f);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    Ok(chart)
}

/// The upper panel: train loss (line) and eval loss (line + dots) over optimizer steps.
fn draw_loss_panel(
    area: &PlotArea<'_>,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    ranges: (std::ops::Range<f64>, std::ops::Range<f64>),
) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut chart = panel(
        area,
        Some("Training loss"),
        "loss (nats / token)",
        None,
        ranges,
    )?;
    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(train.to_vec(), BLUE.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
    }
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.to_vec(), RED.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label("eval loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))
}

/// The lower panel: the learning rate over optimizer steps.
fn draw_lr_panel(
    area: &PlotArea<'_>,
    lr: &[(f64, f64)],
    ranges: (std::ops::Range<f64>, std::ops::Range<f64>),
) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    let sci = |v: &f64| format!("{v:.1e}");
    let mut chart = panel(area, None, "learning rate", Some(&sci), ranges)?;
    chart
        .draw_series(LineSeries::new(lr.to_vec(), GREEN.stroke_width(2)))
        .map(|_| ())
        .map_err(|x| x.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> LogRecord {
        LogRecord {
            loss,
            grad_norm: 1.5,
            learning_rate: 2e-4,
            entropy: 3.0,
            num_tokens: 100 * step,
            mean_token_accuracy: 0.25,
            aux_loss: None,
            epoch: step as f64 / 10.0,
            step,
            tokens_per_second: 50.0,
        }
    }

    #[test]
    fn history_entries_round_trip_untagged() {
        let h = vec![
            LogEntry::Step(rec(1, 2.0)),
            LogEntry::Summary(TrainSummary {
                train_runtime: 1.0,
                train_samples_per_second: 2.0,
                train_steps_per_second: 3.0,
                total_flos: 0.0,
                train_loss: 2.0,
                epoch: 1.0,
                step: 1,
            }),
        ];
        let text = serde_json::to_string(&h).unwrap();
        assert!(!text.contains("aux_loss"));
        let back: Vec<LogEntry> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, h);
        assert!(format_record(&rec(3, 1.0)).starts_with("{'loss': 1.0000, 'grad_norm': 1.5000"));
    }

    #[test]
    fn loss_curve_png_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let h: Vec<LogEntry> = (1..=20)
            .map(|s| LogEntry::Step(rec(s, 5.0 / s as f64)))
            .collect();
        write_loss_curve_png(&p, &h).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(write_loss_curve_png(&p, &[LogEntry::Step(rec(1, f64::NAN))]).is_err());
    }
}
