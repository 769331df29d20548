//! The checkpoint the GGUF golden file was made from (`scripts/fixtures/export/make_gguf_golden.py`
//! ran llama.cpp's `convert_hf_to_gguf.py` on exactly this directory): `Config::tiny()` with a
//! vocabulary of 3072 (the harmony crate's 3021-token `tiny_tokenizer.json`, ids 3021.. unused),
//! seeded MXFP4 experts in one `model.safetensors`, the tokenizer files of a gpt-oss checkpoint.

use std::path::{Path, PathBuf};

use gptoss_model::{write_synthetic_checkpoint, Config, SyntheticOptions};

/// Vocabulary of the golden checkpoint (≥ the 3021 tokens of the tiny tokenizer).
pub const VOCAB: usize = 3072;
/// Seed of its weights.
pub const SEED: u64 = 24;

fn harmony(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../harmony")
        .join(rel)
}

/// The config of the golden checkpoint.
pub fn config() -> Config {
    let mut c = Config::tiny();
    c.vocab_size = VOCAB;
    c
}

/// Writes the golden checkpoint into `dir` (created): weights, `config.json`,
/// `generation_config.json`, `tokenizer.json`, `tokenizer_config.json` (bos/eos/pad as the released
/// gpt-oss checkpoints, its added tokens) and `chat_template.jinja`.
pub fn write(dir: &Path) {
    let opts = SyntheticOptions {
        seed: SEED,
        max_shard_bytes: 1 << 40,
        mxfp4_experts: true,
    };
    write_synthetic_checkpoint(dir, &config(), &opts).unwrap();
    let tok = harmony("tests/fixtures/tiny_tokenizer.json");
    std::fs::copy(&tok, dir.join("tokenizer.json")).unwrap();
    std::fs::copy(
        harmony("src/gpt-oss-chat-template.jinja"),
        dir.join("chat_template.jinja"),
    )
    .unwrap();
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    let mut added = serde_json::Map::new();
    for t in tj["added_tokens"].as_array().unwrap() {
        added.insert(
            t["id"].to_string(),
            serde_json::json!({
                "content": t["content"], "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true
            }),
        );
    }
    let config = serde_json::json!({
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|return|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1e30,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}
