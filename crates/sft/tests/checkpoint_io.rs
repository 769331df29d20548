//! Checkpoint directories: layout, atomic commit, rotation, loading back for resume.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use gptoss_sft::checkpoint::{
    checkpoint_dir, list_checkpoints, load_checkpoint, load_optimizer, resolve_resume,
    save_checkpoint, CheckpointContents, RngState, TrainerState,
};
use gptoss_sft::config::TrainingConfig;
use gptoss_sft::logging::{LogEntry, LogRecord};
use gptoss_sft::optim::{AdamW, AdamWConfig};
use gptoss_sft::schedule::{LrSchedule, MinLr, SchedulerType, Warmup};
use gptoss_sft::SftError;

fn record(step: u64) -> LogRecord {
    LogRecord {
        loss: 3.0 / step as f64,
        grad_norm: 0.5,
        learning_rate: 2e-4,
        entropy: 2.0,
        num_tokens: 100 * step,
        mean_token_accuracy: 0.3,
        aux_loss: None,
        epoch: step as f64 / 4.0,
        step,
        tokens_per_second: 10.0,
    }
}

fn optimizer() -> AdamW {
    let v = Var::from_tensor(
        &Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap(),
    )
    .unwrap();
    let mut opt = AdamW::new(vec![("w".into(), v)], AdamWConfig::default()).unwrap();
    let mut g = opt.gradients();
    g.set(0, Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    opt.step(&g, 1e-3).unwrap();
    opt
}

fn save(
    out: &Path,
    step: u64,
    cfg: &TrainingConfig,
    opt: &AdamW,
    keep: Option<usize>,
) -> gptoss_sft::Result<std::path::PathBuf> {
    let sched = LrSchedule::new(
        SchedulerType::CosineWithMinLr,
        2e-4,
        Warmup::Steps(1),
        4,
        Some(MinLr::Rate(0.1)),
    )
    .unwrap();
    let history: Vec<LogEntry> = (1..=step).map(|s| LogEntry::Step(record(s))).collect();
    let ts = TrainerState::new(cfg, step, step as f64 / 4.0, 4, 100 * step, history, false);
    let rng = RngState {
        seed: 42,
        shuffle: true,
        global_step: step,
        epoch: 0,
        micro_batches_done: step * 4,
        extra: None,
    };
    let contents = CheckpointContents {
        trainer_state: &ts,
        scheduler: &sched.state(step),
        rng: &rng,
        config: cfg,
        optimizer: opt,
    };
    save_checkpoint(
        out,
        &contents,
        |dir| {
            std::fs::write(dir.join("adapter_model.safetensors"), b"fake")
                .map_err(|e| SftError::io(dir, e))
        },
        keep,
    )
}

#[test]
fn save_load_rotate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = TrainingConfig::default();
    let opt = optimizer();
    for step in 1..=4 {
        save(&out, step, &cfg, &opt, Some(2)).unwrap();
    }
    let all: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(all, vec![3, 4]);
    let dir = checkpoint_dir(&out, 4);
    for f in [
        "adapter_model.safetensors",
        "trainer_state.json",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng_state.json",
        "training_args.json",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    // No staging leftovers.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    let loaded = load_checkpoint(&resolve_resume(&out, Path::new("latest")).unwrap()).unwrap();
    assert_eq!(loaded.trainer_state.global_step, 4);
    assert_eq!(loaded.trainer_state.log_history.len(), 4);
    assert_eq!(loaded.scheduler.last_epoch, 4);
    assert_eq!(loaded.rng.micro_batches_done, 16);
    let mut fresh = AdamW::new(
        vec![(
            "w".into(),
            Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        )],
        AdamWConfig::default(),
    )
    .unwrap();
    load_optimizer(&loaded.dir, &mut fresh).unwrap();
    assert_eq!(fresh.step_count(), 1);
    let (m, _) = fresh.moments("w").unwrap();
    let m: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
    assert!(m.iter().all(|&x| (x - 0.1).abs() < 1e-7), "{m:?}");
}

#[test]
fn failed_save_leaves_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = TrainingConfig::default();
    let opt = optimizer();
    save(&out, 2, &cfg, &opt, None).unwrap();
    let before = std::fs::read(checkpoint_dir(&out, 2).join("trainer_state.json")).unwrap();
    // The adapter writer fails half-way through step 3's save.
    let sched = LrSchedule::new(SchedulerType::Constant, 1e-3, Warmup::Steps(0), 4, None).unwrap();
    let ts = TrainerState::new(&cfg, 3, 0.75, 4, 300, vec![], false);
    let rng = RngState {
        seed: 1,
        shuffle: false,
        global_step: 3,
        epoch: 0,
        micro_batches_done: 12,
        extra: None,
    };
    let contents = CheckpointContents {
        trainer_state: &ts,
        scheduler: &sched.state(3),
        rng: &rng,
        config: &cfg,
        optimizer: &opt,
    };
    let r = save_checkpoint(
        &out,
        &contents,
        |_| Err(SftError::Trainer("disk full".into())),
        Some(1),
    );
    assert!(r.is_err());
    let all: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(all, vec![2]);
    assert!(!out.join(".checkpoint-3.tmp").exists());
    assert_eq!(
        std::fs::read(checkpoint_dir(&out, 2).join("trainer_state.json")).unwrap(),
        before
    );
    // A checkpoint missing a file is rejected naming it.
    std::fs::remove_file(checkpoint_dir(&out, 2).join("rng_state.json")).unwrap();
    let err = load_checkpoint(&checkpoint_dir(&out, 2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing rng_state.json"), "{err}");
}

#[test]
fn trainer_state_has_the_hf_keys() {
    // Fixture: transformers 5.24 TrainerState.save_to_json (make_trainer_state_fixture.py).
    let hf_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/trainer_state_hf.json"
    ))
    .unwrap();
    let hf: serde_json::Value = serde_json::from_str(&hf_text).unwrap();
    // HF's file parses as ours (num_tokens is a float there).
    let parsed: TrainerState = serde_json::from_str(&hf_text).unwrap();
    assert_eq!(parsed.global_step, 3);
    assert_eq!(parsed.log_history[0].as_step().unwrap().num_tokens, 400);

    let cfg = TrainingConfig {
        save_steps: 3,
        ..TrainingConfig::default()
    };
    let ours = TrainerState::new(
        &cfg,
        3,
        0.75,
        4,
        1234,
        vec![LogEntry::Step(record(1))],
        false,
    );
    let ours = serde_json::to_value(&ours).unwrap();
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&ours), keys(&hf));
    assert_eq!(ours["stateful_callbacks"], hf["stateful_callbacks"]);
    for k in [
        "eval_steps",
        "global_step",
        "max_steps",
        "num_input_tokens_seen",
        "logging_steps",
        "save_steps",
        "train_batch_size",
    ] {
        assert_eq!(ours[k], hf[k], "{k}");
    }
    // Every HF log_history key is present in ours.
    for k in hf["log_history"][0].as_object().unwrap().keys() {
        assert!(
            ours["log_history"][0].get(k).is_some(),
            "log_history key {k}"
        );
    }
}
