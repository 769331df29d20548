//! The o200k_harmony tokenizer used by gpt-oss.
//!
//! Two backends sit behind one type, [`HarmonyTokenizer`]:
//! - [`HarmonyTokenizer::o200k_harmony`] builds the exact gpt-oss tokenizer offline from the
//!   o200k_base ranks that ship inside the `tiktoken-rs` crate, with the gpt-oss special tokens
//!   (ids 199998–200018 named as the Hugging Face tokenizer names them, then
//!   `<|reserved_{id}|>` up to the padded vocabulary of 201,088 ids);
//! - [`HarmonyTokenizer::from_file`] loads any Hugging Face `tokenizer.json` (a real checkpoint)
//!   with the `tokenizers` crate.
//!
//! Plain [`encode`](HarmonyTokenizer::encode) never produces control tokens: text such as
//! `"<|end|>"` inside a message stays ordinary text. Control tokens come only from
//! [`encode_with_special_tokens`](HarmonyTokenizer::encode_with_special_tokens) or from the
//! renderers, which emit them as ids.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::error::{HarmonyError, Result};

/// Well-known token ids of the gpt-oss vocabulary.
pub mod ids {
    /// `<|startoftext|>` (the HF tokenizer's BOS; the chat template never emits it).
    pub const STARTOFTEXT: u32 = 199_998;
    /// `<|endoftext|>` (the HF tokenizer's pad token).
    pub const ENDOFTEXT: u32 = 199_999;
    /// `<|return|>`: the model is done sampling (the HF tokenizer's EOS).
    pub const RETURN: u32 = 200_002;
    /// `<|constrain|>`: precedes a constrained content type such as `json`.
    pub const CONSTRAIN: u32 = 200_003;
    /// `<|channel|>`: precedes the channel name in a header.
    pub const CHANNEL: u32 = 200_005;
    /// `<|start|>`: begins a message.
    pub const START: u32 = 200_006;
    /// `<|end|>`: ends a message.
    pub const END: u32 = 200_007;
    /// `<|message|>`: separates the header from the content.
    pub const MESSAGE: u32 = 200_008;
    /// `<|call|>`: ends an assistant message addressed to a tool.
    pub const CALL: u32 = 200_012;
    /// `<|endofprompt|>` (present in the HF tokenizer, unused by the format).
    pub const ENDOFPROMPT: u32 = 200_018;
    /// Size of the model's (padded) embedding table: valid ids are `0..PADDED_VOCAB_SIZE`.
    pub const PADDED_VOCAB_SIZE: u32 = 201_088;
    /// Number of ordinary (BPE) tokens in o200k_base: ids `0..NUM_BPE_TOKENS`.
    pub const NUM_BPE_TOKENS: u32 = 199_998;
}

/// Ids of the control tokens the harmony format is built from, looked up in the tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlTokens {
    /// `<|start|>`
    pub start: u32,
    /// `<|message|>`
    pub message: u32,
    /// `<|end|>`
    pub end: u32,
    /// `<|channel|>`
    pub channel: u32,
    /// `<|constrain|>`
    pub constrain: u32,
    /// `<|return|>`
    pub return_: u32,
    /// `<|call|>`
    pub call: u32,
}

impl ControlTokens {
    /// Tokens that end generation: `<|return|>`, `<|end|>`, `<|call|>` (openai-harmony's
    /// `stop_tokens()`).
    pub fn stop_tokens(&self) -> [u32; 3] {
        [self.return_, self.end, self.call]
    }

    /// Tokens that end an assistant action: `<|return|>`, `<|call|>`.
    pub fn stop_tokens_for_assistant_actions(&self) -> [u32; 2] {
        [self.return_, self.call]
    }
}

/// The special tokens of gpt-oss as the Hugging Face tokenizer names them (199998–200018),
/// followed by reserved tokens up to the padded vocabulary.
pub fn gpt_oss_special_tokens() -> Vec<(String, u32)> {
    let named: [(&str, u32); 9] = [
        ("<|startoftext|>", ids::STARTOFTEXT),
        ("<|endoftext|>", ids::ENDOFTEXT),
        ("<|return|>", ids::RETURN),
        ("<|constrain|>", ids::CONSTRAIN),
        ("<|channel|>", ids::CHANNEL),
        ("<|start|>", ids::START),
        ("<|end|>", ids::END),
        ("<|message|>", ids::MESSAGE),
        ("<|call|>", ids::CALL),
    ];
    let mut out: Vec<(String, u32)> = named.iter().map(|(s, i)| (s.to_string(), *i)).collect();
    out.push(("<|endofprompt|>".to_string(), ids::ENDOFPROMPT));
    for id in ids::STARTOFTEXT..ids::PADDED_VOCAB_SIZE {
        if !out.iter().any(|(_, i)| *i == id) {
            out.push((format!("<|reserved_{id}|>"), id));
        }
    }
    out.sort_by_key(|(_, id)| *id);
    out
}

enum Backend {
    /// tiktoken-style BPE over the o200k_base ranks.
    Bpe(tiktoken_rs::CoreBPE),
    /// A Hugging Face `tokenizers` tokenizer. `ordinary` encodes special-token text as text.
    Hf {
        tokenizer: Box<tokenizers::Tokenizer>,
        ordinary: Box<tokenizers::Tokenizer>,
    },
}

struct Inner {
    backend: Backend,
    name: String,
    specials: HashMap<String, u32>,
    special_text: HashMap<u32, String>,
    max_special_len: usize,
    control: ControlTokens,
}

/// A tokenizer for gpt-oss conversations (cheap to clone: the tables are shared).
///
/// ```no_run
/// use gptoss_harmony::HarmonyTokenizer;
/// let tok = HarmonyTokenizer::o200k_harmony()?;
/// let ids = tok.encode("Hello <|end|>")?; // "<|end|>" stays text
/// assert_eq!(tok.decode(&ids)?, "Hello <|end|>");
/// # Ok::<(), gptoss_harmony::HarmonyError>(())
/// ```
#[derive(Clone)]
pub struct HarmonyTokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HarmonyTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HarmonyTokenizer")
            .field("name", &self.inner.name)
            .field("specials", &self.inner.specials.len())
            .finish()
    }
}

static O200K_HARMONY: OnceLock<std::result::Result<HarmonyTokenizer, String>> = OnceLock::new();

impl HarmonyTokenizer {
    /// The gpt-oss tokenizer, built offline from the o200k_base ranks embedded in `tiktoken-rs`.
    ///
    /// The first call builds the tables (a fraction of a second); later calls share them.
    pub fn o200k_harmony() -> Result<Self> {
        O200K_HARMONY
            .get_or_init(|| Self::build_o200k_harmony().map_err(|e| e.to_string()))
            .clone()
            .map_err(HarmonyError::TokenizerBuild)
    }

    fn build_o200k_harmony() -> Result<Self> {
        let base =
            tiktoken_rs::o200k_base().map_err(|e| HarmonyError::TokenizerBuild(e.to_string()))?;
        let mut encoder: rustc_hash::FxHashMap<Vec<u8>, u32> = rustc_hash::FxHashMap::default();
        encoder.reserve(ids::NUM_BPE_TOKENS as usize);
        for rank in 0..ids::NUM_BPE_TOKENS {
            let bytes = base.decode_bytes(&[rank]).map_err(|e| {
                HarmonyError::TokenizerBuild(format!("o200k_base rank {rank}: {e}"))
            })?;
            encoder.insert(bytes, rank);
        }
        let specials = gpt_oss_special_tokens();
        let mut special_encoder: rustc_hash::FxHashMap<String, u32> =
            rustc_hash::FxHashMap::default();
        for (text, id) in &specials {
            special_encoder.insert(text.clone(), *id);
        }
        let bpe =
            tiktoken_rs::CoreBPE::new(encoder, special_encoder, tiktoken_rs::O200K_BASE_PAT_STR)
                .map_err(|e| HarmonyError::TokenizerBuild(e.to_string()))?;
        Self::from_parts(Backend::Bpe(bpe), "o200k_harmony".to_string(), specials)
    }

    /// Loads a Hugging Face `tokenizer.json` (e.g. the one of an `openai/gpt-oss-20b` checkpoint).
    ///
    /// All added tokens become special tokens. The file must define the harmony control tokens
    /// (`<|start|>`, `<|message|>`, `<|end|>`, `<|channel|>`, `<|constrain|>`, `<|return|>`,
    /// `<|call|>`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file_err = |message: String| HarmonyError::TokenizerFile {
            path: path.display().to_string(),
            message,
        };
        let tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| file_err(e.to_string()))?;
        let mut ordinary = tokenizer.clone();
        ordinary.set_encode_special_tokens(true);
        let specials: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, tok)| (tok.content, id))
            .collect();
        Self::from_parts(
            Backend::Hf {
                tokenizer: Box::new(tokenizer),
                ordinary: Box::new(ordinary),
            },
            path.display().to_string(),
            specials,
        )
    }

    fn from_parts(backend: Backend, name: String, specials: Vec<(String, u32)>) -> Result<Self> {
        let special_text: HashMap<u32, String> =
            specials.iter().map(|(s, i)| (*i, s.clone())).collect();
        let max_special_len = specials.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        let specials: HashMap<String, u32> = specials.into_iter().collect();
        let find = |token: &str| {
            specials
                .get(token)
                .copied()
                .ok_or_else(|| HarmonyError::MissingControlToken {
                    token: token.to_string(),
                })
        };
        let control = ControlTokens {
            start: find("<|start|>")?,
            message: find("<|message|>")?,
            end: find("<|end|>")?,
            channel: find("<|channel|>")?,
            constrain: find("<|constrain|>")?,
            return_: find("<|return|>")?,
            call: find("<|call|>")?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                name,
                specials,
                special_text,
                max_special_len,
                control,
            }),
        })
    }

    /// A short name of the tokenizer (`o200k_harmony` or the file path).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Ids of the harmony control tokens.
    pub fn control(&self) -> ControlTokens {
        self.inner.control
    }

    /// `<|return|>`, `<|end|>`, `<|call|>`: the tokens at which generation stops.
    pub fn stop_tokens(&self) -> [u32; 3] {
        self.inner.control.stop_tokens()
    }

    /// Id of a special token given its text (e.g. `"<|start|>"`).
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        self.inner.specials.get(text).copied()
    }

    /// Text of a special token id, if `id` is special.
    pub fn special_token_text(&self, id: u32) -> Option<&str> {
        self.inner.special_text.get(&id).map(String::as_str)
    }

    /// Whether `id` is a special (control or reserved) token.
    pub fn is_special_token(&self, id: u32) -> bool {
        self.inner.special_text.contains_key(&id)
    }

    /// All special token texts.
    pub fn special_tokens(&self) -> HashSet<&str> {
        self.inner.specials.keys().map(String::as_str).collect()
    }

    /// Encodes text as ordinary text: special-token literals such as `"<|end|>"` are
    /// tokenized like any other characters.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Appends the ordinary encoding of `text` to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.inner.backend {
            Backend::Bpe(bpe) => {
                let (ids, _) = bpe
                    .encode(text, &HashSet::new())
                    .map_err(|e| HarmonyError::Encode(e.to_string()))?;
                out.extend(ids);
            }
            Backend::Hf { ordinary, .. } => {
                let enc = ordinary
                    .encode(text, false)
                    .map_err(|e| HarmonyError::Encode(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
            }
        }
        Ok(())
    }

    /// Encodes text, turning every special-token literal (`<|start|>`, `<|reserved_200100|>`, …)
    /// into its id. Use only for trusted template text, never for message content.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut rest = 0;
        for (start, end, id) in self.find_specials(text) {
            self.encode_into(&text[rest..start], &mut out)?;
            out.push(id);
            rest = end;
        }
        self.encode_into(&text[rest..], &mut out)?;
        Ok(out)
    }

    /// Byte spans `(start, end, id)` of the special-token literals in `text`, left to right.
    pub fn find_specials(&self, text: &str) -> Vec<(usize, usize, u32)> {
        let bytes = text.as_bytes();
        let max_len = self.inner.max_special_len;
        let mut found = Vec::new();
        let mut pos = 0;
        while let Some(off) = text[pos..].find("<|") {
            let start = pos + off;
            // Only look as far as the longest special token can reach (keeps this linear).
            let window_end = (start + max_len).min(bytes.len());
            let close = bytes[start + 2..window_end]
                .windows(2)
                .position(|w| w == b"|>");
            match close {
                Some(close) => {
                    let end = start + 2 + close + 2;
                    if let Some(&id) = self.inner.specials.get(&text[start..end]) {
                        found.push((start, end, id));
                        pos = end;
                        continue;
                    }
                    pos = start + 2;
                }
                None => pos = start + 2,
            }
        }
        found
    }

    /// The raw bytes of the tokens (special tokens give their text). Fails on ids outside the
    /// vocabulary, naming the position.
    pub fn decode_bytes(&self, tokens: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(tokens.len() * 4);
        for (position, &id) in tokens.iter().enumerate() {
            self.token_bytes_into(id, &mut out)
                .ok_or(HarmonyError::UnknownToken { id, position })?;
        }
        Ok(out)
    }

    /// Appends the bytes of one token; `None` if the id is not in the vocabulary.
    pub fn token_bytes_into(&self, id: u32, out: &mut Vec<u8>) -> Option<()> {
        if let Some(text) = self.inner.special_text.get(&id) {
            out.extend_from_slice(text.as_bytes());
            return Some(());
        }
        match &self.inner.backend {
            Backend::Bpe(bpe) => {
                let bytes = bpe.decode_bytes(&[id]).ok()?;
                out.extend_from_slice(&bytes);
            }
            Backend::Hf { tokenizer, .. } => {
                let piece = tokenizer.id_to_token(id)?;
                let start = out.len();
                for c in piece.chars() {
                    match byte_level_char_to_byte(c) {
                        Some(b) => out.push(b),
                        None => {
                            // Not a byte-level vocabulary: fall back to the tokenizer's decoder.
                            out.truncate(start);
                            let text = tokenizer.decode(&[id], false).ok()?;
                            out.extend_from_slice(text.as_bytes());
                            break;
                        }
                    }
                }
            }
        }
        Some(())
    }

    /// Decodes tokens to a string. Fails on unknown ids and on invalid UTF-8 (which model
    /// output can contain: see [`decode_lossy`](Self::decode_lossy)).
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        let bytes = self.decode_bytes(tokens)?;
        String::from_utf8(bytes).map_err(|e| HarmonyError::InvalidUtf8 {
            valid_up_to: e.utf8_error().valid_up_to(),
        })
    }

    /// Decodes tokens, replacing each invalid UTF-8 sequence with U+FFFD (as
    /// `String::from_utf8_lossy` does). Fails only on ids outside the vocabulary.
    pub fn decode_lossy(&self, tokens: &[u32]) -> Result<String> {
        let bytes = self.decode_bytes(tokens)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Inverse of GPT-2's `bytes_to_unicode` table used by byte-level BPE vocabularies.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    let direct =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if cp < 256 && direct(cp) {
        return Some(cp as u8);
    }
    if !(256..256 + 68).contains(&cp) {
        return None;
    }
    // The remaining 68 bytes map, in increasing order, to 256, 257, ...
    let mut n = 256;
    for b in 0u32..256 {
        if !direct(b) {
            if n == cp {
                return Some(b as u8);
            }
            n += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<HarmonyTokenizer>();
        check::<crate::StreamParser>();
    }

    #[test]
    fn byte_level_table_is_a_bijection() {
        let mut seen = HashSet::new();
        for cp in 0u32..400 {
            if let Some(c) = char::from_u32(cp) {
                if let Some(b) = byte_level_char_to_byte(c) {
                    assert!(seen.insert(b));
                }
            }
        }
        assert_eq!(seen.len(), 256);
        assert_eq!(byte_level_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_char_to_byte('Ċ'), Some(b'\n'));
    }

    #[test]
    fn special_table_covers_padded_vocab() {
        let specials = gpt_oss_special_tokens();
        assert_eq!(
            specials.len() as u32,
            ids::PADDED_VOCAB_SIZE - ids::STARTOFTEXT
        );
        assert_eq!(specials[0], ("<|startoftext|>".to_string(), 199_998));
        assert!(specials.contains(&("<|endofprompt|>".to_string(), 200_018)));
        assert!(specials.contains(&("<|reserved_200013|>".to_string(), 200_013)));
        assert_eq!(specials.last().map(|s| s.1), Some(201_087));
    }
}
