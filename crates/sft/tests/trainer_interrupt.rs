//! Ctrl-C during training saves a checkpoint and returns cleanly (own test binary: the flag is
//! process-wide).

mod trainer_support;

use candle_core::Device;
use gptoss_sft::trainer::{interrupt, TrainObserver, Trainer};
use gptoss_sft::{Result, SftError};
use trainer_support::{synthetic_rows, test_config, tiny_model};

struct CtrlCAt(u64);
impl TrainObserver for CtrlCAt {
    fn on_step_end(&mut self, step: u64, _loss: f64) -> Result<()> {
        if step == self.0 {
            interrupt::request();
        }
        Ok(())
    }
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_stops() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let (model, adapters) = tiny_model(0, 1)?;
    let mut cfg = test_config(dir.path());
    cfg.max_steps = Some(10);
    let trainer = Trainer::new(&model, &adapters, cfg, synthetic_rows(8), Device::Cpu)?
        .with_options(trainer_support::options());
    let out = trainer.train(&mut CtrlCAt(3))?;
    assert!(out.interrupted);
    assert_eq!(out.global_step, 3);
    let ckpt = dir.path().join("checkpoint-3");
    assert_eq!(out.last_checkpoint.as_deref(), Some(ckpt.as_path()));
    for f in [
        "trainer_state.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "scheduler.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f} missing");
    }
    Ok(())
}
