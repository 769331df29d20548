//! The routed MXFP4 matmul (each row its own expert, read on the device) against the candle
//! composition of the same product (the routed experts decoded and gathered per row), on the GPU.

use candle_core::{DType, Device, Result, Tensor};
use gptoss_kernels::grouped::{routed_matmul, routed_matmul_dense, GroupedWeight};

/// Random MXFP4 weights `[E, rows, cols]` (scales 2^-4 .. 2^3), as stored.
fn packed(e: usize, rows: usize, cols: usize, dev: &Device) -> Result<GroupedWeight> {
    GroupedWeight::random_mxfp4((e, rows, cols), 123, 130, dev)
}

fn check(m: usize, k: usize, n: usize, e: usize) -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let w = packed(e, n, k, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(DType::BF16)?;
    let idx: Vec<u32> = (0..m).map(|r| ((r * 7 + 3) % e) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &dev)?;
    let got = routed_matmul(&x, &w, &idx)?.to_dtype(DType::F32)?;
    let want = routed_matmul_dense(&x, &w, &idx)?.to_dtype(DType::F32)?;
    assert_eq!(got.dims(), [m, n]);
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "routed_matmul [{m}, {k}] x [{e}, {k}, {n}]: max abs diff {d} (outputs up to {scale})"
    );
    // both round an f32 accumulation to bf16 once (2^-8 relative), in different orders
    assert!(
        d <= 8e-3 * scale,
        "routed_matmul differs by {d} (outputs up to {scale})"
    );
    Ok(())
}

#[test]
fn cuda_routed_matmul_matches_the_gathered_dense_product() -> Result<()> {
    check(5, 64, 24, 3)?; // fewer columns than a block's 8 warps, odd rows
    check(32, 2880, 5760, 32) // decode at batch 8, gpt-oss-20b gate_up
}

#[test]
fn cuda_routed_matmul_gives_nan_rows_for_an_expert_out_of_range() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let w = packed(2, 8, 32, &dev)?;
    let x = Tensor::ones((2, 32), DType::BF16, &dev)?;
    let idx = Tensor::new(&[1u32, 7], &dev)?;
    let y = routed_matmul(&x, &w, &idx)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    assert!(y[0].iter().all(|v| v.is_finite()));
    assert!(y[1].iter().all(|v| v.is_nan()));
    Ok(())
}
