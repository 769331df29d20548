//! Ctrl-C / SIGTERM during the backdoor pipeline: the interrupted stage saves its checkpoint and the
//! pipeline stops there with an error naming the stage, instead of training and evaluating the later
//! stages on an unfinished model (seen on the GPU when `timeout` stopped the base pretraining).
//! Its own test binary: the interrupt flag is process-wide.

mod backdoor_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use backdoor_support::tiny;
use gptoss_harmony::HarmonyTokenizer;
use gptoss_sft::backdoor::{run_pipeline, BaseModel, PipelineConfig, StageTraining};
use gptoss_sft::trainer::interrupt;

#[test]
fn an_interrupt_ends_the_pipeline_at_the_interrupted_stage() {
    let dir = tempfile::tempdir().expect("scratch dir");
    let mut cfg: PipelineConfig = tiny(dir.path());
    if let BaseModel::FromScratch { train, .. } = &mut cfg.base {
        *train = StageTraining::new(50, 1e-3, 1);
    }
    let tok = HarmonyTokenizer::o200k_harmony().expect("tokenizer");
    // The trainer clears the flag when a run starts, so keep asking until the pipeline returns:
    // the base stage (50 steps) is stopped after one of its steps.
    let done = Arc::new(AtomicBool::new(false));
    let asker = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                interrupt::request();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let result = run_pipeline(&cfg, &tok, &candle_core::Device::Cpu);
    done.store(true, Ordering::SeqCst);
    asker.join().expect("asker thread");
    let text = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains("stage `base` was interrupted"), "{text}");
    assert!(text.contains("checkpoint-"), "names the checkpoint: {text}");
    assert!(
        !dir.path().join("attack").exists(),
        "no later stage was trained"
    );
}
