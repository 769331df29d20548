//! Chat with gpt-oss (optionally with a PEFT LoRA adapter, merged or not), streaming each harmony
//! channel (analysis, final) as it is generated.
//!
//! ```text
//! cargo run --release --example generate -- --model /path/to/gpt-oss-20b \
//!     --adapter gpt-oss-20b-multilingual-reasoner --merge \
//!     --reasoning-language German --prompt "¿Cuál es el capital de Australia?"
//! # without --model: the random demo model of `finetune_multilingual` (same seed), e.g. with its adapter:
//! cargo run --release --example generate -- --adapter finetune_multilingual_demo --max-new-tokens 48
//! ```

use std::path::PathBuf;

use candle_core::DType;
use clap::Parser;
use gptoss_harmony::HarmonyTokenizer;
use gptoss_lora::LoraModel;
use gptoss_sft::trainer::pipeline::demo_model_config;
use gptoss_sft::trainer::{
    chat_generate, chat_prompt, cookbook_generation_config, print_channel_deltas,
};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Generate with gpt-oss (+ optional LoRA adapter), streaming each channel")]
struct Cli {
    /// Base model directory (HF layout). Default: the random demo model of `finetune_multilingual`.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Dequantize MXFP4 experts to dense bf16 at load (default: resident on CUDA).
    #[arg(long)]
    dequantize: bool,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Merge the adapter into the base weights before generating (PEFT merge_and_unload).
    #[arg(long)]
    merge: bool,
    /// Run dtype of `--model`: bf16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// The system message is "reasoning language: <this>".
    #[arg(long, default_value = "German")]
    reasoning_language: String,
    /// The user prompt.
    #[arg(long, default_value = "¿Cuál es el capital de Australia?")]
    prompt: String,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.6)]
    temperature: f64,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Most tokens generated.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling seed (also the demo model's init seed).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The chat template's `Current date` (YYYY-MM-DD).
    #[arg(long)]
    date: Option<String>,
}

fn main() -> std::process::ExitCode {
    gptoss::cli::run(|| run().map(|()| gptoss::cli::Outcome::Done))
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    gptoss_sft::trainer::pipeline::tune_cpu_runtime();
    let device = gptoss_kernels::cuda_if_available(0)?;
    let (mut model, tok) = match &cli.model {
        Some(dir) => {
            let dtype = match cli.dtype.as_str() {
                "f32" => DType::F32,
                "bf16" => DType::BF16,
                other => return Err(format!("--dtype: expected bf16 or f32, got {other}").into()),
            };
            let tok_file = dir.join("tokenizer.json");
            let tok = if tok_file.is_file() {
                HarmonyTokenizer::from_file(&tok_file)?
            } else {
                HarmonyTokenizer::o200k_harmony()?
            };
            let opts = gptoss_model::LoadOptions::dequantized_if(dtype, cli.dequantize);
            (gptoss_model::load_with(dir, &device, &opts)?, tok)
        }
        None => {
            eprintln!("no --model: using the random demo model (its output is gibberish)");
            let m = gptoss_model::init_random(
                &demo_model_config(),
                DType::F32,
                &device,
                Some(cli.seed),
            )?;
            (m, HarmonyTokenizer::o200k_harmony()?)
        }
    };
    // Keep the adapter alive for the whole generation (its hooks are installed on the model).
    let _lora = match &cli.adapter {
        Some(dir) => {
            let lora = LoraModel::from_pretrained(&mut model, dir)?;
            eprintln!(
                "adapter {}: {}",
                dir.display(),
                lora.trainable_parameters_line()
            );
            if cli.merge {
                lora.merge_and_unload(&mut model)?;
                eprintln!("adapter merged into the base weights");
                None
            } else {
                Some(lora)
            }
        }
        None => None,
    };
    let mut gen = cookbook_generation_config();
    gen.temperature = cli.temperature;
    gen.top_p = cli.top_p;
    gen.top_k = cli.top_k;
    gen.max_new_tokens = cli.max_new_tokens;
    gen.seed = cli.seed;
    let prompt = chat_prompt(
        &tok,
        &cli.reasoning_language,
        &cli.prompt,
        cli.date.as_deref(),
    )?;
    println!(
        "system: reasoning language: {}\nuser: {}",
        cli.reasoning_language, cli.prompt
    );
    let reply = chat_generate(&model, &tok, &prompt, gen, &mut print_channel_deltas())?;
    if !reply.other.is_empty() {
        println!("\n[outside any channel] {}", reply.other);
    }
    println!("\n({} tokens generated)", reply.tokens.len());
    Ok(())
}
