//! Shared helpers of the trainer tests: a tiny random gpt-oss with linear LoRA adapters, and
//! synthetic tokenized rows.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use gptoss_model::{init_random, Config, GptOssForCausalLM, LinearAdapter};
use gptoss_sft::config::TrainingConfig;
use gptoss_sft::schedule::{SchedulerType, Warmup};
use gptoss_sft::collate::Example;
use gptoss_sft::trainer::TrainableAdapters;
use gptoss_sft::Result;

/// `y = base + s · (x·Aᵀ)·Bᵀ` with f32 `Var`s.
#[derive(Debug)]
struct TestLora {
    a: Var,
    b: Var,
    scaling: f64,
}

impl LinearAdapter for TestLora {
    fn forward(&self, x: &Tensor, base: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let x2 = x.to_dtype(DType::F32)?.reshape(((), inner))?;
        let d = x2.matmul(&self.a.as_tensor().t()?)?.matmul(&self.b.as_tensor().t()?)?;
        let d = (d * self.scaling)?.reshape(base.shape())?;
        base + d.to_dtype(base.dtype())?
    }
}

/// The adapters of [`tiny_model`]: PEFT-style keys, saved as one safetensors file.
pub struct TestAdapters {
    params: Vec<(String, Var)>,
}

impl TrainableAdapters for TestAdapters {
    fn named_parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }
    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }
}

/// `Config::tiny()` (V=512, H=64, 2 layers, 4 experts top-2) with r=4 LoRA on q/k/v/o.
/// `lora_seed` seeds A (B starts at a small nonzero value so every factor gets a gradient).
pub fn tiny_model(seed: u64, lora_seed: u64) -> Result<(GptOssForCausalLM, TestAdapters)> {
    let dev = Device::Cpu;
    let mut model = init_random(&Config::tiny(), DType::F32, &dev, Some(seed))
        .map_err(|e| gptoss_sft::SftError::Trainer(e.to_string()))?;
    let mut params = Vec::new();
    let mut k = lora_seed;
    for (name, lin) in model.named_linears_mut() {
        if name == "lm_head" {
            continue;
        }
        let (out, inp) = lin.weight().dims2()?;
        k += 1;
        let a = Tensor::rand(-0.1f32, 0.1, (4, inp), &dev)?;
        let a = (a * (1.0 + (k % 7) as f64 * 0.01))?;
        let a = Var::from_tensor(&a)?;
        let b = Var::from_tensor(&Tensor::full(1e-3f32, (out, 4), &dev)?)?;
        lin.set_adapter(Some(Arc::new(TestLora {
            a: a.clone(),
            b: b.clone(),
            scaling: 2.0,
        })));
        params.push((format!("base_model.model.{name}.lora_A.weight"), a));
        params.push((format!("base_model.model.{name}.lora_B.weight"), b));
    }
    Ok((model, TestAdapters { params }))
}

/// Rows of a few repeating token patterns (learnable), lengths 10..=17, all tokens trained.
pub fn synthetic_rows(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let pat = (i % 3) as u32;
            let len = 10 + (i % 8);
            let ids: Vec<u32> = (0..len as u32).map(|t| 1 + (pat * 37 + t * (pat + 3)) % 500).collect();
            Example {
                labels: ids.iter().map(|&x| x as i64).collect(),
                input_ids: ids,
            }
        })
        .collect()
}

/// A small deterministic config for tests writing into `out`.
pub fn test_config(out: &Path) -> TrainingConfig {
    let mut c = TrainingConfig::default();
    c.output_dir = out.to_path_buf();
    c.learning_rate = 5e-3;
    c.per_device_train_batch_size = 2;
    c.gradient_accumulation_steps = 2;
    c.gradient_checkpointing = false;
    c.lr_scheduler_type = SchedulerType::Constant;
    c.warmup = Warmup::Steps(0);
    c.min_lr = None;
    c.save_steps = 0;
    c.logging_steps = 1;
    c.progress_bar = false;
    c.report_to = gptoss_sft::config::ReportTo::None;
    c
}

/// Trainer options for `Config::tiny()` (pad id 0 = its `pad_token_id`).
pub fn options() -> gptoss_sft::trainer::TrainerOptions {
    gptoss_sft::trainer::TrainerOptions {
        pad_token_id: 0,
        lm_head_chunk: 16,
    }
}
