//! `config.json` of a gpt-oss checkpoint (transformers `GptOssConfig`), presets and validation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Attention kind of one decoder layer (`layer_types` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerType {
    /// Causal attention limited to the last `sliding_window` keys (including the query's own).
    #[serde(rename = "sliding_attention")]
    Sliding,
    /// Full causal attention.
    #[serde(rename = "full_attention")]
    Full,
}

/// RoPE parameters (`rope_scaling` in the released config, `rope_parameters` in transformers 5.x).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"yarn"` (gpt-oss) or `"default"` (plain RoPE).
    pub rope_type: String,
    /// YaRN context extension factor (32 for gpt-oss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// YaRN beta_fast (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    /// YaRN beta_slow (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    /// Pre-training context length (4096 for gpt-oss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Floor/ceil the YaRN correction range; transformers' default when absent is `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
    /// Explicit cos/sin scale; inferred from `factor` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// DeepSeek-style mscale (used only together with `mscale_all_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    /// DeepSeek-style mscale_all_dim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    /// RoPE base inside `rope_parameters` (transformers 5.x); the top-level `rope_theta` wins when both exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
}

impl RopeScaling {
    /// The gpt-oss YaRN parameters (factor 32, beta 32/1, original context 4096, truncate false).
    pub fn gpt_oss_yarn() -> Self {
        Self {
            rope_type: "yarn".into(),
            factor: Some(32.0),
            beta_fast: Some(32.0),
            beta_slow: Some(1.0),
            original_max_position_embeddings: Some(4096),
            truncate: Some(false),
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            rope_theta: None,
        }
    }
}

/// `quantization_config` of a checkpoint (only `quant_method = "mxfp4"` is known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// `"mxfp4"`.
    pub quant_method: String,
    /// Module patterns kept in bf16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_not_convert: Option<Vec<String>>,
    /// Any other key, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One or several token ids (`eos_token_id` may be either in HF configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(i) => vec![*i],
            Self::Many(v) => v.clone(),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_theta() -> f64 {
    150000.0
}
fn d_eps() -> f64 {
    1e-5
}
fn d_alpha() -> f64 {
    1.702
}
fn d_limit() -> f64 {
    7.0
}
fn d_aux() -> f64 {
    0.001
}
fn d_init() -> f64 {
    0.02
}
fn d_silu() -> String {
    "silu".into()
}

/// A gpt-oss model configuration: every key of the HF `config.json` (reference §1).
///
/// Defaults for absent keys follow transformers 5.24 `GptOssConfig`. Keys this struct does not name are kept in
/// `extra` and written back by [`Config::to_json`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `["GptOssForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `"gpt_oss"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Residual width H (2880).
    pub hidden_size: usize,
    /// Decoder layers (24 for 20b, 36 for 120b).
    pub num_hidden_layers: usize,
    /// Query heads (64).
    pub num_attention_heads: usize,
    /// Key/value heads (8).
    pub num_key_value_heads: usize,
    /// Per-head width (64); defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Per-expert intermediate width I (2880).
    pub intermediate_size: usize,
    /// Experts per layer E (32 / 128).
    pub num_local_experts: usize,
    /// Experts per token k (4).
    #[serde(default = "d_k")]
    pub num_experts_per_tok: usize,
    /// Legacy (OpenAI reference) name of `num_experts_per_tok`; informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts_per_token: Option<usize>,
    /// Vocabulary size V (201088).
    pub vocab_size: usize,
    /// Longest supported context (131072).
    #[serde(default = "d_maxpos")]
    pub max_position_embeddings: usize,
    /// Legacy key of the OpenAI reference code (4096); informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_context_length: Option<usize>,
    /// RoPE base (150000).
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    /// YaRN parameters (`rope_scaling`); `None` means transformers' gpt-oss default (YaRN, factor 32, truncate false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5.x name of `rope_scaling` (used when `rope_scaling` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeScaling>,
    /// Sliding window length (128, also the default when absent) of the `sliding_attention` layers.
    #[serde(default = "d_window")]
    pub sliding_window: Option<usize>,
    /// Attention kind per layer; defaults to sliding on even layers, full on odd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<LayerType>>,
    /// RMSNorm epsilon (1e-5).
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// Expert activation clamp (7.0).
    #[serde(default = "d_limit")]
    pub swiglu_limit: f64,
    /// Expert sigmoid slope (1.702; not in the released json).
    #[serde(default = "d_alpha")]
    pub swiglu_alpha: f64,
    /// q/k/v/o biases (true).
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    /// Attention dropout (0.0; training dropout is not implemented, must be 0).
    #[serde(default)]
    pub attention_dropout: f64,
    /// `"silu"`: informational (the experts use their own clamped SwiGLU).
    #[serde(default = "d_silu")]
    pub hidden_act: String,
    /// Std of the normal random init (0.02).
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// Share `lm_head.weight` with `model.embed_tokens.weight` (false for gpt-oss).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Weight of the router aux loss (0.9 in the released checkpoints; class default 0.001).
    #[serde(default = "d_aux")]
    pub router_aux_loss_coef: f64,
    /// Whether transformers adds the aux loss by default (false).
    #[serde(default)]
    pub output_router_logits: bool,
    /// End-of-sequence token id(s) (200002).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding token id (199999).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id (absent in 20b's config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// Generation default (true).
    #[serde(default = "d_true")]
    pub use_cache: bool,
    /// Writer's transformers version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    /// Checkpoint weight format: `{"quant_method": "mxfp4", ...}` when experts are MXFP4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
    /// Stored dtype (absent in the released config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// transformers 5.x name of `torch_dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Keys not named above, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn d_window() -> Option<usize> {
    Some(128)
}
fn d_k() -> usize {
    4
}
fn d_maxpos() -> usize {
    131072
}

impl Config {
    /// The openai/gpt-oss-20b configuration (24 layers, 32 experts), as in its `config.json`.
    pub fn gpt_oss_20b() -> Self {
        Self::gpt_oss(24, 32)
    }

    /// The openai/gpt-oss-120b configuration (36 layers, 128 experts).
    pub fn gpt_oss_120b() -> Self {
        Self::gpt_oss(36, 128)
    }

    fn gpt_oss(layers: usize, experts: usize) -> Self {
        Self {
            architectures: Some(vec!["GptOssForCausalLM".into()]),
            model_type: Some("gpt_oss".into()),
            hidden_size: 2880,
            num_hidden_layers: layers,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            head_dim: Some(64),
            intermediate_size: 2880,
            num_local_experts: experts,
            num_experts_per_tok: 4,
            experts_per_token: Some(4),
            vocab_size: 201088,
            max_position_embeddings: 131072,
            initial_context_length: Some(4096),
            rope_theta: 150000.0,
            rope_scaling: Some(RopeScaling::gpt_oss_yarn()),
            rope_parameters: None,
            sliding_window: Some(128),
            layer_types: Some(Self::alternating(layers)),
            rms_norm_eps: 1e-5,
            swiglu_limit: 7.0,
            swiglu_alpha: 1.702,
            attention_bias: true,
            attention_dropout: 0.0,
            hidden_act: "silu".into(),
            initializer_range: 0.02,
            tie_word_embeddings: false,
            router_aux_loss_coef: 0.9,
            output_router_logits: false,
            eos_token_id: Some(TokenIds::One(200002)),
            pad_token_id: Some(199999),
            bos_token_id: None,
            use_cache: true,
            transformers_version: Some("4.55.0.dev0".into()),
            quantization_config: Some(QuantizationConfig {
                quant_method: "mxfp4".into(),
                modules_to_not_convert: Some(vec![
                    "model.layers.*.self_attn".into(),
                    "model.layers.*.mlp.router".into(),
                    "model.embed_tokens".into(),
                    "lm_head".into(),
                ]),
                extra: Default::default(),
            }),
            torch_dtype: None,
            dtype: None,
            extra: Default::default(),
        }
    }

    /// A tiny config for tests and benches: V=512, H=64, 2 layers (sliding, full; window 8), 4 q-heads over 2
    /// kv-heads of width 16, 4 experts top-2 with I=64, gpt-oss YaRN, no quantization.
    pub fn tiny() -> Self {
        let mut c = Self::gpt_oss(2, 4);
        c.hidden_size = 64;
        c.num_attention_heads = 4;
        c.num_key_value_heads = 2;
        c.head_dim = Some(16);
        c.intermediate_size = 64;
        c.num_experts_per_tok = 2;
        c.experts_per_token = None;
        c.vocab_size = 512;
        c.sliding_window = Some(8);
        c.eos_token_id = None;
        c.pad_token_id = Some(0);
        c.quantization_config = None;
        c.transformers_version = None;
        c
    }

    /// The gpt-oss architecture at tiny dims with the real o200k_harmony vocabulary (201,088, so
    /// the real tokenizer and chat format apply): hidden 128, 4 layers alternating sliding (window
    /// 128) and full attention, 4 query heads over 2 kv heads of width 32, 8 experts top-2 with
    /// intermediate 128, pad `<|endoftext|>` and eos `<|return|>` as the released checkpoints. The
    /// model of the CPU demo and of `make_checkpoint --arch tiny`.
    pub fn gpt_oss_tiny() -> Self {
        let mut c = Self::small();
        c.hidden_size = 128;
        c.num_attention_heads = 4;
        c.num_key_value_heads = 2;
        c.head_dim = Some(32);
        c.intermediate_size = 128;
        c.vocab_size = 201_088;
        c.sliding_window = Some(128);
        c.pad_token_id = Some(199_999);
        c.eos_token_id = Some(TokenIds::One(200_002));
        c
    }

    /// A small config for CPU benchmarks: V=1024, H=256, 4 layers, 8 q-heads over 2 kv-heads of width 32,
    /// 8 experts top-2 with I=256, window 32.
    pub fn small() -> Self {
        let mut c = Self::gpt_oss(4, 8);
        c.hidden_size = 256;
        c.num_attention_heads = 8;
        c.num_key_value_heads = 2;
        c.head_dim = Some(32);
        c.intermediate_size = 256;
        c.num_experts_per_tok = 2;
        c.experts_per_token = None;
        c.vocab_size = 1024;
        c.sliding_window = Some(32);
        c.eos_token_id = None;
        c.pad_token_id = Some(0);
        c.quantization_config = None;
        c.transformers_version = None;
        c
    }

    /// gpt-oss's layer pattern for `layers` layers: sliding-window attention on even layers, full
    /// attention on odd ones.
    pub fn alternating(layers: usize) -> Vec<LayerType> {
        (0..layers)
            .map(|i| {
                if i % 2 == 0 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect()
    }

    /// Parse a `config.json` text and validate it.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(s).map_err(|source| ModelError::Json {
            path: "<config.json text>".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and validate `config.json` (a file path).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as pretty JSON (HF key names).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| ModelError::config("<config>", format!("cannot serialize: {e}")))
    }

    /// Per-head width (`head_dim`, or `hidden_size / num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The attention kind of every layer (explicit `layer_types` or the alternating default).
    pub fn layer_types(&self) -> Vec<LayerType> {
        self.layer_types
            .clone()
            .unwrap_or_else(|| Self::alternating(self.num_hidden_layers))
    }

    /// The sliding window of layer `i`, `None` for full attention layers.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        match self.layer_types().get(i) {
            Some(LayerType::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// Effective RoPE parameters (`rope_scaling`, else `rope_parameters`, else the gpt-oss YaRN default).
    pub fn rope(&self) -> RopeScaling {
        self.rope_scaling
            .clone()
            .or_else(|| self.rope_parameters.clone())
            .unwrap_or_else(RopeScaling::gpt_oss_yarn)
    }

    /// Effective RoPE base.
    pub fn rope_base(&self) -> f64 {
        if self.rope_scaling.is_none() {
            if let Some(t) = self.rope_parameters.as_ref().and_then(|r| r.rope_theta) {
                return t;
            }
        }
        self.rope_theta
    }

    /// Whether the config declares MXFP4 experts.
    pub fn is_mxfp4(&self) -> bool {
        self.quantization_config
            .as_ref()
            .is_some_and(|q| q.quant_method == "mxfp4")
    }

    /// Check every field the model relies on; the error names the field and what was expected.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim()),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(ModelError::config(field, "must be > 0"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(ModelError::config(
                "num_key_value_heads",
                format!(
                    "must divide num_attention_heads ({}), got {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(ModelError::config(
                "head_dim",
                format!("must be even for RoPE, got {}", self.head_dim()),
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(ModelError::config(
                "num_experts_per_tok",
                format!(
                    "must be <= num_local_experts ({}), got {}",
                    self.num_local_experts, self.num_experts_per_tok
                ),
            ));
        }
        if let Some(lt) = &self.layer_types {
            if lt.len() != self.num_hidden_layers {
                return Err(ModelError::config(
                    "layer_types",
                    format!(
                        "has {} entries, expected num_hidden_layers = {}",
                        lt.len(),
                        self.num_hidden_layers
                    ),
                ));
            }
        }
        if self.layer_types().contains(&LayerType::Sliding) && self.sliding_window.unwrap_or(0) == 0
        {
            return Err(ModelError::config(
                "sliding_window",
                "must be > 0 when a layer is sliding_attention",
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(ModelError::config(
                "rms_norm_eps",
                format!("must be > 0, got {}", self.rms_norm_eps),
            ));
        }
        if self.swiglu_limit.is_nan() || self.swiglu_limit <= 0.0 {
            return Err(ModelError::config(
                "swiglu_limit",
                format!("must be > 0, got {}", self.swiglu_limit),
            ));
        }
        if self.rope_base().is_nan() || self.rope_base() <= 1.0 {
            return Err(ModelError::config(
                "rope_theta",
                format!("must be > 1, got {}", self.rope_base()),
            ));
        }
        let rope = self.rope();
        match rope.rope_type.as_str() {
            "yarn" => {
                if !rope.factor.is_some_and(|f| f > 0.0) {
                    return Err(ModelError::config(
                        "rope_scaling.factor",
                        "yarn needs a factor > 0",
                    ));
                }
                if rope.original_max_position_embeddings.unwrap_or(0) == 0 {
                    return Err(ModelError::config(
                        "rope_scaling.original_max_position_embeddings",
                        "yarn needs a value > 0",
                    ));
                }
            }
            "default" => {}
            other => {
                return Err(ModelError::config(
                    "rope_scaling.rope_type",
                    format!("expected \"yarn\" or \"default\", got {other:?}"),
                ))
            }
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "mxfp4" {
                return Err(ModelError::config(
                    "quantization_config.quant_method",
                    format!("only \"mxfp4\" is supported, got {:?}", q.quant_method),
                ));
            }
            if self.hidden_size % 32 != 0 || self.intermediate_size % 32 != 0 {
                return Err(ModelError::config(
                    "quantization_config",
                    "mxfp4 experts need hidden_size and intermediate_size divisible by 32",
                ));
            }
        }
        if let Some(mt) = &self.model_type {
            if mt != "gpt_oss" {
                return Err(ModelError::config(
                    "model_type",
                    format!("expected \"gpt_oss\", got {mt:?}"),
                ));
            }
        }
        if self.attention_dropout != 0.0 {
            return Err(ModelError::config(
                "attention_dropout",
                "only 0.0 is supported",
            ));
        }
        Ok(())
    }
}
