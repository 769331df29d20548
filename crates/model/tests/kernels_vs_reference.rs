//! The kernels of `gptoss-kernels` against the model's reference ops (the candle compositions that
//! the transformers parity fixtures pin): fused RMSNorm and RoPE, and the deferred MoE backward
//! against the plain autograd graph of a MoE layer.

use candle_core::{DType, Device, Module, Tensor, Var};
use gptoss_kernels::{rms_norm, rotary, rotary_tokens_first, seed_gradient};
use gptoss_model::{apply_rotary, init_random, init_random_packed, Config, RmsNorm, RouteReplay};

/// `max |a − b| / max(1, max |b|)` over all elements (f32).
fn rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(d / s)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    rel_diff(a, b).unwrap_or(f32::INFINITY)
}

#[test]
fn rms_norm_matches_reference_values_and_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 5, 96), &dev)?)?;
    let w = Tensor::randn(1f32, 0.3, 96, &dev)?;
    let g = Tensor::randn(0f32, 1.0, (2, 5, 96), &dev)?;
    let r = RmsNorm::new(w.clone(), 1e-5).forward(x.as_tensor())?;
    let a = rms_norm(x.as_tensor(), &w, 1e-5)?;
    assert!(max_diff(&a, &r) < 1e-6, "forward {}", max_diff(&a, &r));
    let gr = (&r * &g)?.sum_all()?.backward()?;
    let ga = (&a * &g)?.sum_all()?.backward()?;
    let (Some(p), Some(q)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
        panic!("missing gradient")
    };
    assert!(max_diff(p, q) < 1e-5, "gradient {}", max_diff(p, q));
    // bf16: the same bits as the reference ops
    let xb = x.as_tensor().to_dtype(DType::BF16)?;
    let rb = RmsNorm::new(w.to_dtype(DType::BF16)?, 1e-5).forward(&xb)?;
    let ab = rms_norm(&xb, &w.to_dtype(DType::BF16)?, 1e-5)?;
    // one bf16 ulp (2^-8 relative) for sums in another order
    assert!(
        max_diff(&ab, &rb) <= 1.0 / 128.0,
        "bf16 forward {}",
        max_diff(&ab, &rb)
    );
    Ok(())
}

#[test]
fn rotary_matches_reference_values_and_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, t, nh, d) = (2, 6, 3, 8);
    // the transposed view of a [B, T, nh, d] projection, as in attention
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh, d), &dev)?)?;
    let xv = x.as_tensor().transpose(1, 2)?;
    let ang = Tensor::randn(0f32, 2.0, (b, 1, t, d / 2), &dev)?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    let g = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?;
    let r = apply_rotary(&xv, &cos, &sin)?;
    let a = rotary(&xv, &cos, &sin)?;
    assert!(max_diff(&a, &r) < 1e-6, "forward {}", max_diff(&a, &r));
    let gr = (&r * &g)?.sum_all()?.backward()?;
    let ga = (&a * &g)?.sum_all()?.backward()?;
    let (Some(p), Some(q)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
        panic!("missing gradient")
    };
    assert!(max_diff(p, q) < 1e-5, "gradient {}", max_diff(p, q));
    // bf16 forward: bit-identical to the reference ops (rounding of every operation)
    let (xb, cb, sb) = (
        xv.to_dtype(DType::BF16)?,
        cos.to_dtype(DType::BF16)?,
        sin.to_dtype(DType::BF16)?,
    );
    let d0 = max_diff(&rotary(&xb, &cb, &sb)?, &apply_rotary(&xb, &cb, &sb)?);
    assert!(d0 == 0.0, "bf16 forward differs by {d0}");
    Ok(())
}

#[test]
fn token_major_rotary_equals_rotary_of_the_transpose() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, t, nh, d) = (2, 5, 3, 8);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh, d), &dev)?)?;
    let ang = Tensor::randn(0f32, 2.0, (1, 1, t, d / 2), &dev)?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    let g = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?;
    let r = apply_rotary(&x.as_tensor().transpose(1, 2)?, &cos, &sin)?;
    let a = rotary_tokens_first(x.as_tensor(), &cos, &sin)?;
    assert_eq!(a.dims(), &[b, nh, t, d]);
    assert!(a.is_contiguous());
    assert!(max_diff(&a, &r) < 1e-6, "forward {}", max_diff(&a, &r));
    let gr = (&r * &g)?.sum_all()?.backward()?;
    let ga = (&a * &g)?.sum_all()?.backward()?;
    let (Some(p), Some(q)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
        panic!("missing gradient")
    };
    assert_eq!(p.dims(), &[b, t, nh, d]);
    assert!(max_diff(p, q) < 1e-5, "gradient {}", max_diff(p, q));
    let (xb, cb, sb) = (
        x.as_tensor().to_dtype(DType::BF16)?,
        cos.to_dtype(DType::BF16)?,
        sin.to_dtype(DType::BF16)?,
    );
    let d0 = max_diff(
        &rotary_tokens_first(&xb, &cb, &sb)?,
        &apply_rotary(&xb.transpose(1, 2)?, &cb, &sb)?,
    );
    assert!(d0 == 0.0, "bf16 forward differs by {d0}");
    Ok(())
}

/// `[1, n, h]` values with a fixed pattern (`shift` changes every value).
fn pattern(n: usize, h: usize, shift: f32) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..n * h)
        .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * (1.0 + shift) + shift)
        .collect();
    Tensor::from_vec(v, (1, n, h), &Device::Cpu)
}

#[test]
fn deferred_gradient_equals_the_plain_graph_for_every_chunk_size() -> gptoss_model::Result<()> {
    let cfg = Config::tiny();
    let (n, h) = (13, cfg.hidden_size);
    let x0 = pattern(n, h, 0.1)?;
    let g = pattern(n, h, -0.3)?;
    for packed in [false, true] {
        let model = match packed {
            true => init_random_packed(&cfg, DType::F32, &Device::Cpu, Some(5))?,
            false => init_random(&cfg, DType::F32, &Device::Cpu, Some(5))?,
        };
        let mut mlp = model.model.layers[0].mlp.clone();
        // the plain graph: recompute with autograd through every op
        let x = Var::from_tensor(&x0)?;
        let (y, _) = mlp.forward(x.as_tensor())?;
        let grads = seed_gradient(&y, &g)?.backward()?;
        let Some(reference) = grads.get(x.as_tensor()).cloned() else {
            panic!("no plain gradient");
        };
        for chunk in [1, 2, 3, cfg.num_local_experts] {
            mlp.experts.set_backward_chunk(chunk);
            let replay = RouteReplay::record();
            mlp.forward(&x0)?;
            replay.replaying_for_gradients();
            let x = Var::from_tensor(&x0)?;
            let (y, _) = mlp.forward(x.as_tensor())?;
            // the deferred forward computes nothing
            assert_eq!(y.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            let grads = seed_gradient(&y, &g)?.backward()?;
            replay.verify()?;
            let Some(got) = grads.get(x.as_tensor()) else {
                panic!("no deferred gradient (chunk {chunk})");
            };
            let d = rel_diff(got, &reference)?;
            assert!(
                d < 1e-5,
                "packed {packed}, chunk {chunk}: input gradient differs by {d}"
            );
        }
    }
    Ok(())
}
