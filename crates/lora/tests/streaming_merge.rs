//! The streaming merged export (`export_checkpoint` with an [`AdapterMerge`], which never loads
//! the model) against the in-memory route (load, `LoraModel::merge_and_unload`, `export`) on the
//! GGUF golden checkpoint of the model crate's tests: the same files byte for byte in bf16 (f32
//! and bf16 merges), mxfp4 and gguf; an expert weight the adapter leaves alone passed through as
//! stored; an adapter for another base refused before anything is written.

#[path = "../../model/tests/gguf_input/mod.rs"]
mod gguf_input;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gptoss_lora::{write_random_adapter, AdapterMerge, LoraConfig, LoraModel, TargetModules};
use gptoss_model::export::{export, export_checkpoint, ExportFormat, ExportOptions};
use gptoss_model::{load_with, Config, ExpertLoading, GptOssForCausalLM, LoadOptions};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gptoss-stream-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_file(&d);
    d
}

fn load(dir: &Path, dtype: DType) -> GptOssForCausalLM {
    let opts = LoadOptions {
        dtype,
        experts: ExpertLoading::Resident,
    };
    load_with(dir, &Device::Cpu, &opts).unwrap()
}

/// A PEFT adapter with seeded nonzero A and B (uniform in ±0.05) on every attention linear and
/// on the expert weights `params` (`"1.mlp.experts.gate_up_proj"`, ...), in `dir`.
fn adapter(model_dir: &Path, dir: &Path, params: &[&str]) {
    let mut cfg = LoraConfig::cookbook();
    cfg.target_modules = Some(TargetModules::list([
        "q_proj", "k_proj", "v_proj", "o_proj",
    ]));
    cfg.target_parameters = Some(params.iter().map(|p| p.to_string()).collect());
    let base = Config::from_file(model_dir.join("config.json")).unwrap();
    write_random_adapter(dir, &cfg, &base, 3, 0.05).unwrap();
}

/// Every file of a directory (or the file itself) by name, with its bytes.
fn contents(path: &Path) -> Vec<(String, Vec<u8>)> {
    if path.is_file() {
        return vec![(String::new(), std::fs::read(path).unwrap())];
    }
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

fn options(format: ExportFormat, dtype: DType, merge_dtype: DType, source: &Path) -> ExportOptions {
    let mut o = ExportOptions::new(format);
    o.dtype = dtype;
    o.merge_dtype = merge_dtype;
    o.max_shard_bytes = 200_000; // several shards
    o.source_dir = Some(source.to_path_buf());
    o
}

/// `<tmp>/<tag>/model` (gguf: `model.gguf`, the file stem being the GGUF's `general.name`).
fn out_path(tag: &str, format: ExportFormat) -> PathBuf {
    let p = tmp(tag).join("model");
    match format {
        ExportFormat::Gguf => p.with_extension("gguf"),
        _ => p,
    }
}

#[test]
fn streamed_merge_writes_the_bytes_of_the_in_memory_merge() {
    let base = tmp("base");
    gguf_input::write(&base);
    let ad = tmp("adapter");
    adapter(
        &base,
        &ad,
        &["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"],
    );
    let config = Config::from_file(base.join("config.json")).unwrap();
    let merge = AdapterMerge::from_pretrained(&ad, &config).unwrap();
    let cases = [
        (ExportFormat::Bf16, DType::F32, DType::F32),
        (ExportFormat::Bf16, DType::BF16, DType::F32),
        (ExportFormat::Bf16, DType::BF16, DType::BF16),
        (ExportFormat::Mxfp4, DType::BF16, DType::F32),
        (ExportFormat::Gguf, DType::BF16, DType::F32),
    ];
    for (i, (format, dtype, merge_dtype)) in cases.into_iter().enumerate() {
        let opts = options(format, dtype, merge_dtype, &base);
        let mut model = load(&base, merge_dtype);
        LoraModel::from_pretrained(&mut model, &ad)
            .unwrap()
            .merge_and_unload(&mut model)
            .unwrap();
        let (a, b) = (
            out_path(&format!("mem-{i}"), format),
            out_path(&format!("stream-{i}"), format),
        );
        let ra = export(&model, &a, &opts).unwrap();
        drop(model);
        let rb = export_checkpoint(&base, Some(&merge), &b, &opts).unwrap();
        let case = format!("{format} dtype {dtype:?} merged in {merge_dtype:?}");
        assert_eq!(ra.quantization, rb.quantization, "{case}: reports");
        assert_eq!(ra.tensors, rb.tensors, "{case}");
        let (ca, cb) = (contents(&a), contents(&b));
        assert_eq!(
            ca.iter().map(|c| &c.0).collect::<Vec<_>>(),
            cb.iter().map(|c| &c.0).collect::<Vec<_>>(),
            "{case}: files"
        );
        assert!(ca.len() > 1 || format == ExportFormat::Gguf, "{case}");
        for ((name, x), (_, y)) in ca.iter().zip(&cb) {
            assert!(x == y, "{case}: {name} differs");
        }
        if format == ExportFormat::Mxfp4 {
            let re: Vec<bool> = rb.quantization.iter().map(|q| q.requantized).collect();
            assert_eq!(re, [false, false, true, true], "{case}: layer 1 merged");
        }
        for p in [a, b] {
            let _ = p.parent().map(std::fs::remove_dir_all);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&ad);
}

#[test]
fn an_expert_weight_the_adapter_leaves_alone_stays_as_stored() {
    let base = tmp("alone-base");
    gguf_input::write(&base);
    let ad = tmp("alone-adapter");
    adapter(&base, &ad, &["0.mlp.experts.down_proj"]);
    let config = Config::from_file(base.join("config.json")).unwrap();
    let merge = AdapterMerge::from_pretrained(&ad, &config).unwrap();
    let out = tmp("alone-out");
    let opts = options(ExportFormat::Mxfp4, DType::BF16, DType::F32, &base);
    let report = export_checkpoint(&base, Some(&merge), &out, &opts).unwrap();
    let requantized: Vec<(&str, bool)> = report
        .quantization
        .iter()
        .map(|q| (q.name.as_str(), q.requantized))
        .collect();
    assert_eq!(
        requantized,
        [
            ("model.layers.0.mlp.experts.gate_up_proj", false),
            ("model.layers.0.mlp.experts.down_proj", true),
            ("model.layers.1.mlp.experts.gate_up_proj", false),
            ("model.layers.1.mlp.experts.down_proj", false),
        ]
    );
    // the untouched weight's blocks are the source's bytes; the merged one's the in-memory
    // merge quantized
    let (src, back) = (load(&base, DType::F32), load(&out, DType::F32));
    let bytes = |m: &GptOssForCausalLM, l: usize, p| {
        let (b, s) = m.model.layers[l]
            .mlp
            .experts
            .packed()
            .unwrap()
            .blocks_and_scales(p);
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        (v(b), v(s))
    };
    use gptoss_model::ExpertParam::{Down, GateUp};
    assert!(bytes(&src, 0, GateUp) == bytes(&back, 0, GateUp));
    assert!(bytes(&src, 0, Down) != bytes(&back, 0, Down));
    let mut merged = load(&base, DType::F32);
    LoraModel::from_pretrained(&mut merged, &ad)
        .unwrap()
        .merge_and_unload(&mut merged)
        .unwrap();
    let mem = tmp("alone-mem");
    export(&merged, &mem, &opts).unwrap();
    let mem = load(&mem, DType::F32);
    assert!(bytes(&mem, 0, Down) == bytes(&back, 0, Down));
    for d in [base, ad, out, tmp("alone-mem")] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn an_adapter_for_another_base_is_refused_before_anything_is_written() {
    let base = tmp("refuse-base");
    gguf_input::write(&base);
    let other = tmp("refuse-other");
    let mut narrow = gguf_input::config();
    narrow.hidden_size = 32;
    gptoss_model::write_synthetic_checkpoint(&other, &narrow, &Default::default()).unwrap();
    let ad = tmp("refuse-adapter");
    adapter(&other, &ad, &["1.mlp.experts.down_proj"]);
    let config = Config::from_file(base.join("config.json")).unwrap();
    let err = AdapterMerge::from_pretrained(&ad, &config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("base_model.model.model.layers.") && err.contains("expected shape"),
        "{err}"
    );
    // a checkpoint with a tensor of the wrong shape: named, and no output
    let out = tmp("refuse-out");
    let opts = options(ExportFormat::Bf16, DType::BF16, DType::F32, &base);
    std::fs::copy(base.join("config.json"), other.join("config.json")).unwrap();
    let err = export_checkpoint(&other, None, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("shape"),
        "{err}"
    );
    assert!(!out.exists());
    let mut tmp_out = out.as_os_str().to_os_string();
    tmp_out.push(".tmp");
    assert!(!Path::new(&tmp_out).exists());
    for d in [base, other, ad] {
        let _ = std::fs::remove_dir_all(d);
    }
}
