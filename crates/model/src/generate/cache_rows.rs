//! Row surgery on a [`KvCache`] for continuous batching: drop finished rows, append the rows of newly
//! prefilled sequences (left-padding the shorter timeline), and trim key columns no row attends to.
//!
//! Every layer cache is `[B, kv_heads, S_layer, head_dim]`, right-aligned on one timeline of `seen`
//! positions: full-attention layers hold all `seen` keys, sliding layers the last `min(seen, window − 1)`.
//! Left-padding both caches of a join to the longer length keeps that invariant for both layer kinds.

use candle_core::{Tensor, D};

use crate::attention::LayerCache;
use crate::error::{ModelError, Result};
use crate::model::KvCache;

impl KvCache {
    /// Keep only the batch rows `rows` (in that order) of every layer's keys and values.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let Some(dev) = self.device() else {
            return Ok(());
        };
        let idx = Tensor::new(
            rows.iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &dev,
        )?;
        for lc in &mut self.layers {
            for t in [&mut lc.k, &mut lc.v].into_iter().flatten() {
                *t = t.index_select(&idx, 0)?;
            }
        }
        Ok(())
    }

    /// Append the rows of `other` (a cache of the same model, e.g. fresh prefills) below this one's.
    /// The shorter timeline is left-padded with zero keys/values; the caller left-pads its attention
    /// mask rows the same way (by `self.seen.max(other.seen) − seen` zeros).
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if other.layers.len() != self.layers.len() {
            return Err(ModelError::arg(
                "cache",
                format!(
                    "cannot join caches of {} and {} layers",
                    self.layers.len(),
                    other.layers.len()
                ),
            ));
        }
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            *mine = join_layer(std::mem::take(mine), theirs)?;
        }
        self.seen = self.seen.max(other.seen);
        Ok(())
    }

    /// Drop the first `cols` positions of the timeline (columns no row attends to any more): full
    /// layers lose them, sliding layers keep at most `seen − cols` keys.
    pub fn trim_front(&mut self, cols: usize) -> Result<()> {
        let cols = cols.min(self.seen);
        if cols == 0 {
            return Ok(());
        }
        let keep_max = self.seen - cols;
        for lc in &mut self.layers {
            for t in [&mut lc.k, &mut lc.v].into_iter().flatten() {
                let len = t.dim(2)?;
                let keep = len.min(keep_max);
                *t = t.narrow(2, len - keep, keep)?.contiguous()?;
            }
        }
        self.seen = keep_max;
        Ok(())
    }

    /// The device of the cached tensors (`None` while empty).
    fn device(&self) -> Option<candle_core::Device> {
        self.layers
            .iter()
            .find_map(|l| l.k.as_ref().map(|k| k.device().clone()))
    }
}

/// `a` rows then `b` rows of one layer, each left-padded to the longer key length.
fn join_layer(a: LayerCache, b: LayerCache) -> Result<LayerCache> {
    let k = join_rows(a.k, b.k)?;
    let v = join_rows(a.v, b.v)?;
    Ok(LayerCache { k, v })
}

fn join_rows(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    match (a, b) {
        (None, None) => Ok(None),
        (Some(t), None) | (None, Some(t)) => Ok(Some(t)),
        (Some(a), Some(b)) => {
            let len = a.dim(2)?.max(b.dim(2)?);
            Ok(Some(Tensor::cat(
                &[left_pad(&a, len)?, left_pad(&b, len)?],
                0,
            )?))
        }
    }
}

/// `t` `[B, h, S, d]` with `len − S` zero positions prepended on the `S` axis.
fn left_pad(t: &Tensor, len: usize) -> Result<Tensor> {
    let (b, h, s, d) = t.dims4()?;
    if s >= len {
        return Ok(t.clone());
    }
    let zeros = Tensor::zeros((b, h, len - s, d), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&zeros, t], D::Minus2)?)
}
