//! Harmony rendering of conversations into token ids, token-identical to openai-harmony 0.0.8.
//!
//! Control tokens are emitted as ids; every piece of text (role, recipient, channel, content
//! type, each content item) is encoded separately as ordinary text, exactly as openai-harmony
//! does, so text inside messages can never turn into control tokens.

use crate::chat::{Content, Conversation, DeveloperContent, Message, Role, SystemContent};
use crate::error::{HarmonyError, Result};
use crate::schema::template_tools_section;
use crate::tokenizer::HarmonyTokenizer;

/// Options for rendering a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// Drop analysis messages that come before the first `final` message, when the last
    /// assistant message is on `final` (openai-harmony's `auto_drop_analysis`).
    ///
    /// `RenderOptions::default()` (true) equals openai-harmony's
    /// `Some(&RenderConversationConfig::default())`; [`RenderOptions::keep_analysis`] equals
    /// passing `None`.
    pub auto_drop_analysis: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            auto_drop_analysis: true,
        }
    }
}

impl RenderOptions {
    /// Keep every analysis message (openai-harmony with `config = None`).
    pub fn keep_analysis() -> Self {
        Self {
            auto_drop_analysis: false,
        }
    }
}

/// Renders a conversation (no trailing role).
pub fn render_conversation(
    tok: &HarmonyTokenizer,
    conv: &Conversation,
    opts: &RenderOptions,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    render_conversation_into(tok, conv, opts, &mut out)?;
    Ok(out)
}

/// Renders a conversation for inference: the conversation, then `<|start|>{next_role}`.
pub fn render_for_completion(
    tok: &HarmonyTokenizer,
    conv: &Conversation,
    next_role: Role,
    opts: &RenderOptions,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    render_conversation_into(tok, conv, opts, &mut out)?;
    out.push(tok.control().start);
    tok.encode_into(next_role.as_str(), &mut out)?;
    Ok(out)
}

/// Renders a conversation for training: if the last message is an assistant message on the
/// `final` channel, its closing `<|end|>` becomes `<|return|>` (what the model must learn to emit).
pub fn render_for_training(
    tok: &HarmonyTokenizer,
    conv: &Conversation,
    opts: &RenderOptions,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    render_conversation_into(tok, conv, opts, &mut out)?;
    if let Some(last) = conv.messages.last() {
        if last.author.role == Role::Assistant && last.channel.as_deref() == Some("final") {
            if let Some(t) = out.last_mut() {
                *t = tok.control().return_;
            }
        }
    }
    Ok(out)
}

/// Renders a conversation for training (as [`render_for_training`]) with its loss mask.
pub fn render_training_example(
    tok: &HarmonyTokenizer,
    conv: &Conversation,
    opts: &RenderOptions,
    mode: crate::mask::LossMaskMode,
) -> Result<crate::mask::TrainingExample> {
    let ids = render_for_training(tok, conv, opts)?;
    let mask = crate::mask::loss_mask(tok, &ids, mode);
    Ok(crate::mask::TrainingExample { ids, mask })
}

/// Renders one message (as openai-harmony's `render`), without conversation context: the
/// "Calls to these tools…" line of a system message needs the conversation's developer tools,
/// pass them with `conversation_has_function_tools`.
pub fn render_message(
    tok: &HarmonyTokenizer,
    msg: &Message,
    conversation_has_function_tools: bool,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    render_message_into(tok, msg, 0, conversation_has_function_tools, &mut out)?;
    Ok(out)
}

/// Which messages survive `auto_drop_analysis` (true = rendered).
pub(crate) fn kept_messages(conv: &Conversation, opts: &RenderOptions) -> Vec<bool> {
    let msgs = &conv.messages;
    let last_assistant_is_final = msgs
        .iter()
        .rev()
        .find(|m| m.author.role == Role::Assistant)
        .is_some_and(|m| m.channel.as_deref() == Some("final"));
    let drop = opts.auto_drop_analysis && last_assistant_is_final;
    let first_final = msgs
        .iter()
        .position(|m| m.channel.as_deref() == Some("final"));
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            !(drop
                && first_final.is_some_and(|f| i < f)
                && m.channel.as_deref() == Some("analysis"))
        })
        .collect()
}

fn render_conversation_into(
    tok: &HarmonyTokenizer,
    conv: &Conversation,
    opts: &RenderOptions,
    out: &mut Vec<u32>,
) -> Result<()> {
    let has_function_tools = conv.messages.iter().any(|m| {
        m.content.iter().any(|c| match c {
            Content::DeveloperContent(d) => d.has_function_tools(),
            _ => false,
        })
    });
    let kept = kept_messages(conv, opts);
    for (index, (msg, keep)) in conv.messages.iter().zip(kept).enumerate() {
        if keep {
            render_message_into(tok, msg, index, has_function_tools, out)?;
        }
    }
    Ok(())
}

fn render_message_into(
    tok: &HarmonyTokenizer,
    msg: &Message,
    index: usize,
    has_function_tools: bool,
    out: &mut Vec<u32>,
) -> Result<()> {
    let ctl = tok.control();
    let err = |message: String| HarmonyError::Render { index, message };
    out.push(ctl.start);
    if msg.author.role == Role::Tool {
        let name = msg.author.name.as_deref().ok_or_else(|| {
            err("a tool message needs an author name (e.g. functions.get_weather)".into())
        })?;
        tok.encode_into(name, out)?;
    } else {
        tok.encode_into(msg.author.role.as_str(), out)?;
        if let Some(name) = &msg.author.name {
            tok.encode_into(&format!(":{name}"), out)?;
        }
    }
    if let Some(recipient) = &msg.recipient {
        if recipient != "all" {
            tok.encode_into(&format!(" to={recipient}"), out)?;
        }
    }
    if let Some(channel) = &msg.channel {
        out.push(ctl.channel);
        tok.encode_into(channel, out)?;
    }
    if let Some(content_type) = &msg.content_type {
        if let Some(rest) = content_type.strip_prefix("<|constrain|>") {
            tok.encode_into(" ", out)?;
            out.push(ctl.constrain);
            tok.encode_into(rest, out)?;
        } else {
            tok.encode_into(&format!(" {content_type}"), out)?;
        }
    }
    out.push(ctl.message);
    for content in &msg.content {
        match content {
            Content::Text(t) => tok.encode_into(&t.text, out)?,
            Content::SystemContent(sys) => {
                if msg.author.role != Role::System {
                    return Err(err(format!(
                        "SystemContent may only appear in system messages, found in {}",
                        msg.author.role
                    )));
                }
                tok.encode_into(&system_text(sys, has_function_tools), out)?;
            }
            Content::DeveloperContent(dev) => {
                if msg.author.role != Role::Developer {
                    return Err(err(format!(
                        "DeveloperContent may only appear in developer messages, found in {}",
                        msg.author.role
                    )));
                }
                tok.encode_into(&developer_text(dev), out)?;
            }
        }
    }
    if msg.author.role == Role::Assistant && msg.recipient.is_some() {
        out.push(ctl.call);
    } else {
        out.push(ctl.end);
    }
    Ok(())
}

/// The text of a system message body.
pub fn system_text(sys: &SystemContent, conversation_has_function_tools: bool) -> String {
    let mut sections = Vec::<String>::new();
    let mut top = Vec::<String>::new();
    if let Some(id) = &sys.model_identity {
        top.push(id.clone());
    }
    if let Some(cutoff) = &sys.knowledge_cutoff {
        top.push(format!("Knowledge cutoff: {cutoff}"));
    }
    if let Some(date) = &sys.conversation_start_date {
        top.push(format!("Current date: {date}"));
    }
    if !top.is_empty() {
        sections.push(top.join("\n"));
    }
    if let Some(effort) = sys.reasoning_effort {
        sections.push(format!("Reasoning: {}", effort.as_str()));
    }
    if let Some(tools) = &sys.tools {
        if !tools.is_empty() {
            sections.push(template_tools_section(tools));
        }
    }
    if let Some(cc) = &sys.channel_config {
        if !cc.valid_channels.is_empty() {
            let mut header = format!("# Valid channels: {}.", cc.valid_channels.join(", "));
            if cc.channel_required {
                header.push_str(" Channel must be included for every message.");
            }
            if conversation_has_function_tools {
                header.push_str(
                    "\nCalls to these tools must go to the commentary channel: 'functions'.",
                );
            }
            sections.push(header);
        }
    }
    sections.join("\n\n")
}

/// The text of a developer message body.
pub fn developer_text(dev: &DeveloperContent) -> String {
    let mut sections = Vec::<String>::new();
    if let Some(instr) = &dev.instructions {
        sections.push("# Instructions".to_string());
        sections.push(instr.clone());
    }
    if let Some(tools) = &dev.tools {
        if !tools.is_empty() {
            sections.push(template_tools_section(tools));
        }
    }
    sections.join("\n\n")
}
