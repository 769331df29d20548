//! Rows → (input_ids, labels) through the harmony HF-template mode.

use gptoss_harmony::hf::{render_ids, ChatTemplateOptions};
use gptoss_harmony::{HarmonyTokenizer, LossMaskMode};
use gptoss_sft::collate::IGNORE_INDEX;
use gptoss_sft::data::{load, LoadOptions};
use gptoss_sft::preprocess::{chat_messages, preprocess, PreprocessOptions, DEFAULT_TEMPLATE_DATE};

fn rows() -> Vec<gptoss_sft::data::Row> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mt_tiny.jsonl");
    load(&p, LoadOptions::default()).unwrap().rows
}

#[test]
fn all_tokens_mode_labels_equal_ids_and_keep_start() {
    let tok = HarmonyTokenizer::o200k_harmony().unwrap();
    let rows = rows();
    let full = preprocess(&tok, &rows, &PreprocessOptions::default()).unwrap();
    assert_eq!(full.examples.len(), 3);
    assert_eq!(full.truncated, 0);
    let e = &full.examples[0];
    let want = render_ids(
        &tok,
        &chat_messages(&rows[0]),
        &ChatTemplateOptions::new(DEFAULT_TEMPLATE_DATE),
    )
    .unwrap();
    assert_eq!(e.input_ids, want);
    let ids_as_labels: Vec<i64> = e.input_ids.iter().map(|&i| i as i64).collect();
    assert_eq!(e.labels, ids_as_labels);
    let text = tok.decode(&e.input_ids).unwrap();
    assert!(text.contains("Current date: 2025-08-05"), "{text}");
    assert!(text.ends_with("<|return|>"), "{text}");

    let short = preprocess(
        &tok,
        &rows,
        &PreprocessOptions {
            max_length: 20,
            ..PreprocessOptions::default()
        },
    )
    .unwrap();
    assert_eq!(short.truncated, 3);
    assert_eq!(short.examples[0].input_ids, e.input_ids[..20]);
}

#[test]
fn masked_modes_and_dropping() {
    let tok = HarmonyTokenizer::o200k_harmony().unwrap();
    let rows = rows();
    let opts = PreprocessOptions {
        loss_mask: LossMaskMode::FinalOnly,
        ..PreprocessOptions::default()
    };
    let p = preprocess(&tok, &rows, &opts).unwrap();
    let e = &p.examples[1];
    let trained: Vec<u32> = e
        .input_ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(&i, _)| i)
        .collect();
    let text = tok.decode(&trained).unwrap();
    assert!(text.contains("Red."), "{text}");
    assert!(!text.contains("primary colour"), "{text}");
    // Truncated before the final message: nothing trained, the row is dropped.
    let cut = preprocess(
        &tok,
        &rows,
        &PreprocessOptions {
            max_length: 30,
            ..opts
        },
    )
    .unwrap();
    assert!(cut.examples.is_empty());
    assert_eq!(cut.dropped, vec![0, 1, 2]);
}
