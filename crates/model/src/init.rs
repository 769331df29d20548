//! Random initialisation (transformers `_init_weights`), directly on the target device.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::model::GptOssForCausalLM;
use crate::spec::{build_model, ParamKind, TensorSpec};

/// A randomly initialised model: weights, experts, sinks and router bias ~ N(0, `initializer_range`), biases 0,
/// norms 1, the `pad_token_id` embedding row 0 (as transformers).
///
/// With `seed`, CPU values come from a seeded host RNG (reproducible); on CUDA the device RNG is seeded.
/// Without a seed, values come from the device RNG.
pub fn init_random(
    config: &Config,
    dtype: DType,
    device: &Device,
    seed: Option<u64>,
) -> Result<GptOssForCausalLM> {
    let std = config.initializer_range;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.unwrap_or(0));
    let host_rng = seed.is_some() && device.is_cpu();
    if let (Some(s), false) = (seed, device.is_cpu()) {
        device.set_seed(s)?;
    }
    let normal = rand_distr::Normal::new(0.0f32, std as f32)
        .map_err(|e| ModelError::config("initializer_range", format!("invalid std {std}: {e}")))?;
    let pad = config
        .pad_token_id
        .map(|p| p as usize)
        .filter(|&p| p < config.vocab_size);
    build_model(config, dtype, device, |s: &TensorSpec| {
        let t = match s.kind {
            ParamKind::Bias => Tensor::zeros(s.shape.as_slice(), dtype, device)?,
            ParamKind::Norm => Tensor::ones(s.shape.as_slice(), dtype, device)?,
            ParamKind::Weight | ParamKind::Normal | ParamKind::Expert => {
                let t = if host_rng {
                    let n: usize = s.shape.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                    Tensor::from_vec(v, s.shape.as_slice(), device)?
                } else {
                    Tensor::randn(0f32, std as f32, s.shape.as_slice(), device)?
                };
                let t = match (s.name.as_str(), pad) {
                    ("model.embed_tokens.weight", Some(p)) => {
                        let rows = Tensor::arange(0u32, config.vocab_size as u32, device)?;
                        let keep = rows.ne(p as u32)?.to_dtype(DType::F32)?.unsqueeze(1)?;
                        t.broadcast_mul(&keep)?
                    }
                    _ => t,
                };
                t.to_dtype(dtype)?
            }
        };
        Ok(t)
    })
}
