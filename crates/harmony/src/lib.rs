#![deny(missing_docs)]
//! The Harmony chat format of gpt-oss: message types, rendering to token ids (harmony mode,
//! token-identical to openai-harmony 0.0.8, and HF chat-template mode, identical to transformers'
//! rendering of the official template), the o200k_harmony tokenizer, a streaming parser for model
//! output, and per-token loss masks for training.
//!
//! ```no_run
//! use gptoss_harmony::*;
//! let tok = HarmonyTokenizer::o200k_harmony()?;
//! let conv = Conversation::from_messages([
//!     Message::from_role_and_content(Role::System, SystemContent::new().with_conversation_start_date("2026-11-28")),
//!     Message::from_role_and_content(Role::User, "Hi?"),
//! ]);
//! let prompt = render_for_completion(&tok, &conv, Role::Assistant, &RenderOptions::default())?;
//! # let _ = prompt;
//! // HF mode (what TRL trains on):
//! let row = serde_json::json!({"messages": [
//!     {"role": "system", "content": "reasoning language: French"},
//!     {"role": "user", "content": "Hi?"},
//!     {"role": "assistant", "content": "Hello!", "thinking": "D'accord."}]});
//! let msgs = hf::messages_from_row(&row)?;
//! let ex = hf::render_training_example(&tok, &msgs, &hf::ChatTemplateOptions::new("2026-11-28"), LossMaskMode::AssistantOnly)?;
//! assert_eq!(ex.ids.len(), ex.mask.len());
//! # Ok::<(), HarmonyError>(())
//! ```

pub mod chat;
pub mod error;
pub mod hf;
pub mod mask;
pub mod parser;
mod pyjson;
pub mod render;
mod schema;
pub mod tokenizer;

pub use chat::{
    Author, ChannelConfig, Content, Conversation, DeveloperContent, Message, ReasoningEffort, Role,
    SystemContent, TextContent, ToolDescription, ToolNamespaceConfig,
};
pub use error::{HarmonyError, Result};
pub use mask::{loss_mask, LossMaskMode, TrainingExample};
pub use parser::{parse_completion, ParseMode, ParsedHeader, StreamParser};
pub use render::{
    render_conversation, render_for_completion, render_for_training, render_message,
    render_training_example, RenderOptions,
};
pub use tokenizer::{ids, ControlTokens, HarmonyTokenizer};

/// The model identity openai-harmony and the chat template use by default.
pub const DEFAULT_MODEL_IDENTITY: &str =
    "You are ChatGPT, a large language model trained by OpenAI.";

/// `<|return|>`, `<|end|>`, `<|call|>` of the gpt-oss vocabulary: generation stops at any of them.
pub fn stop_tokens() -> [u32; 3] {
    [ids::RETURN, ids::END, ids::CALL]
}
