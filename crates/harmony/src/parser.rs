//! Streaming parser: token ids from the model → harmony messages.
//!
//! Follows openai-harmony 0.0.8's `StreamableParser` (same messages for well-formed input,
//! same header grammar), with two additions: every error names the token position, and a
//! lenient mode that recovers from malformed sequences instead of failing. It never panics
//! (property-tested over random id sequences).
//!
//! ```no_run
//! use gptoss_harmony::{HarmonyTokenizer, StreamParser, Role};
//! let tok = HarmonyTokenizer::o200k_harmony()?;
//! let mut p = StreamParser::new(tok, Some(Role::Assistant));
//! for id in [200005u32, 17196, 200008, 13225, 0, 200002] {
//!     p.process(id)?;
//!     if let Some(delta) = p.last_content_delta() { print!("{delta}"); }
//! }
//! p.process_eos()?;
//! assert_eq!(p.messages()[0].text(), "Hello!");
//! # Ok::<(), gptoss_harmony::HarmonyError>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::chat::{Author, Content, Message, Role, TextContent};
use crate::error::{HarmonyError, Result};
use crate::tokenizer::HarmonyTokenizer;

const REPLACEMENT: &str = "\u{FFFD}";

/// Strict (error on malformed input, the default) or lenient (recover what can be recovered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ParseMode {
    /// Malformed sequences, unknown ids and truncated headers are errors naming the position.
    #[default]
    Strict,
    /// Skips stray tokens, drops unparseable headers and keeps text of malformed messages.
    Lenient,
}

/// The header of a message being parsed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedHeader {
    /// Author.
    pub author: Author,
    /// Recipient, if any.
    pub recipient: Option<String>,
    /// Channel, if any.
    pub channel: Option<String>,
    /// Content type, if any.
    pub content_type: Option<String>,
}

#[derive(Clone, Debug)]
enum State {
    ExpectStart,
    Header(Vec<u32>),
    Content {
        header: ParsedHeader,
        text: String,
        pending: Vec<u8>,
    },
    /// Lenient mode: skipping a message whose header could not be parsed.
    Skip,
}

/// Incremental parser fed one token at a time (or a whole completion).
#[derive(Clone, Debug)]
pub struct StreamParser {
    tok: HarmonyTokenizer,
    mode: ParseMode,
    next_role: Option<Role>,
    state: State,
    tokens: Vec<u32>,
    messages: Vec<Message>,
    last_delta: Option<String>,
    truncated: bool,
    stopped_by: Option<u32>,
}

impl StreamParser {
    /// A strict parser. `role`: the role already rendered by the prompt (`Some(Assistant)`
    /// after `<|start|>assistant`), or `None` if the sequence starts with `<|start|>`.
    pub fn new(tok: HarmonyTokenizer, role: Option<Role>) -> Self {
        Self::with_mode(tok, role, ParseMode::Strict)
    }

    /// A parser in the given mode.
    pub fn with_mode(tok: HarmonyTokenizer, role: Option<Role>, mode: ParseMode) -> Self {
        let state = match role {
            Some(_) => State::Header(Vec::new()),
            None => State::ExpectStart,
        };
        Self {
            tok,
            mode,
            next_role: role,
            state,
            tokens: Vec::new(),
            messages: Vec::new(),
            last_delta: None,
            truncated: false,
            stopped_by: None,
        }
    }

    /// Feeds one token.
    pub fn process(&mut self, token: u32) -> Result<&mut Self> {
        let position = self.tokens.len();
        self.tokens.push(token);
        self.last_delta = None;
        let ctl = self.tok.control();
        let is_stop = ctl.stop_tokens().contains(&token);
        let state = std::mem::replace(&mut self.state, State::ExpectStart);
        self.state = match state {
            State::ExpectStart => {
                if token == ctl.start {
                    State::Header(Vec::new())
                } else if self.mode == ParseMode::Lenient {
                    State::ExpectStart
                } else {
                    return Err(self.error(
                        position,
                        format!(
                            "unexpected token {token} while expecting <|start|> ({})",
                            ctl.start
                        ),
                    ));
                }
            }
            State::Header(mut header_tokens) => {
                if token == ctl.message {
                    let role = self.next_role.take();
                    match self.parse_header_tokens(&header_tokens, role) {
                        Ok(header) => State::Content {
                            header,
                            text: String::new(),
                            pending: Vec::new(),
                        },
                        Err(msg) if self.mode == ParseMode::Lenient => {
                            let _ = msg;
                            State::Skip
                        }
                        Err(msg) => return Err(self.error(position, msg)),
                    }
                } else if is_stop && self.mode == ParseMode::Lenient {
                    // A message without <|message|>: keep the header as metadata and the rest as
                    // text (openai-harmony's non-strict behaviour), if the role is known.
                    if let Some(role) = self.next_role.take() {
                        if !header_tokens.is_empty() {
                            let decoded = self.tok.decode_lossy_known(&header_tokens);
                            if let Ok((header, rest)) =
                                parse_header_string(decoded, Some(role), false)
                            {
                                self.push_message(header, rest.unwrap_or_default());
                            }
                        }
                    }
                    self.stopped_by = Some(token);
                    State::ExpectStart
                } else if is_stop {
                    return Err(self.error(
                        position,
                        format!("stop token {token} inside a message header (no <|message|> seen)"),
                    ));
                } else {
                    header_tokens.push(token);
                    State::Header(header_tokens)
                }
            }
            State::Content {
                header,
                mut text,
                mut pending,
            } => {
                if is_stop {
                    if !pending.is_empty() {
                        text.push_str(&String::from_utf8_lossy(&pending));
                    }
                    self.push_message(header, text);
                    self.stopped_by = Some(token);
                    State::ExpectStart
                } else {
                    if self.tok.token_bytes_into(token, &mut pending).is_none() {
                        if self.mode == ParseMode::Strict {
                            return Err(HarmonyError::UnknownToken {
                                id: token,
                                position,
                            });
                        }
                        pending.extend_from_slice(REPLACEMENT.as_bytes());
                    }
                    let delta = drain_utf8(&mut pending);
                    if !delta.is_empty() {
                        text.push_str(&delta);
                        self.last_delta = Some(delta);
                    }
                    State::Content {
                        header,
                        text,
                        pending,
                    }
                }
            }
            State::Skip => {
                if is_stop {
                    self.stopped_by = Some(token);
                    State::ExpectStart
                } else {
                    State::Skip
                }
            }
        };
        Ok(self)
    }

    /// Feeds a sequence of tokens.
    pub fn process_all(&mut self, tokens: impl IntoIterator<Item = u32>) -> Result<&mut Self> {
        for t in tokens {
            self.process(t)?;
        }
        Ok(self)
    }

    /// Signals the end of the sequence (e.g. generation hit max tokens). A message whose
    /// content had started is completed with the text so far and [`truncated`](Self::truncated)
    /// becomes true. An unfinished header is an error in strict mode and dropped in lenient mode.
    pub fn process_eos(&mut self) -> Result<&mut Self> {
        self.last_delta = None;
        let position = self.tokens.len();
        let state = std::mem::replace(&mut self.state, State::ExpectStart);
        match state {
            State::ExpectStart => {}
            State::Header(h) => {
                self.truncated = true;
                if self.mode == ParseMode::Strict {
                    return Err(self.error(
                        position,
                        format!(
                            "end of sequence inside a message header ({} header tokens)",
                            h.len()
                        ),
                    ));
                }
            }
            State::Content {
                header,
                mut text,
                pending,
            } => {
                self.truncated = true;
                text.push_str(&String::from_utf8_lossy(&pending));
                self.push_message(header, text);
            }
            State::Skip => self.truncated = true,
        }
        Ok(self)
    }

    fn push_message(&mut self, header: ParsedHeader, text: String) {
        self.messages.push(Message {
            author: header.author,
            recipient: header.recipient,
            channel: header.channel,
            content_type: header.content_type,
            content: vec![Content::Text(TextContent { text })],
        });
    }

    fn error(&self, position: usize, message: String) -> HarmonyError {
        HarmonyError::Parse { position, message }
    }

    fn parse_header_tokens(
        &self,
        tokens: &[u32],
        role: Option<Role>,
    ) -> std::result::Result<ParsedHeader, String> {
        let decoded = self
            .tok
            .decode(tokens)
            .map_err(|e| format!("could not decode header: {e}"))?;
        let (header, rest) = parse_header_string(decoded, role, true)?;
        if let Some(rest) = rest {
            return Err(format!(
                "unexpected tokens remaining in message header: {rest:?}"
            ));
        }
        Ok(header)
    }

    /// All completed messages.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Consumes the parser, returning the completed messages.
    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }

    /// All tokens fed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Text decoded by the last `process` call (for live display), if any.
    pub fn last_content_delta(&self) -> Option<&str> {
        self.last_delta.as_deref()
    }

    /// Text of the message being parsed so far (empty between messages).
    pub fn current_content(&self) -> &str {
        match &self.state {
            State::Content { text, .. } => text,
            _ => "",
        }
    }

    /// Role of the current message (or the announced role before its header is parsed).
    pub fn current_role(&self) -> Option<Role> {
        match &self.state {
            State::Content { header, .. } => Some(header.author.role),
            _ => self.next_role,
        }
    }

    /// Channel of the current message.
    pub fn current_channel(&self) -> Option<&str> {
        match &self.state {
            State::Content { header, .. } => header.channel.as_deref(),
            _ => None,
        }
    }

    /// Recipient of the current message.
    pub fn current_recipient(&self) -> Option<&str> {
        match &self.state {
            State::Content { header, .. } => header.recipient.as_deref(),
            _ => None,
        }
    }

    /// Content type of the current message.
    pub fn current_content_type(&self) -> Option<&str> {
        match &self.state {
            State::Content { header, .. } => header.content_type.as_deref(),
            _ => None,
        }
    }

    /// True once `process_eos` arrived in the middle of a message (output cut off).
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The stop token that ended the last completed message (`<|return|>`, `<|end|>`, `<|call|>`).
    pub fn last_stop_token(&self) -> Option<u32> {
        self.stopped_by
    }
}

/// Parses a whole completion (then EOS) into messages.
pub fn parse_completion(
    tok: &HarmonyTokenizer,
    tokens: &[u32],
    role: Option<Role>,
    mode: ParseMode,
) -> Result<Vec<Message>> {
    let mut p = StreamParser::with_mode(tok.clone(), role, mode);
    p.process_all(tokens.iter().copied())?;
    p.process_eos()?;
    Ok(p.into_messages())
}

/// Moves the decodable prefix of `pending` into a string: valid UTF-8 is taken as is, each
/// invalid sequence becomes U+FFFD, and an incomplete sequence at the end is left waiting.
fn drain_utf8(pending: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut consumed = 0;
    loop {
        match std::str::from_utf8(&pending[consumed..]) {
            Ok(s) => {
                out.push_str(s);
                consumed = pending.len();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(
                    &pending[consumed..consumed + valid],
                ));
                consumed += valid;
                match e.error_len() {
                    Some(n) => {
                        out.push_str(REPLACEMENT);
                        consumed += n;
                    }
                    None => break,
                }
            }
        }
    }
    pending.drain(..consumed);
    out
}

impl HarmonyTokenizer {
    /// Lossy decode that skips unknown ids (used only for recovery paths).
    pub(crate) fn decode_lossy_known(&self, tokens: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            let _ = self.token_bytes_into(t, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// openai-harmony's header grammar: `{role}[ to={recipient}]<|channel|>{channel}[ [<|constrain|>]{type}]`
/// in any order of recipient and channel. Returns the header and any leftover words.
fn parse_header_string(
    mut header: String,
    role: Option<Role>,
    parse_recipient_and_type: bool,
) -> std::result::Result<(ParsedHeader, Option<String>), String> {
    const CHANNEL: &str = "<|channel|>";
    const CONSTRAIN: &str = "<|constrain|>";
    let mut channel = None;
    if let Some(idx) = header.find(CHANNEL) {
        let after = &header[idx + CHANNEL.len()..];
        let end = after
            .find(|c: char| c.is_whitespace() || c == '<')
            .unwrap_or(after.len());
        let value = &after[..end];
        if value.is_empty() {
            return Err("channel marker present but no channel value found in header".into());
        }
        channel = Some(value.to_string());
        header = format!("{}{}", &header[..idx], &after[end..]);
    }
    header = header.trim().to_string();
    if header.contains(CONSTRAIN) {
        header = header
            .replace(CONSTRAIN, &format!(" {CONSTRAIN}"))
            .trim()
            .to_string();
    }
    let mut parts: Vec<&str> = header.split_ascii_whitespace().collect();
    let mut role_str = None;
    let role = match role {
        Some(r) => r,
        None => {
            let first = *parts
                .first()
                .ok_or("message header did not contain a role")?;
            role_str = Some(first.to_string());
            match Role::parse(first) {
                Some(r) => r,
                None if parts.len() > 1 || first.starts_with("to=") => {
                    parts.remove(0);
                    Role::Tool
                }
                None => return Err(format!("unknown role: {first}")),
            }
        }
    };
    if parts.first() == Some(&role.as_str()) {
        parts.remove(0);
    }
    let mut recipient = None;
    let mut content_type = None;
    if parse_recipient_and_type && !parts.is_empty() {
        let n = parts.len();
        if let Some(last) = parts.pop() {
            if let Some(r) = last.strip_prefix("to=") {
                recipient = Some(r.to_string());
            } else if n == 1 {
                recipient = Some(last.to_string());
            } else {
                content_type = Some(last.to_string());
                if let Some(raw) = parts.pop() {
                    recipient = Some(raw.strip_prefix("to=").unwrap_or(raw).to_string());
                }
            }
        }
    }
    let rest = (!parts.is_empty()).then(|| parts.join(" "));
    let author = Author {
        role,
        name: if role == Role::Tool { role_str } else { None },
    };
    Ok((
        ParsedHeader {
            author,
            recipient,
            channel,
            content_type,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_keeps_incomplete_tail() {
        let mut p = vec![b'a', 0xE2, 0x82];
        assert_eq!(drain_utf8(&mut p), "a");
        assert_eq!(p, vec![0xE2, 0x82]);
        p.push(0xAC);
        assert_eq!(drain_utf8(&mut p), "€");
        let mut bad = vec![0xFF, b'x', 0xFF, 0xFF];
        assert_eq!(drain_utf8(&mut bad), "\u{FFFD}x\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn header_grammar() {
        let (h, rest) = parse_header_string(
            "assistant to=functions.f<|channel|>commentary <|constrain|>json".into(),
            None,
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(rest.is_none());
        assert_eq!(h.recipient.as_deref(), Some("functions.f"));
        assert_eq!(h.channel.as_deref(), Some("commentary"));
        assert_eq!(h.content_type.as_deref(), Some("<|constrain|>json"));
    }
}
