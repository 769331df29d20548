//! Token generation with a KV cache: batched left-padded prompts, sampling, stop tokens, step-wise streaming.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};
use crate::model::{GptOssForCausalLM, KvCache};

/// Harmony `<|return|>`: the assistant's final message is complete.
pub const HARMONY_RETURN: u32 = 200002;
/// Harmony `<|call|>`: the assistant calls a tool.
pub const HARMONY_CALL: u32 = 200012;
/// Harmony `<|end|>`: end of one message (a stop token only when the caller wants one message at a time).
pub const HARMONY_END: u32 = 200007;

/// Harmony's stop tokens for completions: `<|return|>` and `<|call|>`, plus `<|end|>` when `include_end`.
pub fn harmony_stop_tokens(include_end: bool) -> Vec<u32> {
    let mut v = vec![HARMONY_RETURN, HARMONY_CALL];
    if include_end {
        v.push(HARMONY_END);
    }
    v
}

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

/// Step-wise generation over a batch of prompts (left-padded), for streaming.
#[derive(Debug)]
pub struct Generator<'a> {
    model: &'a GptOssForCausalLM,
    cfg: GenerationConfig,
    sampler: Sampler,
    cache: KvCache,
    mask: Vec<Vec<u32>>,
    pending: Vec<Vec<u32>>,
    outputs: Vec<Vec<u32>>,
    finished: Vec<bool>,
    steps: usize,
}

impl<'a> Generator<'a> {
    /// Prepare generation for `prompts` (token ids, any lengths ≥ 1; shorter ones are left-padded).
    pub fn new(
        model: &'a GptOssForCausalLM,
        prompts: &[Vec<u32>],
        cfg: GenerationConfig,
    ) -> Result<Self> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(ModelError::arg(
                "prompts",
                "need at least one prompt, each with at least one token",
            ));
        }
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut pending = Vec::with_capacity(prompts.len());
        let mut mask = Vec::with_capacity(prompts.len());
        for p in prompts {
            let pad = longest - p.len();
            let mut row = vec![cfg.pad_token_id; pad];
            row.extend_from_slice(p);
            pending.push(row);
            mask.push(
                std::iter::repeat_n(0u32, pad)
                    .chain(std::iter::repeat_n(1u32, p.len()))
                    .collect(),
            );
        }
        let n = prompts.len();
        Ok(Self {
            model,
            sampler: Sampler::new(&cfg),
            cfg,
            cache: model.new_cache(),
            mask: vec![Vec::new(); n],
            pending,
            outputs: vec![Vec::new(); n],
            finished: vec![false; n],
            steps: 0,
        }
        .with_prompt_mask(mask))
    }

    fn with_prompt_mask(mut self, mask: Vec<Vec<u32>>) -> Self {
        self.mask = mask;
        self
    }

    /// Whether every row has stopped (stop token or `max_new_tokens`).
    pub fn is_done(&self) -> bool {
        self.steps >= self.cfg.max_new_tokens || self.finished.iter().all(|&f| f)
    }

    /// Run one step. Returns `None` when done, else the token produced for each row (`None` for rows that had
    /// already stopped).
    pub fn step(&mut self) -> Result<Option<Vec<Option<u32>>>> {
        if self.is_done() {
            return Ok(None);
        }
        let dev = self.model.device();
        let b = self.pending.len();
        let t = self.pending[0].len();
        let flat: Vec<u32> = self.pending.concat();
        let ids = Tensor::from_vec(flat, (b, t), dev)?;
        let seen = self.mask[0].len();
        let mflat: Vec<u32> = self.mask.concat();
        let mask = Tensor::from_vec(mflat, (b, seen), dev)?;
        let logits = self
            .model
            .forward_with_cache(&ids, Some(&mask), &mut self.cache)?;
        let last = logits
            .narrow(1, t - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut produced = Vec::with_capacity(b);
        for (r, row) in last.iter().enumerate() {
            if self.finished[r] {
                produced.push(None);
                self.pending[r] = vec![self.cfg.pad_token_id];
                self.mask[r].push(0);
                continue;
            }
            let tok = self.sampler.sample(row);
            self.outputs[r].push(tok);
            if self.cfg.stop_tokens.contains(&tok) {
                self.finished[r] = true;
            }
            self.pending[r] = vec![tok];
            self.mask[r].push(1);
            produced.push(Some(tok));
        }
        self.steps += 1;
        Ok(Some(produced))
    }

    /// Tokens generated so far per row (stop tokens included).
    pub fn outputs(&self) -> &[Vec<u32>] {
        &self.outputs
    }

    /// Consume the generator, returning the generated tokens per row.
    pub fn into_outputs(self) -> Vec<Vec<u32>> {
        self.outputs
    }
}

/// Generate for `prompts` until every row hits a stop token or `max_new_tokens`; returns new tokens per row.
pub fn generate(
    model: &GptOssForCausalLM,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    let mut g = Generator::new(model, prompts, cfg.clone())?;
    while g.step()?.is_some() {}
    Ok(g.into_outputs())
}
