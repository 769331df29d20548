//! Evaluate a base model and one or more LoRA adapters side by side on held-out rows:
//! reasoning-language accuracy (analysis channel vs the system prompt's `reasoning language:`),
//! final-channel language, Harmony format validity, answer accuracy (rows with an `answer`),
//! teacher-forced eval loss / perplexity. Writes eval.json, eval.md and a PNG bar chart.
//!
//! ```text
//! cargo run --release --example finetune_multilingual          # the demo, then:
//! cargo run --release --example evaluate -- --adapter finetune_multilingual_demo
//! cargo run --release --features cuda --example evaluate -- --model /path/to/gpt-oss-20b \
//!     --adapter run-a --adapter run-b --dataset eval.jsonl --rows 200
//! ```
//! Without `--dataset`, the rows are those the adapter's training run held out (its
//! `training_args.json`: `eval_dataset`, or the same seeded `eval_split`); without `--model`, the
//! base is the adapter's `base_model_name_or_path`.

use std::path::{Path, PathBuf};

use clap::Parser;
use gptoss_harmony::HarmonyTokenizer;
use gptoss_lora::{LoraConfig, LoraModel};
use gptoss_sft::checkpoint::TRAINING_ARGS_FILE;
use gptoss_sft::config::TrainingConfig;
use gptoss_sft::evaluation::{evaluate_now, load_eval_set};
use gptoss_sft::trainer::pipeline::BUNDLED_DATASET;

#[derive(Debug, Parser)]
#[command(
    about = "Evaluate gpt-oss base and LoRA adapters: reasoning language, format, answers, eval loss"
)]
struct Cli {
    /// Base model directory (HF layout). [default: the first adapter's base_model_name_or_path]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// A PEFT adapter directory; repeat to compare several (each is loaded onto the base, scored,
    /// and unloaded again).
    #[arg(long, value_name = "DIR")]
    adapter: Vec<PathBuf>,
    /// Do not score the base model itself.
    #[arg(long)]
    no_base: bool,
    /// Eval rows: .jsonl/.json/.parquet file, directory, or HF id in the local cache (every row
    /// is used). [default: the rows the first adapter's training run held out, else the bundled
    /// sample]
    #[arg(long)]
    dataset: Option<String>,
    /// Hold out this seeded fraction of --dataset instead of using all of it.
    #[arg(long)]
    eval_split: Option<f64>,
    /// Rows generated for (the eval loss always covers every eval row).
    #[arg(long, default_value_t = 32)]
    rows: usize,
    /// Most tokens generated per row.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Where eval.json / eval.md / the PNG go. [default: <first adapter>/eval, else ./eval]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Run dtype: f32 or bf16. [default: bf16 on CUDA, f32 on the CPU]
    #[arg(long)]
    dtype: Option<String>,
    /// Dequantize MXFP4 experts at load instead of keeping them resident (CUDA).
    #[arg(long)]
    dequantize: bool,
}

/// The training config of the run that wrote `adapter` (its `training_args.json`), if any.
fn training_args(adapter: &Path) -> Result<Option<TrainingConfig>, Box<dyn std::error::Error>> {
    let path = adapter.join(TRAINING_ARGS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(cfg))
}

fn main() -> std::process::ExitCode {
    gptoss::cli::run(|| run().map(|()| gptoss::cli::Outcome::Done))
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    gptoss_sft::trainer::pipeline::tune_cpu_runtime();
    if cli.no_base && cli.adapter.is_empty() {
        return Err("nothing to evaluate: --no-base needs at least one --adapter DIR".into());
    }
    // The eval rows: the first adapter's run config, overridden by --dataset / --eval-split.
    let first = cli.adapter.first();
    let mut cfg = match first {
        Some(a) => training_args(a)?.unwrap_or_default(),
        None => TrainingConfig::default(),
    };
    if cli.dataset.is_some() || cli.eval_split.is_some() {
        cfg.dataset = cli.dataset.clone().or(cfg.dataset);
        cfg.eval_dataset = None;
        cfg.eval_split = cli.eval_split;
    }
    let base_dir = match (&cli.model, first) {
        (Some(m), _) => m.clone(),
        (None, Some(a)) => {
            let lc = LoraConfig::from_file(&a.join("adapter_config.json"))?;
            let named = lc.base_model_name_or_path.or_else(|| {
                cfg.model_name_or_path
                    .as_ref()
                    .map(|p| p.display().to_string())
            });
            PathBuf::from(named.ok_or_else(|| {
                format!(
                    "{}: adapter_config.json names no base_model_name_or_path; pass --model DIR",
                    a.display()
                )
            })?)
        }
        (None, None) => return Err("pass --model DIR and/or --adapter DIR".into()),
    };
    let device = gptoss_kernels::cuda_if_available(0)?;
    let dtype = match cli.dtype.as_deref() {
        Some("f32") => candle_core::DType::F32,
        Some("bf16") => candle_core::DType::BF16,
        None if device.is_cuda() => candle_core::DType::BF16,
        None => candle_core::DType::F32,
        Some(other) => return Err(format!("--dtype: expected f32 or bf16, got {other}").into()),
    };
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let set = load_eval_set(&cfg, &tok, BUNDLED_DATASET)?;
    println!("eval rows: {} ({})", set.rows.len(), set.source);
    println!("loading {} ({dtype:?}) ...", base_dir.display());
    let opts = gptoss_model::LoadOptions::dequantized_if(dtype, cli.dequantize);
    let mut model = gptoss_model::load_with(&base_dir, &device, &opts)?;

    let score = |model: &gptoss_model::GptOssForCausalLM, label: &str| {
        evaluate_now(model, &tok, &cfg, &set, label, cli.rows, cli.max_new_tokens)
    };
    let mut models = Vec::new();
    if !cli.no_base {
        models.push(score(&model, "base")?);
    }
    for dir in &cli.adapter {
        let lora = LoraModel::from_pretrained(&mut model, dir)?;
        models.push(score(&model, &format!("adapter {}", dir.display()))?);
        lora.unload(&mut model)?;
    }
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| first.map_or(PathBuf::from("eval"), |a| a.join("eval")));
    let files = gptoss_eval::write_report(&out, &models)?;
    let labeled: Vec<_> = models.iter().map(|m| m.labeled()).collect();
    println!("\n{}", gptoss_eval::report::render_console(&labeled));
    println!(
        "wrote {}, {}, {}",
        files.json.display(),
        files.markdown.display(),
        files.chart.display()
    );
    Ok(())
}
