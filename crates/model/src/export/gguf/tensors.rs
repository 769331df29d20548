//! The tensors of a gpt-oss GGUF as llama.cpp's converter lays them out
//! (`conversion/gpt_oss.py` `GptOssModel`, `conversion/base.py` `prepare_tensors`,
//! `gguf-py/gguf/tensor_mapping.py`): GGUF names, ggml types, dims, order, and the bytes.
//!
//! - Experts as ggml `MXFP4` (`block_mxfp4`: the E8M0 scale byte, then 16 bytes whose low nibble
//!   is value `j` and high nibble value `j + 16` of the block), `gate_up_proj` split into
//!   `ffn_gate_exps` (even rows) and `ffn_up_exps` (odd rows), dims `[in, out, E]`. They come first,
//!   in the order of their HF `_scales` names sorted as strings (down, then gate and up, per layer).
//! - Then every other tensor in the order of its HF name sorted as strings; `gate_up_proj_bias`
//!   split into the gate (even) and up (odd) biases; `sinks` as `attn_sinks.weight`.
//! - Types: `F32` for vectors, norms, the router and biases; the export's float dtype (`BF16` by
//!   default, `F16`, `F32`) for the other matrices.
//!
//! The order is the one the converter gives for a single-file checkpoint (it sorts names within
//! each safetensors file); llama.cpp finds tensors by name, so order only matters for byte equality.

use std::io::Write;

use candle_core::{DType, Tensor};

use super::super::mxfp4::expert_dims as mxfp4_dims;
use super::file::{GgmlType, TensorInfo};
use crate::error::{ModelError, Result};
use crate::spec::{ParamKind, TensorSpec};

/// Which rows of an expert parameter a GGUF tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// Every output row (`down_proj`).
    All,
    /// Even output rows (`gate` of the interleaved `gate_up_proj`).
    Even,
    /// Odd output rows (`up`).
    Odd,
}

impl Rows {
    fn keep(self, r: usize) -> bool {
        match self {
            Self::All => true,
            Self::Even => r % 2 == 0,
            Self::Odd => r % 2 == 1,
        }
    }
}

/// Where a GGUF tensor's values come from: an index into the parameter specs given to [`plan`].
#[derive(Clone, Copy)]
pub(crate) enum Source {
    /// A float parameter, whole, converted to the ggml type.
    Float(usize),
    /// A float parameter `[.., n]`, only the even or odd entries of its last dim.
    Strided(usize, Rows),
    /// An expert weight `[E, in, out]`, `rows` of its output rows as ggml MXFP4.
    Experts(usize, Rows),
}

/// One tensor of the file and where its bytes come from.
pub(crate) struct Planned {
    /// Name, type, dims.
    pub info: TensorInfo,
    /// The values.
    pub source: Source,
}

/// `model.layers.{i}.{rest}` → `(i, rest)`.
fn layer(hf: &str) -> Option<(&str, &str)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    i.bytes().all(|b| b.is_ascii_digit()).then_some((i, rest))
}

/// The GGUF name of an HF tensor name (llama.cpp's `tensor_mapping.py` entries of the gpt-oss
/// architecture), `None` for names it does not know.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let (i, rest) = layer(hf)?;
            let (module, suffix) = match rest.rsplit_once('.') {
                Some((m, s @ ("weight" | "bias"))) => (m, s),
                _ => (rest, "weight"),
            };
            let g = match module {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "post_attention_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.sinks" => "attn_sinks",
                "mlp.router" => "ffn_gate_inp",
                "mlp.experts.gate_proj" => "ffn_gate_exps",
                "mlp.experts.up_proj" => "ffn_up_exps",
                "mlp.experts.down_proj" => "ffn_down_exps",
                _ => return None,
            };
            format!("blk.{i}.{g}.{suffix}")
        }
    })
}

/// The ggml type of a float tensor named `name` (GGUF) of rank `rank` (`prepare_tensors`).
fn float_type(name: &str, rank: usize, matrix: GgmlType) -> GgmlType {
    let f32_only = rank <= 1
        || name.ends_with("_norm.weight")
        || name.ends_with("ffn_gate_inp.weight")
        || !name.ends_with(".weight");
    if f32_only {
        GgmlType::F32
    } else {
        matrix
    }
}

fn unknown(hf: &str) -> ModelError {
    ModelError::arg(
        "gguf",
        format!("tensor `{hf}` has no llama.cpp gpt-oss name"),
    )
}

fn float(gguf: String, shape: &[usize], src: Source, matrix: GgmlType) -> Planned {
    Planned {
        info: TensorInfo {
            ggml_type: float_type(&gguf, shape.len(), matrix),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            name: gguf,
        },
        source: src,
    }
}

/// The GGUF tensors of the parameters `specs` (expert weights `[E, in, out]`) in the
/// converter's order; `matrix` is the type of the float matrices.
///
/// # Errors
/// [`ModelError::InvalidArgument`] for a tensor without a gpt-oss GGUF name;
/// [`ModelError::Mxfp4`] for an expert weight whose `in` is no multiple of 32.
pub(crate) fn plan(specs: &[TensorSpec], matrix: GgmlType) -> Result<Vec<Planned>> {
    // the HF names of an MXFP4 checkpoint: experts as `<param>_scales` (the converter emits
    // the MXFP4 tensors when it meets the scales), the rest as themselves
    let mut experts: Vec<(String, usize)> = Vec::new();
    let mut others: Vec<(&str, usize)> = Vec::new();
    for (k, s) in specs.iter().enumerate() {
        if s.kind == ParamKind::Expert {
            experts.push((format!("{}_scales", s.name), k));
        } else {
            others.push((&s.name, k));
        }
    }
    experts.sort();
    others.sort();
    let mut out = Vec::new();
    for (_, k) in experts {
        let param = &specs[k].name;
        let (e, inn, rows) = mxfp4_dims(&specs[k])?;
        let (e, inn, rows) = (e as u64, inn as u64, rows as u64);
        let parts: &[(&str, Rows)] = if param.ends_with("gate_up_proj") {
            &[("gate_proj", Rows::Even), ("up_proj", Rows::Odd)]
        } else {
            &[("down_proj", Rows::All)]
        };
        for &(part, sel) in parts {
            let hf = param.replace(
                if sel == Rows::All {
                    "down_proj"
                } else {
                    "gate_up_proj"
                },
                part,
            ) + ".weight";
            let name = gguf_name(&hf).ok_or_else(|| unknown(&hf))?;
            let n_rows = if sel == Rows::All { rows } else { rows / 2 };
            out.push(Planned {
                info: TensorInfo {
                    name,
                    ggml_type: GgmlType::Mxfp4,
                    dims: vec![inn, n_rows, e],
                },
                source: Source::Experts(k, sel),
            });
        }
    }
    for (hf, k) in others {
        let shape = &specs[k].shape;
        if hf.ends_with("mlp.experts.gate_up_proj_bias") {
            let mut half = shape.clone();
            if let Some(last) = half.last_mut() {
                *last /= 2;
            }
            for (part, sel) in [("gate_proj", Rows::Even), ("up_proj", Rows::Odd)] {
                let h = hf.replace("gate_up_proj_bias", &format!("{part}.bias"));
                let g = gguf_name(&h).ok_or_else(|| unknown(&h))?;
                out.push(float(g, &half, Source::Strided(k, sel), matrix));
            }
            continue;
        }
        let h = hf.replace("down_proj_bias", "down_proj.bias");
        let g = gguf_name(&h).ok_or_else(|| unknown(hf))?;
        out.push(float(g, shape, Source::Float(k), matrix));
    }
    Ok(out)
}

/// Writes HF MXFP4 experts (`blocks` `[E, out, nb, 16]`, `scales` `[E, out, nb]`, u8 row-major)
/// as ggml `block_mxfp4` rows `[E, rows, nb · 17]`, keeping the output rows `rows` selects.
pub(crate) fn write_ggml_mxfp4(
    blocks: &[u8],
    scales: &[u8],
    (e, out, nb): (usize, usize, usize),
    rows: Rows,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(nb * 17);
    for x in 0..e {
        for r in (0..out).filter(|&r| rows.keep(r)) {
            buf.clear();
            for b in 0..nb {
                let i = (x * out + r) * nb + b;
                buf.push(scales[i]);
                let q = &blocks[i * 16..i * 16 + 16];
                // HF: byte i holds values 2i (low nibble) and 2i+1 (high); ggml: byte j holds
                // values j (low) and j+16 (high)
                let v = |k: usize| (q[k / 2] >> (4 * (k % 2))) & 0x0F;
                buf.extend((0..16).map(|j| v(j) | (v(j + 16) << 4)));
            }
            w.write_all(&buf)?;
        }
    }
    Ok(())
}

/// The even or odd entries of the last dim of `t` as a new tensor (`[.., n/2]`, same dtype).
pub(crate) fn strided(t: &Tensor, rows: Rows) -> Result<Tensor> {
    let d = t.dims();
    let Some(&n) = d.last() else {
        return Err(ModelError::arg(
            "gguf",
            "cannot split the last dim of a scalar",
        ));
    };
    let mut shape = d.to_vec();
    shape.push(2);
    shape[d.len() - 1] = n / 2;
    let start = usize::from(rows == Rows::Odd);
    Ok(t.to_dtype(DType::F32)?
        .reshape(shape)?
        .narrow(d.len(), start, 1)?
        .squeeze(d.len())?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.layers.3.self_attn.sinks", "blk.3.attn_sinks.weight"),
            (
                "model.layers.0.self_attn.o_proj.bias",
                "blk.0.attn_output.bias",
            ),
            (
                "model.layers.12.mlp.router.weight",
                "blk.12.ffn_gate_inp.weight",
            ),
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.post_attention_norm.weight",
            ),
        ];
        for (hf, g) in cases {
            assert_eq!(gguf_name(hf).as_deref(), Some(g), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.x.self_attn.q_proj.weight"), None);
    }

    #[test]
    fn mxfp4_block_moves_nibbles_and_puts_the_scale_first() {
        // one block: values k = 0..32 stored HF-style (value 2i low, 2i+1 high), as k % 16
        let vals: Vec<u8> = (0..32).map(|k| (k % 16) as u8).collect();
        let blocks: Vec<u8> = (0..16)
            .map(|i| vals[2 * i] | (vals[2 * i + 1] << 4))
            .collect();
        let mut out = Vec::new();
        write_ggml_mxfp4(&blocks, &[127], (1, 1, 1), Rows::All, &mut out).unwrap();
        assert_eq!(out.len(), 17);
        assert_eq!(out[0], 127);
        for j in 0..16 {
            assert_eq!(out[1 + j] & 0x0F, vals[j], "low nibble of byte {j}");
            assert_eq!(out[1 + j] >> 4, vals[j + 16], "high nibble of byte {j}");
        }
    }
}
