//! Per-token loss masks for a rendered training conversation.
//!
//! Works on token ids of either rendering mode: messages are found from their control tokens
//! (`<|start|>` … `<|message|>` … `<|end|>`/`<|return|>`/`<|call|>`), never from text.

use serde::{Deserialize, Serialize};

use crate::tokenizer::HarmonyTokenizer;

/// Token ids and per-token loss mask of one training example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainingExample {
    /// Token ids (no BOS/EOS added, as `apply_chat_template(tokenize=True)`).
    pub ids: Vec<u32>,
    /// `mask[i]`: token `i` is a training target (TRL's label ≠ -100).
    pub mask: Vec<bool>,
}

/// Which tokens carry loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossMaskMode {
    /// Every token (TRL's default, `assistant_only_loss=False`).
    #[default]
    All,
    /// Every assistant message from its `<|start|>` through its `<|return|>`/`<|end|>`/`<|call|>`
    /// (TRL's `assistant_only_loss=True` generation spans).
    AssistantOnly,
    /// The last assistant message on the `final` channel, from its `<|start|>` through its end token.
    FinalOnly,
}

/// A message located in a token sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageSpan {
    /// Index of `<|start|>`.
    pub start: usize,
    /// One past the end token (or the sequence length if unterminated).
    pub end: usize,
    /// First word of the header (`assistant`, `user`, `functions.x`, …).
    pub role: String,
    /// Channel named in the header, if any.
    pub channel: Option<String>,
}

/// Finds the messages of a rendered sequence.
pub fn message_spans(tok: &HarmonyTokenizer, ids: &[u32]) -> Vec<MessageSpan> {
    let ctl = tok.control();
    let stops = ctl.stop_tokens();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != ctl.start {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i + 1;
        while j < ids.len()
            && ids[j] != ctl.message
            && !stops.contains(&ids[j])
            && ids[j] != ctl.start
        {
            j += 1;
        }
        let header = tok.decode_lossy_known(&ids[start + 1..j]);
        let (before_channel, channel) = match header.split_once("<|channel|>") {
            Some((b, a)) => {
                let ch: String = a
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '<')
                    .collect();
                (b.to_string(), Some(ch))
            }
            None => (header.clone(), None),
        };
        let role = before_channel
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let end = if j < ids.len() && ids[j] == ctl.message {
            let mut k = j + 1;
            while k < ids.len() && !stops.contains(&ids[k]) {
                k += 1;
            }
            (k + 1).min(ids.len())
        } else if j < ids.len() && stops.contains(&ids[j]) {
            j + 1
        } else {
            j
        };
        spans.push(MessageSpan {
            start,
            end,
            role,
            channel,
        });
        i = end.max(start + 1);
    }
    spans
}

/// The loss mask of a rendered sequence: `mask[i]` is true when token `i` is a target.
pub fn loss_mask(tok: &HarmonyTokenizer, ids: &[u32], mode: LossMaskMode) -> Vec<bool> {
    let mut mask = vec![mode == LossMaskMode::All; ids.len()];
    if mode == LossMaskMode::All {
        return mask;
    }
    let spans = message_spans(tok, ids);
    let mut assistant = spans.iter().filter(|s| s.role == "assistant");
    let chosen: Vec<&MessageSpan> = match mode {
        LossMaskMode::AssistantOnly => assistant.collect(),
        LossMaskMode::FinalOnly => assistant
            .rfind(|s| s.channel.as_deref() == Some("final"))
            .into_iter()
            .collect(),
        LossMaskMode::All => Vec::new(),
    };
    for s in chosen {
        mask[s.start..s.end].iter_mut().for_each(|m| *m = true);
    }
    mask
}
