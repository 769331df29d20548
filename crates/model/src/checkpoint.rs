//! Loading and saving checkpoints in the Hugging Face layout: `config.json` plus `model.safetensors` or sharded
//! `model-*.safetensors` with `model.safetensors.index.json`, memory-mapped; MXFP4 experts
//! (`*_blocks`/`*_scales`) dequantized through `gptoss-mxfp4`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::export::{write_weights, Sharding, WeightOptions};
use crate::hooks::ExpertParam;
use crate::model::GptOssForCausalLM;
use crate::packed_experts::{placeholder, PackedExperts};
use crate::spec::{build_model, ParamKind};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

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

fn candle_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::F64 => DType::F64,
        StDtype::U8 => DType::U8,
        _ => return None,
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
/// the run dtype per [`LoadOptions::experts`]. The shards are memory-mapped and every tensor goes to the
/// device on its own, so host memory never holds more than one tensor's copy. Every tensor the config
/// implies must be present with its exact shape, and no other tensor may be present; the errors name the
/// tensor, the file and both shapes.
pub fn load_with(
    dir: impl AsRef<Path>,
    device: &Device,
    opts: &LoadOptions,
) -> Result<GptOssForCausalLM> {
    let dir = dir.as_ref();
    let dtype = opts.dtype;
    let config = Config::from_file(dir.join("config.json"))?;
    let files = checkpoint_files(dir)?;
    let mut shards = Vec::with_capacity(files.len());
    for path in files {
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        // SAFETY: the file is opened read-only and must not be modified while the model loads (the
        // usual contract of memory-mapped checkpoints).
        let mmap = unsafe { Mmap::map(&f) }.map_err(io(&path))?;
        shards.push(Shard { path, mmap });
    }
    let mut parsed = Vec::with_capacity(shards.len());
    for s in &shards {
        parsed.push(SafeTensors::deserialize(&s.mmap).map_err(|e| st_err(&s.path, e))?);
    }
    // name -> shard index
    let mut location: HashMap<String, usize> = HashMap::new();
    for (i, st) in parsed.iter().enumerate() {
        for name in st.names() {
            location.insert(name.to_string(), i);
        }
    }
    let resident = opts.resident_on(device);
    let mut packed: HashMap<String, (Tensor, Tensor)> = HashMap::new();
    let mut used: HashSet<String> = HashSet::new();
    let mut model = build_model(&config, dtype, device, |spec| {
        if let Some(&i) = location.get(&spec.name) {
            used.insert(spec.name.clone());
            return read_plain(
                &parsed[i],
                &shards[i].path,
                &spec.name,
                &spec.shape,
                dtype,
                device,
            );
        }
        if spec.kind == ParamKind::Expert {
            let (bn, sn) = (
                format!("{}_blocks", spec.name),
                format!("{}_scales", spec.name),
            );
            if let (Some(&bi), Some(&si)) = (location.get(&bn), location.get(&sn)) {
                used.insert(bn.clone());
                used.insert(sn.clone());
                let pair = Mxfp4Pair {
                    parsed: &parsed,
                    shards: &shards,
                    blocks: (bi, &bn),
                    scales: (si, &sn),
                    name: &spec.name,
                    expected: &spec.shape,
                };
                if resident && layer_is_mxfp4(&location, &spec.name) {
                    packed.insert(spec.name.clone(), pair.upload(device)?);
                    return placeholder(&spec.shape, dtype, device);
                }
                return pair.dequantize(dtype, device);
            }
        }
        Err(ModelError::MissingTensor {
            name: spec.name.clone(),
            expected: spec.shape.clone(),
            dir: dir.to_path_buf(),
        })
    })?;
    let mut extra: Vec<(&String, &usize)> = location
        .iter()
        .filter(|(n, _)| !used.contains(*n))
        .collect();
    extra.sort();
    if let Some((name, &i)) = extra.first() {
        let shape = parsed[i]
            .tensor(name)
            .map(|t| t.shape().to_vec())
            .unwrap_or_default();
        return Err(ModelError::UnexpectedTensor {
            name: (*name).clone(),
            shape,
            file: shards[i].path.clone(),
        });
    }
    install_packed(&mut model, packed)?;
    Ok(model)
}

/// Whether both expert parameters of the layer of `name` (`model.layers.{i}.mlp.experts.*`) are
/// stored as MXFP4 (a layer is resident only as a whole).
fn layer_is_mxfp4(location: &HashMap<String, usize>, name: &str) -> bool {
    let Some(module) = name.rsplit_once('.').map(|(m, _)| m) else {
        return false;
    };
    ["gate_up_proj", "down_proj"].iter().all(|p| {
        location.contains_key(&format!("{module}.{p}_blocks"))
            && location.contains_key(&format!("{module}.{p}_scales"))
    })
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

fn read_plain(
    st: &SafeTensors<'_>,
    path: &Path,
    name: &str,
    expected: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let view = st.tensor(name).map_err(|e| st_err(path, e))?;
    if view.shape() != expected {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            file: path.to_path_buf(),
            found: view.shape().to_vec(),
            expected: expected.to_vec(),
        });
    }
    let src = match candle_dtype(view.dtype()) {
        Some(d) if d.is_float() => d,
        _ => {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                file: path.to_path_buf(),
                dtype: format!("{:?}", view.dtype()),
            })
        }
    };
    let t = Tensor::from_raw_buffer(view.data(), src, view.shape(), &Device::Cpu)?;
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// The `*_blocks`/`*_scales` pair of one MXFP4 expert parameter in the shards.
struct Mxfp4Pair<'a> {
    parsed: &'a [SafeTensors<'a>],
    shards: &'a [Shard],
    blocks: (usize, &'a str),
    scales: (usize, &'a str),
    /// The dense parameter's name and `[E, in, out]` shape.
    name: &'a str,
    expected: &'a [usize],
}

impl<'a> Mxfp4Pair<'a> {
    /// The two tensor views after checking their shapes (`[E, out, in/32, 16]`, `[E, out, in/32]`)
    /// and dtype (U8).
    fn views(&self) -> Result<(TensorView<'a>, TensorView<'a>)> {
        let ((bi, bname), (si, sname)) = (self.blocks, self.scales);
        let (bpath, spath) = (&self.shards[bi].path, &self.shards[si].path);
        let b = self.parsed[bi]
            .tensor(bname)
            .map_err(|e| st_err(bpath, e))?;
        let s = self.parsed[si]
            .tensor(sname)
            .map_err(|e| st_err(spath, e))?;
        // expected [E, in, out] -> blocks [E, out, in/32, 16], scales [E, out, in/32]
        let (e, inn, out) = (self.expected[0], self.expected[1], self.expected[2]);
        let want_b = vec![e, out, inn / 32, 16];
        let want_s = vec![e, out, inn / 32];
        for (n, p, v, want) in [(bname, bpath, &b, &want_b), (sname, spath, &s, &want_s)] {
            if v.shape() != want.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    name: n.to_string(),
                    file: p.clone(),
                    found: v.shape().to_vec(),
                    expected: want.clone(),
                });
            }
            if v.dtype() != StDtype::U8 {
                return Err(ModelError::UnsupportedDtype {
                    name: n.to_string(),
                    file: p.clone(),
                    dtype: format!("{:?} (MXFP4 tensors must be U8)", v.dtype()),
                });
            }
        }
        Ok((b, s))
    }

    /// The dense `[E, in, out]` parameter in `dtype` on `device`.
    fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let (b, s) = self.views()?;
        let bname = self.blocks.1;
        let t = gptoss_mxfp4::dequantize_bytes(
            b.data(),
            b.shape(),
            s.data(),
            s.shape(),
            dtype,
            gptoss_mxfp4::Layout::Transposed,
            device,
            Some(bname),
        )
        .map_err(|err| ModelError::Mxfp4 {
            name: self.name.to_string(),
            reason: err.to_string(),
        })?;
        if t.dims() != self.expected {
            return Err(ModelError::ShapeMismatch {
                name: self.name.to_string(),
                file: self.shards[self.blocks.0].path.clone(),
                found: t.dims().to_vec(),
                expected: self.expected.to_vec(),
            });
        }
        Ok(t)
    }

    /// The blocks and scales as u8 tensors on `device` (one host copy each, then the upload).
    fn upload(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (b, s) = self.views()?;
        let up = |v: &TensorView| -> Result<Tensor> {
            let t = Tensor::from_raw_buffer(v.data(), DType::U8, v.shape(), &Device::Cpu)?;
            Ok(t.to_device(device)?)
        };
        Ok((up(&b)?, up(&s)?))
    }
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
    write_weights(model, dir, &weights)?;
    Ok(())
}
