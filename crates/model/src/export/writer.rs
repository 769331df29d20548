//! A streaming writer of (sharded) safetensors checkpoints: every tensor's name, dtype and shape
//! is known before any byte is written, so each shard's header goes first and each tensor's bytes
//! are then streamed into the file as they are produced. Host memory is whatever the producer of
//! one tensor holds plus a 1 MiB write buffer, whatever the model size.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{ModelError, Result};

/// One tensor of the file: name, safetensors dtype, shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorEntry {
    /// HF name (e.g. `model.layers.0.mlp.experts.gate_up_proj_blocks`).
    pub name: String,
    /// Element type (`BF16`, `F16`, `F32` or `U8`).
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorEntry {
    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size_in_bytes() as u64
    }
}

/// The safetensors name of a dtype (only those a checkpoint of this crate stores).
pub(crate) fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::U8 => "U8",
        d => {
            return Err(ModelError::arg(
                "dtype",
                format!("{d:?} cannot be stored (bf16, f16, f32 or u8)"),
            ))
        }
    })
}

/// How the tensors are split into files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sharding {
    /// One `model.safetensors`, no index.
    Single,
    /// `model-0000i-of-0000n.safetensors` files of at most this many bytes of tensor data each
    /// (a tensor larger than that gets a file of its own) plus `model.safetensors.index.json`.
    MaxBytes(u64),
    /// [`Sharding::Single`] when all the data fits in this many bytes, else
    /// [`Sharding::MaxBytes`] of it (what transformers' `save_pretrained` does).
    UpTo(u64),
}

/// What [`write_checkpoint_files`] wrote.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    /// The safetensors files in order.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_bytes: u64,
}

/// Groups `entries` (in order) into shards of at most `max` bytes of data.
fn plan_shards(entries: &[TensorEntry], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, e) in entries.iter().enumerate() {
        if cur > 0 && cur + e.nbytes() > max {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += e.nbytes();
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    shards
}

/// The safetensors header of one shard: JSON with `__metadata__ {"format": "pt"}` (transformers
/// refuses files without it) and each tensor's dtype, shape and offsets, padded with spaces to a
/// multiple of 8 bytes.
fn header(entries: &[&TensorEntry]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut off = 0u64;
    for e in entries {
        let end = off + e.nbytes();
        map.insert(
            e.name.clone(),
            serde_json::json!({
                "dtype": dtype_name(e.dtype)?,
                "shape": e.shape,
                "data_offsets": [off, end],
            }),
        );
        off = end;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| ModelError::arg("safetensors header", e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    Ok(h)
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a producer returns for a failed write into the `w` of [`write_checkpoint_files`]; the
/// writer replaces it by an error naming the file and the tensor.
pub(crate) fn write_err(source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: PathBuf::new(),
        source,
    }
}

/// Counts the bytes a producer writes, to check them against the header, and keeps the first
/// write error (disk full, ...).
struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
    failed: Option<std::io::ErrorKind>,
}

/// Runs `produce` on `w` and returns the number of bytes it wrote; a failed write (disk full,
/// ...) comes back as [`ModelError::Io`] naming `path` and `tensor`, any other error as it is.
pub(crate) fn produce_counted(
    w: &mut dyn Write,
    path: &Path,
    tensor: &str,
    produce: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<u64> {
    let mut c = Counting {
        inner: w,
        n: 0,
        failed: None,
    };
    match (produce(&mut c), c.failed) {
        (Ok(()), _) => Ok(c.n),
        (Err(ModelError::Io { source, .. }), Some(_)) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                source.kind(),
                format!("writing tensor `{tensor}`: {source}"),
            ),
        }),
        (Err(e), _) => Err(e),
    }
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.inner.write(buf) {
            Ok(k) => {
                self.n += k as u64;
                Ok(k)
            }
            Err(e) => {
                self.failed.get_or_insert(e.kind());
                Err(e)
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `entries` into `dir` (which must exist) as [`Sharding`] says, calling
/// `produce(i, w)` once per entry, in order, to write the bytes of `entries[i]` (little-endian,
/// row-major, exactly [`TensorEntry::nbytes`] of them) into `w`. Each file is written as
/// `<name>.tmp`, synced and renamed when complete; the index (sharded) is written last.
///
/// # Errors
/// The producer's error; [`ModelError::Io`] naming the file; [`ModelError::Safetensors`] when a
/// producer wrote another number of bytes than its entry's shape implies (naming the tensor).
pub(crate) fn write_checkpoint_files(
    dir: &Path,
    entries: &[TensorEntry],
    sharding: Sharding,
    mut produce: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<Written> {
    let total: u64 = entries.iter().map(TensorEntry::nbytes).sum();
    let sharding = match sharding {
        Sharding::UpTo(max) if total <= max => Sharding::Single,
        Sharding::UpTo(max) => Sharding::MaxBytes(max),
        s => s,
    };
    let shards = match sharding {
        Sharding::MaxBytes(max) => plan_shards(entries, max),
        _ => vec![(0..entries.len()).collect::<Vec<_>>()],
    };
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::with_capacity(n);
    let mut total = 0u64;
    for (s, shard) in shards.iter().enumerate() {
        let fname = match sharding {
            Sharding::MaxBytes(_) => format!("model-{:05}-of-{:05}.safetensors", s + 1, n),
            _ => SINGLE_FILE.to_string(),
        };
        let path = dir.join(&fname);
        let tmp = dir.join(format!("{fname}.tmp"));
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let list: Vec<&TensorEntry> = shard.iter().map(|&i| &entries[i]).collect();
        let h = header(&list)?;
        w.write_all(&(h.len() as u64).to_le_bytes())
            .map_err(io(&tmp))?;
        w.write_all(&h).map_err(io(&tmp))?;
        for &i in shard {
            let e = &entries[i];
            let n = produce_counted(&mut w, &tmp, &e.name, |w| produce(i, w))?;
            if n != e.nbytes() {
                return Err(ModelError::Safetensors {
                    path: tmp.clone(),
                    reason: format!(
                        "tensor `{}`: {} bytes written, {} expected for {:?} {:?}",
                        e.name,
                        n,
                        e.nbytes(),
                        e.dtype,
                        e.shape
                    ),
                });
            }
            weight_map.insert(e.name.clone(), serde_json::Value::String(fname.clone()));
            total += e.nbytes();
        }
        w.into_inner()
            .map_err(|e| io(&tmp)(e.into_error()))?
            .sync_all()
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        files.push(path);
    }
    if let Sharding::MaxBytes(_) = sharding {
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| ModelError::arg("safetensors index", e.to_string()))?;
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(Written {
        files,
        total_bytes: total,
    })
}

/// Bytes per write of [`write_values`].
const CHUNK_BYTES: usize = 1 << 20;

/// Writes `vals` little-endian through a 1 MiB buffer (`le` is e.g. `bf16::to_le_bytes`).
pub(crate) fn write_values<const N: usize, T: Copy>(
    w: &mut dyn Write,
    vals: &[T],
    le: impl Fn(T) -> [u8; N],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(CHUNK_BYTES);
    for chunk in vals.chunks((CHUNK_BYTES / N).max(1)) {
        buf.clear();
        for &v in chunk {
            buf.extend_from_slice(&le(v));
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, dtype: DType, shape: &[usize]) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn shards_split_before_overflowing_and_big_tensors_stand_alone() {
        let es = [
            e("a", DType::BF16, &[10]), // 20 B
            e("b", DType::U8, &[15]),   // 15 B
            e("c", DType::F32, &[20]),  // 80 B > max
            e("d", DType::U8, &[1]),
        ];
        assert_eq!(plan_shards(&es, 40), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan_shards(&es, 1000), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn header_is_padded_and_has_the_pt_format() -> Result<()> {
        let es = [e("x", DType::BF16, &[2, 3])];
        let h = header(&es.iter().collect::<Vec<_>>())?;
        assert_eq!(h.len() % 8, 0);
        let v: serde_json::Value =
            serde_json::from_slice(&h).map_err(|e| ModelError::arg("test", e.to_string()))?;
        assert_eq!(v["__metadata__"]["format"], "pt");
        assert_eq!(v["x"]["data_offsets"], serde_json::json!([0, 12]));
        Ok(())
    }

    #[test]
    fn a_producer_writing_the_wrong_size_is_an_error_naming_the_tensor() {
        let dir = std::env::temp_dir().join(format!("gptoss-writer-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let es = [e("w", DType::U8, &[4])];
        let r = write_checkpoint_files(&dir, &es, Sharding::Single, |_, w| {
            w.write_all(&[1, 2, 3]).map_err(write_err)
        });
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("tensor `w`: 3 bytes written, 4 expected"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
