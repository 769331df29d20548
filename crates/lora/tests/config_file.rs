//! adapter_config.json compatibility with PEFT 0.21.2 (fixtures written by scripts/fixtures/lora/make_fixtures.py).

use std::path::PathBuf;

use gptoss_lora::{LoraConfig, LoraError, TargetModules};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn cookbook_config_is_byte_identical_to_peft() {
    let peft = std::fs::read_to_string(fixture("default_adapter_config.json")).unwrap();
    let ours = LoraConfig::cookbook().to_json_string().unwrap();
    assert_eq!(ours, peft);
}

#[test]
fn peft_saved_config_round_trips() {
    let text = std::fs::read_to_string(fixture("peft-adapter/adapter_config.json")).unwrap();
    let cfg = LoraConfig::from_file(&fixture("peft-adapter")).unwrap();
    assert_eq!(cfg.r, 4);
    assert_eq!(cfg.lora_alpha, 8.0);
    assert!(cfg.inference_mode);
    assert_eq!(cfg.task_type.as_deref(), Some("CAUSAL_LM"));
    assert!(matches!(&cfg.target_modules, Some(TargetModules::List(v)) if v.len() == 8));
    assert_eq!(cfg.to_json_string().unwrap(), text);
}

#[test]
fn defaults_fill_missing_fields() {
    let cfg = LoraConfig::from_json_str(r#"{"target_modules": "all-linear"}"#).unwrap();
    assert_eq!(
        cfg,
        LoraConfig {
            target_modules: Some(TargetModules::all_linear()),
            ..LoraConfig::default()
        }
    );
    assert_eq!((cfg.r, cfg.lora_alpha, cfg.lora_dropout), (8, 8.0, 0.0));
}

#[test]
fn unsupported_features_are_named() {
    for (json, field) in [
        (
            r#"{"target_modules": ["q_proj"], "use_dora": true}"#,
            "use_dora",
        ),
        (r#"{"target_modules": ["q_proj"], "bias": "all"}"#, "bias"),
        (
            r#"{"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}"#,
            "modules_to_save",
        ),
        (
            r#"{"target_modules": ["q_proj"], "init_lora_weights": "pissa"}"#,
            "init_lora_weights",
        ),
        (
            r#"{"target_modules": ["q_proj"], "loftq_config": {"loftq_bits": 4}}"#,
            "loftq_config",
        ),
    ] {
        let e = LoraConfig::from_json_str(json)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            matches!(&e, LoraError::Unsupported { field: f, .. } if f == field),
            "{json}: {e}"
        );
    }
    for (json, field) in [
        (r#"{"target_modules": ["q_proj"], "r": 0}"#, "r"),
        (r#"{}"#, "target_modules"),
        (
            r#"{"target_parameters": ["mlp.experts.down_proj"], "lora_dropout": 0.1}"#,
            "lora_dropout",
        ),
    ] {
        let e = LoraConfig::from_json_str(json)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            matches!(&e, LoraError::InvalidConfig { field: f, .. } if *f == field),
            "{json}: {e}"
        );
    }
}
