//! Parity with transformers 5.24 on the committed tiny checkpoints (scripts/fixtures/model/make_tiny.py).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs, meta, reference, scalar};
use gptoss_model::{causal_lm_loss, load, router_aux_loss, LossReduction};

const FIXTURES: [&str; 2] = ["tiny-gpt-oss", "tiny-gpt-oss-w128"];

#[test]
fn f32_logits_match_transformers() {
    for name in FIXTURES {
        let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
        let r = reference(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let out = model.forward_hidden(&ids, None).unwrap();
        let logits = model.lm_head(&out.hidden).unwrap();
        let d = max_abs(&logits, &r["logits"]);
        assert!(d <= 1e-4, "{name}: logits max abs diff {d}");
        let router = Tensor::stack(&out.router_logits, 0).unwrap();
        let d = max_abs(&router, &r["router_logits"]);
        assert!(d <= 1e-4, "{name}: router logits max abs diff {d}");
    }
}

#[test]
fn losses_match_transformers() {
    for name in FIXTURES {
        let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
        let r = reference(name);
        let m = meta(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let out = model.forward_hidden(&ids, None).unwrap();
        let logits = model.lm_head(&out.hidden).unwrap();
        let loss = causal_lm_loss(&logits, &r["labels"], LossReduction::Mean).unwrap();
        let want = m["loss_mean"].as_f64().unwrap();
        assert!(
            (scalar(&loss) - want).abs() <= 1e-5,
            "{name}: loss {} vs {want}",
            scalar(&loss)
        );
        let n = m["num_items_in_batch"].as_f64().unwrap();
        let loss = causal_lm_loss(&logits, &r["labels"], LossReduction::SumOver(n)).unwrap();
        let want = m["loss_sum_over_items"].as_f64().unwrap();
        assert!(
            (scalar(&loss) - want).abs() <= 1e-5,
            "{name}: summed loss {} vs {want}",
            scalar(&loss)
        );
        let k = model.config().num_experts_per_tok;
        let aux = router_aux_loss(&out.router_logits, k, None).unwrap();
        let want = m["aux_loss"].as_f64().unwrap();
        assert!(
            (scalar(&aux) - want).abs() <= 1e-5,
            "{name}: aux {} vs {want}",
            scalar(&aux)
        );
    }
}

#[test]
fn bf16_logits_within_bf16_tolerance() {
    for name in FIXTURES {
        let model = load(fixture(name), DType::BF16, &Device::Cpu).unwrap();
        let r = reference(name);
        let m = meta(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let logits = model.forward(&ids, None).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        // transformers' own bf16 model is this far from its f32 model; allow the same order.
        let hf = m["bf16_vs_f32_logits_max_abs"].as_f64().unwrap() as f32;
        let d = max_abs(&logits, &r["logits"]);
        assert!(
            d <= 2.0 * hf + 0.05,
            "{name}: bf16 vs f32 max abs {d} (transformers bf16: {hf})"
        );
        let mean = (&logits - &r["logits"])
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let hf_mean = m["bf16_vs_f32_logits_mean_abs"].as_f64().unwrap() as f32;
        assert!(
            mean <= 2.0 * hf_mean + 0.01,
            "{name}: bf16 mean abs diff {mean} (transformers bf16: {hf_mean})"
        );
        let d16 = max_abs(&logits, &r["logits_bf16"]);
        assert!(
            d16 <= 2.0 * hf + 0.05,
            "{name}: bf16 vs transformers bf16 max abs {d16}"
        );
    }
}

#[test]
fn padded_batch_loss_and_aux_loss_match_transformers() {
    let name = "tiny-gpt-oss";
    let model = load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let m = meta(name);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &r["attention_mask"];
    let out = model.forward_hidden(&ids, Some(mask)).unwrap();
    let logits = model.lm_head(&out.hidden).unwrap();
    let loss = causal_lm_loss(&logits, &r["labels_padded"], LossReduction::Mean).unwrap();
    let want = m["padded_loss_mean"].as_f64().unwrap();
    assert!(
        (scalar(&loss) - want).abs() <= 1e-5,
        "padded loss {} vs {want}",
        scalar(&loss)
    );
    let aux = router_aux_loss(
        &out.router_logits,
        model.config().num_experts_per_tok,
        Some(mask),
    )
    .unwrap();
    let want = m["padded_aux_loss"].as_f64().unwrap();
    assert!(
        (scalar(&aux) - want).abs() <= 1e-5,
        "padded aux {} vs {want}",
        scalar(&aux)
    );
}
