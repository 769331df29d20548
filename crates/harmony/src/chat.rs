//! Harmony message types (the shapes and JSON form of openai-harmony 0.0.8's `chat` module).
//!
//! Builders follow openai-harmony: `SystemContent::new().with_reasoning_effort(..)`,
//! `Message::from_role_and_content(Role::User, "hi").with_channel("final")`.
//! The serde form is the one openai-harmony reads and writes, so conversations can be
//! exchanged with it as JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user.
    User,
    /// The model.
    Assistant,
    /// The system header (identity, dates, reasoning effort, channels, built-in tools).
    System,
    /// The developer (instructions, function tools).
    Developer,
    /// A tool's answer; its author name is the tool (e.g. `functions.get_weather`).
    Tool,
}

impl Role {
    /// The role as rendered in a message header.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Developer => "developer",
            Role::Tool => "tool",
        }
    }

    /// Parses a header role; `None` for unknown roles.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            "developer" => Role::Developer,
            "tool" => Role::Tool,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role plus an optional name (tools are named: `functions.lookup_weather`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Author {
    /// The role.
    pub role: Role,
    /// Optional name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Author {
    /// A named author.
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self {
            role,
            name: Some(name.into()),
        }
    }
}

impl From<Role> for Author {
    fn from(role: Role) -> Self {
        Self { role, name: None }
    }
}

/// Reasoning effort announced in the system message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningEffort {
    /// `Reasoning: low`
    Low,
    /// `Reasoning: medium` (the default)
    Medium,
    /// `Reasoning: high`
    High,
}

impl ReasoningEffort {
    /// Lower-case name as rendered (`low`, `medium`, `high`).
    pub fn as_str(&self) -> &'static str {
        match self {
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

/// Valid channels announced in the system message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ChannelConfig {
    /// Channels the model may use; empty hides the line.
    pub valid_channels: Vec<String>,
    /// Adds "Channel must be included for every message."
    pub channel_required: bool,
}

impl ChannelConfig {
    /// Required channels, in this order.
    pub fn require_channels<I, T>(channels: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self {
            valid_channels: channels.into_iter().map(Into::into).collect(),
            channel_required: true,
        }
    }
}

/// One function tool: name, description and JSON-schema parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ToolDescription {
    /// Tool name.
    pub name: String,
    /// Description (each line becomes a `// ` comment).
    pub description: String,
    /// JSON schema of the parameters (rendered as a TypeScript type), if any.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

impl ToolDescription {
    /// A tool description.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        parameters: Option<serde_json::Value>,
    ) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            parameters,
        }
    }
}

/// A namespace of tools (`functions`, `browser`, `python`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ToolNamespaceConfig {
    /// Namespace name.
    pub name: String,
    /// Optional description.
    #[serde(default)]
    pub description: Option<String>,
    /// The tools.
    #[serde(default)]
    pub tools: Vec<ToolDescription>,
}

impl ToolNamespaceConfig {
    /// A namespace.
    pub fn new(
        name: impl Into<String>,
        description: Option<String>,
        tools: Vec<ToolDescription>,
    ) -> Self {
        Self {
            name: name.into(),
            description,
            tools,
        }
    }

    /// The built-in browser tool, word for word as openai-harmony defines it.
    pub fn browser() -> Self {
        ToolNamespaceConfig::new(
            "browser",
            Some("Tool for browsing.\nThe `cursor` appears in brackets before each browsing display: `[{cursor}]`.\nCite information from the tool using the following format:\n`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\nDo not quote more than 10 words directly from the tool output.\nsources=web (default: web)".to_string()),
            vec![
                ToolDescription::new(
                    "search",
                    "Searches for information related to `query` and displays `topn` results.",
                    Some(serde_json::json!({
                        "type": "object",
                        "properties": {
                            "query": {"type": "string"},
                            "topn": {"type": "number", "default": 10},
                            "source": {"type": "string"}
                        },
                        "required": ["query"]
                    })),
                ),
                ToolDescription::new(
                    "open",
                    "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.\nValid link ids are displayed with the formatting: `【{id}†.*】`.\nIf `cursor` is not provided, the most recent page is implied.\nIf `id` is a string, it is treated as a fully qualified URL associated with `source`.\nIf `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.\nUse this function without `id` to scroll to a new location of an opened page.",
                    Some(serde_json::json!({
                        "type": "object",
                        "properties": {
                            "id": {"type": ["number", "string"], "default": -1},
                            "cursor": {"type": "number", "default": -1},
                            "loc": {"type": "number", "default": -1},
                            "num_lines": {"type": "number", "default": -1},
                            "view_source": {"type": "boolean", "default": false},
                            "source": {"type": "string"}
                        }
                    })),
                ),
                ToolDescription::new(
                    "find",
                    "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
                    Some(serde_json::json!({
                        "type": "object",
                        "properties": {
                            "pattern": {"type": "string"},
                            "cursor": {"type": "number", "default": -1}
                        },
                        "required": ["pattern"]
                    })),
                ),
            ],
        )
    }

    /// The built-in python tool, word for word as openai-harmony defines it.
    pub fn python() -> Self {
        ToolNamespaceConfig::new(
            "python",
            Some("Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when creating plots, tables, or files).\n\nWhen you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster.".to_string()),
            vec![],
        )
    }
}

/// Content of the system message.
///
/// Defaults (as openai-harmony): identity "You are ChatGPT, a large language model trained by
/// OpenAI.", reasoning medium, knowledge cutoff 2024-06, channels analysis/commentary/final
/// required, **no conversation start date** (the wall clock is never read).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SystemContent {
    /// First line of the system message.
    #[serde(default)]
    pub model_identity: Option<String>,
    /// `Reasoning: …` line.
    #[serde(default)]
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Built-in tool namespaces (browser, python), ordered by name.
    #[serde(default)]
    pub tools: Option<BTreeMap<String, ToolNamespaceConfig>>,
    /// `Current date: …` (ISO date), only rendered when set.
    #[serde(default)]
    pub conversation_start_date: Option<String>,
    /// `Knowledge cutoff: …`
    #[serde(default)]
    pub knowledge_cutoff: Option<String>,
    /// Valid channels line.
    #[serde(default)]
    pub channel_config: Option<ChannelConfig>,
}

impl Default for SystemContent {
    fn default() -> Self {
        Self {
            model_identity: Some(crate::DEFAULT_MODEL_IDENTITY.to_string()),
            reasoning_effort: Some(ReasoningEffort::Medium),
            tools: None,
            conversation_start_date: None,
            knowledge_cutoff: Some("2024-06".to_string()),
            channel_config: Some(ChannelConfig::require_channels([
                "analysis",
                "commentary",
                "final",
            ])),
        }
    }
}

fn insert_namespace(
    map: &mut Option<BTreeMap<String, ToolNamespaceConfig>>,
    ns: ToolNamespaceConfig,
) {
    map.get_or_insert_with(BTreeMap::new)
        .insert(ns.name.clone(), ns);
}

impl SystemContent {
    /// The defaults (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the model identity line.
    pub fn with_model_identity(mut self, model_identity: impl Into<String>) -> Self {
        self.model_identity = Some(model_identity.into());
        self
    }
    /// Sets the reasoning effort.
    pub fn with_reasoning_effort(mut self, effort: ReasoningEffort) -> Self {
        self.reasoning_effort = Some(effort);
        self
    }
    /// Adds a tool namespace.
    pub fn with_tools(mut self, ns_config: ToolNamespaceConfig) -> Self {
        insert_namespace(&mut self.tools, ns_config);
        self
    }
    /// Sets the conversation start date (`Current date: …`).
    pub fn with_conversation_start_date(mut self, date: impl Into<String>) -> Self {
        self.conversation_start_date = Some(date.into());
        self
    }
    /// Sets the knowledge cutoff.
    pub fn with_knowledge_cutoff(mut self, knowledge_cutoff: impl Into<String>) -> Self {
        self.knowledge_cutoff = Some(knowledge_cutoff.into());
        self
    }
    /// Sets the channel configuration.
    pub fn with_channel_config(mut self, channel_config: ChannelConfig) -> Self {
        self.channel_config = Some(channel_config);
        self
    }
    /// Requires these channels.
    pub fn with_required_channels<I, T>(mut self, channels: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.channel_config = Some(ChannelConfig::require_channels(channels));
        self
    }
    /// Adds the built-in browser tool.
    pub fn with_browser_tool(self) -> Self {
        self.with_tools(ToolNamespaceConfig::browser())
    }
    /// Adds the built-in python tool.
    pub fn with_python_tool(self) -> Self {
        self.with_tools(ToolNamespaceConfig::python())
    }
}

/// Content of the developer message: instructions and function tools.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct DeveloperContent {
    /// Rendered under `# Instructions`.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Tool namespaces (usually `functions`), ordered by name.
    #[serde(default)]
    pub tools: Option<BTreeMap<String, ToolNamespaceConfig>>,
}

impl DeveloperContent {
    /// Empty developer content.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the instructions.
    pub fn with_instructions(mut self, instructions: impl Into<String>) -> Self {
        self.instructions = Some(instructions.into());
        self
    }
    /// Adds a tool namespace.
    pub fn with_tools(mut self, ns_config: ToolNamespaceConfig) -> Self {
        insert_namespace(&mut self.tools, ns_config);
        self
    }
    /// Adds function tools (namespace `functions`).
    pub fn with_function_tools(self, tools: Vec<ToolDescription>) -> Self {
        self.with_tools(ToolNamespaceConfig::new("functions", None, tools))
    }

    /// Whether a non-empty `functions` namespace is present.
    pub fn has_function_tools(&self) -> bool {
        self.tools
            .as_ref()
            .and_then(|t| t.get("functions"))
            .is_some_and(|ns| !ns.tools.is_empty())
    }
}

/// Plain text content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TextContent {
    /// The text.
    pub text: String,
}

/// One piece of message content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Content {
    /// Text.
    Text(TextContent),
    /// System header content (system messages only).
    SystemContent(SystemContent),
    /// Developer content (developer messages only).
    DeveloperContent(DeveloperContent),
}

impl<T: Into<String>> From<T> for Content {
    fn from(text: T) -> Self {
        Content::Text(TextContent { text: text.into() })
    }
}

impl From<SystemContent> for Content {
    fn from(sys: SystemContent) -> Self {
        Content::SystemContent(sys)
    }
}

impl From<DeveloperContent> for Content {
    fn from(dev: DeveloperContent) -> Self {
        Content::DeveloperContent(dev)
    }
}

/// One harmony message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Message {
    /// Author (flattened into `role` / `name` in JSON).
    #[serde(flatten)]
    pub author: Author,
    /// Recipient (`functions.x` for tool calls, `assistant` for tool answers); `all` is not rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Content pieces (JSON: a string, or a list of `{type, …}` objects).
    #[serde(deserialize_with = "de_content", serialize_with = "se_content")]
    pub content: Vec<Content>,
    /// Channel (`analysis`, `commentary`, `final`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Content type (`json`, `<|constrain|>json`, `code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

impl Message {
    /// A message with one content piece.
    pub fn from_author_and_content(author: Author, content: impl Into<Content>) -> Self {
        Self {
            author,
            recipient: None,
            content: vec![content.into()],
            channel: None,
            content_type: None,
        }
    }
    /// A message from an unnamed author.
    pub fn from_role_and_content(role: Role, content: impl Into<Content>) -> Self {
        Self::from_author_and_content(role.into(), content)
    }
    /// A message with several content pieces.
    pub fn from_role_and_contents(role: Role, content: impl IntoIterator<Item = Content>) -> Self {
        Self {
            author: role.into(),
            recipient: None,
            content: content.into_iter().collect(),
            channel: None,
            content_type: None,
        }
    }
    /// Appends a content piece.
    pub fn adding_content(mut self, content: impl Into<Content>) -> Self {
        self.content.push(content.into());
        self
    }
    /// Sets the channel.
    pub fn with_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }
    /// Sets the recipient.
    pub fn with_recipient(mut self, recipient: impl Into<String>) -> Self {
        self.recipient = Some(recipient.into());
        self
    }
    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }
    /// The concatenated text pieces of the message.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(|c| match c {
                Content::Text(t) => Some(t.text.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// A list of messages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Conversation {
    /// The messages, in order.
    pub messages: Vec<Message>,
}

impl Conversation {
    /// A conversation from messages.
    pub fn from_messages(messages: impl IntoIterator<Item = Message>) -> Self {
        Self {
            messages: messages.into_iter().collect(),
        }
    }
}

impl<'a> IntoIterator for &'a Conversation {
    type Item = &'a Message;
    type IntoIter = std::slice::Iter<'a, Message>;
    fn into_iter(self) -> Self::IntoIter {
        self.messages.iter()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ContentRepr {
    Text(String),
    List(Vec<Content>),
}

fn de_content<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Content>, D::Error> {
    Ok(match ContentRepr::deserialize(d)? {
        ContentRepr::Text(text) => vec![Content::Text(TextContent { text })],
        ContentRepr::List(list) => list,
    })
}

fn se_content<S: serde::Serializer>(value: &[Content], s: S) -> Result<S::Ok, S::Error> {
    if let [Content::Text(TextContent { text })] = value {
        return s.serialize_str(text);
    }
    value.serialize(s)
}
