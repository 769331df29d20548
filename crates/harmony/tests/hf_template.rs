//! HF chat-template mode against transformers 5.24 / TRL 1.16 fixtures
//! (scripts/fixtures/harmony/make_fixtures.py → tests/fixtures/hf_template.json).

mod common;

use common::{read_test_file, tok, VECTOR_103};
use gptoss_harmony::hf::{self, ChatMessage, ChatTemplateOptions};
use gptoss_harmony::*;
use serde_json::Value;

fn cases() -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&read_test_file("fixtures/hf_template.json")).unwrap_or(Value::Null);
    v["cases"].as_array().cloned().unwrap_or_default()
}

fn options(case: &Value) -> ChatTemplateOptions {
    let kw = &case["kwargs"];
    let mut o = ChatTemplateOptions::new(case["date"].as_str().unwrap_or_default());
    o.add_generation_prompt = kw["add_generation_prompt"].as_bool().unwrap_or(false);
    o.reasoning_effort = kw["reasoning_effort"].as_str().map(|s| match s {
        "low" => ReasoningEffort::Low,
        "high" => ReasoningEffort::High,
        _ => ReasoningEffort::Medium,
    });
    o.model_identity = kw["model_identity"].as_str().map(str::to_string);
    o.tools = kw["tools"].as_array().cloned();
    o.builtin_tools = kw["builtin_tools"].as_array().map(|a| {
        a.iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    });
    o
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_u64().unwrap_or(u64::MAX) as u32)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fixtures_cover_the_required_cases() {
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let langs = cases
        .iter()
        .filter(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("dataset_"))
        })
        .count();
    assert!(langs >= 8);
}

#[test]
fn text_ids_and_masks_match_transformers() {
    let t = tok();
    for case in cases() {
        let name = case["name"].as_str().unwrap_or("?");
        let msgs = hf::messages_from_row(&case).unwrap_or_else(|e| panic!("{name}: {e}"));
        let opts = options(&case);
        if let Some(err) = case["error"].as_str() {
            let ours = hf::render_messages(&msgs, &opts)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            // Same exception text as the template's raise_exception.
            let msg = err.split_once(": ").map(|x| x.1).unwrap_or(err);
            assert!(
                ours.contains(msg),
                "{name}: expected error {msg:?}, got {ours:?}"
            );
            continue;
        }
        let text = hf::render_messages(&msgs, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            text,
            case["text"].as_str().unwrap_or_default(),
            "{name}: text"
        );
        let ours = hf::render_ids(&t, &msgs, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let theirs = ids(&case["hf_ids"]);
        if name == "literal_special_text" {
            // transformers' tokenizer turns the literal "<|end|>" in message text into the control
            // token; we keep message text ordinary. Same text, different ids.
            assert_ne!(ours, theirs);
            assert_eq!(t.decode(&ours).unwrap_or_default(), text);
            let specials_ours = ours.iter().filter(|&&i| t.is_special_token(i)).count();
            let specials_theirs = theirs.iter().filter(|&&i| t.is_special_token(i)).count();
            assert!(specials_ours < specials_theirs);
        } else {
            assert_eq!(ours, theirs, "{name}: ids");
        }
        if let Some(mask) = case["trl_assistant_mask"].as_array() {
            let expected: Vec<bool> = mask.iter().map(|m| m.as_i64() == Some(1)).collect();
            let ex = hf::render_training_example(&t, &msgs, &opts, LossMaskMode::AssistantOnly)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            if name != "literal_special_text" {
                assert_eq!(ex.mask, expected, "{name}: TRL assistant mask");
            }
            let all = hf::render_training_example(&t, &msgs, &opts, LossMaskMode::All)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(all.mask.iter().all(|&m| m));
        }
    }
}

#[test]
fn reference_vector_differs_at_index_78_only() {
    let t = tok();
    let msgs = vec![
        ChatMessage::system("reasoning language: French\n\nYou are an AI chatbot."),
        ChatMessage::user("Hi?"),
        ChatMessage::assistant("Hello!").with_thinking("D'accord."),
    ];
    let hf_ids = hf::render_ids(&t, &msgs, &ChatTemplateOptions::new("2026-11-28"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hf_ids.len(), 103);
    let diffs: Vec<usize> = (0..103).filter(|&i| hf_ids[i] != VECTOR_103[i]).collect();
    assert_eq!(diffs, vec![78]);
    assert_eq!((VECTOR_103[78], hf_ids[78]), (13, 364));
    // The same row through harmony mode gives the reference vector itself.
    let conv = hf::to_harmony_conversation(&msgs, &ChatTemplateOptions::new("2026-11-28"))
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = render_for_training(&t, &conv, &RenderOptions::keep_analysis())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, VECTOR_103.to_vec());
}

#[test]
fn final_only_mask_covers_the_last_final_message() {
    let t = tok();
    let msgs = vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hola"),
        ChatMessage::assistant("¡Hola!"),
        ChatMessage::user("¿Qué tal?"),
        ChatMessage::assistant("Bien.").with_thinking("Respond."),
    ];
    let ex = hf::render_training_example(
        &t,
        &msgs,
        &ChatTemplateOptions::new("2026-11-28"),
        LossMaskMode::FinalOnly,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let on: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.mask)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(
        t.decode(&on).unwrap_or_default(),
        "<|start|>assistant<|channel|>final<|message|>Bien.<|return|>"
    );
    assert_eq!(ex.mask.last(), Some(&true));
}

#[test]
fn bad_rows_have_clear_errors() {
    let opts = ChatTemplateOptions::new("2026-11-28");
    let err = |msgs: Vec<ChatMessage>| {
        hf::render_messages(&msgs, &opts)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = err(vec![ChatMessage::user("a"), ChatMessage::new("robot", "b")]);
    assert!(e.contains("messages[1].role") && e.contains("robot"), "{e}");
    let e = err(vec![ChatMessage::user("a").with_thinking("x")]);
    assert!(
        e.contains("messages[0].thinking") && e.contains("user"),
        "{e}"
    );
    let mut m = ChatMessage::assistant("a");
    m.channel = Some("secret".into());
    let e = err(vec![ChatMessage::user("q"), m]);
    assert!(
        e.contains("messages[1].channel") && e.contains("secret"),
        "{e}"
    );
    assert!(err(vec![]).contains("at least one message"));
    // null thinking on system/user rows (the dataset's shape) is fine
    let row = serde_json::json!({"messages": [
        {"role": "system", "content": "s", "thinking": null},
        {"role": "user", "content": "u", "thinking": null},
        {"role": "assistant", "content": "a", "reasoning_content": "r"}]});
    let msgs = hf::messages_from_row(&row).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(msgs[2].thinking.as_deref(), Some("r"));
    assert!(hf::render_messages(&msgs, &opts).is_ok());
    let bad = serde_json::json!({"messages": [{"content": "no role"}]});
    let e = hf::messages_from_row(&bad)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("messages[0]") && e.contains("role"), "{e}");
}

/// HF mode through `GPTOSS_TOKENIZER_JSON` (a gpt-oss tokenizer.json, read by the `tokenizers`
/// backend) when set, else through the bundled tokenizer: every renderable case gives
/// transformers' ids.
#[test]
fn hf_ids_with_tokenizer_json_or_bundled() {
    let t = match std::env::var_os("GPTOSS_TOKENIZER_JSON") {
        Some(path) => HarmonyTokenizer::from_file(&path).unwrap_or_else(|e| panic!("{e}")),
        None => tok(),
    };
    let mut checked = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap_or("?");
        if case.get("error").is_some() || name == "literal_special_text" {
            continue;
        }
        let msgs = hf::messages_from_row(&case).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours =
            hf::render_ids(&t, &msgs, &options(&case)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ours, ids(&case["hf_ids"]), "{name}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} cases checked");
}
