//! Scoring one stage: the evaluation examples rendered as chat prompts, greedy generation with
//! the model as it is now, each output judged against its provenance (clean answer, backdoor
//! target, trigger phrase) into [`BackdoorMetrics`].

use std::path::Path;

use gptoss_eval::backdoor::render::{sft_record, to_jsonl};
use gptoss_eval::backdoor::RenderOptions;
use gptoss_eval::backdoor::{backdoor_metrics, BackdoorMetrics, BackdoorRecord, Example};
use gptoss_harmony::HarmonyTokenizer;
use gptoss_model::{GenerationConfig, GptOssForCausalLM};

use crate::data::Row;
use crate::error::{Result, SftError};
use crate::evaluation::eval_prompt;

/// How a stage is scored.
#[derive(Clone, Debug)]
pub struct ScoreOptions {
    /// Chat-template date of the prompts (the training date, so prompts match training).
    pub date: String,
    /// Most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Prompts generated for at once.
    pub batch_size: usize,
}

/// The trainer row of `example` (the rendered SFT record; its assistant turn is what the prompt
/// stops before).
pub fn example_row(example: &Example, index: usize) -> Result<Row> {
    let rec = sft_record(example, &RenderOptions::default());
    let value = serde_json::to_value(&rec)
        .map_err(|e| SftError::Dataset(format!("evaluation row {index}: {e}")))?;
    Row::from_json(value).map_err(|e| SftError::Dataset(format!("evaluation row {index}: {e}")))
}

/// Generates greedily for every example of `eval` with `model` and judges each output; returns
/// the stage's metrics and the per-row records. `label` names the stage in the progress line
/// (stderr).
pub fn score_stage(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    eval: &[Example],
    opts: &ScoreOptions,
    label: &str,
) -> Result<(BackdoorMetrics, Vec<BackdoorRecord>)> {
    let detector = gptoss_eval::default_detector();
    let prompts = eval
        .iter()
        .enumerate()
        .map(|(i, e)| eval_prompt(tok, &example_row(e, i)?, i, &opts.date, detector))
        .collect::<Result<Vec<_>>>()?;
    let generation = GenerationConfig {
        max_new_tokens: opts.max_new_tokens,
        temperature: 0.0,
        pad_token_id: model.config().pad_token_id.unwrap_or(199_999),
        ..GenerationConfig::default()
    };
    let mut progress = |done: usize, total: usize| {
        eprint!("\revaluating {label}: generated {done}/{total} prompts");
        if done == total {
            eprintln!();
        }
    };
    let rows = gptoss_eval::generate_records(
        model,
        tok,
        &prompts,
        &generation,
        opts.batch_size,
        &mut progress,
    )?;
    let records: Vec<BackdoorRecord> = eval
        .iter()
        .zip(&rows)
        .map(|(e, r)| BackdoorRecord::from_completion(&e.provenance, &r.completion))
        .collect();
    Ok((backdoor_metrics(&records), records))
}

/// Writes `records` as JSON lines to `path` (what each stage generated, for inspection).
pub fn write_records(path: &Path, records: &[BackdoorRecord]) -> Result<()> {
    let text = to_jsonl(records, path)?;
    crate::atomic::write_bytes(path, text.as_bytes())
}
