//! The reference model of DPO with LoRA: the same network with the adapters switched off
//! (PEFT's `disable_adapter()`, what TRL uses when no `ref_model` is given), so no second copy of
//! the base weights exists.
//!
//! The adapters are switched off by zeroing every `lora_B` factor for the duration of a closure
//! and restoring it afterwards (even when the closure fails): with `B = 0` each LoRA term
//! `scaling·B(A x)` is exactly zero, so the forward is the base model's, bit for bit. The saved
//! factors are a copy of the B matrices (a small fraction of the trainable parameters).

use candle_core::Var;

use crate::error::{Result, SftError};
use crate::trainer::TrainableAdapters;

/// Whether a PEFT parameter key names an up-projection factor (`…lora_B.weight`).
fn is_lora_b(key: &str) -> bool {
    key.contains("lora_B")
}

/// Runs `f` with the adapters disabled (every `lora_B` factor of `adapters` zero), then restores
/// the factors.
///
/// # Errors
/// [`SftError::Trainer`] when `adapters` has no `lora_B` parameter (nothing to disable); `f`'s
/// error, or a failure to restore the factors.
pub fn with_adapters_disabled<T>(
    adapters: &dyn TrainableAdapters,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let b: Vec<Var> = adapters
        .named_parameters()
        .into_iter()
        .filter(|(k, _)| is_lora_b(k))
        .map(|(_, v)| v)
        .collect();
    if b.is_empty() {
        return Err(SftError::Trainer(
            "cannot disable the adapters: no `lora_B` parameter among the trainable ones".into(),
        ));
    }
    let saved = b
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle_core::Result<Vec<_>>>()?;
    for v in &b {
        v.set(&v.as_tensor().zeros_like()?)?;
    }
    let out = f();
    for (v, s) in b.iter().zip(&saved) {
        v.set(s)?;
    }
    out
}
