//! Generation over eval rows: prompts through the model's continuous-batching generator, each
//! output checked with the Harmony parser into a [`RowRecord`] ready for [`crate::evaluate`].
//!
//! The caller renders the prompts (system `reasoning language: X` + user, with the template's
//! generation prompt) and says what each row expects; this module only generates and parses.

use std::collections::BTreeMap;

use gptoss_harmony::HarmonyTokenizer;
use gptoss_model::{
    generate_batch, BatchOptions, GenerationConfig, GenerationEvent, GenerationRequest,
    GptOssForCausalLM,
};

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

/// Generates for every prompt with continuous batching ([`gptoss_model::generate_batch`]: up to
/// `batch_size` sequences decode together, a finished one is replaced by the next prompt at once),
/// and parses each output. Every row samples with its own seed, `cfg.seed + row`, so its output does
/// not depend on the batch it ran in. `on_progress(done, total)` is called as rows finish.
pub fn generate_records(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    prompts: &[EvalPrompt],
    cfg: &GenerationConfig,
    batch_size: usize,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<RowRecord>> {
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .map(|p| GenerationRequest {
            prompt: p.prompt_ids.clone(),
            config: GenerationConfig {
                seed: cfg.seed.wrapping_add(p.row as u64),
                ..cfg.clone()
            },
        })
        .collect();
    let opts = BatchOptions {
        max_batch: batch_size.max(1),
        pad_token_id: cfg.pad_token_id,
    };
    let mut done = 0;
    let outputs = generate_batch(model, &requests, &opts, &mut |e| {
        if let GenerationEvent::Finished { .. } = e {
            done += 1;
            on_progress(done, prompts.len());
        }
    })
    .map_err(|e| EvalError::Invalid {
        context: format!("generating for {} eval rows", prompts.len()),
        expected: "a successful generation".into(),
        found: e.to_string(),
    })?;
    Ok(prompts
        .iter()
        .zip(outputs)
        .map(|(p, out)| {
            RowRecord::new(p.row, check_completion(tok, &out.tokens))
                .with_requested_language(p.requested_language)
                .with_expected_final_language(p.expected_final_language)
                .with_reference(p.reference.clone())
        })
        .collect())
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
