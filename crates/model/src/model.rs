//! The module tree (`GptOssForCausalLM` → `GptOssModel` → `DecoderLayer`) and its forward pieces.

use candle_core::{DType, Device, Module, Tensor};

use crate::attention::{Attention, LayerCache};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::mask::AttnContext;
use crate::moe::{Experts, MoeMlp};
use crate::norm::RmsNorm;
use crate::rope::RopeParams;

/// `model.layers.{i}`: pre-norm attention and MoE blocks with residuals.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// `.input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `.self_attn`.
    pub self_attn: Attention,
    /// `.post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
    /// `.mlp`.
    pub mlp: MoeMlp,
}

/// Output of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// Hidden states `[B, T, H]` (run dtype).
    pub hidden: Tensor,
    /// Router logits `[B·T, E]` (run dtype), for the aux loss.
    pub router_logits: Tensor,
}

impl DecoderLayer {
    /// `h`: `[B, T, H]` → layer output. `cache`: this layer's KV cache (inference).
    pub fn forward(
        &self,
        h: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<LayerOutput> {
        let dev = h.device();
        let a = gptoss_kernels::profile::scope("layer.attn", dev, || {
            self.self_attn
                .forward(&self.input_layernorm.forward(h)?, ctx, cache)
        })?;
        let h = (h + a)?;
        let (m, router_logits) = gptoss_kernels::profile::scope("layer.moe", dev, || {
            self.mlp
                .forward(&self.post_attention_layernorm.forward(&h)?)
        })?;
        Ok(LayerOutput {
            hidden: (h + m)?,
            router_logits,
        })
    }
}

/// `model`: embeddings, decoder layers, final norm.
#[derive(Debug, Clone)]
pub struct GptOssModel {
    /// `model.embed_tokens.weight` `[V, H]`.
    pub embed_tokens: Tensor,
    /// `model.layers`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
}

/// The causal LM: `model` plus `lm_head`.
#[derive(Debug, Clone)]
pub struct GptOssForCausalLM {
    /// `model`.
    pub model: GptOssModel,
    /// `lm_head` `[V, H]`, no bias.
    pub lm_head: Linear,
    config: Config,
    rope: RopeParams,
    dtype: DType,
    device: Device,
}

/// Final hidden states and per-layer router logits of a forward pass.
#[derive(Debug, Clone)]
pub struct HiddenOutput {
    /// After `model.norm`, `[B, T, H]` (run dtype).
    pub hidden: Tensor,
    /// Router logits of every layer, each `[B·T, E]` (run dtype).
    pub router_logits: Vec<Tensor>,
}

impl GptOssForCausalLM {
    /// Assemble a model from its parts (used by the loaders); `dtype` is the run dtype of every weight.
    pub fn from_parts(
        config: Config,
        model: GptOssModel,
        lm_head: Linear,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        config.validate()?;
        if model.layers.len() != config.num_hidden_layers {
            return Err(ModelError::arg(
                "model.layers",
                format!(
                    "has {} layers, config says {}",
                    model.layers.len(),
                    config.num_hidden_layers
                ),
            ));
        }
        let rope = RopeParams::new(&config);
        Ok(Self {
            model,
            lm_head,
            config,
            rope,
            dtype,
            device,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The run dtype (of weights and activations).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// RoPE parameters.
    pub fn rope(&self) -> &RopeParams {
        &self.rope
    }

    /// Every Linear with its HF name, including `"lm_head"`.
    pub fn named_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            out.push((format!("model.layers.{i}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("model.layers.{i}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("model.layers.{i}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("model.layers.{i}.self_attn.o_proj"), &mut a.o_proj));
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// Every experts module with its HF name `"model.layers.{i}.mlp.experts"`.
    pub fn named_experts_mut(&mut self) -> Vec<(String, &mut Experts)> {
        self.model
            .layers
            .iter_mut()
            .enumerate()
            .map(|(i, l)| (format!("model.layers.{i}.mlp.experts"), &mut l.mlp.experts))
            .collect()
    }

    fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            ModelError::arg(
                "input_ids",
                format!("expected shape [B, T], got {:?}", input_ids.dims()),
            )
        })?;
        if b == 0 || t == 0 {
            return Err(ModelError::arg(
                "input_ids",
                format!("empty batch {:?}", input_ids.dims()),
            ));
        }
        Ok((b, t))
    }

    /// Token embeddings: `input_ids` `[B, T]` (u32) → `[B, T, H]` (run dtype).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        let ids = input_ids
            .to_dtype(DType::U32)?
            .to_device(&self.device)?
            .flatten_all()?;
        let max = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            return Err(ModelError::arg(
                "input_ids",
                format!(
                    "token id {max} is out of range for vocab_size {}",
                    self.config.vocab_size
                ),
            ));
        }
        let h = self.model.embed_tokens.index_select(&ids, 0)?;
        Ok(h.reshape((b, t, self.config.hidden_size))?)
    }

    /// Masks and RoPE tables for a batch of `batch` rows of `seq_len` new tokens after `past_len` cached ones.
    /// `attention_mask`: optional `[B, past_len + T]` (1 = token, 0 = padding).
    pub fn attention_context(
        &self,
        batch: usize,
        seq_len: usize,
        past_len: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<AttnContext> {
        AttnContext::new(
            &self.config,
            &self.rope,
            (batch, seq_len),
            past_len,
            attention_mask,
            self.dtype,
            &self.device,
        )
    }

    /// The attention context of one packed row `[1, Σ seq_lens]` (padding-free training): positions
    /// restart per sequence and attention never crosses sequences. See [`AttnContext::packed`].
    pub fn packed_attention_context(&self, seq_lens: &[usize]) -> Result<AttnContext> {
        AttnContext::packed(&self.config, &self.rope, seq_lens, self.dtype, &self.device)
    }

    /// The attention context of packed rows `[B, T]` (row `r` holds documents of lengths
    /// `rows[r]`, every row summing to T). See [`AttnContext::packed_rows`].
    pub fn packed_rows_attention_context(&self, rows: &[Vec<usize>]) -> Result<AttnContext> {
        AttnContext::packed_rows(&self.config, &self.rope, rows, self.dtype, &self.device)
    }

    /// Decoder layer `i`: `h` `[B, T, H]` → hidden and router logits (for gradient checkpointing).
    pub fn layer_forward(&self, i: usize, h: &Tensor, ctx: &AttnContext) -> Result<LayerOutput> {
        self.layer_forward_cached(i, h, ctx, None)
    }

    /// Decoder layer `i` with its KV cache (inference).
    pub fn layer_forward_cached(
        &self,
        i: usize,
        h: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<LayerOutput> {
        let layer = self.model.layers.get(i).ok_or_else(|| {
            ModelError::arg(
                "i",
                format!(
                    "layer {i} out of range (num_hidden_layers = {})",
                    self.model.layers.len()
                ),
            )
        })?;
        Ok(layer.forward(h, ctx, cache)?)
    }

    /// `model.norm`: `[.., H]` → `[.., H]` (run dtype).
    pub fn final_hidden(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.model.norm.forward(h)?)
    }

    /// `lm_head`: `[.., H]` (run dtype) → logits `[.., V]` in f32 (computed in the run dtype, then cast).
    pub fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(h)?.to_dtype(DType::F32)?)
    }

    /// Final hidden states (after `model.norm`) and router logits; no cache.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<HiddenOutput> {
        let (b, t) = self.check_ids(input_ids)?;
        let ctx = self.attention_context(b, t, 0, attention_mask)?;
        self.hidden_in(input_ids, &ctx)
    }

    /// Embeddings, every decoder layer under `ctx` and the final norm.
    fn hidden_in(&self, input_ids: &Tensor, ctx: &AttnContext) -> Result<HiddenOutput> {
        let mut h = self.embed(input_ids)?;
        let mut router_logits = Vec::with_capacity(self.model.layers.len());
        for i in 0..self.model.layers.len() {
            let out = self.layer_forward(i, &h, ctx)?;
            h = out.hidden;
            router_logits.push(out.router_logits);
        }
        Ok(HiddenOutput {
            hidden: self.final_hidden(&h)?,
            router_logits,
        })
    }

    /// Forward of one packed row: `input_ids` `[1, T]` u32 holding sequences of `seq_lens` (summing
    /// to T) back to back → logits `[1, T, V]` f32, each sequence's equal to its own forward.
    pub fn forward_packed(&self, input_ids: &Tensor, seq_lens: &[usize]) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        if b != 1 || seq_lens.iter().sum::<usize>() != t {
            return Err(ModelError::arg(
                "seq_lens",
                format!("a packed batch is one row whose length {t} is the sum of {seq_lens:?}; got {b} rows"),
            ));
        }
        let ctx = self.packed_attention_context(seq_lens)?;
        self.lm_head(&self.hidden_in(input_ids, &ctx)?.hidden)
    }

    /// `input_ids` `[B, T]` u32; `attention_mask` `[B, T]` (1 = token, 0 = pad) optional → logits `[B, T, V]` f32.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let out = self.forward_hidden(input_ids, attention_mask)?;
        self.lm_head(&out.hidden)
    }

    /// Forward `input_ids` `[B, T]` after the tokens already in `cache`, appending to it.
    /// `attention_mask`: optional `[B, cache.seen + T]`. Returns logits `[B, T, V]` f32.
    pub fn forward_with_cache(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.hidden_with_cache(input_ids, attention_mask, cache)?;
        self.lm_head(&h)
    }

    /// [`Self::forward_with_cache`] returning only the last position's logits `[B, V]` f32: what
    /// generation samples from (a prefill of T tokens computes one LM-head row per sequence, not T).
    pub fn forward_last_with_cache(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.hidden_with_cache(input_ids, attention_mask, cache)?;
        let t = h.dim(1)?;
        gptoss_kernels::profile::scope("decode.lm_head", h.device(), || {
            self.lm_head(&h.narrow(1, t - 1, 1)?.squeeze(1)?)
        })
    }

    /// Final hidden states `[B, T, H]` (after `model.norm`) of `input_ids` after the cached tokens.
    fn hidden_with_cache(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        if cache.layers.len() != self.model.layers.len() {
            return Err(ModelError::arg(
                "cache",
                "cache was made for a different number of layers",
            ));
        }
        let ctx = gptoss_kernels::profile::scope("decode.context", input_ids.device(), || {
            self.attention_context(b, t, cache.seen, attention_mask)
        })?;
        // a KV-cache pass is generation: never differentiated
        let _inference = crate::moe::Inference::enter();
        let mut h = self.embed(input_ids)?;
        for (i, lc) in cache.layers.iter_mut().enumerate() {
            h = self.layer_forward_cached(i, &h, &ctx, Some(lc))?.hidden;
        }
        cache.seen += t;
        self.final_hidden(&h)
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![LayerCache::default(); self.model.layers.len()],
            seen: 0,
        }
    }
}

/// KV cache of all layers (sliding-window layers keep only their last `window − 1` positions).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per-layer caches.
    pub layers: Vec<LayerCache>,
    /// Number of positions processed so far (including padding).
    pub seen: usize,
}
