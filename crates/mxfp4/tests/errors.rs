//! Error cases: every one names the tensor and both shapes (or the dtype).

use candle_core::{DType, Device, Tensor};
use gptoss_mxfp4::{dequantize, dequantize_bytes, dequantize_named, quantize, Layout, Mxfp4Error};

fn zeros(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
}

#[test]
fn last_dim_not_16() {
    let e = dequantize(
        &zeros(&[2, 3, 4, 8], DType::U8),
        &zeros(&[2, 3, 4], DType::U8),
        DType::BF16,
        Layout::Checkpoint,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Mxfp4Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("`blocks`") && msg.contains("[2, 3, 4, 8]") && msg.contains("[2, 3, 4]"),
        "{msg}"
    );
}

#[test]
fn scales_not_matching_blocks_names_the_checkpoint_tensor() {
    let name = "model.layers.0.mlp.experts.gate_up_proj_blocks";
    let e = dequantize_named(
        &zeros(&[2, 3, 4, 16], DType::U8),
        &zeros(&[2, 3, 5], DType::U8),
        DType::BF16,
        Layout::Transposed,
        Some(name),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Mxfp4Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.experts.gate_up_proj_scales"),
        "{msg}"
    );
    assert!(
        msg.contains(name) && msg.contains("[2, 3, 5]") && msg.contains("[2, 3, 4, 16]"),
        "{msg}"
    );
}

#[test]
fn too_few_dims() {
    let e = dequantize(
        &zeros(&[4, 16], DType::U8),
        &zeros(&[4], DType::U8),
        DType::F32,
        Layout::Checkpoint,
    )
    .unwrap_err();
    assert!(matches!(e, Mxfp4Error::ShapeMismatch { .. }), "{e}");
}

#[test]
fn wrong_dtypes() {
    let e = dequantize(
        &zeros(&[1, 1, 16], DType::F32),
        &zeros(&[1, 1], DType::U8),
        DType::F32,
        Layout::Checkpoint,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Mxfp4Error::DType {
                actual: DType::F32,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("`blocks`"));
    let e = dequantize(
        &zeros(&[1, 1, 16], DType::U8),
        &zeros(&[1, 1], DType::U32),
        DType::F32,
        Layout::Checkpoint,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Mxfp4Error::DType {
                actual: DType::U32,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("`scales`"));
    let e = dequantize(
        &zeros(&[1, 1, 16], DType::U8),
        &zeros(&[1, 1], DType::U8),
        DType::U8,
        Layout::Checkpoint,
    )
    .unwrap_err();
    assert!(matches!(e, Mxfp4Error::DType { .. }), "{e}");
    let e = quantize(&zeros(&[1, 32], DType::U8)).unwrap_err();
    assert!(matches!(e, Mxfp4Error::DType { .. }), "{e}");
}

#[test]
fn quantize_cols_not_multiple_of_32() {
    let e = quantize(&zeros(&[2, 3, 48], DType::F32)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Mxfp4Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("[2, 3, 48]") && msg.contains("multiple of 32"),
        "{msg}"
    );
}

#[test]
fn quantize_non_finite() {
    let mut v = vec![0f32; 64];
    v[37] = f32::NAN;
    let t = Tensor::from_vec(v, (1, 64), &Device::Cpu).unwrap();
    let e = quantize(&t).unwrap_err();
    assert!(matches!(e, Mxfp4Error::NonFinite { index: 37, .. }), "{e}");
}

#[test]
fn raw_byte_lengths() {
    let e = dequantize_bytes(
        &[0; 31],
        &[1, 1, 2, 16],
        &[0; 2],
        &[1, 1, 2],
        DType::F32,
        Layout::Checkpoint,
        &Device::Cpu,
        Some("x_blocks"),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            Mxfp4Error::Length {
                actual: 31,
                expected: 32,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("x_blocks") && msg.contains("[1, 1, 2, 16]"),
        "{msg}"
    );
    let e = dequantize_bytes(
        &[0; 32],
        &[1, 1, 2, 16],
        &[0; 3],
        &[1, 1, 2],
        DType::F32,
        Layout::Checkpoint,
        &Device::Cpu,
        Some("x_blocks"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("x_scales"), "{e}");
}
