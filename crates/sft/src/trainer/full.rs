//! Full-parameter fine-tuning (TRL's default without a `peft_config`; `peft: none` in YAML,
//! `--peft none`): the model's parameters become the trainable set instead of LoRA adapters.
//!
//! [`FullParameters::install`] replaces the model by a copy whose parameters are `Var`s (every
//! one, or those whose HF name contains one of the given patterns), so the trainer's AdamW
//! updates them in place. Its [`TrainableAdapters`] side keys them by their HF names, writes a
//! full Hugging Face model (`config.json` + `model.safetensors`, through
//! [`gptoss_model::save`]) where LoRA writes an adapter, and reads that model back on resume.

use std::path::{Path, PathBuf};

use candle_core::Var;
use gptoss_model::{GptOssForCausalLM, SaveOptions};

use super::adapters::TrainableAdapters;
use crate::error::{Result, SftError};

/// The trainable parameters of a full-parameter run, sharing their storage with the model.
pub struct FullParameters {
    params: Vec<(String, Var)>,
    total: usize,
    model: GptOssForCausalLM,
}

impl FullParameters {
    /// Makes `model`'s parameters trainable: `*model` becomes a copy computing with `Var`s (same
    /// values, dtype and device) for every parameter whose HF name contains one of `patterns`
    /// (`None`: all of them). Installed adapters are dropped. Train in f32 (load the model in f32):
    /// the parameters keep the model's dtype, and so do AdamW's moments.
    ///
    /// # Errors
    /// [`SftError::Config`] (`peft`) when nothing matches `patterns`; [`SftError::Trainer`] for a
    /// model whose experts are MXFP4-resident (load them dequantized).
    pub fn install(model: &mut GptOssForCausalLM, patterns: Option<&[String]>) -> Result<Self> {
        let mut params = Vec::new();
        let mut total = 0usize;
        let selected = |name: &str| patterns.is_none_or(|p| p.iter().any(|s| name.contains(s)));
        let mapped = gptoss_model::map_parameters(model, |name, t| {
            total += t.elem_count();
            if !selected(name) {
                return Ok(t.clone());
            }
            let v = Var::from_tensor(t)?;
            params.push((name.to_string(), v.clone()));
            Ok(v.as_tensor().clone())
        })
        .map_err(|e| SftError::Trainer(format!("full-parameter training: {e}")))?;
        if params.is_empty() {
            return Err(SftError::config(
                "peft",
                format!(
                    "no model parameter matches the full-parameter targets {:?}",
                    patterns.unwrap_or_default()
                ),
            ));
        }
        *model = mapped.clone();
        Ok(Self {
            params,
            total,
            model: mapped,
        })
    }

    /// Trainable element count.
    pub fn trainable_count(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// PEFT's `print_trainable_parameters` line for this run
    /// (`trainable params: N || all params: M || trainable%: P`).
    pub fn trainable_parameters_line(&self) -> String {
        let n = self.trainable_count();
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(n),
            thousands(self.total),
            100.0 * n as f64 / self.total.max(1) as f64
        )
    }

    /// The model computing with the trainable parameters (the one [`Self::install`] left in place).
    pub fn model(&self) -> &GptOssForCausalLM {
        &self.model
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl TrainableAdapters for FullParameters {
    fn named_parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    /// The whole model in the HF layout: `config.json` and `model.safetensors` in its dtype.
    fn save_adapter(&self, dir: &Path) -> Result<()> {
        gptoss_model::save(&self.model, dir, &SaveOptions::default())
            .map_err(|e| SftError::Trainer(format!("saving the model to {}: {e}", dir.display())))
    }

    fn are_model_parameters(&self) -> bool {
        true
    }

    fn weight_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        gptoss_model::checkpoint_files(dir).map_err(|e| SftError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("no full-parameter model weights: {e}"),
        })
    }
}
