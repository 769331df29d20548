//! End-to-end trainer tests on a tiny random gpt-oss: the loss falls, resume reproduces the
//! uninterrupted loss sequence, gradient checkpointing gives identical gradients, and a
//! non-finite loss stops with the step named and the last good checkpoint intact.

mod trainer_support;

use candle_core::{Device, Tensor};
use gptoss_sft::collate::pad;
use gptoss_sft::trainer::{
    forward_backward, micro_batch, BackwardOptions, NoObserver, TrainObserver, Trainer,
};
use gptoss_sft::{Result, SftError};
use trainer_support::{synthetic_rows, test_config, tiny_model};

#[test]
fn loss_falls_over_a_few_steps() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let (model, adapters) = tiny_model(0, 1)?;
    let mut cfg = test_config(dir.path());
    cfg.max_steps = Some(12);
    cfg.learning_rate = 2e-2;
    let trainer = Trainer::new(&model, &adapters, cfg, synthetic_rows(12), Device::Cpu)?
        .with_options(trainer_support::options());
    let out = trainer.train(&mut NoObserver)?;
    assert_eq!(out.global_step, 12);
    assert_eq!(out.log_history.len(), 13); // 12 steps + the summary
    assert!(dir.path().join("trainer_state.json").exists());
    assert!(dir.path().join("loss_curve.png").exists());
    let first = out.step_losses[..3].iter().sum::<f64>() / 3.0;
    let last = out.step_losses[9..].iter().sum::<f64>() / 3.0;
    assert!(
        last < first - 0.2,
        "loss did not fall: {:?}",
        out.step_losses
    );
    // Initial loss of a random model ≈ ln(V) = ln(512) = 6.24.
    assert!((out.step_losses[0] - 512f64.ln()).abs() < 0.5);
    let Some(rec) = out.log_history[11].as_step() else {
        panic!("entry 11 is not a step record")
    };
    assert!(rec.grad_norm > 0.0 && rec.learning_rate == 2e-2);
    assert!(rec.mean_token_accuracy >= 0.0 && rec.mean_token_accuracy <= 1.0);
    assert!(rec.entropy > 0.0 && rec.num_tokens > 0);
    Ok(())
}

#[test]
fn resume_reproduces_the_uninterrupted_losses() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let rows = synthetic_rows(10);
    let mut cfg = test_config(dir.path());
    cfg.num_train_epochs = 2.0; // 5 micro-batches/epoch, GA 2 → 3 updates/epoch, 6 in total
    cfg.save_steps = 2;
    cfg.save_total_limit = Some(2);
    cfg.lr_scheduler_type = gptoss_sft::schedule::SchedulerType::Linear;
    let (model, adapters) = tiny_model(0, 1)?;
    let full = Trainer::new(&model, &adapters, cfg.clone(), rows.clone(), Device::Cpu)?
        .with_options(trainer_support::options())
        .train(&mut NoObserver)?;
    assert_eq!(full.step_losses.len(), 6);
    // Only the last two checkpoints are kept.
    assert!(!dir.path().join("checkpoint-2").exists());
    let ckpt = dir.path().join("checkpoint-4");
    assert!(ckpt.join("trainer_state.json").exists());
    assert!(ckpt.join("adapter_model.safetensors").exists());
    // A fresh model with *different* LoRA init: the weights must come from the checkpoint.
    let (model2, adapters2) = tiny_model(0, 99)?;
    let mut cfg2 = cfg.clone();
    cfg2.output_dir = dir.path().join("resumed");
    cfg2.resume_from_checkpoint = Some(ckpt);
    let resumed = Trainer::new(&model2, &adapters2, cfg2, rows, Device::Cpu)?
        .with_options(trainer_support::options())
        .train(&mut NoObserver)?;
    assert_eq!(resumed.step_losses, full.step_losses[4..].to_vec());
    assert_eq!(resumed.global_step, 6);
    assert_eq!(
        resumed.log_history,
        full.log_history[..4]
            .iter()
            .chain(&resumed.log_history[4..])
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(resumed.log_history.len(), 7);
    // train_loss covers the steps before the resume too: the same as the uninterrupted run's.
    assert!(
        (resumed.train_loss - full.train_loss).abs() < 1e-12,
        "resumed train_loss {} vs uninterrupted {}",
        resumed.train_loss,
        full.train_loss
    );
    Ok(())
}

#[test]
fn resume_refuses_a_changed_trajectory_and_cleans_stale_temporaries() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let rows = synthetic_rows(8);
    let mut cfg = test_config(dir.path());
    cfg.max_steps = Some(4);
    cfg.save_steps = 2;
    let (model, adapters) = tiny_model(0, 1)?;
    Trainer::new(&model, &adapters, cfg.clone(), rows.clone(), Device::Cpu)?
        .with_options(trainer_support::options())
        .train(&mut NoObserver)?;
    // What a killed run leaves behind.
    let stale_dir = dir.path().join(".checkpoint-3.tmp");
    let stale_file = dir.path().join(".tmp-abc.json");
    std::fs::create_dir_all(&stale_dir).map_err(|e| SftError::io(&stale_dir, e))?;
    std::fs::write(&stale_file, b"{").map_err(|e| SftError::io(&stale_file, e))?;
    let mut changed = cfg.clone();
    changed.resume_from_checkpoint = Some(dir.path().join("checkpoint-2"));
    changed.learning_rate *= 2.0;
    changed.logging_steps = 3; // not part of the trajectory
    let err = Trainer::new(
        &model,
        &adapters,
        changed.clone(),
        rows.clone(),
        Device::Cpu,
    )?
    .with_options(trainer_support::options())
    .train(&mut NoObserver)
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("learning_rate"), "{err}");
    assert!(err.contains("--allow-config-change"), "{err}");
    assert!(!err.contains("logging_steps"), "{err}");
    assert!(
        !stale_dir.exists() && !stale_file.exists(),
        "stale temporaries removed"
    );
    changed.allow_config_change = true;
    let out = Trainer::new(&model, &adapters, changed, rows, Device::Cpu)?
        .with_options(trainer_support::options())
        .train(&mut NoObserver)?;
    assert_eq!(out.global_step, 4);
    // The last step is checkpointed too (HF saves at the end with step saving on).
    let mut odd = cfg.clone();
    odd.output_dir = dir.path().join("odd");
    odd.max_steps = Some(3);
    Trainer::new(
        &model,
        &adapters,
        odd.clone(),
        synthetic_rows(8),
        Device::Cpu,
    )?
    .with_options(trainer_support::options())
    .train(&mut NoObserver)?;
    assert!(odd.output_dir.join("checkpoint-3").is_dir());
    Ok(())
}

#[test]
fn gradient_checkpointing_gives_identical_gradients() -> Result<()> {
    let (model, adapters) = tiny_model(3, 4)?;
    let vars: Vec<_> = gptoss_sft::trainer::TrainableAdapters::named_parameters(&adapters)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let rows = synthetic_rows(3);
    let mb = micro_batch(&pad(&rows)?, 0, &Device::Cpu)?; // padded batch of 3
    let mut opts = BackwardOptions {
        num_items_in_batch: mb.targets.len(),
        aux_scale: 0.9,
        gradient_checkpointing: false,
        lm_head_chunk: 16,
    };
    let plain = forward_backward(&model, &vars, &mb, &opts)?;
    opts.gradient_checkpointing = true;
    let ckpt = forward_backward(&model, &vars, &mb, &opts)?;
    assert_eq!(plain.nll_sum, ckpt.nll_sum);
    assert_eq!(plain.aux, ckpt.aux);
    let mut compared = 0;
    for (a, b) in plain.grads.iter().zip(&ckpt.grads) {
        let (Some(a), Some(b)) = (a, b) else {
            panic!("a LoRA parameter got no gradient")
        };
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(
            diff <= 1e-5 * scale.max(1e-6),
            "diff {diff} vs scale {scale}"
        );
        compared += 1;
    }
    assert_eq!(compared, vars.len());
    Ok(())
}

/// Poisons a LoRA weight with NaN right after checkpoint-2 is written.
struct Poison(Vec<candle_core::Var>);
impl TrainObserver for Poison {
    fn on_save(&mut self, _dir: &std::path::Path) -> Result<()> {
        let v = &self.0[0];
        v.set(&Tensor::full(f32::NAN, v.shape(), v.device())?)?;
        Ok(())
    }
}

#[test]
fn non_finite_loss_names_the_step_and_keeps_the_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let (model, adapters) = tiny_model(0, 1)?;
    let mut cfg = test_config(dir.path());
    cfg.max_steps = Some(5);
    cfg.save_steps = 2;
    let vars = gptoss_sft::trainer::TrainableAdapters::named_parameters(&adapters)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let trainer = Trainer::new(&model, &adapters, cfg, synthetic_rows(8), Device::Cpu)?
        .with_options(trainer_support::options());
    let err = trainer
        .train(&mut Poison(vars))
        .expect_err("NaN must stop training");
    assert!(
        matches!(err, SftError::NonFiniteLoss { step: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("step 3"));
    let ckpt = dir.path().join("checkpoint-2");
    assert!(ckpt.join("trainer_state.json").exists());
    let saved =
        candle_core::safetensors::load(ckpt.join("adapter_model.safetensors"), &Device::Cpu)?;
    for t in saved.values() {
        let s = t.sum_all()?.to_scalar::<f32>()?;
        assert!(s.is_finite());
    }
    assert!(!dir.path().join("checkpoint-4").exists());
    Ok(())
}

#[test]
fn packed_micro_batch_equals_the_padded_batch() -> Result<()> {
    // Padding-free packing (TRL padding_free=True) must train exactly the same tokens with the
    // same loss and gradients as right padding: no attention across the packed samples,
    // positions restarting per sample.
    let (model, adapters) = tiny_model(3, 4)?;
    let vars: Vec<_> = gptoss_sft::trainer::TrainableAdapters::named_parameters(&adapters)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let rows = synthetic_rows(3);
    let padded = micro_batch(&pad(&rows)?, 0, &Device::Cpu)?;
    let packed = micro_batch(&gptoss_sft::collate::pack(&rows)?, 0, &Device::Cpu)?;
    assert_eq!(padded.targets.len(), packed.targets.len());
    assert!(packed.packed_seq_lens.is_some());
    let opts = BackwardOptions {
        num_items_in_batch: padded.targets.len(),
        aux_scale: 0.9,
        gradient_checkpointing: true,
        lm_head_chunk: 16,
    };
    let a = forward_backward(&model, &vars, &padded, &opts)?;
    let b = forward_backward(&model, &vars, &packed, &opts)?;
    assert!(
        (a.nll_sum - b.nll_sum).abs() <= 1e-4 * a.nll_sum.abs(),
        "nll {} vs {}",
        a.nll_sum,
        b.nll_sum
    );
    let (Some(aux_a), Some(aux_b)) = (a.aux, b.aux) else {
        panic!("the aux loss was not computed")
    };
    assert!((aux_a - aux_b).abs() <= 1e-5 * aux_a.abs().max(1.0));
    assert_grads_close(&a.grads, &b.grads, 1e-4)
}

/// `total_flos` as transformers 5.24 counts it: per micro-batch `6 × B·T (padded) ×
/// num_parameters(exclude_embeddings=True)` of the PEFT-wrapped model, stored at every log, save
/// and at the end.
#[test]
fn total_flos_counts_six_flops_per_padded_token_and_parameter() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let (model, adapters) = tiny_model(0, 1)?;
    let mut cfg = test_config(dir.path());
    cfg.shuffle = false;
    cfg.max_steps = Some(2);
    cfg.save_steps = 1;
    // Config::tiny() without the 512×64 embedding: per layer norms 2·64, q/o 2·(64·64+64),
    // k/v 2·(32·64+32), sinks 4, router 4·64+4, experts 4·64·128 + 4·128 + 4·64·64 + 4·64
    // = 62,792; two layers + final norm 64 + lm_head 512·64 = 158,416. LoRA r=4 on q/k/v/o:
    // per layer (4·64+64·4)·2 + (4·64+32·4)·2 = 1,792, two layers 3,584. In all 162,000.
    let params = 162_000.0;
    // Rows 0..8 have lengths 10..17; micro-batches of 2 pad to the longer row:
    // step 1: 2·11 + 2·13 = 48 tokens, step 2: 2·15 + 2·17 = 64 tokens.
    let step1 = 6.0 * 48.0 * params;
    let step2 = 6.0 * 64.0 * params;
    let trainer = Trainer::new(&model, &adapters, cfg, synthetic_rows(8), Device::Cpu)?
        .with_options(trainer_support::options());
    let out = trainer.train(&mut NoObserver)?;
    let Some(summary) = &out.summary else {
        panic!("no summary")
    };
    assert_eq!(summary.total_flos, step1 + step2);
    let read = |p: std::path::PathBuf| gptoss_sft::checkpoint::TrainerState::read(&p);
    let ckpt1 = read(dir.path().join("checkpoint-1").join("trainer_state.json"))?;
    assert_eq!(ckpt1.total_flos, step1);
    let last = read(dir.path().join("trainer_state.json"))?;
    assert_eq!(last.total_flos, step1 + step2);
    // A resumed run continues the count.
    let mut cfg2 = test_config(dir.path());
    cfg2.shuffle = false;
    cfg2.max_steps = Some(2);
    cfg2.save_steps = 1;
    cfg2.output_dir = dir.path().join("resumed");
    cfg2.resume_from_checkpoint = Some(dir.path().join("checkpoint-1"));
    let resumed = Trainer::new(&model, &adapters, cfg2, synthetic_rows(8), Device::Cpu)?
        .with_options(trainer_support::options())
        .train(&mut NoObserver)?;
    assert_eq!(resumed.summary.map(|s| s.total_flos), Some(step1 + step2));
    Ok(())
}

/// Every LoRA gradient of `b` within `tol` (relative to the largest |entry| of `a`'s) of `a`'s.
fn assert_grads_close(a: &[Option<Tensor>], b: &[Option<Tensor>], tol: f32) -> Result<()> {
    for (ga, gb) in a.iter().zip(b) {
        let (Some(ga), Some(gb)) = (ga, gb) else {
            panic!("a LoRA parameter got no gradient")
        };
        let diff = (ga - gb)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = ga.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(
            diff <= tol * scale.max(1e-6),
            "grad diff {diff} vs scale {scale}"
        );
    }
    Ok(())
}

/// Log-probability of every trained next token of `batch` under `logits` `[rows, T, V]`, in
/// row-major order of the (row, position) pairs.
fn trained_logprobs(batch: &gptoss_sft::collate::Batch, logits: &Tensor) -> Vec<f32> {
    let lp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)
        .and_then(|x| x.to_vec3::<f32>())
        .unwrap_or_else(|e| panic!("log_softmax: {e}"));
    let t = batch.seq_len;
    let mut out = Vec::new();
    for (r, row) in lp.iter().enumerate() {
        for c in 1..t {
            let l = batch.labels[r * t + c];
            if l >= 0 {
                out.push(row[c - 1][l as usize]);
            }
        }
    }
    out
}

#[test]
fn bfd_packed_batches_equal_unpacked_per_token_and_in_gradients() -> Result<()> {
    // TRL packing=True (bfd): rows grouped into bins of ≤ max_length, a micro-batch of two bins
    // collated padding-free. Against the same rows right-padded: every trained token's loss, the
    // loss sum and the LoRA gradients agree (1e-5).
    let (model, adapters) = tiny_model(3, 4)?;
    let vars: Vec<_> = gptoss_sft::trainer::TrainableAdapters::named_parameters(&adapters)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let rows = synthetic_rows(7); // lengths 10..=16
    let lens: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
    let bins = gptoss_sft::collate::pack_bfd(&lens, 32)?;
    assert!(bins.len() < rows.len(), "bins {bins:?}");
    let in_bins: Vec<_> = bins[..2]
        .iter()
        .flatten()
        .map(|&i| rows[i].clone())
        .collect();
    let packed_b = gptoss_sft::collate::pack(&in_bins)?;
    let padded_b = gptoss_sft::collate::pad_with_id(&in_bins, 0)?;
    // per-token losses
    let dev = Device::Cpu;
    let wrap = |e: gptoss_model::ModelError| SftError::Trainer(e.to_string());
    let lp_packed = model
        .forward_packed(&packed_b.input_ids_tensor(&dev)?, &packed_b.seq_lens)
        .map_err(wrap)?;
    let lp_padded = model
        .forward(
            &padded_b.input_ids_tensor(&dev)?,
            Some(&padded_b.attention_mask_tensor(&dev)?),
        )
        .map_err(wrap)?;
    let (a, b) = (
        trained_logprobs(&packed_b, &lp_packed),
        trained_logprobs(&padded_b, &lp_padded),
    );
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5,
            "token {i}: log-prob {x} packed vs {y} padded"
        );
    }
    // loss sum and gradients
    let packed = micro_batch(&packed_b, 0, &dev)?;
    let padded = micro_batch(&padded_b, 0, &dev)?;
    let opts = BackwardOptions {
        num_items_in_batch: padded.targets.len(),
        aux_scale: 0.0,
        gradient_checkpointing: true,
        lm_head_chunk: 16,
    };
    let ra = forward_backward(&model, &vars, &padded, &opts)?;
    let rb = forward_backward(&model, &vars, &packed, &opts)?;
    assert_eq!(ra.count, rb.count);
    assert!((ra.nll_sum - rb.nll_sum).abs() <= 1e-5 * ra.nll_sum.abs());
    assert_grads_close(&ra.grads, &rb.grads, 1e-5)
}

#[test]
fn packing_trains_over_bins() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let (model, adapters) = tiny_model(0, 1)?;
    let mut cfg = test_config(dir.path());
    cfg.packing = true;
    cfg.max_length = 32;
    cfg.max_steps = Some(2);
    let rows = synthetic_rows(12);
    let lens: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
    let bins = gptoss_sft::collate::pack_bfd(&lens, 32)?.len();
    let trainer = Trainer::new(&model, &adapters, cfg.clone(), rows.clone(), Device::Cpu)?
        .with_options(trainer_support::options());
    assert_eq!(trainer.micro_batches_per_epoch(), bins.div_ceil(2));
    let out = trainer.train(&mut NoObserver)?;
    assert_eq!(out.global_step, 2);
    assert!(out.step_losses.iter().all(|l| l.is_finite()));
    // a row longer than max_length cannot be packed
    cfg.max_length = 12;
    assert!(Trainer::new(&model, &adapters, cfg, rows, Device::Cpu).is_err());
    Ok(())
}
