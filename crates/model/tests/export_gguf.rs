//! GGUF export against llama.cpp's own converter: the tiny checkpoint of `gguf_input` exported
//! with `ExportFormat::Gguf` is byte for byte the file `convert_hf_to_gguf.py` made from it
//! (`tests/fixtures/gguf_golden.json`, written by `scripts/fixtures/export/make_gguf_golden.py`:
//! every metadata key, type and value hash, every tensor's name, type, dims, offset and data
//! hash, and the hash of the whole file). The file is parsed here by a reader independent of
//! the writer (GGUF v3 as in ggml's `docs/gguf.md`). Both routes give it: a loaded model
//! (`export`) and the checkpoint streamed tensor by tensor (`export_checkpoint`).

mod gguf_input;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use gptoss_model::export::{export, export_checkpoint, ExportFormat, ExportOptions};
use gptoss_model::{load_with, ExpertLoading, LoadOptions};
use serde_json::{json, Value};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gptoss-gguf-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn golden() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    /// Skips one value of type `t`, returning a readable form for scalars and strings.
    fn value(&mut self, t: u32) -> Value {
        match t {
            0 | 1 | 7 => json!(self.take(1)[0]),
            2 | 3 => json!(u16::from_le_bytes(self.take(2).try_into().unwrap())),
            4 => json!(self.u32()),
            5 => json!(self.u32() as i32),
            6 => json!(f32::from_le_bytes(self.take(4).try_into().unwrap())),
            8 => json!(self.string()),
            9 => {
                let (et, n) = (self.u32(), self.u64());
                let mut first: Vec<Value> = (0..n).map(|_| self.value(et)).collect();
                first.truncate(3);
                json!({ "elem_type": et, "len": n, "first": first })
            }
            10..=12 => json!(self.u64()),
            other => panic!("unknown GGUF value type {other}"),
        }
    }
}

const TYPE_NAMES: [&str; 13] = [
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
    "UINT64", "INT64", "FLOAT64",
];

/// The same description of a GGUF file as `make_gguf_golden.py`'s `describe`.
fn describe(path: &Path) -> Value {
    let buf = std::fs::read(path).unwrap();
    assert_eq!(&buf[..4], b"GGUF");
    let mut c = Cursor { buf: &buf, pos: 4 };
    let version = c.u32();
    let (n_tensors, n_kv) = (c.u64(), c.u64());
    let mut kv = Vec::new();
    for _ in 0..n_kv {
        let key = c.string();
        let t = c.u32();
        let start = c.pos;
        let value = c.value(t);
        let raw = &buf[start..c.pos];
        kv.push(json!({"key": key, "type": TYPE_NAMES[t as usize], "value": value, "value_fnv1a64": fnv1a64(raw)}));
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string();
        let nd = c.u32();
        let dims: Vec<u64> = (0..nd).map(|_| c.u64()).collect();
        let ty = c.u32();
        let offset = c.u64();
        tensors.push(json!({"name": name, "type": ty, "dims": dims, "offset": offset}));
    }
    let data_offset = c.pos.div_ceil(32) * 32;
    let offsets: Vec<usize> = tensors
        .iter()
        .map(|t| t["offset"].as_u64().unwrap() as usize)
        .collect();
    for (i, t) in tensors.iter_mut().enumerate() {
        let start = data_offset + offsets[i];
        let end = offsets.get(i + 1).map_or(buf.len(), |o| data_offset + o);
        t["padded_nbytes"] = json!(end - start);
        t["data_fnv1a64"] = json!(fnv1a64(&buf[start..end]));
    }
    json!({
        "version": version, "alignment": 32, "data_offset": data_offset, "file_size": buf.len(),
        "file_fnv1a64": fnv1a64(&buf), "kv": kv, "tensors": tensors,
    })
}

/// Compares `ours` with the golden, naming the first difference of each kind.
fn assert_matches_golden(ours: &Value) {
    let g = golden();
    for k in ["version", "alignment", "data_offset", "file_size"] {
        assert_eq!(ours[k], g[k], "{k}");
    }
    let (gk, ok) = (g["kv"].as_array().unwrap(), ours["kv"].as_array().unwrap());
    let keys = |v: &[Value]| {
        v.iter()
            .map(|e| e["key"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(ok), keys(gk), "metadata keys (in order)");
    for (o, e) in ok.iter().zip(gk) {
        assert_eq!(o["type"], e["type"], "type of {}", e["key"]);
        if o["value_fnv1a64"] != e["value_fnv1a64"] {
            let short = |v: &Value| {
                let s = v.to_string();
                s.chars().take(300).collect::<String>()
            };
            panic!(
                "value of {}: ours {} vs converter {}",
                e["key"],
                short(&o["value"]),
                short(&e["value"])
            );
        }
    }
    let (gt, ot) = (
        g["tensors"].as_array().unwrap(),
        ours["tensors"].as_array().unwrap(),
    );
    assert_eq!(ot.len(), gt.len(), "tensor count");
    for (o, e) in ot.iter().zip(gt) {
        for k in [
            "name",
            "type",
            "dims",
            "offset",
            "padded_nbytes",
            "data_fnv1a64",
        ] {
            assert_eq!(o[k], e[k], "{k} of tensor {}", e["name"]);
        }
    }
    assert_eq!(ours["file_fnv1a64"], g["file_fnv1a64"], "whole file");
}

fn export_tiny(tag: &str, experts: ExpertLoading, dtype: DType) -> (PathBuf, PathBuf) {
    let root = tmp(tag);
    let input = root.join("gpt-oss-tiny");
    gguf_input::write(&input);
    let model = load_with(&input, &Device::Cpu, &LoadOptions { dtype, experts }).unwrap();
    let out = root.join("out").join("gpt-oss-tiny.gguf");
    let mut opts = ExportOptions::new(ExportFormat::Gguf);
    opts.source_dir = Some(input);
    let report = export(&model, &out, &opts).unwrap();
    assert_eq!(report.files, vec![out.clone()]);
    assert!(!root.join("out/gpt-oss-tiny.gguf.tmp").exists());
    (root, out)
}

#[test]
fn resident_mxfp4_export_is_the_converters_file() {
    let (root, out) = export_tiny("resident", ExpertLoading::Resident, DType::F32);
    assert_matches_golden(&describe(&out));
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn dense_experts_requantize_to_the_converters_file() {
    // experts dequantized at load and quantized again by the export (exact for MXFP4 values)
    let (root, out) = export_tiny("dense", ExpertLoading::Dequantize, DType::BF16);
    assert_matches_golden(&describe(&out));
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn streamed_export_of_the_checkpoint_is_the_converters_file() {
    // export_checkpoint: no model loaded, tensors read from the mmapped file one at a time
    let root = tmp("streamed");
    let input = root.join("gpt-oss-tiny");
    gguf_input::write(&input);
    let out = root.join("out").join("gpt-oss-tiny.gguf");
    let opts = ExportOptions::new(ExportFormat::Gguf); // source_dir defaults to the checkpoint
    let report = export_checkpoint(&input, None, &out, &opts).unwrap();
    assert_eq!(report.quantization.len(), 4); // 2 layers × 2 expert weights
    assert!(report.quantization.iter().all(|q| !q.requantized));
    assert_matches_golden(&describe(&out));
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn gguf_output_rules_and_refusals() {
    let root = tmp("rules");
    let input = root.join("gpt-oss-tiny");
    gguf_input::write(&input);
    let opts = LoadOptions {
        dtype: DType::F32,
        experts: ExpertLoading::Resident,
    };
    let model = load_with(&input, &Device::Cpu, &opts).unwrap();
    let mut opts = ExportOptions::new(ExportFormat::Gguf);
    let out = root.join("m.gguf");
    let err = |opts: &ExportOptions, out: &Path| export(&model, out, opts).unwrap_err().to_string();
    // no source directory: no tokenizer to write
    let e = err(&opts, &out);
    assert!(e.contains("source checkpoint directory"), "{e}");
    // a source without tokenizer.json
    opts.source_dir = Some(root.clone());
    let e = err(&opts, &out);
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    assert!(!out.exists() && !root.join("m.gguf.tmp").exists());
    // a directory as output
    opts.source_dir = Some(input.clone());
    let e = err(&opts, &input);
    assert!(e.contains("is a directory"), "{e}");
    // an existing file is kept unless --overwrite
    std::fs::write(&out, b"old").unwrap();
    let e = err(&opts, &out);
    assert!(e.contains("exists") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    opts.overwrite = true;
    export(&model, &out, &opts).unwrap();
    assert_eq!(&std::fs::read(&out).unwrap()[..4], b"GGUF");
    let _ = std::fs::remove_dir_all(root);
}

/// Writes the golden checkpoint to `$GPTOSS_GGUF_INPUT` (the input of
/// `scripts/fixtures/export/make_gguf_golden.py`).
#[test]
#[ignore = "writes the input of the golden-file script"]
fn write_golden_input() {
    let dir = std::env::var("GPTOSS_GGUF_INPUT").expect("set GPTOSS_GGUF_INPUT");
    gguf_input::write(Path::new(&dir));
}
