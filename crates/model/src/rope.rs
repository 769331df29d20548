//! YaRN rotary position embedding (transformers `_compute_yarn_parameters`, half-split rotation).

use candle_core::{DType, Tensor, D};

use crate::config::Config;

/// Inverse frequencies `[head_dim / 2]` and the cos/sin scale (YaRN attention factor).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    /// Inverse frequencies, f32 as transformers computes them.
    pub inv_freq: Vec<f32>,
    /// Multiplier of cos and sin (1.3465735902799727 for gpt-oss; 1.0 for plain RoPE).
    pub attention_factor: f64,
}

impl RopeParams {
    /// Compute the parameters of `config` exactly as transformers 5.24 does (f32 tensor math, f64 scalars).
    pub fn new(config: &Config) -> Self {
        let dim = config.head_dim();
        let half = dim / 2;
        let base = config.rope_base();
        let rope = config.rope();
        // pos_freqs = base ** (arange(0, dim, 2).float() / dim), f32.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        if rope.rope_type != "yarn" {
            let inv_freq = pos_freqs.iter().map(|p| 1.0f32 / p).collect();
            return Self {
                inv_freq,
                attention_factor: 1.0,
            };
        }
        let factor = rope.factor.unwrap_or(1.0);
        let orig = rope
            .original_max_position_embeddings
            .unwrap_or(config.max_position_embeddings) as f64;
        let get_mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention_factor = match (rope.attention_factor, rope.mscale, rope.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                get_mscale(factor, m) / get_mscale(factor, ma)
            }
            _ => get_mscale(factor, 1.0),
        };
        let beta_fast = rope.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0);
        let beta_slow = rope.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0);
        let corr = |rot: f64| {
            (dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
        };
        let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
        if rope.truncate.unwrap_or(true) {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min((dim - 1) as f64);
        if low == high {
            high += 0.001;
        }
        let (low32, span32) = (low as f32, (high - low) as f32);
        let inv_freq = (0..half)
            .map(|i| {
                let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
                let extra_factor = 1.0f32 - ramp;
                let extra = 1.0f32 / pos_freqs[i];
                let inter = 1.0f32 / (factor as f32 * pos_freqs[i]);
                inter * (1.0 - extra_factor) + extra * extra_factor
            })
            .collect();
        Self {
            inv_freq,
            attention_factor,
        }
    }

    /// cos and sin tables for `positions` `[B, T]` (u32/f32): each `[B, 1, T, head_dim/2]` in `dtype`,
    /// computed in f32 (`cos(pos·inv_freq)·factor`) and then cast, on the positions' device.
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let dev = positions.device();
        let inv = Tensor::new(self.inv_freq.as_slice(), dev)?;
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // [B, T, 1]
        let freqs = pos.broadcast_mul(&inv.reshape((1, 1, self.inv_freq.len()))?)?; // [B, T, d/2]
        let cos = (freqs.cos()? * self.attention_factor)?
            .to_dtype(dtype)?
            .unsqueeze(1)?;
        let sin = (freqs.sin()? * self.attention_factor)?
            .to_dtype(dtype)?
            .unsqueeze(1)?;
        Ok((cos, sin))
    }
}

/// Half-split rotation: `x` `[B, heads, T, d]`, `cos`/`sin` `[B, 1, T, d/2]` (x's dtype) →
/// `cat(x1·cos − x2·sin, x2·cos + x1·sin)`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}
