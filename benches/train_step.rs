//! One LoRA training step (forward + backward with the fused LM head, clip, AdamW) on CPU, for the
//! gpt-oss config of the reference measurement: vocab 201,088, hidden 256, 4 layers,
//! 4 query heads × 64 over 2 kv heads, 8 experts top-2, intermediate 256; 512 tokens, batch 1,
//! LoRA r 8 / α 16 on all attention linears and the experts of every layer.
//! No transformers figure is printed: a comparison must be measured in the same session
//! (`benches/baseline_transformers_peft.py --cpu` runs the Python side).
//!
//! Run: `cargo bench --bench train_step` (env `STEPS`, default 5; `GC=0` or `GC=1` for one mode;
//! `PROFILE=1` for a breakdown). Prints s/step and tokens/s with and without gradient
//! checkpointing, and the process's peak resident memory (VmHWM; run one mode per process for a
//! per-mode peak).

use std::time::Instant;

use candle_core::{DType, Device};
use gptoss_lora::{LoraConfig, LoraModel, TargetModules};
use gptoss_model::{init_random, Config};
use gptoss_sft::collate::{pad, Example};
use gptoss_sft::optim::{AdamW, AdamWConfig, Gradients};
use gptoss_sft::trainer::{forward_backward, micro_batch, BackwardOptions};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn bench_config() -> Config {
    let mut c = Config::small();
    c.vocab_size = 201_088;
    c.hidden_size = 256;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.head_dim = Some(64);
    c.num_key_value_heads = 2;
    c.num_local_experts = 8;
    c.num_experts_per_tok = 2;
    c.intermediate_size = 256;
    c.sliding_window = Some(128);
    c.pad_token_id = Some(199_999);
    c
}

/// Peak resident set (kB) since the last reset, from /proc/self/status.
fn vm_hwm_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak-RSS counter (Linux ≥ 4.0: write "5" to clear_refs).
fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() -> Res<()> {
    gptoss_sft::trainer::pipeline::tune_cpu_runtime();
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let cfg = bench_config();
    let dev = Device::Cpu;
    let mut model = init_random(&cfg, DType::F32, &dev, Some(0))?;
    let lora_cfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(TargetModules::all_linear()),
        target_parameters: Some(
            (0..cfg.num_hidden_layers)
                .flat_map(|l| {
                    [
                        format!("{l}.mlp.experts.gate_up_proj"),
                        format!("{l}.mlp.experts.down_proj"),
                    ]
                })
                .collect(),
        ),
        ..LoraConfig::default()
    };
    let lora = LoraModel::new(&mut model, lora_cfg, 0)?;
    println!("{}", lora.trainable_parameters_line());
    let params = lora.trainable_vars();
    let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, AdamWConfig::default())?;
    let t = 512;
    let ids: Vec<u32> = (0..t).map(|i| ((i * 7919 + 13) % 200_000) as u32).collect();
    let ex = Example {
        labels: ids.iter().map(|&x| x as i64).collect(),
        input_ids: ids,
    };
    let mb = micro_batch(&pad(&[ex])?, 199_999, &dev)?;
    if std::env::var("PROFILE").is_ok() {
        let h = candle_core::Tensor::randn(0f32, 1.0, (511, 256), &dev)?;
        let w = model.lm_head.weight().clone();
        let targets: Vec<u32> = (0..511).map(|i| (i * 31) as u32).collect();
        for chunk in [64usize, 128, 512] {
            let t0 = Instant::now();
            gptoss_sft::trainer::lm_loss::fused_lm_head_loss(&h, &w, &targets, 1.0, chunk)?;
            println!(
                "fused lm head (chunk {chunk}): {:.3} s",
                t0.elapsed().as_secs_f64()
            );
        }
        let t0 = Instant::now();
        let _ = h.matmul(&w.t()?)?;
        println!(
            "lm head matmul h·Wᵀ (strided): {:.3} s",
            t0.elapsed().as_secs_f64()
        );
        let wt = w.t()?.contiguous()?;
        let t0 = Instant::now();
        let _ = h.matmul(&wt)?;
        println!(
            "lm head matmul h·Wᵀ (contiguous Wᵀ): {:.3} s",
            t0.elapsed().as_secs_f64()
        );
        let g = candle_core::Tensor::randn(0f32, 1.0, (511, 201_088), &dev)?;
        let t0 = Instant::now();
        let _ = g.matmul(&w)?;
        println!(
            "lm head grad matmul g·W: {:.3} s",
            t0.elapsed().as_secs_f64()
        );
        let t0 = Instant::now();
        let _ = model.forward_hidden(&mb.input_ids, None)?;
        println!(
            "forward_hidden (no lm head): {:.3} s",
            t0.elapsed().as_secs_f64()
        );
    }
    // GC=0 / GC=1 runs one mode only, so that VmHWM is that mode's peak.
    let modes: Vec<bool> = match std::env::var("GC").ok().as_deref() {
        Some("0") => vec![false],
        Some("1") => vec![true],
        _ => vec![false, true],
    };
    for ckpt in modes {
        let opts = BackwardOptions {
            num_items_in_batch: mb.targets.len(),
            aux_scale: 0.0,
            gradient_checkpointing: ckpt,
            lm_head_chunk: 256,
        };
        let mut step = || -> Res<(f64, f64)> {
            let t0 = Instant::now();
            let out = forward_backward(&model, &vars, &mb, &opts)?;
            let fb = t0.elapsed().as_secs_f64();
            let mut grads = Gradients::new(vars.len());
            for (i, g) in out.grads.into_iter().enumerate() {
                if let Some(g) = g {
                    grads.set(i, g)?;
                }
            }
            grads.clip_grad_norm(1.0)?;
            opt.step(&grads, 2e-4)?;
            Ok((t0.elapsed().as_secs_f64(), fb))
        };
        step()?; // warm-up
        reset_hwm();
        let mut times = Vec::new();
        let mut fbs = Vec::new();
        for _ in 0..steps {
            let (s, fb) = step()?;
            times.push(s);
            fbs.push(fb);
        }
        times.sort_by(f64::total_cmp);
        fbs.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        println!(
            "train_step gradient_checkpointing={ckpt}: median {:.3} s/step (forward+backward {:.3} s), \
             {:.0} tokens/s over {steps} steps; peak RSS {} MiB",
            med,
            fbs[fbs.len() / 2],
            t as f64 / med,
            vm_hwm_kb().map(|k| (k / 1024).to_string()).unwrap_or_else(|| "?".into()),
        );
    }
    Ok(())
}
