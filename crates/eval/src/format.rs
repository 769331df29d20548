//! Format validity of one generated completion.
//!
//! A completion is what the model generated after a prompt ending in `<|start|>assistant`:
//! for a well-formed answer, `<|channel|>analysis<|message|>…<|end|><|start|>assistant
//! <|channel|>final<|message|>…<|return|>`. [`check_completion`] parses its token ids with the
//! Harmony crate's streaming parser and reports what an evaluator needs: whether it parses
//! (strict mode), how it ends, which channels it has, their texts and token lengths.
//! [`Completion::from_channels`] gives the same record for hand-made generations, and
//! [`completion_ids`] renders channel texts to the token ids a well-formed model would emit.
//!
//! ```no_run
//! use gptoss_eval::format::{check_completion, completion_ids};
//! use gptoss_harmony::HarmonyTokenizer;
//! let tok = HarmonyTokenizer::o200k_harmony()?;
//! let ids = completion_ids(&tok, Some("23 + 12 = 35."), "35")?;
//! let c = check_completion(&tok, &ids);
//! assert!(c.flags.is_valid());
//! assert_eq!((c.analysis.as_str(), c.final_text.as_str()), ("23 + 12 = 35.", "35"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use gptoss_harmony::{ids, HarmonyTokenizer, ParseMode, Role, StreamParser};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// The analysis (chain-of-thought) channel name.
pub const ANALYSIS: &str = "analysis";
/// The final-answer channel name.
pub const FINAL: &str = "final";

/// Format flags of one completion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatFlags {
    /// The token ids parse in strict mode (every message well formed, ids in the vocabulary).
    pub parses: bool,
    /// The strict parser's error (naming the token position), if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<String>,
    /// The last token is `<|return|>` (200002): the model finished its answer.
    pub ends_with_return: bool,
    /// The last token is `<|call|>` (200012): the model stopped to call a tool.
    pub ends_with_call: bool,
    /// The output stopped inside a message (e.g. max new tokens reached).
    pub truncated: bool,
    /// At least one message on the `analysis` channel.
    pub has_analysis: bool,
    /// At least one message on the `final` channel.
    pub has_final: bool,
}

impl FormatFlags {
    /// Parses, ends with `<|return|>`, and has both an analysis and a final channel.
    pub fn is_valid(&self) -> bool {
        self.parses && self.ends_with_return && self.has_analysis && self.has_final
    }
}

/// One parsed completion: its flags, channel texts and lengths.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// Format flags.
    pub flags: FormatFlags,
    /// Text of the analysis channel (several analysis messages joined by a blank line).
    pub analysis: String,
    /// Text of the final channel (several final messages joined by a blank line).
    #[serde(rename = "final")]
    pub final_text: String,
    /// Channel of every message, in order (`None` for a message without a channel).
    pub channels: Vec<Option<String>>,
    /// Number of generated token ids (`None` when unknown: built from texts).
    #[serde(default)]
    pub generated_tokens: Option<usize>,
    /// Content tokens of the analysis channel (`None` when unknown: built from texts).
    #[serde(default)]
    pub analysis_tokens: Option<usize>,
    /// Content tokens of the final channel (`None` when unknown: built from texts).
    #[serde(default)]
    pub final_tokens: Option<usize>,
    /// The generated text, special tokens included (unknown ids as `<|unknown:ID|>`).
    pub raw_text: String,
}

impl Completion {
    /// A completion from already-parsed channel texts (hand-made generations): it parses,
    /// has the channels given, ends with `stop_token` (e.g. `Some(ids::RETURN)`), and its
    /// raw text is the Harmony rendering. Token counts are unknown (`None`); use [`completion_ids`] + [`check_completion`] to have them.
    pub fn from_channels(
        analysis: Option<&str>,
        final_text: Option<&str>,
        stop_token: Option<u32>,
    ) -> Completion {
        let mut raw = String::new();
        let mut channels = Vec::new();
        if let Some(a) = analysis {
            raw.push_str(&format!("<|channel|>{ANALYSIS}<|message|>{a}<|end|>"));
            channels.push(Some(ANALYSIS.to_string()));
        }
        if let Some(f) = final_text {
            if analysis.is_some() {
                raw.push_str("<|start|>assistant");
            }
            raw.push_str(&format!("<|channel|>{FINAL}<|message|>{f}"));
            channels.push(Some(FINAL.to_string()));
            match stop_token {
                Some(ids::RETURN) => raw.push_str("<|return|>"),
                Some(ids::CALL) => raw.push_str("<|call|>"),
                Some(ids::END) => raw.push_str("<|end|>"),
                _ => {}
            }
        }
        Completion {
            flags: FormatFlags {
                parses: true,
                parse_error: None,
                ends_with_return: stop_token == Some(ids::RETURN),
                ends_with_call: stop_token == Some(ids::CALL),
                truncated: stop_token.is_none(),
                has_analysis: analysis.is_some(),
                has_final: final_text.is_some(),
            },
            analysis: analysis.unwrap_or_default().to_string(),
            final_text: final_text.unwrap_or_default().to_string(),
            channels,
            generated_tokens: None,
            analysis_tokens: None,
            final_tokens: None,
            raw_text: raw,
        }
    }
}

/// Token ids of a well-formed completion after `<|start|>assistant`: an analysis message (if
/// `analysis` is given) ended by `<|end|>`, then a final message ended by `<|return|>`.
pub fn completion_ids(
    tok: &HarmonyTokenizer,
    analysis: Option<&str>,
    final_text: &str,
) -> Result<Vec<u32>> {
    let enc = |text: &str, what: &str| {
        tok.encode(text).map_err(|source| EvalError::Harmony {
            context: format!("encoding the {what} of a hand-made completion"),
            source,
        })
    };
    let mut out = Vec::new();
    if let Some(a) = analysis {
        out.push(ids::CHANNEL);
        out.extend(enc(ANALYSIS, "channel name")?);
        out.push(ids::MESSAGE);
        out.extend(enc(a, "analysis text")?);
        out.extend([ids::END, ids::START]);
        out.extend(enc("assistant", "role")?);
    }
    out.push(ids::CHANNEL);
    out.extend(enc(FINAL, "channel name")?);
    out.push(ids::MESSAGE);
    out.extend(enc(final_text, "final text")?);
    out.push(ids::RETURN);
    Ok(out)
}

/// Parses generated token ids (the model's output after a prompt ending in
/// `<|start|>assistant`) and reports format flags, channel texts and token lengths.
///
/// Never fails: if strict parsing fails, `flags.parses` is false with the error recorded, and
/// texts and lengths come from a lenient re-parse (so language metrics still see what the
/// model wrote).
pub fn check_completion(tok: &HarmonyTokenizer, generated: &[u32]) -> Completion {
    let (parsed, parse_error) = match parse(tok, generated, ParseMode::Strict) {
        Ok(p) => (p, None),
        Err(e) => {
            let lenient = parse(tok, generated, ParseMode::Lenient).unwrap_or_default();
            (lenient, Some(e))
        }
    };
    let last = generated.last().copied();
    let channels: Vec<Option<String>> = parsed.messages.iter().map(|m| m.0.clone()).collect();
    let join = |name: &str| {
        parsed
            .messages
            .iter()
            .filter(|m| m.0.as_deref() == Some(name))
            .map(|m| m.1.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    };
    let has = |name: &str| channels.iter().any(|c| c.as_deref() == Some(name));
    Completion {
        flags: FormatFlags {
            parses: parse_error.is_none(),
            parse_error,
            ends_with_return: last == Some(ids::RETURN),
            ends_with_call: last == Some(ids::CALL),
            truncated: parsed.truncated,
            has_analysis: has(ANALYSIS),
            has_final: has(FINAL),
        },
        analysis: join(ANALYSIS),
        final_text: join(FINAL),
        generated_tokens: Some(generated.len()),
        analysis_tokens: Some(parsed.content_tokens(ANALYSIS)),
        final_tokens: Some(parsed.content_tokens(FINAL)),
        channels,
        raw_text: raw_text(tok, generated),
    }
}

#[derive(Default)]
struct Parsed {
    /// (channel, text) of every completed message.
    messages: Vec<(Option<String>, String)>,
    /// (channel, content token count) of every message whose content started.
    content: Vec<(Option<String>, usize)>,
    truncated: bool,
}

impl Parsed {
    fn content_tokens(&self, channel: &str) -> usize {
        self.content
            .iter()
            .filter(|c| c.0.as_deref() == Some(channel))
            .map(|c| c.1)
            .sum()
    }
}

/// Feeds the tokens one by one, counting content tokens per message: a token after which the
/// parser is inside a message's content is the `<|message|>` that opened it (first) or one of
/// its content tokens.
fn parse(tok: &HarmonyTokenizer, generated: &[u32], mode: ParseMode) -> Result<Parsed, String> {
    let mut p = StreamParser::with_mode(tok.clone(), Some(Role::Assistant), mode);
    let mut content: Vec<(Option<String>, usize)> = Vec::new();
    let mut inside = false;
    for &t in generated {
        p.process(t).map_err(|e| e.to_string())?;
        // `current_role` is only `Some` between the header and the stop token, or before the
        // first header (announced role); `current_channel`/`current_content` then tell content.
        let in_content = is_in_content(&p);
        if in_content && !inside {
            content.push((p.current_channel().map(str::to_string), 0));
        } else if in_content {
            if let Some(last) = content.last_mut() {
                last.1 += 1;
            }
        }
        inside = in_content;
    }
    p.process_eos().map_err(|e| e.to_string())?;
    let truncated = p.truncated();
    let messages = p
        .into_messages()
        .into_iter()
        .map(|m| {
            let text = m.text();
            (m.channel, text)
        })
        .collect();
    Ok(Parsed {
        messages,
        content,
        truncated,
    })
}

/// Whether the parser is inside a message's content (after `<|message|>`, before the stop).
fn is_in_content(p: &StreamParser) -> bool {
    // In content the parser knows the message's header; between messages and in headers the
    // channel is unknown and the content empty. A message without a channel is still content
    // once its text started, which is what matters for counting (its tokens are not counted
    // under any channel anyway).
    p.current_channel().is_some() || !p.current_content().is_empty()
}

/// The generated text with special tokens spelled out; unknown ids as `<|unknown:ID|>`.
fn raw_text(tok: &HarmonyTokenizer, generated: &[u32]) -> String {
    let mut bytes = Vec::new();
    for &id in generated {
        if tok.token_bytes_into(id, &mut bytes).is_none() {
            bytes.extend_from_slice(format!("<|unknown:{id}|>").as_bytes());
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> HarmonyTokenizer {
        HarmonyTokenizer::o200k_harmony().unwrap()
    }

    #[test]
    fn well_formed_completion() {
        let tok = tok();
        let analysis = "The user asks for 23 + 12. That is 35.";
        let ids = completion_ids(&tok, Some(analysis), "23 + 12 = 35.").unwrap();
        let c = check_completion(&tok, &ids);
        assert!(c.flags.is_valid(), "{c:?}");
        assert_eq!(c.analysis, analysis);
        assert_eq!(c.final_text, "23 + 12 = 35.");
        assert_eq!(
            c.channels,
            vec![Some("analysis".to_string()), Some("final".to_string())]
        );
        assert_eq!(c.generated_tokens, Some(ids.len()));
        assert_eq!(c.analysis_tokens, Some(tok.encode(analysis).unwrap().len()));
        assert_eq!(
            c.final_tokens,
            Some(tok.encode("23 + 12 = 35.").unwrap().len())
        );
        assert!(c
            .raw_text
            .starts_with("<|channel|>analysis<|message|>The user"));
        assert!(c.raw_text.ends_with("= 35.<|return|>"));
        assert!(!c.flags.truncated && !c.flags.ends_with_call);
        // The hand-made record has the same flags, texts and raw text.
        let h = Completion::from_channels(Some(analysis), Some("23 + 12 = 35."), Some(ids::RETURN));
        assert_eq!(h.flags, c.flags);
        assert_eq!((h.analysis, h.final_text), (c.analysis, c.final_text));
        assert_eq!(h.raw_text, c.raw_text);
        assert_eq!(h.channels, c.channels);
    }

    #[test]
    fn truncated_completion() {
        let tok = tok();
        let mut ids = completion_ids(&tok, Some("Let me think about 7 × 8."), "56").unwrap();
        let final_start = ids.iter().rposition(|&t| t == ids::MESSAGE).unwrap();
        ids.truncate(final_start); // cut inside the final message's header
        let c = check_completion(&tok, &ids);
        assert!(!c.flags.parses, "strict parse of a cut header must fail");
        assert!(c.flags.parse_error.as_deref().unwrap().contains("position"));
        assert!(c.flags.has_analysis && !c.flags.has_final && !c.flags.ends_with_return);
        assert_eq!(c.analysis, "Let me think about 7 × 8.");
        assert!(!c.flags.is_valid());

        // Cut inside the analysis content: parses (truncated), no final.
        let ids = completion_ids(&tok, Some("Let me think about 7 × 8."), "56").unwrap();
        let first_msg = ids.iter().position(|&t| t == ids::MESSAGE).unwrap();
        let c = check_completion(&tok, &ids[..first_msg + 3]);
        assert!(c.flags.parses && c.flags.truncated && c.flags.has_analysis);
        assert_eq!(c.analysis_tokens, Some(2));
        assert!(!c.flags.is_valid());
    }

    #[test]
    fn final_only_and_tool_call() {
        let tok = tok();
        let ids = completion_ids(&tok, None, "Paris").unwrap();
        let c = check_completion(&tok, &ids);
        assert!(c.flags.parses && c.flags.ends_with_return && c.flags.has_final);
        assert!(!c.flags.has_analysis && !c.flags.is_valid());
        assert_eq!(c.analysis_tokens, Some(0));

        let mut ids = completion_ids(&tok, Some("I need the weather."), "{}").unwrap();
        *ids.last_mut().unwrap() = ids::CALL;
        let c = check_completion(&tok, &ids);
        assert!(c.flags.ends_with_call && !c.flags.ends_with_return);
        assert!(!c.flags.is_valid());
    }

    #[test]
    fn garbage_ids_never_panic() {
        let tok = tok();
        let c = check_completion(&tok, &[ids::RETURN, 5, 999_999_999, ids::MESSAGE]);
        assert!(!c.flags.parses);
        assert!(c.raw_text.contains("<|unknown:999999999|>"));
        // Nothing generated: the announced assistant header never came (a strict parse error).
        let c = check_completion(&tok, &[]);
        assert!(!c.flags.parses && !c.flags.has_final && !c.flags.is_valid());
        assert_eq!(c.generated_tokens, Some(0));
    }
}
