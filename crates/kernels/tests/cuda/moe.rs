//! The fused MoE ops (`gptoss_kernels::moe`) on a CUDA device against their CPU reference
//! implementation, on the same inputs: values and gradients, f32 and bf16, small odd shapes (the
//! one-element kernels), a misaligned input (likewise) and gpt-oss-20b sizes (the 16-byte kernels).
//! Feature `cuda`; needs a GPU. `--ignored` also prints kernel timings (backward ones with
//! `GPTOSS_PROFILE=1`).

use candle_core::{DType, Device, Result, Tensor, Var};
use gptoss_kernels::moe::{combine, gather_rows, swiglu_bias};

/// Routing tables as `Experts::forward` builds them: k distinct experts per token, rows grouped
/// by expert (tokens in order within one).
struct Routes {
    n: usize,
    k: usize,
    e: usize,
    /// `[M]`: token of each row.
    tokens: Vec<u32>,
    /// `[N·k]`: row of each (token, slot).
    pos: Vec<u32>,
    /// `[N·k]`: expert of each (token, slot).
    expert: Vec<u32>,
    /// `[M]`: expert of each row.
    row_expert: Vec<u32>,
}

impl Routes {
    fn new(n: usize, k: usize, e: usize, seed: u64) -> Self {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        let mut expert = Vec::with_capacity(n * k);
        for _ in 0..n {
            let mut chosen: Vec<u32> = Vec::with_capacity(k);
            while chosen.len() < k {
                let c = (next() % e) as u32;
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            expert.extend(chosen);
        }
        let mut order: Vec<usize> = (0..n * k).collect();
        order.sort_by_key(|&i| expert[i]);
        let mut pos = vec![0u32; n * k];
        for (row, &i) in order.iter().enumerate() {
            pos[i] = row as u32;
        }
        Self {
            n,
            k,
            e,
            tokens: order.iter().map(|&i| (i / k) as u32).collect(),
            row_expert: order.iter().map(|&i| expert[i]).collect(),
            pos,
            expert,
        }
    }

    fn m(&self) -> usize {
        self.n * self.k
    }
}

/// `max |a − b| / max(1, max |b|)`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap();
    let d = (&a - &b)
        .and_then(|t| t.abs())
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .unwrap();
    let s = b
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .unwrap();
    d / s.max(1.0)
}

fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 2e-5,
        _ => 1.6e-2,
    }
}

/// Runs `f` on the CPU and on `gpu` with the same float inputs (`inputs`, made `Var`s) and the same
/// index tensors, and compares the output and the gradients of `Σ out·g`.
fn check(
    name: &str,
    gpu: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor], &Device) -> Result<Tensor>,
) -> Result<()> {
    let run = |dev: &Device| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts, dev)?;
        // a fixed upstream gradient, the same on both devices
        let g = Tensor::arange(0u32, out.elem_count() as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .affine(0.618034, 0.0)?
            .sin()?
            .reshape(out.shape())?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let grads = (&out * &g)?.sum_all()?.backward()?;
        let gs = ts
            .iter()
            .map(|t| {
                grads.get(t).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name}: no gradient for an input"))
                })
            })
            .collect::<Result<_>>()?;
        Ok((out, gs))
    };
    let (cpu, cpu_g) = run(&Device::Cpu)?;
    let (dev, dev_g) = run(gpu)?;
    let d = rel_diff(&dev, &cpu);
    println!("{name} {dtype:?}: output rel diff {d:e}");
    assert!(d <= tol(dtype), "{name} {dtype:?}: output differs by {d}");
    for (i, (a, b)) in dev_g.iter().zip(&cpu_g).enumerate() {
        let d = rel_diff(a, b);
        println!("{name} {dtype:?}: gradient {i} rel diff {d:e}");
        assert!(
            d <= tol(dtype),
            "{name} {dtype:?}: gradient {i} differs by {d}"
        );
    }
    Ok(())
}

/// Deterministic pseudo-random values in `[-scale, scale]` (made on the CPU).
fn pseudo(shape: (usize, usize), scale: f64, seed: u64) -> Result<Tensor> {
    let n = shape.0 * shape.1;
    let x = Tensor::arange(0u32, n as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
    let a = ((x.affine(12.9898, seed as f64)?.sin()? * 43758.5453)?.sin()? * scale)?;
    a.reshape(shape)
}

fn u32s(v: &[u32], dev: &Device) -> Result<Tensor> {
    Tensor::new(v, dev)
}

fn check_gather(gpu: &Device, r: &Routes, h: usize, misaligned: bool) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let x = pseudo((r.n, h), 1.0, 1)?;
        check("gather_rows", gpu, dtype, &[x], |t, dev| {
            let x = if misaligned {
                // the same values at an odd start offset of a larger storage
                let flat = Tensor::cat(
                    &[t[0].flatten_all()?.narrow(0, 0, 1)?, t[0].flatten_all()?],
                    0,
                )?;
                flat.narrow(0, 1, r.n * h)?.reshape((r.n, h))?
            } else {
                t[0].clone()
            };
            let pos = u32s(&r.pos, dev)?.reshape((r.n, r.k))?;
            gather_rows(&x, &u32s(&r.tokens, dev)?, &pos)
        })?;
    }
    Ok(())
}

fn check_swiglu(gpu: &Device, r: &Routes, i: usize) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        // |gu| up to 9: many values beyond the clamp limit 7
        let gu = pseudo((r.m(), 2 * i), 9.0, 2)?;
        let bias = pseudo((r.e, 2 * i), 1.0, 3)?.to_dtype(dtype)?;
        check("swiglu_bias", gpu, dtype, &[gu], |t, dev| {
            swiglu_bias(
                &t[0],
                &bias.to_device(dev)?,
                &u32s(&r.row_expert, dev)?,
                7.0,
                1.702,
            )
        })?;
    }
    Ok(())
}

fn check_combine(gpu: &Device, r: &Routes, h: usize) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let ys = pseudo((r.m(), h), 1.0, 4)?;
        let w = pseudo((r.n, r.k), 1.0, 5)?;
        let bias = pseudo((r.e, h), 1.0, 6)?.to_dtype(dtype)?;
        check("combine", gpu, dtype, &[ys, w], |t, dev| {
            let pos = u32s(&r.pos, dev)?.reshape((r.n, r.k))?;
            let ex = u32s(&r.expert, dev)?.reshape((r.n, r.k))?;
            combine(&t[0], &t[1], &pos, &bias.to_device(dev)?, &ex)
        })?;
    }
    Ok(())
}

#[test]
fn small_odd_shapes_match_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let r = Routes::new(13, 3, 5, 7);
    check_gather(&gpu, &r, 37, false)?;
    check_gather(&gpu, &r, 64, true)?;
    check_swiglu(&gpu, &r, 21)?;
    check_combine(&gpu, &r, 37)?;
    Ok(())
}

#[test]
fn gpt_oss_20b_shapes_match_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    // 2048 tokens, H = I = 2880, 32 experts, top-4: M = 8192 routed rows
    let r = Routes::new(2048, 4, 32, 11);
    check_gather(&gpu, &r, 2880, false)?;
    check_swiglu(&gpu, &r, 2880)?;
    check_combine(&gpu, &r, 2880)?;
    Ok(())
}

/// Prints the time per call of each kernel at gpt-oss-20b sizes in bf16 (`--ignored --nocapture`).
#[test]
#[ignore]
fn timings() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let r = Routes::new(2048, 4, 32, 11);
    let (h, i) = (2880, 2880);
    let bf = |t: Tensor| t.to_dtype(DType::BF16)?.to_device(&dev);
    let x = Var::from_tensor(&bf(pseudo((r.n, h), 1.0, 1)?)?)?;
    let gu = Var::from_tensor(&bf(pseudo((r.m(), 2 * i), 9.0, 2)?)?)?;
    let ys = Var::from_tensor(&bf(pseudo((r.m(), h), 1.0, 4)?)?)?;
    let w = Var::from_tensor(&bf(pseudo((r.n, r.k), 1.0, 5)?)?)?;
    let gu_bias = bf(pseudo((r.e, 2 * i), 1.0, 3)?)?;
    let bias = bf(pseudo((r.e, h), 1.0, 6)?)?;
    let tokens = u32s(&r.tokens, &dev)?;
    let pos = u32s(&r.pos, &dev)?.reshape((r.n, r.k))?;
    let ex = u32s(&r.expert, &dev)?.reshape((r.n, r.k))?;
    let re = u32s(&r.row_expert, &dev)?;
    let reps = 20;
    let per_call = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?;
        dev.synchronize()?;
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            f()?;
        }
        dev.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() / reps as f64 * 1e6)
    };
    // The backward kernels are timed by their profile scopes (`moe.*.bwd`, with GPTOSS_PROFILE=1);
    // the upstream gradient is a contiguous tensor, as in training.
    let time = |name: &str, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
        let fwd = per_call(&|| f().map(|_| ()))?;
        let g = f()?.ones_like()?;
        gptoss_kernels::profile::reset();
        per_call(&|| (f()? * &g)?.sum_all()?.backward().map(|_| ()))?;
        let bwd: Vec<String> = gptoss_kernels::profile::report()
            .into_iter()
            .map(|(label, secs, calls)| format!("{label} {:.1} us", secs / calls as f64 * 1e6))
            .collect();
        println!("{name}: forward {fwd:.1} us, backward: {}", bwd.join(", "));
        Ok(())
    };
    time("gather_rows [2048,2880] -> [8192,2880]", &|| {
        gather_rows(x.as_tensor(), &tokens, &pos)
    })?;
    time("swiglu_bias [8192,5760] -> [8192,2880]", &|| {
        swiglu_bias(gu.as_tensor(), &gu_bias, &re, 7.0, 1.702)
    })?;
    time("combine [8192,2880] -> [2048,2880]", &|| {
        combine(ys.as_tensor(), w.as_tensor(), &pos, &bias, &ex)
    })?;
    Ok(())
}
