//! openai-harmony 0.0.8's golden files (tests/data, copied from its `test-data/`), rebuilt with
//! our API: the same conversations as openai-harmony's `src/tests.rs` and Python tests.

mod common;

use common::{oracle, read_test_file, to_oracle, tok};
use gptoss_harmony::*;
use serde_json::json;

/// As openai-harmony's tests: CRLF → LF and trailing whitespace trimmed.
fn golden(name: &str) -> String {
    read_test_file(&format!("data/{name}.txt"))
        .replace("\r\n", "\n")
        .trim_end()
        .to_string()
}

fn check_completion(conv: &Conversation, name: &str, opts: RenderOptions) {
    let t = tok();
    let ids = render_for_completion(&t, conv, Role::Assistant, &opts)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected = golden(name);
    assert_eq!(
        t.decode(&ids).unwrap_or_else(|e| panic!("{name}: {e}")),
        expected,
        "{name}: text"
    );
    // Token-level: the golden text tokenized with specials (as openai-harmony's tests do).
    let expected_ids = oracle().tokenizer().encode_with_special_tokens(&expected);
    assert_eq!(ids, expected_ids, "{name}: ids");
    assert_eq!(
        t.encode_with_special_tokens(&expected).unwrap_or_default(),
        expected_ids,
        "{name}: our tokenizer"
    );
    let _ = to_oracle(conv);
}

const IDENTITY: &str = "You are ChatGPT, a large language model trained by OpenAI.";

#[test]
fn simple_convo() {
    let conv = Conversation::from_messages([
        Message::from_role_and_content(
            Role::System,
            SystemContent::new().with_model_identity(IDENTITY),
        ),
        Message::from_role_and_content(Role::User, "What is 2 + 2?"),
    ]);
    check_completion(&conv, "test_simple_convo", RenderOptions::keep_analysis());
}

#[test]
fn simple_convo_with_effort() {
    for (effort, name, with_dev) in [
        (ReasoningEffort::Low, "test_simple_convo_low_effort", true),
        (
            ReasoningEffort::Medium,
            "test_simple_convo_medium_effort",
            true,
        ),
        (ReasoningEffort::High, "test_simple_convo_high_effort", true),
        (
            ReasoningEffort::Low,
            "test_simple_convo_low_effort_no_instruction",
            false,
        ),
        (
            ReasoningEffort::Medium,
            "test_simple_convo_medium_effort_no_instruction",
            false,
        ),
        (
            ReasoningEffort::High,
            "test_simple_convo_high_effort_no_instruction",
            false,
        ),
    ] {
        let sys = SystemContent::new()
            .with_model_identity(IDENTITY)
            .with_reasoning_effort(effort);
        let mut msgs = vec![Message::from_role_and_content(Role::System, sys)];
        if with_dev {
            msgs.push(Message::from_role_and_content(
                Role::Developer,
                DeveloperContent::new()
                    .with_instructions("Answer the user's questions like a robot."),
            ));
        }
        msgs.push(Message::from_role_and_content(
            Role::User,
            "What is the capital of the largest country in the world?",
        ));
        check_completion(
            &Conversation::from_messages(msgs),
            name,
            RenderOptions::keep_analysis(),
        );
    }
}

#[test]
fn reasoning_system_messages() {
    let base = SystemContent::new()
        .with_model_identity(IDENTITY)
        .with_required_channels(["analysis", "final"]);
    let conv = |sys: SystemContent, q: &str| {
        Conversation::from_messages([
            Message::from_role_and_content(Role::System, sys),
            Message::from_role_and_content(Role::User, q),
        ])
    };
    check_completion(
        &conv(
            base.clone().with_reasoning_effort(ReasoningEffort::Medium),
            "What is 2 + 2?",
        ),
        "test_reasoning_system_message",
        RenderOptions::keep_analysis(),
    );
    check_completion(
        &conv(
            base.clone().with_reasoning_effort(ReasoningEffort::High),
            "What is the best place to eat candy in the world?",
        ),
        "test_reasoning_system_message_no_instruction",
        RenderOptions::keep_analysis(),
    );
    check_completion(
        &conv(
            base.with_reasoning_effort(ReasoningEffort::Medium)
                .with_conversation_start_date("2021-01-01")
                .with_knowledge_cutoff("2021-01"),
            "What is 42 * pi?",
        ),
        "test_reasoning_system_message_with_dates",
        RenderOptions::keep_analysis(),
    );
}

#[test]
fn render_functions_with_parameters() {
    let sys = SystemContent::new()
        .with_reasoning_effort(ReasoningEffort::High)
        .with_conversation_start_date("2025-06-28");
    let dev = DeveloperContent::new().with_instructions("Always respond in riddles").with_function_tools(vec![
        ToolDescription::new("get_location", "Gets the location of the user.", None),
        ToolDescription::new(
            "get_current_weather",
            "Gets the current weather in the provided location.",
            Some(json!({
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
                },
                "required": ["location"]
            })),
        ),
        ToolDescription::new(
            "get_multiple_weathers",
            "Gets the current weather in the provided list of locations.",
            Some(json!({
                "type": "object",
                "properties": {
                    "locations": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "List of city and state, e.g. [\"San Francisco, CA\", \"New York, NY\"]"
                    },
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
                },
                "required": ["locations"]
            })),
        ),
        ToolDescription::new(
            "kitchensink",
            "A function with various complex schemas.",
            Some(json!({
                "description": "params object",
                "type": "object",
                "properties": {
                    "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
                    "string_nullable": {"type": "string", "nullable": true, "description": "A nullable string", "default": "the default"},
                    "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
                    "oneof_string_or_number": {
                        "oneOf": [
                            {"type": "string", "default": "default_string_in_oneof"},
                            {"type": "number", "description": "numbers can happen too"}
                        ],
                        "description": "a oneof",
                        "default": 20
                    }
                }
            })),
        ),
    ]);
    let conv = Conversation::from_messages([
        Message::from_role_and_content(Role::System, sys),
        Message::from_role_and_content(Role::Developer, dev),
        Message::from_role_and_content(Role::User, "What is the weather like in SF?"),
    ]);
    check_completion(
        &conv,
        "test_render_functions_with_parameters",
        RenderOptions::keep_analysis(),
    );
}

#[test]
fn builtin_tools() {
    let sys = SystemContent::new().with_conversation_start_date("2025-06-28");
    let one = |s: SystemContent| {
        Conversation::from_messages([Message::from_role_and_content(Role::System, s)])
    };
    check_completion(
        &one(sys.clone().with_browser_tool().with_python_tool()),
        "test_browser_and_python_tool",
        RenderOptions::keep_analysis(),
    );
    check_completion(
        &one(sys.clone().with_browser_tool()),
        "test_browser_tool_only",
        RenderOptions::keep_analysis(),
    );
    check_completion(
        &one(sys.clone()),
        "test_no_tools",
        RenderOptions::keep_analysis(),
    );
    let dev = DeveloperContent::new().with_function_tools(vec![ToolDescription::new(
        "lookup_weather",
        "Use this tool to lookup the weather in a given location. Call it with the parameter 'location', can be any textual description of a location.",
        Some(json!({"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]})),
    )]);
    let conv = Conversation::from_messages([
        Message::from_role_and_content(Role::System, sys.with_browser_tool()),
        Message::from_role_and_content(Role::Developer, dev),
    ]);
    check_completion(
        &conv,
        "test_browser_and_function_tool",
        RenderOptions::keep_analysis(),
    );
}

#[test]
fn analysis_dropping() {
    let conv = Conversation::from_messages([
        Message::from_role_and_content(Role::User, "What is 2 + 2?"),
        Message::from_role_and_content(
            Role::Assistant,
            "User asks: “What is 2 + 2?” Simple arithmetic. Provide answer.",
        )
        .with_channel("analysis"),
        Message::from_role_and_content(Role::Assistant, "2 + 2 equals 4.").with_channel("final"),
        Message::from_role_and_content(Role::User, "What about 9 / 2?"),
    ]);
    check_completion(
        &conv,
        "test_dropping_cot_by_default",
        RenderOptions::default(),
    );

    let conv = Conversation::from_messages([
        Message::from_role_and_content(Role::User, "What is the weather in SF?"),
        Message::from_role_and_content(
            Role::Assistant,
            "User asks: “What is the weather in SF?” We need to use lookup_weather tool.",
        )
        .with_channel("analysis"),
        Message::from_role_and_content(Role::Assistant, "{\"location\": \"San Francisco\"}")
            .with_channel("commentary")
            .with_recipient("functions.lookup_weather")
            .with_content_type("<|constrain|>json"),
        Message::from_author_and_content(
            Author::new(Role::Tool, "functions.lookup_weather"),
            "{\"temperature\": 20, \"description\": \"sunny\"}",
        ),
    ]);
    check_completion(
        &conv,
        "test_does_not_drop_if_ongoing_analysis",
        RenderOptions::default(),
    );

    let conv = Conversation::from_messages([
        Message::from_role_and_content(Role::User, "What is 2 + 2?"),
        Message::from_role_and_content(
            Role::Assistant,
            "User asks a simple question: \"What is 2 + 2?\" The answer: 4.",
        )
        .with_channel("analysis"),
        Message::from_role_and_content(Role::Assistant, "2 + 2 equals 4.").with_channel("final"),
        Message::from_role_and_content(Role::User, "What about 9 / 2?"),
    ]);
    check_completion(&conv, "test_preserve_cot", RenderOptions::keep_analysis());
}

#[test]
fn keep_analysis_between_finals() {
    let t = tok();
    let conv = Conversation::from_messages([
        Message::from_role_and_content(Role::User, "What is 2 + 2?"),
        Message::from_role_and_content(Role::Assistant, "4").with_channel("final"),
        Message::from_role_and_content(Role::User, "What is 3 + 5?"),
        Message::from_role_and_content(Role::Assistant, "thinking 3+5").with_channel("analysis"),
        Message::from_role_and_content(Role::Assistant, "8").with_channel("final"),
    ]);
    let ids =
        render_conversation(&t, &conv, &RenderOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.decode(&ids).unwrap_or_default(),
        golden("test_keep_analysis_between_finals")
    );
}

#[test]
fn parse_golden_completions() {
    let t = tok();
    // test_simple_reasoning_response.txt holds token ids.
    let ids: Vec<u32> = golden("test_simple_reasoning_response")
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(u32::MAX))
        .collect();
    let msgs = parse_completion(&t, &ids, Some(Role::Assistant), ParseMode::Strict)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        msgs,
        vec![
            Message::from_role_and_content(
                Role::Assistant,
                "User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer."
            )
            .with_channel("analysis"),
            Message::from_role_and_content(Role::Assistant, "2 + 2 = 4.").with_channel("final"),
        ]
    );
    let text = golden("test_tool_response_parsing");
    let ids = t.encode_with_special_tokens(&text).unwrap_or_default();
    let msgs =
        parse_completion(&t, &ids, None, ParseMode::Strict).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        msgs,
        vec![Message::from_author_and_content(
            Author::new(Role::Tool, "browser.search"),
            "{\"result\": \"https://openai.com/\"}"
        )
        .with_channel("commentary")
        .with_recipient("assistant")]
    );
    let text = golden("test_streamable_parser");
    let ids = t.encode_with_special_tokens(&text).unwrap_or_default();
    let mut p = StreamParser::new(t.clone(), Some(Role::Assistant));
    p.process_all(ids).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.messages().len(), 3);
}
