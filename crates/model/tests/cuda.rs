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

/// The chunked attention core (used on CUDA) against the reference ops on the CPU, f32, at the
/// The vendored candle-core's vectorized bf16 add/sub/mul (contiguous operands of one shape)
/// against candle's generic kernel (reached through transposed, non-contiguous views): bit for
/// bit, over operands whose magnitudes span 1e-6 to 1e6 (exponent gaps, cancellation, ties).
#[test]
fn cuda_vectorized_bf16_binary_ops_match_the_generic_kernel() {
    let dev = Device::new_cuda(0).unwrap();
    let cpu = Device::Cpu;
    let (r, c) = (64usize, 96usize);
    let mk = |seed: u64| {
        let v: Vec<f32> = (0..r * c)
            .map(|i| {
                let h = (i as u64 * 2_654_435_761 + seed * 97) % 1_000_003;
                let m = h as f32 / 1_000_003.0 * 2.0 - 1.0;
                m * 10f32.powi((h % 13) as i32 - 6)
            })
            .collect();
        Tensor::from_vec(v, (r, c), &cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(&dev)
            .unwrap()
    };
    let (a, b) = (mk(1), mk(2));
    // a few exact cancellations and equal operands
    let a = Tensor::cat(
        &[&a.narrow(0, 0, 8).unwrap(), &a.narrow(0, 8, r - 8).unwrap()],
        0,
    )
    .unwrap();
    let b = Tensor::cat(
        &[&a.narrow(0, 0, 8).unwrap(), &b.narrow(0, 8, r - 8).unwrap()],
        0,
    )
    .unwrap();
    let bits = |t: &Tensor| -> Vec<u16> {
        t.to_device(&cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    type Op = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let ops: [(&str, Op); 3] = [
        ("add", |x, y| x.add(y)),
        ("sub", |x, y| x.sub(y)),
        ("mul", |x, y| x.mul(y)),
    ];
    for (name, op) in ops {
        let fast = op(&a, &b).unwrap();
        let generic = op(&a.t().unwrap(), &b.t().unwrap())
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        let (f, g) = (bits(&fast), bits(&generic));
        let differ = f.iter().zip(&g).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{name}: {differ} of {} values differ", f.len());
    }
}

/// Decode through the KV cache with MXFP4-resident experts in bf16: the MoE then routes on the
/// device (few rows; `gptoss_kernels::grouped::routed_matmul`). Its logits must be those of the
/// host-planned path (`GPTOSS_ROUTED_MATMUL=0`) and of the full forward, within bf16 rounding.
#[test]
fn cuda_decode_with_device_side_routing_matches_the_host_planned_path() {
    use gptoss_model::{init_random_packed, Config};
    let dev = Device::new_cuda(0).unwrap();
    let cfg = Config::tiny();
    let model = init_random_packed(&cfg, DType::BF16, &dev, Some(3)).unwrap();
    let t = 12;
    let ids: Vec<u32> = (0..t as u32).map(|i| (i * 37 + 5) % 512).collect();
    let ids = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = model
        .forward(&ids, None)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let decode = |mode: &str| {
        std::env::set_var("GPTOSS_ROUTED_MATMUL", mode);
        let mut cache = model.new_cache();
        let mut parts = vec![model
            .forward_with_cache(&ids.narrow(1, 0, 8).unwrap(), None, &mut cache)
            .unwrap()];
        for i in 8..t {
            parts.push(
                model
                    .forward_with_cache(&ids.narrow(1, i, 1).unwrap(), None, &mut cache)
                    .unwrap(),
            );
        }
        std::env::remove_var("GPTOSS_ROUTED_MATMUL");
        Tensor::cat(&parts, 1)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let device_routed = decode("1");
    let host_planned = decode("0");
    let scale = full
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let a = max_abs(&device_routed, &host_planned);
    let b = max_abs(&device_routed, &full);
    let c = max_abs(&host_planned, &full);
    println!("device-routed vs host-planned {a}, vs full forward {b} (host-planned vs full {c}; logits up to {scale})");
    assert!(
        a <= 0.02 * scale + 1e-3,
        "device-routed vs host-planned {a}"
    );
    assert!(
        b <= 2.0 * c + 0.02 * scale + 1e-3,
        "device-routed vs full forward {b}"
    );
}
