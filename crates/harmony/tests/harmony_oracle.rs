//! Harmony mode against openai-harmony 0.0.8 (the oracle) on generated multilingual
//! conversations, and the reference test vector.

mod common;

use common::{oracle, to_oracle, tok, TEXTS, VECTOR_103};
use gptoss_harmony::*;
use openai_harmony::chat::Role as ORole;
use serde_json::json;

fn oracle_role(r: Role) -> ORole {
    match r {
        Role::User => ORole::User,
        Role::Assistant => ORole::Assistant,
        Role::System => ORole::System,
        Role::Developer => ORole::Developer,
        Role::Tool => ORole::Tool,
    }
}

/// Renders with us and with openai-harmony in all three modes and both drop settings.
/// (openai-harmony's config type is not exported: `Some(&Default::default())` is auto-drop on.)
fn assert_same_as_oracle(conv: &Conversation, label: &str) {
    let t = tok();
    let enc = oracle();
    let oconv = to_oracle(conv);
    for drop in [false, true] {
        let opts = RenderOptions {
            auto_drop_analysis: drop,
        };
        let ctx = |what: &str| format!("{label}: {what} (auto_drop={drop})");
        let ours =
            render_conversation(&t, conv, &opts).unwrap_or_else(|e| panic!("{}: {e}", ctx("ours")));
        let theirs = if drop {
            enc.render_conversation(&oconv, Some(&Default::default()))
        } else {
            enc.render_conversation(&oconv, None)
        }
        .unwrap_or_else(|e| panic!("{}: {e}", ctx("oracle")));
        assert_eq!(ours, theirs, "{}", ctx("render_conversation"));

        let ours =
            render_for_training(&t, conv, &opts).unwrap_or_else(|e| panic!("{}: {e}", ctx("ours")));
        let theirs = if drop {
            enc.render_conversation_for_training(&oconv, Some(&Default::default()))
        } else {
            enc.render_conversation_for_training(&oconv, None)
        }
        .unwrap_or_else(|e| panic!("{}: {e}", ctx("oracle")));
        assert_eq!(ours, theirs, "{}", ctx("render_for_training"));

        for role in [Role::Assistant, Role::User] {
            let ours = render_for_completion(&t, conv, role, &opts)
                .unwrap_or_else(|e| panic!("{}: {e}", ctx("ours")));
            let theirs = if drop {
                enc.render_conversation_for_completion(
                    &oconv,
                    oracle_role(role),
                    Some(&Default::default()),
                )
            } else {
                enc.render_conversation_for_completion(&oconv, oracle_role(role), None)
            }
            .unwrap_or_else(|e| panic!("{}: {e}", ctx("oracle")));
            assert_eq!(ours, theirs, "{}", ctx("render_for_completion"));
        }
    }
}

fn weather_tools() -> Vec<ToolDescription> {
    vec![
        ToolDescription::new(
            "get_weather",
            "Gets the weather.\nSecond line of the description.",
            Some(json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                    "days": {"type": "integer", "default": 1},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "opts": {"type": "object", "properties": {"verbose": {"type": "boolean"}}, "required": ["verbose"]},
                    "either": {"type": ["string", "number"]},
                    "choice": {"oneOf": [{"type": "string", "description": "as text"}, {"type": "number", "default": 3}], "description": "pick"}
                },
                "required": ["city"]
            })),
        ),
        ToolDescription::new("get_time", "Current time.", None),
    ]
}

/// Builds ≥ 40 varied conversations: 9 languages × several shapes, plus edge strings.
fn generated_conversations() -> Vec<(String, Conversation)> {
    let langs = [
        ("French", 0),
        ("Spanish", 1),
        ("German", 2),
        ("Italian", 3),
        ("Chinese", 4),
        ("Hindi", 5),
        ("Japanese", 6),
        ("Arabic", 7),
        ("English", 16),
    ];
    let efforts = [
        ReasoningEffort::Low,
        ReasoningEffort::Medium,
        ReasoningEffort::High,
    ];
    let mut out = Vec::new();
    for (i, (lang, ti)) in langs.iter().enumerate() {
        let text = TEXTS[*ti];
        let mut sys = SystemContent::new().with_reasoning_effort(efforts[i % 3]);
        if i % 2 == 0 {
            sys = sys.with_conversation_start_date("2026-11-28");
        }
        let dev = DeveloperContent::new().with_instructions(format!(
            "reasoning language: {lang}\n\nYou are an AI chatbot."
        ));
        // 1. dataset-shaped training example
        out.push((
            format!("{lang}/training"),
            Conversation::from_messages([
                Message::from_role_and_content(Role::System, sys.clone()),
                Message::from_role_and_content(Role::Developer, dev.clone()),
                Message::from_role_and_content(Role::User, text),
                Message::from_role_and_content(Role::Assistant, format!("{text} (analysis)"))
                    .with_channel("analysis"),
                Message::from_role_and_content(Role::Assistant, text).with_channel("final"),
            ]),
        ));
        // 2. multi-turn history with analysis to drop
        out.push((
            format!("{lang}/multi_turn"),
            Conversation::from_messages([
                Message::from_role_and_content(Role::System, sys.clone()),
                Message::from_role_and_content(Role::User, text),
                Message::from_role_and_content(Role::Assistant, "thinking...")
                    .with_channel("analysis"),
                Message::from_role_and_content(Role::Assistant, text).with_channel("final"),
                Message::from_role_and_content(Role::User, TEXTS[(ti + 1) % TEXTS.len()]),
                Message::from_role_and_content(Role::Assistant, "more thinking")
                    .with_channel("analysis"),
                Message::from_role_and_content(Role::Assistant, "answer").with_channel("final"),
            ]),
        ));
        // 3. tool call round trip
        let dev_tools = dev.clone().with_function_tools(weather_tools());
        out.push((
            format!("{lang}/tools"),
            Conversation::from_messages([
                Message::from_role_and_content(Role::System, sys.clone()),
                Message::from_role_and_content(Role::Developer, dev_tools),
                Message::from_role_and_content(Role::User, text),
                Message::from_role_and_content(Role::Assistant, "Need weather.")
                    .with_channel("analysis"),
                Message::from_role_and_content(Role::Assistant, json!({"city": text}).to_string())
                    .with_channel("commentary")
                    .with_recipient("functions.get_weather")
                    .with_content_type(if i % 2 == 0 {
                        "<|constrain|>json"
                    } else {
                        "json"
                    }),
                Message::from_author_and_content(
                    Author::new(Role::Tool, "functions.get_weather"),
                    "{\"temp\": 21}",
                )
                .with_channel("commentary")
                .with_recipient("assistant"),
            ]),
        ));
        // 4. built-in tools + named user
        out.push((
            format!("{lang}/builtin"),
            Conversation::from_messages([
                Message::from_role_and_content(
                    Role::System,
                    sys.clone()
                        .with_browser_tool()
                        .with_python_tool()
                        .with_model_identity(format!("You speak {lang}.")),
                ),
                Message::from_author_and_content(Author::new(Role::User, "alice"), text),
            ]),
        ));
    }
    // Edge strings as user / assistant content.
    for (k, text) in TEXTS.iter().enumerate() {
        out.push((
            format!("edge/{k}"),
            Conversation::from_messages([
                Message::from_role_and_content(
                    Role::System,
                    SystemContent::new().with_required_channels(["analysis", "final"]),
                ),
                Message::from_role_and_content(Role::User, *text),
                Message::from_role_and_content(Role::Assistant, *text).with_channel("analysis"),
                Message::from_role_and_content(Role::Assistant, *text).with_channel("final"),
            ]),
        ));
    }
    let long: String = TEXTS.concat().repeat(40);
    out.push((
        "edge/very_long".into(),
        Conversation::from_messages([
            Message::from_role_and_content(Role::User, long.clone()),
            Message::from_role_and_content(Role::Assistant, long).with_channel("final"),
        ]),
    ));
    out.push((
        "edge/multi_content".into(),
        Conversation::from_messages([Message::from_role_and_contents(
            Role::User,
            [Content::from("part one "), Content::from("part two")],
        )
        .adding_content("three")]),
    ));
    out.push((
        "edge/ongoing_analysis".into(),
        Conversation::from_messages([
            Message::from_role_and_content(Role::User, "q"),
            Message::from_role_and_content(Role::Assistant, "a1").with_channel("analysis"),
            Message::from_role_and_content(Role::Assistant, "f").with_channel("final"),
            Message::from_role_and_content(Role::User, "q2"),
            Message::from_role_and_content(Role::Assistant, "a2").with_channel("analysis"),
        ]),
    ));
    out
}

#[test]
fn generated_conversations_match_openai_harmony() {
    let convs = generated_conversations();
    assert!(convs.len() >= 40, "only {} conversations", convs.len());
    for (label, conv) in &convs {
        assert_same_as_oracle(conv, label);
    }
}

#[test]
fn reference_vector_103() {
    let t = tok();
    let conv = Conversation::from_messages([
        Message::from_role_and_content(
            Role::System,
            SystemContent::new().with_conversation_start_date("2026-11-28"),
        ),
        Message::from_role_and_content(
            Role::Developer,
            DeveloperContent::new()
                .with_instructions("reasoning language: French\n\nYou are an AI chatbot."),
        ),
        Message::from_role_and_content(Role::User, "Hi?"),
        Message::from_role_and_content(Role::Assistant, "D'accord.").with_channel("analysis"),
        Message::from_role_and_content(Role::Assistant, "Hello!").with_channel("final"),
    ]);
    let ids = render_for_training(&t, &conv, &RenderOptions::keep_analysis())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, VECTOR_103.to_vec());
    // With auto-drop the analysis before the first final goes away.
    let dropped =
        render_for_training(&t, &conv, &RenderOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(dropped.len() < ids.len());
    assert_same_as_oracle(&conv, "vector");
    // Assistant-only mask: the two assistant messages (analysis + final), from <|start|> to the end.
    let ex = render_training_example(
        &t,
        &conv,
        &RenderOptions::keep_analysis(),
        LossMaskMode::AssistantOnly,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ex.ids, ids);
    let first = ex.mask.iter().position(|&m| m).unwrap_or(0);
    assert_eq!(first, 86); // the analysis message's <|start|>
    assert!(ex.mask[first..].iter().all(|&m| m));
    assert_eq!(ex.mask.iter().filter(|&&m| m).count(), 103 - 86);
}

#[test]
fn serde_round_trips_through_openai_harmony_json() {
    for (label, conv) in generated_conversations().iter().take(8) {
        let theirs = to_oracle(conv);
        let back: Conversation =
            serde_json::from_str(&serde_json::to_string(&theirs).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(&back, conv, "{label}");
    }
}

#[test]
fn render_errors_are_defined() {
    let t = tok();
    let no_name = Conversation::from_messages([Message::from_role_and_content(Role::Tool, "x")]);
    let err = render_conversation(&t, &no_name, &RenderOptions::default())
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("message 0") && e.contains("name")),
        "{err:?}"
    );
    let misplaced = Conversation::from_messages([
        Message::from_role_and_content(Role::User, "hi"),
        Message::from_role_and_content(Role::User, SystemContent::new()),
    ]);
    let err = render_conversation(&t, &misplaced, &RenderOptions::default())
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("message 1") && e.contains("SystemContent")),
        "{err:?}"
    );
}

/// Conversations rendered by the openai_harmony Python package (tests/fixtures/harmony_python.json):
/// its JSON form deserializes into our types and renders to the same ids.
#[test]
fn python_openai_harmony_fixtures() {
    let t = tok();
    let v: serde_json::Value =
        serde_json::from_str(&common::read_test_file("fixtures/harmony_python.json"))
            .unwrap_or_default();
    let cases = v["cases"].as_array().cloned().unwrap_or_default();
    assert!(cases.len() >= 9);
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .map(|a| a.iter().map(|i| i.as_u64().unwrap_or(0) as u32).collect())
            .unwrap_or_default()
    };
    for c in cases {
        let name = c["name"].as_str().unwrap_or("?");
        let conv: Conversation = serde_json::from_value(c["conversation"].clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let keep = render_for_training(&t, &conv, &RenderOptions::keep_analysis())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keep, ids(&c["training_keep"]), "{name}: training (keep)");
        let drop = render_for_training(&t, &conv, &RenderOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(drop, ids(&c["training_drop"]), "{name}: training (drop)");
        let comp = render_for_completion(&t, &conv, Role::Assistant, &RenderOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(comp, ids(&c["completion_drop"]), "{name}: completion");
    }
}
