//! Chatting with a (fine-tuned) model the way the cookbook does after training: the HF chat
//! template with a generation prompt (system `"reasoning language: X"`, user prompt), sampling
//! with a KV cache, and a lenient harmony streaming parser that reports every content delta with
//! its channel as it is generated.

use gptoss_harmony::hf::{render_ids, ChatMessage, ChatTemplateOptions};
use gptoss_harmony::{HarmonyTokenizer, ParseMode, Role, StreamParser};
use gptoss_model::{
    generate_batch, BatchOptions, GenerationConfig, GenerationEvent, GenerationRequest,
    GptOssForCausalLM,
};

use crate::error::{Result, SftError};
use crate::preprocess::DEFAULT_TEMPLATE_DATE;

/// The cookbook's sampling settings: `max_new_tokens` 512, temperature 0.6, no top-p/top-k,
/// stopping at `<|return|>` / `<|call|>`.
pub fn cookbook_generation_config() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 512,
        temperature: 0.6,
        top_p: 1.0,
        top_k: 0,
        ..GenerationConfig::default()
    }
}

/// The generated reply, split by channel.
#[derive(Debug, Clone, Default)]
pub struct ChatReply {
    /// Text of the `analysis` channel (chain of thought).
    pub analysis: String,
    /// Text of the `final` channel (the answer).
    pub final_text: String,
    /// Text outside any recognizable channel (e.g. an untrained model's output).
    pub other: String,
    /// All generated token ids.
    pub tokens: Vec<u32>,
}

/// The prompt ids of `[system: "reasoning language: {lang}", user: prompt]` with the template's
/// generation prompt (`<|start|>assistant`), dated `date` (default: the trainer's fixed date).
pub fn chat_prompt(
    tok: &HarmonyTokenizer,
    reasoning_language: &str,
    prompt: &str,
    date: Option<&str>,
) -> Result<Vec<u32>> {
    let messages = [
        ChatMessage::system(format!("reasoning language: {reasoning_language}")),
        ChatMessage::user(prompt),
    ];
    let opts = ChatTemplateOptions::new(date.unwrap_or(DEFAULT_TEMPLATE_DATE))
        .with_generation_prompt(true);
    Ok(render_ids(tok, &messages, &opts)?)
}

/// Generates a reply to `prompt_ids` and calls `on_delta(channel, text)` for every piece of
/// content as it is decoded (`channel` is `"analysis"`, `"final"`, ... or `""` when unknown).
pub fn chat_generate(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    prompt_ids: &[u32],
    cfg: GenerationConfig,
    on_delta: &mut dyn FnMut(&str, &str),
) -> Result<ChatReply> {
    let request = GenerationRequest {
        prompt: prompt_ids.to_vec(),
        config: cfg,
    };
    let mut replies =
        chat_generate_batch(model, tok, &[request], 1, &mut |_, c, d| on_delta(c, d))?;
    replies
        .pop()
        .ok_or_else(|| SftError::Trainer("generation: no reply".into()))
}

/// Replies to many requests with continuous batching ([`gptoss_model::generate_batch`], at most
/// `max_batch` decoding together), each parsed by its own harmony stream parser:
/// `on_delta(request, channel, text)` reports every content delta of every sequence as it is
/// decoded. Replies are in request order.
pub fn chat_generate_batch(
    model: &GptOssForCausalLM,
    tok: &HarmonyTokenizer,
    requests: &[GenerationRequest],
    max_batch: usize,
    on_delta: &mut dyn FnMut(usize, &str, &str),
) -> Result<Vec<ChatReply>> {
    let mut parsers: Vec<StreamParser> = requests
        .iter()
        .map(|_| StreamParser::with_mode(tok.clone(), Some(Role::Assistant), ParseMode::Lenient))
        .collect();
    let mut failed: Option<SftError> = None;
    let opts = BatchOptions {
        max_batch,
        pad_token_id: requests
            .first()
            .map_or(BatchOptions::default().pad_token_id, |r| {
                r.config.pad_token_id
            }),
    };
    let outputs = generate_batch(model, requests, &opts, &mut |e| {
        let GenerationEvent::Token { request, token } = e else {
            return;
        };
        let parser = &mut parsers[request];
        if failed.is_some() {
            return;
        }
        match parser.process(token) {
            Ok(_) => {
                if let Some(delta) = parser.last_content_delta() {
                    let channel = parser.current_channel().unwrap_or("").to_string();
                    on_delta(request, &channel, delta);
                }
            }
            Err(err) => failed = Some(err.into()),
        }
    })
    .map_err(|e| SftError::Trainer(format!("generation: {e}")))?;
    if let Some(err) = failed {
        return Err(err);
    }
    parsers
        .into_iter()
        .zip(outputs)
        .map(|(parser, out)| reply_of(tok, parser, out.tokens))
        .collect()
}

/// The reply of one finished sequence: its parsed messages sorted by channel.
fn reply_of(
    tok: &HarmonyTokenizer,
    mut parser: StreamParser,
    tokens: Vec<u32>,
) -> Result<ChatReply> {
    parser.process_eos()?;
    let mut reply = ChatReply {
        tokens,
        ..ChatReply::default()
    };
    for m in parser.messages() {
        let text = m.text();
        match m.channel.as_deref() {
            Some("analysis") => reply.analysis.push_str(&text),
            Some("final") => reply.final_text.push_str(&text),
            _ => reply.other.push_str(&text),
        }
    }
    if reply.analysis.is_empty() && reply.final_text.is_empty() && reply.other.is_empty() {
        reply.other = tok.decode_lossy(&reply.tokens)?;
    }
    Ok(reply)
}

/// An `on_delta` callback for [`chat_generate`] that streams the reply to stdout, printing a
/// `[channel]` header whenever the channel changes (`[?]` for content outside any channel).
pub fn print_channel_deltas() -> impl FnMut(&str, &str) {
    let mut last_channel: Option<String> = None;
    move |channel, delta| {
        use std::io::Write;
        if last_channel.as_deref() != Some(channel) {
            print!("\n[{}] ", if channel.is_empty() { "?" } else { channel });
            last_channel = Some(channel.to_string());
        }
        print!("{delta}");
        let _ = std::io::stdout().flush();
    }
}
