//! The fused CUDA `lora_A(x.to(float32))` (`down_proj`) against the candle composition on the CPU:
//! output and both gradients, bf16 and f32 inputs, the cookbook shape and odd ones. Needs a CUDA
//! device (run on the GPU machine).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use gptoss_kernels::lora::{down_proj, up_add};

/// `max |a − b| / max(1e-6, max |b|)`.
fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6))
}

/// The gradient of each var in `store`, on the CPU.
fn grads_on_cpu(store: &GradStore, vars: &[&Var]) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => g.to_device(&Device::Cpu),
            None => Err(candle_core::Error::Msg("no gradient".into())),
        })
        .collect()
}

/// (output, ∂x, ∂A) of `sum(down_proj(x, A) · w)` on `dev`.
fn run(x: &Tensor, a: &Tensor, w: &Tensor, dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let x = Var::from_tensor(&x.to_device(dev)?)?;
    let a = Var::from_tensor(&a.to_device(dev)?)?;
    let h = down_proj(x.as_tensor(), a.as_tensor())?;
    let g = (&h * w.to_device(dev)?)?.sum_all()?.backward()?;
    let [dx, da]: [Tensor; 2] = grads_on_cpu(&g, &[&x, &a])?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("two gradients".into()))?;
    Ok((h.to_device(&Device::Cpu)?, dx, da))
}

#[test]
fn cuda_down_proj_matches_the_composition() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let cpu = Device::Cpu;
    for (n, in_dim, r) in [(2048, 2880, 8), (37, 64, 3), (5, 4096, 16), (300, 2880, 1)] {
        for dtype in [DType::BF16, DType::F32] {
            let x = Tensor::randn(0f32, 1.0, (n, in_dim), &cpu)?.to_dtype(dtype)?;
            let a = Tensor::randn(0f32, 0.02, (r, in_dim), &cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n, r), &cpu)?;
            let (h0, dx0, da0) = run(&x, &a, &w, &cpu)?;
            let (h1, dx1, da1) = run(&x, &a, &w, &gpu)?;
            assert_eq!(dx1.dtype(), dtype, "dx keeps x's dtype");
            let dx_tol = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
            let (eh, edx, eda) = (rel(&h1, &h0)?, rel(&dx1, &dx0)?, rel(&da1, &da0)?);
            println!("n {n} in {in_dim} r {r} {dtype:?}: h {eh:e} dx {edx:e} dA {eda:e}");
            assert!(
                eh < 1e-5,
                "{n}x{in_dim} r{r} {dtype:?}: output differs by {eh}"
            );
            assert!(
                edx < dx_tol,
                "{n}x{in_dim} r{r} {dtype:?}: dx differs by {edx}"
            );
            assert!(
                eda < 1e-5,
                "{n}x{in_dim} r{r} {dtype:?}: dA differs by {eda}"
            );
        }
    }
    Ok(())
}

/// (output, ∂base, ∂h, ∂b) of `sum(up_add(base, bias, h, b, 2) · w)` on `dev`.
fn run_up(
    base: &Tensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
    w: &Tensor,
    dev: &Device,
) -> Result<[Tensor; 4]> {
    let base = Var::from_tensor(&base.to_device(dev)?)?;
    let h = Var::from_tensor(&h.to_device(dev)?)?;
    let b = Var::from_tensor(&b.to_device(dev)?)?;
    let bias = bias.map(|t| t.to_device(dev)).transpose()?;
    let y = up_add(
        base.as_tensor(),
        bias.as_ref(),
        h.as_tensor(),
        b.as_tensor(),
        2.0,
    )?;
    let g = (y.to_dtype(DType::F32)? * w.to_device(dev)?)?
        .sum_all()?
        .backward()?;
    let [db, dh, dw]: [Tensor; 3] = grads_on_cpu(&g, &[&base, &h, &b])?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("three gradients".into()))?;
    Ok([y.to_device(&Device::Cpu)?, db, dh, dw])
}

#[test]
fn cuda_up_add_matches_the_composition() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let cpu = Device::Cpu;
    // the cookbook's q_proj at 2048 tokens, and an odd shape
    for (n, out, r) in [(2048usize, 4096usize, 8usize), (37, 12, 3)] {
        for dtype in [DType::F32, DType::BF16] {
            for with_bias in [false, true] {
                let base = Tensor::randn(0f32, 1.0, (1, n, out), &cpu)?.to_dtype(dtype)?;
                let bias = Tensor::randn(0f32, 1.0, out, &cpu)?.to_dtype(dtype)?;
                let bias = with_bias.then_some(&bias);
                let h = Tensor::randn(0f32, 1.0, (n, r), &cpu)?;
                let b = Tensor::randn(0f32, 0.1, (out, r), &cpu)?;
                let w = Tensor::randn(0f32, 1.0, (1, n, out), &cpu)?;
                let want = run_up(&base, bias, &h, &b, &w, &cpu)?;
                let got = run_up(&base, bias, &h, &b, &w, &gpu)?;
                // bf16 outputs may differ by one rounding step where the f32 sums differ in order
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                for (name, g, c) in ["out", "∂base", "∂h", "∂b"]
                    .iter()
                    .zip(&got)
                    .zip(&want)
                    .map(|((n, g), c)| (n, g, c))
                {
                    let d = rel(g, c)?;
                    assert!(
                        d < tol,
                        "{n}×{out} r{r} {dtype:?} bias {with_bias}: {name} differs by {d}"
                    );
                }
            }
        }
    }
    Ok(())
}
