//! The fast CPU kernels and the candle entry points against the scalar reference.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bits, Rng};
use gptoss_mxfp4::{
    dequantize, dequantize_into, dequantize_reference, dequantize_to_vec, Layout, Mxfp4Shape,
    OutputElement,
};
use half::{bf16, f16};

const SHAPES: &[&[usize]] = &[
    &[1, 1, 16],
    &[3, 2, 16],
    &[2, 70, 3, 16],
    &[3, 130, 5, 16],
    &[2, 1, 64, 1, 16],
    &[1, 2, 9, 16],
];

fn check_type<T: OutputElement>(seed: u64) {
    let mut rng = Rng::new(seed);
    for dims in SHAPES {
        let sdims = &dims[..dims.len() - 1];
        let shape = Mxfp4Shape::from_dims(dims, sdims, None).unwrap();
        let blocks = rng.bytes(shape.num_blocks() * 16);
        let scales = rng.bytes(shape.num_blocks());
        for layout in [Layout::Checkpoint, Layout::Transposed] {
            let want = dequantize_reference::<T>(&blocks, &scales, &shape, layout).unwrap();
            let got = dequantize_to_vec::<T>(&blocks, &scales, &shape, layout).unwrap();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{dims:?} {layout:?} {:?}",
                T::DTYPE
            );
            let mut buf = vec![T::ZERO; shape.num_values()];
            dequantize_into(&blocks, &scales, &shape, layout, &mut buf).unwrap();
            assert_eq!(bits(&buf), bits(&want));
        }
    }
}

#[test]
fn fast_kernel_matches_reference_f32() {
    check_type::<f32>(1);
}

#[test]
fn fast_kernel_matches_reference_bf16() {
    check_type::<bf16>(2);
}

#[test]
fn fast_kernel_matches_reference_f16() {
    check_type::<f16>(3);
}

/// The reference layout rule itself, spelled out for one element of a transposed
/// `[E, out, in/32, 16]` tensor (reference.md §3):
/// `param[e, i, o] = FP4[nib(blocks[e, o, i/32, (i%32)/2], i%2)] · 2^(scales[e, o, i/32] − 127)`.
#[test]
fn transposed_index_formula() {
    let (e_, o_, g_) = (2, 5, 3);
    let mut rng = Rng::new(9);
    let blocks = rng.bytes(e_ * o_ * g_ * 16);
    let scales: Vec<u8> = rng
        .bytes(e_ * o_ * g_)
        .iter()
        .map(|s| 110 + s % 30)
        .collect();
    let b = Tensor::from_vec(blocks.clone(), (e_, o_, g_, 16), &Device::Cpu).unwrap();
    let s = Tensor::from_vec(scales.clone(), (e_, o_, g_), &Device::Cpu).unwrap();
    let p = dequantize(&b, &s, DType::F32, Layout::Transposed).unwrap();
    assert_eq!(p.dims(), &[e_, g_ * 32, o_]);
    let p = p.to_vec3::<f32>().unwrap();
    let fp4 = gptoss_mxfp4::format::FP4_VALUES;
    for (e, pe) in p.iter().enumerate() {
        for (i, pi) in pe.iter().enumerate() {
            for (o, &got) in pi.iter().enumerate() {
                let blk = (e * o_ + o) * g_ + i / 32;
                let byte = blocks[blk * 16 + (i % 32) / 2];
                let nib = if i % 2 == 0 { byte & 15 } else { byte >> 4 };
                let want = fp4[nib as usize] * 2f32.powi(i32::from(scales[blk]) - 127);
                assert_eq!(got.to_bits(), want.to_bits(), "e={e} i={i} o={o}");
            }
        }
    }
}

#[test]
fn candle_entry_point_all_dtypes_and_noncontiguous_input() {
    let mut rng = Rng::new(4);
    let dims = [2usize, 33, 4, 16];
    let shape = Mxfp4Shape::from_dims(&dims, &dims[..3], None).unwrap();
    let blocks = rng.bytes(shape.num_blocks() * 16);
    let scales = rng.bytes(shape.num_blocks());
    let b = Tensor::from_vec(blocks.clone(), &dims, &Device::Cpu).unwrap();
    let s = Tensor::from_vec(scales.clone(), &dims[..3], &Device::Cpu).unwrap();
    for layout in [Layout::Checkpoint, Layout::Transposed] {
        let want = dequantize_reference::<f32>(&blocks, &scales, &shape, layout).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = dequantize(&b, &s, dtype, layout).unwrap();
            assert_eq!(t.dtype(), dtype);
            assert_eq!(t.dims(), shape.output_dims(layout).as_slice());
            let got = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want_t: Vec<f32> = match dtype {
                DType::F32 => want.clone(),
                DType::BF16 => dequantize_reference::<bf16>(&blocks, &scales, &shape, layout)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
                _ => dequantize_reference::<f16>(&blocks, &scales, &shape, layout)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
            };
            let g: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            let w: Vec<u32> = want_t.iter().map(|v| v.to_bits()).collect();
            assert_eq!(g, w, "{dtype:?} {layout:?}");
        }
    }
    // A non-contiguous input: the same bytes seen through a transpose.
    let bt = b
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    assert!(!bt.is_contiguous());
    let t1 = dequantize(&bt, &s, DType::F32, Layout::Transposed).unwrap();
    let t0 = dequantize(&b, &s, DType::F32, Layout::Transposed).unwrap();
    let (v1, v0) = (
        t1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        t0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(bits(&v1), bits(&v0));
}
