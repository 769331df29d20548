//! From a collated [`Batch`] (right-padded, see [`crate::collate`]) to a [`MicroBatch`] on the
//! device: token ids and attention mask tensors plus the labelled next-token positions used by
//! the fused LM-head loss.

use super::backward::MicroBatch;
use crate::collate::{Batch, IGNORE_INDEX};
use crate::error::{Result, SftError};
use candle_core::{Device, Tensor};

/// Builds the micro-batch of `batch` on `device`.
///
/// `input_ids` `[B, T]` u32 with padding replaced by `pad_id` (the model's padding token),
/// `attention_mask` `[B, T]` u32 (omitted when nothing is padded), positions `b·T + t` with
/// `labels[b][t+1] != -100` and their labels as targets. A packed batch (one row, padding-free)
/// carries its sequence lengths so the model keeps attention inside each sequence.
pub fn micro_batch(batch: &Batch, pad_id: u32, device: &Device) -> Result<MicroBatch> {
    let (b, t) = (batch.rows, batch.seq_len);
    let mut ids = batch.input_ids.clone();
    for (id, &m) in ids.iter_mut().zip(&batch.attention_mask) {
        if m == 0 {
            *id = pad_id;
        }
    }
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b {
        for c in 1..t {
            let l = batch.labels[r * t + c];
            if l == IGNORE_INDEX {
                continue;
            }
            let target = u32::try_from(l).map_err(|_| {
                SftError::Trainer(format!(
                    "micro-batch row {r}: invalid label {l} at position {c}"
                ))
            })?;
            positions.push((r * t + c - 1) as u32);
            targets.push(target);
        }
    }
    let padded = batch.attention_mask.contains(&0);
    Ok(MicroBatch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: if padded {
            Some(batch.attention_mask_tensor(device)?)
        } else {
            None
        },
        positions,
        targets,
        token_mask: batch.attention_mask.iter().map(|&m| m as f32).collect(),
        packed_seq_lens: batch.packed.then(|| batch.seq_lens.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collate::{pad, Example};

    #[test]
    fn pads_right_and_selects_labelled_positions() -> Result<()> {
        let a = Example {
            input_ids: vec![5, 6, 7],
            labels: vec![5, 6, 7],
        };
        let b = Example {
            input_ids: vec![8, 9],
            labels: vec![IGNORE_INDEX, 9],
        };
        let mb = micro_batch(&pad(&[a, b])?, 0, &Device::Cpu)?;
        assert_eq!(
            mb.input_ids.to_vec2::<u32>()?,
            vec![vec![5, 6, 7], vec![8, 9, 0]]
        );
        let mask = mb
            .attention_mask
            .as_ref()
            .map(|m| m.to_vec2::<u32>())
            .transpose()?;
        assert_eq!(mask, Some(vec![vec![1, 1, 1], vec![1, 1, 0]]));
        assert_eq!(mb.positions, vec![0, 1, 3]);
        assert_eq!(mb.targets, vec![6, 7, 9]);
        Ok(())
    }
}
