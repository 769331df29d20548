//! Generation over eval rows: prompts in batches through the model's KV-cache generator, each
//! output checked with the Harmony parser into a [`RowRecord`] ready for [`crate::evaluate`].
//!
//! The caller renders the prompts (system `reasoning language: X` + user, with the template's
//! generation prompt) and says what each row expects; this module only generates and parses.

use std::collections::BTreeMap;

use gptoss_harmony::HarmonyTokenizer;
use gptoss_model::{generate, GenerationConfig, GptOssForCausalLM};

use crate::error::{EvalError, Result};
use crate::format::check_completion;
use crate::language::Language;
use crate::metrics::{EvalSummary, RowRecord};

/// One eval row ready to generate for.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPrompt {
    /// Row number in the eval set (0-based), carried into the record.
    pub row: usize,
    /// Prompt token ids, ending with the generation prompt `<|start|>assistant`.
    pub prompt_ids: Vec<u32>,
    /// The language the system prompt asks the reasoning to be in.
    pub requested_language: Option<Language>,
    /// The language the final answer should be in (the user's).
    pub expected_final_language: Option<Language>,
    /// The reference answer (GSM8K `#### n` or a plain answer), if any.
    pub reference: Option<String>,
}

/// Generates for every prompt, `batch_size` prompts at a time (left-padded, each row stopping
/// at its own stop token), and parses each output. `on_batch(done, total)` is called after each
/// batch (progress).
pub fn generate_records(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    prompts: &[EvalPrompt],
    cfg: &GenerationConfig,
    batch_size: usize,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<Vec<RowRecord>> {
    let mut records = Vec::with_capacity(prompts.len());
    for batch in prompts.chunks(batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = batch.iter().map(|p| p.prompt_ids.clone()).collect();
        let first = batch.first().map_or(0, |p| p.row);
        let outputs = generate(model, &ids, cfg).map_err(|e| EvalError::Invalid {
            context: format!("generating for eval rows from {first}"),
            expected: "a successful generation".into(),
            found: e.to_string(),
        })?;
        for (p, out) in batch.iter().zip(outputs) {
            records.push(
                RowRecord::new(p.row, check_completion(tok, &out))
                    .with_requested_language(p.requested_language)
                    .with_expected_final_language(p.expected_final_language)
                    .with_reference(p.reference.clone()),
            );
        }
        on_batch(records.len(), prompts.len());
    }
    Ok(records)
}

/// The headline generation metrics of a summary as flat `eval_*` keys for a training log:
/// `eval_reasoning_language_accuracy`, `eval_final_language_accuracy`, `eval_format_valid`,
/// `eval_generated_tokens_mean`, and `eval_answer_accuracy` when some row had a reference.
/// A share whose denominator is 0 is left out.
pub fn log_metrics(summary: &EvalSummary) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, p: &crate::Proportion| {
        if p.total > 0 {
            m.insert(k.to_string(), p.rate);
        }
    };
    put(
        "eval_reasoning_language_accuracy",
        &summary.reasoning_language.overall,
    );
    put(
        "eval_final_language_accuracy",
        &summary.final_language.overall,
    );
    put("eval_format_valid", &summary.format.valid);
    put("eval_answer_accuracy", &summary.answer_accuracy);
    if summary.lengths.generated_tokens.count > 0 {
        m.insert(
            "eval_generated_tokens_mean".into(),
            summary.lengths.generated_tokens.mean,
        );
    }
    m
}
