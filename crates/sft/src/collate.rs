//! Batching like TRL's `DataCollatorForLanguageModeling`: right padding (input ids with
//! [`PAD_TOKEN_ID`], labels with [`IGNORE_INDEX`], attention mask 1/0), or padding-free packing
//! of the micro-batch into one row with per-sample position ids, sequence boundaries, and the
//! first label of every sample set to −100 so that no prediction crosses samples.
//!
//! ```
//! use gptoss_sft::collate::{collate, Example};
//! let a = Example { input_ids: vec![1, 2, 3], labels: vec![1, 2, 3] };
//! let b = Example { input_ids: vec![4, 5], labels: vec![-100, 5] };
//! let padded = collate(&[a.clone(), b.clone()], false).unwrap();
//! assert_eq!(padded.input_ids, vec![1, 2, 3, 4, 5, 199_999]);
//! let packed = collate(&[a, b], true).unwrap();
//! assert_eq!(packed.position_ids, vec![0, 1, 2, 0, 1]);
//! assert_eq!(packed.labels, vec![-100, 2, 3, -100, 5]);
//! ```

use candle_core::{Device, Tensor};

use crate::error::{Result, SftError};

/// `<|endoftext|>`, the o200k_harmony pad token (`tokenizer.pad_token_id`).
pub const PAD_TOKEN_ID: u32 = 199_999;
/// Label value ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels, same length: the token id where trained, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

impl Example {
    /// Number of next-token predictions that carry loss: `labels[1..] != -100`.
    pub fn num_trained_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// A collated micro-batch, row-major host data of shape `[rows, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows (the batch size, or 1 when packed).
    pub rows: usize,
    /// Columns (the longest sample, or the total length when packed).
    pub seq_len: usize,
    /// `[rows · seq_len]` token ids, right-padded with [`PAD_TOKEN_ID`].
    pub input_ids: Vec<u32>,
    /// `[rows · seq_len]` labels, padded with [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// `[rows · seq_len]` 1 for real tokens, 0 for padding (all 1 when packed).
    pub attention_mask: Vec<u32>,
    /// `[rows · seq_len]` position ids: `0..len` per sample (restarting per sample when packed;
    /// 0 on padding).
    pub position_ids: Vec<u32>,
    /// Length of each sample, in order.
    pub seq_lens: Vec<usize>,
    /// True for padding-free packing.
    pub packed: bool,
}

impl Batch {
    /// Σ attention_mask: real (non-pad) tokens, trained or not (TRL's `num_tokens`).
    pub fn num_tokens(&self) -> usize {
        self.seq_lens.iter().sum()
    }

    /// Count of `labels[:, 1:] != -100` (the loss normalizer contribution of this micro-batch).
    pub fn num_trained_tokens(&self) -> usize {
        (0..self.rows)
            .map(|r| {
                self.labels[r * self.seq_len..(r + 1) * self.seq_len]
                    .iter()
                    .skip(1)
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count()
            })
            .sum()
    }

    /// Cumulative sequence boundaries `[0, l1, l1+l2, …, total]` of a packed row
    /// (flash-attention's `cu_seqlens`); for a padded batch, the boundaries within the
    /// flattened `[rows · seq_len]` layout of each row's real tokens are `r·seq_len + [0, len_r]`.
    pub fn cu_seqlens(&self) -> Vec<usize> {
        let mut out = vec![0];
        let mut acc = 0;
        for l in &self.seq_lens {
            acc += l;
            out.push(acc);
        }
        out
    }

    /// `[rows, seq_len]` u32 token ids on `device`.
    pub fn input_ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.input_ids,
            (self.rows, self.seq_len),
            device,
        )?)
    }

    /// `[rows, seq_len]` i64 labels on `device`.
    pub fn labels_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.labels,
            (self.rows, self.seq_len),
            device,
        )?)
    }

    /// `[rows, seq_len]` u32 attention mask on `device`.
    pub fn attention_mask_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.attention_mask,
            (self.rows, self.seq_len),
            device,
        )?)
    }

    /// `[rows, seq_len]` u32 position ids on `device`.
    pub fn position_ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.position_ids,
            (self.rows, self.seq_len),
            device,
        )?)
    }
}

fn check(examples: &[Example]) -> Result<()> {
    if examples.is_empty() {
        return Err(SftError::Trainer("collate: empty micro-batch".into()));
    }
    for (i, e) in examples.iter().enumerate() {
        if e.input_ids.len() != e.labels.len() || e.input_ids.is_empty() {
            return Err(SftError::Trainer(format!(
                "collate: example {i} has {} ids and {} labels (need equal, non-zero)",
                e.input_ids.len(),
                e.labels.len()
            )));
        }
    }
    Ok(())
}

/// Right-pads `examples` into `[batch, max_len]` with [`PAD_TOKEN_ID`].
pub fn pad(examples: &[Example]) -> Result<Batch> {
    pad_with_id(examples, PAD_TOKEN_ID)
}

/// Right-pads `examples` into `[batch, max_len]` with input id `pad_id` (for tokenizers or tiny
/// test vocabularies without id 199999).
pub fn pad_with_id(examples: &[Example], pad_id: u32) -> Result<Batch> {
    check(examples)?;
    let seq_len = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let rows = examples.len();
    let mut b = Batch {
        rows,
        seq_len,
        input_ids: vec![pad_id; rows * seq_len],
        labels: vec![IGNORE_INDEX; rows * seq_len],
        attention_mask: vec![0; rows * seq_len],
        position_ids: vec![0; rows * seq_len],
        seq_lens: examples.iter().map(|e| e.input_ids.len()).collect(),
        packed: false,
    };
    for (r, e) in examples.iter().enumerate() {
        let o = r * seq_len;
        let n = e.input_ids.len();
        b.input_ids[o..o + n].copy_from_slice(&e.input_ids);
        b.labels[o..o + n].copy_from_slice(&e.labels);
        b.attention_mask[o..o + n].fill(1);
        for (k, p) in b.position_ids[o..o + n].iter_mut().enumerate() {
            *p = k as u32;
        }
    }
    Ok(b)
}

/// Packs `examples` into one row `[1, Σ len]` (TRL `padding_free=True`): position ids restart
/// at 0 per sample and the label at each sample start is −100.
pub fn pack(examples: &[Example]) -> Result<Batch> {
    check(examples)?;
    let total: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let mut b = Batch {
        rows: 1,
        seq_len: total,
        input_ids: Vec::with_capacity(total),
        labels: Vec::with_capacity(total),
        attention_mask: vec![1; total],
        position_ids: Vec::with_capacity(total),
        seq_lens: examples.iter().map(|e| e.input_ids.len()).collect(),
        packed: true,
    };
    for e in examples {
        b.input_ids.extend_from_slice(&e.input_ids);
        b.labels.push(IGNORE_INDEX);
        b.labels.extend_from_slice(&e.labels[1..]);
        b.position_ids.extend(0..e.input_ids.len() as u32);
    }
    Ok(b)
}

/// TRL's `packing=True` (`packing_strategy="bfd"`): groups examples of `lengths` (each ≤
/// `max_length`) into bins of at most `max_length` tokens by best-fit decreasing. Examples are
/// taken longest first (ties: lower index first), each into the open bin with the least room that
/// still fits it (ties: the earlier bin), else a new bin. Deterministic; returns the bins (example
/// indices in placement order) in creation order. Errors name an example longer than `max_length`.
pub fn pack_bfd(lengths: &[usize], max_length: usize) -> Result<Vec<Vec<usize>>> {
    if let Some(i) = lengths.iter().position(|&l| l > max_length || l == 0) {
        return Err(SftError::Trainer(format!(
            "packing: example {i} has {} tokens; expected 1..={max_length} (model.max_length)",
            lengths[i]
        )));
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (room left, bin index) of every bin
    let mut room = std::collections::BTreeSet::new();
    for i in order {
        let len = lengths[i];
        match room.range((len, 0)..).next().copied() {
            Some((left, b)) => {
                room.remove(&(left, b));
                room.insert((left - len, b));
                bins[b].push(i);
            }
            None => {
                room.insert((max_length - len, bins.len()));
                bins.push(vec![i]);
            }
        }
    }
    Ok(bins)
}

/// [`pack`] when `packing`, else [`pad`].
pub fn collate(examples: &[Example], packing: bool) -> Result<Batch> {
    if packing {
        pack(examples)
    } else {
        pad(examples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], labels: &[i64]) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn trl_docstring_examples() {
        // From TRL 1.16's DataCollatorForLanguageModeling docstring (pad id 0 there).
        let a = ex(&[1, 2, 3], &[-100, 2, 3]);
        let b = ex(&[4, 5], &[-100, 5]);
        assert_eq!(
            pad_with_id(&[b.clone(), a.clone()], 0).unwrap().input_ids,
            vec![4, 5, 0, 1, 2, 3]
        );
        let p = pad(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(p.input_ids, vec![1, 2, 3, 4, 5, PAD_TOKEN_ID]);
        assert_eq!(p.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(p.labels, vec![-100, 2, 3, -100, 5, -100]);
        assert_eq!(p.num_tokens(), 5);
        assert_eq!(p.num_trained_tokens(), 3);
        let k = pack(&[a, b]).unwrap();
        assert_eq!(k.input_ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(k.position_ids, vec![0, 1, 2, 0, 1]);
        assert_eq!(k.labels, vec![-100, 2, 3, -100, 5]);
        assert_eq!(k.cu_seqlens(), vec![0, 3, 5]);
        assert_eq!(k.num_trained_tokens(), 3);
    }

    #[test]
    fn best_fit_decreasing_bins() {
        // longest first: 7 → bin0 (room 3), 6 → bin1 (4), 4 → bin1 (0, the tighter fit than a
        // new bin), 3 → bin0 (0), 2 → bin2 (8), 2 → bin2 (6); lengths ≤ 10
        let bins = pack_bfd(&[2, 7, 3, 6, 2, 4], 10).unwrap();
        assert_eq!(bins, vec![vec![1, 2], vec![3, 5], vec![0, 4]]);
        for b in &bins {
            assert!(b.iter().map(|&i| [2, 7, 3, 6, 2, 4][i]).sum::<usize>() <= 10);
        }
        // best fit, not first fit: after 7 → bin0 (room 3), 4, 4 → bin1 (room 2), the 1 goes to
        // bin1 (first fit would put it in bin0)
        assert_eq!(
            pack_bfd(&[1, 4, 7, 4], 10).unwrap(),
            vec![vec![2], vec![1, 3, 0]]
        );
        // [[1, 2, 3], [4, 5, 6, 7], [8]] at max_length 4 packs to [[4, 5, 6, 7], [1, 2, 3, 8]]
        assert_eq!(pack_bfd(&[3, 4, 1], 4).unwrap(), vec![vec![1], vec![0, 2]]);
        assert!(pack_bfd(&[3, 11], 10).is_err());
    }

    #[test]
    fn mismatched_lengths_rejected() {
        assert!(pad(&[ex(&[1, 2], &[1])]).is_err());
        assert!(pack(&[]).is_err());
    }
}
