//! The real-checkpoint path as a user runs it: `make_checkpoint --arch tiny` writes a checkpoint
//! in the Hugging Face layout, `finetune_multilingual --model` trains on it (MXFP4 experts
//! resident or `--dequantize`d), and broken checkpoints make it exit 1 naming the file and the
//! tensor, with nothing written to the output directory. Runs the example binaries `cargo test`
//! builds next to this test.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{run, tmp};

fn make_tiny(dir: &Path) {
    let out = run(
        "make_checkpoint",
        &[
            "--arch",
            "tiny",
            "--out",
            dir.to_str().unwrap(),
            "--shard-gb",
            "0.03",
        ],
    );
    assert!(out.status.success(), "make_checkpoint failed");
}

fn finetune(model: &Path, out_dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--max-steps",
        "2",
        "--report-to",
        "none",
        "--max-length",
        "256",
        "--dtype",
        "f32",
        "--no-generate",
        // the tiny arch has 4 layers: the recipe's expert layers 7/15/23 do not exist
        "--lora-target-parameters",
        "1.mlp.experts.gate_up_proj,1.mlp.experts.down_proj",
    ];
    args.extend_from_slice(extra);
    run("finetune_multilingual", &args)
}

#[test]
fn tiny_checkpoint_trains_resident_and_dequantized_and_broken_ones_fail_cleanly() {
    let ckpt = tmp("ckpt");
    make_tiny(&ckpt);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "chat_template.jinja",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(ckpt.join(f).is_file(), "make_checkpoint wrote no {f}");
    }
    let config = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
    assert!(config.contains("\"quant_method\": \"mxfp4\""), "{config}");

    // trains on the CPU, with resident experts and dequantized ones
    for (tag, extra) in [("default", vec![]), ("dequantize", vec!["--dequantize"])] {
        let out_dir = tmp(&format!("out-{tag}"));
        let out = finetune(&ckpt, &out_dir, &extra);
        assert!(out.status.success(), "{tag}: finetune_multilingual failed");
        assert!(out_dir.join("adapter_model.safetensors").is_file());
        let _ = std::fs::remove_dir_all(&out_dir);
    }

    // a missing shard, a truncated shard, a config of another size: exit 1, the file and the
    // tensor named, nothing written
    let shards: Vec<PathBuf> = gptoss::model::checkpoint_files(&ckpt).unwrap();
    assert!(shards.len() > 1, "expected a sharded checkpoint");
    let broken = |tag: &str, edit: &dyn Fn(&Path)| -> String {
        let dir = tmp(&format!("broken-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&ckpt).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        edit(&dir);
        let out_dir = tmp(&format!("out-broken-{tag}"));
        let out = finetune(&dir, &out_dir, &[]);
        assert_eq!(out.status.code(), Some(1), "{tag}: expected exit code 1");
        assert!(!out_dir.exists(), "{tag}: the output directory was created");
        let _ = std::fs::remove_dir_all(&dir);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let second = shards[1].file_name().unwrap().to_str().unwrap().to_string();
    let msg = broken("missing", &|d: &Path| {
        std::fs::remove_file(d.join(&second)).unwrap()
    });
    assert!(msg.contains(&second), "missing shard not named: {msg}");
    let msg = broken("truncated", &|d: &Path| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(&second))
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len / 3).unwrap();
    });
    assert!(msg.contains(&second), "truncated shard not named: {msg}");
    let msg = broken("config", &|d: &Path| {
        let p = d.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["num_local_experts"] = 16.into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    assert!(
        msg.contains("model.layers.0.") && msg.contains(".safetensors"),
        "config mismatch does not name the tensor and file: {msg}"
    );
    let _ = std::fs::remove_dir_all(&ckpt);
}
