//! The grouped expert LoRA of `LoraExperts` (`gptoss_kernels::lora::expert_delta` on CUDA) against
//! the per-expert path on the CPU: delta and all three gradients. Needs a CUDA device (run on the
//! GPU machine).
#![cfg(feature = "cuda")]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use gptoss_model::ExpertAdapter;

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

/// (delta, ∂x, ∂A, ∂B) of `sum(delta_grouped(x) · w)` for a `LoraExperts` on `dev`.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn run_experts(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    w: &Tensor,
    spans: &[(usize, usize, usize)],
    experts: usize,
    r: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let x = Var::from_tensor(&x.to_device(dev)?)?;
    let av = Var::from_tensor(&a.to_device(dev)?)?;
    let bv = Var::from_tensor(&b.to_device(dev)?)?;
    let lora = gptoss_lora::expert::LoraExperts::new(av.clone(), bv.clone(), experts, r, 2.0);
    let y = lora.delta_grouped(x.as_tensor(), spans)?;
    let g = (y.to_dtype(DType::F32)? * w.to_device(dev)?)?
        .sum_all()?
        .backward()?;
    let [dx, da, db]: [Tensor; 3] = grads_on_cpu(&g, &[&x, &av, &bv])?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("three gradients".into()))?;
    Ok((y.to_device(&Device::Cpu)?, dx, da, db))
}

#[test]
fn cuda_expert_delta_matches_the_per_expert_path() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let cpu = Device::Cpu;
    // uneven spans with an expert that gets no rows (3) and one of a single row (5)
    let (experts, r) = (8usize, 8usize);
    let lens = [70usize, 3, 130, 0, 64, 1, 200, 45];
    let mut spans = Vec::new();
    let mut off = 0;
    for (e, &len) in lens.iter().enumerate() {
        if len > 0 {
            spans.push((e, off, len));
        }
        off += len;
    }
    let m = off;
    for (in_dim, out) in [(2880usize, 5760usize), (64, 96)] {
        for dtype in [DType::BF16, DType::F32] {
            let x = Tensor::randn(0f32, 1.0, (m, in_dim), &cpu)?.to_dtype(dtype)?;
            let a = Tensor::randn(0f32, 0.05, (experts * r, in_dim), &cpu)?;
            let b = Tensor::randn(0f32, 0.05, (out, r * experts), &cpu)?;
            let w = Tensor::randn(0f32, 1.0, (m, out), &cpu)?;
            let (y0, dx0, da0, db0) = run_experts(&x, &a, &b, &w, &spans, experts, r, &cpu)?;
            let (y1, dx1, da1, db1) = run_experts(&x, &a, &b, &w, &spans, experts, r, &gpu)?;
            let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
            let (ey, edx, eda, edb) = (
                rel(&y1, &y0)?,
                rel(&dx1, &dx0)?,
                rel(&da1, &da0)?,
                rel(&db1, &db0)?,
            );
            println!(
                "experts {in_dim}->{out} {dtype:?}: y {ey:e} dx {edx:e} dA {eda:e} dB {edb:e}"
            );
            assert!(ey < tol, "{dtype:?} {in_dim}->{out}: delta differs by {ey}");
            assert!(edx < tol, "{dtype:?} {in_dim}->{out}: dx differs by {edx}");
            assert!(eda < 1e-5, "{dtype:?} {in_dim}->{out}: dA differs by {eda}");
            assert!(edb < 1e-5, "{dtype:?} {in_dim}->{out}: dB differs by {edb}");
            // the expert without rows gets exactly zero gradients
            let da_empty = da1
                .narrow(0, 3 * r, r)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(da_empty, 0.0, "expert 3 has no rows, its dA must be 0");
        }
    }
    Ok(())
}
