//! The CUDA kernels of `gptoss-kernels` against their CPU references, one module per kind of op
//! (feature `cuda`; needs a GPU: `cargo test --release --features cuda -p gptoss-kernels --test
//! cuda`, see docs/cuda.md). The in-module unit tests of the crate cover the rest (grouped
//! matmuls, fused MXFP4 GEMM, flash attention, top-k, dots) on the GPU too.
#![cfg(feature = "cuda")]

mod attention;
mod long_context;
mod lora;
mod moe;
mod norm_rope;
mod routed;

use candle_core::{DType, Tensor};

/// `max |a − b|` over all elements (f32).
fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
