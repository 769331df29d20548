//! A streaming writer of GGUF v3 files (ggml's `docs/gguf.md`): the header, the metadata
//! key-value pairs, the tensor infos and the tensor data, each tensor aligned to
//! [`ALIGNMENT`] bytes. Every tensor's type and dims are known before any byte of data is
//! written, so the header goes first and each tensor's bytes are streamed after it.

use std::io::Write;
use std::path::Path;

use super::super::writer::{io, produce_counted};
use crate::error::{ModelError, Result};

/// `GGUF` magic.
const MAGIC: &[u8; 4] = b"GGUF";
/// File format version.
const VERSION: u32 = 3;
/// Alignment of the data section and of every tensor in it (ggml's default; no
/// `general.alignment` key is written for it).
pub(crate) const ALIGNMENT: u64 = 32;

/// A metadata value (gguf.md's `gguf_metadata_value_type`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `UINT32` (4).
    U32(u32),
    /// `FLOAT32` (6).
    F32(f32),
    /// `BOOL` (7).
    Bool(bool),
    /// `STRING` (8): u64 length and UTF-8 bytes.
    Str(String),
    /// `ARRAY` (9) of `STRING`.
    StrArray(Vec<String>),
    /// `ARRAY` (9) of `INT32`.
    I32Array(Vec<i32>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Self::U32(_) => 4,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::StrArray(_) | Self::I32Array(_) => 9,
        }
    }

    /// The value's type id and payload as the file stores them.
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.type_id().to_le_bytes());
        match self {
            Self::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::Bool(v) => out.push(u8::from(*v)),
            Self::Str(s) => string(out, s),
            Self::StrArray(v) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for s in v {
                    string(out, s);
                }
            }
            Self::I32Array(v) => {
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A ggml tensor type of the file (ggml's `ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GgmlType {
    /// 0
    F32,
    /// 1
    F16,
    /// 30
    Bf16,
    /// 39: blocks of 32 values, one E8M0 scale byte and 16 bytes of FP4 pairs (17 bytes).
    Mxfp4,
}

impl GgmlType {
    /// The type id in the file.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 30,
            Self::Mxfp4 => 39,
        }
    }

    /// Bytes of `n` values (`n` a multiple of 32 for MXFP4).
    pub fn nbytes(self, n: u64) -> u64 {
        match self {
            Self::F32 => 4 * n,
            Self::F16 | Self::Bf16 => 2 * n,
            Self::Mxfp4 => n / 32 * 17,
        }
    }
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorInfo {
    /// GGUF name (`blk.0.ffn_gate_exps.weight`).
    pub name: String,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Dims in ggml order (innermost first: the reverse of the row-major shape).
    pub dims: Vec<u64>,
}

impl TensorInfo {
    /// Bytes of the tensor's data (without padding).
    pub fn nbytes(&self) -> u64 {
        self.ggml_type.nbytes(self.dims.iter().product())
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// The header, metadata and tensor infos, padded to the start of the data section.
fn header(meta: &[(String, Value)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(&mut h, k);
        v.encode(&mut h);
    }
    let mut off = 0u64;
    for t in tensors {
        string(&mut h, &t.name);
        h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        h.extend_from_slice(&off.to_le_bytes());
        off += pad(t.nbytes());
    }
    h.resize(pad(h.len() as u64) as usize, 0);
    h
}

/// Writes the GGUF file `path` (as `<path>` directly: the caller names a `.tmp` file and renames
/// it): `meta` in order, `tensors` in order, calling `produce(i, w)` once per tensor to write the
/// [`TensorInfo::nbytes`] bytes of `tensors[i]` (each tensor is then zero-padded to
/// [`ALIGNMENT`]). Returns the file size.
///
/// # Errors
/// The producer's error; [`ModelError::Io`] naming `path` (and the tensor when writing its bytes
/// failed); [`ModelError::InvalidArgument`] when a producer wrote another number of bytes than
/// the tensor's info implies.
pub(crate) fn write_gguf(
    path: &Path,
    meta: &[(String, Value)],
    tensors: &[TensorInfo],
    mut produce: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<u64> {
    let f = std::fs::File::create(path).map_err(io(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let h = header(meta, tensors);
    w.write_all(&h).map_err(io(path))?;
    let mut size = h.len() as u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = produce_counted(&mut w, path, &t.name, |w| produce(i, w))?;
        if n != t.nbytes() {
            return Err(ModelError::arg(
                "gguf",
                format!(
                    "{}: tensor `{}`: {n} bytes written, {} expected for {:?} {:?}",
                    path.display(),
                    t.name,
                    t.nbytes(),
                    t.ggml_type,
                    t.dims
                ),
            ));
        }
        let padded = pad(n);
        w.write_all(&vec![0u8; (padded - n) as usize])
            .map_err(io(path))?;
        size += padded;
    }
    w.into_inner()
        .map_err(|e| io(path)(e.into_error()))?
        .sync_all()
        .map_err(io(path))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_follows_gguf_md() {
        let meta = vec![("a".to_string(), Value::U32(7))];
        let t = vec![
            TensorInfo {
                name: "x".into(),
                ggml_type: GgmlType::F32,
                dims: vec![3],
            },
            TensorInfo {
                name: "y".into(),
                ggml_type: GgmlType::Mxfp4,
                dims: vec![32, 2],
            },
        ];
        let h = header(&meta, &t);
        assert_eq!(&h[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), 1);
        // key "a": len 1, 'a', type 4, value 7
        assert_eq!(&h[24..33], &[1, 0, 0, 0, 0, 0, 0, 0, b'a']);
        assert_eq!(&h[33..41], &[4, 0, 0, 0, 7, 0, 0, 0]);
        // x: 12 bytes of data padded to 32, so y starts at 32; y is 2 blocks of 17 bytes
        assert_eq!(t[1].nbytes(), 34);
        let y_off = h.len() - h.len() % 32; // header is padded to 32
        assert_eq!(h.len() % 32, 0);
        assert!(y_off >= 41);
        let tail = &h[..];
        let pos = tail.windows(1).rposition(|w| w == [b'y']).unwrap();
        // name, n_dims 2, dims 32 and 2, type 39, offset 32
        let rest = &tail[pos + 1..];
        assert_eq!(u32::from_le_bytes(rest[0..4].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(rest[4..12].try_into().unwrap()), 32);
        assert_eq!(u64::from_le_bytes(rest[12..20].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(rest[20..24].try_into().unwrap()), 39);
        assert_eq!(u64::from_le_bytes(rest[24..32].try_into().unwrap()), 32);
    }
}
