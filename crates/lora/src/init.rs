//! Adapter initialisation as PEFT does it (`LoraLayer.reset_lora_parameters`), from a seeded RNG.
//!
//! - `init_lora_weights = true`: A = kaiming_uniform(a=√5) over A's fan-in ⇒ U(±1/√in); B = 0.
//! - `"gaussian"`: A ~ N(0, (1/r)²); B = 0.
//! - `false`: A and B both keep `nn.Linear`'s default init, U(±1/√fan_in) (fan_in = in for A, r or r·E for B).

use candle_core::{DType, Device, Tensor};
use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;

use crate::config::InitLoraWeights;
use crate::error::{LoraError, Result};

/// A `[rows, cols]` f32 tensor drawn from U(−bound, bound).
pub fn uniform(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    bound: f64,
    device: &Device,
) -> Result<Tensor> {
    let dist = Uniform::new_inclusive(-bound as f32, bound as f32).map_err(|e| {
        LoraError::InvalidConfig {
            field: "init_lora_weights",
            reason: format!("bad uniform bound {bound}: {e}"),
        }
    })?;
    let v: Vec<f32> = (0..rows * cols).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

/// A `[rows, cols]` f32 tensor drawn from N(0, std²) (Box–Muller).
pub fn normal(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    std: f64,
    device: &Device,
) -> Result<Tensor> {
    let u = Uniform::new(f64::MIN_POSITIVE, 1.0).map_err(|e| LoraError::InvalidConfig {
        field: "init_lora_weights",
        reason: e.to_string(),
    })?;
    let n = rows * cols;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let (u1, u2) = (u.sample(rng), u.sample(rng));
        let rad = (-2.0 * u1.ln()).sqrt() * std;
        let th = 2.0 * std::f64::consts::PI * u2;
        v.push((rad * th.cos()) as f32);
        v.push((rad * th.sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

/// Initial (A, B) in f32: A `[rows, in_features]`, B `[out_features, rows]`, where rows = r for a linear
/// adapter and r·E for an expert adapter; `r` is the per-module rank (the gaussian std is 1/r).
pub fn init_factors(
    init: &InitLoraWeights,
    rng: &mut StdRng,
    r: usize,
    rows: usize,
    (in_features, out_features): (usize, usize),
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (a_rows, b_cols) = (rows, rows);
    let kaiming = |rng: &mut StdRng, rows, fan_in: usize| {
        uniform(rng, rows, fan_in, 1.0 / (fan_in as f64).sqrt(), device)
    };
    match init {
        InitLoraWeights::Bool(true) => Ok((
            kaiming(rng, a_rows, in_features)?,
            Tensor::zeros((out_features, b_cols), DType::F32, device)?,
        )),
        InitLoraWeights::Bool(false) => Ok((kaiming(rng, a_rows, in_features)?, {
            let bound = 1.0 / (b_cols as f64).sqrt();
            uniform(rng, out_features, b_cols, bound, device)?
        })),
        InitLoraWeights::Method(m) if m.eq_ignore_ascii_case("gaussian") => Ok((
            normal(rng, a_rows, in_features, 1.0 / r as f64, device)?,
            Tensor::zeros((out_features, b_cols), DType::F32, device)?,
        )),
        InitLoraWeights::Method(m) => Err(LoraError::Unsupported {
            field: "init_lora_weights".into(),
            reason: format!("method {m:?} is not implemented"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn kaiming_bound_and_zero_b() {
        let mut rng = StdRng::seed_from_u64(0);
        let (a, b) = init_factors(
            &InitLoraWeights::Bool(true),
            &mut rng,
            8,
            8,
            (100, 30),
            &Device::Cpu,
        )
        .unwrap();
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.1));
        assert!(a.iter().any(|v| v.abs() > 0.09));
        assert_eq!(
            b.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn gaussian_std_is_one_over_r() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = normal(&mut rng, 400, 100, 0.25, &Device::Cpu).unwrap();
        let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let var = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((var.sqrt() - 0.25).abs() < 0.005, "{}", var.sqrt());
    }
}
