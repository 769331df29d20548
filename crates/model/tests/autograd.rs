//! Backprop through the model w.r.t. adapter `Var`s injected through the hooks (and the router), checked
//! against finite differences; and evidence that the fixtures exercise clamps, sinks and YaRN.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, max_abs, reference, scalar};
use gptoss_model::{
    causal_lm_loss, load, router_aux_loss, ExpertAdapter, ExpertParam, GptOssForCausalLM,
    LinearAdapter, LossReduction,
};

#[derive(Debug)]
struct LinLora {
    a: Var, // [r, in]
    b: Var, // [out, r]
}

impl LinearAdapter for LinLora {
    fn forward(&self, x: &Tensor, base: &Tensor) -> candle_core::Result<Tensor> {
        let d = x
            .broadcast_matmul(&self.a.t()?)?
            .broadcast_matmul(&self.b.t()?)?;
        base + d
    }
}

#[derive(Debug)]
struct ExpLora {
    a: Var, // [E, in, r]
    b: Var, // [E, r, out]
}

impl ExpertAdapter for ExpLora {
    fn delta(&self, e: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.a.get(e)?)?.matmul(&self.b.get(e)?)
    }
}

fn loss(model: &GptOssForCausalLM, ids: &Tensor, labels: &Tensor) -> Tensor {
    let out = model.forward_hidden(ids, None).unwrap();
    let logits = model.lm_head(&out.hidden).unwrap();
    let lm = causal_lm_loss(&logits, labels, LossReduction::Mean).unwrap();
    let aux =
        router_aux_loss(&out.router_logits, model.config().num_experts_per_tok, None).unwrap();
    (lm + (aux * 0.9).unwrap()).unwrap()
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.618 + seed as f64 * 0.37).sin() * std) as f32)
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let name = "tiny-gpt-oss";
    let mut model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let ids = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .narrow(1, 0, 20)
        .unwrap();
    let labels = r["labels"].narrow(1, 0, 20).unwrap();
    let q = Arc::new(LinLora {
        a: randn(&[4, 64], 0.1, 1),
        b: randn(&[64, 4], 0.1, 2),
    });
    let ex = Arc::new(ExpLora {
        a: randn(&[4, 64, 4], 0.1, 3),
        b: randn(&[4, 4, 128], 0.1, 4),
    });
    let dn = Arc::new(ExpLora {
        a: randn(&[4, 64, 4], 0.1, 5),
        b: randn(&[4, 4, 64], 0.1, 6),
    });
    for (n, lin) in model.named_linears_mut() {
        if n == "model.layers.1.self_attn.q_proj" {
            lin.set_adapter(Some(q.clone()));
        }
    }
    for (n, e) in model.named_experts_mut() {
        if n == "model.layers.2.mlp.experts" {
            e.set_adapter(ExpertParam::GateUp, Some(ex.clone()));
            e.set_adapter(ExpertParam::Down, Some(dn.clone()));
        }
    }
    let router = Var::from_tensor(&model.model.layers[3].mlp.router.weight).unwrap();
    model.model.layers[3].mlp.router.weight = router.as_tensor().clone();

    let l = loss(&model, &ids, &labels);
    let grads = l.backward().unwrap();
    let checks: Vec<(&str, &Var)> = vec![
        ("q.a", &q.a),
        ("q.b", &q.b),
        ("gate_up.a", &ex.a),
        ("down.b", &dn.b),
        ("router", &router),
    ];
    for (what, var) in checks {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {what}"));
        let gv: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let (imax, gmax) =
            gv.iter().enumerate().fold(
                (0, 0f32),
                |b, (i, &v)| if v.abs() > b.1.abs() { (i, v) } else { b },
            );
        assert!(gmax.abs() > 1e-6, "{what}: zero gradient");
        let orig: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        let at = |delta: f32| {
            let mut v = orig.clone();
            v[imax] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            scalar(&loss(&model, &ids, &labels))
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(orig, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let rel = (fd - gmax as f64).abs() / (gmax.abs() as f64).max(1e-3);
        assert!(
            rel < 0.05,
            "{what}: backprop {gmax} vs finite difference {fd}"
        );
    }
}

#[test]
fn fixtures_exercise_clamps_sinks_and_yarn() {
    let name = "tiny-gpt-oss";
    let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let want = &r["logits"];
    let mut no_clamp = model.clone();
    for l in &mut no_clamp.model.layers {
        l.mlp.experts.limit = 1e9;
    }
    assert!(
        max_abs(&no_clamp.forward(&ids, None).unwrap(), want) > 1e-2,
        "clamps do not matter"
    );
    let mut no_sinks = model.clone();
    for l in &mut no_sinks.model.layers {
        l.self_attn.sinks = (l.self_attn.sinks.ones_like().unwrap() * -1e4).unwrap();
    }
    assert!(
        max_abs(&no_sinks.forward(&ids, None).unwrap(), want) > 1e-2,
        "sinks do not matter"
    );
    let mut cfg = model.config().clone();
    cfg.rope_scaling.as_mut().unwrap().factor = Some(1.0);
    let plain_rope = GptOssForCausalLM::from_parts(
        cfg,
        model.model.clone(),
        model.lm_head.clone(),
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    assert!(
        max_abs(&plain_rope.forward(&ids, None).unwrap(), want) > 1e-2,
        "YaRN does not matter"
    );
}
