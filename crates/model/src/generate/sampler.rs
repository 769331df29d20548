//! Sampling settings ([`GenerationConfig`]) and the token chooser ([`Sampler`]).

use rand::{Rng, SeedableRng};

use super::harmony_stop_tokens;
use crate::error::{ModelError, Result};

/// Sampling and stopping settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0.0` means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to at least `top_p` (1.0 = off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// RNG seed (sampling is reproducible for a given seed).
    pub seed: u64,
    /// A row stops after emitting one of these ids (the stop token is included in its output).
    pub stop_tokens: Vec<u32>,
    /// Id fed for padding (left padding of prompts and finished rows); never attended to.
    pub pad_token_id: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_tokens: harmony_stop_tokens(false),
            pad_token_id: 199999,
        }
    }
}

impl GenerationConfig {
    /// Checks the sampling settings: `max_new_tokens ≥ 1`, `temperature` finite and ≥ 0, `top_p` in
    /// (0, 1]. `what` names the request in the error (e.g. `"request 3"`).
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad =
            |field: &str, reason: String| Err(ModelError::arg(&format!("{what}: {field}"), reason));
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "expected at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!(
                    "expected a finite value ≥ 0 (0 = greedy), got {}",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("expected a value in (0, 1] (1 = off), got {}", self.top_p),
            );
        }
        Ok(())
    }
}

/// Picks the next token from a row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: rand::rngs::StdRng,
    temperature: f64,
    top_p: f64,
    top_k: usize,
}

impl Sampler {
    /// A sampler with the settings of `cfg`.
    pub fn new(cfg: &GenerationConfig) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            top_k: cfg.top_k,
        }
    }

    /// Whether this sampler always takes the argmax (`temperature` 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Sample a token id from `logits` `[V]`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        if self.temperature <= 0.0 || logits.is_empty() {
            return argmax();
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| {
            logits[b]
                .partial_cmp(&logits[a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / self.temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (j, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.top_p {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (j, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return order[j] as u32;
            }
        }
        order[order.len() - 1] as u32
    }
}

/// The argmax of every row of `logits` `[B, V]` (f32, on the model's device), computed on that
/// device so that only `B` ids come to the host instead of `B × V` logits: greedy decoding's
/// token choice. On the CPU candle's argmax keeps the first maximum, as [`Sampler::sample`]
/// does; candle's CUDA kernel (a strided tree reduction) may pick another of several exactly
/// equal maxima.
pub(crate) fn argmax_rows(logits: &candle_core::Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_argmax_picks_what_the_greedy_sampler_picks_ties_included() {
        // rows with a tie for the maximum (the first wins), a maximum at the ends, all equal
        let rows: Vec<Vec<f32>> = vec![
            vec![0.5, 2.0, -1.0, 2.0],
            vec![3.0, 1.0, 2.0, 0.0],
            vec![-4.0, -3.0, -2.0, 7.5],
            vec![1.0, 1.0, 1.0, 1.0],
        ];
        let flat: Vec<f32> = rows.concat();
        let t = candle_core::Tensor::from_vec(flat, (4, 4), &candle_core::Device::Cpu).unwrap();
        let mut greedy = Sampler::new(&GenerationConfig {
            temperature: 0.0,
            ..GenerationConfig::default()
        });
        let host: Vec<u32> = rows.iter().map(|r| greedy.sample(r)).collect();
        assert_eq!(host, vec![1, 0, 3, 0]);
        assert_eq!(argmax_rows(&t).unwrap(), host);
    }
}
