//! [`AdapterMerge`]: a PEFT adapter directory read against a base model's config alone, merged
//! into the base weights as they stream from the checkpoint into an export
//! ([`gptoss_model::export::export_checkpoint`]), so a merged export never loads the model.
//!
//! ```no_run
//! use std::path::Path;
//! use gptoss_lora::AdapterMerge;
//! use gptoss_model::export::{export_checkpoint, ExportFormat, ExportOptions};
//! use gptoss_model::Checkpoint;
//!
//! let base = Path::new("gpt-oss-20b");
//! let merge = AdapterMerge::from_pretrained(Path::new("adapter"), Checkpoint::open(base)?.config())?;
//! let opts = ExportOptions::new(ExportFormat::Mxfp4);
//! let report = export_checkpoint(base, Some(&merge), Path::new("gpt-oss-20b-merged"), &opts)?;
//! println!("{}", report.summary());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use gptoss_model::{Config, ModelError, WeightDelta};

use crate::adapter_file::{read_adapter_tensors, ADAPTER_WEIGHTS_NAME};
use crate::config::LoraConfig;
use crate::error::Result;
use crate::expert::LoraExperts;
use crate::linear::LoraLinear;
use crate::lora_model::adapters;
use crate::target::{resolve_targets, TargetPlan};

/// A PEFT adapter (config + factors, f32 on the host) as a [`WeightDelta`]: each targeted
/// weight becomes `W + ΔW` exactly as [`crate::LoraModel::merge`] computes it (linears in f32,
/// experts one at a time).
#[derive(Debug)]
pub struct AdapterMerge {
    config: LoraConfig,
    plan: TargetPlan,
    /// By weight name (`model.layers.0.self_attn.q_proj.weight`).
    linears: HashMap<String, Arc<LoraLinear>>,
    /// By parameter name (`model.layers.7.mlp.experts.gate_up_proj`).
    experts: HashMap<String, Arc<LoraExperts>>,
}

impl AdapterMerge {
    /// Reads the adapter directory `dir` (`adapter_config.json` + `adapter_model.safetensors`)
    /// for a base model of config `base`, with the checks of [`crate::LoraModel::from_pretrained`]:
    /// the config, target matching, every key and shape.
    ///
    /// # Errors
    /// [`crate::LoraError`] naming the file, the target or the adapter tensor and its expected
    /// shape (an adapter for another base).
    pub fn from_pretrained(dir: &Path, base: &Config) -> Result<Self> {
        let config = LoraConfig::from_file(dir)?;
        let plan = resolve_targets(&config, base)?;
        let factors = read_adapter_tensors(&dir.join(ADAPTER_WEIGHTS_NAME), &plan, &Device::Cpu)?;
        let (linears, experts) =
            adapters(&config, &plan, factors, &Arc::new(AtomicBool::new(false)))?;
        Ok(Self {
            linears: linears
                .into_iter()
                .map(|(t, a)| (format!("{}.weight", t.shape.name), a))
                .collect(),
            experts: experts
                .into_iter()
                .map(|(t, a)| (t.shape.param_name(), a))
                .collect(),
            config,
            plan,
        })
    }

    /// The adapter's config.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// PEFT's `print_trainable_parameters` line of the adapter on this base.
    pub fn trainable_parameters_line(&self) -> String {
        self.plan.trainable_parameters_line()
    }
}

impl WeightDelta for AdapterMerge {
    fn targets(&self) -> Vec<String> {
        self.linears
            .keys()
            .chain(self.experts.keys())
            .cloned()
            .collect()
    }

    fn apply(
        &self,
        name: &str,
        expert: Option<usize>,
        base: &Tensor,
    ) -> gptoss_model::Result<Tensor> {
        let merged = match (expert, self.linears.get(name), self.experts.get(name)) {
            (None, Some(a), _) => a.merged(base, 1.0)?,
            (Some(e), _, Some(a)) => a.merged_expert(base, e, 1.0)?,
            _ => {
                return Err(ModelError::InvalidArgument {
                    arg: name.to_string(),
                    reason: "the adapter does not target this weight (as a linear or an expert \
                             weight)"
                        .into(),
                })
            }
        };
        Ok(merged)
    }
}
