//! PEFT 0.21.2-compatible LoRA for gpt-oss on candle.
//!
//! - [`LoraConfig`]: PEFT's config, read/written as `adapter_config.json`.
//! - [`resolve_targets`]: PEFT's target matching (`target_modules`, `"all-linear"`, `target_parameters` on the
//!   3-D expert weights) from shapes alone, with a per-module report and PEFT's trainable-parameter line.

pub mod adapter_file;
pub mod config;
pub mod error;
pub mod expert;
pub mod init;
pub mod linear;
pub mod lora_model;
pub mod shapes;
pub mod target;

pub use adapter_file::{
    check_adapter_tensors, read_adapter_tensors, write_adapter_tensors, ADAPTER_WEIGHTS_NAME,
};
pub use config::{
    InitLoraWeights, LayerIndices, LoraConfig, TargetModules, ADAPTER_CONFIG_NAME, ALL_LINEAR,
    PEFT_VERSION,
};
pub use error::{LoraError, Result};
pub use expert::LoraExperts;
pub use linear::LoraLinear;
pub use lora_model::{save_merged_model, LoraModel};
pub use shapes::{ExpertShape, LinearShape, ModelShapes, ModuleKind};
pub use target::{
    resolve_targets, thousands, ExpertTarget, Factor, LinearTarget, TargetPlan, PEFT_KEY_PREFIX,
};
