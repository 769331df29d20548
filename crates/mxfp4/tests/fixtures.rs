//! Against vectors made by transformers' own `convert_moe_packed_tensors` and triton_kernels'
//! `downcast_to_mxfp_torch` (scripts/fixtures/mxfp4/make_fixtures.py).

mod common;

use candle_core::{DType, Device, Tensor};
use common::bits;
use gptoss_mxfp4::{
    dequantize, dequantize_to_vec, dequantize_views, dequantize_views_into, quantize, Layout,
    Mxfp4Shape, OutputElement,
};
use half::{bf16, f16};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn u8s(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn fnv1a64(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

/// The all-bytes × all-scales grid, in the layout of the fixture: blocks `[1, 256, 16, 16]`,
/// row `s` has scale `s` and the bytes `0..=255` in order.
fn grid() -> (Vec<u8>, Vec<u8>, Mxfp4Shape) {
    let blocks: Vec<u8> = (0..256 * 256).map(|i| (i % 256) as u8).collect();
    let scales: Vec<u8> = (0..256 * 16).map(|i| (i / 16) as u8).collect();
    let shape = Mxfp4Shape::from_dims(&[1, 256, 16, 16], &[1, 256, 16], None).unwrap();
    (blocks, scales, shape)
}

fn check_grid<T: OutputElement>(key: &str, width: usize) {
    let fx = load("dequant_all_bytes_all_scales.json");
    let table: Vec<Vec<u32>> = fx[key]["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(u32s)
        .collect();
    let (blocks, scales, shape) = grid();
    // Checkpoint layout: element [s, j] of row s.
    let got = bits(&dequantize_to_vec::<T>(&blocks, &scales, &shape, Layout::Checkpoint).unwrap());
    for s in 0..256 {
        for j in 0..512 {
            let byte = j / 2;
            let nib = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
            assert_eq!(
                got[s * 512 + j],
                table[s][nib],
                "{key}: scale {s} nibble {nib}: got {:#x}, transformers {:#x}",
                got[s * 512 + j],
                table[s][nib]
            );
        }
    }
    // Transposed layout: the whole tensor transformers returned, by hash.
    let got = bits(&dequantize_to_vec::<T>(&blocks, &scales, &shape, Layout::Transposed).unwrap());
    let hash = fnv1a64(
        got.iter()
            .flat_map(|v| v.to_le_bytes().into_iter().take(width)),
    );
    assert_eq!(
        format!("{hash:016x}"),
        fx[key]["fnv1a64"].as_str().unwrap(),
        "{key}"
    );
}

#[test]
fn all_bytes_all_scales_f32() {
    check_grid::<f32>("f32", 4);
}

#[test]
fn all_bytes_all_scales_bf16() {
    check_grid::<bf16>("bf16", 2);
}

#[test]
fn all_bytes_all_scales_f16() {
    check_grid::<f16>("f16", 2);
}

/// Scale 255 is 2^128 (not NaN), zeros stay signed zeros, large products overflow to inf.
#[test]
fn special_scales_documented_behaviour() {
    let fx = load("dequant_all_bytes_all_scales.json");
    let t = |k: &str, s: usize, n: usize| fx[k]["table"][s][n].as_u64().unwrap() as u32;
    assert_eq!(f32::from_bits(t("f32", 255, 1)), 2f32.powi(127)); // 0.5 · 2^128
    assert_eq!(t("f32", 255, 0), 0); // +0 · 2^128 = +0, not NaN
    assert_eq!(t("f32", 255, 8), 0x8000_0000); // -0
    assert_eq!(f32::from_bits(t("f32", 255, 2)), f32::INFINITY);
    assert_eq!(f32::from_bits(t("f32", 254, 4)), f32::INFINITY); // 2 · 2^127
    assert_eq!(f32::from_bits(t("f32", 253, 7)), f32::INFINITY); // 6 · 2^126
    assert_eq!(f32::from_bits(t("f32", 253, 5)), 1.5 * 2f32.powi(127));
    assert_eq!(f32::from_bits(t("f32", 0, 1)), 2f32.powi(-128)); // subnormal, exact
}

#[test]
fn layouts_match_transformers() {
    let fx = load("dequant_layouts.json");
    for case in fx["cases"].as_array().unwrap() {
        let dims = usizes(&case["blocks_dims"]);
        let blocks = u8s(&case["blocks"]);
        let scales = u8s(&case["scales"]);
        let b = Tensor::from_vec(blocks, dims.as_slice(), &Device::Cpu).unwrap();
        let s = Tensor::from_vec(scales, &dims[..dims.len() - 1], &Device::Cpu).unwrap();
        for (key, dtype) in [
            ("f32", DType::F32),
            ("bf16", DType::BF16),
            ("f16", DType::F16),
        ] {
            let t = dequantize(&b, &s, dtype, Layout::Transposed).unwrap();
            assert_eq!(t.dims(), usizes(&case["output_dims"]).as_slice());
            let t = t.flatten_all().unwrap();
            let got = match dtype {
                DType::F32 => bits(&t.to_vec1::<f32>().unwrap()),
                DType::BF16 => bits(&t.to_vec1::<bf16>().unwrap()),
                _ => bits(&t.to_vec1::<f16>().unwrap()),
            };
            assert_eq!(got, u32s(&case[key]), "{dims:?} {key}");
        }
    }
}

/// The same fixture through safetensors views (as from a memory-mapped checkpoint).
#[test]
fn layouts_match_transformers_via_safetensors_views() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let fx = load("dequant_layouts.json");
    for case in fx["cases"].as_array().unwrap() {
        let dims = usizes(&case["blocks_dims"]);
        let blocks = u8s(&case["blocks"]);
        let scales = u8s(&case["scales"]);
        let bv = TensorView::new(Dtype::U8, dims.clone(), &blocks).unwrap();
        let sv = TensorView::new(Dtype::U8, dims[..dims.len() - 1].to_vec(), &scales).unwrap();
        let name = Some("model.layers.3.mlp.experts.down_proj_blocks");
        let t = dequantize_views(
            &bv,
            &sv,
            DType::BF16,
            Layout::Transposed,
            &Device::Cpu,
            name,
        )
        .unwrap();
        let got = bits(&t.flatten_all().unwrap().to_vec1::<bf16>().unwrap());
        assert_eq!(got, u32s(&case["bf16"]));
        let mut buf = vec![0f32; got.len()];
        dequantize_views_into(&bv, &sv, Layout::Transposed, &mut buf, name).unwrap();
        assert_eq!(bits(&buf), u32s(&case["f32"]));
    }
}

#[test]
fn quantize_matches_triton_kernels() {
    let fx = load("quantize_triton.json");
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dims = usizes(&case["dims"]);
        let x: Vec<f32> = u32s(&case["input_f32_bits"])
            .into_iter()
            .map(f32::from_bits)
            .collect();
        let t = Tensor::from_vec(x, dims.as_slice(), &Device::Cpu).unwrap();
        let (b, s) = quantize(&t).unwrap();
        let mut bdims = dims.clone();
        let cols = bdims.pop().unwrap();
        bdims.extend([cols / 32, 16]);
        assert_eq!(b.dims(), bdims.as_slice(), "{name}");
        assert_eq!(s.dims(), &bdims[..bdims.len() - 1], "{name}");
        let got_b = b.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got_s = s.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(got_s, u8s(&case["scales"]), "{name}: scales");
        assert_eq!(got_b, u8s(&case["blocks"]), "{name}: blocks");
    }
}
