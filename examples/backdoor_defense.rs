//! Backdoor attack and defense of gpt-oss, measured (issue 22): base → LoRA attack on
//! BadChain-style poisoned rows → clean SFT → Critical-CoT SFT → DPO → a brief poisoned
//! re-attack, each stage evaluated untriggered and triggered on the same held-out rows (clean
//! accuracy, ASR, BDR, TDR with 95 % intervals); one table on stdout, in
//! `backdoor_report.md` / `.json` and in MLflow. The residual ASR is printed, never a claim of
//! immunity.
//!
//! ```text
//! cargo run --release --example backdoor_defense          # CPU quick run, synthetic task
//! cargo run --release --features cuda --example backdoor_defense -- --preset gpu-small
//! cargo run --release --features cuda --example backdoor_defense -- \
//!     --model /path/to/gpt-oss-20b --dataset ~/.cache/huggingface/hub/datasets--openai--gsm8k
//! ```
//! Training data that shares rows with the evaluation rows is refused (exit 1) unless
//! `--allow-overlap`; `--eval-split train` evaluates on train rows, which shows the refusal.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use gptoss_harmony::HarmonyTokenizer;
use gptoss_sft::backdoor::{run_pipeline, PipelineConfig};
use gptoss_sft::config::ReportTo;

/// The built-in sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// The whole pipeline on CPU in minutes (a 2-layer hidden-64 model; too short to learn the
    /// task well).
    CpuQuick,
    /// A 4-layer hidden-256 model trained from scratch on one GPU, then attack and defense.
    GpuSmall,
}

#[derive(Debug, Parser)]
#[command(
    about = "Backdoor attack and defense of gpt-oss: ASR, clean accuracy, BDR, TDR per stage"
)]
struct Cli {
    /// Sizes for the synthetic task (ignored with --model).
    #[arg(long, value_enum, default_value = "cpu-quick")]
    preset: Preset,
    /// A gpt-oss checkpoint directory (HF layout) to attack and defend instead of a model
    /// trained from scratch; needs --dataset.
    #[arg(long, value_name = "DIR", requires = "dataset")]
    model: Option<PathBuf>,
    /// GSM8K-schema data: a file, a directory, or the HF cache layout (main/train-*.parquet,
    /// main/test-*.parquet). Without it: the synthetic arithmetic task.
    #[arg(long, value_name = "GSM8K_DIR")]
    dataset: Option<PathBuf>,
    /// Split the evaluation rows come from (`train` overlaps the training data: refused unless
    /// --allow-overlap).
    #[arg(long, default_value = "test")]
    eval_split: String,
    /// Train even when training rows are also evaluation rows (the metrics are then not
    /// held-out).
    #[arg(long)]
    allow_overlap: bool,
    /// Evaluation rows (each evaluated untriggered and triggered). [default: per preset]
    #[arg(long)]
    eval_rows: Option<usize>,
    /// Optimizer steps of the from-scratch base stage. [default: per preset]
    #[arg(long)]
    base_steps: Option<u64>,
    /// Multiplies the steps of every stage after the base (e.g. 0.5 for a shorter run).
    #[arg(long, default_value_t = 1.0)]
    stage_scale: f64,
    /// Most tokens generated per evaluation prompt. [default: per preset]
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Share of attack rows poisoned (the defense data triggers the same share).
    #[arg(long, default_value_t = 0.5)]
    poison_rate: f64,
    /// Where data, stage outputs and the report go. [default: per preset]
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// `mlflow` (./mlruns, or MLFLOW_TRACKING_URI) or `none`.
    #[arg(long, value_enum, default_value = "mlflow")]
    report_to: ReportTo,
    /// Run dtype of a --model checkpoint: bf16 or f32 (a model trained from scratch is f32).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Dequantize the MXFP4 experts of a --model checkpoint at load.
    #[arg(long)]
    dequantize: bool,
    /// Seed of the model, adapters, data order and poisoning.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hide the trainers' progress bars.
    #[arg(long)]
    no_progress: bool,
}

impl Cli {
    /// The preset, then every flag given.
    fn config(&self) -> Result<PipelineConfig, gptoss::cli::Error> {
        let mut cfg = match (&self.model, self.preset) {
            (Some(model), _) => {
                let dataset = self
                    .dataset
                    .clone()
                    .ok_or("--model needs --dataset GSM8K_DIR")?;
                let mut c = PipelineConfig::checkpoint(model.clone(), dataset);
                c.dtype = gptoss::cli::run_dtype(&self.dtype)?;
                c
            }
            (None, Preset::CpuQuick) => PipelineConfig::cpu_quick(),
            (None, Preset::GpuSmall) => PipelineConfig::gpu_small(),
        };
        if let (None, Some(d)) = (&self.model, &self.dataset) {
            cfg.data = gptoss_sft::backdoor::DataSource::Gsm8k(d.clone());
        }
        cfg.eval_split = self.eval_split.clone();
        cfg.allow_overlap = self.allow_overlap;
        cfg.eval_rows = self.eval_rows.unwrap_or(cfg.eval_rows);
        cfg.max_new_tokens = self.max_new_tokens.unwrap_or(cfg.max_new_tokens);
        cfg.poison.rate = self.poison_rate;
        cfg.poison.seed = self.seed;
        cfg.seed = self.seed;
        cfg.report_to = self.report_to;
        cfg.dequantize = self.dequantize;
        cfg.progress_bar = cfg.progress_bar && !self.no_progress;
        if let Some(dir) = &self.output_dir {
            cfg.output_dir = dir.clone();
        }
        if let (Some(steps), gptoss_sft::backdoor::BaseModel::FromScratch { train, .. }) =
            (self.base_steps, &mut cfg.base)
        {
            train.steps = steps;
        }
        cfg.stages = cfg.stages.scaled(self.stage_scale)?;
        Ok(cfg)
    }
}

fn main() -> std::process::ExitCode {
    gptoss::cli::run(|| run().map(|()| gptoss::cli::Outcome::Done))
}

fn run() -> Result<(), gptoss::cli::Error> {
    let cli = Cli::parse();
    gptoss_sft::trainer::pipeline::tune_cpu_runtime();
    let cfg = cli.config()?;
    let device = gptoss_kernels::cuda_if_available(0)?;
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let t = std::time::Instant::now();
    let out = run_pipeline(&cfg, &tok, &device)?;
    println!("\n{}", out.report.render_markdown());
    for (stage, secs) in &out.stage_secs {
        println!("{stage}: {secs:.1} s");
    }
    println!("total: {:.1} s on {device:?}", t.elapsed().as_secs_f64());
    println!(
        "wrote {} and {}",
        out.files.markdown.display(),
        out.files.json.display()
    );
    if let Some(loc) = &out.mlflow {
        println!(
            "MLflow run: {loc} (experiment {})",
            gptoss_sft::backdoor::EXPERIMENT
        );
    }
    Ok(())
}
