//! Attention context of one batch: RoPE tables and O(T) visibility structure (key validity,
//! document starts), built once on the device. No `[T, Tk]` mask is ever built: the attention
//! kernels test causal / sliding-window / padding / document rules from indices
//! ([`gptoss_kernels::attention::KeyMask`]).

use candle_core::{DType, Device, Tensor, D};
use gptoss_kernels::attention::KeyMask;

use crate::config::{Config, LayerType};
use crate::error::{ModelError, Result};
use crate::rope::RopeParams;

/// RoPE tables and key visibility shared by all layers for one forward call (built on the device).
///
/// Queries are the `seq_len` new tokens at absolute indices `past_len..past_len + seq_len`. Full-attention
/// layers see keys `0..past_len + seq_len`; sliding layers see keys from [`AttnContext::key_start`] on (their
/// cache keeps only the last `window − 1` keys).
#[derive(Debug, Clone)]
pub struct AttnContext {
    /// cos table `[B, 1, T, head_dim/2]` (run dtype, scaled by the YaRN attention factor).
    pub cos: Tensor,
    /// sin table `[B, 1, T, head_dim/2]`.
    pub sin: Tensor,
    /// `[B, past_len + T]` u8: 1 = token, 0 = padding (from an `attention_mask`).
    key_valid: Option<Tensor>,
    /// `[B, T]` u32: first index of the packed document holding each token (`past_len` = 0).
    doc_start: Option<Tensor>,
    /// Number of tokens already in the KV cache.
    pub past_len: usize,
    /// Number of new tokens T.
    pub seq_len: usize,
    /// Batch size B.
    pub batch: usize,
    window: Option<usize>,
}

impl AttnContext {
    /// Build the context for `batch` rows of `seq_len` new tokens after `past_len` cached ones.
    ///
    /// * `attention_mask`: optional `[B, past_len + T]` (any dtype; nonzero = token, 0 = padding). Padding keys
    ///   are masked out and positions are `cumsum(mask) − 1` (as transformers' `generate` computes them);
    ///   without a mask, positions are `past_len..past_len+T` for every row.
    /// * `dtype`: the run dtype of the masks and RoPE tables.
    pub fn new(
        config: &Config,
        rope: &RopeParams,
        (batch, seq_len): (usize, usize),
        past_len: usize,
        attention_mask: Option<&Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let total = past_len + seq_len;
        let pad = match attention_mask {
            None => None,
            Some(m) => {
                if m.dims() != [batch, total] {
                    return Err(ModelError::arg(
                        "attention_mask",
                        format!(
                            "expected shape [{batch}, {total}] ([B, past_len + T]), got {:?}",
                            m.dims()
                        ),
                    ));
                }
                Some(m.to_device(device)?.ne(0f64)?)
            }
        };
        let positions = match &pad {
            Some(p) => {
                // A running count per row: the [B, past_len + T] mask goes to the host (candle's cumsum
                // would build an O(L²) triangular matrix on the device).
                let rows = p.to_vec2::<u8>()?;
                let mut pos = Vec::with_capacity(batch * seq_len);
                for row in rows {
                    let mut seen = 0f32;
                    for (j, &m) in row.iter().enumerate() {
                        let m = f32::from(m);
                        if j >= past_len {
                            pos.push((seen + m - 1.0).max(0.0));
                        }
                        seen += m;
                    }
                }
                Tensor::from_vec(pos, (batch, seq_len), device)?
            }
            None => Tensor::arange(past_len as u32, total as u32, device)?
                .to_dtype(DType::F32)?
                .unsqueeze(0)?
                .broadcast_as((batch, seq_len))?
                .contiguous()?,
        };
        Self::from_parts(
            config,
            rope,
            &positions,
            (batch, seq_len),
            past_len,
            (pad, None),
            (dtype, device),
        )
    }

    /// Context for one packed row `[1, T]` that holds several sequences back to back (padding-free
    /// training, TRL's `padding_free=True`): positions restart at 0 for every sequence, and no query
    /// attends to a key of another sequence (on top of the causal and sliding-window rules).
    ///
    /// * `seq_lens`: the packed sequences' lengths in order (each ≥ 1; their sum is T).
    pub fn packed(
        config: &Config,
        rope: &RopeParams,
        seq_lens: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::packed_rows(config, rope, &[seq_lens.to_vec()], dtype, device)
    }

    /// Context for `rows.len()` packed rows `[B, T]` (TRL's `packing=True`, several rows per
    /// micro-batch): row `r` holds documents of lengths `rows[r]` back to back, each row summing to
    /// the same T (a collator closes a short row with one filler document). Positions restart at 0
    /// per document; no query attends across documents. O(B·T) structure: document starts `[B, T]`.
    pub fn packed_rows(
        config: &Config,
        rope: &RopeParams,
        rows: &[Vec<usize>],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let total: usize = rows.first().map_or(0, |r| r.iter().sum());
        for (r, lens) in rows.iter().enumerate() {
            if lens.is_empty() || lens.contains(&0) || lens.iter().sum::<usize>() != total {
                return Err(ModelError::arg(
                    "seq_lens",
                    format!(
                        "packed row {r}: expected one or more sequence lengths ≥ 1 summing to {total} \
                         (the first row's length), got {lens:?}"
                    ),
                ));
            }
        }
        if rows.is_empty() {
            return Err(ModelError::arg(
                "seq_lens",
                "expected one or more packed rows",
            ));
        }
        let mut positions = Vec::with_capacity(rows.len() * total);
        let mut starts = Vec::with_capacity(rows.len() * total);
        for lens in rows {
            let mut at = 0u32;
            for &len in lens {
                positions.extend((0..len).map(|p| p as f32));
                starts.extend(std::iter::repeat_n(at, len));
                at += len as u32;
            }
        }
        let b = rows.len();
        let positions = Tensor::from_vec(positions, (b, total), device)?;
        let doc_start = Tensor::from_vec(starts, (b, total), device)?;
        Self::from_parts(
            config,
            rope,
            &positions,
            (b, total),
            0,
            (None, Some(doc_start)),
            (dtype, device),
        )
    }

    /// RoPE tables for `positions` `[B, T]` (f32) and the visibility arrays.
    fn from_parts(
        config: &Config,
        rope: &RopeParams,
        positions: &Tensor,
        (batch, seq_len): (usize, usize),
        past_len: usize,
        (key_valid, doc_start): (Option<Tensor>, Option<Tensor>),
        (dtype, _device): (DType, &Device),
    ) -> Result<Self> {
        let (cos, sin) = rope.cos_sin(positions, dtype)?;
        Ok(Self {
            cos,
            sin,
            key_valid,
            doc_start,
            past_len,
            seq_len,
            batch,
            window: config.sliding_window,
        })
    }

    /// First absolute key index a layer of this type attends to (and that its KV cache must start at).
    pub fn key_start(&self, t: LayerType) -> usize {
        match (t, self.window) {
            (LayerType::Sliding, Some(w)) => self.past_len.saturating_sub(w.saturating_sub(1)),
            _ => 0,
        }
    }

    /// Which keys the queries of a layer of this type see: causal, the sliding window (sliding
    /// layers), padding keys `[B, Tk]` and packed-document starts `[B, T]` (Tk counted from
    /// [`AttnContext::key_start`]).
    pub fn key_mask(&self, t: LayerType) -> candle_core::Result<KeyMask> {
        let ks = self.key_start(t);
        let key_valid = match &self.key_valid {
            Some(v) => {
                let tk = v.dim(1)? - ks;
                Some(v.narrow(1, ks, tk)?.contiguous()?)
            }
            None => None,
        };
        Ok(KeyMask {
            window: match t {
                LayerType::Sliding => self.window,
                LayerType::Full => None,
            },
            key_valid,
            doc_start: self.doc_start.clone(),
        })
    }

    /// The sliding window of the config.
    pub fn window(&self) -> Option<usize> {
        self.window
    }
}

/// Keep `D::Minus2`-axis rows `[len − keep, len)` of a cache tensor `[B, h, S, d]` (all when `keep ≥ S`).
pub(crate) fn keep_last(t: &Tensor, keep: usize) -> candle_core::Result<Tensor> {
    let s = t.dim(D::Minus2)?;
    if keep >= s {
        Ok(t.clone())
    } else {
        t.narrow(D::Minus2, s - keep, keep)?.contiguous()
    }
}
