//! A checkpoint directory opened for reading: `config.json` parsed, every safetensors file
//! memory-mapped and its header parsed, nothing else read. Each parameter of the config is then
//! found ([`Checkpoint::find`]: plain, or MXFP4 `_blocks`/`_scales`, shapes and dtypes checked)
//! and read on its own, whole or one expert at a time, so host memory holds one tensor's copy
//! at most — what [`super::load_with`] and the streaming export
//! ([`crate::export::export_checkpoint`]) share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype as StDtype, SafeTensors};

use super::{checkpoint_files, io, st_err};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::spec::{ParamKind, TensorSpec};

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Bytes of the header (the data starts at `8 + header_len`).
    header_len: usize,
    meta: Metadata,
}

/// A checkpoint directory opened for reading (see the module docs).
pub struct Checkpoint {
    dir: PathBuf,
    config: Config,
    shards: Vec<Shard>,
    /// tensor name → shard index
    location: HashMap<String, usize>,
}

/// One stored tensor: the file it is in, its safetensors dtype, shape and bytes.
pub(crate) struct Raw<'a> {
    name: String,
    path: &'a Path,
    dtype: StDtype,
    shape: &'a [usize],
    data: &'a [u8],
}

/// How one parameter of the config is stored, its shapes and dtypes checked.
pub(crate) enum Stored<'a> {
    /// As itself, in a float dtype.
    Plain(Raw<'a>),
    /// An expert weight `[E, in, out]` as MXFP4 blocks `[E, out, in/32, 16]` and scales
    /// `[E, out, in/32]` (u8).
    Mxfp4 {
        /// `<name>_blocks`.
        blocks: Raw<'a>,
        /// `<name>_scales`.
        scales: Raw<'a>,
    },
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

impl Checkpoint {
    /// Opens `dir`: parses `config.json`, memory-maps the safetensors files (from the index when
    /// there is one) and parses their headers.
    ///
    /// # Errors
    /// [`ModelError::Io`] / [`ModelError::Json`] / [`ModelError::Config`] naming the file or
    /// field; [`ModelError::Safetensors`] for a malformed file.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Config::from_file(dir.join("config.json"))?;
        let mut shards = Vec::new();
        let mut location = HashMap::new();
        for path in checkpoint_files(dir)? {
            let f = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: the file is opened read-only and must not be modified while it is read (the
            // usual contract of memory-mapped checkpoints).
            let mmap = unsafe { Mmap::map(&f) }.map_err(io(&path))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| st_err(&path, e))?;
            for name in meta.tensors().into_keys() {
                location.insert(name, shards.len());
            }
            shards.push(Shard {
                path,
                mmap,
                header_len,
                meta,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            location,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored tensor `name`, if any.
    fn raw(&self, name: &str) -> Option<Raw<'_>> {
        let shard = &self.shards[*self.location.get(name)?];
        let info = shard.meta.info(name)?;
        let start = 8 + shard.header_len;
        let (a, b) = info.data_offsets;
        Some(Raw {
            name: name.to_string(),
            path: &shard.path,
            dtype: info.dtype,
            shape: &info.shape,
            data: shard.mmap.get(start + a..start + b)?,
        })
    }

    /// How `spec` is stored: as itself (preferred), or for an expert weight as MXFP4
    /// `_blocks`/`_scales`; shapes and dtypes checked.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`], [`ModelError::ShapeMismatch`],
    /// [`ModelError::UnsupportedDtype`] naming the tensor and file.
    pub(crate) fn find(&self, spec: &TensorSpec) -> Result<Stored<'_>> {
        if let Some(raw) = self.raw(&spec.name) {
            raw.check_shape(&spec.shape)?;
            match candle_dtype(raw.dtype) {
                Some(d) if d.is_float() => return Ok(Stored::Plain(raw)),
                _ => {
                    return Err(ModelError::UnsupportedDtype {
                        name: spec.name.clone(),
                        file: raw.path.to_path_buf(),
                        dtype: format!("{:?}", raw.dtype),
                    })
                }
            }
        }
        if spec.kind == ParamKind::Expert {
            let names = mxfp4_names(&spec.name);
            if let (Some(blocks), Some(scales)) = (self.raw(&names.0), self.raw(&names.1)) {
                // [E, in, out] -> blocks [E, out, in/32, 16], scales [E, out, in/32]
                let (e, inn, out) = (spec.shape[0], spec.shape[1], spec.shape[2]);
                if inn % 32 != 0 {
                    return Err(ModelError::mxfp4(
                        &spec.name,
                        format!(
                            "stored as MXFP4, but its input dim {inn} (shape {:?}) is no multiple of 32",
                            spec.shape
                        ),
                    ));
                }
                blocks.check_shape(&[e, out, inn / 32, 16])?;
                scales.check_shape(&[e, out, inn / 32])?;
                for r in [&blocks, &scales] {
                    if r.dtype != StDtype::U8 {
                        return Err(ModelError::UnsupportedDtype {
                            name: r.name.clone(),
                            file: r.path.to_path_buf(),
                            dtype: format!("{:?} (MXFP4 tensors must be U8)", r.dtype),
                        });
                    }
                }
                return Ok(Stored::Mxfp4 { blocks, scales });
            }
        }
        Err(ModelError::MissingTensor {
            name: spec.name.clone(),
            expected: spec.shape.clone(),
            dir: self.dir.clone(),
        })
    }

    /// Errors on the first stored tensor (by name) that none of `specs` reads, as [`Self::find`]
    /// picks them: a checkpoint for another configuration must not load silently.
    ///
    /// # Errors
    /// [`ModelError::UnexpectedTensor`] naming the tensor, its shape and file.
    pub(crate) fn check_no_extra(&self, specs: &[TensorSpec]) -> Result<()> {
        let mut used = std::collections::HashSet::new();
        for s in specs {
            let names = mxfp4_names(&s.name);
            if self.location.contains_key(&s.name) {
                used.insert(s.name.clone());
            } else if s.kind == ParamKind::Expert
                && self.location.contains_key(&names.0)
                && self.location.contains_key(&names.1)
            {
                used.insert(names.0);
                used.insert(names.1);
            }
        }
        let mut extra: Vec<&String> = self
            .location
            .keys()
            .filter(|n| !used.contains(*n))
            .collect();
        extra.sort();
        match extra.first().and_then(|n| self.raw(n)) {
            Some(r) => Err(ModelError::UnexpectedTensor {
                name: r.name,
                shape: r.shape.to_vec(),
                file: r.path.to_path_buf(),
            }),
            None => Ok(()),
        }
    }

    /// Whether both expert weights of the layer of the expert weight `name`
    /// (`model.layers.{i}.mlp.experts.*`) are stored as MXFP4 (a layer is resident only as a whole).
    pub(crate) fn layer_is_mxfp4(&self, name: &str) -> bool {
        let Some(module) = name.rsplit_once('.').map(|(m, _)| m) else {
            return false;
        };
        ["gate_up_proj", "down_proj"].iter().all(|p| {
            let (b, s) = mxfp4_names(&format!("{module}.{p}"));
            self.location.contains_key(&b) && self.location.contains_key(&s)
        })
    }
}

/// `(<name>_blocks, <name>_scales)`.
pub(crate) fn mxfp4_names(name: &str) -> (String, String) {
    (format!("{name}_blocks"), format!("{name}_scales"))
}

impl Raw<'_> {
    fn check_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: self.name.clone(),
                file: self.path.to_path_buf(),
                found: self.shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    /// The bytes of rows `[i·n/len .. (i+1)·n/len)` of dim 0 (`len` = `shape[0]`).
    fn slice0(&self, i: usize) -> &[u8] {
        let per = self.data.len() / self.shape[0].max(1);
        &self.data[i * per..(i + 1) * per]
    }

    /// The tensor on the host in its stored dtype (one copy of the bytes).
    fn host(&self, data: &[u8], shape: &[usize]) -> Result<Tensor> {
        let d = candle_dtype(self.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            name: self.name.clone(),
            file: self.path.to_path_buf(),
            dtype: format!("{:?}", self.dtype),
        })?;
        Ok(Tensor::from_raw_buffer(data, d, shape, &Device::Cpu)?)
    }
}

impl Stored<'_> {
    /// The dense parameter (expert weights `[E, in, out]`) in `dtype` on `device`.
    pub(crate) fn dense(&self, spec: &TensorSpec, dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            Stored::Plain(r) => Ok(r
                .host(r.data, r.shape)?
                .to_dtype(dtype)?
                .to_device(device)?),
            Stored::Mxfp4 { blocks, scales } => dequantize(
                spec,
                blocks.data,
                blocks.shape,
                scales.data,
                scales.shape,
                dtype,
                device,
            ),
        }
    }

    /// Expert `e` of the expert weight `spec` `[E, in, out]`: `[in, out]` in `dtype` on the host.
    pub(crate) fn expert(&self, spec: &TensorSpec, e: usize, dtype: DType) -> Result<Tensor> {
        let (inn, out) = (spec.shape[1], spec.shape[2]);
        match self {
            Stored::Plain(r) => Ok(r.host(r.slice0(e), &[inn, out])?.to_dtype(dtype)?),
            Stored::Mxfp4 { blocks, scales } => {
                let mut bd = blocks.shape.to_vec();
                let mut sd = scales.shape.to_vec();
                (bd[0], sd[0]) = (1, 1);
                let t = dequantize(
                    spec,
                    blocks.slice0(e),
                    &bd,
                    scales.slice0(e),
                    &sd,
                    dtype,
                    &Device::Cpu,
                )?;
                Ok(t.squeeze(0)?)
            }
        }
    }

    /// The MXFP4 blocks and scales as u8 tensors on `device` (one host copy each, then the
    /// upload); `None` for a plain tensor.
    pub(crate) fn packed(&self, device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let Stored::Mxfp4 { blocks, scales } = self else {
            return Ok(None);
        };
        let up = |r: &Raw| -> Result<Tensor> { Ok(r.host(r.data, r.shape)?.to_device(device)?) };
        Ok(Some((up(blocks)?, up(scales)?)))
    }
}

/// MXFP4 bytes (`[e, out, in/32, 16]` / `[e, out, in/32]`) decoded to `[e, in, out]` in `dtype`.
fn dequantize(
    spec: &TensorSpec,
    blocks: &[u8],
    blocks_dims: &[usize],
    scales: &[u8],
    scales_dims: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let bname = format!("{}_blocks", spec.name);
    gptoss_mxfp4::dequantize_bytes(
        blocks,
        blocks_dims,
        scales,
        scales_dims,
        dtype,
        gptoss_mxfp4::Layout::Transposed,
        device,
        Some(&bname),
    )
    .map_err(|err| ModelError::mxfp4(&spec.name, err))
}
