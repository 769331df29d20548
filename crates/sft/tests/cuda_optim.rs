//! The CUDA AdamW kernels against the CPU candle-op composition (which the unit tests of
//! `optim` check against torch): parameters and both moments after several steps, bit for bit
//! (per-parameter kernel, and the multi-tensor `clip_and_step` without clipping), and within f32
//! rounding of the norm when the multi-tensor path clips. Needs a CUDA device (run on the GPU
//! machine).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use gptoss_sft::optim::{AdamW, AdamWConfig, Gradients};

/// Three parameters of LoRA-like shapes, the same values on `dev`.
fn params(dev: &Device) -> Result<Vec<(String, Var)>> {
    let shapes: [&[usize]; 3] = [&[8, 2880], &[4096, 8], &[5]];
    let mut out = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let n: usize = s.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|j| ((j * 7919 + i * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(vals, *s, &Device::Cpu)?.to_device(dev)?;
        out.push((format!("p{i}"), Var::from_tensor(&t)?));
    }
    Ok(out)
}

/// How each update is made.
#[derive(Clone, Copy, Debug)]
enum Update {
    /// `AdamW::step`.
    Step,
    /// `AdamW::clip_and_step` with this `max_norm`.
    ClipAndStep(Option<f64>),
}

/// Runs `steps` updates with pseudo-random gradients (the same on every device); returns the
/// parameters and moments on the CPU, flattened, then the norms `clip_and_step` returned.
fn run(dev: &Device, config: AdamWConfig, steps: usize, update: Update) -> Result<Vec<Vec<f32>>> {
    let ps = params(dev)?;
    let vars: Vec<Var> = ps.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(ps, config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut norms = Vec::new();
    for step in 0..steps {
        let mut grads = Gradients::new(vars.len());
        for (i, v) in vars.iter().enumerate() {
            let n = v.elem_count();
            let g: Vec<f32> = (0..n)
                .map(|j| {
                    let h =
                        (j as u64 * 2_654_435_761 + step as u64 * 40_503 + i as u64 * 97) % 10_007;
                    (h as f32 / 10_007.0 - 0.5) * 10f32.powi((j % 7) as i32 - 4)
                })
                .collect();
            let g = Tensor::from_vec(g, v.shape(), &Device::Cpu)?.to_device(dev)?;
            grads
                .set(i, g)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        let lr = 2e-4 * (1.0 + step as f64);
        let err = |e: gptoss_sft::SftError| candle_core::Error::Msg(e.to_string());
        match update {
            Update::Step => opt.step(&grads, lr).map_err(err)?,
            Update::ClipAndStep(max) => {
                if let Some(n) = opt.clip_and_step(&mut grads, lr, max).map_err(err)? {
                    norms.push(n.to_scalar::<f32>()?);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        out.push(
            v.as_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?,
        );
        let (m, s) = opt
            .moments(&format!("p{i}"))
            .ok_or_else(|| candle_core::Error::Msg("no moments".into()))?;
        out.push(m.flatten_all()?.to_vec1()?);
        out.push(s.flatten_all()?.to_vec1()?);
    }
    out.push(norms);
    Ok(out)
}

/// Counts the values of `a` and `b` whose bits differ, and the largest difference relative to
/// `a`'s largest magnitude.
fn compare(a: &[f32], b: &[f32]) -> (usize, f32) {
    let differ = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    let scale = a
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (differ, max / scale)
}

#[test]
fn cuda_clip_and_step_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    // no clipping (coefficient exactly 1) and no norm: bit for bit; clipping: within the f32
    // rounding of a norm summed in another order
    for (max, exact) in [(Some(1e9), true), (None, true), (Some(0.05), false)] {
        let update = Update::ClipAndStep(max);
        let cpu = run(&Device::Cpu, config, 4, update)?;
        let cuda = run(&gpu, config, 4, update)?;
        assert_eq!(cpu.len(), cuda.len());
        let Some(norms) = cpu.last() else {
            panic!("no norms")
        };
        assert_eq!(norms.len(), 4, "one norm per step");
        for (k, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
            let (differ, rel) = compare(a, b);
            let what = if k == cpu.len() - 1 {
                "norms"
            } else {
                ["param", "exp_avg", "exp_avg_sq"][k % 3]
            };
            if exact && k < cpu.len() - 1 {
                assert_eq!(differ, 0, "max {max:?}: {what} {k}: {differ} values differ");
            } else {
                assert!(
                    rel < 1e-5,
                    "max {max:?}: {what} {k}: relative difference {rel:e}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn cuda_adamw_matches_cpu_bit_for_bit() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    for wd in [0.0, 0.01] {
        let config = AdamWConfig {
            weight_decay: wd,
            ..AdamWConfig::default()
        };
        let cpu = run(&Device::Cpu, config, 4, Update::Step)?;
        let cuda = run(&gpu, config, 4, Update::Step)?;
        for (k, (a, b)) in cpu.iter().zip(&cuda).enumerate().take(cpu.len() - 1) {
            let (differ, rel) = compare(a, b);
            assert_eq!(
                differ, 0,
                "wd {wd}: tensor {k} ({} of param {}): {differ} of {} values differ, max relative diff {rel:e}",
                ["param", "exp_avg", "exp_avg_sq"][k % 3],
                k / 3,
                a.len()
            );
        }
    }
    Ok(())
}
