//! Config parsing, presets, validation, parameter counts and memory estimates.

mod common;

use gptoss_model::{memory_estimate, num_parameters, Config, ExpertFormat, LayerType, ModelError};

/// openai/gpt-oss-20b config.json (reference §1).
const CONFIG_20B: &str = r#"{
  "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
  "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
  "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
  "layer_types": ["sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention"],
  "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
  "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": false,
  "pad_token_id": 199999,
  "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn","model.layers.*.mlp.router","model.embed_tokens","lm_head"], "quant_method": "mxfp4"},
  "rms_norm_eps": 1e-05,
  "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
  "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
  "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0", "use_cache": true, "vocab_size": 201088
}"#;

#[test]
fn released_20b_config_equals_preset() {
    let c = Config::from_json_str(CONFIG_20B).unwrap();
    assert_eq!(c, Config::gpt_oss_20b());
    assert_eq!(c.layer_window(0), Some(128));
    assert_eq!(c.layer_window(1), None);
    assert!(c.is_mxfp4());
    // round trip through our writer
    let again = Config::from_json_str(&c.to_json().unwrap()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn parameter_counts_from_shapes() {
    assert_eq!(num_parameters(&Config::gpt_oss_20b()), 20_914_757_184);
    assert_eq!(num_parameters(&Config::gpt_oss_120b()), 116_829_156_672);
}

#[test]
fn memory_estimate_matches_released_checkpoint_size() {
    // index metadata total_size of openai/gpt-oss-20b (bf16 + MXFP4 experts)
    let m = memory_estimate(&Config::gpt_oss_20b(), ExpertFormat::Mxfp4);
    assert_eq!(m.total_bytes(), 13_761_264_768);
    let b = memory_estimate(&Config::gpt_oss_20b(), ExpertFormat::Bf16);
    assert_eq!(b.total_bytes(), 2 * 20_914_757_184);
    assert!(format!("{m}").contains("GiB"));
}

#[test]
fn defaults_follow_transformers() {
    let c = Config::from_json_str(
        r#"{"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "num_local_experts": 4, "vocab_size": 100}"#,
    )
    .unwrap();
    assert_eq!(
        c.layer_types(),
        vec![LayerType::Sliding, LayerType::Full, LayerType::Sliding]
    );
    assert_eq!(c.head_dim(), 16);
    assert_eq!(c.num_experts_per_tok, 4);
    assert_eq!(c.sliding_window, Some(128));
    assert_eq!(c.router_aux_loss_coef, 0.001);
    assert_eq!(c.swiglu_alpha, 1.702);
    assert_eq!(c.rope().rope_type, "yarn");
}

fn field_of(json: &str) -> String {
    match Config::from_json_str(json) {
        Err(ModelError::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn validation_names_the_field() {
    let base = Config::tiny();
    let mut bad = base.clone();
    bad.layer_types = Some(vec![LayerType::Full]);
    assert!(
        matches!(bad.validate(), Err(ModelError::Config { field, .. }) if field == "layer_types")
    );
    let mut bad = base.clone();
    bad.num_key_value_heads = 3;
    assert!(
        matches!(bad.validate(), Err(ModelError::Config { field, .. }) if field == "num_key_value_heads")
    );
    let mut bad = base.clone();
    bad.num_experts_per_tok = 9;
    assert!(
        matches!(bad.validate(), Err(ModelError::Config { field, .. }) if field == "num_experts_per_tok")
    );
    let mut bad = base.clone();
    bad.sliding_window = None;
    assert!(
        matches!(bad.validate(), Err(ModelError::Config { field, .. }) if field == "sliding_window")
    );
    let j = CONFIG_20B.replace("\"rope_type\": \"yarn\"", "\"rope_type\": \"ntk\"");
    assert_eq!(field_of(&j), "rope_scaling.rope_type");
    let j = CONFIG_20B.replace("\"quant_method\": \"mxfp4\"", "\"quant_method\": \"gptq\"");
    assert_eq!(field_of(&j), "quantization_config.quant_method");
    assert!(matches!(
        Config::from_json_str("{"),
        Err(ModelError::Json { .. })
    ));
}
