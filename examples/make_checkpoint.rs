//! Writes a synthetic gpt-oss checkpoint: seeded random weights in exactly the Hugging Face layout
//! of the released `openai/gpt-oss-*` checkpoints (config.json with quantization_config, sharded
//! safetensors + model.safetensors.index.json, MXFP4 experts, bf16 elsewhere, generation_config.json,
//! chat template and tokenizer files), to measure real loading and training where no hub exists.
//!
//! ```text
//! cargo run --release --example make_checkpoint -- --arch tiny --out /tmp/tiny-gpt-oss
//! cargo run --release --example make_checkpoint -- --arch 20b --out /dev/shm/gpt-oss-20b-synthetic
//! # plus a random PEFT adapter with the cookbook's targets, for `export --adapter`
//! cargo run --release --example make_checkpoint -- --arch 20b --out /dev/shm/gpt-oss-20b-synthetic \
//!     --adapter /dev/shm/gpt-oss-20b-adapter
//! ```
//! Sizes: tiny ≈ 0.1 GB, 20b ≈ 13.8 GB, 120b ≈ 65 GB (check free space first; `/dev/shm` is RAM).
//! The values are uniform noise: the model speaks gibberish, it is for speed and memory figures.

use std::time::Instant;

use clap::{Parser, ValueEnum};
use gptoss_model::{write_synthetic_checkpoint, Config, SyntheticOptions};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Arch {
    /// gpt-oss at tiny dims with the real vocabulary (CPU tests, seconds).
    Tiny,
    /// openai/gpt-oss-20b: 24 layers, 32 experts.
    #[value(name = "20b")]
    B20,
    /// openai/gpt-oss-120b: 36 layers, 128 experts.
    #[value(name = "120b")]
    B120,
}

#[derive(Debug, Parser)]
#[command(about = "Write a seeded random gpt-oss checkpoint in the Hugging Face layout")]
struct Cli {
    /// Architecture.
    #[arg(long, value_enum, default_value = "tiny")]
    arch: Arch,
    /// Output directory (created; must be empty or absent unless --overwrite).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Seed of every value.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard, in GB (10^9 bytes).
    #[arg(long, default_value_t = 5.0)]
    shard_gb: f64,
    /// Dense bf16 experts instead of MXFP4 blocks/scales.
    #[arg(long)]
    dense_experts: bool,
    /// Write into a non-empty directory.
    #[arg(long)]
    overwrite: bool,
    /// Also write a PEFT adapter for this checkpoint into this directory: the cookbook's targets
    /// (r 8, alpha 16, attention + the experts of layers 7, 15, 23, those that exist), A and B
    /// seeded uniform in ±0.01 (B nonzero, so merging changes every targeted weight), for
    /// measuring `export --adapter`.
    #[arg(long, value_name = "DIR")]
    adapter: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    gptoss::cli::run(|| run().map(|()| gptoss::cli::Outcome::Done))
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let config = match cli.arch {
        Arch::Tiny => Config::gpt_oss_tiny(),
        Arch::B20 => Config::gpt_oss_20b(),
        Arch::B120 => Config::gpt_oss_120b(),
    };
    let non_empty = std::fs::read_dir(&cli.out).is_ok_and(|mut d| d.next().is_some());
    if non_empty && !cli.overwrite {
        return Err(format!(
            "{} is not empty; choose another --out or pass --overwrite",
            cli.out.display()
        )
        .into());
    }
    let opts = SyntheticOptions {
        seed: cli.seed,
        max_shard_bytes: (cli.shard_gb * 1e9) as usize,
        mxfp4_experts: !cli.dense_experts,
    };
    let t = Instant::now();
    let summary = write_synthetic_checkpoint(&cli.out, &config, &opts)?;
    gptoss_sft::trainer::pipeline::write_tokenizer_files(&cli.out)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "wrote {} ({} tensors, {:.2} GB in {} shards) in {secs:.1} s ({:.2} GB/s)",
        cli.out.display(),
        summary.tensors,
        summary.total_bytes as f64 / 1e9,
        summary.shards.len(),
        summary.total_bytes as f64 / 1e9 / secs.max(1e-9)
    );
    if let Some(dir) = &cli.adapter {
        let mut lora = gptoss_lora::LoraConfig::cookbook();
        let layers = config.num_hidden_layers;
        lora.target_parameters = lora.target_parameters.map(|ps| {
            ps.into_iter()
                .filter(|p| {
                    p.split('.')
                        .next()
                        .and_then(|l| l.parse::<usize>().ok())
                        .is_some_and(|l| l < layers)
                })
                .collect()
        });
        let plan = gptoss_lora::write_random_adapter(dir, &lora, &config, cli.seed, 0.01)?;
        println!(
            "wrote adapter {}: {}",
            dir.display(),
            plan.trainable_parameters_line()
        );
    }
    Ok(())
}
