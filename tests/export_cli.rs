//! `examples/export.rs` as a user runs it, on the tiny checkpoint `make_checkpoint --arch tiny`
//! writes, with a PEFT adapter on every attention linear and on both expert parameters of layer 1:
//! the merged export loaded back gives the logits of the unmerged base + adapter (f32 export:
//! 1e-4; bf16: every weight the f32 one rounded once; MXFP4: the untouched layers byte for byte, the merged one
//! within its reported quantization error), and bad input exits 1 naming what is wrong. Runs the
//! example binary `cargo test` builds next to this test.

use std::path::Path;
use std::process::Output;

use candle_core::{DType, Device, Tensor};
use gptoss_lora::{LoraConfig, LoraModel, TargetModules};
use gptoss_model::{
    load_with, probe_tokens, write_synthetic_checkpoint, Config, ExpertLoading, GptOssForCausalLM,
    LoadOptions, SyntheticOptions,
};

mod common;
use common::tmp;

/// `export` with `args`, output echoed (shown when the test fails).
fn run(args: &[&str]) -> Output {
    common::run("export", args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn load(dir: &Path, experts: ExpertLoading) -> GptOssForCausalLM {
    let opts = LoadOptions {
        dtype: DType::F32,
        experts,
    };
    load_with(dir, &Device::Cpu, &opts).unwrap()
}

/// The tiny checkpoint with the tokenizer files `make_checkpoint` adds.
fn tiny(dir: &Path, config: &Config) {
    let opts = SyntheticOptions {
        seed: 11,
        max_shard_bytes: 30_000_000,
        mxfp4_experts: true,
    };
    write_synthetic_checkpoint(dir, config, &opts).unwrap();
    gptoss_sft::trainer::pipeline::write_tokenizer_files(dir).unwrap();
}

/// A PEFT adapter with seeded nonzero A and B (uniform in ±0.05) on all attention linears and
/// on the experts of layer 1, written to `dir`.
fn adapter(model_dir: &Path, dir: &Path) {
    let mut cfg = LoraConfig::cookbook();
    cfg.target_modules = Some(TargetModules::list([
        "q_proj", "k_proj", "v_proj", "o_proj",
    ]));
    cfg.target_parameters = Some(vec![
        "1.mlp.experts.gate_up_proj".into(),
        "1.mlp.experts.down_proj".into(),
    ]);
    let base = Config::from_file(model_dir.join("config.json")).unwrap();
    gptoss_lora::write_random_adapter(dir, &cfg, &base, 5, 0.05).unwrap();
}

fn logits(model: &GptOssForCausalLM, ids: &Tensor) -> Tensor {
    model.forward(ids, None).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn rel_rms(a: &Tensor, b: &Tensor) -> f32 {
    let n = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let d = a.sqr().unwrap().sum_all().unwrap();
    (n.to_scalar::<f32>().unwrap() / d.to_scalar::<f32>().unwrap()).sqrt()
}

#[test]
fn merged_exports_match_the_unmerged_adapter_and_bad_input_fails_cleanly() {
    let base = tmp("base");
    tiny(&base, &Config::gpt_oss_tiny());
    let ad = tmp("adapter");
    adapter(&base, &ad);
    // the reference: base + adapter, unmerged, f32
    let mut model = load(&base, ExpertLoading::Resident);
    let lora = LoraModel::from_pretrained(&mut model, &ad).unwrap();
    let ids = probe_tokens(model.config().vocab_size, 16, &Device::Cpu).unwrap();
    let want = logits(&model, &ids);
    drop(lora);

    // f32: the merge is exact up to float rounding
    let f32_out = tmp("f32");
    let o = run(&[
        "--model",
        s(&base),
        "--adapter",
        s(&ad),
        "--out",
        s(&f32_out),
        "--format",
        "bf16",
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success());
    let d = max_abs(&want, &logits(&load(&f32_out, ExpertLoading::Auto), &ids));
    assert!(d < 1e-4, "f32 export vs unmerged adapter: {d}");
    for f in [
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        assert!(f32_out.join(f).is_file(), "{f} not copied");
    }

    // bf16: one rounding of every merged weight
    let bf16_out = tmp("bf16");
    let report = tmp("bf16-report.json");
    let o = run(&[
        "--model",
        s(&base),
        "--adapter",
        s(&ad),
        "--out",
        s(&bf16_out),
        "--format",
        "bf16",
        "--probe-tokens",
        "8",
        "--report",
        s(&report),
    ]);
    assert!(o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("logit gap on 8 probe tokens"), "{stdout}");
    // every bf16 tensor is the f32 export's tensor rounded once to bf16
    let (exact, rounded) = (
        load(&f32_out, ExpertLoading::Auto),
        load(&bf16_out, ExpertLoading::Auto),
    );
    let (pa, pb) = (
        gptoss_model::named_parameters(&exact),
        gptoss_model::named_parameters(&rounded),
    );
    assert_eq!(pa.len(), pb.len());
    for ((na, a), (nb, b)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let a = a
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            max_abs(&a, b),
            0.0,
            "{na}: not the bf16 rounding of the merged weight"
        );
    }
    // the logits move by the rounding (a random model routes chaotically: reported, not bounded)
    let r = rel_rms(&want, &logits(&rounded, &ids));
    eprintln!("bf16 export vs unmerged adapter: logits relative RMS {r}");
    assert!(r.is_finite());
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(rep["format"], "bf16");
    assert!(
        rep["logit_gap"]["max_abs"].as_f64().unwrap().is_finite(),
        "{rep}"
    );

    // mxfp4: layer 0 untouched (blocks passed through), layer 1 merged and re-quantized
    let mx_out = tmp("mxfp4");
    let mx_report = tmp("mxfp4-report.json");
    let o = run(&[
        "--model",
        s(&base),
        "--adapter",
        s(&ad),
        "--out",
        s(&mx_out),
        "--format",
        "mxfp4",
        "--report",
        s(&mx_report),
    ]);
    assert!(o.status.success());
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mx_report).unwrap()).unwrap();
    let q = rep["quantization"].as_array().unwrap();
    for e in q {
        let name = e["name"].as_str().unwrap();
        let (re, err) = (
            e["requantized"].as_bool().unwrap(),
            e["rel_rms"].as_f64().unwrap(),
        );
        assert_eq!(re, name.contains("layers.1."), "{e}");
        assert!(
            if re {
                err > 1e-3 && err < 0.2
            } else {
                err == 0.0
            },
            "{e}"
        );
    }
    let back = load(&mx_out, ExpertLoading::Resident);
    assert!(back.model.layers[0].mlp.experts.packed().is_some());
    let src = load(&base, ExpertLoading::Resident);
    let (a, b) = (
        src.model.layers[0].mlp.experts.packed().unwrap(),
        back.model.layers[0].mlp.experts.packed().unwrap(),
    );
    for p in [
        gptoss_model::ExpertParam::GateUp,
        gptoss_model::ExpertParam::Down,
    ] {
        let bytes = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert!(bytes(a.blocks_and_scales(p).0) == bytes(b.blocks_and_scales(p).0));
        assert!(bytes(a.blocks_and_scales(p).1) == bytes(b.blocks_and_scales(p).1));
    }
    let r = rel_rms(&want, &logits(&back, &ids));
    assert!(r > 0.0 && r.is_finite(), "mxfp4 logit gap {r}");

    // a non-empty --out is refused without --overwrite, and replaced with it
    let o = run(&[
        "--model",
        s(&base),
        "--out",
        s(&mx_out),
        "--format",
        "mxfp4",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    let o = run(&[
        "--model",
        s(&base),
        "--out",
        s(&mx_out),
        "--format",
        "mxfp4",
        "--overwrite",
    ]);
    assert!(o.status.success());
    let exact = max_abs(
        &logits(&src, &ids),
        &logits(&load(&mx_out, ExpertLoading::Resident), &ids),
    );
    assert_eq!(exact, 0.0, "MXFP4 export without adapter must be exact");

    // an adapter for another base: error naming the tensor, exit 1, nothing written
    let other = tmp("other-base");
    let mut narrow = Config::gpt_oss_tiny();
    narrow.hidden_size = 64;
    narrow.head_dim = Some(16);
    tiny(&other, &narrow);
    let other_ad = tmp("other-adapter");
    adapter(&other, &other_ad);
    let bad_out = tmp("bad");
    let o = run(&[
        "--model",
        s(&base),
        "--adapter",
        s(&other_ad),
        "--out",
        s(&bad_out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("adapter tensor \"base_model.model.model.layers.")
            && err.contains("expected shape"),
        "{err}"
    );
    assert!(!bad_out.exists());

    // gguf: one file; the synthetic checkpoint has no tokenizer.json, which the export names
    let gguf_out = tmp("gguf").with_extension("gguf");
    let o = run(&[
        "--model",
        s(&base),
        "--out",
        s(&gguf_out),
        "--format",
        "gguf",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );
    assert!(!gguf_out.exists());
    let o = run(&[
        "--model",
        s(&base),
        "--out",
        s(&gguf_out),
        "--format",
        "gguf",
        "--probe-tokens",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be loaded back"));

    for d in [base, ad, f32_out, bf16_out, mx_out, other, other_ad] {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_file(report);
    let _ = std::fs::remove_file(mx_report);
}

/// A full disk, emulated by a file-size limit (`ulimit -f` with SIGXFSZ ignored, so a write past
/// it fails with EFBIG as a full disk fails with ENOSPC): exit 1 naming the shard and the tensor
/// being written, and nothing complete-looking left behind.
#[cfg(unix)]
#[test]
fn a_failed_write_leaves_no_complete_looking_output() {
    let base = tmp("full-base");
    tiny(&base, &Config::gpt_oss_tiny());
    let out = tmp("full-out");
    let script = format!(
        "ulimit -f 2048; trap '' XFSZ; exec \"$0\" --model {} --out {} --format bf16",
        s(&base),
        s(&out)
    );
    let o = std::process::Command::new("sh")
        .args(["-c", &script, s(&common::example("export"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".safetensors.tmp") && err.contains("writing tensor `"),
        "{err}"
    );
    assert!(!out.exists());
    let mut t = out.as_os_str().to_os_string();
    t.push(".tmp");
    assert!(!Path::new(&t).exists(), "the .tmp directory is removed");
    let _ = std::fs::remove_dir_all(base);
}
