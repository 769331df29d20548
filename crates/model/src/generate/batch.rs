//! Continuous batching: many requests (prompts of any lengths, each with its own sampling settings,
//! seed and stop tokens) through one batched KV cache. Up to `max_batch` sequences decode together;
//! a sequence that stops leaves the batch at once and a waiting request is prefilled and joins it.

use candle_core::Tensor;

use super::sampler::{argmax_rows, GenerationConfig, Sampler};
use crate::error::{ModelError, Result};
use crate::model::{GptOssForCausalLM, KvCache};

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// Prompt token ids (at least one; e.g. a Harmony prompt ending with `<|start|>assistant`).
    pub prompt: Vec<u32>,
    /// This request's sampling and stopping settings (its `pad_token_id` is not used: the batch's is).
    pub config: GenerationConfig,
}

/// Batch-level settings of [`generate_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    /// Most sequences decoded together (≥ 1).
    pub max_batch: usize,
    /// Id fed at padded positions (never attended to).
    pub pad_token_id: u32,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_batch: 8,
            pad_token_id: 199_999,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It emitted this stop token (included in its tokens).
    Stop(u32),
    /// It reached its `max_new_tokens`.
    Length,
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationOutput {
    /// Generated token ids (the stop token included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// What [`generate_batch`] reports as it goes (streaming and progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationEvent {
    /// Request `request` produced `token`.
    Token {
        /// Index of the request.
        request: usize,
        /// The token id.
        token: u32,
    },
    /// Request `request` ended (after its last `Token` event).
    Finished {
        /// Index of the request.
        request: usize,
        /// Why it ended.
        finish: FinishReason,
    },
}

/// A sequence in the running batch.
struct Slot {
    request: usize,
    sampler: Sampler,
    last: u32,
    /// Attention-mask row over the cache timeline (1 = token, 0 = padding).
    mask: Vec<u32>,
}

/// Generate for every request, at most `opts.max_batch` at a time, replacing finished sequences by
/// waiting ones (continuous batching). `on_event` sees every token as it is produced (streaming)
/// and every sequence as it ends (progress). Outputs are in request order; each equals what [`super::generate`] gives for that
/// request alone (same seed → same tokens, whatever the batch around it).
///
/// Every request is checked before any model work: a non-empty prompt of ids below `vocab_size`,
/// `prompt + max_new_tokens ≤ max_position_embeddings`, and valid sampling settings
/// ([`GenerationConfig::validate`]).
pub fn generate_batch(
    model: &GptOssForCausalLM,
    requests: &[GenerationRequest],
    opts: &BatchOptions,
    on_event: &mut dyn FnMut(GenerationEvent),
) -> Result<Vec<GenerationOutput>> {
    validate(model, requests, opts)?;
    let mut waiting = 0..requests.len();
    let mut slots: Vec<Slot> = Vec::new();
    let mut cache = model.new_cache();
    let mut done = Finished {
        requests,
        tokens: vec![Vec::new(); requests.len()],
        outputs: vec![None; requests.len()],
        on_event,
    };
    loop {
        let room = opts.max_batch - slots.len();
        let joining: Vec<usize> = waiting.by_ref().take(room).collect();
        if !joining.is_empty() {
            let (fresh, mut new_slots) = prefill(model, requests, &joining, opts)?;
            let width = cache.seen.max(fresh.seen);
            for s in slots.iter_mut().chain(new_slots.iter_mut()) {
                left_pad_mask(&mut s.mask, width);
            }
            cache.append_rows(fresh)?;
            let first_new = slots.len();
            slots.append(&mut new_slots);
            let keep = done.record(&slots, first_new);
            retain_rows(&mut slots, &mut cache, &keep)?;
        }
        if slots.is_empty() {
            if waiting.is_empty() {
                break;
            }
            continue;
        }
        decode_step(model, &mut slots, &mut cache)?;
        let keep = done.record(&slots, 0);
        retain_rows(&mut slots, &mut cache, &keep)?;
    }
    let outputs = done.outputs;
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.ok_or_else(|| ModelError::arg("requests", format!("request {i} was never finished")))
        })
        .collect()
}

/// What has been generated so far, per request.
struct Finished<'a, 'f> {
    requests: &'a [GenerationRequest],
    tokens: Vec<Vec<u32>>,
    outputs: Vec<Option<GenerationOutput>>,
    on_event: &'f mut dyn FnMut(GenerationEvent),
}

impl Finished<'_, '_> {
    /// Record the token each slot from `from` on has just sampled; finish the sequences that
    /// stopped. Returns the rows to keep (those before `from`, and the unfinished ones).
    fn record(&mut self, slots: &[Slot], from: usize) -> Vec<usize> {
        let mut keep: Vec<usize> = (0..from.min(slots.len())).collect();
        for (row, s) in slots.iter().enumerate().skip(from) {
            let cfg = &self.requests[s.request].config;
            let tokens = &mut self.tokens[s.request];
            tokens.push(s.last);
            (self.on_event)(GenerationEvent::Token {
                request: s.request,
                token: s.last,
            });
            let finish = if cfg.stop_tokens.contains(&s.last) {
                Some(FinishReason::Stop(s.last))
            } else if tokens.len() >= cfg.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(finish) => {
                    (self.on_event)(GenerationEvent::Finished {
                        request: s.request,
                        finish,
                    });
                    self.outputs[s.request] = Some(GenerationOutput {
                        tokens: std::mem::take(tokens),
                        finish,
                    });
                }
                None => keep.push(row),
            }
        }
        keep
    }
}

/// Check every request (and the options) before any model work.
fn validate(
    model: &GptOssForCausalLM,
    requests: &[GenerationRequest],
    opts: &BatchOptions,
) -> Result<()> {
    if opts.max_batch == 0 {
        return Err(ModelError::arg("max_batch", "expected at least 1"));
    }
    let cfg = model.config();
    for (i, r) in requests.iter().enumerate() {
        let what = format!("request {i}");
        r.config.validate(&what)?;
        if r.prompt.is_empty() {
            return Err(ModelError::arg(&what, "the prompt has no tokens"));
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::arg(
                &what,
                format!(
                    "prompt token id {bad} is outside the vocabulary (vocab_size = {})",
                    cfg.vocab_size
                ),
            ));
        }
        let need = r.prompt.len() + r.config.max_new_tokens;
        if need > cfg.max_position_embeddings {
            return Err(ModelError::arg(
                &what,
                format!(
                    "prompt ({} tokens) + max_new_tokens ({}) = {need} exceeds the model's context \
                     (max_position_embeddings = {}); shorten the prompt or lower max_new_tokens",
                    r.prompt.len(),
                    r.config.max_new_tokens,
                    cfg.max_position_embeddings
                ),
            ));
        }
    }
    Ok(())
}

/// Prefill the prompts of `joining` together (left-padded) into a fresh cache; each new slot holds
/// its first sampled token.
fn prefill(
    model: &GptOssForCausalLM,
    requests: &[GenerationRequest],
    joining: &[usize],
    opts: &BatchOptions,
) -> Result<(KvCache, Vec<Slot>)> {
    let longest = joining
        .iter()
        .map(|&i| requests[i].prompt.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(joining.len() * longest);
    let mut slots = Vec::with_capacity(joining.len());
    for &i in joining {
        let p = &requests[i].prompt;
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(opts.pad_token_id, pad));
        ids.extend_from_slice(p);
        let mut mask = vec![0u32; pad];
        mask.resize(longest, 1);
        slots.push(Slot {
            request: i,
            sampler: Sampler::new(&requests[i].config),
            last: 0,
            mask,
        });
    }
    let mut cache = model.new_cache();
    let logits = forward_rows(model, ids, &slots, longest, &mut cache)?;
    sample_slots(&logits, &mut slots)?;
    Ok((cache, slots))
}

/// One decode step of every slot: feed its last token, sample the next.
fn decode_step(model: &GptOssForCausalLM, slots: &mut [Slot], cache: &mut KvCache) -> Result<()> {
    let ids: Vec<u32> = slots.iter().map(|s| s.last).collect();
    for s in slots.iter_mut() {
        s.mask.push(1);
    }
    let logits = forward_rows(model, ids, slots, 1, cache)?;
    sample_slots(&logits, slots)
}

/// Each slot's next token from its row of `logits` `[B, V]` (on the device when all are greedy).
fn sample_slots(logits: &Tensor, slots: &mut [Slot]) -> Result<()> {
    if slots.iter().all(|s| s.sampler.is_greedy()) {
        for (s, id) in slots.iter_mut().zip(argmax_rows(logits)?) {
            s.last = id;
        }
        return Ok(());
    }
    for (s, row) in slots.iter_mut().zip(logits.to_vec2::<f32>()?) {
        s.last = s.sampler.sample(&row);
    }
    Ok(())
}

/// `ids` `[B, t]` (row-major) after the cached positions, masked by the slots' mask rows (each
/// `cache.seen + t` long) → last-position logits `[B, V]` f32, on the model's device.
fn forward_rows(
    model: &GptOssForCausalLM,
    ids: Vec<u32>,
    slots: &[Slot],
    t: usize,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let dev = model.device();
    let b = slots.len();
    let width = cache.seen + t;
    let mask: Vec<u32> = slots.iter().flat_map(|s| s.mask.iter().copied()).collect();
    let ids = Tensor::from_vec(ids, (b, t), dev)?;
    let mask = Tensor::from_vec(mask, (b, width), dev)?;
    model.forward_last_with_cache(&ids, Some(&mask), cache)
}

/// Keep the slots (and cache rows) `keep`, then drop the leading timeline columns that every
/// remaining row has as padding.
fn retain_rows(slots: &mut Vec<Slot>, cache: &mut KvCache, keep: &[usize]) -> Result<()> {
    if keep.len() == slots.len() {
        return Ok(());
    }
    let mut old: Vec<Option<Slot>> = std::mem::take(slots).into_iter().map(Some).collect();
    *slots = keep.iter().filter_map(|&r| old[r].take()).collect();
    if slots.is_empty() {
        *cache = KvCache {
            layers: vec![Default::default(); cache.layers.len()],
            seen: 0,
        };
        return Ok(());
    }
    cache.select_rows(keep)?;
    let unused = slots
        .iter()
        .map(|s| s.mask.iter().take_while(|&&m| m == 0).count())
        .min()
        .unwrap_or(0);
    if unused > 0 {
        cache.trim_front(unused)?;
        for s in slots.iter_mut() {
            s.mask.drain(..unused);
        }
    }
    Ok(())
}

/// Prepend zeros to `mask` until it is `width` long.
fn left_pad_mask(mask: &mut Vec<u32>, width: usize) {
    if mask.len() < width {
        let mut padded = vec![0u32; width - mask.len()];
        padded.append(mask);
        *mask = padded;
    }
}
