//! Synthetic checkpoints: seeded random weights written in exactly the Hugging Face layout of
//! `openai/gpt-oss-*` (`config.json` with `quantization_config`, sharded safetensors +
//! `model.safetensors.index.json`, MXFP4 `*_blocks`/`*_scales` experts, bf16 elsewhere,
//! `generation_config.json`), for measuring real loading where no model hub is reachable.
//!
//! The writer streams (through the safetensors writer of [`mod@crate::export`]): each shard's header is
//! written first (every size is known from the config), then each tensor's bytes are generated in
//! parallel chunks and written, so host memory
//! stays at a few chunks whatever the model size (gpt-oss-120b: ~65 GB). Values come from a
//! counter-based generator (splitmix64 of the seed, the tensor's name and the element index), so
//! the bytes do not depend on the thread count: weights and `Normal` vectors uniform with the
//! standard deviation `initializer_range` (uniform, not normal: this is for speed and memory
//! measurements, not for training quality), biases 0, norms 1, MXFP4 nibbles uniform and scales
//! uniform in `2^-10 ..= 2^-6` (as [`crate::PackedExperts::random`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::DType;
use half::bf16;
use rayon::prelude::*;

use crate::config::Config;
use crate::error::Result;
use crate::export::writer::{io, write_checkpoint_files, write_err, Sharding, TensorEntry};
use crate::spec::{tensor_specs, ParamKind};

/// How [`write_synthetic_checkpoint`] writes.
#[derive(Debug, Clone)]
pub struct SyntheticOptions {
    /// Seed of every value.
    pub seed: u64,
    /// Largest shard in bytes (a tensor larger than this gets a shard of its own).
    pub max_shard_bytes: usize,
    /// Experts as MXFP4 blocks/scales (the released checkpoints); `false`: dense bf16.
    pub mxfp4_experts: bool,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            max_shard_bytes: 5_000_000_000,
            mxfp4_experts: true,
        }
    }
}

/// What [`write_synthetic_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct SyntheticSummary {
    /// The shard files in order.
    pub shards: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_bytes: u64,
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// bf16, uniform with this standard deviation.
    Uniform(f32),
    /// bf16 constant.
    Const(f32),
    /// u8, uniform over all 256 values (MXFP4 nibble pairs).
    Bytes,
    /// u8, uniform in `lo..=hi` (E8M0 scales).
    ByteRange(u8, u8),
}

/// One tensor of the file (name, dtype, shape) and how its values are drawn.
#[derive(Debug, Clone)]
struct Entry {
    tensor: TensorEntry,
    fill: Fill,
}

impl Entry {
    fn new(name: String, dtype: DType, shape: Vec<usize>, fill: Fill) -> Self {
        Self {
            tensor: TensorEntry { name, dtype, shape },
            fill,
        }
    }

    fn bytes(&self) -> usize {
        self.tensor.nbytes() as usize
    }
}

/// Every tensor of `config`'s checkpoint, in HF order.
fn entries(config: &Config, mxfp4: bool) -> Vec<Entry> {
    let std = config.initializer_range as f32;
    let mut out = Vec::new();
    for s in tensor_specs(config) {
        let bf = |fill| Entry::new(s.name.clone(), DType::BF16, s.shape.clone(), fill);
        match s.kind {
            ParamKind::Weight | ParamKind::Normal => out.push(bf(Fill::Uniform(std))),
            ParamKind::Bias => out.push(bf(Fill::Const(0.0))),
            ParamKind::Norm => out.push(bf(Fill::Const(1.0))),
            ParamKind::Expert if !mxfp4 => out.push(bf(Fill::Uniform(std))),
            ParamKind::Expert => {
                // [E, in, out] is stored as blocks [E, out, in/32, 16] and scales [E, out, in/32]
                let (e, inn, o) = (s.shape[0], s.shape[1], s.shape[2]);
                out.push(Entry::new(
                    format!("{}_blocks", s.name),
                    DType::U8,
                    vec![e, o, inn / 32, 16],
                    Fill::Bytes,
                ));
                out.push(Entry::new(
                    format!("{}_scales", s.name),
                    DType::U8,
                    vec![e, o, inn / 32],
                    Fill::ByteRange(117, 121),
                ));
            }
        }
    }
    out
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name, mixed with the seed.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(h ^ splitmix(seed))
}

/// Fills `buf` with the bytes of elements `first..` of a tensor (`buf.len()` a whole number of
/// elements).
fn fill_bytes(fill: Fill, key: u64, first: usize, buf: &mut [u8]) {
    match fill {
        Fill::Uniform(std) => {
            let a = std * 3f32.sqrt();
            for (i, c) in buf.chunks_exact_mut(2).enumerate() {
                let r = splitmix(key ^ splitmix((first + i) as u64));
                let u = (r >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                c.copy_from_slice(&bf16::from_f32((2.0 * u - 1.0) * a).to_le_bytes());
            }
        }
        Fill::Const(v) => {
            let b = bf16::from_f32(v).to_le_bytes();
            for c in buf.chunks_exact_mut(2) {
                c.copy_from_slice(&b);
            }
        }
        Fill::Bytes => {
            for (i, c) in buf.chunks_mut(8).enumerate() {
                let r = splitmix(key ^ splitmix(((first / 8) + i) as u64)).to_le_bytes();
                c.copy_from_slice(&r[..c.len()]);
            }
        }
        Fill::ByteRange(lo, hi) => {
            let n = (hi - lo) as u64 + 1;
            for (i, c) in buf.iter_mut().enumerate() {
                *c = lo + (splitmix(key ^ splitmix((first + i) as u64)) % n) as u8;
            }
        }
    }
}

/// Bytes generated per parallel chunk (a multiple of 8, so `Fill::Bytes` chunks stay aligned).
const CHUNK: usize = 8 << 20;
/// Chunks generated before each write.
const BATCH: usize = 16;

/// Writes `entry`'s bytes to `w`, generated `BATCH` chunks at a time on all threads.
fn write_tensor(w: &mut dyn Write, entry: &Entry, seed: u64) -> std::io::Result<()> {
    let key = tensor_seed(seed, &entry.tensor.name);
    let total = entry.bytes();
    let elem = entry.tensor.dtype.size_in_bytes();
    let mut buf = vec![0u8; (CHUNK * BATCH).min(total)];
    let mut done = 0;
    while done < total {
        let len = buf.len().min(total - done);
        buf[..len]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, b)| {
                fill_bytes(entry.fill, key, (done + c * CHUNK) / elem, b);
            });
        w.write_all(&buf[..len])?;
        done += len;
    }
    Ok(())
}

/// Writes a seeded random checkpoint of `config` into `dir` (created; files already there are
/// overwritten): `config.json`, `generation_config.json`, the shards and the index. Each shard
/// is written to `<name>.tmp` and renamed when complete.
pub fn write_synthetic_checkpoint(
    dir: &Path,
    config: &Config,
    opts: &SyntheticOptions,
) -> Result<SyntheticSummary> {
    config.validate()?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut cfg = config.clone();
    cfg.quantization_config = match opts.mxfp4_experts {
        true => Config::gpt_oss_20b().quantization_config,
        false => None,
    };
    let all = entries(&cfg, opts.mxfp4_experts);
    let tensors: Vec<TensorEntry> = all.iter().map(|e| e.tensor.clone()).collect();
    let written = write_checkpoint_files(
        dir,
        &tensors,
        Sharding::MaxBytes(opts.max_shard_bytes as u64),
        |i, w| write_tensor(w, &all[i], opts.seed).map_err(write_err),
    )?;
    let write = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io(&p))
    };
    write("generation_config.json", generation_config(&cfg))?;
    write("config.json", cfg.to_json()?)?;
    Ok(SyntheticSummary {
        shards: written.files,
        tensors: all.len(),
        total_bytes: written.total_bytes,
    })
}

/// `generation_config.json` as the released gpt-oss checkpoints ship it.
pub(crate) fn generation_config(cfg: &Config) -> String {
    let pad = cfg.pad_token_id.unwrap_or(199_999);
    serde_json::json!({
        "bos_token_id": 199_998,
        "do_sample": true,
        "eos_token_id": [200_002, 199_999, 200_012],
        "pad_token_id": pad,
        "transformers_version": "4.55.0.dev0"
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{load_with, ExpertLoading, LoadOptions};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn values_do_not_depend_on_chunking() {
        let e = Fill::Uniform(0.02);
        let mut whole = vec![0u8; 64];
        fill_bytes(e, 5, 0, &mut whole);
        let mut parts = vec![0u8; 64];
        fill_bytes(e, 5, 0, &mut parts[..32]);
        fill_bytes(e, 5, 16, &mut parts[32..]);
        assert_eq!(whole, parts);
        let mut b = vec![0u8; 40];
        fill_bytes(Fill::ByteRange(117, 121), 9, 3, &mut b);
        assert!(b.iter().all(|&x| (117..=121).contains(&x)));
        assert!(b.iter().any(|&x| x != b[0]));
    }

    #[test]
    fn written_checkpoint_loads_resident_and_dense_alike() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gptoss_synth_{}", std::process::id()));
        let cfg = Config::tiny();
        let opts = SyntheticOptions {
            seed: 3,
            max_shard_bytes: 40_000,
            mxfp4_experts: true,
        };
        let sum = write_synthetic_checkpoint(&dir, &cfg, &opts)?;
        assert!(sum.shards.len() > 1, "expected several shards");
        let load = |experts| {
            load_with(
                &dir,
                &Device::Cpu,
                &LoadOptions {
                    dtype: DType::F32,
                    experts,
                },
            )
        };
        let resident = load(ExpertLoading::Resident)?;
        let dense = load(ExpertLoading::Dequantize)?;
        assert!(resident.model.layers[0].mlp.experts.packed().is_some());
        assert!(dense.model.layers[0].mlp.experts.packed().is_none());
        let ids = Tensor::new(&[[1u32, 7, 3, 9, 2, 5]], &Device::Cpu)?;
        let a = resident.forward(&ids, None)?;
        let b = dense.forward(&ids, None)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "resident vs dequantized logits differ by {d}");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
