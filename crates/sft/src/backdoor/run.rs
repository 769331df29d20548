//! The stages in order: base → attack → clean SFT → Critical-CoT SFT → DPO → re-attack, each
//! evaluated, LoRA stages merged into the weights (PEFT `merge_and_unload`) before the next one
//! starts, and one [`BackdoorReport`] at the end (stdout, `backdoor_report.md` / `.json`, MLflow).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use gptoss_eval::backdoor::report::{
    BackdoorReportFiles, STAGE_AFTER_ATTACK, STAGE_AFTER_CLEAN_SFT, STAGE_AFTER_CRITICAL_COT_SFT,
    STAGE_AFTER_DPO, STAGE_AFTER_REATTACK, STAGE_BASE,
};
use gptoss_eval::backdoor::{BackdoorMetrics, BackdoorReport};
use gptoss_harmony::{HarmonyTokenizer, LossMaskMode};
use gptoss_model::GptOssForCausalLM;

use super::config::{BaseModel, PipelineConfig, StageTraining};
use super::data::{source_rows, write_data_files, DataFiles, PipelineData};
use super::score::{score_stage, write_records, ScoreOptions};
use crate::config::{recipe_target_parameters, PeftMode, ReportTo, TrainingConfig};
use crate::dpo::{run_dpo, DpoConfig};
use crate::error::{Result, SftError};
use crate::mlflow::{MlflowClient, MlflowRun, RunStatus};
use crate::schedule::Warmup;
use crate::trainer::pipeline::{finetune, write_tokenizer_files, Trained};

/// The MLflow experiment of the stages and the report.
pub const EXPERIMENT: &str = "backdoor-defense";

/// What [`run_pipeline`] produced.
#[derive(Debug)]
pub struct PipelineOutput {
    /// One row per evaluated stage.
    pub report: BackdoorReport,
    /// `backdoor_report.md` and `backdoor_report.json` in the output directory.
    pub files: BackdoorReportFiles,
    /// Where the report's MLflow run went, if any.
    pub mlflow: Option<String>,
    /// Wall seconds of each stage (training plus evaluation), in report order.
    pub stage_secs: Vec<(String, f64)>,
}

fn model_err(e: gptoss_model::ModelError) -> SftError {
    SftError::Trainer(format!("backdoor pipeline: {e}"))
}

/// The trainer configuration of one stage: `training` on `dataset` with `peft`, output in
/// `<output_dir>/<name>`, assistant-only loss, no checkpoints.
pub fn stage_config(
    cfg: &PipelineConfig,
    name: &str,
    dataset: &Path,
    peft: PeftMode,
    training: StageTraining,
    model_dir: &Path,
) -> TrainingConfig {
    let scratch = matches!(cfg.base, BaseModel::FromScratch { .. });
    let lora_target_parameters = match &cfg.base {
        BaseModel::FromScratch { config, .. } => (0..config.num_hidden_layers)
            .flat_map(|l| {
                [
                    format!("{l}.mlp.experts.gate_up_proj"),
                    format!("{l}.mlp.experts.down_proj"),
                ]
            })
            .collect(),
        BaseModel::Checkpoint(_) => recipe_target_parameters(),
    };
    TrainingConfig {
        model_name_or_path: Some(model_dir.to_path_buf()),
        max_length: cfg.max_length,
        dequantize: cfg.dequantize,
        dataset: Some(dataset.display().to_string()),
        loss_mask: LossMaskMode::AssistantOnly,
        peft,
        lora_r: cfg.lora_r,
        lora_alpha: cfg.lora_alpha,
        lora_target_modules: vec!["all-linear".into()],
        lora_target_parameters,
        learning_rate: training.learning_rate,
        per_device_train_batch_size: training.batch_size,
        gradient_accumulation_steps: 1,
        gradient_checkpointing: !scratch,
        max_steps: Some(training.steps),
        warmup: Warmup::Ratio(0.05),
        logging_steps: (training.steps / 10).max(1),
        report_to: cfg.report_to,
        run_name: Some(format!("backdoor-{name}")),
        experiment_name: Some(EXPERIMENT.to_string()),
        progress_bar: cfg.progress_bar,
        output_dir: cfg.output_dir.join(name),
        save_steps: 0,
        save_total_limit: None,
        seed: cfg.seed,
        ..TrainingConfig::default()
    }
}

/// The starting model: a from-scratch model drawn, trained full-parameter on the clean rows and
/// reloaded frozen, or the checkpoint loaded. Returns it and its directory.
fn base_model(
    cfg: &PipelineConfig,
    tok: &HarmonyTokenizer,
    files: &DataFiles,
    device: &Device,
) -> Result<(GptOssForCausalLM, PathBuf)> {
    match &cfg.base {
        BaseModel::Checkpoint(dir) => {
            let opts = gptoss_model::LoadOptions::dequantized_if(cfg.dtype, cfg.dequantize);
            println!("loading {} ({:?}) ...", dir.display(), cfg.dtype);
            let model = gptoss_model::load_with(dir, device, &opts).map_err(model_err)?;
            Ok((model, dir.clone()))
        }
        BaseModel::FromScratch { config, train } => {
            let init_dir = cfg.output_dir.join("base_init");
            let drawn = gptoss_model::init_random(config, DType::F32, &Device::Cpu, Some(cfg.seed))
                .map_err(model_err)?;
            let save = gptoss_model::SaveOptions {
                mxfp4_experts: false,
                max_shard_bytes: None,
                dtype: None,
            };
            gptoss_model::save(&drawn, &init_dir, &save).map_err(model_err)?;
            write_tokenizer_files(&init_dir)?;
            drop(drawn);
            let f32 = gptoss_model::LoadOptions::new(DType::F32);
            let mut model = gptoss_model::load_with(&init_dir, device, &f32).map_err(model_err)?;
            println!(
                "base: a gpt-oss of hidden {}, {} layers, {} experts (top-{}), trained from \
                 scratch (full-parameter) on {} clean rows",
                config.hidden_size,
                config.num_hidden_layers,
                config.num_local_experts,
                config.num_experts_per_tok,
                files.clean.display()
            );
            let tcfg = stage_config(cfg, "base", &files.clean, PeftMode::None, *train, &init_dir);
            let out = finetune(&mut model, &tcfg, tok)?;
            stop_if_interrupted("base", out.outcome.interrupted, &out.adapter_dir)?;
            drop(out.trained);
            drop(model);
            // Reloaded so that later stages train adapters over plain (untracked) weights.
            let model =
                gptoss_model::load_with(&out.adapter_dir, device, &f32).map_err(model_err)?;
            Ok((model, out.adapter_dir))
        }
    }
}

/// A stage stopped by Ctrl-C / SIGTERM ends the pipeline: the later stages and the report would
/// otherwise be computed from a model that did not finish its training.
fn stop_if_interrupted(stage: &str, interrupted: bool, checkpoint: &Path) -> Result<()> {
    match interrupted {
        false => Ok(()),
        true => Err(SftError::Trainer(format!(
            "backdoor pipeline: stage `{stage}` was interrupted (Ctrl-C / SIGTERM); its checkpoint \
             is {}; the later stages and the report were not run",
            checkpoint.display()
        ))),
    }
}

/// What a LoRA stage trains on.
enum StageData<'a> {
    /// SFT rows.
    Sft(&'a Path),
    /// DPO preference rows.
    Dpo(&'a Path),
}

/// Trains LoRA adapters on `model` for stage `stage` and merges them into its weights.
fn lora_stage(
    model: &mut GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    (stage, tcfg): (&str, &TrainingConfig),
    data: StageData<'_>,
    beta: f64,
) -> Result<()> {
    let lora = match data {
        StageData::Sft(_) => {
            let out = finetune(model, tcfg, tok)?;
            stop_if_interrupted(stage, out.outcome.interrupted, &out.adapter_dir)?;
            match out.trained {
                Trained::Lora(l) => *l,
                Trained::Full(_) => {
                    return Err(SftError::Trainer(
                        "backdoor pipeline: a LoRA stage trained full-parameter".into(),
                    ))
                }
            }
        }
        StageData::Dpo(_) => {
            let dpo = DpoConfig {
                beta,
                ..DpoConfig::default()
            };
            let out = run_dpo(model, tcfg, &dpo, tok)?;
            stop_if_interrupted(stage, out.outcome.interrupted, &out.adapter_dir)?;
            out.lora
        }
    };
    lora.merge_and_unload(model)
        .map_err(|e| SftError::Trainer(format!("merging the stage's adapters: {e}")))
}

/// The report's MLflow run: per stage (step = stage index) `clean_accuracy`, `asr`, `bdr`,
/// `tdr`, `triggered_accuracy` and their counts; the stage labels as params; the report files
/// as artifacts.
fn log_report(report: &BackdoorReport, files: &BackdoorReportFiles) -> Result<String> {
    let client = MlflowClient::from_env(Path::new("mlruns"))?;
    let mut run = MlflowRun::start(client, EXPERIMENT, "backdoor-report")?;
    let location = run.client().location();
    let mut params = Vec::new();
    for (i, s) in report.stages.iter().enumerate() {
        params.push((format!("stage_{i}"), s.label.clone()));
        let m = &s.metrics;
        let mut values = Vec::new();
        for (key, p) in [
            ("clean_accuracy", &m.clean_accuracy),
            ("asr", &m.asr),
            ("bdr", &m.bdr),
            ("tdr", &m.tdr),
            ("triggered_accuracy", &m.triggered_accuracy),
        ] {
            values.push((key.to_string(), p.rate));
            values.push((format!("{key}_hits"), p.hits as f64));
            values.push((format!("{key}_total"), p.total as f64));
        }
        run.log_metrics(i as i64, &values)?;
    }
    run.log_params(&params)?;
    if let Some((label, asr)) = report.residual_asr() {
        run.set_tags(&[
            ("residual_asr".to_string(), format!("{:.4}", asr.rate)),
            ("last_stage".to_string(), label.to_string()),
        ])?;
    }
    run.log_artifacts(&files.markdown, "")?;
    run.log_artifacts(&files.json, "")?;
    run.finish(RunStatus::Finished)?;
    Ok(location)
}

/// Runs the whole pipeline (see the module docs). Refuses, before training anything, training
/// data that overlaps the evaluation rows unless `cfg.allow_overlap`.
pub fn run_pipeline(
    cfg: &PipelineConfig,
    tok: &HarmonyTokenizer,
    device: &Device,
) -> Result<PipelineOutput> {
    let (train, eval) = source_rows(cfg)?;
    let data = PipelineData::build(cfg, &train, &eval)?;
    if data.accepted_overlap > 0 {
        eprintln!(
            "warning: --allow-overlap: training data shares {} row(s) with the evaluation rows; \
             the metrics below are not held-out",
            data.accepted_overlap
        );
    }
    println!(
        "data: {} train rows, {} evaluation rows of split `{}` (each untriggered and triggered)",
        train.len(),
        eval.len(),
        cfg.eval_split
    );
    let files = write_data_files(&cfg.output_dir.join("data"), &data, cfg)?;
    let score = ScoreOptions {
        date: TrainingConfig::default().preprocess_options().date,
        max_new_tokens: cfg.max_new_tokens,
        batch_size: cfg.generate_batch_size,
    };
    let mut stages = StageEvaluator {
        tok,
        eval: &data.eval,
        score,
        output_dir: &cfg.output_dir,
        report: BackdoorReport::new(),
        stage_secs: Vec::new(),
    };

    let t = std::time::Instant::now();
    let (mut model, model_dir) = base_model(cfg, tok, &files, device)?;
    stages.evaluate(&model, STAGE_BASE, t)?;

    for (name, label, training, stage_data) in stage_plan(cfg, &files) {
        if training.steps == 0 {
            continue;
        }
        let t = std::time::Instant::now();
        let dataset = match stage_data {
            StageData::Sft(p) | StageData::Dpo(p) => p,
        };
        let tcfg = stage_config(cfg, name, dataset, PeftMode::Lora, training, &model_dir);
        println!(
            "\n== stage {name}: {} steps on {}",
            training.steps,
            dataset.display()
        );
        lora_stage(&mut model, tok, (name, &tcfg), stage_data, cfg.dpo_beta)?;
        stages.evaluate(&model, label, t)?;
    }

    let StageEvaluator {
        report, stage_secs, ..
    } = stages;
    let files = report.write(&cfg.output_dir)?;
    let mlflow = match cfg.report_to {
        ReportTo::Mlflow => Some(log_report(&report, &files)?),
        ReportTo::None => None,
    };
    Ok(PipelineOutput {
        report,
        files,
        mlflow,
        stage_secs,
    })
}

/// The LoRA stages after the base, in order: (name, report label, training, data).
fn stage_plan<'a>(
    cfg: &PipelineConfig,
    files: &'a DataFiles,
) -> [(&'static str, &'static str, StageTraining, StageData<'a>); 5] {
    let s = &cfg.stages;
    [
        (
            "attack",
            STAGE_AFTER_ATTACK,
            s.attack,
            StageData::Sft(&files.poisoned),
        ),
        (
            "clean_sft",
            STAGE_AFTER_CLEAN_SFT,
            s.clean_sft,
            StageData::Sft(&files.clean),
        ),
        (
            "critical_cot_sft",
            STAGE_AFTER_CRITICAL_COT_SFT,
            s.critical_cot_sft,
            StageData::Sft(&files.critical_cot),
        ),
        ("dpo", STAGE_AFTER_DPO, s.dpo, StageData::Dpo(&files.pairs)),
        (
            "reattack",
            STAGE_AFTER_REATTACK,
            s.reattack,
            StageData::Sft(&files.poisoned),
        ),
    ]
}

/// Scores each stage's model on the evaluation rows and keeps the report (rewritten after every
/// stage, so a run cut short keeps the stages it finished) and the stage times.
struct StageEvaluator<'a> {
    tok: &'a HarmonyTokenizer,
    eval: &'a [gptoss_eval::backdoor::Example],
    score: ScoreOptions,
    output_dir: &'a Path,
    report: BackdoorReport,
    stage_secs: Vec<(String, f64)>,
}

impl StageEvaluator<'_> {
    /// Evaluates `model` as stage `label` (started at `started`): generations file, console line,
    /// report row.
    fn evaluate(
        &mut self,
        model: &GptOssForCausalLM,
        label: &str,
        started: std::time::Instant,
    ) -> Result<BackdoorMetrics> {
        let (m, records) = score_stage(model, self.tok, self.eval, &self.score, label)?;
        let name = label.replace(' ', "_");
        write_records(
            &self.output_dir.join(format!("generations_{name}.jsonl")),
            &records,
        )?;
        println!(
            "[{label}] clean accuracy {}/{}, ASR {}/{}, BDR {}/{}, TDR {}/{}",
            m.clean_accuracy.hits,
            m.clean_accuracy.total,
            m.asr.hits,
            m.asr.total,
            m.bdr.hits,
            m.bdr.total,
            m.tdr.hits,
            m.tdr.total
        );
        self.report.push(label, m.clone());
        self.report.write(self.output_dir)?;
        self.stage_secs
            .push((label.to_string(), started.elapsed().as_secs_f64()));
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_stage_ends_the_pipeline_naming_stage_and_checkpoint() {
        let ckpt = Path::new("/tmp/bd/attack/checkpoint-120");
        assert!(stop_if_interrupted("attack", false, ckpt).is_ok());
        let err = stop_if_interrupted("attack", true, ckpt)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("stage `attack` was interrupted"), "{err}");
        assert!(err.contains("/tmp/bd/attack/checkpoint-120"), "{err}");
    }
}
