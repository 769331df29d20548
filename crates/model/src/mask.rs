//! Attention context of one batch: RoPE tables and additive masks, built once on the device.

use candle_core::{DType, Device, Tensor, D};

use crate::config::{Config, LayerType};
use crate::error::{ModelError, Result};
use crate::rope::RopeParams;

/// Masks and RoPE tables shared by all layers for one forward call (built on the device, never on the host).
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
    full_mask: Option<Tensor>,
    sliding_mask: Option<Tensor>,
    /// Number of tokens already in the KV cache.
    pub past_len: usize,
    /// Number of new tokens T.
    pub seq_len: usize,
    /// Batch size B.
    pub batch: usize,
    window: Option<usize>,
    /// The masks hide exactly the causal / sliding-window keys (no padding, no packed sequences).
    structural: bool,
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
                Some(m.to_device(device)?.ne(0f64)?.to_dtype(DType::F32)?)
            }
        };
        let positions = match &pad {
            Some(p) => {
                // A running count per row: the [B, past_len + T] mask goes to the host (candle's cumsum
                // would build an O(L²) triangular matrix on the device).
                let rows = p.to_vec2::<f32>()?;
                let mut pos = Vec::with_capacity(batch * seq_len);
                for row in rows {
                    let mut seen = 0f32;
                    for (j, m) in row.iter().enumerate() {
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
            pad.as_ref(),
            None,
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
        if seq_lens.is_empty() || seq_lens.contains(&0) {
            return Err(ModelError::arg(
                "seq_lens",
                format!("expected one or more sequence lengths ≥ 1, got {seq_lens:?}"),
            ));
        }
        let total: usize = seq_lens.iter().sum();
        let mut positions = Vec::with_capacity(total);
        let mut segments = Vec::with_capacity(total);
        for (s, &len) in seq_lens.iter().enumerate() {
            positions.extend((0..len).map(|p| p as f32));
            segments.extend(std::iter::repeat_n(s as f32, len));
        }
        let positions = Tensor::from_vec(positions, (1, total), device)?;
        let segments = Tensor::from_vec(segments, total, device)?;
        Self::from_parts(
            config,
            rope,
            &positions,
            (1, total),
            0,
            None,
            Some(&segments),
            (dtype, device),
        )
    }

    /// RoPE tables for `positions` `[B, T]` (f32) and the additive masks of the layer types present.
    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        config: &Config,
        rope: &RopeParams,
        positions: &Tensor,
        (batch, seq_len): (usize, usize),
        past_len: usize,
        pad: Option<&Tensor>,
        segments: Option<&Tensor>,
        (dtype, device): (DType, &Device),
    ) -> Result<Self> {
        let (cos, sin) = rope.cos_sin(positions, dtype)?;
        let types = config.layer_types();
        let window = config.sliding_window;
        let mut ctx = Self {
            cos,
            sin,
            full_mask: None,
            sliding_mask: None,
            past_len,
            seq_len,
            batch,
            window,
            structural: pad.is_none() && segments.is_none(),
        };
        let spec = MaskSpec {
            past_len,
            seq_len,
            pad,
            segments,
            dtype,
            device,
        };
        if types.contains(&LayerType::Full) {
            ctx.full_mask = Some(build_mask(&spec, 0, None)?);
        }
        if types.contains(&LayerType::Sliding) {
            let ks = ctx.key_start(LayerType::Sliding);
            ctx.sliding_mask = Some(build_mask(&spec, ks, window)?);
        }
        Ok(ctx)
    }

    /// First absolute key index a layer of this type attends to (and that its KV cache must start at).
    pub fn key_start(&self, t: LayerType) -> usize {
        match (t, self.window) {
            (LayerType::Sliding, Some(w)) => self.past_len.saturating_sub(w.saturating_sub(1)),
            _ => 0,
        }
    }

    /// Additive mask `[B or 1, 1, T, Tk]` (0 = visible, −inf = hidden) for a layer type.
    pub fn mask(&self, t: LayerType) -> Option<&Tensor> {
        match t {
            LayerType::Full => self.full_mask.as_ref(),
            LayerType::Sliding => self.sliding_mask.as_ref(),
        }
    }

    /// The sliding window of the config.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Whether the masks hide exactly the causal (and, for sliding layers, window) keys: built
    /// without an `attention_mask` and without packed sequences. Kernels may then derive the mask
    /// from positions instead of reading it ([`gptoss_kernels::attention::sink_attention_structural`]).
    pub fn mask_is_structural(&self) -> bool {
        self.structural
    }
}

/// What every mask of one context shares.
struct MaskSpec<'a> {
    past_len: usize,
    seq_len: usize,
    /// `[B, past_len + T]` f32, nonzero = token.
    pad: Option<&'a Tensor>,
    /// `[T]` f32 sequence index of each token of a packed row (`past_len` must be 0).
    segments: Option<&'a Tensor>,
    dtype: DType,
    device: &'a Device,
}

/// key j visible to query i iff `j ≤ i`, `j > i − window` (sliding), `pad[b, j] ≠ 0` and, in a
/// packed row, `segment[j] == segment[i]`. Returns `[B or 1, 1, T, Tk]` (0 visible, −inf hidden).
fn build_mask(spec: &MaskSpec, key_start: usize, window: Option<usize>) -> Result<Tensor> {
    let MaskSpec {
        past_len,
        seq_len,
        pad,
        segments,
        dtype,
        device,
    } = *spec;
    let total = past_len + seq_len;
    let tk = total - key_start;
    let q = Tensor::arange(past_len as u32, total as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((seq_len, 1))?;
    let k = Tensor::arange(key_start as u32, total as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((1, tk))?;
    let mut allowed = k.broadcast_le(&q)?; // [T, Tk] u8
    if let Some(w) = window {
        let inside = (k + w as f64)?.broadcast_gt(&q)?;
        allowed = (allowed * inside)?;
    }
    if let Some(seg) = segments {
        let same = seg
            .narrow(0, key_start, tk)?
            .reshape((1, tk))?
            .broadcast_eq(&seg.reshape((seq_len, 1))?)?;
        allowed = (allowed * same)?;
    }
    let allowed = allowed.reshape((1, 1, seq_len, tk))?;
    let allowed = match pad {
        Some(p) => {
            let b = p.dim(0)?;
            let keys = p
                .narrow(1, key_start, tk)?
                .ne(0f64)?
                .reshape((b, 1, 1, tk))?;
            allowed.broadcast_mul(&keys)?
        }
        None => allowed,
    };
    let shape = allowed.shape().clone();
    let zeros = Tensor::zeros(&shape, dtype, device)?;
    let neg = Tensor::full(f32::NEG_INFINITY, &shape, device)?.to_dtype(dtype)?;
    Ok(allowed.where_cond(&zeros, &neg)?)
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
