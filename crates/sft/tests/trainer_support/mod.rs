//! Shared helpers of the trainer tests: a tiny random gpt-oss with linear LoRA adapters, and
//! synthetic tokenized rows.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use gptoss_model::{init_random, Config, GptOssForCausalLM, LinearAdapter};
use gptoss_sft::collate::Example;
use gptoss_sft::config::TrainingConfig;
use gptoss_sft::schedule::{SchedulerType, Warmup};
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
        let d = x2
            .matmul(&self.a.as_tensor().t()?)?
            .matmul(&self.b.as_tensor().t()?)?;
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
    // std 0.1 (not 0.02) so that the frozen LM head can express confident predictions.
    let mut config = Config::tiny();
    config.initializer_range = 0.1;
    let mut model = init_random(&config, DType::F32, &dev, Some(seed))
        .map_err(|e| gptoss_sft::SftError::Trainer(e.to_string()))?;
    let mut params = Vec::new();
    let mut k = lora_seed;
    for (name, lin) in model.named_linears_mut() {
        if name == "lm_head" {
            continue;
        }
        let (out, inp) = lin.weight().dims2()?;
        k += 1;
        // Deterministic pseudo-random A in [-0.1, 0.1).
        let vals: Vec<f32> = (0..4 * inp as u64)
            .map(|i| {
                let x = (i + 1)
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(k.wrapping_mul(1442695040888963407));
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(vals, (4, inp), &dev)?)?;
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
            let ids: Vec<u32> = (0..len as u32)
                .map(|t| 1 + (pat * 37 + t * (pat + 3)) % 500)
                .collect();
            Example {
                labels: ids.iter().map(|&x| x as i64).collect(),
                input_ids: ids,
            }
        })
        .collect()
}

/// A small deterministic config for tests writing into `out`.
pub fn test_config(out: &Path) -> TrainingConfig {
    TrainingConfig {
        output_dir: out.to_path_buf(),
        learning_rate: 5e-3,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        gradient_checkpointing: false,
        lr_scheduler_type: SchedulerType::Constant,
        warmup: Warmup::Steps(0),
        min_lr: None,
        save_steps: 0,
        logging_steps: 1,
        progress_bar: false,
        report_to: gptoss_sft::config::ReportTo::None,
        ..TrainingConfig::default()
    }
}

/// Trainer options for `Config::tiny()` (pad id 0 = its `pad_token_id`).
pub fn options() -> gptoss_sft::trainer::TrainerOptions {
    gptoss_sft::trainer::TrainerOptions {
        pad_token_id: 0,
        lm_head_chunk: 16,
    }
}

/// The demo's model config (real o200k_harmony vocabulary) shrunk to 2 layers of width 64 with
/// 4 experts: small enough for a CPU test, real enough to train on rendered Harmony rows.
pub fn tiny_real_vocab_config() -> gptoss_model::Config {
    let mut c = gptoss_sft::trainer::pipeline::demo_model_config();
    c.hidden_size = 64;
    c.num_hidden_layers = 2;
    c.layer_types = None;
    c.head_dim = Some(16);
    c.intermediate_size = 64;
    c.num_local_experts = 4;
    c
}
