//! DPO of gpt-oss with LoRA (TRL `DPOTrainer` semantics): the reference model is the same network
//! with the adapter disabled, so no second copy of the model is loaded.
//!
//! ```text
//! cargo run --release --example dpo -- --model /path/to/gpt-oss-20b --dataset prefs.jsonl
//! cargo run --release --example dpo -- --config dpo.yaml --loss-type ipo --beta 0.5
//! ```
//! The dataset follows TRL's preference schema (`prompt`, `chosen`, `rejected`: strings or lists of
//! messages); every option is a flag (`--help`) or a YAML key (SFT sections plus `dpo:`).

use clap::Parser;
use gptoss_harmony::HarmonyTokenizer;
use gptoss_sft::dpo::{run_dpo, DpoArgs};

/// Command line: every trainer option plus the DPO ones.
#[derive(Debug, Parser)]
#[command(about = "LoRA DPO of gpt-oss on a preference dataset (TRL schema)")]
struct Cli {
    #[command(flatten)]
    dpo: DpoArgs,
    /// Run dtype of the checkpoint: bf16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    gptoss_sft::trainer::pipeline::tune_cpu_runtime();
    let (cfg, dpo) = cli.dpo.resolve()?;
    let dir = cfg
        .model_name_or_path
        .clone()
        .ok_or("--model (or model.name_or_path) is required for DPO")?;
    let dtype = match cli.dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        other => return Err(format!("--dtype: expected bf16 or f32, got {other}").into()),
    };
    let device = gptoss_kernels::cuda_if_available(0)?;
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let opts = gptoss_model::LoadOptions::dequantized_if(dtype, cfg.dequantize);
    let mut model = gptoss_model::load_with(&dir, &device, &opts)?;
    let out = run_dpo(&mut model, &cfg, &dpo, &tok)?;
    if let Some(loc) = &out.mlflow {
        println!("MLflow run: {loc}");
    }
    println!("adapter saved to {}", out.adapter_dir.display());
    if out.outcome.interrupted {
        println!("interrupted: checkpoint {:?}", out.outcome.last_checkpoint);
    }
    Ok(())
}
