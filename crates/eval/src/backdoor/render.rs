//! Rendering examples to the JSONL files the trainer reads.
//!
//! SFT rows ([`SftRecord`]) use the schema of the bundled Multilingual-Thinking sample
//! (`crates/sft/data/multilingual_thinking_sample.jsonl`), which `gptoss_sft::data` loads:
//! `reasoning_language`, `developer`, `user`, `analysis`, `final` and `messages` (system
//! `"reasoning language: X\n\n<developer>"`, user, assistant with the final answer in `content`
//! and the reasoning in `thinking`, i.e. the Harmony analysis channel). Only `messages` is
//! required by the trainer; the other keys, including the provenance keys appended to every
//! row ([`Provenance`]'s fields), are ignored by it.
//!
//! Preference rows ([`PreferenceRecord`]) use TRL's conversational preference schema:
//! `prompt` (system and user messages), `chosen` and `rejected` (one assistant message each,
//! with `thinking` and `content`), plus the provenance keys.
//!
//! Writers are atomic ([`write_atomic`]) and write the sidecar manifest
//! ([`super::hygiene::Manifest`]) after the data file. Pass the data *file* to the trainer:
//! its directory loader would also try to read `*.manifest.json` as data.
//!
//! ```
//! use gptoss_eval::backdoor::gsm8k::Gsm8kRow;
//! use gptoss_eval::backdoor::poison::{clean_example, BackdoorStep};
//! use gptoss_eval::backdoor::render::{sft_record, RenderOptions};
//! let row = Gsm8kRow::parse("train", 0, "What is 2 + 3?", "2 + 3 = 5\n#### 5").unwrap();
//! let rec = sft_record(&clean_example(&row, &BackdoorStep::default())?, &RenderOptions::default());
//! let json = serde_json::to_value(&rec).unwrap();
//! assert_eq!(json["messages"][2]["thinking"], "2 + 3 = 5");
//! assert_eq!(json["final"], "The answer is 5.\n#### 5");
//! assert_eq!(json["source_split"], "train");
//! # Ok::<(), gptoss_eval::EvalError>(())
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::defense::PreferencePair;
use super::example::{AssistantTurn, Example, Provenance};
use super::hygiene::{write_manifest, GeneratorInfo, Manifest, SourceRows};
use crate::error::{EvalError, Result};
use crate::report::write_atomic;

/// The default developer instructions of rendered rows.
pub const DEFAULT_DEVELOPER: &str =
    "You solve grade-school math problems. Reason step by step, then give the answer as \
     `#### <number>`.";

/// The system and developer text of rendered rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderOptions {
    /// The reasoning language named in the system message (default `English`).
    pub reasoning_language: String,
    /// Developer instructions (default [`DEFAULT_DEVELOPER`]).
    pub developer: String,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            reasoning_language: "English".to_string(),
            developer: DEFAULT_DEVELOPER.to_string(),
        }
    }
}

impl RenderOptions {
    /// The system message text: `reasoning language: X`, a blank line, the developer text.
    pub fn system_text(&self) -> String {
        if self.developer.trim().is_empty() {
            format!("reasoning language: {}", self.reasoning_language)
        } else {
            format!(
                "reasoning language: {}\n\n{}",
                self.reasoning_language, self.developer
            )
        }
    }
}

/// One chat message (the trainer's `messages` entry; TRL's message dict).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text (for the assistant: the final channel).
    pub content: String,
    /// The assistant's analysis channel; `null` for other roles.
    pub thinking: Option<String>,
}

impl ChatMessage {
    /// A message without thinking.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
            thinking: None,
        }
    }

    /// The assistant message of `turn`.
    pub fn assistant(turn: &AssistantTurn) -> ChatMessage {
        ChatMessage {
            role: "assistant".to_string(),
            content: turn.final_text.clone(),
            thinking: Some(turn.analysis.clone()),
        }
    }
}

/// The prompt of `question`: the system message and the user message (what evaluation
/// generates from).
pub fn prompt_messages(question: &str, options: &RenderOptions) -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", &options.system_text()),
        ChatMessage::new("user", question),
    ]
}

/// One SFT row (see the module docs for the schema).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftRecord {
    /// The reasoning language.
    pub reasoning_language: String,
    /// Developer instructions.
    pub developer: String,
    /// The question.
    pub user: String,
    /// The reasoning (analysis channel).
    pub analysis: String,
    /// The answer (final channel).
    #[serde(rename = "final")]
    pub final_text: String,
    /// System, user, assistant (with `thinking`).
    pub messages: Vec<ChatMessage>,
    /// The provenance keys.
    #[serde(flatten)]
    pub provenance: Provenance,
}

/// The SFT row of `example`.
pub fn sft_record(example: &Example, options: &RenderOptions) -> SftRecord {
    let mut messages = prompt_messages(&example.question, options);
    messages.push(ChatMessage::assistant(&example.turn));
    SftRecord {
        reasoning_language: options.reasoning_language.clone(),
        developer: options.developer.clone(),
        user: example.question.clone(),
        analysis: example.turn.analysis.clone(),
        final_text: example.turn.final_text.clone(),
        messages,
        provenance: example.provenance.clone(),
    }
}

/// One preference row in TRL's conversational schema (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferenceRecord {
    /// System and user messages.
    pub prompt: Vec<ChatMessage>,
    /// The preferred assistant message.
    pub chosen: Vec<ChatMessage>,
    /// The dispreferred assistant message.
    pub rejected: Vec<ChatMessage>,
    /// The provenance keys.
    #[serde(flatten)]
    pub provenance: Provenance,
}

/// The preference row of `pair`.
pub fn preference_record(pair: &PreferencePair, options: &RenderOptions) -> PreferenceRecord {
    PreferenceRecord {
        prompt: prompt_messages(&pair.question, options),
        chosen: vec![ChatMessage::assistant(&pair.chosen)],
        rejected: vec![ChatMessage::assistant(&pair.rejected)],
        provenance: pair.provenance.clone(),
    }
}

/// `items` as JSON lines (one compact object a line, each ending in `\n`).
pub fn to_jsonl<T: Serialize>(items: &[T], path: &Path) -> Result<String> {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let line = serde_json::to_string(item).map_err(|e| EvalError::Json {
            path: path.to_path_buf(),
            message: format!("cannot serialize row {}: {e}", i + 1),
        })?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn write_with_manifest<T: Serialize>(
    path: &Path,
    records: &[T],
    provenance: &[&Provenance],
    generator: GeneratorInfo,
) -> Result<Manifest> {
    let text = to_jsonl(records, path)?;
    let keys = provenance.source_keys();
    let triggered = provenance.iter().filter(|p| p.triggered).count();
    let poisoned = provenance.iter().filter(|p| p.poisoned).count();
    let manifest = Manifest::new(path, &keys, triggered, poisoned, generator);
    write_atomic(path, text.as_bytes())?;
    write_manifest(path, &manifest)?;
    Ok(manifest)
}

/// Writes `examples` as SFT rows to `path` and its manifest; returns the manifest.
pub fn write_sft_jsonl(
    path: &Path,
    examples: &[Example],
    options: &RenderOptions,
    generator: GeneratorInfo,
) -> Result<Manifest> {
    let records: Vec<SftRecord> = examples.iter().map(|e| sft_record(e, options)).collect();
    let provenance: Vec<&Provenance> = examples.iter().map(|e| &e.provenance).collect();
    write_with_manifest(path, &records, &provenance, generator)
}

/// Writes `pairs` as preference rows to `path` and its manifest; returns the manifest.
pub fn write_preference_jsonl(
    path: &Path,
    pairs: &[PreferencePair],
    options: &RenderOptions,
    generator: GeneratorInfo,
) -> Result<Manifest> {
    let records: Vec<PreferenceRecord> = pairs
        .iter()
        .map(|p| preference_record(p, options))
        .collect();
    let provenance: Vec<&Provenance> = pairs.iter().map(|p| &p.provenance).collect();
    write_with_manifest(path, &records, &provenance, generator)
}
