//! PEFT 0.21.2-compatible LoRA for gpt-oss on candle.
//!
//! - [`LoraConfig`]: PEFT's config, read/written as `adapter_config.json` (byte-identical to PEFT's writer).
//! - [`resolve_targets`]: PEFT's target matching (`target_modules` list / regex / `"all-linear"`,
//!   `exclude_modules`, `layers_to_transform`, `rank_pattern` / `alpha_pattern`, `target_parameters` on the 3-D
//!   expert weights) from shapes alone, with a per-module report and PEFT's `print_trainable_parameters` line.
//!   Unlike PEFT, an entry that matches nothing is an error.
//! - [`LoraLinear`] (`y = base + scaling·B(A(x))`) and [`LoraExperts`] (PEFT `ParamWrapper` layout, applied per
//!   routed token without materializing ΔW): f32 [`candle_core::Var`] factors on an f32 or bf16 base, installed
//!   through the model crate's hooks.
//! - [`LoraModel`]: build fresh adapters onto a [`gptoss_model::GptOssForCausalLM`], list trainable vars under
//!   PEFT's keys, save/load PEFT adapter directories (validated before anything is applied), merge / unmerge /
//!   merge_and_unload, and [`save_merged_model`].
//! - [`AdapterMerge`]: an adapter directory merged into a checkpoint as it streams into an export,
//!   without loading the model (`gptoss_model::export::export_checkpoint`).
//!
//! ```
//! use gptoss_lora::{resolve_targets, LoraConfig};
//! let plan = resolve_targets(&LoraConfig::cookbook(), &gptoss_model::Config::gpt_oss_20b())?;
//! assert_eq!(
//!     plan.trainable_parameters_line(),
//!     "trainable params: 15,040,512 || all params: 20,929,797,696 || trainable%: 0.0719"
//! );
//! # Ok::<(), gptoss_lora::LoraError>(())
//! ```

pub mod adapter_file;
pub mod config;
pub mod error;
pub mod expert;
pub mod init;
pub mod linear;
pub mod lora_model;
pub mod merge;
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
pub use lora_model::{save_merged_model, write_random_adapter, LoraModel};
pub use merge::AdapterMerge;
pub use shapes::{ExpertShape, LinearShape, ModelShapes, ModuleKind};
pub use target::{
    peft_parameter_name, resolve_targets, thousands, ExpertTarget, Factor, LinearTarget,
    TargetPlan, PEFT_KEY_PREFIX,
};
