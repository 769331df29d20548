//! The fused RMSNorm and RoPE kernels on CUDA against their CPU references. Needs a CUDA device.

use candle_core::{DType, Device, Tensor, Var};

use super::max_abs;

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
            let y =
                gptoss_kernels::rms_norm(xv.as_tensor(), &w.to_device(d).unwrap(), 1e-5).unwrap();
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
                    gptoss_kernels::rotary_tokens_first(qv.as_tensor(), &c, &s).unwrap()
                } else {
                    gptoss_kernels::rotary(&qv.as_tensor().transpose(1, 2).unwrap(), &c, &s)
                        .unwrap()
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
