//! Our adapter files against the schema of the files the real PEFT 0.21.2 writes for the same model and
//! LoraConfig (`fixtures/peft_schema.json`, made by scripts/fixtures/lora/make_peft_schema.py): every
//! adapter_config.json key with its JSON type (and value where it decides how PEFT loads the adapter),
//! every adapter_model.safetensors tensor with its shape and dtype. The Python round trip
//! (`export_adapter_for_python` + check_rust_adapter.py) stays a manual check.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use gptoss_lora::{LoraConfig, LoraModel, TargetModules, ADAPTER_WEIGHTS_NAME};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `target_modules` is a set in PEFT, written in no fixed order.
fn normalized(key: &str, v: &Value) -> Value {
    match (key, v) {
        ("target_modules", Value::Array(a)) => {
            let mut s: Vec<String> = a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            s.sort();
            Value::from(s)
        }
        _ => v.clone(),
    }
}

#[test]
fn written_adapter_files_follow_the_peft_schema() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft_schema.json")).unwrap())
            .unwrap();
    let mut model = gptoss_model::load(fixture("tiny-base"), DType::F32, &Device::Cpu).unwrap();
    // The LoraConfig of the fixture script: the cookbook's values on the tiny model's layer 1.
    let cfg = LoraConfig {
        target_modules: Some(TargetModules::all_linear()),
        target_parameters: Some(vec![
            "1.mlp.experts.gate_up_proj".into(),
            "1.mlp.experts.down_proj".into(),
        ]),
        ..LoraConfig::cookbook()
    };
    let dir = std::env::temp_dir().join(format!("gptoss-lora-schema-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    LoraModel::new(&mut model, cfg, 0)
        .unwrap()
        .save_pretrained(&dir)
        .unwrap();

    let ours: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let theirs = schema["adapter_config"].as_object().unwrap();
    let mut problems = Vec::new();
    for (key, spec) in theirs {
        let Some(v) = ours.get(key) else {
            problems.push(format!("missing key `{key}`"));
            continue;
        };
        let want = spec["type"].as_str().unwrap_or("?");
        // PEFT writes a float where its default is a float; an integral float is the same value.
        let got = json_type(v);
        if got != want && !(want == "float" && got == "int") {
            problems.push(format!("`{key}`: type {got}, PEFT writes {want}"));
        }
        if let Some(value) = spec.get("value") {
            if normalized(key, v) != *value {
                problems.push(format!("`{key}`: {v}, PEFT writes {value}"));
            }
        }
    }
    for key in ours.keys().filter(|k| !theirs.contains_key(*k)) {
        problems.push(format!("key `{key}` that PEFT does not write"));
    }

    let bytes = std::fs::read(dir.join(ADAPTER_WEIGHTS_NAME)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ours: BTreeMap<String, (Vec<usize>, String)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), format!("{:?}", v.dtype()))))
        .collect();
    let theirs: BTreeMap<String, (Vec<usize>, String)> = schema["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), (shape, v["dtype"].as_str().unwrap().to_string()))
        })
        .collect();
    assert_eq!(theirs.len(), 20);
    for (k, t) in &theirs {
        match ours.get(k) {
            None => problems.push(format!("missing tensor `{k}`")),
            Some(o) if o != t => problems.push(format!("tensor `{k}`: {o:?}, PEFT writes {t:?}")),
            _ => {}
        }
    }
    for k in ours.keys().filter(|k| !theirs.contains_key(*k)) {
        problems.push(format!("tensor `{k}` that PEFT does not write"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
