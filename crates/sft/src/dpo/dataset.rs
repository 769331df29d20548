//! TRL's preference schema: rows with `prompt`, `chosen` and `rejected`, each a string (plain
//! text) or a list of messages (conversational: `chosen`/`rejected` are the assistant turns that
//! follow the shared `prompt`). A conversational row without `prompt` has TRL's implicit prompt:
//! the messages `chosen` and `rejected` share at their start.
//!
//! Rows come from the crate's dataset readers ([`crate::data::source_files`],
//! [`crate::data::visit_records`]: JSONL / JSON / Parquet / a local HF hub cache). A bad row (a
//! missing or mistyped field, an empty completion, a mix of text and messages, an invalid
//! message) is skipped and listed with its file and 1-based row, or, with `strict`, is an error
//! naming them.
//!
//! ```
//! use gptoss_sft::dpo::dataset::{PreferenceRow, Turns};
//! let row = PreferenceRow::from_json(&serde_json::json!({
//!     "prompt": [{"role": "user", "content": "2 + 2?"}],
//!     "chosen": [{"role": "assistant", "content": "4"}],
//!     "rejected": [{"role": "assistant", "content": "5"}],
//! }))
//! .unwrap();
//! assert!(matches!(row.chosen, Turns::Messages(_)));
//! ```

use std::path::PathBuf;

use gptoss_harmony::hf::ChatMessage;
use serde_json::Value;

use crate::data::{skipped_listing, source_files, visit_records, SkippedRow};
use crate::error::{Result, SftError};

/// One field of a preference row: plain text or messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    /// Plain text (TRL's "standard" form).
    Text(String),
    /// Chat messages (TRL's "conversational" form).
    Messages(Vec<ChatMessage>),
}

impl Turns {
    fn parse(field: &str, v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) => Ok(Turns::Text(s.clone())),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let msg: ChatMessage = serde_json::from_value(m.clone())
                        .map_err(|e| format!("`{field}`[{i}] is not a message: {e}"))?;
                    if msg.role.is_empty() {
                        return Err(format!("`{field}`[{i}] has no role"));
                    }
                    Ok(msg)
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(Turns::Messages),
            Value::Null => Err(format!("`{field}` is null")),
            other => Err(format!(
                "`{field}` must be a string or a list of messages, got {}",
                json_kind(other)
            )),
        }
    }

    /// True when there is nothing to score: an empty string, no messages, or messages without
    /// any content, thinking or tool call.
    pub fn is_empty(&self) -> bool {
        match self {
            Turns::Text(s) => s.is_empty(),
            Turns::Messages(m) => m.iter().all(|m| {
                m.content.as_deref().unwrap_or("").is_empty()
                    && m.thinking.as_deref().unwrap_or("").is_empty()
                    && m.tool_calls.as_ref().is_none_or(|c| c.is_empty())
            }),
        }
    }

    fn is_messages(&self) -> bool {
        matches!(self, Turns::Messages(_))
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRow {
    /// The shared prompt.
    pub prompt: Turns,
    /// The preferred completion.
    pub chosen: Turns,
    /// The dispreferred completion.
    pub rejected: Turns,
}

impl PreferenceRow {
    /// Parses and checks one row (a JSON object); the error says what is wrong.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let Value::Object(obj) = v else {
            return Err(format!("a row must be an object, got {}", json_kind(v)));
        };
        let get = |k: &str| -> std::result::Result<Turns, String> {
            obj.get(k)
                .ok_or_else(|| format!("missing field `{k}`"))
                .and_then(|v| Turns::parse(k, v))
        };
        let chosen = get("chosen")?;
        let rejected = get("rejected")?;
        let prompt = match obj.get("prompt") {
            Some(p) => Turns::parse("prompt", p)?,
            None => return implicit_prompt(chosen, rejected),
        };
        let row = PreferenceRow {
            prompt,
            chosen,
            rejected,
        };
        row.validate()?;
        Ok(row)
    }

    /// Whether the row is conversational (messages) rather than plain text.
    pub fn is_conversational(&self) -> bool {
        self.prompt.is_messages()
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let forms = [
            self.prompt.is_messages(),
            self.chosen.is_messages(),
            self.rejected.is_messages(),
        ];
        if forms.iter().any(|&m| m != forms[0]) {
            return Err(
                "`prompt`, `chosen` and `rejected` must all be strings or all be lists of messages"
                    .into(),
            );
        }
        for (k, t) in [("chosen", &self.chosen), ("rejected", &self.rejected)] {
            if t.is_empty() {
                return Err(format!("empty completion `{k}`"));
            }
        }
        if let Turns::Messages(p) = &self.prompt {
            if p.is_empty() {
                return Err("`prompt` has no messages".into());
            }
            for (k, t) in [("chosen", &self.chosen), ("rejected", &self.rejected)] {
                let all: Vec<ChatMessage> = match t {
                    Turns::Messages(m) => p.iter().chain(m).cloned().collect(),
                    Turns::Text(_) => continue,
                };
                gptoss_harmony::hf::validate(&all).map_err(|e| format!("`prompt` + `{k}`: {e}"))?;
            }
        }
        Ok(())
    }
}

/// TRL's `extract_prompt` for conversational rows: the prompt is the messages `chosen` and
/// `rejected` share at their start.
fn implicit_prompt(chosen: Turns, rejected: Turns) -> std::result::Result<PreferenceRow, String> {
    let (Turns::Messages(c), Turns::Messages(r)) = (&chosen, &rejected) else {
        return Err(
            "missing field `prompt` (an implicit prompt needs `chosen` and `rejected` as messages)"
                .into(),
        );
    };
    let shared = c.iter().zip(r).take_while(|(a, b)| a == b).count();
    if shared == 0 {
        return Err("missing field `prompt`, and `chosen` and `rejected` share no message".into());
    }
    let row = PreferenceRow {
        prompt: Turns::Messages(c[..shared].to_vec()),
        chosen: Turns::Messages(c[shared..].to_vec()),
        rejected: Turns::Messages(r[shared..].to_vec()),
    };
    row.validate()?;
    Ok(row)
}

/// Preference rows loaded from one or more files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreferenceDataset {
    /// The valid rows, in file order.
    pub rows: Vec<PreferenceRow>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// The bad rows that were skipped (file, 1-based row, reason).
    pub skipped: Vec<SkippedRow>,
}

/// Loads preference rows from `spec`: a `.jsonl`/`.json`/`.parquet` file, a directory of them, or
/// an HF dataset id in the local hub cache (see [`crate::data::load_source`]).
///
/// # Errors
/// With `strict`, the first bad row as [`SftError::Row`] (file, row, reason); always when no row
/// is valid ([`SftError::Dataset`], listing the first reasons), or on unreadable files.
pub fn load_preferences(spec: &str, strict: bool) -> Result<PreferenceDataset> {
    let mut ds = PreferenceDataset::default();
    for file in source_files(spec)? {
        visit_records(&file, &mut |row, value| {
            match value.and_then(|v| PreferenceRow::from_json(&v)) {
                Ok(r) => ds.rows.push(r),
                Err(message) if strict => {
                    return Err(SftError::Row {
                        file: file.clone(),
                        row,
                        message,
                    })
                }
                Err(reason) => ds.skipped.push(SkippedRow {
                    file: file.clone(),
                    row,
                    reason,
                }),
            }
            Ok(())
        })?;
        ds.files.push(file);
    }
    if ds.rows.is_empty() {
        let why = if ds.skipped.is_empty() {
            "it has no rows".to_string()
        } else {
            skipped_listing(spec, &ds.skipped)
        };
        return Err(SftError::Dataset(format!(
            "`{spec}` has no valid preference row (each needs `prompt`, `chosen` and `rejected`, \
             all strings or all lists of messages); {why}"
        )));
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_forms_parse() {
        let t = PreferenceRow::from_json(&json!({"prompt": "Q", "chosen": " a", "rejected": " b"}))
            .unwrap();
        assert!(!t.is_conversational());
        let c = PreferenceRow::from_json(&json!({
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a", "thinking": "t"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }))
        .unwrap();
        assert!(c.is_conversational());
        let Turns::Messages(m) = &c.chosen else {
            panic!("messages expected")
        };
        assert_eq!(m[0].thinking.as_deref(), Some("t"));
    }

    #[test]
    fn implicit_prompt_is_the_shared_start() {
        let u = json!({"role": "user", "content": "q"});
        let r = PreferenceRow::from_json(&json!({
            "chosen": [u, {"role": "assistant", "content": "a"}],
            "rejected": [u, {"role": "assistant", "content": "b"}],
        }))
        .unwrap();
        assert_eq!(r.prompt, Turns::Messages(vec![ChatMessage::user("q")]));
        assert_eq!(r.chosen, Turns::Messages(vec![ChatMessage::assistant("a")]));
    }

    #[test]
    fn bad_rows_say_why() {
        let cases = [
            (
                json!({"prompt": "Q", "chosen": "a"}),
                "missing field `rejected`",
            ),
            (
                json!({"prompt": "Q", "chosen": "", "rejected": "b"}),
                "empty completion `chosen`",
            ),
            (
                json!({"prompt": "Q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}),
                "all be strings",
            ),
            (
                json!({"prompt": 3, "chosen": "a", "rejected": "b"}),
                "a number",
            ),
            (
                json!({"prompt": "Q", "chosen": null, "rejected": "b"}),
                "`chosen` is null",
            ),
            (
                json!({"prompt": [{"role": "user", "content": "q"}],
                       "chosen": [{"role": "assistant", "content": ""}],
                       "rejected": [{"role": "assistant", "content": "b"}]}),
                "empty completion `chosen`",
            ),
            (
                json!({"prompt": [{"role": "robot", "content": "q"}],
                       "chosen": [{"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "assistant", "content": "b"}]}),
                "unknown role",
            ),
            (
                json!({"chosen": "Q a", "rejected": "Q b"}),
                "missing field `prompt`",
            ),
            (json!([1, 2]), "must be an object"),
        ];
        for (v, want) in cases {
            let e = PreferenceRow::from_json(&v).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
