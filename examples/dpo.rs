//! DPO of gpt-oss with LoRA (TRL `DPOTrainer` semantics): the reference model is the same network
//! with the adapter disabled, so no second copy of the model is loaded.
//!
//! ```text
//! cargo run --release --example dpo -- --model /path/to/gpt-oss-20b --dataset prefs.jsonl
//! cargo run --release --example dpo -- --config dpo.yaml --loss-type ipo --beta 0.5
//! ```
//! The dataset follows TRL's preference schema (`prompt`, `chosen`, `rejected`: strings or lists of
//! messages); every option is a flag (`--help`) or a YAML key (SFT sections plus `dpo:`). On CUDA
//! the MXFP4 experts stay resident (unless `--dequantize`); errors print as sentences (exit 1) and
//! Ctrl-C saves a checkpoint and exits 130 with the resume command.

use clap::Parser;
use gptoss::cli::Outcome;
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

fn main() -> std::process::ExitCode {
    gptoss::cli::run(run)
}

fn run() -> Result<Outcome, gptoss::cli::Error> {
    let cli = Cli::parse();
    gptoss_sft::trainer::pipeline::tune_cpu_runtime();
    let (cfg, dpo) = cli.dpo.resolve()?;
    let dir = cfg
        .model_name_or_path
        .clone()
        .ok_or("--model (or model.name_or_path) is required for DPO")?;
    let dtype = gptoss::cli::run_dtype(&cli.dtype)?;
    if gptoss_sft::distributed::LaunchEnv::from_env()?.is_distributed() {
        return Err(
            "DPO runs on one GPU only (docs/multi-gpu.md): launch it without torchrun / \
                    srun / mpirun ranks"
                .into(),
        );
    }
    let device = gptoss_kernels::cuda_if_available(0)?;
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let mut model = gptoss::cli::load_model(&dir, &device, dtype, cfg.dequantize)?;
    let out = run_dpo(&mut model, &cfg, &dpo, &tok)?;
    if let Some(loc) = &out.mlflow {
        println!("MLflow run: {loc}");
    }
    let batch = format!(
        "{} pairs of at most {} tokens per micro-batch",
        cfg.per_device_train_batch_size, cfg.max_length
    );
    Ok(gptoss::cli::report_run_end(
        out.steady_step_secs,
        out.peak_memory,
        &batch,
        &out.outcome,
        &out.adapter_dir,
    ))
}
