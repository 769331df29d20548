//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use gptoss_harmony::HarmonyTokenizer;
use openai_harmony::{load_harmony_encoding, HarmonyEncoding, HarmonyEncodingName};

/// Our tokenizer.
pub fn tok() -> HarmonyTokenizer {
    HarmonyTokenizer::o200k_harmony().unwrap_or_else(|e| panic!("building o200k_harmony: {e}"))
}

/// The tiktoken-rs 0.12.1 `assets` folder in the cargo registry (holds o200k_base.tiktoken,
/// whose sha256 openai-harmony checks).
pub fn tiktoken_assets() -> PathBuf {
    let mut homes = Vec::new();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        homes.push(PathBuf::from(h));
    }
    if let Some(h) = std::env::var_os("HOME") {
        homes.push(Path::new(&h).join(".cargo"));
    }
    for home in homes {
        let src = home.join("registry").join("src");
        let Ok(entries) = std::fs::read_dir(&src) else {
            continue;
        };
        for e in entries.flatten() {
            let cand = e.path().join("tiktoken-rs-0.12.1").join("assets");
            if cand.join("o200k_base.tiktoken").is_file() {
                return cand;
            }
        }
    }
    panic!("tiktoken-rs-0.12.1/assets not found under $CARGO_HOME or ~/.cargo/registry/src (run `cargo fetch`)");
}

/// The openai-harmony 0.0.8 oracle, loaded offline.
pub fn oracle() -> HarmonyEncoding {
    static ENC: OnceLock<HarmonyEncoding> = OnceLock::new();
    ENC.get_or_init(|| {
        std::env::set_var("TIKTOKEN_ENCODINGS_BASE", tiktoken_assets());
        load_harmony_encoding(HarmonyEncodingName::HarmonyGptOss)
            .unwrap_or_else(|e| panic!("loading openai-harmony offline: {e}"))
    })
    .clone()
}

/// Reads a file under tests/.
pub fn read_test_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Converts our conversation to openai-harmony's through their shared JSON form.
pub fn to_oracle(conv: &gptoss_harmony::Conversation) -> openai_harmony::chat::Conversation {
    let json = serde_json::to_string(conv).unwrap_or_else(|e| panic!("serializing: {e}"));
    serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("openai-harmony could not read our JSON: {e}\n{json}"))
}

/// The reference.md §5 test vector (harmony render_conversation_for_training).
pub const VECTOR_103: [u32; 103] = [
    200006, 17360, 200008, 3575, 553, 17554, 162016, 11, 261, 4410, 6439, 2359, 22203, 656, 7788,
    17527, 558, 87447, 100594, 25, 220, 1323, 19, 12, 3218, 198, 6576, 3521, 25, 220, 1323, 21, 12,
    994, 12, 2029, 279, 30377, 289, 25, 14093, 279, 2, 13888, 18403, 25, 8450, 11, 49159, 11, 1721,
    13, 21030, 2804, 413, 7360, 395, 1753, 3176, 13, 200007, 200006, 77944, 200008, 2, 68406, 279,
    42743, 289, 6439, 25, 12911, 279, 3575, 553, 448, 20837, 165942, 13, 200007, 200006, 1428,
    200008, 12194, 30, 200007, 200006, 173781, 200005, 35644, 200008, 35, 95247, 13, 200007,
    200006, 173781, 200005, 17196, 200008, 13225, 0, 200002,
];

/// Multilingual and edge-case strings.
pub const TEXTS: &[&str] = &[
    "Bonjour ! Peux-tu m'expliquer la photosynthèse ?",
    "¿Cuál es la capital de Perú? ¡Lima!",
    "Wie funktioniert ein Kühlschrank? Über Wärmeübertragung – ganz einfach.",
    "Qual è la ricetta della carbonara? Guanciale, uova, pecorino.",
    "请解释一下量子纠缠。两个粒子的状态相互关联。",
    "भारत की राजधानी नई दिल्ली है।",
    "富士山の高さは3,776メートルです。",
    "ما هي عاصمة مصر؟ القاهرة.",
    "Emoji 😀👍🏽🇫🇷 and ZWJ 👨‍👩‍👧",
    "CRLF\r\nline\r\nend\r\n",
    "tabs\tand\t\tmore\t",
    "",
    "   ",
    "\n\n\n",
    "literal <|end|> and <|start|>assistant<|message|> and <|return|> stay text",
    "code: fn main() { println!(\"hi\"); }\n    indented",
    "numbers 1234567890 3.14159 -42 1e-5",
    "mixed: English, Français, 中文, हिन्दी, 日本語, العربية.",
];
