//! Export a gpt-oss checkpoint, with a PEFT LoRA adapter merged in, as a checkpoint that
//! transformers (and vLLM) load: bf16, or with the experts re-quantized to MXFP4 as the released
//! checkpoints store them, or as one llama.cpp GGUF file (`docs/export.md`).
//!
//! ```text
//! cargo run --release --example export -- --model /path/to/gpt-oss-20b \
//!     --adapter gpt-oss-20b-multilingual-reasoner --out gpt-oss-20b-merged --format mxfp4
//! cargo run --release --example export -- --model /path/to/gpt-oss-20b \
//!     --adapter gpt-oss-20b-multilingual-reasoner --out gpt-oss-20b-merged.gguf --format gguf
//! ```
//! The export streams: each tensor is read from the memory-mapped checkpoint, the adapter's delta
//! added, and written before the next one is read (`gptoss_model::export::export_checkpoint`), so
//! host memory stays near one tensor whatever the model size. Exit status 1 on any error (message
//! names the file or tensor and what was expected); a failed export leaves no complete-looking
//! `--out`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use clap::Parser;
use gptoss_lora::{AdapterMerge, LoraModel};
use gptoss_model::export::{
    export_checkpoint, ExportFormat, ExportOptions, DEFAULT_MAX_SHARD_BYTES,
};
use gptoss_model::{
    load_with, logit_gap, probe_tokens, Config, ExpertLoading, LoadOptions, WeightDelta,
};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Export a gpt-oss checkpoint (+ merged LoRA adapter) as bf16 or MXFP4")]
struct Cli {
    /// Base model directory (HF layout: config.json, safetensors, tokenizer files).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// PEFT adapter directory to merge (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Output directory (must be absent or empty unless --overwrite); gguf: the output file.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// bf16, mxfp4 or gguf (one llama.cpp file, experts MXFP4; see docs/export.md).
    #[arg(long, default_value = "bf16")]
    format: String,
    /// Replace a non-empty output directory.
    #[arg(long)]
    overwrite: bool,
    /// Stored float dtype: bf16 (default), f16 or f32 (f32 keeps a merge exact).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// dtype the adapted weights are merged in: f32 (default, one rounding at export) or bf16 (as
    /// merging a bf16 model would).
    #[arg(long, default_value = "f32")]
    merge_dtype: String,
    /// Largest shard in GB (10^9 bytes).
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES as f64 / 1e9)]
    shard_gb: f64,
    /// After exporting, load the base model with the adapter merged in memory and the export,
    /// and report their logit gap on a probe of this many tokens (0: off; needs memory for two
    /// models).
    #[arg(long, default_value_t = 0)]
    probe_tokens: usize,
    /// With --probe-tokens: write the probe (`input_ids` i64 `[1, T]`) and the logits of the
    /// export loaded back (`logits` f32 `[1, T, V]`) to this safetensors file, for
    /// scripts/fixtures/export/check_export.py.
    #[arg(long, value_name = "FILE")]
    probe_logits: Option<PathBuf>,
    /// Write the report (files, per-tensor MXFP4 error, logit gap) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

fn dtype(arg: &str, s: &str) -> Result<DType, String> {
    match s {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => Err(format!("--{arg} {other:?}: expected bf16, f16 or f32")),
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let format: ExportFormat = cli.format.parse()?;
    if format == ExportFormat::Gguf && cli.probe_tokens > 0 {
        return Err(
            "--probe-tokens: a gguf export cannot be loaded back here (llama.cpp reads it); \
                    check it with scripts/fixtures/export/check_export.py OUT.gguf CHECKPOINT"
                .into(),
        );
    }
    if cli.shard_gb.is_nan() || cli.shard_gb <= 0.0 {
        return Err(format!("--shard-gb {}: expected a positive size", cli.shard_gb).into());
    }
    if cli.probe_logits.is_some() && cli.probe_tokens == 0 {
        return Err("--probe-logits needs --probe-tokens N (N > 0)".into());
    }
    let merge_dtype = dtype("merge-dtype", &cli.merge_dtype)?;
    let merge = match &cli.adapter {
        Some(dir) => {
            let base = Config::from_file(cli.model.join("config.json"))?;
            let m = AdapterMerge::from_pretrained(dir, &base)
                .map_err(|e| format!("adapter {}: {e}", dir.display()))?;
            println!(
                "merging {}: {}",
                dir.display(),
                m.trainable_parameters_line()
            );
            Some(m)
        }
        None => None,
    };
    let mut opts = ExportOptions::new(format);
    opts.overwrite = cli.overwrite;
    opts.source_dir = Some(cli.model.clone());
    opts.dtype = dtype("dtype", &cli.dtype)?;
    opts.merge_dtype = merge_dtype;
    opts.max_shard_bytes = (cli.shard_gb * 1e9) as u64;
    let t = Instant::now();
    let delta = merge.as_ref().map(|m| m as &dyn WeightDelta);
    let report = export_checkpoint(&cli.model, delta, &cli.out, &opts)?;
    println!("{} in {:.1} s", report.summary(), t.elapsed().as_secs_f64());
    for q in report.quantization.iter().filter(|q| q.requantized) {
        println!(
            "  {}: relative RMS error {:.4}, max abs error {:.3e}",
            q.name, q.rel_rms, q.max_abs
        );
    }
    let mut json = report.to_json();
    if cli.probe_tokens > 0 {
        let device = gptoss_kernels::cuda_if_available(0)?;
        let load_opts = LoadOptions {
            dtype: merge_dtype,
            experts: ExpertLoading::Resident,
        };
        let mut model = load_with(&cli.model, &device, &load_opts)?;
        if let Some(dir) = &cli.adapter {
            LoraModel::from_pretrained(&mut model, dir)
                .map_err(|e| format!("adapter {}: {e}", dir.display()))?
                .merge_and_unload(&mut model)?;
        }
        let back = load_with(&cli.out, &device, &load_opts)?;
        let ids = probe_tokens(model.config().vocab_size, cli.probe_tokens, &device)?;
        let gap = logit_gap(&model, &back, &ids)?;
        println!(
            "logit gap on {} probe tokens: max abs {:.3e}, relative RMS {:.3e}",
            cli.probe_tokens, gap.max_abs, gap.rel_rms
        );
        json["logit_gap"] = serde_json::json!({ "tokens": cli.probe_tokens, "max_abs": gap.max_abs, "rel_rms": gap.rel_rms });
        if let Some(path) = &cli.probe_logits {
            let logits = back.forward(&ids, None)?.to_dtype(DType::F32)?;
            let tensors = std::collections::HashMap::from([
                ("input_ids".to_string(), ids.to_dtype(DType::I64)?),
                ("logits".to_string(), logits),
            ]);
            candle_core::safetensors::save(&tensors, path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if let Some(path) = &cli.report {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
