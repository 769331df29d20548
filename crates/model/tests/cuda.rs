//! The CPU parity checks repeated on a CUDA device (feature `cuda`; needs a GPU to run).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, max_abs, meta, reference, scalar};
use gptoss_model::{causal_lm_loss, load, router_aux_loss, LossReduction};

#[test]
fn cuda_matches_transformers() {
    let dev = Device::new_cuda(0).unwrap();
    for name in ["tiny-gpt-oss", "tiny-gpt-oss-w128"] {
        let r = reference(name);
        let m = meta(name);
        let ids = r["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let model = load(fixture(name), DType::F32, &dev).unwrap();
        let out = model.forward_hidden(&ids, None).unwrap();
        let logits = model
            .lm_head(&out.hidden)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let d = max_abs(&logits, &r["logits"]);
        println!("{name}: cuda f32 logits max abs diff {d}");
        assert!(d <= 1e-4, "{name}: cuda f32 logits differ by {d}");
        let labels = r["labels"].to_device(&dev).unwrap();
        let loss = causal_lm_loss(
            &model.lm_head(&out.hidden).unwrap(),
            &labels,
            LossReduction::Mean,
        )
        .unwrap();
        let want = m["loss_mean"].as_f64().unwrap();
        println!("{name}: cuda loss {} vs {want}", scalar(&loss));
        assert!((scalar(&loss) - want).abs() <= 1e-4);
        let aux =
            router_aux_loss(&out.router_logits, model.config().num_experts_per_tok, None).unwrap();
        assert!((scalar(&aux) - m["aux_loss"].as_f64().unwrap()).abs() <= 1e-4);
        // KV cache on the device
        let mut cache = model.new_cache();
        let t = ids.dim(1).unwrap();
        let a = model
            .forward_with_cache(&ids.narrow(1, 0, t - 3).unwrap(), None, &mut cache)
            .unwrap();
        let mut parts = vec![a];
        for i in t - 3..t {
            parts.push(
                model
                    .forward_with_cache(&ids.narrow(1, i, 1).unwrap(), None, &mut cache)
                    .unwrap(),
            );
        }
        let cached = Tensor::cat(&parts, 1)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let d = max_abs(&cached, &r["logits"]);
        println!("{name}: cuda kv-cache max abs diff {d}");
        assert!(d <= 1e-4);
        // bf16
        let m16 = load(fixture(name), DType::BF16, &dev).unwrap();
        let l16 = m16
            .forward(&ids, None)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let hf = m["bf16_vs_f32_logits_max_abs"].as_f64().unwrap() as f32;
        let d = max_abs(&l16, &r["logits"]);
        println!("{name}: cuda bf16 max abs diff {d} (transformers bf16 {hf})");
        assert!(d <= 2.0 * hf + 0.05);
        // backward through the router on the device
        let mut mm = model.clone();
        let w = Var::from_tensor(&mm.model.layers[0].mlp.router.weight).unwrap();
        mm.model.layers[0].mlp.router.weight = w.as_tensor().clone();
        let logits = mm.forward(&ids, None).unwrap();
        let loss = causal_lm_loss(&logits, &labels, LossReduction::Mean).unwrap();
        let g = loss.backward().unwrap();
        let gn = g
            .get(w.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(scalar(&gn) > 0.0);
    }
}
