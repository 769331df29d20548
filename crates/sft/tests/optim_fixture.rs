//! AdamW, gradient accumulation and clipping vs torch (fixture: scripts/fixtures/sft/make_adamw_fixture.py).

use candle_core::{Device, Tensor, Var};
use gptoss_sft::optim::{AdamW, AdamWConfig};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[derive(serde::Deserialize)]
struct Meta {
    steps: usize,
    micro: usize,
    lrs: Vec<f64>,
    pre_clip_norms: Vec<f64>,
    weight_decay: f64,
    max_grad_norm: f64,
    params: Vec<String>,
}

fn fixtures() -> (Meta, std::collections::HashMap<String, Tensor>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let meta: Meta =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/adamw.json")).unwrap())
            .unwrap();
    let t =
        candle_core::safetensors::load(format!("{dir}/adamw.safetensors"), &Device::Cpu).unwrap();
    (meta, t)
}

fn build(meta: &Meta, t: &std::collections::HashMap<String, Tensor>) -> AdamW {
    let params = meta
        .params
        .iter()
        .map(|k| {
            (
                k.clone(),
                Var::from_tensor(&t[&format!("init.{k}")]).unwrap(),
            )
        })
        .collect();
    AdamW::new(
        params,
        AdamWConfig {
            weight_decay: meta.weight_decay,
            ..AdamWConfig::default()
        },
    )
    .unwrap()
}

/// Runs optimizer steps `range` of the fixture on `opt`, checking norms and parameters.
fn run_steps(
    opt: &mut AdamW,
    meta: &Meta,
    t: &std::collections::HashMap<String, Tensor>,
    range: std::ops::Range<usize>,
) {
    let vars = opt.vars();
    for step in range {
        let mut grads = opt.gradients();
        for micro in 0..meta.micro {
            // Build a GradStore the way backward() would: grad of sum(var * g) is g.
            let mut loss: Option<Tensor> = None;
            for (k, v) in meta.params.iter().zip(&vars) {
                let g = &t[&format!("grad.{step}.{micro}.{k}")];
                let term = (v.as_tensor() * g).unwrap().sum_all().unwrap();
                loss = Some(match loss {
                    Some(l) => (l + term).unwrap(),
                    None => term,
                });
            }
            let store = loss.unwrap().backward().unwrap();
            grads.accumulate(&vars, &store).unwrap();
        }
        let norm = grads.clip_grad_norm(meta.max_grad_norm).unwrap();
        let want = meta.pre_clip_norms[step];
        assert!(
            ((norm - want) / want).abs() < 1e-6,
            "step {step}: norm {norm} vs {want}"
        );
        opt.step(&grads, meta.lrs[step]).unwrap();
        for (k, v) in meta.params.iter().zip(&vars) {
            let d = max_abs_diff(v.as_tensor(), &t[&format!("param.{step}.{k}")]);
            assert!(d < 2e-6, "step {step} param {k}: max diff {d}");
            // HF's default optimizer is the fused kernel; it must agree as well.
            let f = max_abs_diff(v.as_tensor(), &t[&format!("fused.{step}.{k}")]);
            assert!(f < 2e-6, "step {step} param {k}: max diff {f} vs fused");
            if std::env::var_os("SFT_PRINT_DIFFS").is_some() {
                println!("step {step} {k}: {d:e} (fused {f:e})");
            }
        }
    }
}

#[test]
fn adamw_matches_torch() {
    let (meta, t) = fixtures();
    let mut opt = build(&meta, &t);
    run_steps(&mut opt, &meta, &t, 0..meta.steps);
    assert_eq!(opt.step_count(), meta.steps as u64);
    for k in &meta.params {
        let (m, v) = opt.moments(k).unwrap();
        let dm = max_abs_diff(m, &t[&format!("exp_avg.{k}")]);
        let dv = max_abs_diff(v, &t[&format!("exp_avg_sq.{k}")]);
        assert!(dm < 1e-6 && dv < 1e-6, "{k}: moments diff {dm} {dv}");
    }
}

#[test]
fn state_save_load_resumes_identically() {
    let (meta, t) = fixtures();
    let mut first = build(&meta, &t);
    run_steps(&mut first, &meta, &t, 0..2);
    let dir = tempfile::tempdir().unwrap();
    first.save_state(dir.path(), "optimizer").unwrap();

    // A fresh optimizer over parameters holding the step-2 values, restored from disk.
    let params: Vec<(String, Var)> = meta
        .params
        .iter()
        .map(|k| {
            (
                k.clone(),
                Var::from_tensor(&t[&format!("param.1.{k}")]).unwrap(),
            )
        })
        .collect();
    let mut resumed = AdamW::new(params, AdamWConfig::default()).unwrap();
    resumed.load_state(dir.path(), "optimizer").unwrap();
    assert_eq!(resumed.step_count(), 2);
    assert_eq!(resumed.config().weight_decay, meta.weight_decay);
    run_steps(&mut resumed, &meta, &t, 2..meta.steps);

    // Mismatched parameter names are rejected with the file named.
    let other = vec![(
        "zz".to_string(),
        Var::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )];
    let mut wrong = AdamW::new(other, AdamWConfig::default()).unwrap();
    let err = wrong
        .load_state(dir.path(), "optimizer")
        .unwrap_err()
        .to_string();
    assert!(err.contains("optimizer.json"), "{err}");
}
