//! `LoraConfig`: PEFT 0.21.2's `LoraConfig`, read and written as `adapter_config.json`.
//!
//! Every field PEFT 0.21.2 writes is here, with PEFT's default, in PEFT's (alphabetical) order, so a config
//! written by [`LoraConfig::to_json_string`] is byte-identical to PEFT's `save_pretrained` output for the same
//! values. Fields this crate does not implement (DoRA, LoftQ, EVA, ...) are kept as raw JSON so they round-trip;
//! [`LoraConfig::validate`] rejects them when they are switched on.
//!
//! ```
//! use gptoss_lora::{LoraConfig, TargetModules};
//! let cfg = LoraConfig {
//!     r: 8,
//!     lora_alpha: 16.0,
//!     target_modules: Some(TargetModules::all_linear()),
//!     target_parameters: Some(vec!["7.mlp.experts.gate_up_proj".into(), "7.mlp.experts.down_proj".into()]),
//!     ..LoraConfig::default()
//! };
//! assert_eq!(cfg.scaling_for(8, 16.0), 2.0);
//! let back = LoraConfig::from_json_str(&cfg.to_json_string().unwrap()).unwrap();
//! assert_eq!(back, cfg);
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LoraError, Result};

/// The PEFT version whose file format this crate writes.
pub const PEFT_VERSION: &str = "0.21.2";
/// The file name of the adapter config inside an adapter directory.
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
/// PEFT's shorthand for "every linear layer except the output head".
pub const ALL_LINEAR: &str = "all-linear";

/// A PEFT field that is either one string (a regex, or `"all-linear"`) or a list of names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// One string: `"all-linear"` (case-insensitive) or a regex that must match a full module name.
    Pattern(String),
    /// A list of module names; each matches a module whose name equals it or ends with `"." + it`.
    List(Vec<String>),
}

impl TargetModules {
    /// The `"all-linear"` shorthand.
    pub fn all_linear() -> Self {
        TargetModules::Pattern(ALL_LINEAR.to_string())
    }

    /// A list of module-name suffixes (`["q_proj", "v_proj"]`).
    pub fn list<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        TargetModules::List(names.into_iter().map(Into::into).collect())
    }

    /// True for the `"all-linear"` shorthand (PEFT compares case-insensitively).
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Pattern(p) if p.eq_ignore_ascii_case(ALL_LINEAR))
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// One layer index.
    One(usize),
    /// Several layer indices.
    List(Vec<usize>),
}

impl LayerIndices {
    /// Whether `layer` is selected.
    pub fn contains(&self, layer: usize) -> bool {
        match self {
            LayerIndices::One(i) => *i == layer,
            LayerIndices::List(v) => v.contains(&layer),
        }
    }
}

/// `init_lora_weights`: `true` (A kaiming-uniform, B = 0), `false` (both like `nn.Linear`'s default init,
/// so the adapter is not a no-op), or a method name (`"gaussian"` is the only one implemented here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` / `false`.
    Bool(bool),
    /// A named method (`"gaussian"`, `"pissa"`, `"olora"`, ...).
    Method(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

/// `lora_alpha`: written as a JSON integer when it is integral (as PEFT writes an `int`), else as a float.
mod alpha_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            s.serialize_i64(*v as i64)
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        f64::deserialize(d)
    }
}

fn default_bias() -> String {
    "none".to_string()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_megatron_core() -> Option<String> {
    Some("megatron.core".to_string())
}
fn default_peft_type() -> String {
    "LORA".to_string()
}
fn default_peft_version() -> String {
    PEFT_VERSION.to_string()
}
fn default_qalora_group_size() -> u64 {
    16
}
fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// PEFT 0.21.2 `LoraConfig`, field for field (alphabetical, as `adapter_config.json` lists them).
/// Defaults are PEFT's: r = 8, lora_alpha = 8, lora_dropout = 0, bias "none", init_lora_weights = true,
/// no targets. Fields typed [`Value`] are features this crate keeps but does not implement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// aLoRA invocation tokens (unsupported; must be null).
    #[serde(default)]
    pub alora_invocation_tokens: Option<Value>,
    /// Per-module lora_alpha overrides: regex key matched against the end of the module (or parameter) name.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Arrow routing config (unsupported; must be null).
    #[serde(default)]
    pub arrow_config: Option<Value>,
    /// `{"base_model_class": ..., "parent_library": ...}` written by PEFT for non-task models; kept as is.
    #[serde(default)]
    pub auto_mapping: Option<Value>,
    /// Where the base model came from; informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Bias training: only "none" is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// CorDA config (unsupported; must be null).
    #[serde(default)]
    pub corda_config: Option<Value>,
    /// Weight-tying handling; no effect on gpt-oss (embeddings are untied).
    #[serde(default)]
    pub ensure_weight_tying: bool,
    /// EVA config (unsupported; must be null).
    #[serde(default)]
    pub eva_config: Option<Value>,
    /// Modules never adapted: a regex (full match) or a list of name suffixes.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Conv1D-style transposed weights; ignored for `nn.Linear` (as PEFT does), an error with expert targets.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// True in saved adapters; informational here.
    #[serde(default)]
    pub inference_mode: bool,
    /// Adapter initialisation.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// KaSA config (unsupported; must be null).
    #[serde(default)]
    pub kasa_config: Option<Value>,
    /// Layer replication (unsupported; must be null).
    #[serde(default)]
    pub layer_replication: Option<Value>,
    /// Name(s) of the layer list used with `layers_to_transform` (e.g. "layers").
    #[serde(default)]
    pub layers_pattern: Option<TargetModules>,
    /// Restrict `target_modules` list matches to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// LoftQ config (unsupported; must be empty).
    #[serde(default = "empty_object")]
    pub loftq_config: Value,
    /// LoRA alpha; scaling = lora_alpha / r (or / √r with rslora).
    #[serde(default = "default_alpha", with = "alpha_serde")]
    pub lora_alpha: f64,
    /// Bias on lora_B (unsupported; must be false).
    #[serde(default)]
    pub lora_bias: bool,
    /// Dropout on the LoRA input of linear adapters (expert adapters require 0, as in PEFT).
    #[serde(default)]
    pub lora_dropout: f64,
    /// LoRA-GA config (unsupported; must be null).
    #[serde(default)]
    pub lora_ga_config: Option<Value>,
    /// Megatron config (unsupported; must be null).
    #[serde(default)]
    pub megatron_config: Option<Value>,
    /// Megatron core module name; informational.
    #[serde(default = "default_megatron_core")]
    pub megatron_core: Option<String>,
    /// Fully trained extra modules (unsupported; must be null or empty).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// MonteCLoRA config (unsupported; must be null).
    #[serde(default)]
    pub monteclora_config: Option<Value>,
    /// Always "LORA".
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// The PEFT version that wrote the file.
    #[serde(default = "default_peft_version")]
    pub peft_version: String,
    /// QALoRA group size; unused unless use_qalora.
    #[serde(default = "default_qalora_group_size")]
    pub qalora_group_size: u64,
    /// LoRA rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Per-module rank overrides: regex key matched against the end of the module (or parameter) name.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Base model revision; informational.
    #[serde(default)]
    pub revision: Option<String>,
    /// Linear modules to adapt.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Parameters to adapt directly (3-D expert weights), e.g. "7.mlp.experts.gate_up_proj".
    #[serde(default)]
    pub target_parameters: Option<Vec<String>>,
    /// e.g. "CAUSAL_LM"; informational here.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Trainable token indices (unsupported; must be null).
    #[serde(default)]
    pub trainable_token_indices: Option<Value>,
    /// BD-LoRA (unsupported; must be null or false).
    #[serde(default)]
    pub use_bdlora: Option<Value>,
    /// DoRA (unsupported; must be false).
    #[serde(default)]
    pub use_dora: bool,
    /// QALoRA (unsupported; must be false).
    #[serde(default)]
    pub use_qalora: bool,
    /// Rank-stabilised LoRA: scaling = lora_alpha / √r.
    #[serde(default)]
    pub use_rslora: bool,
    /// VeLoRA config (unsupported; must be null).
    #[serde(default)]
    pub velora_config: Option<Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            alora_invocation_tokens: None,
            alpha_pattern: BTreeMap::new(),
            arrow_config: None,
            auto_mapping: None,
            base_model_name_or_path: None,
            bias: default_bias(),
            corda_config: None,
            ensure_weight_tying: false,
            eva_config: None,
            exclude_modules: None,
            fan_in_fan_out: false,
            inference_mode: false,
            init_lora_weights: InitLoraWeights::default(),
            kasa_config: None,
            layer_replication: None,
            layers_pattern: None,
            layers_to_transform: None,
            loftq_config: empty_object(),
            lora_alpha: default_alpha(),
            lora_bias: false,
            lora_dropout: 0.0,
            lora_ga_config: None,
            megatron_config: None,
            megatron_core: default_megatron_core(),
            modules_to_save: None,
            monteclora_config: None,
            peft_type: default_peft_type(),
            peft_version: default_peft_version(),
            qalora_group_size: default_qalora_group_size(),
            r: default_r(),
            rank_pattern: BTreeMap::new(),
            revision: None,
            target_modules: None,
            target_parameters: None,
            task_type: None,
            trainable_token_indices: None,
            use_bdlora: None,
            use_dora: false,
            use_qalora: false,
            use_rslora: false,
            velora_config: None,
        }
    }
}

impl LoraConfig {
    /// The gpt-oss cookbook config: r = 8, alpha = 16, all attention linears, and both expert weights of
    /// layers 7, 15 and 23 (15,040,512 trainable parameters on gpt-oss-20b).
    pub fn cookbook() -> Self {
        let target_parameters = [7, 15, 23]
            .iter()
            .flat_map(|l| {
                [
                    format!("{l}.mlp.experts.gate_up_proj"),
                    format!("{l}.mlp.experts.down_proj"),
                ]
            })
            .collect();
        LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: Some(TargetModules::all_linear()),
            target_parameters: Some(target_parameters),
            ..LoraConfig::default()
        }
    }

    /// Parses adapter_config.json text. Missing fields take PEFT's defaults; unknown fields are ignored
    /// (as PEFT ignores them with a warning). Does not [`validate`](Self::validate).
    pub fn from_json_str(s: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// Reads `path` (an adapter_config.json, or an adapter directory containing one) and validates it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(ADAPTER_CONFIG_NAME)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| LoraError::Io {
            path: file.clone(),
            source,
        })?;
        let cfg =
            Self::from_json_str(&text).map_err(|source| LoraError::Json { path: file, source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The JSON text PEFT writes: keys sorted, 2-space indent, no trailing newline.
    pub fn to_json_string(&self) -> std::result::Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// Writes `dir/adapter_config.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let file = dir.join(ADAPTER_CONFIG_NAME);
        let text = self.to_json_string().map_err(|source| LoraError::Json {
            path: file.clone(),
            source,
        })?;
        std::fs::write(&file, text).map_err(|source| LoraError::Io { path: file, source })
    }

    /// PEFT's scaling for rank `r` and alpha `alpha`: `alpha / r`, or `alpha / √r` with `use_rslora`.
    pub fn scaling_for(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Rejects values PEFT rejects and features this crate does not implement, naming the field.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |field: &'static str, reason: String| Err(LoraError::InvalidConfig { field, reason });
        let unsupported = |field: &str, reason: &str| {
            Err(LoraError::Unsupported {
                field: field.to_string(),
                reason: reason.to_string(),
            })
        };
        if self.peft_type != "LORA" {
            return invalid(
                "peft_type",
                format!("expected \"LORA\", found {:?}", self.peft_type),
            );
        }
        if self.r == 0 {
            return invalid("r", "must be a positive integer, found 0".into());
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, v)| **v == 0) {
            return invalid(
                "rank_pattern",
                format!("rank for {k:?} must be positive, found 0"),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return invalid(
                "lora_dropout",
                format!("must be in [0, 1), found {}", self.lora_dropout),
            );
        }
        if self.bias != "none" {
            return unsupported("bias", "only \"none\" is implemented");
        }
        if self.use_dora {
            return unsupported("use_dora", "DoRA is not implemented");
        }
        if self.use_qalora {
            return unsupported("use_qalora", "QALoRA is not implemented");
        }
        if self.lora_bias {
            return unsupported("lora_bias", "a bias on lora_B is not implemented");
        }
        if matches!(&self.modules_to_save, Some(v) if !v.is_empty()) {
            return unsupported(
                "modules_to_save",
                "fully trained extra modules are not implemented",
            );
        }
        if !matches!(&self.loftq_config, Value::Object(m) if m.is_empty()) {
            return unsupported("loftq_config", "LoftQ is not implemented (expected {})");
        }
        if matches!(&self.use_bdlora, Some(v) if !v.is_null() && *v != Value::Bool(false)) {
            return unsupported("use_bdlora", "BD-LoRA is not implemented");
        }
        let must_be_null = [
            ("alora_invocation_tokens", &self.alora_invocation_tokens),
            ("arrow_config", &self.arrow_config),
            ("corda_config", &self.corda_config),
            ("eva_config", &self.eva_config),
            ("kasa_config", &self.kasa_config),
            ("layer_replication", &self.layer_replication),
            ("lora_ga_config", &self.lora_ga_config),
            ("megatron_config", &self.megatron_config),
            ("monteclora_config", &self.monteclora_config),
            ("trainable_token_indices", &self.trainable_token_indices),
            ("velora_config", &self.velora_config),
        ];
        for (field, v) in must_be_null {
            if matches!(v, Some(v) if !v.is_null()) {
                return unsupported(
                    field,
                    "this PEFT feature is not implemented (expected null)",
                );
            }
        }
        match &self.init_lora_weights {
            InitLoraWeights::Bool(_) => {}
            InitLoraWeights::Method(m) if m.eq_ignore_ascii_case("gaussian") => {}
            InitLoraWeights::Method(m) => {
                return unsupported(
                    "init_lora_weights",
                    &format!("method {m:?} is not implemented (true, false or \"gaussian\")"),
                )
            }
        }
        if self.target_modules.is_none()
            && self.target_parameters.as_ref().is_none_or(|v| v.is_empty())
        {
            return invalid(
                "target_modules",
                "neither target_modules nor target_parameters is set (PEFT has no default targets for gpt_oss)"
                    .into(),
            );
        }
        // LoraConfig.__post_init__ checks
        if matches!(self.target_modules, Some(TargetModules::Pattern(_))) {
            if self.layers_to_transform.is_some() {
                return invalid(
                    "layers_to_transform",
                    "cannot be used when target_modules is a string (regex or \"all-linear\")"
                        .into(),
                );
            }
            if self.layers_pattern.is_some() {
                return invalid(
                    "layers_pattern",
                    "cannot be used when target_modules is a string (regex or \"all-linear\")"
                        .into(),
                );
            }
        }
        let has_pattern = match &self.layers_pattern {
            None => false,
            Some(TargetModules::Pattern(p)) => !p.is_empty(),
            Some(TargetModules::List(v)) => !v.is_empty(),
        };
        if has_pattern && self.layers_to_transform.is_none() {
            return invalid(
                "layers_pattern",
                "when layers_pattern is specified, layers_to_transform must also be specified"
                    .into(),
            );
        }
        if matches!(&self.target_parameters, Some(v) if !v.is_empty()) {
            if self.lora_dropout != 0.0 {
                return invalid(
                    "lora_dropout",
                    format!(
                        "must be 0 with target_parameters (PEFT ParamWrapper cannot apply dropout), found {}",
                        self.lora_dropout
                    ),
                );
            }
            if self.fan_in_fan_out {
                return invalid(
                    "fan_in_fan_out",
                    "must be false with target_parameters".into(),
                );
            }
        }
        Ok(())
    }
}
