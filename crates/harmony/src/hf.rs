//! HF chat-template mode: the dataset `messages` form (`[{role, content, thinking}]`) rendered
//! exactly as transformers renders the official gpt-oss chat template.
//!
//! The template file (`gpt-oss-chat-template.jinja`, byte-identical to the one on the Hub) is
//! rendered verbatim with minijinja, configured like transformers' jinja2 environment
//! (`trim_blocks`, `lstrip_blocks`, a Python-compatible `tojson`, `raise_exception`,
//! `strftime_now`). The date is an explicit input: the wall clock is never read.
//!
//! Differences from transformers, all deliberate and tested:
//! - rows are validated first: an unknown role, a `thinking` on a non-assistant message, or an
//!   unknown `channel` is an error naming the message (the template would silently ignore them);
//! - in [`render_ids`], `content` and `thinking` text is always ordinary text: a literal
//!   `"<|end|>"` in a message is tokenized as characters, while transformers' tokenizer would
//!   turn it into the control token. The rendered *string* is identical either way.

use std::ops::Range;
use std::sync::OnceLock;

use minijinja::value::{from_args, ValueKind};
use minijinja::{Environment, ErrorKind, State, Value as JValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::chat::ReasoningEffort;
use crate::error::{HarmonyError, Result};
pub use crate::mask::TrainingExample;
use crate::mask::{loss_mask, LossMaskMode};
use crate::pyjson;
use crate::tokenizer::HarmonyTokenizer;

/// The official gpt-oss chat template (sha256 a4c9919c…7c8146).
pub const CHAT_TEMPLATE: &str = include_str!("gpt-oss-chat-template.jinja");

const OPEN: char = '\u{FDD0}';
const CLOSE: char = '\u{FDD1}';
const DATE_VAR: &str = "__gptoss_date";

/// One message of a dataset row (HF `messages` schema).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Chain of thought of an assistant message (rendered on the analysis channel of the last
    /// assistant turn only). `reasoning_content` and `reasoning` are accepted as aliases, as in
    /// transformers. `null` means absent.
    #[serde(
        default,
        alias = "reasoning_content",
        alias = "reasoning",
        skip_serializing_if = "Option::is_none"
    )]
    pub thinking: Option<String>,
    /// Tool calls of an assistant message (`{"name", "arguments"}` or
    /// `{"type": "function", "function": {...}}`; the template uses only the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// Optional channel annotation (`analysis`, `commentary`, `final`); validated, not rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

impl ChatMessage {
    /// A message with a role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(content.into()),
            ..Default::default()
        }
    }
    /// A system message (becomes the developer "# Instructions" block).
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
    /// A tool result.
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new("tool", content)
    }
    /// An assistant tool call (`arguments` is rendered with `tojson`).
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Self {
        Self {
            role: "assistant".into(),
            tool_calls: Some(vec![json!({"name": name.into(), "arguments": arguments})]),
            ..Default::default()
        }
    }
    /// Sets `thinking`.
    pub fn with_thinking(mut self, thinking: impl Into<String>) -> Self {
        self.thinking = Some(thinking.into());
        self
    }
}

/// Template inputs besides the messages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatTemplateOptions {
    /// `Current date: …` (the template's `strftime_now("%Y-%m-%d")`), e.g. `"2026-11-28"`.
    pub date: String,
    /// `Reasoning: …`; the template's default is medium.
    #[serde(default)]
    pub reasoning_effort: Option<ReasoningEffort>,
    /// First line of the system message; the template's default is
    /// [`DEFAULT_MODEL_IDENTITY`](crate::DEFAULT_MODEL_IDENTITY).
    #[serde(default)]
    pub model_identity: Option<String>,
    /// Append `<|start|>assistant` (inference). With false, the last assistant message ends in
    /// `<|return|>` and keeps its thinking (training).
    #[serde(default)]
    pub add_generation_prompt: bool,
    /// Function tools (JSON schemas, `{"type": "function", "function": {...}}`).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Built-in tools: `"browser"` and/or `"python"`.
    #[serde(default)]
    pub builtin_tools: Option<Vec<String>>,
}

impl ChatTemplateOptions {
    /// Options with the given date and the template's defaults otherwise.
    pub fn new(date: impl Into<String>) -> Self {
        Self {
            date: date.into(),
            reasoning_effort: None,
            model_identity: None,
            add_generation_prompt: false,
            tools: None,
            builtin_tools: None,
        }
    }
    /// Sets the reasoning effort.
    pub fn with_reasoning_effort(mut self, effort: ReasoningEffort) -> Self {
        self.reasoning_effort = Some(effort);
        self
    }
    /// Sets the model identity.
    pub fn with_model_identity(mut self, identity: impl Into<String>) -> Self {
        self.model_identity = Some(identity.into());
        self
    }
    /// Sets `add_generation_prompt`.
    pub fn with_generation_prompt(mut self, yes: bool) -> Self {
        self.add_generation_prompt = yes;
        self
    }
    /// Sets the function tools.
    pub fn with_tools(mut self, tools: Vec<Value>) -> Self {
        self.tools = Some(tools);
        self
    }
}

/// Reads the `messages` column of a dataset row (a JSON object), naming the message at fault.
pub fn messages_from_row(row: &Value) -> Result<Vec<ChatMessage>> {
    let list = row
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| HarmonyError::InvalidRow {
            index: 0,
            field: "messages".into(),
            message: "the row has no `messages` list".into(),
        })?;
    list.iter()
        .enumerate()
        .map(|(index, m)| {
            ChatMessage::deserialize(m).map_err(|e| HarmonyError::InvalidRow {
                index,
                field: "*".into(),
                message: e.to_string(),
            })
        })
        .collect()
}

/// Checks a row: known roles and channels, thinking only on assistant messages.
pub fn validate(messages: &[ChatMessage]) -> Result<()> {
    let bad = |index: usize, field: &str, message: String| HarmonyError::InvalidRow {
        index,
        field: field.into(),
        message,
    };
    if messages.is_empty() {
        return Err(bad(
            0,
            "messages",
            "a conversation needs at least one message".into(),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(bad(
                i,
                "role",
                format!(
                    "unknown role {:?}; expected system, developer, user, assistant or tool",
                    m.role
                ),
            ));
        }
        if m.thinking.is_some() && m.role != "assistant" {
            return Err(bad(
                i,
                "thinking",
                format!(
                    "only assistant messages may carry thinking, found it on a {} message",
                    m.role
                ),
            ));
        }
        if let Some(c) = &m.channel {
            if !["analysis", "commentary", "final"].contains(&c.as_str()) {
                return Err(bad(
                    i,
                    "channel",
                    format!("unknown channel {c:?}; expected analysis, commentary or final"),
                ));
            }
        }
        for (field, text) in [("content", &m.content), ("thinking", &m.thinking)] {
            if text.as_deref().is_some_and(|t| t.contains([OPEN, CLOSE])) {
                return Err(bad(
                    i,
                    field,
                    "contains the reserved noncharacters U+FDD0/U+FDD1".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Renders messages to the exact string transformers produces with the official template.
pub fn render_messages(messages: &[ChatMessage], opts: &ChatTemplateOptions) -> Result<String> {
    Ok(render_marked(messages, opts)?.0)
}

/// Renders messages to token ids: the template's control tokens become ids, all other text is
/// encoded as ordinary text (message text never turns into control tokens).
pub fn render_ids(
    tok: &HarmonyTokenizer,
    messages: &[ChatMessage],
    opts: &ChatTemplateOptions,
) -> Result<Vec<u32>> {
    let (text, protected) = render_marked(messages, opts)?;
    let mut ids = Vec::with_capacity(text.len() / 3);
    let mut rest = 0;
    let mut p = protected.iter().peekable();
    for (start, end, id) in tok.find_specials(&text) {
        while p.peek().is_some_and(|r| r.end <= start) {
            p.next();
        }
        if p.peek().is_some_and(|r| r.start < end) {
            continue; // inside message text: stays ordinary
        }
        tok.encode_into(&text[rest..start], &mut ids)?;
        ids.push(id);
        rest = end;
    }
    tok.encode_into(&text[rest..], &mut ids)?;
    Ok(ids)
}

/// Renders a dataset row into token ids and a loss mask (what the SFT trainer consumes).
pub fn render_training_example(
    tok: &HarmonyTokenizer,
    messages: &[ChatMessage],
    opts: &ChatTemplateOptions,
    mode: LossMaskMode,
) -> Result<TrainingExample> {
    let ids = render_ids(tok, messages, opts)?;
    let mask = loss_mask(tok, &ids, mode);
    Ok(TrainingExample { ids, mask })
}

/// Renders with message text wrapped in sentinels; returns the clean string and the byte
/// ranges (in it) that came from message `content`/`thinking`.
fn render_marked(
    messages: &[ChatMessage],
    opts: &ChatTemplateOptions,
) -> Result<(String, Vec<Range<usize>>)> {
    validate(messages)?;
    let env = environment()
        .as_ref()
        .map_err(|e| HarmonyError::Template(e.clone()))?;
    let wrap = |s: &Option<String>| {
        s.as_ref().map(|t| {
            if t.is_empty() {
                t.clone()
            } else {
                format!("{OPEN}{t}{CLOSE}")
            }
        })
    };
    let msgs: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut o = Map::new();
            o.insert("role".into(), Value::String(m.role.clone()));
            if let Some(c) = wrap(&m.content) {
                o.insert("content".into(), Value::String(c));
            }
            if let Some(t) = wrap(&m.thinking) {
                o.insert("thinking".into(), Value::String(t));
            }
            if let Some(tc) = &m.tool_calls {
                o.insert("tool_calls".into(), Value::Array(tc.clone()));
            }
            Value::Object(o)
        })
        .collect();
    let mut ctx = Map::new();
    ctx.insert("messages".into(), Value::Array(msgs));
    ctx.insert(
        "add_generation_prompt".into(),
        Value::Bool(opts.add_generation_prompt),
    );
    ctx.insert(DATE_VAR.into(), Value::String(opts.date.clone()));
    if let Some(t) = &opts.tools {
        ctx.insert("tools".into(), Value::Array(t.clone()));
    }
    if let Some(b) = &opts.builtin_tools {
        ctx.insert("builtin_tools".into(), json!(b));
    }
    if let Some(e) = opts.reasoning_effort {
        ctx.insert("reasoning_effort".into(), Value::String(e.as_str().into()));
    }
    if let Some(m) = &opts.model_identity {
        ctx.insert("model_identity".into(), Value::String(m.clone()));
    }
    let tmpl = env
        .get_template("gpt-oss")
        .map_err(|e| HarmonyError::Template(e.to_string()))?;
    let marked = tmpl
        .render(JValue::from_serialize(Value::Object(ctx)))
        .map_err(|e| HarmonyError::Template(template_error_message(&e)))?;
    let mut clean = String::with_capacity(marked.len());
    let mut ranges = Vec::new();
    let mut open_at = None;
    for c in marked.chars() {
        match c {
            OPEN => open_at = Some(clean.len()),
            CLOSE => {
                if let Some(s) = open_at.take() {
                    ranges.push(s..clean.len());
                }
            }
            c => clean.push(c),
        }
    }
    Ok((clean, ranges))
}

fn template_error_message(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    }
}

fn environment() -> &'static std::result::Result<Environment<'static>, String> {
    static ENV: OnceLock<std::result::Result<Environment<'static>, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_filter(
            "tojson",
            |v: JValue| -> std::result::Result<String, minijinja::Error> {
                if v.is_undefined() {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson of an undefined value",
                    ));
                }
                let j = serde_json::to_value(&v).map_err(|e| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                })?;
                Ok(pyjson::dumps(&j))
            },
        );
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function(
            "strftime_now",
            |state: &State, fmt: String| -> std::result::Result<String, minijinja::Error> {
                let date = state
                    .lookup(DATE_VAR)
                    .and_then(|d| d.as_str().map(str::to_string))
                    .ok_or_else(|| {
                        minijinja::Error::new(ErrorKind::InvalidOperation, "no date given")
                    })?;
                if fmt == "%Y-%m-%d" {
                    Ok(date)
                } else {
                    Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now({fmt:?}) is not supported; only %Y-%m-%d"),
                    ))
                }
            },
        );
        env.set_unknown_method_callback(|state, value, method, args| {
            if value.kind() == ValueKind::Map && method == "items" {
                let _: () = from_args(args)?;
                state.apply_filter("items", std::slice::from_ref(value))
            } else {
                Err(minijinja::Error::from(ErrorKind::UnknownMethod))
            }
        });
        env.add_template("gpt-oss", CHAT_TEMPLATE)
            .map_err(|e| e.to_string())?;
        Ok(env)
    })
}

/// Converts a dataset row to a harmony [`Conversation`](crate::Conversation) with the same
/// meaning, for harmony-mode rendering (e.g. generation prompts):
/// system header from `opts` (date, reasoning effort, model identity), the first
/// system/developer message → developer instructions (plus `opts.tools` as function tools),
/// `thinking` → an analysis message, `content` → a final message, a tool call → a commentary
/// message to `functions.{name}` with content type `<|constrain|>json`, and a tool result → a
/// message from `functions.{name}` to the assistant. Later system messages are dropped, as the
/// template drops them.
pub fn to_harmony_conversation(
    messages: &[ChatMessage],
    opts: &ChatTemplateOptions,
) -> Result<crate::Conversation> {
    use crate::chat::{
        Author, Conversation, DeveloperContent, Message, Role, SystemContent, ToolDescription,
    };
    validate(messages)?;
    let mut sys = SystemContent::new().with_conversation_start_date(opts.date.clone());
    if let Some(e) = opts.reasoning_effort {
        sys = sys.with_reasoning_effort(e);
    }
    if let Some(m) = &opts.model_identity {
        sys = sys.with_model_identity(m.clone());
    }
    for b in opts.builtin_tools.iter().flatten() {
        sys = match b.as_str() {
            "browser" => sys.with_browser_tool(),
            "python" => sys.with_python_tool(),
            _ => sys,
        };
    }
    let mut out = vec![Message::from_role_and_content(Role::System, sys)];
    let (instructions, rest) = match messages.first() {
        Some(m) if m.role == "system" || m.role == "developer" => {
            (m.content.clone().filter(|c| !c.is_empty()), &messages[1..])
        }
        _ => (None, messages),
    };
    let tools: Vec<ToolDescription> = opts
        .tools
        .iter()
        .flatten()
        .map(|t| {
            let f = t.get("function").unwrap_or(t);
            let s = |k: &str| {
                f.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            ToolDescription::new(s("name"), s("description"), f.get("parameters").cloned())
        })
        .collect();
    if instructions.is_some() || !tools.is_empty() {
        let mut dev = DeveloperContent::new();
        dev.instructions = instructions;
        if !tools.is_empty() {
            dev = dev.with_function_tools(tools);
        }
        out.push(Message::from_role_and_content(Role::Developer, dev));
    }
    let offset = messages.len() - rest.len();
    let mut last_call: Option<String> = None;
    for (i, m) in rest.iter().enumerate() {
        let text = m.content.clone().unwrap_or_default();
        match m.role.as_str() {
            "user" => out.push(Message::from_role_and_content(Role::User, text)),
            "assistant" => {
                if let Some(th) = &m.thinking {
                    out.push(
                        Message::from_role_and_content(Role::Assistant, th.clone())
                            .with_channel("analysis"),
                    );
                }
                if let Some(call) = m.tool_calls.as_ref().and_then(|c| c.first()) {
                    let f = call.get("function").unwrap_or(call);
                    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                        HarmonyError::InvalidRow {
                            index: offset + i,
                            field: "tool_calls".into(),
                            message: "the tool call has no name".into(),
                        }
                    })?;
                    if !text.is_empty() {
                        out.push(
                            Message::from_role_and_content(Role::Assistant, text)
                                .with_channel("analysis"),
                        );
                    }
                    let args = match f.get("arguments") {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => pyjson::dumps(v),
                        None => "{}".into(),
                    };
                    out.push(
                        Message::from_role_and_content(Role::Assistant, args)
                            .with_channel("commentary")
                            .with_recipient(format!("functions.{name}"))
                            .with_content_type("<|constrain|>json"),
                    );
                    last_call = Some(name.to_string());
                } else {
                    out.push(
                        Message::from_role_and_content(Role::Assistant, text).with_channel("final"),
                    );
                }
            }
            "tool" => {
                let name = last_call.clone().ok_or_else(|| HarmonyError::InvalidRow {
                    index: offset + i,
                    field: "role".into(),
                    message: "a tool message needs an earlier assistant tool call".into(),
                })?;
                out.push(
                    Message::from_author_and_content(
                        Author::new(Role::Tool, format!("functions.{name}")),
                        text,
                    )
                    .with_channel("commentary")
                    .with_recipient("assistant"),
                );
            }
            _ => {} // later system/developer messages: dropped, as in the template
        }
    }
    Ok(Conversation::from_messages(out))
}
