//! Random initialisation (transformers `_init_weights`), directly on the target device.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::model::GptOssForCausalLM;
use crate::packed_experts::{placeholder, PackedExperts};
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

/// A randomly initialised model (as [`init_random`]: N(0, `initializer_range`) weights, zero
/// biases, unit norms, all created on `device` by its RNG) whose experts are random MXFP4
/// ([`PackedExperts::random`]) kept packed and dequantized per layer in the forward.
///
/// `Experts::param` of such a model is a placeholder; saving or merging it needs dense experts.
pub fn init_random_packed(
    config: &Config,
    dtype: DType,
    device: &Device,
    seed: Option<u64>,
) -> Result<GptOssForCausalLM> {
    if let (Some(s), false) = (seed, device.is_cpu()) {
        device.set_seed(s)?;
    }
    let std = config.initializer_range as f32;
    let mut model = build_model(config, dtype, device, |s: &TensorSpec| match s.kind {
        ParamKind::Bias => Ok(Tensor::zeros(s.shape.as_slice(), dtype, device)?),
        ParamKind::Norm => Ok(Tensor::ones(s.shape.as_slice(), dtype, device)?),
        ParamKind::Expert => placeholder(&s.shape, dtype, device),
        ParamKind::Weight | ParamKind::Normal => {
            Ok(Tensor::randn(0f32, std, s.shape.as_slice(), device)?.to_dtype(dtype)?)
        }
    })?;
    for layer in model.model.layers.iter_mut() {
        let packed = PackedExperts::random(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            device,
        )?;
        layer.mlp.experts.set_packed(Some(Arc::new(packed)));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::ExpertParam;

    #[test]
    fn packed_forward_equals_dense_forward() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = Config::tiny();
        let model = init_random_packed(&cfg, DType::F32, &dev, Some(1))?;
        // The same model with the experts dequantized once into dense parameters.
        let mut dense = model.clone();
        for layer in dense.model.layers.iter_mut() {
            let ex = &mut layer.mlp.experts;
            let packed = ex
                .packed()
                .cloned()
                .ok_or_else(|| ModelError::arg("packed", "missing"))?;
            ex.set_packed(None);
            for p in [ExpertParam::GateUp, ExpertParam::Down] {
                let w = packed.dequantize(p, DType::F32)?.contiguous()?;
                ex.set_param(p, w)?;
            }
        }
        let ids = Tensor::new(&[[1u32, 7, 3, 9, 2]], &dev)?;
        let a = model.forward(&ids, None)?;
        let b = dense.forward(&ids, None)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "packed vs dense logits differ by {diff}");
        Ok(())
    }
}
