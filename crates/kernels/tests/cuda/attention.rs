//! The chunked attention core with sinks on CUDA (flash kernels where they apply) against the
//! candle composition on the CPU: output and the gradients of q, k, v. Needs a CUDA device.

use candle_core::{Device, Tensor, Var};

use super::max_abs;

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
        let a = gptoss_kernels::attention::sink_attention(
            qc.as_tensor(),
            kc.as_tensor(),
            vc.as_tensor(),
            Some(&gptoss_kernels::attention::KeyMask::causal(window)),
            &sinks.to_device(&dev).unwrap(),
            scale,
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
