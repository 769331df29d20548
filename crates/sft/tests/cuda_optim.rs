//! The CUDA AdamW kernel against the CPU candle-op composition (which the unit tests of
//! `optim` check against torch): parameters and both moments after several steps, bit for bit.
//! Needs a CUDA device (run on the GPU machine).
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

/// Runs `steps` updates with pseudo-random gradients (the same on every device); returns the
/// parameters and moments on the CPU, flattened.
fn run(dev: &Device, config: AdamWConfig, steps: usize) -> Result<Vec<Vec<f32>>> {
    let ps = params(dev)?;
    let vars: Vec<Var> = ps.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(ps, config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
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
        opt.step(&grads, 2e-4 * (1.0 + step as f64))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
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
    Ok(out)
}

#[test]
fn cuda_adamw_matches_cpu_bit_for_bit() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    for wd in [0.0, 0.01] {
        let config = AdamWConfig {
            weight_decay: wd,
            ..AdamWConfig::default()
        };
        let cpu = run(&Device::Cpu, config, 4)?;
        let cuda = run(&gpu, config, 4)?;
        for (k, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
            let differ = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            let max = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert_eq!(
                differ, 0,
                "wd {wd}: tensor {k} ({} of param {}): {differ} of {} values differ, max |diff| {max:e}",
                ["param", "exp_avg", "exp_avg_sq"][k % 3],
                k / 3,
                a.len()
            );
        }
    }
    Ok(())
}
