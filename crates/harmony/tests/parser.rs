//! Streaming parser: openai-harmony's parser tests, agreement with openai-harmony on rendered
//! conversations, defined errors, and a never-panics property test.

mod common;

use common::{oracle, tok, TEXTS};
use gptoss_harmony::*;
use openai_harmony::chat::Role as ORole;
use proptest::prelude::*;

fn special(text: &str) -> Vec<u32> {
    tok()
        .encode_with_special_tokens(text)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn parse(text: &str, role: Option<Role>, mode: ParseMode) -> Result<Vec<Message>> {
    parse_completion(&tok(), &special(text), role, mode)
}

#[test]
fn tool_calls_with_constrain_markers() {
    let expected = vec![Message::from_role_and_content(
        Role::Assistant,
        "{\"latitude\":48.8566,\"longitude\":2.3522}",
    )
    .with_channel("commentary")
    .with_recipient("functions.get_weather")
    .with_content_type("<|constrain|>json")];
    let text = "<|start|>assistant<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{\"latitude\":48.8566,\"longitude\":2.3522}<|call|>";
    assert_eq!(
        parse(text, None, ParseMode::Strict).unwrap_or_else(|e| panic!("{e}")),
        expected
    );
    let text = "<|start|>assistant to=functions.get_weather<|channel|>commentary<|constrain|>json<|message|>{\"latitude\":48.8566,\"longitude\":2.3522}<|end|>";
    assert_eq!(
        parse(text, None, ParseMode::Strict).unwrap_or_else(|e| panic!("{e}")),
        expected
    );
}

#[test]
fn missing_message_token_strict_errors_lenient_recovers() {
    let text = "<|channel|>commentary Hello<|end|>";
    let err = parse(text, Some(Role::Assistant), ParseMode::Strict)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("position"), "{err}");
    let msgs =
        parse(text, Some(Role::Assistant), ParseMode::Lenient).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        msgs,
        vec![Message::from_role_and_content(Role::Assistant, "Hello").with_channel("commentary")]
    );
}

#[test]
fn utf8_handling_matches_openai_harmony() {
    let t = tok();
    // Partial bytes do not leak into the next message.
    let mut ids = special("<|start|>assistant<|message|>");
    ids.extend([9552, 9552]);
    ids.extend(special("<|end|><|start|>assistant<|message|>Hi<|end|>"));
    let msgs =
        parse_completion(&t, &ids, None, ParseMode::Strict).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[1],
        Message::from_role_and_content(Role::Assistant, "Hi")
    );
    let theirs = oracle()
        .parse_messages_from_completion_tokens(ids.clone(), None)
        .unwrap_or_default();
    assert_eq!(
        serde_json::to_value(&msgs).ok(),
        serde_json::to_value(&theirs).ok()
    );

    // Partial bytes are flushed (lossily) at EOS: output cut off at max tokens.
    let mut ids = special("<|start|>assistant<|message|>");
    ids.push(9552);
    ids.extend(special("Hi"));
    let mut p = StreamParser::new(t.clone(), None);
    p.process_all(ids).unwrap_or_else(|e| panic!("{e}"));
    p.process_eos().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.messages(),
        &[Message::from_role_and_content(
            Role::Assistant,
            " \u{FFFD}Hi"
        )]
    );
    assert!(p.truncated());
    assert_eq!(p.current_content(), "");

    // A multi-token character waits for its last token.
    let mut p = StreamParser::new(t.clone(), None);
    p.process_all(special("<|start|>assistant<|message|>"))
        .unwrap_or_else(|e| panic!("{e}"));
    let emoji = t.encode("💖").unwrap_or_default();
    assert!(emoji.len() >= 2);
    p.process(emoji[0]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.last_content_delta(), None);
    assert_eq!(p.current_content(), "");
    p.process(emoji[1]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.last_content_delta(), Some("💖"));
    assert_eq!(p.current_content(), "💖");
    assert_eq!(p.current_role(), Some(Role::Assistant));
    p.process(t.control().end).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.messages()[0].text(), "💖");
    assert_eq!(p.last_stop_token(), Some(t.control().end));
}

#[test]
fn unknown_ids_strict_error_names_position_lenient_replaces() {
    let t = tok();
    let mut ids = special("<|start|>assistant<|channel|>analysis<|message|>Practice.");
    let pos = ids.len();
    ids.push(u32::MAX);
    ids.extend(special(" more<|end|>"));
    match parse_completion(&t, &ids, None, ParseMode::Strict) {
        Err(HarmonyError::UnknownToken { position, .. }) => assert_eq!(position, pos),
        other => panic!("expected UnknownToken, got {other:?}"),
    }
    let msgs =
        parse_completion(&t, &ids, None, ParseMode::Lenient).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(msgs[0].text(), "Practice.\u{FFFD} more");
    assert_eq!(msgs[0].channel.as_deref(), Some("analysis"));
}

#[test]
fn strict_errors_name_the_token_position() {
    let t = tok();
    // A stray ordinary token where <|start|> must come.
    let mut ids = special("<|start|>user<|message|>Hi<|end|>");
    let pos = ids.len();
    ids.push(13225);
    match parse_completion(&t, &ids, None, ParseMode::Strict) {
        Err(HarmonyError::Parse { position, .. }) => assert_eq!(position, pos),
        other => panic!("expected Parse error, got {other:?}"),
    }
    // Lenient mode skips it and keeps the message.
    let msgs =
        parse_completion(&t, &ids, None, ParseMode::Lenient).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(msgs, vec![Message::from_role_and_content(Role::User, "Hi")]);
    // Unknown role.
    let err = parse("<|start|>robot<|message|>x<|end|>", None, ParseMode::Strict)
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("position 2") && e.contains("robot")),
        "{err:?}"
    );
    // EOS inside a header (cut off before <|message|>).
    let err = parse("<|start|>assistant<|channel|>fin", None, ParseMode::Strict)
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("header")),
        "{err:?}"
    );
    assert_eq!(
        parse("<|start|>assistant<|channel|>fin", None, ParseMode::Lenient)
            .map(|m| m.len())
            .ok(),
        Some(0)
    );
}

#[test]
fn completions_with_return_call_and_live_state() {
    let t = tok();
    let text = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant to=functions.f<|channel|>commentary json<|message|>{\"a\": 1}<|call|>";
    let mut p = StreamParser::new(t.clone(), Some(Role::Assistant));
    let mut saw_channel = false;
    for id in special(text) {
        p.process(id).unwrap_or_else(|e| panic!("{e}"));
        if p.current_channel() == Some("commentary") {
            saw_channel = true;
            assert_eq!(p.current_recipient(), Some("functions.f"));
            assert_eq!(p.current_content_type(), Some("json"));
        }
    }
    assert!(saw_channel);
    assert_eq!(p.last_stop_token(), Some(t.control().call));
    p.process_eos().unwrap_or_else(|e| panic!("{e}"));
    assert!(!p.truncated());
    let msgs = p.into_messages();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1].recipient.as_deref(), Some("functions.f"));
    let final_only = parse(
        "<|channel|>final<|message|>Done.<|return|>",
        Some(Role::Assistant),
        ParseMode::Strict,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        final_only,
        vec![Message::from_role_and_content(Role::Assistant, "Done.").with_channel("final")]
    );
}

#[test]
fn parses_rendered_conversations_like_openai_harmony() {
    let t = tok();
    let enc = oracle();
    for (k, text) in TEXTS.iter().enumerate() {
        let conv = Conversation::from_messages([
            Message::from_role_and_content(Role::User, *text),
            Message::from_role_and_content(Role::Assistant, *text).with_channel("analysis"),
            Message::from_role_and_content(Role::Assistant, format!("{{\"q\": {k}}}"))
                .with_channel("commentary")
                .with_recipient("functions.search")
                .with_content_type("<|constrain|>json"),
            Message::from_author_and_content(Author::new(Role::Tool, "functions.search"), *text)
                .with_channel("commentary")
                .with_recipient("assistant"),
            Message::from_role_and_content(Role::Assistant, *text).with_channel("final"),
        ]);
        let ids = render_for_training(&t, &conv, &RenderOptions::keep_analysis())
            .unwrap_or_else(|e| panic!("{e}"));
        let ours = parse_completion(&t, &ids, None, ParseMode::Strict)
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        let lenient = parse_completion(&t, &ids, None, ParseMode::Lenient)
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(ours, lenient);
        let theirs = enc
            .parse_messages_from_completion_tokens(ids.clone(), None)
            .unwrap_or_default();
        assert_eq!(
            serde_json::to_value(&ours).ok(),
            serde_json::to_value(&theirs).ok(),
            "{k}"
        );
        assert_eq!(ours, conv.messages, "{k}: parse(render(c)) == c");
        // And from the completion point of view (prompt already rendered `<|start|>assistant`).
        let tail: Vec<u32> = special("<|channel|>final<|message|>")
            .into_iter()
            .chain(t.encode(text).unwrap_or_default())
            .chain([t.control().return_])
            .collect();
        let ours = parse_completion(&t, &tail, Some(Role::Assistant), ParseMode::Strict)
            .unwrap_or_else(|e| panic!("{e}"));
        let theirs = enc
            .parse_messages_from_completion_tokens(tail.clone(), Some(ORole::Assistant))
            .unwrap_or_default();
        assert_eq!(
            serde_json::to_value(&ours).ok(),
            serde_json::to_value(&theirs).ok(),
            "{k}"
        );
    }
}

/// Token ids biased toward the structure of harmony output.
fn id_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => prop::sample::select(vec![200002u32, 200003, 200005, 200006, 200007, 200008, 200012]),
        3 => prop::sample::select(vec![173781u32, 1428, 17360, 35644, 17196, 316, 28, 44580, 13, 220, 9552, 132990]),
        3 => 0u32..200_000,
        1 => any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]
    #[test]
    fn parser_never_panics(ids in prop::collection::vec(id_strategy(), 0..48), role in prop::option::of(Just(Role::Assistant))) {
        let t = tok();
        for mode in [ParseMode::Strict, ParseMode::Lenient] {
            let mut p = StreamParser::with_mode(t.clone(), role, mode);
            let mut failed = false;
            for &id in &ids {
                if p.process(id).is_err() {
                    failed = true;
                    prop_assert_eq!(mode, ParseMode::Strict);
                    break;
                }
                let _ = (p.current_content(), p.current_channel(), p.last_content_delta());
            }
            if !failed {
                let r = p.process_eos();
                prop_assert!(r.is_ok() || mode == ParseMode::Strict);
            }
        }
    }
}

/// Millions of random sequences: `GPTOSS_FUZZ_SEQUENCES=2000000 cargo test --release ... parser_fuzz`.
#[test]
fn parser_fuzz() {
    let n: u64 = std::env::var("GPTOSS_FUZZ_SEQUENCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let t = tok();
    let pool = [
        200002u32, 200003, 200005, 200006, 200007, 200008, 200012, 173781, 1428, 316, 28, 13, 9552,
        35644, 17196,
    ];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..n {
        let len = (next() % 40) as usize;
        let mode = if next() % 2 == 0 {
            ParseMode::Strict
        } else {
            ParseMode::Lenient
        };
        let role = if next() % 2 == 0 {
            Some(Role::Assistant)
        } else {
            None
        };
        let mut p = StreamParser::with_mode(t.clone(), role, mode);
        let mut ok = true;
        for _ in 0..len {
            let r = next();
            let id = match r % 8 {
                0..=4 => pool[(r >> 8) as usize % pool.len()],
                5 | 6 => (r >> 8) as u32 % 201_100,
                _ => (r >> 8) as u32,
            };
            if p.process(id).is_err() {
                assert_eq!(mode, ParseMode::Strict);
                ok = false;
                break;
            }
        }
        if ok {
            assert!(p.process_eos().is_ok() || mode == ParseMode::Strict);
        }
    }
}

/// Sequences of harmony messages with optional header parts, sometimes corrupted.
fn piece_strategy() -> impl Strategy<Value = Vec<u32>> {
    let t = tok();
    let text = move |s: &str| t.encode(s).unwrap_or_default();
    let roles = vec![
        text("assistant"),
        text("user"),
        text("functions.f"),
        text("tool"),
    ];
    let channels = vec![text("analysis"), text("final"), text("commentary")];
    let recipients = vec![
        text(" to=functions.f"),
        text(" to=assistant"),
        text(" to=browser.search"),
    ];
    let ctypes = vec![
        text(" json"),
        text(" code"),
        vec![220, 200003],
        [vec![220, 200003], text("json")].concat(),
    ];
    let bodies = vec![
        text("Hello world"),
        text("😀 é"),
        vec![9552],
        vec![132990, 9552],
        vec![],
        text("{\"a\": 1}"),
    ];
    let message = (
        prop::option::weighted(0.9, prop::sample::select(roles)),
        prop::option::of(prop::sample::select(channels)),
        prop::option::of(prop::sample::select(recipients)),
        prop::option::of(prop::sample::select(ctypes)),
        prop::bool::weighted(0.9),
        prop::sample::select(bodies),
        prop::sample::select(vec![200007u32, 200002, 200012]),
        prop::option::weighted(0.05, 0u32..200_019),
    )
        .prop_map(|(role, ch, rec, ct, msg, body, stop, noise)| {
            let mut v = vec![200006];
            v.extend(role.unwrap_or_default());
            if let Some(c) = ch {
                v.push(200005);
                v.extend(c);
            }
            v.extend(rec.unwrap_or_default());
            v.extend(ct.unwrap_or_default());
            if msg {
                v.push(200008);
            }
            v.extend(body);
            v.extend(noise);
            v.push(stop);
            v
        });
    (
        prop::collection::vec(message, 0..5),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(msgs, drop_first, cut)| {
            let mut v = msgs.concat();
            if drop_first && !v.is_empty() {
                v.remove(0); // as after a `<|start|>` prompt, or a corrupted start
            }
            if cut && !v.is_empty() {
                v.pop(); // cut off at max tokens
            }
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// Whenever both openai-harmony and we accept a sequence, the messages are identical.
    #[test]
    fn agrees_with_openai_harmony_when_both_accept(ids in piece_strategy(), with_role in any::<bool>()) {
        let t = tok();
        let role = with_role.then_some(Role::Assistant);
        let orole = with_role.then_some(ORole::Assistant);
        let theirs = oracle().parse_messages_from_completion_tokens(ids.clone(), orole);
        let ours = parse_completion(&t, &ids, role, ParseMode::Strict);
        if let (Ok(theirs), Ok(ours)) = (&theirs, &ours) {
            prop_assert_eq!(serde_json::to_value(ours).ok(), serde_json::to_value(theirs).ok());
        }
        // We reject nothing that openai-harmony parses, except a stop token inside a header
        // (openai-harmony folds it into the header text).
        if theirs.is_ok() && ours.is_err() {
            let msg = ours.err().map(|e| e.to_string()).unwrap_or_default();
            prop_assert!(msg.contains("stop token") || msg.contains("header"), "{}", msg);
        }
    }
}

/// The agreement property above is not vacuous: many generated sequences parse on both sides.
#[test]
fn agreement_property_covers_accepted_sequences() {
    use proptest::strategy::ValueTree;
    let t = tok();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = piece_strategy();
    let (mut both, mut ours_only_err) = (0, 0);
    for _ in 0..600 {
        let ids = strategy
            .new_tree(&mut runner)
            .map(|t| t.current())
            .unwrap_or_default();
        let theirs = oracle().parse_messages_from_completion_tokens(ids.clone(), None);
        let ours = parse_completion(&t, &ids, None, ParseMode::Strict);
        match (theirs.is_ok(), ours.is_ok()) {
            (true, true) => both += 1,
            (true, false) => ours_only_err += 1,
            _ => {}
        }
    }
    eprintln!("both accept: {both}/600, only openai-harmony accepts: {ours_only_err}");
    assert!(
        both >= 100,
        "only {both} of 600 sequences parsed on both sides"
    );
}
