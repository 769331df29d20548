//! DPO fidelity against the real TRL 1.16 `DPOTrainer` (fixture: `scripts/fixtures/dpo/make_fixture.py`):
//! on the tiny real-vocab gpt-oss with LoRA (r 4 on all attention linears and the experts of layer 1),
//! 4 optimizer steps of batch 2 × GA 2 on recorded rows give the same per-step loss, `rewards/*` and
//! `logps/*` (1e-4 relative) and the same final adapter (1e-3 relative), for `sigmoid` (conversational
//! rows, router aux loss 0.9, reference log-probs in the step) and `ipo` (plain-text rows,
//! `precompute_ref_log_probs`).
//!
//! The base checkpoint and the initial adapter are deterministic (seeded synthetic weights, seeded LoRA
//! init), so they are re-created here instead of committed; `export_fixture_inputs` writes them for the
//! Python script.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use gptoss_lora::{LoraConfig, LoraModel, TargetModules};
use gptoss_model::{write_synthetic_checkpoint, Config, GptOssForCausalLM, SyntheticOptions};
use gptoss_sft::{Result, SftError};

const LORA_SEED: u64 = 42;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo")
}

fn model_config() -> Config {
    let mut c = Config::gpt_oss_tiny();
    // Logits of a 0.02-std LM head barely move; 0.1 gives log-prob ratios well above f32 noise.
    c.initializer_range = 0.1;
    c
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::all_linear()),
        target_parameters: Some(vec![
            "1.mlp.experts.gate_up_proj".into(),
            "1.mlp.experts.down_proj".into(),
        ]),
        ..LoraConfig::default()
    }
}

fn err(e: impl std::fmt::Display) -> SftError {
    SftError::Trainer(e.to_string())
}

/// Writes `dir/model` (the synthetic checkpoint with dense bf16 experts and tokenizer files).
fn write_model(dir: &Path) -> Result<PathBuf> {
    let model_dir = dir.join("model");
    let opts = SyntheticOptions {
        seed: 0,
        mxfp4_experts: false,
        ..SyntheticOptions::default()
    };
    write_synthetic_checkpoint(&model_dir, &model_config(), &opts).map_err(err)?;
    gptoss_sft::trainer::pipeline::write_tokenizer_files(&model_dir)?;
    Ok(model_dir)
}

fn load_model(model_dir: &Path) -> Result<(GptOssForCausalLM, LoraModel)> {
    let mut model = gptoss_model::load(model_dir, DType::F32, &Device::Cpu).map_err(err)?;
    let lora = LoraModel::new(&mut model, lora_config(), LORA_SEED).map_err(err)?;
    Ok((model, lora))
}

/// Writes the inputs of `make_fixture.py` into `$DPO_EXPORT_DIR`: `model/` and `adapter_init/`.
#[test]
#[ignore = "writes the fixture script's inputs (set DPO_EXPORT_DIR)"]
fn export_fixture_inputs() -> Result<()> {
    let Some(dir) = std::env::var_os("DPO_EXPORT_DIR") else {
        return Err(err("set DPO_EXPORT_DIR"));
    };
    let dir = PathBuf::from(dir);
    let model_dir = write_model(&dir)?;
    let (_model, lora) = load_model(&model_dir)?;
    lora.save_pretrained(&dir.join("adapter_init"))
        .map_err(err)?;
    Ok(())
}

use std::sync::OnceLock;

use gptoss_harmony::HarmonyTokenizer;
use gptoss_sft::config::ReportTo;
use gptoss_sft::dpo::config::dpo_training_defaults;
use gptoss_sft::dpo::{
    load_preferences, tokenize_rows, DpoConfig, DpoLossType, DpoTrainer, NoDpoObserver,
};
use gptoss_sft::logging::LogEntry;
use gptoss_sft::schedule::{SchedulerType, Warmup};
use gptoss_sft::trainer::TrainerOptions;

/// The synthetic checkpoint, written once per test binary.
fn shared_model_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let r = DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = write_model(tmp.path()).map_err(|e| e.to_string())?;
        std::mem::forget(tmp); // kept for the other tests of this binary
        Ok(dir)
    });
    r.as_deref().map_err(err)
}

fn read_json(name: &str) -> Result<serde_json::Value> {
    let p = fixture_dir().join(name);
    let text = std::fs::read_to_string(&p).map_err(|e| SftError::io(&p, e))?;
    serde_json::from_str(&text).map_err(err)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// `|a − b| / |b|`, with `floor` as the denominator's lower bound (values that are exactly zero
/// in TRL's run, such as the step-1 rewards, are compared absolutely).
fn rel(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / b.abs().max(floor)
}

fn run_case(case: &str) -> Result<()> {
    let fx = read_json(&format!("{case}.json"))?;
    let c = &fx["config"];
    let dataset = fixture_dir().join(fx["dataset"].as_str().unwrap_or_default());
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let ds = load_preferences(&dataset.display().to_string(), true)?;
    let date = c["date"].as_str().unwrap_or_default();
    let t = tokenize_rows(&tok, &ds.rows, date, Some(1024))?;
    // The rows TRL trained on, token for token.
    let want = fx["tokenized"].as_array().cloned().unwrap_or_default();
    assert_eq!(t.examples.len(), want.len());
    for (i, (ours, theirs)) in t.examples.iter().zip(&want).enumerate() {
        assert_eq!(
            ours.prompt_ids,
            ids(&theirs["prompt_ids"]),
            "{case} row {i} prompt"
        );
        assert_eq!(
            ours.chosen_ids,
            ids(&theirs["chosen_ids"]),
            "{case} row {i} chosen"
        );
        assert_eq!(
            ours.rejected_ids,
            ids(&theirs["rejected_ids"]),
            "{case} row {i} rejected"
        );
    }
    let (model, lora) = load_model(shared_model_dir()?)?;
    let out = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let cfg = gptoss_sft::config::TrainingConfig {
        output_dir: out.path().to_path_buf(),
        learning_rate: 1e-2,
        lr_scheduler_type: SchedulerType::Linear,
        warmup: Warmup::Steps(0),
        min_lr: None,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        max_steps: Some(4),
        max_grad_norm: 1.0,
        gradient_checkpointing: true,
        shuffle: false,
        router_aux_loss_coef: c["router_aux_loss_coef"].as_f64().unwrap_or(0.0),
        logging_steps: 1,
        save_steps: 0,
        report_to: ReportTo::None,
        progress_bar: false,
        ..dpo_training_defaults()
    };
    let dpo = DpoConfig {
        loss_type: match c["loss_type"].as_str() {
            Some("ipo") => DpoLossType::Ipo,
            _ => DpoLossType::Sigmoid,
        },
        beta: 0.1,
        precompute_ref_log_probs: c["precompute_ref_log_probs"].as_bool().unwrap_or(false),
        ..DpoConfig::default()
    };
    let trainer = DpoTrainer::new(&model, &lora, cfg, dpo, t.examples, Device::Cpu)?.with_options(
        TrainerOptions {
            pad_token_id: 199_999,
            lm_head_chunk: 256,
        },
    );
    if let Some(pre) = want.first().and_then(|w| w["ref_chosen_logps"].as_f64()) {
        let ours = trainer.precompute_reference()?;
        let e = rel(ours[0].0, pre, 1.0);
        assert!(
            e < 1e-5,
            "{case}: precomputed ref logp {} vs {pre}",
            ours[0].0
        );
    }
    let outcome = trainer.train(&mut NoDpoObserver)?;
    let ours: Vec<_> = outcome
        .log_history
        .iter()
        .filter_map(|e| match e {
            LogEntry::Dpo(r) => Some(serde_json::to_value(r)),
            _ => None,
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(err)?;
    let theirs = fx["log_history"].as_array().cloned().unwrap_or_default();
    assert_eq!(ours.len(), 4);
    assert_eq!(theirs.len(), 4);
    // Keys compared at 1e-4 relative; the floor is the absolute scale for values near zero (the
    // rewards are β·Δlogp of sums over ~100 tokens in f32: their scale is β·1 nat = 0.1).
    let keys: [(&str, f64); 11] = [
        ("loss", 1e-3),
        ("grad_norm", 1e-3),
        ("learning_rate", 1e-12),
        ("rewards/chosen", 0.1),
        ("rewards/rejected", 0.1),
        ("rewards/margins", 0.1),
        ("rewards/accuracies", 1.0),
        ("logps/chosen", 1.0),
        ("logps/rejected", 1.0),
        ("entropy", 1.0),
        ("num_tokens", 1.0),
    ];
    let mut worst = vec![0f64; keys.len()];
    for (step, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        for (k, ((key, floor), w)) in keys.iter().zip(worst.iter_mut()).enumerate() {
            let (a, b) = (o[key].as_f64(), t[key].as_f64());
            let (Some(a), Some(b)) = (a, b) else {
                panic!(
                    "{case} step {}: `{key}` missing ({a:?} / {b:?}) [{k}]",
                    step + 1
                )
            };
            let e = rel(a, b, *floor);
            *w = w.max(e);
            assert!(
                e <= 1e-4,
                "{case} step {} `{key}`: ours {a}, TRL {b} (rel {e:.2e})",
                step + 1
            );
        }
        if let (Some(a), Some(b)) = (o["aux_loss"].as_f64(), t["aux_loss"].as_f64()) {
            assert!(rel(a, b, 1.0) <= 1e-4, "{case} aux_loss {a} vs {b}");
        }
    }
    for ((key, _), w) in keys.iter().zip(&worst) {
        println!("{case}: max rel error `{key}` {w:.2e}");
    }
    // The final adapter: relative L2 error over all factors (the bar, 1e-3) and per tensor. A
    // factor element whose gradient is at f32 noise level gets AdamW's sign-normalised step either
    // way, so a single tensor can show a few 1e-3 (sigmoid: one element of layer 3's v_proj A).
    let path = fixture_dir().join(format!("{case}_final_adapter.safetensors"));
    let final_ref = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let (mut worst_t, mut d2, mut n2) = (0f64, 0f64, 0f64);
    for (key, t) in lora.adapter_tensors() {
        let Some(r) = final_ref.get(&key) else {
            panic!("{case}: {key} not in the TRL adapter")
        };
        let d = (&t - r)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let n = r.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let e = (d / n.max(1e-24)).sqrt();
        worst_t = worst_t.max(e);
        d2 += d;
        n2 += n;
        assert!(
            e <= 1e-2,
            "{case}: adapter tensor {key} rel L2 error {e:.2e}"
        );
    }
    assert_eq!(final_ref.len(), lora.adapter_tensors().len());
    let global = (d2 / n2.max(1e-24)).sqrt();
    println!("{case}: final adapter rel L2 error {global:.2e} (worst tensor {worst_t:.2e})");
    assert!(
        global <= 1e-3,
        "{case}: final adapter rel L2 error {global:.2e}"
    );
    Ok(())
}

#[test]
fn sigmoid_matches_trl() -> Result<()> {
    run_case("sigmoid")
}

#[test]
fn ipo_with_precomputed_reference_matches_trl() -> Result<()> {
    run_case("ipo")
}
