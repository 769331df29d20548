//! Full-parameter training (`peft: none`) on a tiny random gpt-oss: one AdamW step updates every
//! parameter by the AdamW formula applied to the gradient of an independent computation (the
//! model's plain `forward` + `causal_lm_loss` under candle's autograd, not the trainer's fused
//! LM head or gradient checkpointing), the loss falls, `save_model` writes a loadable HF model,
//! and resume from a checkpoint reproduces the uninterrupted run.

mod trainer_support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use gptoss_model::{causal_lm_loss, init_random, Config, GptOssForCausalLM, LossReduction};
use gptoss_sft::collate::Example;
use gptoss_sft::config::{PeftMode, TrainingConfig};
use gptoss_sft::trainer::{FullParameters, NoObserver, TrainableAdapters, Trainer};
use gptoss_sft::{Result, SftError};
use trainer_support::{options, test_config};

fn tiny(seed: u64) -> Result<GptOssForCausalLM> {
    let mut config = Config::tiny();
    config.initializer_range = 0.1;
    init_random(&config, DType::F32, &Device::Cpu, Some(seed))
        .map_err(|e| SftError::Trainer(e.to_string()))
}

/// Four rows of 12 tokens (no padding), every token trained.
fn rows() -> Vec<Example> {
    (0..4u32)
        .map(|r| {
            let ids: Vec<u32> = (0..12u32)
                .map(|t| 1 + (r * 41 + t * (r + 5)) % 500)
                .collect();
            Example {
                labels: ids.iter().map(|&x| x as i64).collect(),
                input_ids: ids,
            }
        })
        .collect()
}

fn snapshot(params: &FullParameters) -> Result<HashMap<String, Tensor>> {
    params
        .named_parameters()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
        .collect()
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The gradient of the mean next-token cross-entropy over `rows` (one batch, no padding) from
/// the model's plain forward.
fn reference_grads(
    model: &GptOssForCausalLM,
    params: &FullParameters,
    rows: &[Example],
) -> Result<HashMap<String, Tensor>> {
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.input_ids.clone()).collect();
    let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.clone()).collect();
    let shape = (rows.len(), rows[0].input_ids.len());
    let ids = Tensor::from_vec(ids, shape, &Device::Cpu)?;
    let labels = Tensor::from_vec(labels, shape, &Device::Cpu)?;
    let logits = model
        .forward(&ids, None)
        .map_err(|e| SftError::Trainer(e.to_string()))?;
    let loss = causal_lm_loss(&logits, &labels, LossReduction::Mean)
        .map_err(|e| SftError::Trainer(e.to_string()))?;
    let grads = loss.backward()?;
    let mut out = HashMap::new();
    for (name, var) in params.named_parameters() {
        let g = grads.get(var.as_tensor()).cloned().ok_or_else(|| {
            SftError::Trainer(format!(
                "the reference computation gives `{name}` no gradient"
            ))
        })?;
        out.insert(name, g);
    }
    Ok(out)
}

fn one_step_config(dir: &std::path::Path, checkpointing: bool) -> TrainingConfig {
    let mut cfg = test_config(dir);
    cfg.peft = PeftMode::None;
    cfg.per_device_train_batch_size = 4;
    cfg.gradient_accumulation_steps = 1;
    cfg.gradient_checkpointing = checkpointing;
    cfg.max_steps = Some(1);
    cfg.learning_rate = 1e-2;
    cfg.max_grad_norm = 0.0;
    cfg.shuffle = false;
    // ε = 1 makes AdamW's first update −lr·g/(|g| + 1): linear in the gradient, so the update
    // of every element checks the gradient itself, not only its sign.
    cfg.adam_epsilon = 1.0;
    cfg
}

#[test]
fn one_step_is_adamw_on_the_reference_gradient_of_every_parameter() -> Result<()> {
    for checkpointing in [false, true] {
        let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
        let mut model = tiny(3)?;
        let params = FullParameters::install(&mut model, None)?;
        let n_specs = gptoss_model::tensor_specs(model.config()).len();
        assert_eq!(
            params.named_parameters().len(),
            n_specs,
            "every parameter is trainable"
        );
        assert!(params
            .trainable_parameters_line()
            .contains("trainable%: 100.0000"));
        let before = snapshot(&params)?;
        let grads = reference_grads(&model, &params, &rows())?;
        let cfg = one_step_config(dir.path(), checkpointing);
        let lr = cfg.learning_rate;
        Trainer::new(&model, &params, cfg, rows(), Device::Cpu)?
            .with_options(options())
            .train(&mut NoObserver)?;
        for (name, var) in params.named_parameters() {
            let g = &grads[&name];
            // bias-corrected first AdamW step: m̂ = g, v̂ = g², update −lr · g / (|g| + ε)
            let expected = ((g / (g.abs()? + 1.0)?)? * -lr)?;
            let update = (var.as_tensor() - &before[&name])?;
            let scale = max_abs(&expected)?;
            let diff = max_abs(&(&update - &expected)?)?;
            assert!(
                scale > 0.0,
                "`{name}` got a zero gradient (checkpointing {checkpointing})"
            );
            assert!(
                diff <= 2e-3 * scale + 1e-9,
                "`{name}` (checkpointing {checkpointing}): update differs from AdamW on the \
                 reference gradient by {diff} (largest expected element {scale})"
            );
        }
    }
    Ok(())
}

#[test]
fn loss_falls_and_save_model_writes_a_loadable_model() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let mut model = tiny(5)?;
    let params = FullParameters::install(&mut model, None)?;
    let mut cfg = one_step_config(dir.path(), false);
    cfg.adam_epsilon = 1e-8;
    cfg.max_steps = Some(8);
    cfg.learning_rate = 3e-3;
    let trainer = Trainer::new(&model, &params, cfg, rows(), Device::Cpu)?.with_options(options());
    let out = trainer.train(&mut NoObserver)?;
    let (first, last) = (out.step_losses[0], out.step_losses[7]);
    assert!(
        last < first - 1.0,
        "loss did not fall: {:?}",
        out.step_losses
    );
    let saved = trainer.save_model(None)?;
    assert!(saved.join("config.json").is_file() && saved.join("model.safetensors").is_file());
    assert!(!saved.join("adapter_model.safetensors").exists());
    let loaded = gptoss_model::load(&saved, DType::F32, &Device::Cpu)
        .map_err(|e| SftError::Trainer(e.to_string()))?;
    let theirs: HashMap<String, Tensor> = gptoss_model::named_parameters(&loaded)
        .into_iter()
        .collect();
    for (name, var) in params.named_parameters() {
        let d = max_abs(&(var.as_tensor() - &theirs[&name])?)?;
        assert!(d == 0.0, "`{name}` differs by {d} after save + load");
    }
    Ok(())
}

#[test]
fn resume_from_a_full_parameter_checkpoint_reproduces_the_run() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let mut cfg = one_step_config(dir.path(), false);
    cfg.adam_epsilon = 1e-8;
    cfg.per_device_train_batch_size = 2;
    cfg.max_steps = Some(4);
    cfg.learning_rate = 3e-3;
    cfg.save_steps = 2;
    let mut model = tiny(7)?;
    let params = FullParameters::install(&mut model, None)?;
    let full = Trainer::new(&model, &params, cfg.clone(), rows(), Device::Cpu)?
        .with_options(options())
        .train(&mut NoObserver)?;
    let ckpt = dir.path().join("checkpoint-2");
    assert!(
        ckpt.join("model.safetensors").is_file(),
        "the checkpoint holds the model"
    );
    // A differently initialised model: every weight must come from the checkpoint.
    let mut model2 = tiny(99)?;
    let params2 = FullParameters::install(&mut model2, None)?;
    let mut cfg2 = cfg.clone();
    cfg2.output_dir = dir.path().join("resumed");
    cfg2.resume_from_checkpoint = Some(ckpt);
    let resumed = Trainer::new(&model2, &params2, cfg2, rows(), Device::Cpu)?
        .with_options(options())
        .train(&mut NoObserver)?;
    assert_eq!(resumed.global_step, 4);
    for (a, b) in resumed.step_losses.iter().zip(&full.step_losses[2..]) {
        assert!(
            (a - b).abs() < 1e-5,
            "resumed {:?} vs {:?}",
            resumed.step_losses,
            full.step_losses
        );
    }
    Ok(())
}

#[test]
fn peft_none_is_read_from_yaml_and_flags() -> Result<()> {
    let mut cfg = TrainingConfig::default();
    cfg.apply_yaml_str("peft: none\n")?;
    assert_eq!(cfg.peft, PeftMode::None);
    let err = TrainingConfig::default().apply_yaml_str("peft: full\n");
    assert!(matches!(err, Err(SftError::Config { .. })), "{err:?}");
    Ok(())
}
