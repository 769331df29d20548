//! Training-step benchmark of LoRA fine-tuning on the gpt-oss-20b architecture (the GPU path).
//!
//! Builds gpt-oss-20b with random weights directly on the device — experts as random MXFP4
//! blocks/scales kept packed (as a checkpoint stores them) and decoded per routed expert inside the
//! grouped matmul, everything else bf16 — applies the cookbook LoRA (r 8, α 16, all attention linears + both expert
//! weights of layers 7/15/23), and times full optimizer steps of the trainer itself
//! (`gptoss_sft::trainer::Trainer::train` with its default options, a [`StepTimer`] observer) on
//! synthetic rows of random tokens, batch 1, with and without per-layer gradient checkpointing.
//! `--model DIR` loads a checkpoint instead (MXFP4 experts resident, `--dequantize` for dense). Prints per configuration the median
//! step time, tokens/s and the peak device memory (CUDA's default memory pool high-water mark of
//! allocated bytes, which is what `torch.cuda.max_memory_allocated` reports for PyTorch, and of
//! reserved bytes).
//!
//! ```text
//! bench_train_step [--seq 1024,2048] [--steps 5] [--warmup 1] [--gc both|on|off]
//!                  [--layers N] [--model DIR] [--dense-experts] [--cpu --tiny] [--moe-chunk N]
//!                  [--pack-doc N]
//! ```
//! Build: `cargo build --release --features cuda --example bench_train_step` (see docs/cuda.md).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;
use gptoss_kernels::{device_memory, MemoryPool};
use gptoss_lora::{LoraConfig, LoraModel};
use gptoss_model::{init_random, init_random_packed, Config, GptOssForCausalLM, LoadOptions};
use gptoss_sft::config::TrainingConfig;
use gptoss_sft::trainer::timing::median;
use gptoss_sft::trainer::{
    forward_backward, synthetic_rows, BackwardOptions, MicroBatch, StepTimer, Trainer,
};

type BoxError = Box<dyn std::error::Error>;
type BoxResult<T> = Result<T, BoxError>;

#[derive(Parser, Debug)]
#[command(about = "Median LoRA training-step time, tokens/s and peak memory of gpt-oss")]
struct Args {
    /// Sequence lengths (batch 1), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048")]
    seq: Vec<usize>,
    /// Timed optimizer steps per configuration.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (NVRTC compilation, cuBLAS handles, pool growth).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Gradient checkpointing: on, off or both.
    #[arg(long, default_value = "both")]
    gc: String,
    /// Keep only the first N decoder layers (LoRA expert targets beyond them are dropped).
    #[arg(long)]
    layers: Option<usize>,
    /// A checkpoint directory (config.json + safetensors, HF layout) instead of random weights;
    /// MXFP4 experts stay resident on CUDA.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// With --model: dequantize MXFP4 experts to dense bf16 at load.
    #[arg(long)]
    dequantize: bool,
    /// Random dense bf16 experts instead of MXFP4-resident ones.
    #[arg(long)]
    dense_experts: bool,
    /// Run on the CPU (for a smoke test; use with --tiny).
    #[arg(long)]
    cpu: bool,
    /// The tiny test configuration instead of gpt-oss-20b.
    #[arg(long)]
    tiny: bool,
    /// Learning rate (the trainer's schedule: cosine with min lr 0.1, 3 % warmup).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Seed of the weights, the adapters and the tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Instead of timing: check the device path against the CPU f32 path on the tiny config
    /// (loss and every LoRA gradient, dense and MXFP4-resident experts) and exit.
    #[arg(long)]
    check: bool,
    /// After the timed steps: a forward-only breakdown of one decoder layer (attention block, MoE
    /// block, decoding all experts of the layer alone) at each sequence length, device-synchronized
    /// around each piece.
    #[arg(long)]
    breakdown: bool,
    /// Keep freed memory in CUDA's default pool (release threshold = unlimited) instead of returning
    /// it to the driver at every synchronization (candle's MoE synchronizes once per layer), like
    /// PyTorch's caching allocator. Off by default (the figures in the report were measured without it).
    #[arg(long)]
    pool_keep: bool,
    /// Open the GPU with candle's `Device::new_cuda` (cudarc event tracking on) instead of
    /// `gptoss_kernels::cuda_device` (tracking off), to measure what the tracking costs.
    #[arg(long)]
    tracked_device: bool,
    /// Experts decoded at once by the deferred MoE backward of the checkpointed recompute
    /// (`Experts::set_backward_chunk`; default: the library's).
    #[arg(long)]
    moe_chunk: Option<usize>,
    /// Packing (`packing: true`): each step trains one row of `seq` tokens packed from documents
    /// of this many tokens (must divide every `--seq`), attention kept inside each document.
    #[arg(long)]
    pack_doc: Option<usize>,
}

const GIB: f64 = (1u64 << 30) as f64;

fn build_model(args: &Args, dev: &Device) -> BoxResult<GptOssForCausalLM> {
    if let Some(dir) = &args.model {
        if args.layers.is_some() {
            return Err("--layers applies to random models only, not --model".into());
        }
        let opts = LoadOptions::dequantized_if(DType::BF16, args.dequantize);
        return Ok(gptoss_model::load_with(dir, dev, &opts)?);
    }
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
    Ok(if args.dense_experts {
        init_random(&config, dtype, dev, Some(args.seed))?
    } else {
        init_random_packed(&config, dtype, dev, Some(args.seed))?
    })
}

/// The cookbook LoRA, its expert targets restricted to the layers the model has.
fn lora_config(layers: usize) -> LoraConfig {
    let mut cfg = LoraConfig::cookbook();
    let keep: Vec<String> = cfg
        .target_parameters
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            p.split('.')
                .next()
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| l < layers)
        })
        .collect();
    cfg.target_parameters = (!keep.is_empty()).then_some(keep);
    cfg
}

/// `warmup + steps` optimizer steps of the trainer at sequence length `seq`, timed per step.
fn train_steps(
    model: &GptOssForCausalLM,
    lora: &LoraModel,
    args: &Args,
    seq: usize,
    gc: bool,
) -> BoxResult<StepTimer> {
    let n = args.warmup + args.steps;
    let docs = match args.pack_doc {
        Some(d) if d == 0 || seq % d != 0 => {
            return Err(format!("--pack-doc {d} must divide --seq {seq}").into())
        }
        Some(d) => seq / d,
        None => 1,
    };
    let out = std::env::temp_dir().join(format!("bench_train_step_{}", std::process::id()));
    let cfg = TrainingConfig {
        learning_rate: args.lr,
        max_steps: Some(n as u64),
        max_length: seq,
        gradient_checkpointing: gc,
        // One micro-batch of `seq` tokens per optimizer step: the table's tokens/s is seq / step.
        gradient_accumulation_steps: 1,
        shuffle: false,
        save_steps: 0,
        logging_steps: n as u64,
        output_dir: out.clone(),
        seed: args.seed,
        packing: args.pack_doc.is_some(),
        ..TrainingConfig::default()
    };
    // packing: `docs` documents fill each row of `seq` tokens exactly
    let rows = synthetic_rows(n * docs, seq / docs, model.config().vocab_size, args.seed);
    let trainer = Trainer::new(model, lora, cfg, rows, model.device().clone())?;
    let mut timer = StepTimer::new(true);
    timer.profile_after = Some(args.warmup as u64);
    let res = trainer.train(&mut timer);
    let _ = std::fs::remove_dir_all(&out);
    res?;
    Ok(timer)
}

/// Loss and LoRA gradients (f32, on the CPU) of one fixed micro-batch on the tiny model saved in
/// `dir`, loaded on `dev` as `dtype`, experts dense or re-packed as MXFP4.
fn check_run(
    dir: &std::path::Path,
    dev: &Device,
    dtype: DType,
    packed: bool,
) -> BoxResult<(f64, Vec<(String, Tensor)>)> {
    use gptoss_model::ExpertParam;
    let mut model = gptoss_model::load(dir, dtype, dev)?;
    if packed {
        for layer in model.model.layers.iter_mut() {
            let ex = &mut layer.mlp.experts;
            let mut q = Vec::new();
            for p in [ExpertParam::GateUp, ExpertParam::Down] {
                let w = ex
                    .param(p)
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .transpose(1, 2)?
                    .contiguous()?;
                let (b, s) = gptoss_mxfp4::quantize(&w)?;
                q.push((b.to_device(dev)?, s.to_device(dev)?));
            }
            let (d, g) = (q.pop().ok_or("down")?, q.pop().ok_or("gate_up")?);
            let packed = gptoss_model::PackedExperts::new(g.0, g.1, d.0, d.1)?;
            ex.set_packed(Some(std::sync::Arc::new(packed)));
        }
    }
    let mut cfg = LoraConfig::cookbook();
    cfg.target_parameters = Some(vec![
        "0.mlp.experts.gate_up_proj".into(),
        "1.mlp.experts.down_proj".into(),
    ]);
    // Non-zero B so that every factor gets a gradient.
    cfg.init_lora_weights = gptoss_lora::InitLoraWeights::Bool(false);
    let lora = LoraModel::new(&mut model, cfg, 7)?;
    let named = lora.trainable_vars();
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let seq = 24usize;
    let ids: Vec<u32> = (0..seq as u32).map(|i| (i * 37 + 11) % 500).collect();
    let batch = MicroBatch::causal(&ids, dev)?;
    let opts = BackwardOptions {
        num_items_in_batch: seq - 1,
        aux_scale: 0.0,
        gradient_checkpointing: true,
        lm_head_chunk: 16,
    };
    let out = forward_backward(&model, &vars, &batch, &opts)?;
    let mut grads = Vec::new();
    for ((name, _), g) in named.iter().zip(out.grads) {
        let g = g.ok_or_else(|| format!("no gradient for {name}"))?;
        grads.push((
            name.clone(),
            g.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        ));
    }
    Ok((out.nll_sum / out.count.max(1) as f64, grads))
}

/// `--check`: device (bf16 and f32) against CPU f32, dense and packed experts.
fn check(dev: &Device) -> BoxResult<()> {
    let dir = std::env::temp_dir().join(format!("bench_train_step_check_{}", std::process::id()));
    let model = init_random(&Config::tiny(), DType::F32, &Device::Cpu, Some(3))?;
    gptoss_model::save(&model, &dir, &gptoss_model::SaveOptions::default())?;
    let mut worst = 0f64;
    for packed in [false, true] {
        let (ref_loss, ref_grads) = check_run(&dir, &Device::Cpu, DType::F32, packed)?;
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 1e-1)] {
            let (loss, grads) = check_run(&dir, dev, dtype, packed)?;
            let mut max_rel = 0f64;
            for ((name, a), (_, b)) in grads.iter().zip(&ref_grads) {
                let num = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                let rel = (num / den.max(1e-30)).sqrt();
                if !rel.is_finite() {
                    return Err(format!("{name}: non-finite gradient error").into());
                }
                max_rel = max_rel.max(rel);
            }
            let loss_rel = ((loss - ref_loss) / ref_loss).abs();
            let ok = max_rel < tol && loss_rel < tol;
            println!(
                "check experts={} dtype={dtype:?}: loss {loss:.6} vs cpu {ref_loss:.6} (rel {loss_rel:.2e}), \
                 worst LoRA-gradient rel. L2 error {max_rel:.2e} over {} tensors (tol {tol:.0e}) {}",
                if packed { "mxfp4" } else { "dense" },
                grads.len(),
                if ok { "OK" } else { "FAIL" }
            );
            if !ok {
                worst = f64::INFINITY;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if worst.is_infinite() {
        return Err("device path differs from the CPU path".into());
    }
    Ok(())
}

/// Median seconds of `f` over `n` synchronized runs (after one warm-up run).
fn time_it<F: FnMut() -> BoxResult<()>>(dev: &Device, n: usize, mut f: F) -> BoxResult<f64> {
    f()?;
    dev.synchronize()?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// `--breakdown`: forward-only times of the pieces of decoder layer `l` at length `seq`.
fn breakdown(model: &GptOssForCausalLM, seq: usize, l: usize) -> BoxResult<()> {
    use candle_core::Module;
    use gptoss_model::ExpertParam;
    let dev = model.device();
    let cfg = model.config();
    let layer = &model.model.layers[l];
    let h = (Tensor::randn(0f32, 1.0, (1, seq, cfg.hidden_size), dev)?.to_dtype(model.dtype()))?;
    let ctx = model.attention_context(1, seq, 0, None)?;
    let n = 5;
    let t_norm = time_it(dev, n, || {
        layer.input_layernorm.forward(&h)?;
        Ok(())
    })?;
    let x = layer.input_layernorm.forward(&h)?;
    let t_attn = time_it(dev, n, || {
        layer.self_attn.forward(&x, &ctx, None)?;
        Ok(())
    })?;
    let flat = x.reshape((seq, cfg.hidden_size))?;
    let t_route = time_it(dev, n, || {
        layer.mlp.router.route(&flat)?;
        Ok(())
    })?;
    let routing = layer.mlp.router.route(&flat)?;
    let t_experts = time_it(dev, n, || {
        layer.mlp.experts.forward(&flat, &routing)?;
        Ok(())
    })?;
    let t_deq = match layer.mlp.experts.packed() {
        Some(p) => time_it(dev, n, || {
            p.dequantize(ExpertParam::GateUp, model.dtype())?;
            p.dequantize(ExpertParam::Down, model.dtype())?;
            Ok(())
        })?,
        None => 0.0,
    };
    let t_layer = time_it(dev, n, || {
        model.layer_forward(l, &h, &ctx)?;
        Ok(())
    })?;
    // Forward + backward (input gradient and LoRA gradients) of the same pieces.
    let g = Tensor::randn(0f32, 1.0, (1, seq, cfg.hidden_size), dev)?.to_dtype(model.dtype())?;
    let hv = Var::from_tensor(&h)?;
    let t_layer_fb = time_it(dev, n, || {
        let out = model.layer_forward(l, hv.as_tensor(), &ctx)?;
        (out.hidden * &g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let xv = Var::from_tensor(&x)?;
    let t_attn_fb = time_it(dev, n, || {
        let a = layer.self_attn.forward(xv.as_tensor(), &ctx, None)?;
        (a * &g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let fv = Var::from_tensor(&flat)?;
    let g2 = g.reshape((seq, cfg.hidden_size))?;
    let t_moe_fb = time_it(dev, n, || {
        let r = layer.mlp.router.route(fv.as_tensor())?;
        let y = layer.mlp.experts.forward(fv.as_tensor(), &r)?;
        (y * &g2)?.sum_all()?.backward()?;
        Ok(())
    })?;
    println!(
        "breakdown seq {seq} layer {l} (forward+backward, ms): attention block {:.2} | MoE block {:.2} | \
         whole layer {:.2} | x{} layers = {:.1}",
        t_attn_fb * 1e3,
        t_moe_fb * 1e3,
        t_layer_fb * 1e3,
        model.model.layers.len(),
        t_layer_fb * 1e3 * model.model.layers.len() as f64
    );
    println!(
        "breakdown seq {seq} layer {l} (forward only, no autograd, ms): rmsnorm {:.2} | attention block {:.2} | \
         router {:.2} | experts {:.2} (decoding all experts alone {:.2}) | whole layer {:.2} | x{} layers = {:.1}",
        t_norm * 1e3,
        t_attn * 1e3,
        t_route * 1e3,
        t_experts * 1e3,
        t_deq * 1e3,
        t_layer * 1e3,
        model.model.layers.len(),
        t_layer * 1e3 * model.model.layers.len() as f64
    );
    Ok(())
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    if args.check {
        let dev = if args.cpu {
            Device::Cpu
        } else {
            gptoss_kernels::cuda_device(0)?
        };
        return check(&dev);
    }
    let dev = if args.cpu {
        Device::Cpu
    } else if args.tracked_device {
        Device::new_cuda(0)?
    } else {
        gptoss_kernels::cuda_device(0)?
    };
    let pool = MemoryPool::of(&dev);
    if let (true, Some(p)) = (args.pool_keep, &pool) {
        p.keep_memory();
    }
    let t_build = Instant::now();
    let mut model = build_model(&args, &dev)?;
    if let Some(n) = args.moe_chunk {
        for layer in model.model.layers.iter_mut() {
            layer.mlp.experts.set_backward_chunk(n);
        }
    }
    dev.synchronize()?;
    let n_layers = model.model.layers.len();
    let lora = LoraModel::new(&mut model, lora_config(n_layers), args.seed)?;
    dev.synchronize()?;
    let weights_now = pool.as_ref().map(|p| p.stats().allocated).unwrap_or(0);
    let (free, total) = device_memory();
    println!(
        "model: {} layers, experts {}, {} trainable LoRA parameters; built in {:.1} s; \
         weights+adapters allocated {:.2} GiB; device free {:.2} / {:.2} GiB",
        n_layers,
        if model
            .model
            .layers
            .iter()
            .any(|l| l.mlp.experts.packed().is_some())
        {
            "MXFP4-resident"
        } else {
            "dense bf16"
        },
        lora.trainable_params(),
        t_build.elapsed().as_secs_f64(),
        weights_now as f64 / GIB,
        free as f64 / GIB,
        total as f64 / GIB
    );
    let modes: Vec<bool> = match args.gc.as_str() {
        "on" => vec![true],
        "off" => vec![false],
        _ => vec![true, false],
    };
    println!(
        "{:>6} {:>4} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "seq", "gc", "median_s", "tokens/s", "peak_alloc", "peak_resv", "loss"
    );
    for &gc in &modes {
        for &seq in &args.seq {
            if let Some(p) = &pool {
                p.reset_high();
            }
            gptoss_kernels::profile::reset();
            let res = train_steps(&model, &lora, &args, seq, gc);
            let st = pool.as_ref().map(|p| p.stats()).unwrap_or_default();
            let timer = match res {
                Ok(t) => t,
                Err(e) => {
                    let short: String = e.to_string().chars().take(160).collect();
                    println!(
                        "{seq:>6} {:>4} FAILED ({short}); peak_alloc {:.2} GiB",
                        if gc { "on" } else { "off" },
                        st.peak_allocated as f64 / GIB
                    );
                    continue;
                }
            };
            let m = timer.median_secs(args.warmup);
            let loss = timer.steps.last().map_or(f64::NAN, |s| s.loss);
            println!(
                "{seq:>6} {:>4} {:>10.4} {:>10.0} {:>9.2} GiB {:>8.2} GiB {:>8.4}",
                if gc { "on" } else { "off" },
                m,
                seq as f64 / m,
                st.peak_allocated as f64 / GIB,
                st.peak_reserved as f64 / GIB,
                loss
            );
            if let Some(table) = gptoss_kernels::profile::per_step_table(args.steps) {
                println!("{table}");
            }
        }
    }
    if args.breakdown {
        for &seq in &args.seq {
            // A layer with a LoRA on its experts (7) when present, else the last one.
            let l = 7.min(n_layers - 1);
            if let Err(e) = breakdown(&model, seq, l) {
                println!("breakdown seq {seq}: FAILED ({e})");
            }
        }
    }
    Ok(())
}
