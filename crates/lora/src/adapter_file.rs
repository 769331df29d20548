//! `adapter_model.safetensors` in PEFT's layout: f32 tensors keyed
//! `base_model.model.<module>[.base_layer].lora_{A,B}.weight`, metadata `{"format": "pt"}`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{LoraError, Result};
use crate::target::TargetPlan;

/// The weights file name inside an adapter directory.
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// An f32 tensor as little-endian bytes, for the safetensors writer.
struct F32Bytes {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &F32Bytes {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` (converted to f32, moved to the CPU) to `path` with PEFT's metadata `{"format": "pt"}`.
pub fn write_adapter_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut cpu = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        cpu.push((
            k.clone(),
            F32Bytes {
                shape: t.dims().to_vec(),
                bytes,
            },
        ));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(cpu.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), path)
        .map_err(|e| LoraError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Reads an adapter file and checks it against `plan` before anything is applied: every expected key present,
/// no unknown key, every shape as the plan (model shapes + config rank) implies, float dtypes only.
/// Returns the tensors in f32 on `device`, keyed as in the file.
pub fn read_adapter_tensors(
    path: &Path,
    plan: &TargetPlan,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let raw =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| LoraError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    check_adapter_tensors(path, &raw, plan)?;
    let mut out = BTreeMap::new();
    for (k, t) in raw {
        out.insert(k, t.to_dtype(DType::F32)?.to_device(device)?);
    }
    Ok(out)
}

/// The checks of [`read_adapter_tensors`] on tensors already in memory (`source` names them in errors).
pub fn check_adapter_tensors(
    source: &Path,
    tensors: &HashMap<String, Tensor>,
    plan: &TargetPlan,
) -> Result<()> {
    let expected: BTreeMap<String, Vec<usize>> = plan.expected_keys().into_iter().collect();
    let mut unknown: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    unknown.sort();
    if let Some(first) = unknown.first() {
        return Err(LoraError::UnknownKeys {
            path: source.to_path_buf(),
            key: (*first).clone(),
            count: unknown.len(),
        });
    }
    let missing: Vec<(&String, &Vec<usize>)> = expected
        .iter()
        .filter(|(k, _)| !tensors.contains_key(*k))
        .collect();
    if let Some((key, shape)) = missing.first() {
        return Err(LoraError::MissingKeys {
            path: source.to_path_buf(),
            key: (*key).clone(),
            expected: (*shape).clone(),
            count: missing.len(),
        });
    }
    for (key, shape) in &expected {
        let t = &tensors[key];
        if t.dims() != shape.as_slice() {
            return Err(LoraError::ShapeMismatch {
                key: key.clone(),
                expected: shape.clone(),
                found: t.dims().to_vec(),
            });
        }
        if !matches!(
            t.dtype(),
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        ) {
            return Err(LoraError::BadDType {
                key: key.clone(),
                found: t.dtype(),
            });
        }
    }
    Ok(())
}
