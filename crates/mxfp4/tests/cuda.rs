//! The CUDA kernel against the scalar CPU reference (feature `cuda`, needs a GPU).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bits, Rng};
use gptoss_mxfp4::{
    dequantize, dequantize_bytes, dequantize_reference, Layout, Mxfp4Shape, OutputElement,
};
use half::{bf16, f16};

fn gpu_bits(t: &Tensor) -> Vec<u32> {
    let t = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => bits(&t.to_vec1::<f32>().unwrap()),
        DType::BF16 => bits(&t.to_vec1::<bf16>().unwrap()),
        _ => bits(&t.to_vec1::<f16>().unwrap()),
    }
}

fn reference_bits(
    blocks: &[u8],
    scales: &[u8],
    shape: &Mxfp4Shape,
    layout: Layout,
    dtype: DType,
) -> Vec<u32> {
    fn r<T: OutputElement>(b: &[u8], s: &[u8], sh: &Mxfp4Shape, l: Layout) -> Vec<u32> {
        bits(&dequantize_reference::<T>(b, s, sh, l).unwrap())
    }
    match dtype {
        DType::F32 => r::<f32>(blocks, scales, shape, layout),
        DType::BF16 => r::<bf16>(blocks, scales, shape, layout),
        _ => r::<f16>(blocks, scales, shape, layout),
    }
}

#[test]
fn cuda_matches_cpu_reference() {
    let dev = Device::new_cuda(0).unwrap();
    let mut rng = Rng::new(77);
    let shapes: &[&[usize]] = &[
        &[1, 1, 16],
        &[2, 70, 3, 16],
        &[3, 130, 5, 16],
        &[2, 67, 2, 16],
        &[1, 256, 16, 16],
        &[4, 128, 9, 16],
    ];
    for dims in shapes {
        let sdims = &dims[..dims.len() - 1];
        let shape = Mxfp4Shape::from_dims(dims, sdims, None).unwrap();
        let blocks = rng.bytes(shape.num_blocks() * 16);
        let scales = rng.bytes(shape.num_blocks());
        let b = Tensor::from_slice(&blocks, *dims, &dev).unwrap();
        let s = Tensor::from_slice(&scales, sdims, &dev).unwrap();
        for layout in [Layout::Checkpoint, Layout::Transposed] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let got = dequantize(&b, &s, dtype, layout).unwrap();
                assert_eq!(got.dims(), shape.output_dims(layout).as_slice());
                let want = reference_bits(&blocks, &scales, &shape, layout, dtype);
                assert_eq!(gpu_bits(&got), want, "{dims:?} {layout:?} {dtype:?}");
                let via_bytes =
                    dequantize_bytes(&blocks, dims, &scales, sdims, dtype, layout, &dev, None)
                        .unwrap();
                assert_eq!(
                    gpu_bits(&via_bytes),
                    want,
                    "bytes {dims:?} {layout:?} {dtype:?}"
                );
            }
        }
    }
    println!("cuda_matches_cpu_reference: OK");
}

/// Every byte value under every scale byte (the fixture grid) on the GPU.
#[test]
fn cuda_all_bytes_all_scales() {
    let dev = Device::new_cuda(0).unwrap();
    let dims = [1usize, 256, 16, 16];
    let shape = Mxfp4Shape::from_dims(&dims, &dims[..3], None).unwrap();
    let blocks: Vec<u8> = (0..256 * 256).map(|i| (i % 256) as u8).collect();
    let scales: Vec<u8> = (0..256 * 16).map(|i| (i / 16) as u8).collect();
    for layout in [Layout::Checkpoint, Layout::Transposed] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let got = dequantize_bytes(
                &blocks,
                &dims,
                &scales,
                &dims[..3],
                dtype,
                layout,
                &dev,
                None,
            )
            .unwrap();
            let want = reference_bits(&blocks, &scales, &shape, layout, dtype);
            assert_eq!(gpu_bits(&got), want, "{layout:?} {dtype:?}");
        }
    }
    println!("cuda_all_bytes_all_scales: OK");
}
