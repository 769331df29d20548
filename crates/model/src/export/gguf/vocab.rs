//! The `tokenizer.ggml.*` metadata of a gpt-oss GGUF, read from a checkpoint's `tokenizer.json`,
//! `tokenizer_config.json`, chat template files and `config.json`, following llama.cpp's converter
//! (`conversion/base.py`: `TextModel._set_vocab_gpt2`, `get_vocab_base`; `gguf-py/gguf/vocab.py`:
//! `SpecialVocab`) for what a gpt-oss checkpoint contains: a byte-level BPE `tokenizer.json` with
//! special added tokens and no normalizer, `bos/eos/pad` named in `tokenizer_config.json`, a ByteLevel post-processor.
//!
//! Left out (not in gpt-oss checkpoints; such input is refused or ignored as documented in
//! `docs/export.md`): the pre-tokenizer hash check (gpt-oss's o200k pre-tokenizer is always
//! `gpt-4o`), `TemplateProcessing`/`RobertaProcessing` post-processors, added tokens that are
//! neither special nor `<|...|>`-like (their re-normalization), `merges.txt`.

use std::collections::HashMap;
use std::path::Path;

use super::file::Value;
use crate::error::{ModelError, Result};

/// llama.cpp's name of the o200k pre-tokenizer (what its hash check gives for gpt-oss).
pub(crate) const PRE_TOKENIZER: &str = "gpt-4o";

/// gguf-py `TokenType`.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn bad(path: &Path, what: impl std::fmt::Display) -> ModelError {
    ModelError::arg("gguf tokenizer", format!("{}: {what}", path.display()))
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(super::super::writer::io(path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| bad(path, format!("not JSON: {e}")))
}

/// llama.cpp's `does_token_look_special` for the forms a gpt-oss vocabulary has.
fn looks_special(t: &str) -> bool {
    (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
        || matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
}

/// The tokens and token types of ids `0..vocab_size` (`get_vocab_base`): vocabulary entries
/// `NORMAL`, added tokens `CONTROL` (special or special-looking) or `USER_DEFINED`, ids without
/// a token `[PAD{i}]` `UNUSED`.
fn tokens(
    tok: &serde_json::Value,
    path: &Path,
    vocab_size: usize,
) -> Result<(Vec<String>, Vec<i32>)> {
    let vocab = tok["model"]["vocab"].as_object().ok_or_else(|| {
        bad(
            path,
            "model.vocab: expected an object of token → id (a BPE model)",
        )
    })?;
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(path, format!("model.vocab[{t:?}]: expected an id")))?;
        by_id.insert(id as usize, (t.clone(), NORMAL));
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(bad(
                path,
                format!("added_tokens: expected id and content, got {a}"),
            ));
        };
        let special = a["special"].as_bool().unwrap_or(false);
        if !special && !looks_special(t) && !a["normalized"].as_bool().unwrap_or(true) {
            return Err(bad(
                path,
                format!(
                    "added token {t:?} (id {id}) is neither special nor normalized: llama.cpp's \
                     converter re-normalizes it through the tokenizer, which this export does not do"
                ),
            ));
        }
        let ty = if special || looks_special(t) {
            CONTROL
        } else {
            USER_DEFINED
        };
        let t = if ty == USER_DEFINED {
            t.replace('\u{2581}', " ")
        } else {
            t.to_string()
        };
        by_id.insert(id as usize, (t, ty));
    }
    if let Some(max) = by_id.keys().max() {
        if *max >= vocab_size {
            return Err(bad(
                path,
                format!("token id {max} is not below the config's vocab_size {vocab_size}"),
            ));
        }
    }
    Ok((0..vocab_size)
        .map(|i| {
            by_id
                .remove(&i)
                .unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED))
        })
        .unzip())
}

/// `model.merges` as llama.cpp stores them: `"a b"` strings (pairs joined by a space, a space
/// inside a part written as U+0120).
fn merges(tok: &serde_json::Value, path: &Path) -> Result<Vec<String>> {
    let Some(list) = tok["model"]["merges"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => {
                let part = |v: &serde_json::Value| {
                    v.as_str()
                        .map(|s| s.replace(' ', "\u{120}"))
                        .ok_or_else(|| bad(path, format!("merge {m}: expected two strings")))
                };
                Ok(format!("{} {}", part(&p[0])?, part(&p[1])?))
            }
            _ => Err(bad(path, format!("merge {m}: unknown merges format"))),
        })
        .collect()
}

/// Special token ids, `add_*_token` flags, chat template and normalizer flags (`SpecialVocab`),
/// appended to `meta` in the converter's order.
fn special(
    dir: &Path,
    tok: &serde_json::Value,
    tok_path: &Path,
    meta: &mut Vec<(String, Value)>,
) -> Result<()> {
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json(&tc_path)?;
    let mut add: Vec<(String, bool)> = Vec::new();
    let set_add = |add: &mut Vec<(String, bool)>, k: &str, v: bool, only_if_absent: bool| match add
        .iter_mut()
        .find(|(n, _)| n == k)
    {
        Some(e) if !only_if_absent => e.1 = v,
        Some(_) => {}
        None => add.push((k.to_string(), v)),
    };
    if let Some(pp) = tok.get("post_processor").filter(|p| !p.is_null()) {
        let list: Vec<&serde_json::Value> = match pp["processors"].as_array() {
            Some(v) => v.iter().collect(),
            None => vec![pp],
        };
        for p in list {
            match p["type"].as_str() {
                Some("ByteLevel") => {
                    set_add(&mut add, "bos", false, true);
                    set_add(&mut add, "eos", false, true);
                }
                Some(other @ ("TemplateProcessing" | "RobertaProcessing")) => {
                    return Err(bad(
                        tok_path,
                        format!("post_processor {other} is not supported by the gguf export (gpt-oss uses ByteLevel)"),
                    ))
                }
                _ => {}
            }
        }
    }
    let mut ids: Vec<(String, u32)> = Vec::new();
    let mut template = None;
    if let Some(tc) = &tc {
        template = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => chat_template_file(dir)?,
        };
        let added = tok["added_tokens"].as_array();
        for typ in ["bos", "eos", "unk", "sep", "pad", "cls", "mask"] {
            if let Some(b) = tc[format!("add_{typ}_token")].as_bool() {
                set_add(&mut add, typ, b, true);
            }
            let content = match &tc[format!("{typ}_token")] {
                serde_json::Value::String(s) => Some(s.as_str()),
                v => v["content"].as_str(),
            };
            let id = content.and_then(|c| {
                added
                    .into_iter()
                    .flatten()
                    .find(|a| a["content"].as_str() == Some(c))
                    .and_then(|a| a["id"].as_u64())
            });
            if let Some(id) = id {
                ids.push((typ.to_string(), id as u32));
            }
        }
    }
    if let Some(cfg) = read_json(&dir.join("config.json"))? {
        for typ in ["bos", "eos", "unk", "sep", "pad", "cls", "mask"] {
            if let Some(id) = cfg[format!("{typ}_token_id")].as_u64() {
                if !ids.iter().any(|(t, _)| t == typ) {
                    ids.push((typ.to_string(), id as u32));
                }
            }
        }
    }
    for (typ, id) in ids {
        // gguf-py's `add_{typ}_token_id` keys; it has none for cls (skipped with a warning)
        let key = match typ.as_str() {
            "bos" | "eos" | "mask" => format!("tokenizer.ggml.{typ}_token_id"),
            "unk" => "tokenizer.ggml.unknown_token_id".into(),
            "sep" => "tokenizer.ggml.seperator_token_id".into(),
            "pad" => "tokenizer.ggml.padding_token_id".into(),
            _ => continue,
        };
        meta.push((key, Value::U32(id)));
    }
    for (typ, v) in add {
        // only bos, eos and sep have an `add_add_{typ}_token` in gguf-py
        if matches!(typ.as_str(), "bos" | "eos" | "sep") {
            meta.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(v)));
        }
    }
    if let Some(t) = template {
        meta.push(("tokenizer.chat_template".into(), Value::Str(t)));
    }
    Ok(())
}

/// `chat_template.jinja`, else `chat_template.json`'s `chat_template`, in `dir`.
fn chat_template_file(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        if dir.join("additional_chat_templates").is_dir() {
            return Err(bad(
                dir,
                "additional_chat_templates/ is not supported by the gguf export",
            ));
        }
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(super::super::writer::io(&jinja));
    }
    Ok(read_json(&dir.join("chat_template.json"))?
        .and_then(|v| v["chat_template"].as_str().map(str::to_string)))
}

/// The tokenizer metadata of the checkpoint `dir` for a model of `vocab_size` tokens, in the
/// order llama.cpp's converter writes it: `tokenizer.ggml.model` `gpt2`, `.pre`, `.tokens`,
/// `.token_type`, `.merges`, the special token ids, `add_*_token`, `tokenizer.chat_template`.
///
/// # Errors
/// [`ModelError::InvalidArgument`] naming the file: no `tokenizer.json`, not a BPE vocabulary,
/// a token id ≥ `vocab_size`, an unsupported post-processor or added token; I/O errors.
pub(crate) fn tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let tok = read_json(&path)?.ok_or_else(|| {
        bad(
            &path,
            "not found: a gguf export needs the checkpoint's tokenizer.json (pass the source model directory)",
        )
    })?;
    if !tok["normalizer"].is_null() {
        return Err(bad(
            &path,
            "a normalizer is not supported by the gguf export (gpt-oss's tokenizer has none)",
        ));
    }
    let (tokens, types) = tokens(&tok, &path, vocab_size)?;
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::Str(PRE_TOKENIZER.into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::StrArray(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::I32Array(types),
        ),
    ];
    let merges = merges(&tok, &path)?;
    if !merges.is_empty() {
        meta.push(("tokenizer.ggml.merges".into(), Value::StrArray(merges)));
    }
    special(dir, &tok, &path, &mut meta)?;
    Ok(meta)
}
