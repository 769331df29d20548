//! Export (bf16 and MXFP4) of the tiny synthetic checkpoint that `make_checkpoint --arch tiny`
//! writes, loaded back with `load_with`: logits equal the in-memory model (bf16: exactly, since
//! the synthetic weights are bf16 already; MXFP4: exactly for untouched MXFP4 experts, and equal
//! to the in-memory model with quantize→dequantize experts when they were changed), the output
//! directory rules, and the refusals.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
mod common;

use gptoss_model::export::{export, export_checkpoint, ExportFormat, ExportOptions};
use gptoss_model::{
    load_with, logit_gap, probe_tokens, write_synthetic_checkpoint, Config, ExpertLoading,
    ExpertParam, GptOssForCausalLM, LinearAdapter, LoadOptions, SyntheticOptions,
};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gptoss-export-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The tiny checkpoint (`Config::gpt_oss_tiny`, MXFP4 experts, several shards) plus a tokenizer
/// file to be copied.
fn tiny_checkpoint(tag: &str) -> PathBuf {
    let dir = tmp(tag);
    let opts = SyntheticOptions {
        seed: 7,
        max_shard_bytes: 30_000_000,
        mxfp4_experts: true,
    };
    write_synthetic_checkpoint(&dir, &Config::gpt_oss_tiny(), &opts).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{\"test\": true}").unwrap();
    dir
}

fn load(dir: &Path, experts: ExpertLoading) -> GptOssForCausalLM {
    let opts = LoadOptions {
        dtype: DType::F32,
        experts,
    };
    load_with(dir, &Device::Cpu, &opts).unwrap()
}

fn ids(model: &GptOssForCausalLM) -> Tensor {
    probe_tokens(model.config().vocab_size, 12, &Device::Cpu).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn bf16_export_is_sharded_hf_layout_and_reloads_to_the_same_logits() {
    let src = tiny_checkpoint("bf16-src");
    let model = load(&src, ExpertLoading::Resident);
    let out = tmp("bf16-out");
    let mut opts = ExportOptions::new(ExportFormat::Bf16);
    opts.max_shard_bytes = 40_000_000;
    opts.source_dir = Some(src.clone());
    let report = export(&model, &out, &opts).unwrap();
    assert!(report.files.len() > 1, "expected shards: {report:?}");
    assert!(report.quantization.is_empty());
    assert_eq!(
        report.copied,
        vec!["tokenizer_config.json", "generation_config.json"]
    );
    let names = files(&out);
    assert!(names.contains(&"model.safetensors.index.json".to_string()));
    assert!(names.contains(&"generation_config.json".to_string()));
    assert!(names.contains(&"tokenizer_config.json".to_string()));
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    assert!(!tmp("bf16-out.tmp").exists());
    let cfg = json(&out.join("config.json"));
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    assert_eq!(cfg["dtype"], "bfloat16");
    let index = json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.contains_key("model.layers.0.mlp.experts.gate_up_proj"));
    assert!(!map.keys().any(|k| k.ends_with("_blocks")));
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        report.total_bytes
    );
    // every shard below the limit unless it holds a single tensor
    for f in &report.files {
        let len = std::fs::metadata(f).unwrap().len();
        let in_file = map
            .values()
            .filter(|v| out.join(v.as_str().unwrap()) == *f)
            .count();
        assert!(len <= 40_000_000 + 100_000 || in_file == 1, "{f:?}: {len}");
    }
    // bf16 weights (the synthetic checkpoint is bf16 + MXFP4) survive a bf16 export exactly
    let back = load(&out, ExpertLoading::Auto);
    assert!(back.model.layers[0].mlp.experts.packed().is_none());
    let gap = logit_gap(&model, &back, &ids(&model)).unwrap();
    assert!(
        gap.max_abs <= 1e-5,
        "bf16 export changed the logits: {gap:?}"
    );
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn mxfp4_export_of_untouched_experts_is_exact_resident_or_dense() {
    let src = tiny_checkpoint("mx-src");
    for (tag, experts) in [
        ("resident", ExpertLoading::Resident),
        ("dense", ExpertLoading::Dequantize),
    ] {
        let model = load(&src, experts);
        let out = tmp(&format!("mx-{tag}"));
        let report = export(&model, &out, &ExportOptions::new(ExportFormat::Mxfp4)).unwrap();
        assert_eq!(report.files.len(), 1, "fits in one file: {report:?}");
        assert_eq!(
            report.quantization.len(),
            2 * model.config().num_hidden_layers
        );
        let resident = experts == ExpertLoading::Resident;
        for q in &report.quantization {
            assert_eq!(q.requantized, !resident, "{q:?}");
            assert_eq!(q.rel_rms, 0.0, "MXFP4 values re-quantize exactly: {q:?}");
        }
        let cfg = json(&out.join("config.json"));
        assert_eq!(
            cfg["quantization_config"],
            serde_json::json!({
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head"
                ]
            })
        );
        // loaded as the source was (the resident and dense forwards differ in rounding order)
        let back = load(&out, experts);
        assert_eq!(
            back.model.layers[1].mlp.experts.packed().is_some(),
            resident
        );
        let gap = logit_gap(&model, &back, &ids(&model)).unwrap();
        assert_eq!(gap.max_abs, 0.0, "{tag}: {gap:?}");
        if resident {
            // the blocks and scales are the source's bytes
            let (a, _) = model.model.layers[1]
                .mlp
                .experts
                .packed()
                .unwrap()
                .blocks_and_scales(ExpertParam::Down);
            let (b, _) = back.model.layers[1]
                .mlp
                .experts
                .packed()
                .unwrap()
                .blocks_and_scales(ExpertParam::Down);
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            );
            assert!(a == b, "resident blocks were rewritten");
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&src);
}

#[test]
fn mxfp4_export_of_changed_experts_is_the_quantized_model_and_reports_the_error() {
    let src = tiny_checkpoint("mxq-src");
    let mut model = load(&src, ExpertLoading::Dequantize);
    // stand-in for a merged adapter: new dense expert weights in layer 0
    for (_, ex) in model.named_experts_mut().into_iter().take(1) {
        for p in [ExpertParam::GateUp, ExpertParam::Down] {
            let w = ex.param(p).clone();
            let noise = (w.randn_like(0.0, 0.02).unwrap())
                .to_dtype(w.dtype())
                .unwrap();
            ex.set_param(p, (w + noise).unwrap()).unwrap();
        }
    }
    let out = tmp("mxq-out");
    let report = export(&model, &out, &ExportOptions::new(ExportFormat::Mxfp4)).unwrap();
    let worst = report.max_rel_rms();
    assert!(worst > 0.01 && worst < 0.2, "{report:?}");
    // layer 1 was MXFP4 and unchanged: no error
    for q in report
        .quantization
        .iter()
        .filter(|q| q.name.contains("layers.1."))
    {
        assert_eq!(q.rel_rms, 0.0, "{q:?}");
    }
    // the reference: the in-memory model with bf16-cast, quantized and dequantized experts
    let mut want = model.clone();
    for (_, ex) in want.named_experts_mut() {
        for p in [ExpertParam::GateUp, ExpertParam::Down] {
            let w = ex.param(p).to_dtype(DType::BF16).unwrap();
            let (b, s) =
                gptoss_mxfp4::quantize_named(&w, gptoss_mxfp4::Layout::Transposed, None).unwrap();
            let d = gptoss_mxfp4::dequantize(&b, &s, DType::F32, gptoss_mxfp4::Layout::Transposed)
                .unwrap()
                .contiguous()
                .unwrap();
            ex.set_param(p, d).unwrap();
        }
    }
    let back = load(&out, ExpertLoading::Dequantize);
    let x = ids(&model);
    let exact = logit_gap(&want, &back, &x).unwrap();
    assert!(exact.max_abs < 1e-5, "export != quantized model: {exact:?}");
    // the report's error is the weights' error
    let name = "model.layers.0.mlp.experts.gate_up_proj";
    let a = model.model.layers[0].mlp.experts.param(ExpertParam::GateUp);
    let a = a
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = want.model.layers[0].mlp.experts.param(ExpertParam::GateUp);
    let num = (&a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = a.sqr().unwrap().sum_all().unwrap();
    let rel = (num.to_scalar::<f32>().unwrap() / den.to_scalar::<f32>().unwrap()).sqrt() as f64;
    let q = report.quantization.iter().find(|q| q.name == name).unwrap();
    assert!((q.rel_rms - rel).abs() < 1e-5, "{q:?} vs {rel}");
    // and the logits move (a measurement, reported by the CLI's --probe-tokens)
    let gap = logit_gap(&model, &back, &x).unwrap();
    assert!(gap.rel_rms > 0.0 && gap.max_abs.is_finite(), "{gap:?}");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&out);
}

#[derive(Debug)]
struct Nop;
impl LinearAdapter for Nop {
    fn forward(&self, _x: &Tensor, base: &Tensor) -> candle_core::Result<Tensor> {
        Ok(base.clone())
    }
}

#[test]
fn output_dir_rules_and_refusals() {
    let model =
        gptoss_model::init_random(&Config::tiny(), DType::F32, &Device::Cpu, Some(1)).unwrap();
    let out = tmp("rules");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let opts = ExportOptions::new(ExportFormat::Bf16);
    let err = export(&model, &out, &opts).unwrap_err().to_string();
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(out.join("keep.txt").exists());
    // --overwrite replaces the directory as a whole
    let mut over = opts.clone();
    over.overwrite = true;
    export(&model, &out, &over).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").exists());
    // an empty directory is fine; a file is not
    let empty = tmp("rules-empty");
    std::fs::create_dir_all(&empty).unwrap();
    export(&model, &empty, &opts).unwrap();
    let file = tmp("rules-file");
    std::fs::write(&file, "x").unwrap();
    let err = export(&model, &file, &opts).unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
    // the source directory itself
    let mut same = over.clone();
    same.source_dir = Some(out.clone());
    let err = export(&model, &out, &same).unwrap_err().to_string();
    assert!(err.contains("source checkpoint"), "{err}");
    // an unmerged adapter would be dropped
    let mut adapted = model.clone();
    adapted.model.layers[1]
        .self_attn
        .v_proj
        .set_adapter(Some(Arc::new(Nop)));
    let err = export(&adapted, &tmp("rules-adapted"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.self_attn.v_proj") && err.contains("unmerged adapter"),
        "{err}"
    );
    // experts whose `in` is no multiple of 32 cannot be MXFP4
    let mut odd = Config::tiny();
    odd.hidden_size = 48;
    odd.head_dim = Some(12);
    let m = gptoss_model::init_random(&odd, DType::F32, &Device::Cpu, Some(1)).unwrap();
    let dir = tmp("rules-odd");
    let err = export(&m, &dir, &ExportOptions::new(ExportFormat::Mxfp4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.experts.gate_up_proj"),
        "{err}"
    );
    assert!(!dir.exists() && !tmp("rules-odd.tmp").exists());
    // an unknown format names the known ones
    let err = "ggml".parse::<ExportFormat>().unwrap_err().to_string();
    assert!(err.contains("expected bf16, mxfp4 or gguf"), "{err}");
    for d in [out, empty, file] {
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_file(&d);
    }
}

/// A delta that targets one given name and adds 1 to it.
struct PlusOne(&'static str);

impl gptoss_model::WeightDelta for PlusOne {
    fn targets(&self) -> Vec<String> {
        vec![self.0.to_string()]
    }
    fn apply(&self, _: &str, _: Option<usize>, base: &Tensor) -> gptoss_model::Result<Tensor> {
        Ok((base + 1.0)?)
    }
}

#[test]
fn streamed_export_applies_a_delta_and_refuses_targets_the_checkpoint_lacks() {
    let dir = tiny_checkpoint("delta");
    let opts = ExportOptions::new(ExportFormat::Bf16);
    // a target that is not stored: refused before anything is written
    let out = tmp("delta-missing");
    let err = export_checkpoint(
        &dir,
        Some(&PlusOne("model.layers.9.self_attn.q_proj.weight")),
        &out,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.layers.9.self_attn.q_proj.weight") && err.contains("does not store"),
        "{err}"
    );
    assert!(!out.exists() && !tmp("delta-missing.tmp").exists());
    // a stored linear weight: exactly that one changes (by 1, rounded to bf16)
    let name = "model.layers.1.self_attn.k_proj.weight";
    let out = tmp("delta-out");
    export_checkpoint(&dir, Some(&PlusOne(name)), &out, &opts).unwrap();
    let (src, back) = (
        load(&dir, ExpertLoading::Auto),
        load(&out, ExpertLoading::Auto),
    );
    let back: std::collections::HashMap<String, Tensor> =
        gptoss_model::named_parameters(&back).into_iter().collect();
    for (n, a) in gptoss_model::named_parameters(&src) {
        let want = match n == name {
            true => (a + 1.0).and_then(|t| t.to_dtype(DType::BF16)).unwrap(),
            false => a,
        };
        assert_eq!(common::max_abs(&want, &back[&n]), 0.0, "{n}");
    }
    for d in [dir, out] {
        let _ = std::fs::remove_dir_all(d);
    }
}
