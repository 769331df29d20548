//! What the training loop needs from the LoRA adapters installed on the model, and restoring their
//! weights from a checkpoint's `adapter_model.safetensors`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Var};

use crate::error::{Result, SftError};

/// The PEFT adapter file name.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Trainable adapter parameters and their PEFT files.
pub trait TrainableAdapters {
    /// The trainable parameters (f32 [`Var`]s), keyed exactly as in `adapter_model.safetensors`
    /// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...), in a fixed order.
    fn named_parameters(&self) -> Vec<(String, Var)>;
    /// Writes the PEFT adapter files (`adapter_config.json`, `adapter_model.safetensors`,
    /// `README.md`) into `dir` (which exists).
    fn save_adapter(&self, dir: &Path) -> Result<()>;
    /// The safetensors files of a directory written by [`Self::save_adapter`] that hold the
    /// parameters (default: `dir/adapter_model.safetensors`), read on resume.
    fn weight_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        Ok(vec![dir.join(ADAPTER_WEIGHTS_FILE)])
    }
    /// Whether the parameters are the model's own (full-parameter training) rather than added to
    /// it (LoRA); decides whether they count on top of the model's parameters in `total_flos`.
    fn are_model_parameters(&self) -> bool {
        false
    }
}

/// Sets every parameter of `adapters` from the files of [`TrainableAdapters::weight_files`]
/// (`dir/adapter_model.safetensors` for LoRA, the model's safetensors for full-parameter training).
/// A missing key or a shape mismatch is an error naming the key, file and both shapes.
pub fn load_adapter_weights(adapters: &dyn TrainableAdapters, dir: &Path) -> Result<()> {
    let files = adapters.weight_files(dir)?;
    let mut tensors = std::collections::HashMap::new();
    for f in &files {
        let t = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| SftError::format(f, e.to_string()))?;
        tensors.extend(t);
    }
    let path = match files.as_slice() {
        [one] => one.clone(),
        _ => dir.to_path_buf(),
    };
    for (name, var) in adapters.named_parameters() {
        let t = tensors.get(&name).ok_or_else(|| SftError::Checkpoint {
            path: path.clone(),
            message: format!("missing adapter tensor `{name}`"),
        })?;
        if t.dims() != var.dims() {
            return Err(SftError::Checkpoint {
                path: path.clone(),
                message: format!(
                    "adapter tensor `{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

impl TrainableAdapters for gptoss_lora::LoraModel {
    fn named_parameters(&self) -> Vec<(String, Var)> {
        self.trainable_vars()
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        self.save_pretrained(dir)
            .map_err(|e| SftError::Trainer(format!("saving the adapter to {}: {e}", dir.display())))
    }
}
