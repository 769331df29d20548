//! Decode benchmark of gpt-oss-20b (random weights created on the device) with the KV-cache generator.
//!
//! For each batch size: random prompts of `--prompt` tokens, greedy decoding of `--new` tokens with no
//! stop token; prints the prefill time and the decode throughput (generated tokens of all rows per
//! second, after the prefill step). As `benches/baseline_generate.py` does for transformers, each
//! batch size is first warmed up (a prefill and one decode step of other prompts, untimed); the
//! process's very first prefill (kernel loading, cuBLASLt heuristics) is printed on its own line.
//! With `GPTOSS_PROFILE` set, each batch size's decode steps are broken down by profile scope.
//! Experts are MXFP4-resident by default (each routed expert is decoded inside the grouped matmul
//! at every step); `--dense-experts` keeps them bf16.
//!
//! ```text
//! bench_generate [--batch 1,8] [--prompt 128] [--new 64] [--dense-experts] [--layers N] [--cpu --tiny]
//! # the batched API: 256 requests (prompt lengths prompt/2..=prompt), 256 new tokens each, 64 at a time
//! bench_generate --requests 256 --batch 64 --prompt 128 --new 256
//! ```
//! Build: `cargo build --release --features cuda --example bench_generate` (see docs/cuda.md).

use std::time::Instant;

use candle_core::{DType, Device};
use clap::Parser;
use gptoss_model::{
    generate_batch, init_random, init_random_packed, BatchOptions, Config, GenerationConfig,
    GenerationRequest, Generator,
};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Debug)]
#[command(about = "Prefill time and decode tokens/s of gpt-oss with the KV cache")]
struct Args {
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Prompt length (random tokens).
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Generated tokens per row.
    #[arg(long, default_value_t = 64)]
    new: usize,
    /// Random dense bf16 experts instead of MXFP4-resident ones.
    #[arg(long)]
    dense_experts: bool,
    /// Keep only the first N decoder layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Run on the CPU (for a smoke test; use with --tiny).
    #[arg(long)]
    cpu: bool,
    /// The tiny test configuration instead of gpt-oss-20b.
    #[arg(long)]
    tiny: bool,
    /// Seed of the weights and the prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Instead of the per-batch table: this many requests through the continuous-batching API
    /// (`generate_batch`, at most `--batch` (its first value) decoding together), prompt lengths drawn
    /// from `prompt/2..=prompt`; prints the total time.
    #[arg(long)]
    requests: Option<usize>,
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    let dev = if args.cpu {
        Device::Cpu
    } else {
        gptoss_kernels::cuda_device(0)?
    };
    let mut config = if args.tiny {
        Config::tiny()
    } else {
        Config::gpt_oss_20b()
    };
    if let Some(n) = args.layers {
        config.num_hidden_layers = n.min(config.num_hidden_layers);
        if let Some(t) = config.layer_types.as_mut() {
            t.truncate(config.num_hidden_layers);
        }
    }
    let dtype = if args.cpu { DType::F32 } else { DType::BF16 };
    let t0 = Instant::now();
    let model = if args.dense_experts {
        init_random(&config, dtype, &dev, Some(args.seed))?
    } else {
        init_random_packed(&config, dtype, &dev, Some(args.seed))?
    };
    dev.synchronize()?;
    println!(
        "model: {} layers, experts {}, built in {:.1} s; prompt {} tokens, {} new tokens, greedy",
        config.num_hidden_layers,
        if args.dense_experts {
            "dense bf16"
        } else {
            "MXFP4-resident"
        },
        t0.elapsed().as_secs_f64(),
        args.prompt,
        args.new
    );
    let vocab = (config.vocab_size as u64).min(199_000);
    let mut state = 0x2545_F491_4F6C_DD1Du64 ^ args.seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab) as u32
    };
    let pad_token_id = config
        .pad_token_id
        .filter(|&p| (p as usize) < config.vocab_size)
        .unwrap_or(config.vocab_size as u32 - 1);
    let greedy = GenerationConfig {
        max_new_tokens: args.new,
        temperature: 0.0,
        stop_tokens: Vec::new(),
        pad_token_id,
        ..GenerationConfig::default()
    };
    if let Some(n) = args.requests {
        let max_batch = args.batch.first().copied().unwrap_or(8);
        let lo = (args.prompt / 2).max(1);
        let requests: Vec<GenerationRequest> = (0..n)
            .map(|_| {
                let len = lo + next() as usize % (args.prompt - lo + 1);
                GenerationRequest {
                    prompt: (0..len).map(|_| next()).collect(),
                    config: greedy.clone(),
                }
            })
            .collect();
        let opts = BatchOptions {
            max_batch,
            pad_token_id,
        };
        dev.synchronize()?;
        let t = Instant::now();
        let out = generate_batch(&model, &requests, &opts, &mut |_| {})?;
        dev.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|o| o.tokens.len()).sum();
        println!(
            "generate_batch: {n} requests (prompts {lo}..={} tokens), {} new each, max_batch {max_batch}: \
             {secs:.2} s total, {:.1} generated tokens/s",
            args.prompt,
            args.new,
            generated as f64 / secs
        );
        return Ok(());
    }
    println!(
        "{:>6} {:>12} {:>14} {:>16}",
        "batch", "prefill_s", "decode_s/step", "decode_tokens/s"
    );
    let mut first_prefill = None;
    for &b in &args.batch {
        let mut random_prompts = || -> Vec<Vec<u32>> {
            (0..b)
                .map(|_| (0..args.prompt).map(|_| next()).collect())
                .collect()
        };
        let warm = random_prompts();
        let mut w = Generator::new(&model, &warm, greedy.clone())?;
        let t = Instant::now();
        w.step()?;
        dev.synchronize()?;
        first_prefill.get_or_insert(t.elapsed().as_secs_f64());
        w.step()?;
        drop(w);
        let prompts = random_prompts();
        let mut g = Generator::new(&model, &prompts, greedy.clone())?;
        dev.synchronize()?;
        let t = Instant::now();
        g.step()?; // prefill + first token
        let prefill = t.elapsed().as_secs_f64();
        gptoss_kernels::profile::reset();
        let t = Instant::now();
        let mut steps = 0usize;
        while g.step()?.is_some() {
            steps += 1;
        }
        let decode = t.elapsed().as_secs_f64();
        let per_step = decode / steps.max(1) as f64;
        println!(
            "{b:>6} {prefill:>12.4} {per_step:>14.5} {:>16.1}",
            (b * steps) as f64 / decode
        );
        if let Some(table) = gptoss_kernels::profile::per_step_table(steps) {
            println!("{table}");
        }
    }
    if let Some(s) = first_prefill {
        println!(
            "first prefill of the process (batch {}, untimed above): {s:.4} s",
            args.batch.first().copied().unwrap_or(0)
        );
    }
    Ok(())
}
