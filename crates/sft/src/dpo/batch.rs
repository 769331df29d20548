//! Tokenized pairs → one micro-batch, as TRL's `DataCollatorForPreference`: the `B` chosen
//! sequences (`prompt + chosen`) then the `B` rejected ones, each truncated to `max_length`
//! (keep the start), right-padded; labels only on completion tokens. Chosen and rejected go
//! through one batched forward.

use candle_core::Device;

use super::tokenize::PreferenceExample;
use crate::collate::{pad, Example, IGNORE_INDEX};
use crate::error::{Result, SftError};
use crate::trainer::{micro_batch, MicroBatch};

/// A collated micro-batch of pairs.
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// `[2B, T]`: rows `0..B` chosen, `B..2B` rejected.
    pub micro: MicroBatch,
    /// Completion tokens per chosen row (after truncation).
    pub chosen_lens: Vec<usize>,
    /// Completion tokens per rejected row.
    pub rejected_lens: Vec<usize>,
    /// Non-padding tokens of the `2B` rows.
    pub num_tokens: u64,
}

impl PairBatch {
    /// Pairs in the batch (`B`).
    pub fn pairs(&self) -> usize {
        self.chosen_lens.len()
    }
}

fn sequence(prompt: &[u32], completion: &[u32], max_length: Option<usize>) -> (Example, usize) {
    let mut ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let mut labels: Vec<i64> = std::iter::repeat_n(IGNORE_INDEX, prompt.len())
        .chain(completion.iter().map(|&t| t as i64))
        .collect();
    if let Some(m) = max_length {
        ids.truncate(m);
        labels.truncate(m);
    }
    let n = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    (
        Example {
            input_ids: ids,
            labels,
        },
        n,
    )
}

/// Collates `pairs` (at least one) on `device`; padding uses `pad_id`.
pub fn pair_batch(
    pairs: &[&PreferenceExample],
    max_length: Option<usize>,
    pad_id: u32,
    device: &Device,
) -> Result<PairBatch> {
    if pairs.is_empty() {
        return Err(SftError::Trainer("an empty micro-batch of pairs".into()));
    }
    let mut rows = Vec::with_capacity(2 * pairs.len());
    let mut chosen_lens = Vec::with_capacity(pairs.len());
    let mut rejected_lens = Vec::with_capacity(pairs.len());
    for p in pairs {
        let (ex, n) = sequence(&p.prompt_ids, &p.chosen_ids, max_length);
        rows.push(ex);
        chosen_lens.push(n);
    }
    for p in pairs {
        let (ex, n) = sequence(&p.prompt_ids, &p.rejected_ids, max_length);
        rows.push(ex);
        rejected_lens.push(n);
    }
    let num_tokens = rows.iter().map(|r| r.input_ids.len() as u64).sum();
    let micro = micro_batch(&pad(&rows)?, pad_id, device)?;
    Ok(PairBatch {
        micro,
        chosen_lens,
        rejected_lens,
        num_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_rows_then_rejected_rows_with_completion_labels() -> Result<()> {
        let a = PreferenceExample {
            prompt_ids: vec![1, 2, 3],
            chosen_ids: vec![4, 5],
            rejected_ids: vec![6],
        };
        let b = PreferenceExample {
            prompt_ids: vec![7, 8],
            chosen_ids: vec![9],
            rejected_ids: vec![10, 11],
        };
        let pb = pair_batch(&[&a, &b], None, 0, &Device::Cpu)?;
        // TRL's docstring example.
        assert_eq!(
            pb.micro.input_ids.to_vec2::<u32>()?,
            vec![
                vec![1, 2, 3, 4, 5],
                vec![7, 8, 9, 0, 0],
                vec![1, 2, 3, 6, 0],
                vec![7, 8, 10, 11, 0]
            ]
        );
        assert_eq!(pb.micro.positions, vec![2, 3, 6, 12, 16, 17]);
        assert_eq!(pb.micro.targets, vec![4, 5, 9, 6, 10, 11]);
        assert_eq!(
            (pb.chosen_lens.clone(), pb.rejected_lens.clone()),
            (vec![2, 1], vec![1, 2])
        );
        assert_eq!(pb.num_tokens, 5 + 3 + 4 + 4);
        let t = pair_batch(&[&a], Some(4), 0, &Device::Cpu)?;
        assert_eq!((t.chosen_lens[0], t.rejected_lens[0]), (1, 1));
        Ok(())
    }
}
