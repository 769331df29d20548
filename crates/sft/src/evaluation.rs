//! Held-out evaluation of the recipe: which rows are eval rows (`eval_dataset` or a seeded
//! `eval_split`), their eval prompts (the conversation up to the last assistant turn, with the
//! generation prompt), and one call that scores a model on them — teacher-forced eval loss plus
//! generation metrics (reasoning language, format, answers) from `gptoss-eval`.

use gptoss_eval::{EvalPrompt, LanguageDetector, ModelEval, TeacherForced};
use gptoss_harmony::hf::{render_ids, ChatTemplateOptions};
use gptoss_harmony::HarmonyTokenizer;
use gptoss_model::{GenerationConfig, GptOssForCausalLM};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::collate::Example;
use crate::config::TrainingConfig;
use crate::data::{load_source, LoadOptions, Row};
use crate::error::{Result, SftError};
use crate::preprocess::{chat_messages, preprocess, PreprocessOptions, Preprocessed};
use crate::trainer::evaluate::eval_loss;

/// Splits `n` rows into (train, eval) indices like `datasets.train_test_split(test_size)`:
/// a seeded permutation, the first `ceil(n · fraction)` (at least 1) for eval, the rest for
/// training, each side in ascending order. Disjoint and deterministic for a given `seed`.
///
/// # Errors
/// [`SftError::Config`] (`eval.eval_split`) when either side would be empty.
pub fn split_indices(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let n_eval = ((n as f64) * fraction).ceil() as usize;
    if n_eval == 0 || n_eval >= n {
        return Err(SftError::config(
            "eval.eval_split",
            format!("{fraction} of {n} rows leaves an empty train or eval side"),
        ));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6576_616c_5f73_706c);
    order.shuffle(&mut rng);
    let (mut eval, mut train) = (order[..n_eval].to_vec(), order[n_eval..].to_vec());
    eval.sort_unstable();
    train.sort_unstable();
    Ok((train, eval))
}

/// The eval rows of a run: the source rows (for prompts and references) and their tokenized
/// examples (for the eval loss).
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// Where the rows came from (`eval_dataset`, or `split of <dataset>`).
    pub source: String,
    /// The rows kept after tokenization (rows with no trained token are dropped, as in training).
    pub rows: Vec<Row>,
    /// Their tokenized examples, in the same order.
    pub examples: Vec<Example>,
}

/// The training examples and, when `eval_dataset` or `eval_split` is set, the eval set.
#[derive(Debug, Clone)]
pub struct TrainEvalData {
    /// Training examples (with the split's eval rows removed).
    pub train: Preprocessed,
    /// Held-out rows.
    pub eval: Option<EvalSet>,
}

fn eval_set(
    tok: &HarmonyTokenizer,
    rows: Vec<Row>,
    opts: &PreprocessOptions,
    source: String,
) -> Result<EvalSet> {
    let p = preprocess(tok, &rows, opts)?;
    let rows: Vec<Row> = p.row_indices.iter().map(|&i| rows[i].clone()).collect();
    if rows.is_empty() {
        return Err(SftError::Dataset(format!(
            "{source}: no eval row has a trained token"
        )));
    }
    Ok(EvalSet {
        source,
        rows,
        examples: p.examples,
    })
}

/// Loads the training dataset (`cfg.dataset`, default `default_dataset`) and the eval rows:
/// `eval_dataset` read like the training set, or `eval_split` held out of it before
/// tokenization. Both are tokenized with the training masks. A missing eval file is an error
/// here, before any training.
pub fn load_train_and_eval(
    cfg: &TrainingConfig,
    tok: &HarmonyTokenizer,
    default_dataset: &str,
) -> Result<TrainEvalData> {
    let spec = cfg.dataset.as_deref().unwrap_or(default_dataset);
    let load = LoadOptions {
        skip_malformed: cfg.skip_malformed_rows,
    };
    let ds = load_source(spec, load)?;
    crate::data::report_skipped(spec, &ds.skipped);
    let opts = cfg.preprocess_options();
    let (train_rows, eval) = match (&cfg.eval_dataset, cfg.eval_split) {
        (Some(e), _) => {
            let eds = load_source(e, load)?;
            crate::data::report_skipped(e, &eds.skipped);
            let set = eval_set(tok, eds.rows, &opts, e.clone())?;
            (ds.rows, Some(set))
        }
        (None, Some(f)) => {
            let (tr, ev) = split_indices(ds.rows.len(), f, cfg.seed)?;
            let eval_rows = ev.iter().map(|&i| ds.rows[i].clone()).collect();
            let set = eval_set(tok, eval_rows, &opts, format!("{f} split of {spec}"))?;
            (tr.iter().map(|&i| ds.rows[i].clone()).collect(), Some(set))
        }
        (None, None) => (ds.rows, None),
    };
    Ok(TrainEvalData {
        train: preprocess(tok, &train_rows, &opts)?,
        eval,
    })
}

/// The rows to evaluate on: the eval set of `cfg` (`eval_dataset`, or the same seeded
/// `eval_split` of `cfg.dataset` as its training run held out), else every row of `cfg.dataset`
/// (default `default_dataset`).
pub fn load_eval_set(
    cfg: &TrainingConfig,
    tok: &HarmonyTokenizer,
    default_dataset: &str,
) -> Result<EvalSet> {
    if let Some(set) = load_train_and_eval(cfg, tok, default_dataset)?.eval {
        return Ok(set);
    }
    let spec = cfg.dataset.as_deref().unwrap_or(default_dataset);
    let load = LoadOptions {
        skip_malformed: cfg.skip_malformed_rows,
    };
    let ds = load_source(spec, load)?;
    crate::data::report_skipped(spec, &ds.skipped);
    eval_set(tok, ds.rows, &cfg.preprocess_options(), spec.to_string())
}

/// The eval prompt of `row` (number `index`): its conversation up to (not including) the last
/// assistant turn, rendered with the chat template's generation prompt on `date`; the requested
/// language from the system (or developer) message's `reasoning language:` line, the expected
/// final language detected from the last user message, and `answer` as the reference.
///
/// # Errors
/// A `reasoning language:` line naming an unknown language ([`SftError::Eval`], naming the row).
pub fn eval_prompt(
    tok: &HarmonyTokenizer,
    row: &Row,
    index: usize,
    date: &str,
    detector: &LanguageDetector,
) -> Result<EvalPrompt> {
    let messages = chat_messages(row);
    let cut = row
        .messages
        .iter()
        .rposition(|m| m.role == "assistant")
        .unwrap_or(messages.len());
    let opts = ChatTemplateOptions::new(date).with_generation_prompt(true);
    let prompt_ids = render_ids(tok, &messages[..cut], &opts)?;
    let system = row.messages[..cut]
        .iter()
        .find(|m| m.role == "system" || m.role == "developer")
        .map(|m| m.content.as_str());
    let requested_language = match system {
        Some(s) => gptoss_eval::reasoning_language(s)
            .map_err(|e| SftError::Dataset(format!("eval row {index}: system message: {e}")))?,
        None => None,
    };
    let user = row.messages[..cut].iter().rev().find(|m| m.role == "user");
    Ok(EvalPrompt {
        row: index,
        prompt_ids,
        requested_language,
        expected_final_language: user.and_then(|m| detector.detect(&m.content)),
        reference: row.answer.clone(),
    })
}

/// What [`evaluate_model`] measures.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Rows per eval-loss batch.
    pub loss_batch_size: usize,
    /// Prompts generated for at once.
    pub generate_batch_size: usize,
    /// Sampling settings of the generations.
    pub generation: GenerationConfig,
    /// Generate for at most this many rows (all when `None`).
    pub max_generate_rows: Option<usize>,
    /// Chat-template date of the prompts.
    pub date: String,
    /// Padding token of the loss batches.
    pub pad_token_id: u32,
    /// LM-head rows at once in the loss.
    pub lm_head_chunk: usize,
}

/// Generates for the first `opts.max_generate_rows` rows of `set` with `model` (whatever adapters
/// are installed on it) and scores the outputs under `label` (no eval loss).
/// `on_progress(done, total)` reports generation progress.
pub fn generate_and_score(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    set: &EvalSet,
    label: &str,
    opts: &EvalOptions,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<ModelEval> {
    let detector = gptoss_eval::default_detector();
    let n = opts
        .max_generate_rows
        .unwrap_or(set.rows.len())
        .min(set.rows.len());
    let prompts = set.rows[..n]
        .iter()
        .enumerate()
        .map(|(i, r)| eval_prompt(tok, r, i, &opts.date, detector))
        .collect::<Result<Vec<_>>>()?;
    let records = gptoss_eval::generate_records(
        model,
        tok,
        &prompts,
        &opts.generation,
        opts.generate_batch_size,
        on_progress,
    )?;
    Ok(gptoss_eval::evaluate(label, records, detector))
}

/// [`generate_and_score`] plus the teacher-forced eval loss over all rows of `set`.
pub fn evaluate_model(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    set: &EvalSet,
    label: &str,
    opts: &EvalOptions,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<ModelEval> {
    let mut eval = generate_and_score(model, tok, set, label, opts, on_progress)?;
    let l = eval_loss(
        model,
        &set.examples,
        opts.loss_batch_size,
        opts.pad_token_id,
        opts.lm_head_chunk,
        model.device(),
    )?;
    eval.summary.eval_loss = Some(TeacherForced::new(l.loss, l.tokens));
    Ok(eval)
}

/// Evaluates `model` as it is now (base, or with the adapters installed) on `set` under `label`
/// with the run's [`EvalOptions`] (`crate::trainer::pipeline::eval_options`): eval loss over
/// every row, generations of at most `max_new_tokens` for the first `rows` rows, with a
/// `generating label: done/total` progress line on stderr.
pub fn evaluate_now(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    cfg: &TrainingConfig,
    set: &EvalSet,
    label: &str,
    rows: usize,
    max_new_tokens: usize,
) -> Result<ModelEval> {
    let pad = model.config().pad_token_id.unwrap_or(199_999);
    let options = crate::trainer::TrainerOptions {
        pad_token_id: pad,
        ..Default::default()
    };
    let mut opts = crate::trainer::pipeline::eval_options(cfg, &options, Some(rows));
    opts.generation.max_new_tokens = max_new_tokens;
    let mut progress = |done: usize, total: usize| {
        eprint!("\revaluating {label}: generated {done}/{total} rows");
        if done == total {
            eprintln!();
        }
    };
    evaluate_model(model, tok, set, label, &opts, &mut progress)
}
