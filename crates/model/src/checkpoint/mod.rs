//! Loading and saving checkpoints in the Hugging Face layout: `config.json` plus `model.safetensors` or sharded
//! `model-*.safetensors` with `model.safetensors.index.json`, memory-mapped; MXFP4 experts
//! (`*_blocks`/`*_scales`) dequantized through `gptoss-mxfp4`.

mod reader;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::export::{write_weights, ModelParams, Sharding, WeightOptions};
use crate::hooks::ExpertParam;
use crate::model::GptOssForCausalLM;
use crate::packed_experts::{placeholder, PackedExperts};
use crate::spec::{build_model, tensor_specs};
pub use reader::Checkpoint;

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The safetensors files of a checkpoint directory (from the index when present).
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io(&index))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Safetensors {
                path: index.clone(),
                reason: "no \"weight_map\" object".into(),
            })?;
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| ModelError::Safetensors {
                path: index.clone(),
                reason: format!("weight_map[{name:?}] is not a file name"),
            })?;
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("neither {INDEX_FILE} nor {SINGLE_FILE} in the checkpoint directory"),
        ),
    })
}

/// How [`load_with`] treats the MXFP4 expert weights (`*_blocks`/`*_scales`) of a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExpertLoading {
    /// Resident on a CUDA device, dequantized on the CPU (the default).
    #[default]
    Auto,
    /// Kept as blocks + scales on the device ([`crate::PackedExperts`]) and dequantized inside
    /// the expert GEMMs: 10.1 GB instead of 38 GB of expert weights for gpt-oss-20b.
    Resident,
    /// Dequantized to dense parameters once, at load (transformers' `Mxfp4Config(dequantize=True)`).
    Dequantize,
}

/// How [`load_with`] loads a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// The run dtype of every floating parameter.
    pub dtype: DType,
    /// What happens to MXFP4 experts (dense experts in the checkpoint are always loaded dense).
    pub experts: ExpertLoading,
}

impl LoadOptions {
    /// `dtype` with [`ExpertLoading::Auto`].
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
            experts: ExpertLoading::Auto,
        }
    }

    /// `dtype` with [`ExpertLoading::Dequantize`] when `dequantize`, else [`ExpertLoading::Auto`]
    /// (what a `--dequantize` flag selects).
    pub fn dequantized_if(dtype: DType, dequantize: bool) -> Self {
        Self {
            dtype,
            experts: match dequantize {
                true => ExpertLoading::Dequantize,
                false => ExpertLoading::Auto,
            },
        }
    }

    /// Whether MXFP4 experts stay resident on `device`.
    pub fn resident_on(&self, device: &Device) -> bool {
        match self.experts {
            ExpertLoading::Auto => device.is_cuda(),
            ExpertLoading::Resident => true,
            ExpertLoading::Dequantize => false,
        }
    }
}

/// Load a checkpoint directory into a model with weights in `dtype` on `device`, MXFP4 experts
/// as [`ExpertLoading::Auto`] decides (resident on CUDA, dense on the CPU): [`load_with`].
pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<GptOssForCausalLM> {
    load_with(dir, device, &LoadOptions::new(dtype))
}

/// Load a checkpoint directory into a model on `device`.
///
/// Expert weights are either plain (`mlp.experts.gate_up_proj` `[E, H, 2I]`, `down_proj` `[E, I, H]`) or MXFP4
/// (`…_blocks` `[E, out, in/32, 16]` u8 + `…_scales` `[E, out, in/32]` u8), kept resident or dequantized to
/// the run dtype per [`LoadOptions::experts`]. The shards are memory-mapped ([`Checkpoint`]) and every
/// tensor goes to the device on its own, so host memory never holds more than one tensor's copy. Every
/// tensor the config implies must be present with its exact shape, and no other tensor may be present;
/// the errors name the tensor, the file and both shapes.
pub fn load_with(
    dir: impl AsRef<Path>,
    device: &Device,
    opts: &LoadOptions,
) -> Result<GptOssForCausalLM> {
    let ckpt = Checkpoint::open(dir)?;
    let dtype = opts.dtype;
    let resident = opts.resident_on(device);
    let mut packed: HashMap<String, (Tensor, Tensor)> = HashMap::new();
    let mut model = build_model(ckpt.config(), dtype, device, |spec| {
        let stored = ckpt.find(spec)?;
        if resident && ckpt.layer_is_mxfp4(&spec.name) {
            if let Some(pair) = stored.packed(device)? {
                packed.insert(spec.name.clone(), pair);
                return placeholder(&spec.shape, dtype, device);
            }
        }
        stored.dense(spec, dtype, device)
    })?;
    ckpt.check_no_extra(&tensor_specs(ckpt.config()))?;
    install_packed(&mut model, packed)?;
    Ok(model)
}

/// Hands the uploaded blocks/scales of every resident layer to its experts.
fn install_packed(
    model: &mut GptOssForCausalLM,
    mut packed: HashMap<String, (Tensor, Tensor)>,
) -> Result<()> {
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        let module = format!("model.layers.{i}.mlp.experts");
        let gu = packed.remove(&format!("{module}.gate_up_proj"));
        let down = packed.remove(&format!("{module}.down_proj"));
        if let (Some((gb, gs)), Some((db, ds))) = (gu, down) {
            let p = PackedExperts::new(gb, gs, db, ds)?;
            layer.mlp.experts.set_packed(Some(Arc::new(p)));
        }
    }
    Ok(())
}

/// How [`save`] writes a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Store the expert weights as MXFP4 `_blocks`/`_scales` (and keep `quantization_config`); otherwise they
    /// are stored plain and `quantization_config` is dropped (what transformers saves after dequantizing).
    pub mxfp4_experts: bool,
    /// Split into `model-0000i-of-0000n.safetensors` shards of at most this many bytes (plus an index);
    /// `None` writes a single `model.safetensors`.
    pub max_shard_bytes: Option<usize>,
    /// Store every floating tensor in this dtype (default: the model's run dtype).
    pub dtype: Option<DType>,
}

/// The MXFP4-resident expert parameters of `model` by HF name.
pub(crate) fn resident_experts(
    model: &GptOssForCausalLM,
) -> HashMap<String, (Arc<PackedExperts>, ExpertParam)> {
    let mut out = HashMap::new();
    for (i, layer) in model.model.layers.iter().enumerate() {
        if let Some(p) = layer.mlp.experts.packed() {
            for param in [ExpertParam::GateUp, ExpertParam::Down] {
                let name = format!("model.layers.{i}.mlp.experts.{}", param.name());
                out.insert(name, (p.clone(), param));
            }
        }
    }
    out
}

/// Save `model` in the HF layout into `dir` (created if needed): `config.json` and the safetensors file(s),
/// streamed tensor by tensor through the writer of [`mod@crate::export`] (which adds the `.tmp`
/// directory, the tokenizer files and the report on top). MXFP4-resident experts are written as
/// their blocks/scales unchanged (`mxfp4_experts`) or dequantized; dense experts are quantized
/// (`mxfp4_experts`) from the stored dtype.
pub fn save(model: &GptOssForCausalLM, dir: impl AsRef<Path>, opts: &SaveOptions) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = crate::export::stored_config(model.config(), opts.mxfp4_experts, None);
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config.to_json()?).map_err(io(&cfg_path))?;
    let sharding = match opts.max_shard_bytes {
        Some(max) => Sharding::MaxBytes(max as u64),
        None => Sharding::Single,
    };
    let weights = WeightOptions {
        mxfp4_experts: opts.mxfp4_experts,
        dtype: opts.dtype.unwrap_or(model.dtype()),
        sharding,
    };
    write_weights(&ModelParams::new(model), dir, &weights)?;
    Ok(())
}
