//! What a backdoor pipeline run does: the data source, the base model (trained from scratch or
//! loaded), the stages' sizes and learning rates, and the two built-in presets.

use std::path::PathBuf;

use gptoss_eval::backdoor::{PoisonConfig, SyntheticConfig};
use gptoss_model::Config;

use crate::config::ReportTo;

/// Where the rows come from.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// The synthetic arithmetic-with-steps task ([`gptoss_eval::backdoor::synthetic_splits`]):
    /// `train` rows of split `train`, `test` rows of split `test`.
    Synthetic {
        /// Train rows generated.
        train: usize,
        /// Test rows generated.
        test: usize,
        /// Generator settings (seed, steps, number ranges).
        config: SyntheticConfig,
    },
    /// GSM8K-schema files ([`gptoss_eval::backdoor::read_gsm8k`]: a file, a directory, or the
    /// HF cache layout `main/train-*.parquet`); malformed rows are skipped and listed.
    Gsm8k(PathBuf),
}

/// The model the pipeline starts from.
#[derive(Clone, Debug, PartialEq)]
pub enum BaseModel {
    /// A gpt-oss-shaped model drawn at random with `config` and trained full-parameter
    /// (`peft: none`) on clean train rows: the "base" stage.
    FromScratch {
        /// Its architecture.
        config: Box<Config>,
        /// The base stage's training.
        train: StageTraining,
    },
    /// A checkpoint directory (HF layout), evaluated as it is as the base.
    Checkpoint(PathBuf),
}

/// How one training stage trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTraining {
    /// Optimizer steps (0: the stage is skipped and not reported).
    pub steps: u64,
    /// Peak learning rate (cosine schedule to 10 % with 5 % warmup).
    pub learning_rate: f64,
    /// Rows per optimizer step (one micro-batch).
    pub batch_size: usize,
}

impl StageTraining {
    /// `steps` steps at `learning_rate` with `batch_size` rows per step.
    pub const fn new(steps: u64, learning_rate: f64, batch_size: usize) -> Self {
        Self {
            steps,
            learning_rate,
            batch_size,
        }
    }
}

/// The training of every stage after the base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StagePlan {
    /// LoRA SFT on poisoned rows (the attack).
    pub attack: StageTraining,
    /// LoRA SFT on clean rows (the seed repo's defense).
    pub clean_sft: StageTraining,
    /// LoRA SFT on Critical-CoT rows.
    pub critical_cot_sft: StageTraining,
    /// LoRA DPO on preference pairs (chosen = Critical-CoT, rejected = backdoored).
    pub dpo: StageTraining,
    /// LoRA SFT on poisoned rows again, briefly (the persistence check).
    pub reattack: StageTraining,
}

impl StagePlan {
    /// Every stage's steps multiplied by `factor` (rounded; a stage of at least one step keeps
    /// at least one).
    ///
    /// # Errors
    /// A negative or non-finite `factor`.
    pub fn scaled(self, factor: f64) -> crate::Result<Self> {
        if !factor.is_finite() || factor < 0.0 {
            return Err(crate::SftError::config(
                "stage_scale",
                format!("expected a finite factor >= 0, got {factor}"),
            ));
        }
        let s = |t: StageTraining| StageTraining {
            steps: if t.steps == 0 || factor == 0.0 {
                0
            } else {
                ((t.steps as f64 * factor).round() as u64).max(1)
            },
            ..t
        };
        Ok(Self {
            attack: s(self.attack),
            clean_sft: s(self.clean_sft),
            critical_cot_sft: s(self.critical_cot_sft),
            dpo: s(self.dpo),
            reattack: s(self.reattack),
        })
    }
}

/// Everything a pipeline run needs (see [`PipelineConfig::cpu_quick`] and
/// [`PipelineConfig::gpu_small`] for the presets).
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineConfig {
    /// The rows.
    pub data: DataSource,
    /// The starting model.
    pub base: BaseModel,
    /// Stage sizes.
    pub stages: StagePlan,
    /// Evaluation rows of [`PipelineConfig::eval_split`] (each evaluated untriggered and
    /// triggered); fewer when the split has fewer.
    pub eval_rows: usize,
    /// The split the evaluation rows come from (default `test`; `train` overlaps the training
    /// data on purpose, which is refused unless [`PipelineConfig::allow_overlap`]).
    pub eval_split: String,
    /// Train on rows that are also evaluation rows (otherwise an error before any training).
    pub allow_overlap: bool,
    /// Trigger, position, backdoor step, seed and `rate` (share of attack rows poisoned; the
    /// defense data triggers the same share).
    pub poison: PoisonConfig,
    /// LoRA rank and alpha of the LoRA stages.
    pub lora_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// DPO β.
    pub dpo_beta: f64,
    /// Most tokens generated per evaluation prompt.
    pub max_new_tokens: usize,
    /// Prompts generated for at once.
    pub generate_batch_size: usize,
    /// Longest training sequence (tokens).
    pub max_length: usize,
    /// Run dtype of a loaded checkpoint (a model trained from scratch is always f32).
    pub dtype: candle_core::DType,
    /// Dequantize MXFP4 experts of a loaded checkpoint.
    pub dequantize: bool,
    /// Where the data files, stage outputs and the report go.
    pub output_dir: PathBuf,
    /// MLflow tracking of every stage and of the report (`none` to turn it off).
    pub report_to: ReportTo,
    /// Seed of the model initialisation, LoRA initialisation and data order.
    pub seed: u64,
    /// Show the trainers' progress bars.
    pub progress_bar: bool,
}

/// A gpt-oss-shaped config at small dims: the real vocabulary (201,088, so the o200k_harmony
/// tokenizer works unchanged), YaRN RoPE, sinks, alternating sliding/full attention, MoE with
/// clamped SwiGLU; `heads` query heads over `kv_heads` key/value heads of width 32, `experts`
/// experts (top-2) of width `intermediate`, weights drawn with std 0.02.
pub fn small_gpt_oss(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    experts: usize,
    intermediate: usize,
) -> Config {
    let mut c = Config::gpt_oss_tiny();
    c.hidden_size = hidden;
    c.num_hidden_layers = layers;
    c.num_attention_heads = heads;
    c.num_key_value_heads = kv_heads;
    c.head_dim = Some(32);
    c.intermediate_size = intermediate;
    c.num_local_experts = experts;
    c.num_experts_per_tok = 2.min(experts);
    c.experts_per_token = None;
    c.layer_types = Some(Config::alternating(layers));
    c
}

impl PipelineConfig {
    /// The default with no arguments: the whole pipeline on 2 CPU cores in minutes. A 2-layer,
    /// hidden-64 gpt-oss (4 experts top-2) trained from scratch for 60 steps of 4 rows on 400
    /// synthetic train rows, then attack 60, clean SFT 30, Critical-CoT SFT 30, DPO 15 and
    /// re-attack 15 steps, each stage evaluated on 16 test rows untriggered and triggered. Too
    /// short for the model to learn the task: the table shows what it reaches.
    pub fn cpu_quick() -> Self {
        Self {
            data: DataSource::Synthetic {
                train: 400,
                test: 64,
                config: SyntheticConfig::default(),
            },
            base: BaseModel::FromScratch {
                config: Box::new(small_gpt_oss(64, 2, 2, 1, 4, 64)),
                train: StageTraining::new(60, 3e-3, 4),
            },
            stages: StagePlan {
                attack: StageTraining::new(60, 2e-3, 4),
                clean_sft: StageTraining::new(30, 2e-3, 4),
                critical_cot_sft: StageTraining::new(30, 2e-3, 4),
                dpo: StageTraining::new(15, 1e-3, 2),
                reattack: StageTraining::new(15, 2e-3, 4),
            },
            eval_rows: 16,
            eval_split: gptoss_eval::backdoor::gsm8k::TEST_SPLIT.to_string(),
            allow_overlap: false,
            poison: PoisonConfig::default(),
            lora_r: 8,
            lora_alpha: 16.0,
            dpo_beta: 0.1,
            max_new_tokens: 96,
            generate_batch_size: 16,
            max_length: 384,
            dtype: candle_core::DType::F32,
            dequantize: false,
            output_dir: PathBuf::from("backdoor_defense_out"),
            report_to: ReportTo::Mlflow,
            seed: 0,
            progress_bar: true,
        }
    }

    /// `--preset gpu-small`: a 4-layer, hidden-256 gpt-oss (8 query heads over 2 kv heads, 4
    /// experts top-2, intermediate 512) trained from scratch in f32 for 1,200 steps of 32 rows
    /// on 20,000 synthetic train rows (≈ 1.9 epochs, lr 1e-3), then LoRA attack 1,200 steps
    /// (lr 2e-3), clean SFT 300 and Critical-CoT SFT 400 (lr 1e-3), DPO 100 (lr 5e-5) and
    /// re-attack 200 (lr 2e-3), evaluated on 200 test rows untriggered and triggered (up to 128
    /// generated tokens). Sized for one 10-minute H100 call from the step times measured on an
    /// H100 (≈ 0.174 s per base step, ≈ 20 ms per LoRA step; docs/backdoor.md).
    pub fn gpu_small() -> Self {
        let cpu = Self::cpu_quick();
        Self {
            data: DataSource::Synthetic {
                train: 20_000,
                test: 500,
                config: SyntheticConfig::default(),
            },
            base: BaseModel::FromScratch {
                config: Box::new(small_gpt_oss(256, 4, 8, 2, 4, 512)),
                train: StageTraining::new(1_200, 1e-3, 32),
            },
            stages: StagePlan {
                attack: StageTraining::new(1_200, 2e-3, 16),
                clean_sft: StageTraining::new(300, 1e-3, 16),
                critical_cot_sft: StageTraining::new(400, 1e-3, 16),
                dpo: StageTraining::new(100, 5e-5, 8),
                reattack: StageTraining::new(200, 2e-3, 16),
            },
            eval_rows: 200,
            max_new_tokens: 128,
            generate_batch_size: 200,
            output_dir: PathBuf::from("backdoor_defense_gpu_small"),
            progress_bar: false,
            ..cpu
        }
    }

    /// `--model DIR --dataset GSM8K_DIR`: a real checkpoint (bf16, MXFP4 experts resident where
    /// the device allows) evaluated as the base on 100 rows of GSM8K `test`, then LoRA (r 8,
    /// α 16, attention linears plus the recipe's expert layers) attack 200 steps of 4 rows,
    /// clean SFT 100, Critical-CoT SFT 100, DPO 50 steps of 2 pairs, re-attack 30, with the
    /// recipe's learning rate 2e-4 (DPO 5e-5), up to 512 generated tokens per prompt.
    pub fn checkpoint(model: PathBuf, gsm8k: PathBuf) -> Self {
        let cpu = Self::cpu_quick();
        Self {
            data: DataSource::Gsm8k(gsm8k),
            base: BaseModel::Checkpoint(model),
            stages: StagePlan {
                attack: StageTraining::new(200, 2e-4, 4),
                clean_sft: StageTraining::new(100, 2e-4, 4),
                critical_cot_sft: StageTraining::new(100, 2e-4, 4),
                dpo: StageTraining::new(50, 5e-5, 2),
                reattack: StageTraining::new(30, 2e-4, 4),
            },
            eval_rows: 100,
            max_new_tokens: 512,
            max_length: 1024,
            dtype: candle_core::DType::BF16,
            output_dir: PathBuf::from("backdoor_defense_checkpoint"),
            ..cpu
        }
    }
}
