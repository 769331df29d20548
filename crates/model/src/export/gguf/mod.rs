//! GGUF export: one `.gguf` file that llama.cpp loads as it loads the output of its own
//! converter (`convert_hf_to_gguf.py`, `GptOssModel`), experts in ggml's native MXFP4, attention
//! sinks, sliding-window and YaRN metadata, and the tokenizer of the source checkpoint.
//!
//! Checked byte for byte against a file made by the converter (llama.cpp commit `0c1e570`) from
//! the same tiny checkpoint: `crates/model/tests/export_gguf.rs`. See `docs/export.md` for what
//! of the converter's metadata is left out.
//!
//! Modules: [`file`] (the GGUF v3 container), [`meta`] (`general.*`, `gpt-oss.*`), [`vocab`]
//! (`tokenizer.*`), [`tensors`] (names, types, order, MXFP4 repacking).

mod file;
mod meta;
mod tensors;
mod vocab;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::source::ParamSource;
use super::writer::{io, write_err};
use super::{mxfp4, ExportFormat, ExportOptions, ExportReport, QuantError};
use crate::error::{ModelError, Result};
use crate::spec::TensorSpec;
use file::{write_gguf, GgmlType};
use tensors::{plan, strided, write_ggml_mxfp4, Source};

/// gguf-py's `Metadata.id_to_title`: `-` to spaces, each all-lowercase word title-cased unless it
/// is a version (`v1.2`) or starts with a digit.
fn id_to_title(id: &str) -> String {
    id.replace('-', " ")
        .split_whitespace()
        .map(|w| {
            let has_cased = w.chars().any(char::is_alphabetic);
            let lower = has_cased && !w.chars().any(char::is_uppercase);
            let version = w.starts_with(|c: char| c.is_ascii_digit())
                || (w.starts_with('v')
                    && w.len() > 1
                    && w[1..]
                        .split('.')
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
            if !lower || version {
                return w.to_string();
            }
            let mut prev_alpha = false;
            w.chars()
                .map(|c| {
                    let out = if prev_alpha {
                        c.to_lowercase().collect::<String>()
                    } else {
                        c.to_uppercase().collect::<String>()
                    };
                    prev_alpha = c.is_alphabetic();
                    out
                })
                .collect()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The ggml type of the float matrices for the export dtype.
fn matrix_type(dtype: DType) -> Result<GgmlType> {
    match dtype {
        DType::BF16 => Ok(GgmlType::Bf16),
        DType::F16 => Ok(GgmlType::F16),
        DType::F32 => Ok(GgmlType::F32),
        d => Err(ModelError::arg(
            "dtype",
            format!("{d:?}: a gguf export stores bf16, f16 or f32 matrices"),
        )),
    }
}

/// `<out>.tmp`.
fn tmp_file(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

/// HF MXFP4 blocks and scales of one expert parameter, with `(E, out, in/32)`.
struct HfBlocks {
    param: String,
    blocks: Vec<u8>,
    scales: Vec<u8>,
    dims: (usize, usize, usize),
}

/// The blocks/scales of the expert weight `spec`: the stored ones as they are, others quantized
/// (with the quantization error pushed to `report`).
fn hf_blocks(
    src: &dyn ParamSource,
    spec: &TensorSpec,
    dtype: DType,
    report: &mut Vec<QuantError>,
) -> Result<HfBlocks> {
    let host = |t: &Tensor| -> Result<Vec<u8>> {
        Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?)
    };
    if let Some((b, s)) = src.packed(spec)? {
        report.push(QuantError::passed_through(&spec.name));
        return Ok(HfBlocks {
            param: spec.name.clone(),
            blocks: host(&b)?,
            scales: host(&s)?,
            dims: s.dims3()?,
        });
    }
    let (e, inn, out) = mxfp4::expert_dims(spec)?;
    let mut blocks = Vec::with_capacity(e * out * inn / 2);
    let (scales, q) = mxfp4::quantize_source(src, spec, dtype, &mut blocks)?;
    report.push(q);
    Ok(HfBlocks {
        param: spec.name.clone(),
        blocks,
        scales,
        dims: (e, out, inn / 32),
    })
}

/// Writes the GGUF of `src` to `tmp` and returns the report (with `out` as the file).
fn write_file(
    src: &dyn ParamSource,
    tmp: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let dir = opts.source_dir.as_deref().ok_or_else(|| {
        ModelError::arg(
            "source_dir",
            "a gguf export needs the source checkpoint directory (its tokenizer.json and tokenizer_config.json)",
        )
    })?;
    let matrix = matrix_type(opts.dtype)?;
    let specs = src.specs();
    let planned = plan(&specs, matrix)?;
    let infos: Vec<file::TensorInfo> = planned.iter().map(|p| p.info.clone()).collect();
    let cfg_text = super::stored_config(src.config(), true, Some(opts.dtype)).to_json()?;
    let cfg: serde_json::Value =
        serde_json::from_str(&cfg_text).map_err(|e| ModelError::arg("config", e.to_string()))?;
    let name = out
        .file_stem()
        .map(|s| id_to_title(&s.to_string_lossy()))
        .unwrap_or_else(|| "gpt-oss".into());
    let mut metadata = meta::model_metadata(&cfg, &name, &infos)?;
    metadata.extend(vocab::tokenizer_metadata(dir, src.config().vocab_size)?);

    let mut report = Vec::new();
    let mut cached: Option<HfBlocks> = None;
    let size = write_gguf(tmp, &metadata, &infos, |i, w| {
        let p = &planned[i];
        let float_dtype = match p.info.ggml_type {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            _ => DType::BF16,
        };
        if !matches!(p.source, Source::Experts(..)) {
            cached = None; // the experts come first: their last blocks are not needed any more
        }
        match p.source {
            Source::Float(k) => super::bf16::write_float(
                &src.tensor(&specs[k], float_dtype)?,
                float_dtype,
                &p.info.name,
                w,
            ),
            Source::Strided(k, rows) => super::bf16::write_float(
                &strided(&src.tensor(&specs[k], float_dtype)?, rows)?,
                float_dtype,
                &p.info.name,
                w,
            ),
            Source::Experts(k, rows) => {
                let spec = &specs[k];
                if cached.as_ref().map(|c| &c.param) != Some(&spec.name) {
                    cached = None; // free the previous parameter's blocks first
                    cached = Some(hf_blocks(src, spec, opts.dtype, &mut report)?);
                }
                let c = cached
                    .as_ref()
                    .ok_or_else(|| ModelError::arg("gguf", "internal: no blocks"))?;
                write_ggml_mxfp4(&c.blocks, &c.scales, c.dims, rows, w).map_err(write_err)
            }
        }
    })?;
    Ok(ExportReport {
        dir: out.to_path_buf(),
        format: ExportFormat::Gguf,
        files: vec![out.to_path_buf()],
        tensors: infos.len(),
        total_bytes: size,
        copied: Vec::new(),
        quantization: report,
    })
}

/// Exports the parameters of `src` as the GGUF file `out`, written to
/// `<out>.tmp` and renamed when complete (a failed export removes the `.tmp`).
/// `opts.source_dir` must hold the tokenizer files; `opts.dtype` is the type of the float
/// matrices; `max_shard_bytes` does not apply (one file).
///
/// # Errors
/// [`ModelError::InvalidArgument`]: `out` a directory, or an existing file without `overwrite`,
/// no source directory or tokenizer, an unsupported tokenizer or config; I/O errors naming the
/// file; [`ModelError::Mxfp4`] for experts that cannot be quantized.
pub(crate) fn export_gguf(
    src: &dyn ParamSource,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    if out.is_dir() {
        return Err(ModelError::arg(
            "out",
            format!(
                "{} is a directory; a gguf export writes one file (e.g. model.gguf)",
                out.display()
            ),
        ));
    }
    if out.exists() && !opts.overwrite {
        return Err(ModelError::arg(
            "out",
            format!(
                "{} exists; choose another file or pass --overwrite",
                out.display()
            ),
        ));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = tmp_file(out);
    let r = write_file(src, &tmp, out, opts)
        .and_then(|r| std::fs::rename(&tmp, out).map_err(io(out)).map(|()| r));
    if r.is_err() {
        // best effort: the error that matters is the export's
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_like_gguf_py() {
        assert_eq!(id_to_title("gpt-oss-tiny"), "Gpt Oss Tiny");
        assert_eq!(id_to_title("gpt-oss-20b-v1.2"), "Gpt Oss 20b v1.2");
        assert_eq!(id_to_title("My-Model"), "My Model");
    }
}
