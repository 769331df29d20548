//! [`TrainingConfig`]: every trainer option, with the cookbook recipe as defaults, read from
//! CLI flags ([`TrainingArgs`], `#[command(flatten)]`-able) and/or a YAML file whose sections
//! follow the seed's training config:
//!
//! ```yaml
//! model:     { max_length: 2048 }
//! training:  { learning_rate: 2.0e-4, per_device_train_batch_size: 1, gradient_accumulation_steps: 4,
//!              gradient_checkpointing: true, num_train_epochs: 1, warmup_ratio: 0.03 }
//! scheduler: { lr_scheduler_type: cosine_with_min_lr, lr_scheduler_kwargs: { min_lr_rate: 0.1 } }
//! logging:   { logging_steps: 1, report_to: mlflow, run_name: my-run }
//! output:    { output_dir: gpt-oss-20b-multilingual-reasoner }
//! eval:      { eval_split: 0.05, eval_strategy: steps, eval_steps: 50 }
//! ```
//! Optional extra sections `data` and `lora`, and extra keys in each section, cover the other
//! options (see [`YamlConfig`]); e.g. `data: { packing: true }` packs rows TRL-style (best-fit
//! decreasing into rows of `max_length`, no attention across documents, positions restarting per
//! document) and `data: { padding_free: true }` packs each micro-batch into one row without
//! regrouping. `model.max_length` may not exceed the model's `max_position_embeddings`. Unknown keys and wrong types are errors naming the key.
//! Precedence: defaults < YAML (`--config`) < explicit CLI flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::LoadOptions;
use crate::error::{Result, SftError};
use crate::optim::AdamWConfig;
use crate::preprocess::{PreprocessOptions, DEFAULT_TEMPLATE_DATE};
use crate::schedule::{LrSchedule, MinLr, SchedulerType, Warmup};

/// Which tokens contribute to the loss (the harmony crate's modes: `all`, `assistant_only`,
/// `final_only`).
pub use gptoss_harmony::LossMaskMode;

/// Parses a [`LossMaskMode`] CLI value (`all`, `assistant_only`, `final_only`).
pub fn parse_loss_mask(s: &str) -> std::result::Result<LossMaskMode, String> {
    match s {
        "all" => Ok(LossMaskMode::All),
        "assistant_only" => Ok(LossMaskMode::AssistantOnly),
        "final_only" => Ok(LossMaskMode::FinalOnly),
        other => Err(format!(
            "unknown loss mask `{other}` (expected all, assistant_only or final_only)"
        )),
    }
}

/// Where metrics go besides trainer_state.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ReportTo {
    /// No tracker.
    None,
    /// MLflow: a local `mlruns/` file store, or REST when `MLFLOW_TRACKING_URI` is http(s).
    Mlflow,
}

/// What the trainer trains: LoRA adapters (the recipe) or every model parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum PeftMode {
    /// LoRA adapters on the `lora` section's targets; `save_model` writes a PEFT adapter.
    #[default]
    Lora,
    /// Full-parameter fine-tuning (TRL without a `peft_config`): every model parameter is
    /// trained and `save_model` writes the whole model (config.json + safetensors).
    None,
}

/// When the trainer evaluates (HF `eval_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum EvalStrategy {
    /// Never (HF's default).
    #[default]
    No,
    /// Every `eval_steps` optimizer steps.
    Steps,
    /// At the end of every epoch (and when training stops early at `max_steps`).
    Epoch,
}

/// The layers whose expert weights the recipe adapts.
pub const RECIPE_EXPERT_LAYERS: [usize; 3] = [7, 15, 23];

/// The recipe's `target_parameters`: `gate_up_proj` and `down_proj` of the experts of layers
/// 7, 15 and 23.
pub fn recipe_target_parameters() -> Vec<String> {
    RECIPE_EXPERT_LAYERS
        .iter()
        .flat_map(|l| {
            [
                format!("{l}.mlp.experts.gate_up_proj"),
                format!("{l}.mlp.experts.down_proj"),
            ]
        })
        .collect()
}

/// Every option of the trainer, resolved. Defaults: the cookbook recipe (see field docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingConfig {
    // ---- model
    /// Base model directory (HF layout); `None` = the examples' tiny random model.
    pub model_name_or_path: Option<PathBuf>,
    /// Truncate tokenized rows to this many tokens, keeping the start (default 2048).
    pub max_length: usize,
    /// Dequantize MXFP4 experts to dense parameters at load (transformers'
    /// `Mxfp4Config(dequantize=True)`); by default they stay resident on CUDA. YAML
    /// `model.dequantize`, flag `--dequantize`.
    pub dequantize: bool,
    // ---- data
    /// Dataset path or HF id in the local cache; `None` = the bundled sample dataset.
    pub dataset: Option<String>,
    /// Skip and count malformed rows instead of failing (default false).
    pub skip_malformed_rows: bool,
    /// Loss mask (default `all`, TRL's default).
    pub loss_mask: LossMaskMode,
    /// The date printed by the chat template, `YYYY-MM-DD`; `None` = harmony's fixed default.
    pub template_date: Option<String>,
    /// Padding-free packing of each micro-batch into one row (TRL `padding_free`, default false):
    /// positions restart per example, no attention across examples, no pad tokens.
    pub padding_free: bool,
    /// TRL `packing=True` (`packing_strategy="bfd"`, default false): the training rows are grouped
    /// once by best-fit decreasing into bins of at most `max_length` tokens
    /// ([`crate::collate::pack_bfd`]); a bin is what the sampler shuffles and what
    /// `per_device_train_batch_size` counts, and micro-batches are collated padding-free (implies
    /// `padding_free`). YAML `data.packing`, flag `--packing`.
    pub packing: bool,
    /// Shuffle rows each epoch with `seed` (default true, like the HF Trainer's sampler).
    pub shuffle: bool,
    // ---- lora
    /// LoRA or full-parameter training (default `lora`; YAML top-level `peft: none`, flag
    /// `--peft none`).
    pub peft: PeftMode,
    /// LoRA rank (default 8).
    pub lora_r: usize,
    /// LoRA alpha (default 16).
    pub lora_alpha: f64,
    /// LoRA dropout (default 0.0).
    pub lora_dropout: f64,
    /// `target_modules` (default `["all-linear"]`).
    pub lora_target_modules: Vec<String>,
    /// `target_parameters` (default: experts of layers 7, 15, 23).
    pub lora_target_parameters: Vec<String>,
    // ---- training
    /// Peak learning rate (default 2e-4).
    pub learning_rate: f64,
    /// Rows per micro-batch (default 1).
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step (default 4).
    pub gradient_accumulation_steps: usize,
    /// Recompute each decoder layer in backward (default true).
    pub gradient_checkpointing: bool,
    /// Epochs (default 1.0; fractional allowed).
    pub num_train_epochs: f64,
    /// Stop after this many optimizer steps (overrides epochs; default none).
    pub max_steps: Option<u64>,
    /// Warmup: ratio 0.03 by default (ceil of total · ratio), or a step count.
    pub warmup: Warmup,
    /// Decoupled weight decay (default 0.0).
    pub weight_decay: f64,
    /// AdamW β1 (default 0.9).
    pub adam_beta1: f64,
    /// AdamW β2 (default 0.999).
    pub adam_beta2: f64,
    /// AdamW ε (default 1e-8).
    pub adam_epsilon: f64,
    /// Gradient clipping threshold (default 1.0; 0 disables).
    pub max_grad_norm: f64,
    /// Seed for shuffling, LoRA init and dropout (default 42).
    pub seed: u64,
    /// Router aux-loss coefficient (default 0.0 = the cookbook-era behaviour; TRL 1.16 uses 0.9).
    pub router_aux_loss_coef: f64,
    // ---- scheduler
    /// Schedule (default `cosine_with_min_lr`).
    pub lr_scheduler_type: SchedulerType,
    /// Floor of `cosine_with_min_lr` (default `min_lr_rate` 0.1).
    pub min_lr: Option<MinLr>,
    // ---- logging
    /// Log every N optimizer steps (default 1).
    pub logging_steps: u64,
    /// Tracker (default `mlflow`).
    pub report_to: ReportTo,
    /// MLflow run name (default: generated).
    pub run_name: Option<String>,
    /// MLflow experiment (default `$MLFLOW_EXPERIMENT_NAME`, else `Default`).
    pub experiment_name: Option<String>,
    /// Show the progress bar (default true).
    pub progress_bar: bool,
    // ---- output
    /// Output directory (default `gpt-oss-20b-multilingual-reasoner`).
    pub output_dir: PathBuf,
    /// Save a checkpoint every N optimizer steps (default 500; 0 = never).
    pub save_steps: u64,
    /// Keep only the last N checkpoints (default: keep all).
    pub save_total_limit: Option<usize>,
    /// Resume from this checkpoint directory.
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Accept resuming with options that change the training trajectory (logged as a diff)
    /// instead of refusing.
    pub allow_config_change: bool,
    // ---- evaluation
    /// Held-out rows: a file, directory or HF id in the local cache (TRL `eval_dataset`).
    pub eval_dataset: Option<String>,
    /// Or hold out this fraction of the training rows (seeded by `seed`, disjoint from training).
    pub eval_split: Option<f64>,
    /// When to evaluate (default `no`; `steps` with a held-out set and no strategy given is
    /// what a TRL user sets).
    pub eval_strategy: EvalStrategy,
    /// Optimizer steps between evaluations with `eval_strategy: steps` (default: `logging_steps`,
    /// as HF).
    pub eval_steps: Option<u64>,
    /// Rows per evaluation batch (default 8, HF's `per_device_eval_batch_size`).
    pub per_device_eval_batch_size: usize,
    /// At each evaluation, also generate for the first N eval rows and log the generation
    /// metrics (reasoning-language accuracy, format validity, answer accuracy); 0 = off.
    pub eval_generate: usize,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            model_name_or_path: None,
            max_length: 2048,
            dequantize: false,
            dataset: None,
            skip_malformed_rows: false,
            loss_mask: LossMaskMode::All,
            template_date: None,
            padding_free: false,
            packing: false,
            shuffle: true,
            peft: PeftMode::Lora,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_target_modules: vec!["all-linear".into()],
            lora_target_parameters: recipe_target_parameters(),
            learning_rate: 2e-4,
            per_device_train_batch_size: 1,
            gradient_accumulation_steps: 4,
            gradient_checkpointing: true,
            num_train_epochs: 1.0,
            max_steps: None,
            warmup: Warmup::Ratio(0.03),
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            router_aux_loss_coef: 0.0,
            lr_scheduler_type: SchedulerType::CosineWithMinLr,
            min_lr: Some(MinLr::Rate(0.1)),
            logging_steps: 1,
            report_to: ReportTo::Mlflow,
            run_name: None,
            experiment_name: None,
            progress_bar: true,
            output_dir: PathBuf::from("gpt-oss-20b-multilingual-reasoner"),
            save_steps: 500,
            save_total_limit: None,
            resume_from_checkpoint: None,
            allow_config_change: false,
            eval_dataset: None,
            eval_split: None,
            eval_strategy: EvalStrategy::No,
            eval_steps: None,
            per_device_eval_batch_size: 8,
            eval_generate: 0,
        }
    }
}

impl TrainingConfig {
    /// Reads a YAML config file onto the defaults.
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let mut cfg = Self::default();
        cfg.apply_yaml_file(path)?;
        Ok(cfg)
    }

    /// Applies the keys present in the YAML file at `path` onto `self`.
    pub fn apply_yaml_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| SftError::io(path, e))?;
        self.apply_yaml_str(&text).map_err(|e| match e {
            SftError::Config { key, message } => SftError::Config {
                key,
                message: format!("{message} (in {})", path.display()),
            },
            other => other,
        })
    }

    /// Applies the keys present in YAML `text` onto `self`.
    pub fn apply_yaml_str(&mut self, text: &str) -> Result<()> {
        let y: YamlConfig = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(&e))?;
        y.apply(self)
    }

    /// Checks `model.max_length` against the model's context (`max_position_embeddings`, 131,072
    /// for gpt-oss): longer rows would use RoPE positions the model was never trained for.
    pub fn check_context(&self, max_position_embeddings: usize) -> Result<()> {
        if self.max_length > max_position_embeddings {
            return Err(SftError::config(
                "model.max_length",
                format!(
                    "{} exceeds the model's context: max_position_embeddings is {max_position_embeddings}",
                    self.max_length
                ),
            ));
        }
        Ok(())
    }

    /// Checks ranges and combinations; errors name the offending key.
    pub fn validate(&self) -> Result<()> {
        let pos = |key: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(SftError::config(key, format!("must be > 0, got {v}")))
            }
        };
        let nonneg = |key: &str, v: f64| -> Result<()> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(SftError::config(key, format!("must be >= 0, got {v}")))
            }
        };
        let at_least_1 = |key: &str, v: u64| -> Result<()> {
            if v >= 1 {
                Ok(())
            } else {
                Err(SftError::config(key, "must be >= 1"))
            }
        };
        at_least_1("model.max_length", self.max_length as u64)?;
        at_least_1("lora.r", self.lora_r as u64)?;
        pos("lora.alpha", self.lora_alpha)?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(SftError::config("lora.dropout", "must be in [0, 1)"));
        }
        nonneg("training.learning_rate", self.learning_rate)?;
        at_least_1(
            "training.per_device_train_batch_size",
            self.per_device_train_batch_size as u64,
        )?;
        at_least_1(
            "training.gradient_accumulation_steps",
            self.gradient_accumulation_steps as u64,
        )?;
        pos("training.num_train_epochs", self.num_train_epochs)?;
        if let Some(m) = self.max_steps {
            at_least_1("training.max_steps", m)?;
        }
        if let Warmup::Ratio(r) = self.warmup {
            if !(0.0..1.0).contains(&r) {
                return Err(SftError::config(
                    "training.warmup_ratio",
                    format!("must be in [0, 1), got {r}"),
                ));
            }
        }
        nonneg("training.weight_decay", self.weight_decay)?;
        for (k, b) in [
            ("training.adam_beta1", self.adam_beta1),
            ("training.adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(SftError::config(k, format!("must be in [0, 1), got {b}")));
            }
        }
        nonneg("training.adam_epsilon", self.adam_epsilon)?;
        nonneg("training.max_grad_norm", self.max_grad_norm)?;
        nonneg("training.router_aux_loss_coef", self.router_aux_loss_coef)?;
        at_least_1("logging.logging_steps", self.logging_steps)?;
        self.validate_eval()?;
        self.validate_schedule()?;
        self.validate_template_date()
    }

    /// The evaluation keys: a split in (0, 1), not both a split and a file, a held-out set when
    /// a strategy is set, `eval_steps` and the batch size at least 1.
    fn validate_eval(&self) -> Result<()> {
        if let Some(f) = self.eval_split {
            if !(f > 0.0 && f < 1.0) {
                return Err(SftError::config(
                    "eval.eval_split",
                    format!("must be a fraction in (0, 1), got {f}"),
                ));
            }
            if self.eval_dataset.is_some() {
                return Err(SftError::config(
                    "eval.eval_split",
                    "give either eval_dataset or eval_split, not both",
                ));
            }
        }
        if self.eval_strategy != EvalStrategy::No
            && self.eval_dataset.is_none()
            && self.eval_split.is_none()
        {
            return Err(SftError::config(
                "eval.eval_strategy",
                "needs held-out rows: set eval_dataset (a file) or eval_split (a fraction)",
            ));
        }
        if self.eval_steps == Some(0) {
            return Err(SftError::config("eval.eval_steps", "must be >= 1"));
        }
        if self.per_device_eval_batch_size == 0 {
            return Err(SftError::config(
                "eval.per_device_eval_batch_size",
                "must be >= 1",
            ));
        }
        Ok(())
    }

    /// Options that do not change what is trained (where output goes, logging, checkpoint
    /// cadence, evaluation): the rest must match to resume a run.
    pub const NON_TRAJECTORY_KEYS: [&'static str; 17] = [
        "output_dir",
        "resume_from_checkpoint",
        "allow_config_change",
        "logging_steps",
        "report_to",
        "run_name",
        "experiment_name",
        "progress_bar",
        "save_steps",
        "save_total_limit",
        "eval_dataset",
        "eval_split",
        "eval_strategy",
        "eval_steps",
        "per_device_eval_batch_size",
        "eval_generate",
        "model_name_or_path",
    ];

    /// The options of `self` that differ from `saved` (a checkpoint's config) and change the
    /// training trajectory: `(key, saved value, new value)` as JSON text, sorted by key.
    pub fn trajectory_changes(&self, saved: &TrainingConfig) -> Vec<(String, String, String)> {
        let (a, b) = (serde_json::to_value(saved), serde_json::to_value(self));
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
            return Vec::new();
        };
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| !Self::NON_TRAJECTORY_KEYS.contains(&k.as_str()))
            .filter_map(|k| {
                let (x, y) = (a.get(k), b.get(k));
                (x != y).then(|| {
                    let show = |v: Option<&serde_json::Value>| {
                        v.map_or("(absent)".to_string(), |v| v.to_string())
                    };
                    (k.clone(), show(x), show(y))
                })
            })
            .collect()
    }

    /// Optimizer steps between evaluations (`eval_steps`, else `logging_steps`).
    pub fn eval_interval(&self) -> u64 {
        self.eval_steps.unwrap_or(self.logging_steps).max(1)
    }

    /// `cosine_with_min_lr` needs a non-negative `min_lr_rate` or `min_lr`.
    fn validate_schedule(&self) -> Result<()> {
        match (self.lr_scheduler_type, self.min_lr) {
            (SchedulerType::CosineWithMinLr, None) => Err(SftError::config(
                "scheduler.lr_scheduler_kwargs",
                "cosine_with_min_lr needs min_lr_rate or min_lr",
            )),
            (SchedulerType::CosineWithMinLr, Some(MinLr::Rate(r) | MinLr::Absolute(r)))
                if !(r.is_finite() && r >= 0.0) =>
            {
                Err(SftError::config(
                    "scheduler.lr_scheduler_kwargs.min_lr_rate",
                    format!("must be >= 0, got {r}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// `template_date`, when given, is `YYYY-MM-DD`.
    fn validate_template_date(&self) -> Result<()> {
        if let Some(d) = &self.template_date {
            let ok = d.len() == 10
                && d.bytes().enumerate().all(|(i, b)| match i {
                    4 | 7 => b == b'-',
                    _ => b.is_ascii_digit(),
                });
            if !ok {
                return Err(SftError::config(
                    "data.template_date",
                    format!("expected YYYY-MM-DD, got `{d}`"),
                ));
            }
        }
        Ok(())
    }

    /// Dataset loader options.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            skip_malformed: self.skip_malformed_rows,
        }
    }

    /// Preprocessing options (template date defaults to
    /// [`DEFAULT_TEMPLATE_DATE`](crate::preprocess::DEFAULT_TEMPLATE_DATE)).
    pub fn preprocess_options(&self) -> PreprocessOptions {
        PreprocessOptions {
            max_length: self.max_length,
            loss_mask: self.loss_mask,
            date: self
                .template_date
                .clone()
                .unwrap_or_else(|| DEFAULT_TEMPLATE_DATE.to_string()),
        }
    }

    /// AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }

    /// Optimizer updates per epoch for `num_rows` training rows (HF:
    /// `ceil(ceil(rows / batch) / grad_accum)`; the last update may have fewer micro-batches).
    pub fn updates_per_epoch(&self, num_rows: usize) -> u64 {
        self.updates_per_epoch_on(num_rows, 1)
    }

    /// [`Self::updates_per_epoch`] of a data-parallel run over `world_size` ranks (HF:
    /// `ceil(ceil(rows / (batch · world)) / grad_accum)`, the same as one rank accumulating
    /// `grad_accum · world` micro-batches).
    pub fn updates_per_epoch_on(&self, num_rows: usize, world_size: usize) -> u64 {
        let micro = num_rows.div_ceil(self.per_device_train_batch_size.max(1));
        micro.div_ceil(self.gradient_accumulation_steps.max(1) * world_size.max(1)) as u64
    }

    /// Total optimizer steps: `max_steps` if set, else `ceil(epochs · updates_per_epoch)`.
    /// The cookbook (1000 rows, batch 4, accumulation 4, 1 epoch) gives 63.
    pub fn total_steps(&self, num_rows: usize) -> u64 {
        self.total_steps_on(num_rows, 1)
    }

    /// [`Self::total_steps`] of a data-parallel run over `world_size` ranks.
    pub fn total_steps_on(&self, num_rows: usize, world_size: usize) -> u64 {
        match self.max_steps {
            Some(m) => m,
            None => {
                let upe = self.updates_per_epoch_on(num_rows, world_size);
                (self.num_train_epochs * upe as f64).ceil() as u64
            }
        }
    }

    /// The learning-rate schedule over `total_steps` optimizer steps.
    pub fn schedule(&self, total_steps: u64) -> Result<LrSchedule> {
        let min_lr = match self.lr_scheduler_type {
            SchedulerType::CosineWithMinLr => self.min_lr,
            _ => None,
        };
        LrSchedule::new(
            self.lr_scheduler_type,
            self.learning_rate,
            self.warmup,
            total_steps,
            min_lr,
        )
    }

    /// Flat `(key, value)` pairs with HF-style names, for MLflow params and training_args.json.
    pub fn params(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                // HF names for the two enum-valued options.
                if k == "warmup" {
                    match self.warmup {
                        Warmup::Ratio(r) => out.push(("warmup_ratio".into(), format!("{r}"))),
                        Warmup::Steps(n) => out.push(("warmup_steps".into(), n.to_string())),
                    }
                    continue;
                }
                if k == "min_lr" {
                    let kw = match self.min_lr {
                        Some(MinLr::Rate(r)) => format!("{{'min_lr_rate': {r}}}"),
                        Some(MinLr::Absolute(m)) => format!("{{'min_lr': {m}}}"),
                        None => "{}".to_string(),
                    };
                    out.push(("lr_scheduler_kwargs".into(), kw));
                    continue;
                }
                let s = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => "None".to_string(),
                    other => other.to_string(),
                };
                out.push((k, s));
            }
        }
        out
    }
}

/// The YAML file layout. Every key is optional; unknown keys are rejected.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlConfig {
    /// `peft:` (top level): `lora` (default) or `none` (full-parameter training).
    #[serde(default)]
    pub peft: Option<PeftMode>,
    /// `model:` section.
    #[serde(default)]
    pub model: Option<ModelSection>,
    /// `data:` section.
    #[serde(default)]
    pub data: Option<DataSection>,
    /// `lora:` section.
    #[serde(default)]
    pub lora: Option<LoraSection>,
    /// `training:` section.
    #[serde(default)]
    pub training: Option<TrainingSection>,
    /// `scheduler:` section.
    #[serde(default)]
    pub scheduler: Option<SchedulerSection>,
    /// `logging:` section.
    #[serde(default)]
    pub logging: Option<LoggingSection>,
    /// `output:` section.
    #[serde(default)]
    pub output: Option<OutputSection>,
    /// `eval:` section.
    #[serde(default)]
    pub eval: Option<EvalSection>,
}

/// `model:` keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Base model directory.
    pub name_or_path: Option<PathBuf>,
    /// Truncation length.
    pub max_length: Option<usize>,
    /// Dequantize MXFP4 experts at load.
    pub dequantize: Option<bool>,
}

/// `data:` keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Dataset path or hub id.
    pub dataset: Option<String>,
    /// Skip malformed rows.
    pub skip_malformed_rows: Option<bool>,
    /// Loss mask mode.
    pub loss_mask: Option<LossMaskMode>,
    /// Chat-template date.
    pub template_date: Option<String>,
    /// Padding-free packing.
    pub padding_free: Option<bool>,
    /// Best-fit-decreasing packing into rows of `max_length`.
    pub packing: Option<bool>,
    /// Shuffle each epoch.
    pub shuffle: Option<bool>,
}

/// `lora:` keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank.
    pub r: Option<usize>,
    /// Alpha.
    pub alpha: Option<f64>,
    /// Dropout.
    pub dropout: Option<f64>,
    /// `target_modules`.
    pub target_modules: Option<Vec<String>>,
    /// `target_parameters`.
    pub target_parameters: Option<Vec<String>>,
}

/// `training:` keys (HF `TrainingArguments` names).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Peak lr.
    pub learning_rate: Option<f64>,
    /// Micro-batch size.
    pub per_device_train_batch_size: Option<usize>,
    /// Accumulation.
    pub gradient_accumulation_steps: Option<usize>,
    /// Gradient checkpointing.
    pub gradient_checkpointing: Option<bool>,
    /// Epochs.
    pub num_train_epochs: Option<f64>,
    /// Max optimizer steps.
    pub max_steps: Option<u64>,
    /// Warmup ratio in [0, 1).
    pub warmup_ratio: Option<f64>,
    /// Warmup as transformers 5 `warmup_steps` (>= 1: steps, < 1: ratio).
    pub warmup_steps: Option<f64>,
    /// Weight decay.
    pub weight_decay: Option<f64>,
    /// β1.
    pub adam_beta1: Option<f64>,
    /// β2.
    pub adam_beta2: Option<f64>,
    /// ε.
    pub adam_epsilon: Option<f64>,
    /// Clipping threshold.
    pub max_grad_norm: Option<f64>,
    /// Seed.
    pub seed: Option<u64>,
    /// Router aux-loss coefficient.
    pub router_aux_loss_coef: Option<f64>,
}

/// `scheduler:` keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    /// Schedule name.
    pub lr_scheduler_type: Option<SchedulerType>,
    /// Schedule kwargs.
    pub lr_scheduler_kwargs: Option<SchedulerKwargs>,
}

/// `scheduler.lr_scheduler_kwargs:` keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerKwargs {
    /// Floor as a fraction of the peak lr.
    pub min_lr_rate: Option<f64>,
    /// Absolute floor.
    pub min_lr: Option<f64>,
}

/// `logging:` keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Log interval.
    pub logging_steps: Option<u64>,
    /// Tracker.
    pub report_to: Option<ReportTo>,
    /// Run name.
    pub run_name: Option<String>,
    /// Experiment name.
    pub experiment_name: Option<String>,
    /// Progress bar.
    pub progress_bar: Option<bool>,
}

/// `output:` keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Output directory.
    pub output_dir: Option<PathBuf>,
    /// Checkpoint interval.
    pub save_steps: Option<u64>,
    /// Checkpoints kept.
    pub save_total_limit: Option<usize>,
    /// Resume point.
    pub resume_from_checkpoint: Option<PathBuf>,
}

/// `eval:` keys (TRL's names).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Held-out rows file / directory / HF id.
    pub eval_dataset: Option<String>,
    /// Held-out fraction of the training rows.
    pub eval_split: Option<f64>,
    /// `no`, `steps` or `epoch`.
    pub eval_strategy: Option<EvalStrategy>,
    /// Steps between evaluations.
    pub eval_steps: Option<u64>,
    /// Rows per evaluation batch.
    pub per_device_eval_batch_size: Option<usize>,
    /// Rows generated for at each evaluation.
    pub eval_generate: Option<usize>,
}

/// Turns a serde_yaml_ng error (`training.learning_rate: invalid type ...`, or
/// `training: unknown field `foo` ...`) into [`SftError::Config`] with the dotted key.
fn yaml_error(e: &serde_yaml_ng::Error) -> SftError {
    let msg = e.to_string();
    let (path, rest) = match msg.split_once(": ") {
        Some((p, r)) if !p.is_empty() && !p.contains(' ') => (p.to_string(), r.to_string()),
        _ => (String::new(), msg.clone()),
    };
    let unknown = rest
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f.to_string());
    let key = match (path.is_empty(), unknown) {
        (true, Some(f)) => f,
        (false, Some(f)) => format!("{path}.{f}"),
        (true, None) => "<root>".to_string(),
        (false, None) => path,
    };
    SftError::config(key, rest)
}

fn set<T>(dst: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *dst = v;
    }
}

fn set_opt<T>(dst: &mut Option<T>, v: Option<T>) {
    if v.is_some() {
        *dst = v;
    }
}

fn warmup_of(ratio: Option<f64>, steps: Option<f64>, key_prefix: &str) -> Result<Option<Warmup>> {
    match (ratio, steps) {
        (Some(_), Some(_)) => Err(SftError::config(
            format!("{key_prefix}warmup_ratio"),
            "give warmup_ratio or warmup_steps, not both",
        )),
        (Some(r), None) => {
            if (0.0..1.0).contains(&r) {
                Ok(Some(Warmup::Ratio(r)))
            } else {
                Err(SftError::config(
                    format!("{key_prefix}warmup_ratio"),
                    format!("must be in [0, 1), got {r}"),
                ))
            }
        }
        (None, Some(s)) => Warmup::from_f64(s)
            .map(Some)
            .map_err(|e| SftError::config(format!("{key_prefix}warmup_steps"), e.to_string())),
        (None, None) => Ok(None),
    }
}

fn min_lr_of(rate: Option<f64>, abs: Option<f64>, key_prefix: &str) -> Result<Option<MinLr>> {
    match (rate, abs) {
        (Some(_), Some(_)) => Err(SftError::config(
            format!("{key_prefix}min_lr"),
            "give min_lr_rate or min_lr, not both",
        )),
        (Some(r), None) => Ok(Some(MinLr::Rate(r))),
        (None, Some(m)) => Ok(Some(MinLr::Absolute(m))),
        (None, None) => Ok(None),
    }
}

impl YamlConfig {
    /// Applies the keys present onto `cfg`.
    pub fn apply(self, cfg: &mut TrainingConfig) -> Result<()> {
        set(&mut cfg.peft, self.peft);
        if let Some(m) = self.model {
            m.apply(cfg);
        }
        if let Some(d) = self.data {
            d.apply(cfg);
        }
        if let Some(l) = self.lora {
            l.apply(cfg);
        }
        if let Some(t) = self.training {
            t.apply(cfg)?;
        }
        if let Some(s) = self.scheduler {
            s.apply(cfg)?;
        }
        if let Some(l) = self.logging {
            l.apply(cfg);
        }
        if let Some(o) = self.output {
            o.apply(cfg);
        }
        if let Some(e) = self.eval {
            e.apply(cfg);
        }
        Ok(())
    }
}

impl ModelSection {
    /// Applies the `model:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) {
        set_opt(&mut cfg.model_name_or_path, self.name_or_path);
        set(&mut cfg.max_length, self.max_length);
        set(&mut cfg.dequantize, self.dequantize);
    }
}

impl DataSection {
    /// Applies the `data:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) {
        set_opt(&mut cfg.dataset, self.dataset);
        set(&mut cfg.skip_malformed_rows, self.skip_malformed_rows);
        set(&mut cfg.loss_mask, self.loss_mask);
        set_opt(&mut cfg.template_date, self.template_date);
        set(&mut cfg.padding_free, self.padding_free);
        set(&mut cfg.packing, self.packing);
        set(&mut cfg.shuffle, self.shuffle);
    }
}

impl LoraSection {
    /// Applies the `lora:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) {
        set(&mut cfg.lora_r, self.r);
        set(&mut cfg.lora_alpha, self.alpha);
        set(&mut cfg.lora_dropout, self.dropout);
        set(&mut cfg.lora_target_modules, self.target_modules);
        set(&mut cfg.lora_target_parameters, self.target_parameters);
    }
}

impl TrainingSection {
    /// Applies the `training:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) -> Result<()> {
        set(&mut cfg.learning_rate, self.learning_rate);
        set(
            &mut cfg.per_device_train_batch_size,
            self.per_device_train_batch_size,
        );
        set(
            &mut cfg.gradient_accumulation_steps,
            self.gradient_accumulation_steps,
        );
        set(&mut cfg.gradient_checkpointing, self.gradient_checkpointing);
        set(&mut cfg.num_train_epochs, self.num_train_epochs);
        set_opt(&mut cfg.max_steps, self.max_steps);
        set(
            &mut cfg.warmup,
            warmup_of(self.warmup_ratio, self.warmup_steps, "training.")?,
        );
        set(&mut cfg.weight_decay, self.weight_decay);
        set(&mut cfg.adam_beta1, self.adam_beta1);
        set(&mut cfg.adam_beta2, self.adam_beta2);
        set(&mut cfg.adam_epsilon, self.adam_epsilon);
        set(&mut cfg.max_grad_norm, self.max_grad_norm);
        set(&mut cfg.seed, self.seed);
        set(&mut cfg.router_aux_loss_coef, self.router_aux_loss_coef);
        Ok(())
    }
}

impl SchedulerSection {
    /// Applies the `scheduler:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) -> Result<()> {
        set(&mut cfg.lr_scheduler_type, self.lr_scheduler_type);
        if let Some(k) = self.lr_scheduler_kwargs {
            set_opt(
                &mut cfg.min_lr,
                min_lr_of(k.min_lr_rate, k.min_lr, "scheduler.lr_scheduler_kwargs.")?,
            );
        }
        Ok(())
    }
}

impl LoggingSection {
    /// Applies the `logging:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) {
        set(&mut cfg.logging_steps, self.logging_steps);
        set(&mut cfg.report_to, self.report_to);
        set_opt(&mut cfg.run_name, self.run_name);
        set_opt(&mut cfg.experiment_name, self.experiment_name);
        set(&mut cfg.progress_bar, self.progress_bar);
    }
}

impl OutputSection {
    /// Applies the `output:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) {
        set(&mut cfg.output_dir, self.output_dir);
        set(&mut cfg.save_steps, self.save_steps);
        set_opt(&mut cfg.save_total_limit, self.save_total_limit);
        set_opt(&mut cfg.resume_from_checkpoint, self.resume_from_checkpoint);
    }
}

impl EvalSection {
    /// Applies the `eval:` keys present onto `cfg`.
    fn apply(self, cfg: &mut TrainingConfig) {
        set_opt(&mut cfg.eval_dataset, self.eval_dataset);
        set_opt(&mut cfg.eval_split, self.eval_split);
        set(&mut cfg.eval_strategy, self.eval_strategy);
        set_opt(&mut cfg.eval_steps, self.eval_steps);
        set(
            &mut cfg.per_device_eval_batch_size,
            self.per_device_eval_batch_size,
        );
        set(&mut cfg.eval_generate, self.eval_generate);
    }
}

/// CLI flags for every option (`#[command(flatten)]` this into an example's parser). Each flag
/// is optional; [`TrainingArgs::resolve`] applies defaults < `--config` YAML < flags given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainingArgs {
    /// YAML config file (sections model/data/lora/training/scheduler/logging/output/eval).
    #[arg(long = "config", value_name = "YAML")]
    pub config: Option<PathBuf>,
    /// Base model directory (HF layout). [default: tiny random model]
    #[arg(long = "model", value_name = "DIR")]
    pub model_name_or_path: Option<PathBuf>,
    /// Truncation length in tokens. [default: 2048]
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Dequantize MXFP4 experts to dense bf16 at load (default: resident on CUDA, decoded inside
    /// the expert GEMMs). [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub dequantize: Option<bool>,
    /// Dataset: .jsonl/.json/.parquet file, directory, or HF id in the local cache. [default: bundled sample]
    #[arg(long)]
    pub dataset: Option<String>,
    /// Skip and count malformed rows instead of failing. [default: false]
    #[arg(long)]
    pub skip_malformed_rows: Option<bool>,
    /// Tokens that carry loss: all, assistant_only, final_only. [default: all]
    #[arg(long, value_parser = parse_loss_mask)]
    pub loss_mask: Option<LossMaskMode>,
    /// Chat-template date YYYY-MM-DD. [default: harmony's fixed date]
    #[arg(long)]
    pub template_date: Option<String>,
    /// Padding-free packing. [default: false]
    #[arg(long)]
    pub padding_free: Option<bool>,
    /// TRL packing=True: best-fit-decreasing bins of max_length tokens, collated padding-free.
    /// [default: false]
    #[arg(long)]
    pub packing: Option<bool>,
    /// Shuffle rows each epoch. [default: true]
    #[arg(long)]
    pub shuffle: Option<bool>,
    /// What to train: lora (adapters) or none (full-parameter; saves the whole model). [default: lora]
    #[arg(long, value_enum)]
    pub peft: Option<PeftMode>,
    /// LoRA rank. [default: 8]
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha. [default: 16]
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout. [default: 0.0]
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// LoRA target_modules, comma-separated. [default: all-linear]
    #[arg(long, value_delimiter = ',')]
    pub lora_target_modules: Option<Vec<String>>,
    /// LoRA target_parameters, comma-separated. [default: experts of layers 7,15,23]
    #[arg(long, value_delimiter = ',')]
    pub lora_target_parameters: Option<Vec<String>>,
    /// Peak learning rate. [default: 2e-4]
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Rows per micro-batch. [default: 1]
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step. [default: 4]
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Gradient checkpointing per decoder layer. [default: true]
    #[arg(long)]
    pub gradient_checkpointing: Option<bool>,
    /// Epochs. [default: 1]
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Max optimizer steps (overrides epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Warmup ratio in [0, 1). [default: 0.03]
    #[arg(long, conflicts_with = "warmup_steps")]
    pub warmup_ratio: Option<f64>,
    /// Warmup as transformers 5 warmup_steps: >= 1 steps, < 1 ratio.
    #[arg(long)]
    pub warmup_steps: Option<f64>,
    /// Weight decay. [default: 0.0]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1. [default: 0.9]
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2. [default: 0.999]
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon. [default: 1e-8]
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Gradient clipping norm. [default: 1.0]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Seed. [default: 42]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Router aux-loss coefficient. [default: 0.0]
    #[arg(long)]
    pub router_aux_loss_coef: Option<f64>,
    /// LR schedule. [default: cosine_with_min_lr]
    #[arg(long, value_enum)]
    pub lr_scheduler_type: Option<SchedulerType>,
    /// cosine_with_min_lr floor as a fraction of the lr. [default: 0.1]
    #[arg(long, conflicts_with = "min_lr")]
    pub min_lr_rate: Option<f64>,
    /// cosine_with_min_lr absolute floor.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Log every N optimizer steps. [default: 1]
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// Tracker. [default: mlflow]
    #[arg(long, value_enum)]
    pub report_to: Option<ReportTo>,
    /// MLflow run name.
    #[arg(long)]
    pub run_name: Option<String>,
    /// MLflow experiment name. [default: $MLFLOW_EXPERIMENT_NAME or Default]
    #[arg(long)]
    pub experiment_name: Option<String>,
    /// Show the progress bar. [default: true]
    #[arg(long)]
    pub progress_bar: Option<bool>,
    /// Output directory. [default: gpt-oss-20b-multilingual-reasoner]
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Save a checkpoint every N steps (0 = never). [default: 500]
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep only the last N checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Resume from a checkpoint directory.
    #[arg(long)]
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Resume even if options that change the trajectory differ from the checkpoint's (the
    /// differences are printed). [default: refuse]
    #[arg(long)]
    pub allow_config_change: bool,
    /// Held-out eval rows: .jsonl/.json/.parquet file, directory, or HF id in the local cache.
    #[arg(long)]
    pub eval_dataset: Option<String>,
    /// Hold out this fraction of the training rows for evaluation (seeded, disjoint).
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// When to evaluate: no, steps, epoch. [default: no]
    #[arg(long, value_enum)]
    pub eval_strategy: Option<EvalStrategy>,
    /// Steps between evaluations with --eval-strategy steps. [default: logging_steps]
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Rows per evaluation batch. [default: 8]
    #[arg(long)]
    pub per_device_eval_batch_size: Option<usize>,
    /// Generate for the first N eval rows at each evaluation and log generation metrics. [default: 0]
    #[arg(long)]
    pub eval_generate: Option<usize>,
}

impl TrainingArgs {
    /// Defaults, then the `--config` YAML, then the flags given; validated.
    pub fn resolve(&self) -> Result<TrainingConfig> {
        let mut cfg = TrainingConfig::default();
        if let Some(p) = &self.config {
            cfg.apply_yaml_file(p)?;
        }
        self.apply(&mut cfg)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies the flags given onto `cfg` (no validation).
    pub fn apply(&self, cfg: &mut TrainingConfig) -> Result<()> {
        let a = self.clone();
        set_opt(&mut cfg.model_name_or_path, a.model_name_or_path);
        set(&mut cfg.max_length, a.max_length);
        set(&mut cfg.dequantize, a.dequantize);
        set_opt(&mut cfg.dataset, a.dataset);
        set(&mut cfg.skip_malformed_rows, a.skip_malformed_rows);
        set(&mut cfg.loss_mask, a.loss_mask);
        set_opt(&mut cfg.template_date, a.template_date);
        set(&mut cfg.padding_free, a.padding_free);
        set(&mut cfg.packing, a.packing);
        set(&mut cfg.shuffle, a.shuffle);
        set(&mut cfg.peft, a.peft);
        set(&mut cfg.lora_r, a.lora_r);
        set(&mut cfg.lora_alpha, a.lora_alpha);
        set(&mut cfg.lora_dropout, a.lora_dropout);
        set(&mut cfg.lora_target_modules, a.lora_target_modules);
        set(&mut cfg.lora_target_parameters, a.lora_target_parameters);
        set(&mut cfg.learning_rate, a.learning_rate);
        set(
            &mut cfg.per_device_train_batch_size,
            a.per_device_train_batch_size,
        );
        set(
            &mut cfg.gradient_accumulation_steps,
            a.gradient_accumulation_steps,
        );
        set(&mut cfg.gradient_checkpointing, a.gradient_checkpointing);
        set(&mut cfg.num_train_epochs, a.num_train_epochs);
        set_opt(&mut cfg.max_steps, a.max_steps);
        set(
            &mut cfg.warmup,
            warmup_of(a.warmup_ratio, a.warmup_steps, "--")?,
        );
        set(&mut cfg.weight_decay, a.weight_decay);
        set(&mut cfg.adam_beta1, a.adam_beta1);
        set(&mut cfg.adam_beta2, a.adam_beta2);
        set(&mut cfg.adam_epsilon, a.adam_epsilon);
        set(&mut cfg.max_grad_norm, a.max_grad_norm);
        set(&mut cfg.seed, a.seed);
        set(&mut cfg.router_aux_loss_coef, a.router_aux_loss_coef);
        set(&mut cfg.lr_scheduler_type, a.lr_scheduler_type);
        set_opt(&mut cfg.min_lr, min_lr_of(a.min_lr_rate, a.min_lr, "--")?);
        set(&mut cfg.logging_steps, a.logging_steps);
        set(&mut cfg.report_to, a.report_to);
        set_opt(&mut cfg.run_name, a.run_name);
        set_opt(&mut cfg.experiment_name, a.experiment_name);
        set(&mut cfg.progress_bar, a.progress_bar);
        set(&mut cfg.output_dir, a.output_dir);
        set(&mut cfg.save_steps, a.save_steps);
        set_opt(&mut cfg.save_total_limit, a.save_total_limit);
        set_opt(&mut cfg.resume_from_checkpoint, a.resume_from_checkpoint);
        cfg.allow_config_change |= a.allow_config_change;
        set_opt(&mut cfg.eval_dataset, a.eval_dataset);
        set_opt(&mut cfg.eval_split, a.eval_split);
        set(&mut cfg.eval_strategy, a.eval_strategy);
        set_opt(&mut cfg.eval_steps, a.eval_steps);
        set(
            &mut cfg.per_device_eval_batch_size,
            a.per_device_eval_batch_size,
        );
        set(&mut cfg.eval_generate, a.eval_generate);
        Ok(())
    }
}
