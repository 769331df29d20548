//! Checkpoint saving/loading round trips and loader errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs, reference};
use gptoss_model::{init_random, load, save, Config, ModelError, SaveOptions};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gptoss-model-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn logits_of(dir: &std::path::Path) -> Tensor {
    let model = load(dir, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]], &Device::Cpu).unwrap();
    model.forward(&ids, None).unwrap()
}

#[test]
fn save_and_reload_plain_sharded_and_mxfp4() {
    let src = fixture("tiny-gpt-oss");
    let want = logits_of(&src);
    let model = load(&src, DType::F32, &Device::Cpu).unwrap();
    for (tag, opts) in [
        ("single", SaveOptions::default()),
        (
            "sharded",
            SaveOptions {
                max_shard_bytes: Some(100_000),
                ..Default::default()
            },
        ),
        (
            "mxfp4",
            SaveOptions {
                mxfp4_experts: true,
                max_shard_bytes: Some(60_000),
                dtype: Some(DType::BF16),
            },
        ),
    ] {
        let dir = tmp(tag);
        save(&model, &dir, &opts).unwrap();
        let got = logits_of(&dir);
        // the fixture's weights are bf16 values and MXFP4-exact experts: every round trip is exact
        assert_eq!(max_abs(&got, &want), 0.0, "{tag}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn random_init_saves_and_loads() {
    let cfg = Config::tiny();
    let a = init_random(&cfg, DType::F32, &Device::Cpu, Some(3)).unwrap();
    let b = init_random(&cfg, DType::F32, &Device::Cpu, Some(3)).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let la = a.forward(&ids, None).unwrap();
    assert_eq!(max_abs(&la, &b.forward(&ids, None).unwrap()), 0.0);
    let dir = tmp("init");
    save(&a, &dir, &SaveOptions::default()).unwrap();
    let c = load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs(&la, &c.forward(&ids, None).unwrap()), 0.0);
    let bf = init_random(&cfg, DType::BF16, &Device::Cpu, None).unwrap();
    assert_eq!(bf.forward(&ids, None).unwrap().dims(), &[1, 4, 512]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Write the fixture as one `model.safetensors`, editing its tensors first.
fn edited(tag: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let src = fixture("tiny-gpt-oss");
    let dir = tmp(tag);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut all = HashMap::new();
    for f in gptoss_model::checkpoint_files(&src).unwrap() {
        all.extend(candle_core::safetensors::load(&f, &Device::Cpu).unwrap());
    }
    edit(&mut all);
    candle_core::safetensors::save(&all, dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn loader_errors_name_tensor_file_and_shapes() {
    let dir = edited("missing", |m| {
        m.remove("model.layers.1.self_attn.sinks");
    });
    match load(&dir, DType::F32, &Device::Cpu) {
        Err(e @ ModelError::MissingTensor { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("model.layers.1.self_attn.sinks") && s.contains("[4]"),
                "{s}"
            );
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let dir = edited("shape", |m| {
        m.insert(
            "model.layers.0.self_attn.k_proj.bias".into(),
            Tensor::zeros(7, DType::BF16, &Device::Cpu).unwrap(),
        );
    });
    match load(&dir, DType::F32, &Device::Cpu) {
        Err(e @ ModelError::ShapeMismatch { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("k_proj.bias")
                    && s.contains("model.safetensors")
                    && s.contains("[7]")
                    && s.contains("[32]"),
                "{s}"
            );
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let dir = edited("blocks", |m| {
        let k = "model.layers.2.mlp.experts.down_proj_scales".to_string();
        m.insert(
            k,
            Tensor::zeros((4, 64, 3), DType::U8, &Device::Cpu).unwrap(),
        );
    });
    match load(&dir, DType::F32, &Device::Cpu) {
        Err(e @ ModelError::ShapeMismatch { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("down_proj_scales")
                    && s.contains("[4, 64, 3]")
                    && s.contains("[4, 64, 2]"),
                "{s}"
            );
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let dir = edited("extra", |m| {
        m.insert(
            "model.layers.0.mlp.gate.weight".into(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load(&dir, DType::F32, &Device::Cpu) {
        Err(e @ ModelError::UnexpectedTensor { .. }) => {
            assert!(e.to_string().contains("mlp.gate.weight"))
        }
        other => panic!("expected UnexpectedTensor, got {other:?}"),
    }
    // plain (dequantized) experts load too and give the same logits
    let r = reference("tiny-gpt-oss");
    let model = load(fixture("tiny-gpt-oss"), DType::F32, &Device::Cpu).unwrap();
    let dir = edited("plain", |m| {
        for l in 0..4 {
            for p in ["gate_up_proj", "down_proj"] {
                let name = format!("model.layers.{l}.mlp.experts.{p}");
                m.remove(&format!("{name}_blocks"));
                m.remove(&format!("{name}_scales"));
                let param = if p == "gate_up_proj" {
                    gptoss_model::ExpertParam::GateUp
                } else {
                    gptoss_model::ExpertParam::Down
                };
                m.insert(name, model.model.layers[l].mlp.experts.param(param).clone());
            }
        }
    });
    let plain = load(&dir, DType::F32, &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    assert!(max_abs(&plain.forward(&ids, None).unwrap(), &r["logits"]) <= 1e-4);
    for t in ["missing", "shape", "blocks", "extra", "plain"] {
        let _ = std::fs::remove_dir_all(tmp(t));
    }
}

/// The transformers fixtures loaded with MXFP4-resident experts (decoded inside the expert
/// matmuls) give transformers' logits, as the dequantized load does.
#[test]
fn resident_experts_match_transformers() {
    use gptoss_model::{load_with, ExpertLoading, LoadOptions};
    for name in ["tiny-gpt-oss", "tiny-gpt-oss-w128"] {
        let r = reference(name);
        let opts = LoadOptions {
            dtype: DType::F32,
            experts: ExpertLoading::Resident,
        };
        let model = load_with(fixture(name), &Device::Cpu, &opts).unwrap();
        assert!(model
            .model
            .layers
            .iter()
            .all(|l| l.mlp.experts.packed().is_some()));
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let d = max_abs(&model.forward(&ids, None).unwrap(), &r["logits"]);
        assert!(
            d <= 1e-4,
            "{name}: resident logits differ from transformers by {d}"
        );
    }
}

/// A copy of the sharded fixture in a fresh directory, for breaking one file of it.
fn sharded_copy(tag: &str) -> PathBuf {
    let src = fixture("tiny-gpt-oss");
    let dir = tmp(tag);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

/// Broken checkpoints (a shard missing, a truncated shard, a tensor of the wrong dtype, a config
/// that does not match the shards) give an error naming the file and the tensor, in both loading
/// modes.
#[test]
fn broken_checkpoints_name_file_and_tensor() {
    use gptoss_model::{load_with, ExpertLoading, LoadOptions};
    let modes = [ExpertLoading::Resident, ExpertLoading::Dequantize];
    let load_all = |dir: &std::path::Path| -> Vec<String> {
        modes
            .iter()
            .map(|&experts| {
                let opts = LoadOptions {
                    dtype: DType::F32,
                    experts,
                };
                match load_with(dir, &Device::Cpu, &opts) {
                    Ok(_) => panic!("{}: a broken checkpoint loaded", dir.display()),
                    Err(e) => e.to_string(),
                }
            })
            .collect()
    };
    // a shard named by the index is missing
    let dir = sharded_copy("noshard");
    std::fs::remove_file(dir.join("model-00002-of-00005.safetensors")).unwrap();
    for s in load_all(&dir) {
        assert!(s.contains("model-00002-of-00005.safetensors"), "{s}");
    }
    // a truncated shard
    let dir = sharded_copy("truncated");
    let f = dir.join("model-00003-of-00005.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    for s in load_all(&dir) {
        assert!(s.contains("model-00003-of-00005.safetensors"), "{s}");
    }
    // MXFP4 scales stored as f32, a sink stored as u8
    for (tag, name, t) in [
        (
            "scales_dtype",
            "model.layers.2.mlp.experts.down_proj_scales",
            Tensor::zeros((4, 64, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "sink_dtype",
            "model.layers.1.self_attn.sinks",
            Tensor::zeros(4, DType::U8, &Device::Cpu).unwrap(),
        ),
    ] {
        let dir = edited(tag, |m| {
            m.insert(name.into(), t);
        });
        for s in load_all(&dir) {
            assert!(s.contains(name) && s.contains("model.safetensors"), "{s}");
        }
    }
    // a config of another size than the shards (as a 120b config over 20b shards)
    let dir = sharded_copy("config");
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_local_experts"] = 8.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    for s in load_all(&dir) {
        assert!(
            s.contains("model.layers.0.") && s.contains(".safetensors"),
            "{s}"
        );
    }
    for t in [
        "noshard",
        "truncated",
        "scales_dtype",
        "sink_dtype",
        "config",
    ] {
        let _ = std::fs::remove_dir_all(tmp(t));
    }
}
