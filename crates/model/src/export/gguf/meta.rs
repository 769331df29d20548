//! The `general.*` and `gpt-oss.*` metadata of a gpt-oss GGUF, from the `config.json` the export
//! would write, as llama.cpp's converter derives them (`conversion/base.py`:
//! `ModelBase.prepare_metadata`, `TextModel.__init__` and `set_gguf_parameters`;
//! `conversion/gpt_oss.py`: `GptOssModel.set_gguf_parameters`; `gguf-py/gguf/utility.py`:
//! `size_label`).

use serde_json::Value as Json;

use super::file::{TensorInfo, Value};
use crate::error::{ModelError, Result};

/// llama.cpp's architecture name.
pub(crate) const ARCH: &str = "gpt-oss";
/// `general.file_type` of a GGUF with MXFP4 experts (`LlamaFileType.MOSTLY_MXFP4_MOE`).
const FILE_TYPE_MXFP4_MOE: u32 = 38;
/// `general.quantization_version` (`GGML_QUANT_VERSION`).
const QUANT_VERSION: u32 = 2;

fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

fn field<'a>(cfg: &'a Json, names: &[&str]) -> Option<&'a Json> {
    names
        .iter()
        .find_map(|n| cfg.get(*n).filter(|v| !v.is_null()))
}

fn u32_of(cfg: &Json, names: &[&str]) -> Result<Option<Value>> {
    field(cfg, names)
        .map(|v| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Value::U32)
                .ok_or_else(|| {
                    ModelError::arg(
                        "gguf",
                        format!("config.json `{}`: expected a u32, got {v}", names[0]),
                    )
                })
        })
        .transpose()
}

fn f32_of(v: &Json, name: &str) -> Result<Value> {
    v.as_f64().map(|x| Value::F32(x as f32)).ok_or_else(|| {
        ModelError::arg(
            "gguf",
            format!("config.json `{name}`: expected a number, got {v}"),
        )
    })
}

/// gguf-py's `model_weight_count_rounded_notation` (`min_digits` 2).
fn rounded(n: u64) -> String {
    let n = n as f64;
    let (x, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    // Python's round() is round-half-even; the digit count of the integer part decides
    let r = x.round_ties_even() as u64;
    let digits = r.to_string().trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{x:.fix$}{suffix}")
}

/// `general.size_label` of the tensors (`GGUFWriter.get_total_parameter_count` + `size_label`):
/// `{experts}x{shared + per-expert params}` for a mixture of experts.
pub(crate) fn size_label(tensors: &[TensorInfo]) -> String {
    let (mut total, mut shared, mut expert, mut expert_sum, mut n_expert) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for t in tensors {
        let size: u64 = t.dims.iter().product();
        if t.name.contains("_exps.") && t.dims.len() >= 3 {
            // numpy shape[-3] (weights) or shape[-2] (biases) = ggml dims[2] or dims[1]
            let e = if t.name.contains(".bias") {
                t.dims[1]
            } else {
                t.dims[2]
            };
            expert += size / e.max(1);
            expert_sum += e;
            n_expert += 1;
        } else {
            shared += size;
        }
        total += size;
    }
    match expert_sum.checked_div(n_expert) {
        Some(e) => format!("{e}x{}", rounded(shared + expert)),
        None => rounded(total),
    }
}

/// The metadata before the tokenizer's, in the converter's order: `general.architecture`,
/// `general.type`, `general.name` (`name`), `general.size_label`, the `gpt-oss.*` hyperparameters
/// of `cfg` (the exported `config.json`), `general.file_type`, `general.quantization_version`.
///
/// # Errors
/// [`ModelError::InvalidArgument`] naming a config field of the wrong type.
pub(crate) fn model_metadata(
    cfg: &Json,
    name: &str,
    tensors: &[TensorInfo],
) -> Result<Vec<(String, Value)>> {
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(ARCH.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.size_label".into(), Value::Str(size_label(tensors))),
    ];
    let push_u32 = |m: &mut Vec<(String, Value)>, k: &str, names: &[&str]| -> Result<()> {
        if let Some(v) = u32_of(cfg, names)? {
            m.push((key(k), v));
        }
        Ok(())
    };
    push_u32(
        &mut m,
        "block_count",
        &["n_layers", "num_hidden_layers", "n_layer", "num_layers"],
    )?;
    push_u32(
        &mut m,
        "context_length",
        &[
            "max_position_embeddings",
            "n_ctx",
            "n_positions",
            "max_length",
            "max_sequence_length",
            "model_max_length",
        ],
    )?;
    push_u32(
        &mut m,
        "embedding_length",
        &["hidden_size", "n_embd", "dim"],
    )?;
    push_u32(
        &mut m,
        "feed_forward_length",
        &[
            "prefix_dense_intermediate_size",
            "dense_intermediate_size",
            "intermediate_size",
            "n_inner",
            "hidden_dim",
        ],
    )?;
    push_u32(
        &mut m,
        "attention.head_count",
        &["num_attention_heads", "n_head", "n_heads"],
    )?;
    push_u32(
        &mut m,
        "attention.head_count_kv",
        &["num_key_value_heads", "n_kv_heads"],
    )?;
    rope(cfg, &mut m)?;
    if let Some(v) = field(cfg, &["rms_norm_eps", "norm_eps"]) {
        m.push((
            key("attention.layer_norm_rms_epsilon"),
            f32_of(v, "rms_norm_eps")?,
        ));
    }
    push_u32(
        &mut m,
        "expert_count",
        &["num_local_experts", "num_experts", "n_routed_experts"],
    )?;
    push_u32(
        &mut m,
        "expert_used_count",
        &[
            "num_experts_per_tok",
            "num_experts_per_token",
            "top_k_experts",
        ],
    )?;
    if let Some(v) = u32_of(cfg, &["head_dim"])? {
        m.push((key("attention.key_length"), v.clone()));
        m.push((key("attention.value_length"), v));
    }
    m.push(("general.file_type".into(), Value::U32(FILE_TYPE_MXFP4_MOE)));
    push_u32(&mut m, "attention.sliding_window", &["sliding_window"])?;
    push_u32(&mut m, "expert_feed_forward_length", &["intermediate_size"])?;
    m.push((
        "general.quantization_version".into(),
        Value::U32(QUANT_VERSION),
    ));
    Ok(m)
}

/// The RoPE keys: YaRN scaling (type, factor, original context, attention factor, betas) and
/// the base, from `rope_parameters` (else `rope_scaling`) with `rope_theta` mirrored in.
fn rope(cfg: &Json, m: &mut Vec<(String, Value)>) -> Result<()> {
    let empty = Json::Object(Default::default());
    let params = match cfg.get("rope_parameters") {
        Some(p) if !p.is_null() => p,
        _ => cfg
            .get("rope_scaling")
            .filter(|p| !p.is_null())
            .unwrap_or(&empty),
    };
    let params = params.get("full_attention").unwrap_or(params);
    let rope_type = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Json::as_str);
    if let (Some(t), Some(factor)) = (rope_type, params.get("factor").filter(|f| !f.is_null())) {
        match t {
            "linear" => {
                m.push((key("rope.scaling.type"), Value::Str("linear".into())));
                m.push((key("rope.scaling.factor"), f32_of(factor, "rope_scaling.factor")?));
            }
            "yarn" => {
                m.push((key("rope.scaling.type"), Value::Str("yarn".into())));
                m.push((key("rope.scaling.factor"), f32_of(factor, "rope_scaling.factor")?));
                let orig = u32_of(params, &["original_max_position_embeddings"])?.ok_or_else(|| {
                    ModelError::arg("gguf", "config.json rope_scaling: yarn needs original_max_position_embeddings")
                })?;
                m.push((key("rope.scaling.original_context_length"), orig));
                for (name, k) in [
                    ("extrapolation_factor", "rope.scaling.yarn_ext_factor"),
                    ("attention_factor", "rope.scaling.yarn_attn_factor"),
                    ("beta_fast", "rope.scaling.yarn_beta_fast"),
                    ("beta_slow", "rope.scaling.yarn_beta_slow"),
                ] {
                    let v = params
                        .get(name)
                        .filter(|v| !v.is_null())
                        .or_else(|| (name == "attention_factor").then(|| params.get("attn_factor")).flatten());
                    if let Some(v) = v.filter(|v| !v.is_null()) {
                        m.push((key(k), f32_of(v, name)?));
                    }
                }
            }
            other => {
                return Err(ModelError::arg(
                    "gguf",
                    format!("config.json rope_scaling.rope_type {other:?}: the gguf export writes yarn or linear"),
                ))
            }
        }
    }
    let theta = params
        .get("rope_theta")
        .filter(|v| !v.is_null())
        .or_else(|| {
            field(
                cfg,
                &[
                    "global_rope_theta",
                    "rope_global_theta",
                    "rope_theta_global",
                    "rope_theta",
                    "rotary_emb_base",
                ],
            )
        });
    if let Some(t) = theta {
        m.push((key("rope.freq_base"), f32_of(t, "rope_theta")?));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounded_notation_matches_gguf_py() {
        // model_weight_count_rounded_notation(n, min_digits=2)
        assert_eq!(rounded(20_914_757_184), "21B");
        assert_eq!(rounded(1_500_000), "1.5M");
        assert_eq!(rounded(999), "1.0K");
        assert_eq!(rounded(120_000), "120K");
    }
}
