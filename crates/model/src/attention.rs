//! Self-attention with biases, GQA, learned sinks, sliding window and YaRN RoPE (transformers eager path).

use candle_core::{DType, Module, Tensor, D};

use crate::config::LayerType;
use crate::linear::Linear;
use crate::mask::{keep_last, AttnContext};
use crate::rope::apply_rotary;
use gptoss_kernels::FastPath;

/// Keys and values cached for one layer: each `[B, kv_heads, S, head_dim]` (run dtype).
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Cached keys (after RoPE).
    pub k: Option<Tensor>,
    /// Cached values.
    pub v: Option<Tensor>,
}

impl LayerCache {
    /// Number of cached key positions.
    pub fn len(&self) -> usize {
        self.k.as_ref().and_then(|k| k.dim(2).ok()).unwrap_or(0)
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `model.layers.{i}.self_attn`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// `q_proj`: `[nh·d, H]`.
    pub q_proj: Linear,
    /// `k_proj`: `[nkv·d, H]`.
    pub k_proj: Linear,
    /// `v_proj`: `[nkv·d, H]`.
    pub v_proj: Linear,
    /// `o_proj`: `[H, nh·d]`.
    pub o_proj: Linear,
    /// `sinks`: one logit per query head, `[nh]` (run dtype).
    pub sinks: Tensor,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Kind of this layer.
    pub layer_type: LayerType,
}

impl Attention {
    /// The four projections with their HF names, in checkpoint order: `q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`.
    pub fn projections(&self) -> [(&'static str, &Linear); 4] {
        [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
        ]
    }

    /// `x`: normed hidden `[B, T, H]` (run dtype) → `[B, T, H]`. With `cache`, the new keys/values are appended
    /// (sliding layers keep only the last `window − 1`) and attention covers the cached keys as well.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // token-major [B, T, heads, d] as projected
        let q = self.q_proj.forward(x)?.reshape((b, t, nh, d))?;
        let k = self.k_proj.forward(x)?.reshape((b, t, nkv, d))?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, nkv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        // → [B, heads, T, d] after RoPE (the fused kernel reads the token-major layout itself)
        let (q, k) = if FastPath::Elementwise.on_for(&q) {
            (
                gptoss_kernels::rotary_tokens_first(&q, &ctx.cos, &ctx.sin)?,
                gptoss_kernels::rotary_tokens_first(&k, &ctx.cos, &ctx.sin)?,
            )
        } else {
            (
                apply_rotary(&q.transpose(1, 2)?, &ctx.cos, &ctx.sin)?,
                apply_rotary(&k.transpose(1, 2)?, &ctx.cos, &ctx.sin)?,
            )
        };
        let (k, v) = match cache {
            None => (k, v),
            Some(c) => {
                let (k, v) = match (&c.k, &c.v) {
                    (Some(pk), Some(pv)) => {
                        (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)
                    }
                    _ => (k, v),
                };
                let keep = match (self.layer_type, ctx.window()) {
                    (LayerType::Sliding, Some(w)) => w.saturating_sub(1),
                    _ => usize::MAX,
                };
                if keep == 0 {
                    c.k = None;
                    c.v = None;
                } else {
                    c.k = Some(keep_last(&k, keep)?);
                    c.v = Some(keep_last(&v, keep)?);
                }
                (k, v)
            }
        };
        let scale = 1.0 / (d as f64).sqrt();
        let mask = ctx.key_mask(self.layer_type)?;
        if FastPath::ChunkedAttention.on_for(&q) {
            // CUDA: chunked core with a recomputing backward (no [B, nh, T, Tk] tensor kept).
            // [B, T, nh, d]: what the output projection reads, with no transpose in the graph
            let out = gptoss_kernels::profile::scope("attn.core", q.device(), || {
                gptoss_kernels::attention::sink_attention_token_major(
                    &q.contiguous()?,
                    &k.contiguous()?,
                    &v,
                    Some(&mask),
                    &self.sinks,
                    scale,
                )
            })?;
            return self.o_proj.forward(&out.reshape((b, t, nh * d))?);
        }
        // Reference path, over query-row chunks: each chunk builds its `[B, nh, rows, Tk]` scores
        // and its `[B or 1, 1, rows, Tk]` mask slice only (one chunk when T is small).
        let tk = k.dim(2)?;
        let kt = k.t()?.contiguous()?;
        let q = q.contiguous()?;
        let rows = gptoss_kernels::attention::rows_per_chunk(
            nh,
            t,
            tk,
            gptoss_kernels::attention::CHUNK_ELEMS,
        );
        let mut outs = Vec::with_capacity(t.div_ceil(rows));
        for r0 in (0..t).step_by(rows) {
            let n = rows.min(t - r0);
            let qc = if n == t {
                q.clone()
            } else {
                q.narrow(2, r0, n)?.contiguous()?
            };
            let m = mask.additive((r0, n), (0, tk), (t, tk), qc.dtype(), qc.device())?;
            outs.push(self.core_rows(&qc, &kt, &v, &m, scale)?);
        }
        let out = if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(&outs, 2)?
        };
        let out = out.transpose(1, 2)?.reshape((b, t, nh * d))?;
        self.o_proj.forward(&out)
    }

    /// Attention of query rows `q` `[B, nh, n, d]` over keys `kt` `[B, nkv, d, Tk]` and values `v`
    /// `[B, nkv, Tk, d]` with the additive mask slice `mask` `[B or 1, 1, n, Tk]` (q's dtype) →
    /// `[B, nh, n, d]`: the fused sink softmax on CUDA, the reference ops elsewhere.
    fn core_rows(
        &self,
        q: &Tensor,
        kt: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let (b, nh, t, d) = q.dims4()?;
        let nkv = self.num_kv_heads;
        let tk = kt.dim(3)?;
        let g = nh / nkv;
        // GQA without repeating K/V: q-head h = kv·g + r uses kv-head kv.
        let qg = q.reshape((b, nkv, g * t, d))?;
        let scores = qg.matmul(kt)?.reshape((b, nh, t, tk))?;
        if FastPath::SinkSoftmax.on_for(&scores) {
            // CUDA: one fused kernel (forward and backward) instead of the reference ops below.
            let probs =
                gptoss_kernels::attention::sink_softmax(&scores, Some(mask), &self.sinks, scale)?
                    .reshape((b, nkv, g * t, tk))?;
            return probs.matmul(v)?.reshape((b, nh, t, d));
        }
        let scores = (scores * scale)?.broadcast_add(mask)?;
        // softmax over [scores, sink] without materialising the concatenation; the sink column is dropped.
        let dtype = scores.dtype();
        let sinks = self.sinks.to_dtype(dtype)?.reshape((1, nh, 1, 1))?;
        let max = scores
            .max_keepdim(D::Minus1)?
            .broadcast_maximum(&sinks)?
            .detach(); // [B, nh, T, 1]
        let e = scores.broadcast_sub(&max)?.to_dtype(DType::F32)?.exp()?;
        let e_sink = sinks.broadcast_sub(&max)?.to_dtype(DType::F32)?.exp()?;
        let denom = (e.sum_keepdim(D::Minus1)? + e_sink)?;
        let probs = e
            .broadcast_div(&denom)?
            .to_dtype(dtype)?
            .reshape((b, nkv, g * t, tk))?;
        probs.matmul(v)?.reshape((b, nh, t, d)) // [B, nkv, g·T, d] → [B, nh, T, d]
    }
}
