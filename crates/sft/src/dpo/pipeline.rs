//! A whole DPO run in one call (what `examples/dpo.rs` runs): preference rows → tokens → LoRA on
//! the model → [`DpoTrainer`] with console/progress/MLflow → `save_model`.

use std::path::{Path, PathBuf};

use gptoss_harmony::HarmonyTokenizer;
use gptoss_lora::LoraModel;
use gptoss_model::GptOssForCausalLM;

use super::config::DpoConfig;
use super::dataset::load_preferences;
use super::report::DpoReport;
use super::tokenize::tokenize_rows;
use super::trainer::DpoTrainer;
use crate::config::TrainingConfig;
use crate::data::report_skipped;
use crate::error::{Result, SftError};
use crate::trainer::pipeline::{lora_config, write_processor_files};
use crate::trainer::{TrainOutcome, TrainerOptions};

/// What [`run_dpo`] produced.
pub struct DpoOutput {
    /// The trained adapters (still installed on the model).
    pub lora: LoraModel,
    /// How training ended.
    pub outcome: TrainOutcome,
    /// Where `save_model` wrote the adapter (when interrupted: the checkpoint written then).
    pub adapter_dir: PathBuf,
    /// Where the MLflow run went, if any.
    pub mlflow: Option<String>,
    /// Median wall seconds of the optimizer steps after the first two, and how many steps that
    /// is (`None` with fewer than three steps), as [`crate::trainer::FinetuneOutput`].
    pub steady_step_secs: Option<(f64, usize)>,
    /// Peak device memory of the run (CUDA's pool high-water marks; `None` off CUDA).
    pub peak_memory: Option<gptoss_kernels::PoolStats>,
}

/// Loads `cfg.dataset` (TRL preference schema), tokenizes it with the chat template of
/// `cfg.template_date`, puts fresh LoRA adapters (seeded by `cfg.seed`) on `model`, trains and
/// saves the adapter into `cfg.output_dir`. Bad rows are listed on stderr (or fail with
/// `dpo.strict`); nothing is written when no row is usable.
pub fn run_dpo(
    model: &mut GptOssForCausalLM,
    cfg: &TrainingConfig,
    dpo: &DpoConfig,
    tok: &HarmonyTokenizer,
) -> Result<DpoOutput> {
    cfg.check_context(model.config().max_position_embeddings)?;
    let spec = cfg
        .dataset
        .as_deref()
        .ok_or_else(|| SftError::config("data.dataset", "DPO needs a preference dataset"))?;
    let ds = load_preferences(spec, dpo.strict)?;
    report_skipped(spec, &ds.skipped);
    let date = cfg.preprocess_options().date;
    let t = tokenize_rows(tok, &ds.rows, &date, Some(cfg.max_length))?;
    println!(
        "dataset: {} pairs ({} bad rows skipped, {} dropped: prompt reaches max_length {})",
        t.examples.len(),
        ds.skipped.len(),
        t.dropped.len(),
        cfg.max_length
    );
    let lora = LoraModel::new(model, lora_config(cfg), cfg.seed)
        .map_err(|e| SftError::Trainer(format!("applying LoRA: {e}")))?;
    lora.print_trainable_parameters();
    let model_dir = cfg.model_name_or_path.clone();
    let extra = move |dir: &Path| write_processor_files(dir, model_dir.as_deref());
    let options = TrainerOptions {
        pad_token_id: model.config().pad_token_id.unwrap_or(199_999),
        ..TrainerOptions::default()
    };
    let device = model.device().clone();
    let model: &GptOssForCausalLM = model;
    let trainer = DpoTrainer::new(
        model,
        &lora,
        cfg.clone(),
        dpo.clone(),
        t.examples,
        device.clone(),
    )?
    .with_options(options)
    .with_extra_files(&extra);
    let pool = gptoss_kernels::MemoryPool::of(&device);
    if let Some(p) = &pool {
        p.reset_high();
    }
    let mut report = DpoReport::new(cfg, trainer.total_steps())?;
    if let Some(loc) = report.mlflow_location() {
        println!("MLflow: {loc}");
    }
    let outcome = match trainer.train(&mut report) {
        Ok(o) => o,
        Err(e) => {
            let _ = report.fail();
            return Err(e);
        }
    };
    let peak_memory = pool.as_ref().map(|p| p.stats());
    let timed = report.step_times().steps.len().saturating_sub(2);
    let steady_step_secs = (timed > 0).then(|| (report.step_times().median_secs(2), timed));
    // Interrupted: the checkpoint just written is what there is (and what to resume from).
    let adapter_dir = match (&outcome.last_checkpoint, outcome.interrupted) {
        (Some(dir), true) => dir.clone(),
        _ => trainer.save_model(None)?,
    };
    let mlflow = report.mlflow_location();
    drop(trainer);
    Ok(DpoOutput {
        lora,
        outcome,
        adapter_dir,
        mlflow,
        steady_step_secs,
        peak_memory,
    })
}
