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
/// 20b head layout (64 query / 8 key-value heads, d 64) with several chunks and a sliding window.
#[test]
fn cuda_sink_attention_matches_cpu_reference() {
    use candle_core::D;
    let dev = Device::new_cuda(0).unwrap();
    let cpu = Device::Cpu;
    let (b, nh, nkv, t, d) = (1usize, 64usize, 8usize, 1100usize, 64usize);
    for window in [None, Some(128usize)] {
        let q = Tensor::randn(0f32, 1.0, (b, nh, t, d), &cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, nkv, t, d), &cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, nkv, t, d), &cpu).unwrap();
        let sinks = Tensor::randn(0f32, 1.0, nh, &cpu).unwrap();
        let go = Tensor::randn(0f32, 1.0, (b, nh, t, d), &cpu).unwrap();
        let mut m = vec![0f32; t * t];
        for i in 0..t {
            for j in 0..t {
                if j > i || window.is_some_and(|w| j + w <= i) {
                    m[i * t + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(m, (1, 1, t, t), &cpu).unwrap();
        let scale = 0.125;
        // CPU reference: full scores, softmax with the sink column through candle ops
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let g = nh / nkv;
        let s = qv
            .as_tensor()
            .reshape((b, nkv, g * t, d))
            .unwrap()
            .matmul(&kv.as_tensor().t().unwrap())
            .unwrap()
            .reshape((b, nh, t, t))
            .unwrap();
        let s = (s * scale).unwrap().broadcast_add(&mask).unwrap();
        let sk = sinks.reshape((1, nh, 1, 1)).unwrap();
        let mx = s
            .max_keepdim(D::Minus1)
            .unwrap()
            .broadcast_maximum(&sk)
            .unwrap()
            .detach();
        let e = s.broadcast_sub(&mx).unwrap().exp().unwrap();
        let es = sk.broadcast_sub(&mx).unwrap().exp().unwrap();
        let p = e
            .broadcast_div(&(e.sum_keepdim(D::Minus1).unwrap() + es).unwrap())
            .unwrap();
        let r = p
            .reshape((b, nkv, g * t, t))
            .unwrap()
            .matmul(vv.as_tensor())
            .unwrap()
            .reshape((b, nh, t, d))
            .unwrap();
        let gr = (&r * &go).unwrap().sum_all().unwrap().backward().unwrap();
        // CUDA chunked core
        let to = |x: &Tensor| Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
        let (qc, kc, vc) = (to(&q), to(&k), to(&v));
        let a = gptoss_model::sink_attention(
            qc.as_tensor(),
            kc.as_tensor(),
            vc.as_tensor(),
            Some(&mask.to_device(&dev).unwrap()),
            &sinks.to_device(&dev).unwrap(),
            scale,
            window,
        )
        .unwrap();
        let d0 = max_abs(&a.to_device(&cpu).unwrap(), &r);
        let ga = (&a * &go.to_device(&dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        println!("window {window:?}: cuda chunked attention max abs diff {d0}");
        assert!(d0 <= 1e-4, "window {window:?}: output differs by {d0}");
        for (name, xc, xr) in [("q", &qc, &qv), ("k", &kc, &kv), ("v", &vc, &vv)] {
            let a = ga.get(xc.as_tensor()).unwrap().to_device(&cpu).unwrap();
            let r = gr.get(xr.as_tensor()).unwrap();
            let dd = max_abs(&a, r);
            println!("window {window:?}: d{name} max abs diff {dd}");
            assert!(dd <= 1e-3, "window {window:?}: d{name} differs by {dd}");
        }
    }
}

/// The fused RMSNorm and RoPE kernels against their CPU implementations (values and gradients),
/// f32 and bf16, RoPE on the transposed view the attention feeds it.
#[test]
fn cuda_fused_norm_and_rotary_match_cpu() {
    let dev = Device::new_cuda(0).unwrap();
    let cpu = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        // RMSNorm [2, 300, 2880]
        let x = Tensor::randn(0f32, 2.0, (2, 300, 2880), &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = Tensor::randn(1f32, 0.2, 2880, &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 300, 2880), &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let run = |d: &Device| {
            let xv = Var::from_tensor(&x.to_device(d).unwrap()).unwrap();
            let y = gptoss_model::rms_norm(xv.as_tensor(), &w.to_device(d).unwrap(), 1e-5).unwrap();
            let gs = (y.to_dtype(DType::F32).unwrap()
                * g.to_device(d).unwrap().to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
            let dx = gs.get(xv.as_tensor()).unwrap().to_device(&cpu).unwrap();
            (y.to_device(&cpu).unwrap(), dx)
        };
        let (yc, dc) = run(&cpu);
        let (yg, dg) = run(&dev);
        let (e1, e2) = (max_abs(&yg, &yc), max_abs(&dg, &dc));
        println!("{dtype:?}: rms_norm cuda vs cpu: y {e1}, dx {e2}");
        assert!(
            e1 <= tol * 4.0 && e2 <= tol * 4.0,
            "{dtype:?}: rms_norm differs: {e1} {e2}"
        );
        // RoPE on [B, T, nh, d] → view [B, nh, T, d]
        let q = Tensor::randn(0f32, 1.0, (2, 300, 64, 64), &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let ang = Tensor::randn(0f32, 3.0, (2, 1, 300, 32), &cpu).unwrap();
        let (cos, sin) = (
            ang.cos().unwrap().to_dtype(dtype).unwrap(),
            ang.sin().unwrap().to_dtype(dtype).unwrap(),
        );
        let gq = Tensor::randn(0f32, 1.0, (2, 64, 300, 64), &cpu).unwrap();
        // the transposed view, and the token-major variant reading q as it is
        for token_major in [false, true] {
            let run = |d: &Device| {
                let qv = Var::from_tensor(&q.to_device(d).unwrap()).unwrap();
                let (c, s) = (cos.to_device(d).unwrap(), sin.to_device(d).unwrap());
                let y = if token_major {
                    gptoss_model::rotary_tokens_first(qv.as_tensor(), &c, &s).unwrap()
                } else {
                    gptoss_model::rotary(&qv.as_tensor().transpose(1, 2).unwrap(), &c, &s).unwrap()
                };
                let gs = (y.to_dtype(DType::F32).unwrap() * gq.to_device(d).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let dq = gs.get(qv.as_tensor()).unwrap().to_device(&cpu).unwrap();
                (y.to_device(&cpu).unwrap(), dq)
            };
            let (yc, dc) = run(&cpu);
            let (yg, dg) = run(&dev);
            let (e1, e2) = (max_abs(&yg, &yc), max_abs(&dg, &dc));
            println!("{dtype:?} token-major {token_major}: rotary cuda vs cpu: y {e1}, dq {e2}");
            assert!(e1 == 0.0, "{dtype:?}: rotary forward differs by {e1}");
            assert!(e2 <= tol, "{dtype:?}: rotary gradient differs by {e2}");
            assert_eq!(dg.dims(), q.dims(), "the gradient has q's shape");
        }
    }
}

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
