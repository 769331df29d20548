//! Export of a (merged) model as a checkpoint directory that transformers, vLLM and this crate
//! load: the Hugging Face layout in bf16 ([`ExportFormat::Bf16`]) or with the experts
//! re-quantized to MXFP4 as the released gpt-oss checkpoints store them ([`ExportFormat::Mxfp4`]).
//!
//! ```no_run
//! use std::path::Path;
//! use candle_core::{DType, Device};
//! use gptoss_model::export::{export, ExportFormat, ExportOptions};
//! use gptoss_model::{load_with, ExpertLoading, LoadOptions};
//!
//! let opts = LoadOptions { dtype: DType::F32, experts: ExpertLoading::Resident };
//! let model = load_with("gpt-oss-20b", &Device::Cpu, &opts)?;
//! // ... merge an adapter into `model` (gptoss_lora::LoraModel::merge_and_unload) ...
//! let mut export_opts = ExportOptions::new(ExportFormat::Mxfp4);
//! export_opts.source_dir = Some("gpt-oss-20b".into()); // tokenizer files, generation_config.json
//! let report = export(&model, Path::new("gpt-oss-20b-merged"), &export_opts)?;
//! println!("{}", report.summary());
//! # Ok::<(), gptoss_model::ModelError>(())
//! ```
//!
//! What is written (`docs/export.md`):
//! - `config.json`: the model's config; without `quantization_config` for bf16, with
//!   `{"quant_method": "mxfp4", "modules_to_not_convert": [...]}` (as openai/gpt-oss-20b) for
//!   MXFP4; `dtype` set to the stored float dtype.
//! - the weights: one `model.safetensors` when they fit in [`ExportOptions::max_shard_bytes`]
//!   (5 GB), else `model-0000i-of-0000n.safetensors` shards of at most that size plus
//!   `model.safetensors.index.json` (what `save_pretrained` writes). MXFP4: experts as
//!   `model.layers.{i}.mlp.experts.{gate_up,down}_proj_blocks` / `_scales`; everything else
//!   (attention, sinks, router, norms, embeddings, lm_head, expert biases) in the float dtype.
//! - `generation_config.json` and the tokenizer files ([`TOKENIZER_FILES`]) copied from
//!   [`ExportOptions::source_dir`] when present there (a default `generation_config.json`
//!   otherwise).
//!
//! Streaming: tensor by tensor (expert weights expert by expert), each shard's header first, so
//! [`export`] holds at most one tensor on the host besides the model, and [`export_checkpoint`],
//! which reads a checkpoint directory (plus a [`WeightDelta`]: an adapter being merged) instead of
//! a loaded model, holds about one tensor in all (gguf: plus the tokenizer metadata); everything goes to `<out>.tmp`, which is renamed
//! to `<out>` only when complete.
//!
//! [`ExportFormat::Gguf`] writes one `.gguf` file instead (`out` is the file): llama.cpp's gpt-oss
//! GGUF as its `convert_hf_to_gguf.py` writes it, experts in ggml MXFP4, the tokenizer of
//! [`ExportOptions::source_dir`] (required); see the `gguf` module and `docs/export.md`.

mod bf16;
mod gguf;
mod mxfp4;
mod source;
pub(crate) mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

pub use mxfp4::QuantError;
pub(crate) use source::ModelParams;
pub use source::WeightDelta;
use source::{CheckpointParams, ParamSource};
pub(crate) use writer::Sharding;
use writer::{io, write_checkpoint_files, write_err, TensorEntry, Written};

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::hooks::ExpertParam;
use crate::model::GptOssForCausalLM;
use crate::spec::ParamKind;

/// Largest shard of an export by default: 5 GB (10^9 bytes), transformers' `max_shard_size`.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The tokenizer and chat-template files copied from [`ExportOptions::source_dir`] when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// The weight format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Every tensor in the float dtype (bf16 by default), no `quantization_config`.
    Bf16,
    /// Expert weights as MXFP4 `_blocks`/`_scales`, everything else in the float dtype, with
    /// the `mxfp4` `quantization_config`.
    Mxfp4,
    /// One llama.cpp GGUF file: experts in ggml MXFP4, other matrices in the float dtype,
    /// vectors in f32, the tokenizer metadata of the source checkpoint.
    Gguf,
}

impl FromStr for ExportFormat {
    type Err = ModelError;

    /// `"bf16"`, `"mxfp4"` or `"gguf"`.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" => Ok(Self::Bf16),
            "mxfp4" => Ok(Self::Mxfp4),
            "gguf" => Ok(Self::Gguf),
            other => Err(ModelError::arg(
                "format",
                format!("{other:?}: expected bf16, mxfp4 or gguf"),
            )),
        }
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bf16 => "bf16",
            Self::Mxfp4 => "mxfp4",
            Self::Gguf => "gguf",
        })
    }
}

/// How [`export`] and [`export_checkpoint`] write.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The weight format.
    pub format: ExportFormat,
    /// Largest shard in bytes of tensor data (default [`DEFAULT_MAX_SHARD_BYTES`]); a tensor
    /// larger than this gets a shard of its own.
    pub max_shard_bytes: u64,
    /// Replace a non-empty output directory (default `false`: that is an error).
    pub overwrite: bool,
    /// The checkpoint the model came from: its `generation_config.json` and [`TOKENIZER_FILES`]
    /// are copied when present. Must not be the output directory.
    pub source_dir: Option<PathBuf>,
    /// The float dtype of every non-MXFP4 tensor and the dtype the experts are cast to before
    /// quantizing (default `BF16`; `F32` keeps a merge exact, `F16` is allowed).
    pub dtype: DType,
    /// [`export_checkpoint`]: the dtype a weight a delta changes is read in and merged in, as a
    /// model loaded in that dtype would be merged (default `F32`: one rounding, at the store;
    /// `BF16`: what merging a bf16 model gives). [`export`] merges nothing.
    pub merge_dtype: DType,
}

impl ExportOptions {
    /// `format` with the defaults: 5 GB shards, no overwrite, no source dir, bf16, merges in f32.
    pub fn new(format: ExportFormat) -> Self {
        Self {
            format,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            overwrite: false,
            source_dir: None,
            dtype: DType::BF16,
            merge_dtype: DType::F32,
        }
    }
}

/// What [`export`] or [`export_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The output directory (gguf: the output file).
    pub dir: PathBuf,
    /// The weight format.
    pub format: ExportFormat,
    /// The safetensors files, in order (gguf: the file).
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data (gguf: the file size).
    pub total_bytes: u64,
    /// Files copied from the source directory (names).
    pub copied: Vec<String>,
    /// One entry per MXFP4 expert tensor (empty for bf16), in file order (gguf: per expert
    /// parameter, before its split into gate and up).
    pub quantization: Vec<QuantError>,
}

impl ExportReport {
    /// The largest [`QuantError::rel_rms`] (0 without MXFP4 tensors).
    pub fn max_rel_rms(&self) -> f64 {
        self.quantization
            .iter()
            .map(|q| q.rel_rms)
            .fold(0.0, f64::max)
    }

    /// One line: format, tensors, bytes, shards and (MXFP4) the quantization error.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "exported {} ({}): {} tensors, {:.3} GB in {} file(s)",
            self.dir.display(),
            self.format,
            self.tensors,
            self.total_bytes as f64 / 1e9,
            self.files.len()
        );
        if !self.quantization.is_empty() {
            let re = self.quantization.iter().filter(|q| q.requantized).count();
            s.push_str(&format!(
                "; {} MXFP4 expert tensors ({} re-quantized, {} passed through), max relative RMS error {:.4}",
                self.quantization.len(),
                re,
                self.quantization.len() - re,
                self.max_rel_rms()
            ));
        }
        s
    }

    /// The report as JSON (`dir`, `format`, `files`, `tensors`, `total_bytes`, `copied`,
    /// `quantization`: `[{name, rel_rms, max_abs, requantized}]`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dir": self.dir,
            "format": self.format.to_string(),
            "files": self.files,
            "tensors": self.tensors,
            "total_bytes": self.total_bytes,
            "copied": self.copied,
            "max_rel_rms": self.max_rel_rms(),
            "quantization": self.quantization,
        })
    }
}

/// How [`write_weights`] stores the tensors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightOptions {
    /// Experts as MXFP4 blocks/scales (resident ones unchanged, dense ones quantized).
    pub mxfp4_experts: bool,
    /// The float dtype of everything else (and of the experts before quantizing).
    pub dtype: DType,
    /// How the tensors are split into files.
    pub sharding: Sharding,
}

/// The config an export stores: `quantization_config` dropped (dense experts) or set to the
/// model's own `mxfp4` one, else the released gpt-oss one (MXFP4 experts); `dtype` (and
/// `torch_dtype` where present) set to `dtype` when given.
pub(crate) fn stored_config(config: &Config, mxfp4_experts: bool, dtype: Option<DType>) -> Config {
    let mut c = config.clone();
    if !mxfp4_experts {
        c.quantization_config = None;
    } else if !c.is_mxfp4() {
        c.quantization_config = Config::gpt_oss_20b().quantization_config;
    }
    if let Some(d) = dtype {
        let name = match d {
            DType::F32 => "float32",
            DType::F16 => "float16",
            _ => "bfloat16",
        };
        c.dtype = Some(name.to_string());
        if c.torch_dtype.is_some() {
            c.torch_dtype = Some(name.to_string());
        }
    }
    c
}

/// Which part of a parameter a file entry holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// A parameter other than an expert weight, whole.
    Whole,
    /// A dense expert weight, written expert by expert.
    Experts,
    /// The MXFP4 blocks of an expert weight.
    Blocks,
    /// The MXFP4 scales of an expert weight.
    Scales,
}

/// Writes every parameter of `src` into `dir` (existing): the safetensors file(s) and, when
/// sharded, the index; no config. Returns what was written, the MXFP4 report and the tensor count.
pub(crate) fn write_weights(
    src: &dyn ParamSource,
    dir: &Path,
    opts: &WeightOptions,
) -> Result<(Written, Vec<QuantError>, usize)> {
    writer::dtype_name(opts.dtype)?;
    let specs = src.specs();
    let mut entries = Vec::new();
    let mut items = Vec::new();
    for (k, spec) in specs.iter().enumerate() {
        let expert = spec.kind == ParamKind::Expert;
        if opts.mxfp4_experts && expert {
            let (e, inn, out) = mxfp4::expert_dims(spec)?;
            for (part, suffix, shape) in [
                (Part::Blocks, "blocks", vec![e, out, inn / 32, 16]),
                (Part::Scales, "scales", vec![e, out, inn / 32]),
            ] {
                entries.push(TensorEntry {
                    name: format!("{}_{suffix}", spec.name),
                    dtype: DType::U8,
                    shape,
                });
                items.push((k, part));
            }
        } else {
            entries.push(TensorEntry {
                name: spec.name.clone(),
                dtype: opts.dtype,
                shape: spec.shape.clone(),
            });
            items.push((k, if expert { Part::Experts } else { Part::Whole }));
        }
    }
    let mut report = Vec::new();
    let mut pending_scales: HashMap<String, Vec<u8>> = HashMap::new();
    let dtype = opts.dtype;
    let written = write_checkpoint_files(dir, &entries, opts.sharding, |i, w| {
        let (k, part) = items[i];
        let spec = &specs[k];
        let name = &spec.name;
        match part {
            Part::Whole => bf16::write_float(&src.tensor(spec, dtype)?, dtype, name, w),
            Part::Experts => {
                for e in 0..spec.shape[0] {
                    bf16::write_float(&src.expert(spec, e, dtype)?, dtype, name, w)?;
                }
                Ok(())
            }
            Part::Blocks => {
                // the scales follow the blocks: keep them rather than reading the weight again
                let scales = match src.packed(spec)? {
                    Some((blocks, scales)) => {
                        report.push(QuantError::passed_through(name));
                        bf16::write_u8(&blocks, w)?;
                        scales
                            .to_device(&Device::Cpu)?
                            .flatten_all()?
                            .to_vec1::<u8>()?
                    }
                    None => {
                        let (scales, q) = mxfp4::quantize_source(src, spec, dtype, w)?;
                        report.push(q);
                        scales
                    }
                };
                pending_scales.insert(name.clone(), scales);
                Ok(())
            }
            Part::Scales => {
                // always after its blocks (entries keep their order across shards)
                let scales = pending_scales.remove(name).ok_or_else(|| {
                    ModelError::arg(name, "internal: MXFP4 scales written before their blocks")
                })?;
                w.write_all(&scales).map_err(write_err)
            }
        }
    })?;
    let n = entries.len();
    Ok((written, report, n))
}

/// Errors unless no linear and no expert of `model` carries an (unmerged) adapter, which an
/// export would silently drop.
fn check_no_adapters(model: &GptOssForCausalLM) -> Result<()> {
    let unmerged = |name: String| {
        ModelError::arg(
            "model",
            format!(
                "`{name}` carries an unmerged adapter, which the export would drop; merge it first \
                 (gptoss_lora::LoraModel::merge_and_unload)"
            ),
        )
    };
    for (i, layer) in model.model.layers.iter().enumerate() {
        for (n, lin) in layer.self_attn.projections() {
            if lin.adapter().is_some() {
                return Err(unmerged(format!("model.layers.{i}.self_attn.{n}")));
            }
        }
        for p in [ExpertParam::GateUp, ExpertParam::Down] {
            if layer.mlp.experts.adapter(p).is_some() {
                return Err(unmerged(format!(
                    "model.layers.{i}.mlp.experts.{}",
                    p.name()
                )));
            }
        }
    }
    if model.lm_head.adapter().is_some() {
        return Err(unmerged("lm_head".into()));
    }
    Ok(())
}

/// `<out>.tmp` next to `out`.
fn tmp_dir(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| {
        ModelError::arg(
            "out",
            format!(
                "{}: needs a directory name (not `/`, `.` or `..`)",
                out.display()
            ),
        )
    })?;
    let mut tmp = name.to_os_string();
    tmp.push(".tmp");
    Ok(out.with_file_name(tmp))
}

/// Checks the output directory and creates a fresh `<out>.tmp` (removing a leftover one).
fn prepare(out: &Path, opts: &ExportOptions) -> Result<PathBuf> {
    if out.exists() && !out.is_dir() {
        return Err(ModelError::arg(
            "out",
            format!("{} exists and is not a directory", out.display()),
        ));
    }
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if non_empty && !opts.overwrite {
        return Err(ModelError::arg(
            "out",
            format!(
                "{} exists and is not empty; choose another directory or pass --overwrite",
                out.display()
            ),
        ));
    }
    if let (Some(src), true) = (&opts.source_dir, out.exists()) {
        let same = match (src.canonicalize(), out.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(ModelError::arg(
                "out",
                format!(
                    "{} is the source checkpoint; export into another directory",
                    out.display()
                ),
            ));
        }
    }
    let tmp = tmp_dir(out)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

/// Replaces `out` by the complete `tmp` (an existing `out` is moved to `<out>.old` first and
/// removed after the rename).
fn finish(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let mut old = out.as_os_str().to_os_string();
        old.push(".old");
        let old = PathBuf::from(old);
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(out, &old).map_err(io(out))?;
        std::fs::rename(tmp, out).map_err(io(out))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(tmp, out).map_err(io(out))?;
    }
    Ok(())
}

/// Everything of [`export`] written into `dir` (the `.tmp` directory).
fn write_all(
    src: &dyn ParamSource,
    dir: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let mxfp4 = opts.format == ExportFormat::Mxfp4;
    let (written, quantization, tensors) = write_weights(
        src,
        dir,
        &WeightOptions {
            mxfp4_experts: mxfp4,
            dtype: opts.dtype,
            sharding: Sharding::UpTo(opts.max_shard_bytes.max(1)),
        },
    )?;
    let mut copied = Vec::new();
    let mut has_generation = false;
    if let Some(src) = &opts.source_dir {
        let names = TOKENIZER_FILES
            .iter()
            .chain(["generation_config.json"].iter());
        for name in names {
            let from = src.join(name);
            if from.is_file() {
                let to = dir.join(name);
                std::fs::copy(&from, &to).map_err(io(&from))?;
                copied.push(name.to_string());
                has_generation |= *name == "generation_config.json";
            }
        }
    }
    if !has_generation {
        let p = dir.join("generation_config.json");
        let text = crate::synthetic::generation_config(src.config());
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    let config = stored_config(src.config(), mxfp4, Some(opts.dtype));
    let p = dir.join("config.json");
    std::fs::write(&p, config.to_json()?).map_err(io(&p))?;
    let files = written
        .files
        .iter()
        .filter_map(|f| f.file_name().map(|n| out.join(n)))
        .collect();
    Ok(ExportReport {
        dir: out.to_path_buf(),
        format: opts.format,
        files,
        tensors,
        total_bytes: written.total_bytes,
        copied,
        quantization,
    })
}

/// Exports `model` (merged: no adapter may be installed) into the directory `out` as
/// `opts.format` says (see the module docs for the files). Writes into `<out>.tmp` and renames
/// it to `out` only when everything is written, so an interrupted or failed export never leaves
/// a complete-looking `out` (a failed one removes its `.tmp`).
///
/// Expert weights `[E, in, out]`: MXFP4-resident ones are written as their blocks/scales
/// unchanged (MXFP4) or dequantized (bf16); dense ones as they are (bf16) or quantized along
/// `in` after a cast to [`ExportOptions::dtype`] (MXFP4), their error in the report.
///
/// A model on disk plus an adapter is exported without loading either into a model by
/// [`export_checkpoint`] (host memory: one tensor).
///
/// # Errors
/// [`ModelError::InvalidArgument`]: `out` not empty without `overwrite`, `out` a file or the
/// source directory, an adapter still installed, an unstorable dtype; [`ModelError::Io`] naming
/// the file (and the tensor when writing its bytes failed, e.g. a full disk);
/// [`ModelError::Mxfp4`] naming the tensor that cannot be quantized.
pub fn export(model: &GptOssForCausalLM, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    check_no_adapters(model)?;
    export_from(&ModelParams::new(model), out, opts)
}

/// Exports the checkpoint directory `model` with `delta` (a LoRA adapter,
/// `gptoss_lora::AdapterMerge`) merged into the weights it targets, as [`export`] would export
/// the loaded and merged model, without loading it: each tensor is read from the memory-mapped
/// files, the delta added in [`ExportOptions::merge_dtype`] (expert weights one expert at a time), converted and written
/// before the next is read, so host memory holds about one tensor (the largest, in f32 when
/// merged) besides the 1 MiB write buffer. MXFP4 expert weights the delta does not change are
/// passed through byte for byte (mxfp4, gguf) or decoded (bf16); changed ones are decoded,
/// merged and re-quantized. `opts.source_dir` defaults to `model`.
///
/// The same bytes as loading `model` in `merge_dtype`, merging (`LoraModel::merge_and_unload`) and
/// calling [`export`], except that an expert weight the delta leaves alone stays as stored even
/// where the other one of its layer is merged.
///
/// # Errors
/// Those of [`export`]; the loader's for the checkpoint (a missing, extra or misshapen tensor,
/// named with its file), all found before anything is written; [`ModelError::InvalidArgument`]
/// for a delta target the checkpoint does not store; the delta's own errors.
pub fn export_checkpoint(
    model: &Path,
    delta: Option<&dyn WeightDelta>,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let ckpt = Checkpoint::open(model)?;
    if !opts.merge_dtype.is_float() {
        return Err(ModelError::arg(
            "merge_dtype",
            format!("{:?}: expected f32, bf16 or f16", opts.merge_dtype),
        ));
    }
    let src = CheckpointParams::new(&ckpt, delta, opts.merge_dtype)?;
    let mut opts = opts.clone();
    opts.source_dir.get_or_insert_with(|| model.to_path_buf());
    export_from(&src, out, &opts)
}

/// [`export`] of any parameter source.
fn export_from(src: &dyn ParamSource, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    writer::dtype_name(opts.dtype)?;
    if opts.dtype == DType::U8 {
        return Err(ModelError::arg("dtype", "floats cannot be stored as u8"));
    }
    if opts.format == ExportFormat::Gguf {
        return gguf::export_gguf(src, out, opts);
    }
    let tmp = prepare(out, opts)?;
    match write_all(src, &tmp, out, opts).and_then(|r| finish(&tmp, out).map(|()| r)) {
        Ok(r) => Ok(r),
        Err(e) => {
            // best effort: the error that matters is `e`
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The gap between two models' logits on the same tokens (e.g. the merged in-memory model and
/// its export loaded back).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LogitGap {
    /// `max |a − b|` over every position and vocabulary entry.
    pub max_abs: f32,
    /// `‖a − b‖₂ / ‖a‖₂`.
    pub rel_rms: f32,
}

/// A deterministic probe sequence of `len` token ids below `vocab_size` (spread over the whole
/// vocabulary), `[1, len]` u32 on `device`, for [`logit_gap`].
pub fn probe_tokens(vocab_size: usize, len: usize, device: &Device) -> Result<Tensor> {
    let v = vocab_size.max(1) as u64;
    let ids: Vec<u32> = (0..len as u64)
        .map(|i| ((i * 7_919 + 13) * 104_729 % v) as u32)
        .collect();
    Ok(Tensor::from_vec(ids, (1, len), device)?)
}

/// [`LogitGap`] between `reference` and `other` on `ids` `[B, T]` u32 (no mask), logits
/// `[B, T, V]` compared in f32 on `reference`'s device.
pub fn logit_gap(
    reference: &GptOssForCausalLM,
    other: &GptOssForCausalLM,
    ids: &Tensor,
) -> Result<LogitGap> {
    let a = reference
        .forward(&ids.to_device(reference.device())?, None)?
        .to_dtype(DType::F32)?;
    let b = other
        .forward(&ids.to_device(other.device())?, None)?
        .to_dtype(DType::F32)?
        .to_device(a.device())?;
    let d = (&a - &b)?;
    let max_abs = d.abs()?.max_all()?.to_scalar::<f32>()?;
    let num = d.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let den = a.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let rel_rms = if den > 0.0 { (num / den).sqrt() } else { 0.0 };
    Ok(LogitGap { max_abs, rel_rms })
}
