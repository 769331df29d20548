//! The whole SFT recipe in one call, as the cookbook runs it: dataset → harmony HF-template
//! tokens → LoRA on the model → [`Trainer`] with console/progress/MLflow → `save_model`.

use std::path::{Path, PathBuf};

use gptoss_harmony::HarmonyTokenizer;
use gptoss_lora::{LoraConfig, LoraModel, TargetModules};
use gptoss_model::GptOssForCausalLM;

use super::full::FullParameters;
use super::report::StandardObserver;
use super::run::{TrainOutcome, Trainer, TrainerOptions};
use crate::config::{PeftMode, TrainingConfig};
use crate::error::{Result, SftError};
use crate::evaluation::{
    generate_and_score, load_train_and_eval, EvalOptions, EvalSet, TrainEvalData,
};

/// The sample dataset bundled with this crate (132 rows, 6 reasoning languages).
pub const BUNDLED_DATASET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/multilingual_thinking_sample.jsonl"
);

/// The PEFT [`LoraConfig`] of a [`TrainingConfig`] (`["all-linear"]` → the shorthand).
pub fn lora_config(cfg: &TrainingConfig) -> LoraConfig {
    let modules = &cfg.lora_target_modules;
    let target_modules = if modules.is_empty() {
        None
    } else if modules.len() == 1 && modules[0].eq_ignore_ascii_case("all-linear") {
        Some(TargetModules::all_linear())
    } else {
        Some(TargetModules::List(modules.clone()))
    };
    LoraConfig {
        r: cfg.lora_r,
        lora_alpha: cfg.lora_alpha,
        lora_dropout: cfg.lora_dropout,
        target_modules,
        target_parameters: (!cfg.lora_target_parameters.is_empty())
            .then(|| cfg.lora_target_parameters.clone()),
        base_model_name_or_path: cfg
            .model_name_or_path
            .as_ref()
            .map(|p| p.display().to_string()),
        ..LoraConfig::default()
    }
}

/// Writes the processor files TRL's `save_model` writes next to the adapter:
/// `chat_template.jinja`, and the tokenizer files of `model_dir` when it has them
/// (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`).
pub fn write_processor_files(dir: &Path, model_dir: Option<&Path>) -> Result<()> {
    crate::atomic::write_bytes(
        &dir.join("chat_template.jinja"),
        gptoss_harmony::hf::CHAT_TEMPLATE.as_bytes(),
    )?;
    if let Some(m) = model_dir {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let src = m.join(f);
            if src.is_file() {
                let bytes = std::fs::read(&src).map_err(|e| SftError::io(&src, e))?;
                crate::atomic::write_bytes(&dir.join(f), &bytes)?;
            }
        }
    }
    Ok(())
}

/// The tokenizer files of a gpt-oss checkpoint, written into `dir`: `chat_template.jinja`,
/// `tokenizer_config.json` (added tokens, bos `<|startoftext|>`, eos `<|return|>`, pad
/// `<|endoftext|>`, `PreTrainedTokenizerFast`) and `special_tokens_map.json`, as the released
/// checkpoints ship them (used by `make_checkpoint`).
pub fn write_tokenizer_files(dir: &Path) -> Result<()> {
    crate::atomic::write_bytes(
        &dir.join("chat_template.jinja"),
        gptoss_harmony::hf::CHAT_TEMPLATE.as_bytes(),
    )?;
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let mut specials: Vec<(u32, &str)> = tok
        .special_tokens()
        .into_iter()
        .filter_map(|t| tok.special_token_id(t).map(|id| (id, t)))
        .collect();
    specials.sort();
    let mut added = serde_json::Map::new();
    for (id, text) in specials {
        added.insert(
            id.to_string(),
            serde_json::json!({
                "content": text, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true
            }),
        );
    }
    let config = serde_json::json!({
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|return|>",
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1e30,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    crate::atomic::write_json(&dir.join("tokenizer_config.json"), &config)?;
    let map = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>"
    });
    crate::atomic::write_json(&dir.join("special_tokens_map.json"), &map)
}

/// The [`EvalOptions`] of a run: loss batches of `per_device_eval_batch_size`, generation with
/// the cookbook's sampling (seeded by `seed`) for at most `max_rows` rows, 4 prompts at a time.
pub fn eval_options(
    cfg: &TrainingConfig,
    options: &TrainerOptions,
    max_rows: Option<usize>,
) -> EvalOptions {
    EvalOptions {
        loss_batch_size: cfg.per_device_eval_batch_size,
        generate_batch_size: 4,
        generation: gptoss_model::GenerationConfig {
            seed: cfg.seed,
            pad_token_id: options.pad_token_id,
            ..super::chat::cookbook_generation_config()
        },
        max_generate_rows: max_rows,
        date: cfg.preprocess_options().date,
        pad_token_id: options.pad_token_id,
        lm_head_chunk: options.lm_head_chunk,
    }
}

/// What a run trained: LoRA adapters installed on the model, or the model's own parameters.
pub enum Trained {
    /// `peft: lora`: the adapters (installed on the model).
    Lora(Box<LoraModel>),
    /// `peft: none`: the model's parameters (the model computes with them).
    Full(Box<FullParameters>),
}

impl Trained {
    /// Per `cfg.peft`: LoRA from [`lora_config`] (seeded by `cfg.seed`) installed on `model`, or
    /// every parameter of `model` made trainable ([`FullParameters::install`]).
    pub fn install(model: &mut GptOssForCausalLM, cfg: &TrainingConfig) -> Result<Self> {
        match cfg.peft {
            PeftMode::Lora => LoraModel::new(model, lora_config(cfg), cfg.seed)
                .map(|l| Trained::Lora(Box::new(l)))
                .map_err(|e| SftError::Trainer(format!("applying LoRA: {e}"))),
            PeftMode::None => {
                FullParameters::install(model, None).map(|f| Trained::Full(Box::new(f)))
            }
        }
    }

    /// What the trainer updates.
    pub fn adapters(&self) -> &dyn super::adapters::TrainableAdapters {
        match self {
            Trained::Lora(l) => l.as_ref(),
            Trained::Full(f) => f.as_ref(),
        }
    }

    /// PEFT's trainable-parameters line.
    pub fn trainable_parameters_line(&self) -> String {
        match self {
            Trained::Lora(l) => l.trainable_parameters_line(),
            Trained::Full(f) => f.trainable_parameters_line(),
        }
    }
}

/// What [`finetune`] produced.
pub struct FinetuneOutput {
    /// What was trained (LoRA adapters still installed on the model, or its own parameters).
    pub trained: Trained,
    /// How training ended.
    pub outcome: TrainOutcome,
    /// Where `save_model` wrote the adapter, or the whole model with `peft: none` (when
    /// interrupted: the checkpoint written then).
    pub adapter_dir: PathBuf,
    /// Where the MLflow run went, if any.
    pub mlflow: Option<String>,
    /// Median wall seconds of the optimizer steps after the first two (compilation, pool
    /// growth), and how many steps that is (`None` with fewer than three steps).
    pub steady_step_secs: Option<(f64, usize)>,
    /// Peak device memory of the run (CUDA's pool high-water marks; `None` off CUDA).
    pub peak_memory: Option<gptoss_kernels::PoolStats>,
    /// The held-out rows, when `eval_dataset` or `eval_split` was set.
    pub eval: Option<EvalSet>,
    /// The (finished) MLflow run, to log more artifacts to (e.g. an eval report).
    pub tracking: Option<crate::mlflow::MlflowRun>,
}

/// Logs the run's files as MLflow artifacts: the adapter directory's adapter and processor files
/// under `adapter/`, and `training_args.json`, `trainer_state.json`, `loss_curve.png` of
/// `output_dir` at the root (those that exist).
pub fn log_run_artifacts(
    run: &crate::mlflow::MlflowRun,
    adapter_dir: &Path,
    output_dir: &Path,
) -> Result<()> {
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "model.safetensors",
        "chat_template.jinja",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let p = adapter_dir.join(f);
        if p.is_file() {
            run.log_artifacts(&p, "adapter")?;
        }
    }
    for f in ["training_args.json", "trainer_state.json", "loss_curve.png"] {
        let p = output_dir.join(f);
        if p.is_file() {
            run.log_artifacts(&p, "")?;
        }
    }
    Ok(())
}

/// Runs the recipe on `model`: data, LoRA (seeded by `cfg.seed`), training with console,
/// progress bar and MLflow, then `save_model` into `cfg.output_dir`.
/// Prints PEFT's trainable-parameters line and the dataset summary.
pub fn finetune(
    model: &mut GptOssForCausalLM,
    cfg: &TrainingConfig,
    tok: &HarmonyTokenizer,
) -> Result<FinetuneOutput> {
    let data = load_train_and_eval(cfg, tok, BUNDLED_DATASET)?;
    finetune_on(model, cfg, tok, data)
}

/// [`finetune`] on data already loaded with [`load_train_and_eval`] (e.g. to evaluate the base
/// model on the eval rows first).
pub fn finetune_on(
    model: &mut GptOssForCausalLM,
    cfg: &TrainingConfig,
    tok: &HarmonyTokenizer,
    data: TrainEvalData,
) -> Result<FinetuneOutput> {
    finetune_on_ranks(model, cfg, tok, data, &crate::distributed::Single)
}

/// [`finetune_on`] as one rank of a data-parallel job ([`crate::distributed`]): this rank's
/// shard of every global batch, gradients summed by `reducer`; only rank 0 prints, reports
/// (progress bar, MLflow), generates during evaluation and writes files.
pub fn finetune_on_ranks(
    model: &mut GptOssForCausalLM,
    cfg: &TrainingConfig,
    tok: &HarmonyTokenizer,
    data: TrainEvalData,
    reducer: &dyn crate::distributed::GradReducer,
) -> Result<FinetuneOutput> {
    let main = reducer.is_main();
    if main {
        print_dataset_summary(cfg, &data);
    }
    let TrainEvalData { train: data, eval } = data;
    let trained = Trained::install(model, cfg)?;
    if main {
        println!("{}", trained.trainable_parameters_line());
    }
    let model_dir = cfg.model_name_or_path.clone();
    let extra = move |dir: &Path| write_processor_files(dir, model_dir.as_deref());
    let pad = model.config().pad_token_id.unwrap_or(199_999);
    let device = model.device().clone();
    let model: &GptOssForCausalLM = model;
    let options = TrainerOptions {
        pad_token_id: pad,
        ..TrainerOptions::default()
    };
    let eval_opts = eval_options(cfg, &options, Some(cfg.eval_generate));
    let hook = |step: u64| -> Result<std::collections::BTreeMap<String, f64>> {
        match &eval {
            Some(set) if cfg.eval_generate > 0 && main => {
                let label = format!("step {step}");
                let scored =
                    generate_and_score(model, tok, set, &label, &eval_opts, &mut |_, _| {})?;
                Ok(gptoss_eval::log_metrics(&scored.summary))
            }
            _ => Ok(Default::default()),
        }
    };
    let mut trainer = Trainer::new(
        model,
        trained.adapters(),
        cfg.clone(),
        data.examples,
        device.clone(),
    )?
    .with_options(options)
    .with_extra_files(&extra)
    .with_eval_hook(&hook)
    .with_reducer(reducer);
    if let Some(set) = &eval {
        trainer = trainer.with_eval_rows(set.examples.clone());
    }
    let (outcome, mut observer, peak_memory) = train_observed(&trainer, cfg, main, &device)?;
    let timed = observer.step_times().steps.len().saturating_sub(2);
    let steady_step_secs = (timed > 0).then(|| (observer.step_times().median_secs(2), timed));
    // Interrupted: the checkpoint just written is what there is (and what to resume from).
    let adapter_dir = match (&outcome.last_checkpoint, outcome.interrupted) {
        (Some(dir), true) => dir.clone(),
        _ => trainer.save_model(None)?,
    };
    let mlflow = observer.mlflow_location();
    let tracking = observer.take_mlflow_run();
    if let Some(run) = &tracking {
        log_run_artifacts(run, &adapter_dir, &cfg.output_dir)?;
    }
    drop(trainer);
    Ok(FinetuneOutput {
        trained,
        outcome,
        adapter_dir,
        mlflow,
        steady_step_secs,
        peak_memory,
        eval,
        tracking,
    })
}

/// Runs `trainer` under the standard observer (console, progress bar, MLflow; silent on ranks
/// other than 0, whose records are rank 0's), marking the MLflow run failed on an error.
/// Returns the outcome, the observer (step times, MLflow run) and the device pool's peak.
fn train_observed(
    trainer: &Trainer<'_, GptOssForCausalLM>,
    cfg: &TrainingConfig,
    main: bool,
    device: &candle_core::Device,
) -> Result<(
    TrainOutcome,
    StandardObserver,
    Option<gptoss_kernels::PoolStats>,
)> {
    let pool = gptoss_kernels::MemoryPool::of(device);
    if let Some(p) = &pool {
        p.reset_high();
    }
    let mut observer = match main {
        true => StandardObserver::new(cfg, trainer.total_steps())?,
        false => StandardObserver::silent(trainer.total_steps()),
    };
    if let Some(loc) = observer.mlflow_location() {
        println!("MLflow: {loc}");
    }
    match trainer.train(&mut observer) {
        Ok(o) => Ok((o, observer, pool.as_ref().map(|p| p.stats()))),
        Err(e) => {
            let _ = observer.fail();
            Err(e)
        }
    }
}

/// The `dataset …: N examples (…)` and `eval: N rows` lines of a run.
fn print_dataset_summary(cfg: &TrainingConfig, data: &TrainEvalData) {
    let train = &data.train;
    let tokens: usize = train.examples.iter().map(|e| e.input_ids.len()).sum();
    println!(
        "dataset {}: {} examples ({} tokens, {} truncated to {}, {} dropped with no trained token)",
        cfg.dataset.as_deref().unwrap_or("(bundled sample)"),
        train.examples.len(),
        tokens,
        train.truncated,
        cfg.max_length,
        train.dropped.len()
    );
    if let Some(e) = &data.eval {
        println!("eval: {} rows ({})", e.rows.len(), e.source);
    }
}

/// The demo model of `examples/finetune_multilingual.rs`: the real gpt-oss architecture
/// (o200k_harmony vocabulary of 201,088, YaRN RoPE, sinks, alternating sliding/full attention,
/// MoE with clamped SwiGLU) at small dims: hidden 128, 4 layers, 4 query heads over 2 kv heads
/// of width 32, 8 experts top-2 with intermediate 128, sliding window 128. Weights are drawn with
/// std 0.1 instead of 0.02: with the frozen LM head of a 0.02 init, logits of a 128-wide model
/// span only ≈ ±2.5, so no adapter could move the loss far below ln(201088) ≈ 12.2.
pub fn demo_model_config() -> gptoss_model::Config {
    let mut c = gptoss_model::Config::gpt_oss_tiny();
    c.initializer_range = 0.1;
    c
}

/// The demo's base model, as a checkpoint on disk so that its adapter can be reloaded, evaluated
/// and exported like any other (PEFT's `base_model_name_or_path` points at it): the
/// [`demo_model_config`] model drawn with `seed`, saved in bf16 to `dir` (config.json,
/// model.safetensors, tokenizer files) unless `dir` already holds one, then loaded from `dir` in
/// f32 through the real loader.
pub fn demo_base_model(
    dir: &Path,
    seed: u64,
    device: &candle_core::Device,
) -> Result<GptOssForCausalLM> {
    let model_err =
        |e: gptoss_model::ModelError| SftError::Trainer(format!("demo base model: {e}"));
    if !dir.join("config.json").is_file() {
        let cpu = candle_core::Device::Cpu;
        let model = gptoss_model::init_random(
            &demo_model_config(),
            candle_core::DType::F32,
            &cpu,
            Some(seed),
        )
        .map_err(model_err)?;
        let opts = gptoss_model::SaveOptions {
            mxfp4_experts: false,
            max_shard_bytes: None,
            dtype: Some(candle_core::DType::BF16),
        };
        gptoss_model::save(&model, dir, &opts).map_err(model_err)?;
        write_tokenizer_files(dir)?;
    }
    let opts = gptoss_model::LoadOptions::new(candle_core::DType::F32);
    gptoss_model::load_with(dir, device, &opts).map_err(model_err)
}

/// The demo training setup (used when no `--model` is given): the recipe scaled to a random
/// tiny model on CPU — LoRA r 8 / α 16 on all attention linears plus the experts of layers 1
/// and 3, lr 2e-3 (a random model needs more than the recipe's 2e-4 to visibly learn in one
/// epoch), cosine_with_min_lr 0.1, warmup 3 %, batch 1 × GA 4, max_length 512, 1 epoch, no
/// gradient checkpointing (the model is small), a checkpoint every 10 steps (keep 2), 10 % of
/// the rows held out and evaluated every 10 steps, output in `finetune_multilingual_demo/`.
pub fn demo_training_config() -> TrainingConfig {
    TrainingConfig {
        lora_target_parameters: [1, 3]
            .iter()
            .flat_map(|l| {
                [
                    format!("{l}.mlp.experts.gate_up_proj"),
                    format!("{l}.mlp.experts.down_proj"),
                ]
            })
            .collect(),
        learning_rate: 2e-3,
        max_length: 512,
        gradient_checkpointing: false,
        save_steps: 10,
        save_total_limit: Some(2),
        eval_split: Some(0.1),
        eval_strategy: crate::config::EvalStrategy::Steps,
        eval_steps: Some(10),
        output_dir: PathBuf::from("finetune_multilingual_demo"),
        run_name: Some("finetune-multilingual-demo".into()),
        ..TrainingConfig::default()
    }
}

/// Lowers how long candle's idle CPU workers spin before parking
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT`: candle's default 25,000 → 100) unless the variable is set.
/// On small or shared CPUs spinning workers steal cycles from the matmul threads (train_step
/// bench on 2 busy cores: 4.2 → 2.5 s per step). Call at the start of `main`, before any tensor
/// operation and before other threads exist.
pub fn tune_cpu_runtime() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}
