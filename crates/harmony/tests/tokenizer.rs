//! o200k_harmony tokenizer against openai-harmony's tokenizer (tiktoken o200k_harmony) and
//! Hugging Face `tokenizer.json` files.

mod common;

use common::{oracle, read_test_file, tok, TEXTS};
use gptoss_harmony::{ids, HarmonyError, HarmonyTokenizer};
use proptest::prelude::*;

/// Deterministic xorshift generator for reproducible corpora.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "the",
    "The",
    " quick",
    "brown",
    "fox",
    "’s",
    "'s",
    "'LL",
    "don't",
    "I'm",
    "Bonjour",
    "à",
    "été",
    "Über",
    "straße",
    "¿Qué",
    "¡",
    "niño",
    "città",
    "perché",
    "中文",
    "汉字测试",
    "日本語",
    "カタカナ",
    "ひらがな",
    "한국어",
    "हिन्दी",
    "नमस्ते",
    "العربية",
    "مرحبا",
    "עברית",
    "Ελληνικά",
    "Русский",
    "ไทย",
    "😀",
    "👍🏽",
    "🇫🇷",
    "👨‍👩‍👧",
    "∑",
    "√2",
    "π",
    "1",
    "12",
    "123",
    "1234",
    "3.14",
    "-42",
    "1e-5",
    "0x1F",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    "\n\n",
    " \n ",
    "\u{a0}",
    "\u{200b}",
    "\u{feff}",
    ".",
    ",",
    "!",
    "?",
    "...",
    "—",
    "–",
    "«",
    "»",
    "\"",
    "'",
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    "<",
    ">",
    "/",
    "\\",
    "|",
    "<|",
    "|>",
    "<|end|>",
    "<|start|>",
    "<|message|>",
    "<|reserved_200100|>",
    "<|unknown|>",
    "fn main()",
    "x = y + 1;",
    "http://example.com/a?b=c",
    "a@b.c",
    "#",
    "##",
    "//",
    "/*",
    "*/",
    "ABC",
    "abcDEF",
    "CamelCase",
    "snake_case",
    "kebab-case",
    "é",
    "e\u{301}",
    "\u{0}",
    "\u{7f}",
    "\u{1b}[0m",
];

fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(24);
            let mut s = String::new();
            for _ in 0..len {
                match rng.below(10) {
                    0 => s.push(char::from_u32(rng.below(0x3000) as u32).unwrap_or('?')),
                    1 => s.push(char::from_u32(0x1F300 + rng.below(0x300) as u32).unwrap_or('?')),
                    _ => s.push_str(PIECES[rng.below(PIECES.len())]),
                }
            }
            s
        })
        .collect()
}

#[test]
fn ordinary_encoding_equals_openai_harmony_on_12000_strings() {
    let t = tok();
    let enc = oracle();
    let bpe = enc.tokenizer();
    let strings = corpus(12_000, 0x9E37_79B9_7F4A_7C15);
    for s in strings.iter().chain(
        TEXTS
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let ours = t.encode(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(ours, bpe.encode_ordinary(s), "{s:?}");
        assert_eq!(t.decode(&ours).unwrap_or_default(), *s, "round trip {s:?}");
        // With specials: identical except for tokens whose names differ (see `special_names`).
        assert_eq!(
            t.encode_with_special_tokens(s).unwrap_or_default(),
            bpe.encode_with_special_tokens(s),
            "{s:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn random_unicode_encodes_like_openai_harmony(s in any::<String>()) {
        let t = tok();
        let ours = t.encode(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&ours, &oracle().tokenizer().encode_ordinary(&s));
        prop_assert_eq!(t.decode(&ours).map_err(|e| TestCaseError::fail(e.to_string()))?, s);
    }
}

#[test]
fn special_names_and_ids() {
    let t = tok();
    let c = t.control();
    assert_eq!(
        [
            c.start,
            c.message,
            c.end,
            c.channel,
            c.constrain,
            c.return_,
            c.call
        ],
        [200006, 200008, 200007, 200005, 200003, 200002, 200012]
    );
    assert_eq!(t.stop_tokens(), [200002, 200007, 200012]);
    assert_eq!(gptoss_harmony::stop_tokens(), t.stop_tokens());
    // HF names for 199998..=200018, then reserved ids up to the padded vocab.
    assert_eq!(t.special_token_text(200018), Some("<|endofprompt|>"));
    assert_eq!(t.special_token_text(200013), Some("<|reserved_200013|>"));
    assert_eq!(t.special_token_text(201087), Some("<|reserved_201087|>"));
    assert_eq!(t.special_token_text(ids::PADDED_VOCAB_SIZE), None);
    assert_eq!(t.special_token_id("<|startoftext|>"), Some(199998));
    assert!(!t.is_special_token(24912));
    assert_eq!(
        t.encode("hello world").unwrap_or_default(),
        vec![24912, 2375]
    );
    // openai-harmony agrees on every special id that both define the same way.
    let enc = oracle();
    for id in (199998..=200017).chain(200019..201088) {
        let ours = t.decode(&[id]).unwrap_or_default();
        assert_eq!(
            ours,
            enc.tokenizer().decode_utf8([id]).unwrap_or_default(),
            "id {id}"
        );
    }
}

#[test]
fn literal_special_text_stays_ordinary() {
    let t = tok();
    let ids = t.encode("<|end|>").unwrap_or_default();
    assert!(ids.iter().all(|&i| !t.is_special_token(i)), "{ids:?}");
    assert_eq!(
        t.encode_with_special_tokens("<|end|>").unwrap_or_default(),
        vec![200007]
    );
    assert_eq!(
        t.encode_with_special_tokens("a<|x<|start|>b|>")
            .unwrap_or_default(),
        oracle()
            .tokenizer()
            .encode_with_special_tokens("a<|x<|start|>b|>")
    );
}

#[test]
fn invalid_utf8_and_unknown_ids_are_defined() {
    let t = tok();
    // 132990 + 9552 decode to bytes that are not valid UTF-8 (openai-harmony's test case).
    match t.decode(&[132990, 9552]) {
        Err(HarmonyError::InvalidUtf8 { .. }) => {}
        other => panic!("expected InvalidUtf8, got {other:?}"),
    }
    let lossy = t.decode_lossy(&[132990, 9552]).unwrap_or_default();
    assert!(lossy.contains('\u{FFFD}'), "{lossy:?}");
    match t.decode(&[24912, 999_999_999]) {
        Err(HarmonyError::UnknownToken {
            id: 999_999_999,
            position: 1,
        }) => {}
        other => panic!("expected UnknownToken at 1, got {other:?}"),
    }
    assert!(t.decode(&[ids::PADDED_VOCAB_SIZE]).is_err());
}

#[test]
fn loads_tokenizer_json_with_the_tokenizers_crate() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_tokenizer.json");
    let t = HarmonyTokenizer::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let cases: serde_json::Value =
        serde_json::from_str(&read_test_file("fixtures/tiny_tokenizer_cases.json"))
            .unwrap_or_default();
    let cases = cases.as_array().cloned().unwrap_or_default();
    assert!(!cases.is_empty());
    for c in cases {
        let text = c["text"].as_str().unwrap_or_default();
        let expected: Vec<u32> = c["ids"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0) as u32).collect())
            .unwrap_or_default();
        let ours = t
            .encode_with_special_tokens(text)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ours, expected, "{text:?}");
        assert_eq!(t.decode(&ours).unwrap_or_default(), text);
    }
    // Plain encode keeps special-token text ordinary with this backend too.
    let ids = t.encode("<|end|>").unwrap_or_default();
    assert!(ids.iter().all(|&i| !t.is_special_token(i)));
    // A missing file names the path.
    let err = HarmonyTokenizer::from_file("/nonexistent/tokenizer.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
}

/// The ids transformers' o200k_harmony tokenizer gives for whole rendered chats
/// (`fixtures/hf_template.json`, made by scripts/fixtures/harmony/make_fixtures.py): `(name, text, ids)`.
fn transformers_text_ids() -> Vec<(String, String, Vec<u32>)> {
    let v: serde_json::Value = serde_json::from_str(&read_test_file("fixtures/hf_template.json"))
        .unwrap_or_else(|e| panic!("fixtures/hf_template.json: {e}"));
    let cases = v["cases"].as_array().cloned().unwrap_or_default();
    let out: Vec<_> = cases
        .iter()
        .filter_map(|c| {
            let ids = c["hf_ids"].as_array()?;
            Some((
                c["name"].as_str()?.to_string(),
                c["text"].as_str()?.to_string(),
                ids.iter()
                    .filter_map(|i| i.as_u64())
                    .map(|i| i as u32)
                    .collect(),
            ))
        })
        .collect();
    assert!(out.len() >= 20, "only {} cases with ids", out.len());
    out
}

/// The tokenizer of `GPTOSS_TOKENIZER_JSON=/path/to/tokenizer.json` (a real gpt-oss checkpoint's,
/// or the one `scripts/fixtures/harmony/o200k.py --out` writes) when set, else the bundled one
/// (o200k_harmony from tiktoken ranks): whole rendered chats, control tokens in the text parsed,
/// encode to exactly transformers' ids and decode back. With the file, it must also agree with the
/// bundled tokenizer on a random corpus.
#[test]
fn tokenizer_encodes_rendered_chats_like_transformers() {
    let env = std::env::var_os("GPTOSS_TOKENIZER_JSON");
    let t = match &env {
        Some(path) => HarmonyTokenizer::from_file(path).unwrap_or_else(|e| panic!("{e}")),
        None => tok(),
    };
    for (name, text, expected) in transformers_text_ids() {
        let ours = t
            .encode_with_special_tokens(&text)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ours, expected, "{name}");
        assert_eq!(t.decode(&expected).unwrap_or_default(), text, "{name}");
    }
    let Some(path) = env else {
        return;
    };
    let hf = HarmonyTokenizer::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let t = tok();
    assert_eq!(hf.control(), t.control());
    for s in corpus(3000, 7).iter().chain(
        TEXTS
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .iter(),
    ) {
        assert_eq!(
            hf.encode(s).unwrap_or_default(),
            t.encode(s).unwrap_or_default(),
            "{s:?}"
        );
        let ids = t.encode_with_special_tokens(s).unwrap_or_default();
        // The HF file defines only 199998..=200018 as tokens; reserved names beyond are text there.
        if hf.find_specials(s) == t.find_specials(s) {
            assert_eq!(
                hf.encode_with_special_tokens(s).unwrap_or_default(),
                ids,
                "{s:?}"
            );
        }
        let hf_ids = hf.encode(s).unwrap_or_default();
        assert_eq!(
            hf.decode_bytes(&hf_ids).unwrap_or_default(),
            s.as_bytes(),
            "{s:?}"
        );
    }
}

#[test]
fn very_long_inputs_encode() {
    let t = tok();
    for s in [
        " ".repeat(200_000),
        "\n".repeat(100_000),
        "a ".repeat(100_000),
        "😀".repeat(50_000),
        " \t\r\n".repeat(50_000),
    ] {
        let ids = t
            .encode(&s)
            .unwrap_or_else(|e| panic!("len {}: {e}", s.len()));
        assert_eq!(t.decode(&ids).unwrap_or_default(), s);
    }
}

#[test]
fn special_scan_is_linear_on_adversarial_text() {
    let t = tok();
    let s = "<|".repeat(200_000) + "|>";
    let start = std::time::Instant::now();
    assert!(t.find_specials(&s).is_empty());
    let ids = t
        .encode_with_special_tokens(&("<|".repeat(1000) + "<|end|>"))
        .unwrap_or_default();
    assert_eq!(ids.last(), Some(&200007));
    assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
}
