//! Token generation with a KV cache: batched left-padded prompts, sampling, stop tokens, step-wise streaming,
//! and continuous batching over many requests ([`generate_batch`]).
//!
//! Modules: `sampler` (settings and token choice) → `cache_rows` (row surgery on a [`KvCache`]) →
//! this file ([`Generator`], [`generate`]) → `batch` (the request scheduler).

mod batch;
mod cache_rows;
mod sampler;

pub use batch::{
    generate_batch, BatchOptions, FinishReason, GenerationEvent, GenerationOutput,
    GenerationRequest,
};
use sampler::argmax_rows;
pub use sampler::{GenerationConfig, Sampler};

use candle_core::Tensor;

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
        let last = self
            .model
            .forward_last_with_cache(&ids, Some(&mask), &mut self.cache)?;
        let tokens =
            gptoss_kernels::profile::scope("decode.sample", dev, || self.next_tokens(&last))?;
        let mut produced = Vec::with_capacity(b);
        for (r, tok) in tokens.into_iter().enumerate() {
            if self.finished[r] {
                produced.push(None);
                self.pending[r] = vec![self.cfg.pad_token_id];
                self.mask[r].push(0);
                continue;
            }
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

    /// The token of every unfinished row from `logits` `[B, V]`, the rows in order through the one
    /// sampler (finished rows get 0 and do not advance its random state); greedy on the device.
    fn next_tokens(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        if self.sampler.is_greedy() {
            return argmax_rows(logits);
        }
        let rows = logits.to_vec2::<f32>()?;
        Ok(rows
            .iter()
            .zip(&self.finished)
            .map(|(row, &done)| if done { 0 } else { self.sampler.sample(row) })
            .collect())
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
