//! Preference rows → token ids, as TRL 1.16's `DPOTrainer._prepare_dataset`:
//!
//! - conversational rows: `prompt_ids` = the chat template of the prompt with the generation
//!   prompt (`…<|start|>assistant`), and the template of `prompt + chosen` / `prompt + rejected`
//!   (HF-template mode of the harmony crate, token-identical to `apply_chat_template`);
//! - text rows: the tokenizer on `prompt` and on `prompt + completion`, with the EOS
//!   `<|return|>` appended to a completion that does not end with it;
//! - the completion starts where the prompt's ids and the full ids diverge (TRL's
//!   `common_prefix_length`, over both completions);
//! - rows whose prompt alone fills `max_length` are dropped (`keep_start` would leave no
//!   completion token).

use gptoss_harmony::hf::{render_ids, ChatMessage, ChatTemplateOptions};
use gptoss_harmony::HarmonyTokenizer;

use super::dataset::{PreferenceRow, Turns};
use crate::error::{Result, SftError};

/// The EOS appended to text completions (`tokenizer.eos_token` of gpt-oss).
pub const EOS_TOKEN: &str = "<|return|>";

/// One tokenized pair (TRL's `prompt_ids`, `chosen_ids`, `rejected_ids`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceExample {
    /// The shared prompt tokens.
    pub prompt_ids: Vec<u32>,
    /// The chosen completion tokens (after the prompt).
    pub chosen_ids: Vec<u32>,
    /// The rejected completion tokens.
    pub rejected_ids: Vec<u32>,
}

/// What [`tokenize_rows`] produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizedPreferences {
    /// The kept pairs, in row order.
    pub examples: Vec<PreferenceExample>,
    /// For each kept pair, the index of its row.
    pub row_indices: Vec<usize>,
    /// Indices of rows dropped because the prompt alone reaches `max_length`.
    pub dropped: Vec<usize>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn join(prompt: &[ChatMessage], completion: &[ChatMessage]) -> Vec<ChatMessage> {
    prompt.iter().chain(completion).cloned().collect()
}

/// Tokenizes one row (see the module docs); `date` is the chat template's `Current date`.
pub fn tokenize_row(
    tok: &HarmonyTokenizer,
    row: &PreferenceRow,
    date: &str,
) -> Result<PreferenceExample> {
    let (prompt_ids, full_c, full_r) = match (&row.prompt, &row.chosen, &row.rejected) {
        (Turns::Messages(p), Turns::Messages(c), Turns::Messages(r)) => {
            let opts = ChatTemplateOptions::new(date);
            let gen = opts.clone().with_generation_prompt(true);
            (
                render_ids(tok, p, &gen)?,
                render_ids(tok, &join(p, c), &opts)?,
                render_ids(tok, &join(p, r), &opts)?,
            )
        }
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => {
            let with_eos = |s: &str| {
                if s.ends_with(EOS_TOKEN) {
                    s.to_string()
                } else {
                    format!("{s}{EOS_TOKEN}")
                }
            };
            (
                tok.encode_with_special_tokens(p)?,
                tok.encode_with_special_tokens(&format!("{p}{}", with_eos(c)))?,
                tok.encode_with_special_tokens(&format!("{p}{}", with_eos(r)))?,
            )
        }
        _ => {
            return Err(SftError::Dataset(
                "a preference row mixes text and messages".into(),
            ))
        }
    };
    let n = common_prefix(&prompt_ids, &full_c).min(common_prefix(&prompt_ids, &full_r));
    Ok(PreferenceExample {
        prompt_ids: prompt_ids[..n].to_vec(),
        chosen_ids: full_c[n..].to_vec(),
        rejected_ids: full_r[n..].to_vec(),
    })
}

/// Tokenizes every row; drops those whose prompt reaches `max_length` (`None`: no limit).
///
/// # Errors
/// A row that fails to render, naming its index.
pub fn tokenize_rows(
    tok: &HarmonyTokenizer,
    rows: &[PreferenceRow],
    date: &str,
    max_length: Option<usize>,
) -> Result<TokenizedPreferences> {
    let mut out = TokenizedPreferences::default();
    for (i, row) in rows.iter().enumerate() {
        let ex = tokenize_row(tok, row, date).map_err(|e| {
            SftError::Dataset(format!("preference row {} (0-based {i}): {e}", i + 1))
        })?;
        if max_length.is_some_and(|m| ex.prompt_ids.len() >= m) {
            out.dropped.push(i);
            continue;
        }
        out.examples.push(ex);
        out.row_indices.push(i);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conversational_completion_follows_the_generation_prompt() -> Result<()> {
        let tok = HarmonyTokenizer::o200k_harmony()?;
        let row = PreferenceRow::from_json(&json!({
            "prompt": [{"role": "user", "content": "2 + 2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5", "thinking": "hmm"}],
        }))
        .map_err(SftError::Dataset)?;
        let ex = tokenize_row(&tok, &row, "2025-08-05")?;
        let start = tok.special_token_id("<|start|>");
        let assistant = tok.encode("assistant")?;
        // The prompt ends with `<|start|>assistant`, both completions end with `<|return|>`.
        let n = ex.prompt_ids.len();
        assert_eq!(ex.prompt_ids[n - 1 - assistant.len()], start.unwrap_or(0));
        assert_eq!(&ex.prompt_ids[n - assistant.len()..], &assistant[..]);
        let ret = tok.special_token_id(EOS_TOKEN);
        assert_eq!(ex.chosen_ids.last().copied(), ret);
        assert_eq!(ex.rejected_ids.last().copied(), ret);
        assert_eq!(
            ex.chosen_ids[0],
            tok.special_token_id("<|channel|>").unwrap_or(0)
        );
        // Truncation: a prompt that fills max_length is dropped.
        let t = tokenize_rows(&tok, &[row.clone(), row], "2025-08-05", Some(n))?;
        assert_eq!((t.examples.len(), t.dropped.clone()), (0, vec![0, 1]));
        Ok(())
    }

    #[test]
    fn text_rows_get_the_eos_once() -> Result<()> {
        let tok = HarmonyTokenizer::o200k_harmony()?;
        let row = PreferenceRow::from_json(&json!({
            "prompt": "Question: hi\nAnswer:", "chosen": " yes", "rejected": " no<|return|>"
        }))
        .map_err(SftError::Dataset)?;
        let ex = tokenize_row(&tok, &row, "2025-08-05")?;
        assert_eq!(ex.prompt_ids, tok.encode("Question: hi\nAnswer:")?);
        let ret = tok.special_token_id(EOS_TOKEN).unwrap_or(0);
        let mut yes = tok.encode(" yes")?;
        yes.push(ret);
        assert_eq!(ex.chosen_ids, yes);
        assert_eq!(ex.rejected_ids.iter().filter(|&&t| t == ret).count(), 1);
        Ok(())
    }
}
