//! Property tests: random blocks/scales against the scalar reference, and the round trip
//! `quantize(dequantize(q)) == q` for valid `q` (definition in the crate docs).

mod common;

use candle_core::{DType, Device, Tensor};
use common::bits;
use gptoss_mxfp4::format::{exact_value, FP4_VALUES};
use gptoss_mxfp4::{
    dequantize, dequantize_reference, dequantize_to_vec, quantize, quantize_named, Layout,
    Mxfp4Shape,
};
use half::{bf16, f16};
use proptest::prelude::*;

/// (blocks dims, blocks bytes, scale bytes), any values.
fn packed() -> impl Strategy<Value = (Vec<usize>, Vec<u8>, Vec<u8>)> {
    (1usize..4, 1usize..80, 1usize..5).prop_flat_map(|(e, rows, groups)| {
        let n = e * rows * groups;
        (
            Just(vec![e, rows, groups, 16]),
            proptest::collection::vec(any::<u8>(), n * 16),
            proptest::collection::vec(any::<u8>(), n),
        )
    })
}

/// One valid block: scale 1..=252 with at least one nibble of magnitude 4 or 6, or scale 0 with
/// only ±0 nibbles.
fn valid_block() -> impl Strategy<Value = (Vec<u8>, u8)> {
    prop_oneof![
        4 => (1u8..=252, proptest::collection::vec(0u8..16, 32), 0usize..32, 6u8..8, any::<bool>()).prop_map(
            |(scale, mut nibs, pos, mag, neg)| {
                nibs[pos] = mag | if neg { 8 } else { 0 };
                (pack(&nibs), scale)
            }
        ),
        1 => proptest::collection::vec(prop_oneof![Just(0u8), Just(8u8)], 32).prop_map(|nibs| (pack(&nibs), 0u8)),
    ]
}

fn pack(nibs: &[u8]) -> Vec<u8> {
    nibs.chunks_exact(2).map(|p| p[0] | (p[1] << 4)).collect()
}

fn valid_packed() -> impl Strategy<Value = (Vec<usize>, Vec<u8>, Vec<u8>)> {
    (1usize..3, 1usize..20, 1usize..4).prop_flat_map(|(e, rows, groups)| {
        proptest::collection::vec(valid_block(), e * rows * groups).prop_map(move |bl| {
            let blocks = bl.iter().flat_map(|(b, _)| b.clone()).collect();
            let scales = bl.iter().map(|(_, s)| *s).collect();
            (vec![e, rows, groups, 16], blocks, scales)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fast_kernel_equals_reference((dims, blocks, scales) in packed(), transposed in any::<bool>()) {
        let shape = Mxfp4Shape::from_dims(&dims, &dims[..3], None).unwrap();
        let layout = if transposed { Layout::Transposed } else { Layout::Checkpoint };
        prop_assert_eq!(
            bits(&dequantize_to_vec::<bf16>(&blocks, &scales, &shape, layout).unwrap()),
            bits(&dequantize_reference::<bf16>(&blocks, &scales, &shape, layout).unwrap())
        );
        prop_assert_eq!(
            bits(&dequantize_to_vec::<f32>(&blocks, &scales, &shape, layout).unwrap()),
            bits(&dequantize_reference::<f32>(&blocks, &scales, &shape, layout).unwrap())
        );
        prop_assert_eq!(
            bits(&dequantize_to_vec::<f16>(&blocks, &scales, &shape, layout).unwrap()),
            bits(&dequantize_reference::<f16>(&blocks, &scales, &shape, layout).unwrap())
        );
    }

    #[test]
    fn roundtrip_valid_blocks((dims, blocks, scales) in valid_packed()) {
        let b = Tensor::from_vec(blocks.clone(), dims.as_slice(), &Device::Cpu).unwrap();
        let s = Tensor::from_vec(scales.clone(), &dims[..3], &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let dense = dequantize(&b, &s, dtype, Layout::Checkpoint).unwrap();
            let (qb, qs) = quantize(&dense).unwrap();
            prop_assert_eq!(qs.flatten_all().unwrap().to_vec1::<u8>().unwrap(), scales.clone());
            prop_assert_eq!(qb.flatten_all().unwrap().to_vec1::<u8>().unwrap(), blocks.clone());
            // The parameter layout round-trips through quantize_named(.., Transposed).
            let param = dequantize(&b, &s, dtype, Layout::Transposed).unwrap();
            let (qb, qs) = quantize_named(&param, Layout::Transposed, None).unwrap();
            prop_assert_eq!(qs.flatten_all().unwrap().to_vec1::<u8>().unwrap(), scales.clone());
            prop_assert_eq!(qb.flatten_all().unwrap().to_vec1::<u8>().unwrap(), blocks.clone());
        }
    }

    /// Quantizing normal-range data: the largest nibble is 3, 4 or 6, and each value comes back as the FP4
    /// grid point the triton rule picks: within half a grid step (or saturated at 6·scale).
    #[test]
    fn quantize_properties(x in proptest::collection::vec(-1.0e6f32..1.0e6, 64), exp in -100i32..100) {
        let x: Vec<f32> = x.iter().map(|v| v * 2f32.powi(exp)).collect();
        prop_assume!(x.iter().any(|v| v.abs() > 1e-30));
        let t = Tensor::from_vec(x.clone(), (2, 32), &Device::Cpu).unwrap();
        let (b, s) = quantize(&t).unwrap();
        let blocks = b.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let scales = s.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        for (blk, (&scale, xs)) in blocks.chunks(16).zip(scales.iter().zip(x.chunks(32))) {
            let nibs: Vec<u8> = blk.iter().flat_map(|b| [b & 15, b >> 4]).collect();
            if xs.iter().all(|v| *v == 0.0) {
                prop_assert_eq!(scale, 0);
                continue;
            }
            prop_assert!((1..=252).contains(&scale));
            // amax / scale lies in (3, 6]: it rounds to 3, 4 or 6.
            prop_assert!(nibs.iter().any(|n| n & 7 >= 5));
            for (&n, &v) in nibs.iter().zip(xs) {
                let q = exact_value(n, scale);
                let unit = exact_value(1, scale); // 0.5 · 2^(s-127): the largest half-step is 1 · that
                prop_assert!((q - f64::from(v)).abs() <= 2.0 * unit + 1e-300, "{} -> {}", v, q);
                prop_assert_eq!(FP4_VALUES[n as usize].is_sign_negative(), v.is_sign_negative());
            }
        }
        // Re-encoding the decoded values gives the same values (maybe other bytes).
        let d1 = dequantize(&b, &s, DType::F32, Layout::Checkpoint).unwrap();
        let (b2, s2) = quantize(&d1).unwrap();
        let d2 = dequantize(&b2, &s2, DType::F32, Layout::Checkpoint).unwrap();
        prop_assert_eq!(
            bits(&d1.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
            bits(&d2.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        );
    }
}
