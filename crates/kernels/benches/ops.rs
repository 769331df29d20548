//! One criterion entry per op of `gptoss-kernels`, forward and (where the op is differentiable)
//! forward + backward: `cargo bench -p gptoss-kernels` times the CPU references on small shapes;
//! built with `--features cuda` on a machine with a GPU, the same entries run on CUDA device 0 at
//! gpt-oss-20b sizes (one layer's worth of routed rows), each iteration synchronized.
//!
//! Filter as usual: `cargo bench -p gptoss-kernels -- moe/` runs the MoE ops only.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use gptoss_kernels::grouped::{grouped_matmul, GroupedWeight, Spans};
use gptoss_kernels::{adamw, attention, lm_loss, lora, moe};

/// Sizes of one benchmark run: small on the CPU, gpt-oss-20b-like on CUDA.
struct Sizes {
    /// Tokens.
    n: usize,
    /// Hidden size.
    h: usize,
    /// Expert intermediate size.
    i: usize,
    /// Experts and experts per token.
    e: usize,
    k: usize,
    /// Query heads, key/value heads, head dim.
    nh: usize,
    nkv: usize,
    d: usize,
    /// Vocabulary of the LM-head rows.
    vocab: usize,
    /// Run dtype.
    dtype: DType,
}

impl Sizes {
    fn for_device(dev: &Device) -> Self {
        if dev.is_cuda() {
            Self {
                n: 2048,
                h: 2880,
                i: 2880,
                e: 32,
                k: 4,
                nh: 64,
                nkv: 8,
                d: 64,
                vocab: 201_088,
                dtype: DType::BF16,
            }
        } else {
            Self {
                n: 64,
                h: 128,
                i: 128,
                e: 8,
                k: 2,
                nh: 4,
                nkv: 2,
                d: 32,
                vocab: 4096,
                dtype: DType::F32,
            }
        }
    }
}

fn device() -> Device {
    gptoss_kernels::cuda_if_available(0).unwrap_or(Device::Cpu)
}

/// Runs `f` and waits for the device, so an iteration times the work and not the launch.
fn timed<'a>(dev: &'a Device, f: impl Fn() -> Result<()> + 'a) -> impl FnMut() + 'a {
    move || {
        f().and_then(|_| dev.synchronize())
            .unwrap_or_else(|e| panic!("bench op failed: {e}"))
    }
}

fn randn(shape: &[usize], std: f32, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, std, shape, dev)?.to_dtype(dtype)
}

/// Routing tables for `n` tokens over `e` experts, `k` per token (token `t` slot `s` → expert
/// `(t + s·7) mod e`): `(tokens [n·k], pos [n, k], row_expert [n·k], slot_expert [n, k], spans)`.
fn routes(
    n: usize,
    e: usize,
    k: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Spans)> {
    let slot_expert: Vec<u32> = (0..n * k)
        .map(|j| ((j / k + (j % k) * 7) % e) as u32)
        .collect();
    let mut order: Vec<usize> = (0..n * k).collect();
    order.sort_by_key(|&j| slot_expert[j]);
    let mut pos = vec![0u32; n * k];
    let (mut tokens, mut row_expert) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
    for (row, &j) in order.iter().enumerate() {
        pos[j] = row as u32;
        tokens.push((j / k) as u32);
        row_expert.push(slot_expert[j]);
    }
    let mut spans = Vec::new();
    let mut off = 0;
    for x in 0..e as u32 {
        let len = row_expert.iter().filter(|&&r| r == x).count();
        spans.push((x as usize, off, len));
        off += len;
    }
    Ok((
        Tensor::new(tokens, dev)?,
        Tensor::from_vec(pos, (n, k), dev)?,
        Tensor::new(row_expert, dev)?,
        Tensor::from_vec(slot_expert, (n, k), dev)?,
        Arc::new(spans),
    ))
}

fn bench_norm_rope(c: &mut Criterion, dev: &Device, s: &Sizes) -> Result<()> {
    let x = Var::from_tensor(&randn(&[s.n, s.h], 1.0, s.dtype, dev)?)?;
    let w = randn(&[s.h], 1.0, s.dtype, dev)?;
    c.bench_function("norm/rms_norm fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let y = gptoss_kernels::rms_norm(x.as_tensor(), &w, 1e-5)?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    let q = Var::from_tensor(&randn(&[1, s.n, s.nh, s.d], 1.0, s.dtype, dev)?)?;
    let ang = Tensor::randn(0f32, 2.0, (1, 1, s.n, s.d / 2), dev)?;
    let (cos, sin) = (ang.cos()?.to_dtype(s.dtype)?, ang.sin()?.to_dtype(s.dtype)?);
    c.bench_function("rope/rotary_tokens_first fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let y = gptoss_kernels::rotary_tokens_first(q.as_tensor(), &cos, &sin)?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    Ok(())
}

fn bench_attention(c: &mut Criterion, dev: &Device, s: &Sizes) -> Result<()> {
    let t = s.n.min(1024);
    let q = Var::from_tensor(&randn(&[1, s.nh, t, s.d], 1.0, s.dtype, dev)?)?;
    let k = Var::from_tensor(&randn(&[1, s.nkv, t, s.d], 1.0, s.dtype, dev)?)?;
    let v = Var::from_tensor(&randn(&[1, s.nkv, t, s.d], 1.0, s.dtype, dev)?)?;
    let sinks = Tensor::randn(0f32, 1.0, s.nh, dev)?;
    let scale = 1.0 / (s.d as f64).sqrt();
    let causal = attention::KeyMask::causal(None);
    c.bench_function("attention/sink_attention causal fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let y = attention::sink_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                Some(&causal),
                &sinks,
                scale,
            )?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    let scores = Var::from_tensor(&randn(
        &[1, s.nh, t.min(512), t.min(512)],
        1.0,
        s.dtype,
        dev,
    )?)?;
    c.bench_function("attention/sink_softmax fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let p = attention::sink_softmax(scores.as_tensor(), None, &sinks, scale)?;
            p.sum_all()?.backward().map(|_| ())
        }))
    });
    Ok(())
}

fn bench_moe(c: &mut Criterion, dev: &Device, s: &Sizes) -> Result<()> {
    let (tokens, pos, row_expert, slot_expert, spans) = routes(s.n, s.e, s.k, dev)?;
    let logits = randn(&[s.n, s.e], 1.0, s.dtype, dev)?;
    c.bench_function("moe/topk_softmax fwd", |b| {
        b.iter(timed(dev, || moe::topk_softmax(&logits, s.k).map(|_| ())))
    });
    let x = Var::from_tensor(&randn(&[s.n, s.h], 1.0, s.dtype, dev)?)?;
    c.bench_function("moe/gather_rows fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let y = moe::gather_rows(x.as_tensor(), &tokens, &pos)?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    let gu = Var::from_tensor(&randn(&[s.n * s.k, 2 * s.i], 1.0, s.dtype, dev)?)?;
    let gu_bias = randn(&[s.e, 2 * s.i], 0.1, s.dtype, dev)?;
    c.bench_function("moe/swiglu_bias fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let y = moe::swiglu_bias(gu.as_tensor(), &gu_bias, &row_expert, 7.0, 1.702)?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    let ys = Var::from_tensor(&randn(&[s.n * s.k, s.h], 1.0, s.dtype, dev)?)?;
    let weights = Var::from_tensor(&Tensor::rand(0f32, 1.0, (s.n, s.k), dev)?.to_dtype(s.dtype)?)?;
    let down_bias = randn(&[s.e, s.h], 0.1, s.dtype, dev)?;
    c.bench_function("moe/combine fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let y = moe::combine(
                ys.as_tensor(),
                weights.as_tensor(),
                &pos,
                &down_bias,
                &slot_expert,
            )?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    let xs = randn(&[s.n * s.k, s.h], 1.0, s.dtype, dev)?;
    let dense = GroupedWeight::Dense(randn(&[s.e, s.h, 2 * s.i], 0.02, s.dtype, dev)?);
    c.bench_function("grouped/grouped_matmul dense fwd", |b| {
        b.iter(timed(dev, || {
            grouped_matmul(&xs, &dense, &spans).map(|_| ())
        }))
    });
    let packed = GroupedWeight::Packed {
        blocks: Tensor::rand(0f32, 255.0, (s.e, 2 * s.i, s.h / 32, 16), dev)?
            .to_dtype(DType::U8)?,
        scales: Tensor::full(120f32, (s.e, 2 * s.i, s.h / 32), dev)?.to_dtype(DType::U8)?,
        dtype: s.dtype,
        transposed: false,
    };
    c.bench_function("grouped/grouped_matmul mxfp4 fwd", |b| {
        b.iter(timed(dev, || {
            grouped_matmul(&xs, &packed, &spans).map(|_| ())
        }))
    });
    Ok(())
}

fn bench_lora(c: &mut Criterion, dev: &Device, s: &Sizes) -> Result<()> {
    let r = 8;
    let x = Var::from_tensor(&randn(&[s.n, s.h], 1.0, s.dtype, dev)?)?;
    let a = Var::from_tensor(&randn(&[r, s.h], 0.02, DType::F32, dev)?)?;
    let bw = Var::from_tensor(&randn(&[s.h, r], 0.02, DType::F32, dev)?)?;
    let base = randn(&[s.n, s.h], 1.0, s.dtype, dev)?;
    c.bench_function("lora/down_proj + up_add fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let h = lora::down_proj(x.as_tensor(), a.as_tensor())?;
            let y = lora::up_add(&base, None, &h, bw.as_tensor(), 2.0)?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    let delta = randn(&[s.n, s.h], 1.0, DType::F32, dev)?;
    c.bench_function("scaled_delta/add_scaled_delta fwd", |b| {
        b.iter(timed(dev, || {
            gptoss_kernels::add_scaled_delta(&base, None, &delta, 2.0).map(|_| ())
        }))
    });
    let w = randn(&[s.h, s.h], 0.02, s.dtype, dev)?;
    c.bench_function("frozen/frozen_matmul fwd+bwd", |b| {
        b.iter(timed(dev, || {
            let y = gptoss_kernels::frozen_matmul(x.as_tensor(), &w)?;
            y.sum_all()?.backward().map(|_| ())
        }))
    });
    Ok(())
}

fn bench_train_tail(c: &mut Criterion, dev: &Device, s: &Sizes) -> Result<()> {
    let rows = 256usize;
    let logits = randn(&[rows, s.vocab], 1.0, s.dtype, dev)?;
    let targets: Vec<u32> = (0..rows).map(|i| (i * 7919 % s.vocab) as u32).collect();
    c.bench_function("lm_loss/softmax_stats (256 rows)", |b| {
        b.iter(timed(dev, || {
            lm_loss::softmax_stats(logits.copy()?, &targets, 1.0 / rows as f64).map(|_| ())
        }))
    });
    let p = Var::from_tensor(&randn(&[s.h, 8], 0.02, DType::F32, dev)?)?;
    let g = randn(&[s.h, 8], 1.0, DType::F32, dev)?;
    let (mut m, mut v) = (p.as_tensor().zeros_like()?, p.as_tensor().zeros_like()?);
    let sc = adamw::Scalars {
        decay: true,
        keep: 1.0 - 2e-4 * 0.01,
        one_minus_b1: 0.1,
        b2: 0.999,
        one_minus_b2: 0.001,
        inv_bc2_sqrt: 1.0,
        eps: 1e-8,
        step_size: 2e-4,
    };
    c.bench_function("adamw/update", |b| {
        b.iter(|| {
            adamw::update(&p, &mut m, &mut v, &g, sc)
                .and_then(|_| dev.synchronize())
                .unwrap_or_else(|e| panic!("bench op failed: {e}"))
        })
    });
    Ok(())
}

fn run_all(c: &mut Criterion) -> Result<()> {
    let dev = device();
    let s = Sizes::for_device(&dev);
    bench_norm_rope(c, &dev, &s)?;
    bench_attention(c, &dev, &s)?;
    bench_moe(c, &dev, &s)?;
    bench_lora(c, &dev, &s)?;
    bench_train_tail(c, &dev, &s)
}

fn all(c: &mut Criterion) {
    if let Err(e) = run_all(c) {
        eprintln!("gptoss-kernels bench setup failed: {e}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = all
}
criterion_main!(benches);
