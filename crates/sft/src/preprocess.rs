//! Dataset rows → training examples, like TRL 1.16's SFT preparation of a `messages` dataset:
//! the harmony crate's HF chat-template rendering (`apply_chat_template(tokenize=True)`, no EOS
//! added), `labels = input_ids` where the loss mask says so (−100 elsewhere), truncation to
//! `max_length` keeping the start, and rows with no trained token dropped. Plus seeded
//! per-epoch shuffling of the row order.

use gptoss_harmony::hf::{render_training_example, ChatMessage, ChatTemplateOptions};
use gptoss_harmony::{HarmonyTokenizer, LossMaskMode};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::collate::{Example, IGNORE_INDEX};
use crate::data::Row;
use crate::error::{Result, SftError};

/// The fixed `Current date` used when none is configured (the HF template would read the
/// local clock, making the tokens depend on the run date).
pub const DEFAULT_TEMPLATE_DATE: &str = "2025-08-05";

/// How rows become examples.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessOptions {
    /// Keep the first `max_length` tokens (TRL `truncation_mode="keep_start"`).
    pub max_length: usize,
    /// Which tokens carry loss.
    pub loss_mask: LossMaskMode,
    /// The template's `Current date`, `YYYY-MM-DD`.
    pub date: String,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        Self {
            max_length: 2048,
            loss_mask: LossMaskMode::All,
            date: DEFAULT_TEMPLATE_DATE.to_string(),
        }
    }
}

/// What [`preprocess`] produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preprocessed {
    /// The kept examples, in row order.
    pub examples: Vec<Example>,
    /// For each kept example, the index of its source row.
    pub row_indices: Vec<usize>,
    /// Indices of rows dropped because no token carried loss (after truncation).
    pub dropped: Vec<usize>,
    /// Number of kept examples that were truncated.
    pub truncated: usize,
}

/// The harmony messages of a dataset row.
pub fn chat_messages(row: &Row) -> Vec<ChatMessage> {
    row.messages
        .iter()
        .map(|m| {
            let msg = ChatMessage::new(m.role.clone(), m.content.clone());
            match &m.thinking {
                Some(t) => msg.with_thinking(t.clone()),
                None => msg,
            }
        })
        .collect()
}

/// Renders one row. Returns `None` when no token carries loss after truncation (TRL drops
/// such rows); the bool says whether the row was truncated.
pub fn preprocess_row(
    tok: &HarmonyTokenizer,
    row: &Row,
    opts: &PreprocessOptions,
) -> Result<Option<(Example, bool)>> {
    let template = ChatTemplateOptions::new(opts.date.clone());
    let ex = render_training_example(tok, &chat_messages(row), &template, opts.loss_mask)?;
    let truncated = ex.ids.len() > opts.max_length;
    let n = ex.ids.len().min(opts.max_length);
    let input_ids = ex.ids[..n].to_vec();
    let labels: Vec<i64> = input_ids
        .iter()
        .zip(&ex.mask[..n])
        .map(|(&id, &m)| if m { id as i64 } else { IGNORE_INDEX })
        .collect();
    if labels.iter().all(|&l| l == IGNORE_INDEX) {
        return Ok(None);
    }
    Ok(Some((Example { input_ids, labels }, truncated)))
}

/// Renders every row; a row that fails to render is an error naming its index.
pub fn preprocess(
    tok: &HarmonyTokenizer,
    rows: &[Row],
    opts: &PreprocessOptions,
) -> Result<Preprocessed> {
    if opts.max_length == 0 {
        return Err(SftError::config("model.max_length", "must be >= 1"));
    }
    let mut out = Preprocessed::default();
    for (i, row) in rows.iter().enumerate() {
        let r = preprocess_row(tok, row, opts)
            .map_err(|e| SftError::Dataset(format!("row {} (0-based {i}): {e}", i + 1)))?;
        match r {
            Some((ex, truncated)) => {
                out.truncated += usize::from(truncated);
                out.examples.push(ex);
                out.row_indices.push(i);
            }
            None => out.dropped.push(i),
        }
    }
    Ok(out)
}

/// The order in which epoch `epoch` visits `n` examples: a permutation seeded by
/// `(seed, epoch)` when `shuffle`, else `0..n`. Deterministic, so a resumed run replays it.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mixed = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(mixed);
        order.shuffle(&mut rng);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 42, 0, true);
        assert_eq!(a, epoch_order(50, 42, 0, true));
        assert_ne!(a, epoch_order(50, 42, 1, true));
        assert_ne!(a, epoch_order(50, 43, 0, true));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(epoch_order(5, 1, 0, false), vec![0, 1, 2, 3, 4]);
    }
}
