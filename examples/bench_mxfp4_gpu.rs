//! GPU benchmark of MXFP4 dequantization (build with `--features gptoss-mxfp4/cuda`, run on a
//! CUDA machine): one gpt-oss-20b gate_up layer, blocks `[32, 5760, 90, 16]` → bf16
//! `[32, 2880, 5760]` (1.06 GB), in GB/s of output beside a device-to-device copy of the same
//! number of bytes, measured in the same run.
//!
//! Usage: `bench_mxfp4_gpu [--iters N]`

use candle_core::{DType, Device, Tensor};
use gptoss_mxfp4::{dequantize, Layout};
use std::time::Instant;

fn time<F: FnMut() -> candle_core::Result<Tensor>>(
    dev: &Device,
    iters: usize,
    mut f: F,
) -> candle_core::Result<f64> {
    for _ in 0..2 {
        drop(f()?);
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        drop(f()?);
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters = std::env::args()
        .skip_while(|a| a != "--iters")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(20usize);
    if !candle_core::utils::cuda_is_available() {
        println!("built without CUDA support (feature gptoss-mxfp4/cuda); nothing to do");
        return Ok(());
    }
    let dev = Device::new_cuda(0)?;
    let (e, rows, groups) = (32usize, 5760usize, 90usize);
    let nblocks = e * rows * groups;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
    };
    let blocks_host: Vec<u8> = (0..nblocks * 16).map(|_| next()).collect();
    let scales_host: Vec<u8> = (0..nblocks).map(|_| 115 + next() % 24).collect();
    let blocks =
        Tensor::from_vec(blocks_host, (e, rows, groups, 16), &Device::Cpu)?.to_device(&dev)?;
    let scales = Tensor::from_vec(scales_host, (e, rows, groups), &Device::Cpu)?.to_device(&dev)?;
    let out_bytes = (nblocks * 32 * 2) as f64;
    let gbs = |s: f64| out_bytes / s / 1e9;

    let copy_src = Tensor::zeros((e, groups * 32, rows), DType::BF16, &dev)?;
    let t_copy = time(&dev, iters, || copy_src.copy())?;
    println!(
        "gate_up layer, bf16 output {:.3} GB, {iters} iterations each",
        out_bytes / 1e9
    );
    println!(
        "{:<40} {:>9.3} ms {:>8.1} GB/s (output bytes)",
        "device-to-device copy (Tensor::copy)",
        t_copy * 1e3,
        gbs(t_copy)
    );
    for (label, dtype, layout) in [
        (
            "dequant bf16 transposed [E,in,out]",
            DType::BF16,
            Layout::Transposed,
        ),
        (
            "dequant bf16 checkpoint [E,out,in]",
            DType::BF16,
            Layout::Checkpoint,
        ),
        ("dequant f32 transposed", DType::F32, Layout::Transposed),
        ("dequant f16 transposed", DType::F16, Layout::Transposed),
    ] {
        let t = time(&dev, iters, || {
            dequantize(&blocks, &scales, dtype, layout)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })?;
        let bytes = out_bytes * dtype.size_in_bytes() as f64 / 2.0;
        let rate = bytes / t / 1e9;
        println!(
            "{label:<40} {:>9.3} ms {rate:>8.1} GB/s  ({:.0}% of copy rate)",
            t * 1e3,
            100.0 * rate / gbs(t_copy)
        );
    }
    Ok(())
}
