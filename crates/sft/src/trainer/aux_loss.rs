//! MoE load-balancing (router aux) loss, split per layer so that gradient checkpointing can add
//! each layer's share during its recomputation.
//!
//! transformers' `load_balancing_loss_func` (gpt-oss, with an attention mask) over all layers:
//! `aux = E · Σ_e f_e · P_e`, with `f_e = C_e / (L·Σw)` (`C_e` = masked count of top-k selections of
//! expert e over all layers and tokens) and `P_e = S_e / (L·Σw)` (`S_e` = masked sum of the full
//! softmax probabilities). Only `P` carries a gradient (the top-k one-hot does not), so
//! `aux = Σ_l E · Σ_e C_e · S_e^(l) / (L·Σw)²` is exact per layer `l` once `C` is known from the
//! (detached) forward pass.

use candle_core::{DType, Result, Tensor, D};

/// The per-step constants of the aux loss, computed from the detached router logits of every layer.
#[derive(Debug, Clone)]
pub struct AuxLossPlan {
    /// `coef_scale · E / (L·Σw)² · C_e`, `[E, 1]` f32.
    weights: Tensor,
    /// Token weights `w` (attention mask), `[1, N]` f32.
    token_weights: Tensor,
    /// The unscaled aux value `E · Σ_e f_e · P_e` of the forward pass.
    pub value: f64,
}

impl AuxLossPlan {
    /// Builds the plan.
    ///
    /// - `router_logits`: one `[N, E]` tensor per layer (any float dtype; detached values are used).
    /// - `token_mask`: `N` weights (1 = token, 0 = padding), in the flattened `[B·T]` order.
    /// - `top_k`: experts per token; `coef_scale`: multiplies the differentiable layer terms
    ///   (e.g. `router_aux_loss_coef / gradient_accumulation_steps`).
    pub fn new(
        router_logits: &[Tensor],
        token_mask: &[f32],
        top_k: usize,
        coef_scale: f64,
    ) -> Result<Self> {
        let l = router_logits.len();
        let Some(first) = router_logits.first() else {
            candle_core::bail!("aux loss: no router logits");
        };
        let (n, e) = first.dims2()?;
        if token_mask.len() != n {
            candle_core::bail!(
                "aux loss: {n} router rows but {} mask entries",
                token_mask.len()
            );
        }
        let mut counts = vec![0f64; e];
        let mut prob_sums = vec![0f64; e];
        for logits in router_logits {
            let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (row, &w) in rows.iter().zip(token_mask) {
                if w == 0.0 {
                    continue;
                }
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                for (s, &x) in prob_sums.iter_mut().zip(row) {
                    *s += w as f64 * ((x - max) as f64).exp() / z;
                }
                let mut idx: Vec<usize> = (0..e).collect();
                // Stable: ties keep the lower index, like torch.topk on CPU in practice.
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                for &j in idx.iter().take(top_k) {
                    counts[j] += w as f64;
                }
            }
        }
        let denom = l as f64 * token_mask.iter().map(|&w| w as f64).sum::<f64>();
        let value = if denom > 0.0 {
            e as f64
                * counts
                    .iter()
                    .zip(&prob_sums)
                    .map(|(c, s)| c * s)
                    .sum::<f64>()
                / (denom * denom)
        } else {
            0.0
        };
        let scale = if denom > 0.0 {
            coef_scale * e as f64 / (denom * denom)
        } else {
            0.0
        };
        let w: Vec<f32> = counts.iter().map(|c| (c * scale) as f32).collect();
        let dev = first.device();
        Ok(Self {
            weights: Tensor::from_vec(w, (e, 1), dev)?,
            token_weights: Tensor::from_slice(token_mask, (1, n), dev)?,
            value,
        })
    }

    /// The differentiable share of one layer, `coef_scale · E · Σ_e C_e · S_e^(l) / (L·Σw)²`:
    /// a scalar f32 tensor whose graph goes through `router_logits` (`[N, E]`).
    pub fn layer_term(&self, router_logits: &Tensor) -> Result<Tensor> {
        let p = candle_nn::ops::softmax(&router_logits.to_dtype(DType::F32)?, D::Minus1)?;
        self.token_weights
            .matmul(&p.matmul(&self.weights)?)?
            .sum_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn balanced_router_gives_top_k() -> Result<()> {
        // Uniform logits with distinct top-k per token in a round-robin: perfect balance → aux = k.
        let e = 4;
        let rows: Vec<f32> = (0..8)
            .flat_map(|t| (0..e).map(move |j| if (j + t) % e < 2 { 1e-3 } else { 0.0 }))
            .collect();
        let logits = Tensor::from_vec(rows, (8, e), &Device::Cpu)?;
        let plan = AuxLossPlan::new(&[logits.clone(), logits], &[1.0; 8], 2, 1.0)?;
        assert!((plan.value - 2.0).abs() < 1e-2, "{}", plan.value);
        Ok(())
    }

    #[test]
    fn layer_terms_sum_to_value() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let mask = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let plan = AuxLossPlan::new(&[a.clone(), b.clone()], &mask, 2, 0.5)?;
        let sum = (plan.layer_term(&a)? + plan.layer_term(&b)?)?.to_scalar::<f32>()? as f64;
        assert!(
            (sum - 0.5 * plan.value).abs() < 1e-5,
            "{sum} vs {}",
            plan.value
        );
        Ok(())
    }
}
