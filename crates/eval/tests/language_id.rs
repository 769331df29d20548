//! Language identification on a fixture of 250 short chain-of-thought texts (1-3 sentences,
//! with digits and arithmetic) written for this test: 30 each in the six Multilingual-Thinking
//! languages, 10 each in Dutch, Russian, Chinese, Japanese, Arabic, Hindi and Korean.

use std::collections::BTreeMap;

use gptoss_eval::{default_detector, Language};

const FIXTURE: &str = include_str!("fixtures/language_id.jsonl");

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    language: String,
}

fn cases() -> Vec<(Language, String)> {
    FIXTURE
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let c: Case =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("fixture line {}: {e}", i + 1));
            let lang = Language::from_name(&c.language)
                .unwrap_or_else(|| panic!("fixture line {}: language {:?}", i + 1, c.language));
            (lang, c.text)
        })
        .collect()
}

#[test]
fn fixture_covers_every_language() {
    let cases = cases();
    assert!(cases.len() >= 200, "{} texts", cases.len());
    for l in Language::ALL {
        let n = cases.iter().filter(|c| c.0 == l).count();
        assert!(n >= 10, "{l}: {n} texts");
    }
}

#[test]
fn accuracy_on_short_reasoning_texts() {
    let detector = default_detector();
    let cases = cases();
    // confusion[expected][detected] = count
    let mut confusion: BTreeMap<Language, BTreeMap<String, usize>> = BTreeMap::new();
    let mut misses = Vec::new();
    let mut hits = 0;
    for (want, text) in &cases {
        let got = detector.detect(text);
        let name = got.map_or("none".to_string(), |l| l.to_string());
        *confusion
            .entry(*want)
            .or_default()
            .entry(name.clone())
            .or_default() += 1;
        if got == Some(*want) {
            hits += 1;
        } else {
            misses.push(format!("  {want} → {name}: {text}"));
        }
    }
    let accuracy = hits as f64 / cases.len() as f64;
    let mut report = format!(
        "language-ID accuracy {hits}/{} = {:.1} %\nper language (expected: detected counts):\n",
        cases.len(),
        accuracy * 100.0
    );
    for (want, row) in &confusion {
        let cells: Vec<String> = row.iter().map(|(k, v)| format!("{k} {v}")).collect();
        report.push_str(&format!("  {want}: {}\n", cells.join(", ")));
    }
    report.push_str("misses:\n");
    report.push_str(&misses.join("\n"));
    println!("{report}");
    assert!(accuracy >= 0.95, "{report}");
    // No language may be systematically mistaken either.
    for (want, row) in &confusion {
        let total: usize = row.values().sum();
        let ok = row.get(want.name()).copied().unwrap_or(0);
        assert!(ok * 10 >= total * 8, "{want}: {ok}/{total}\n{report}");
    }
}

#[test]
fn arithmetic_alone_is_undecidable() {
    let d = default_detector();
    for text in [
        "",
        "   ",
        "23 + 12 = 35",
        "3 × 4 = 12; 12 / 60 = 0.2",
        "(7 × 9) − 8 = 55 m²",
        "$18",
    ] {
        assert_eq!(d.detect(text), None, "{text:?}");
    }
}
