//! The MXFP4 number format: FP4 E2M1 values, E8M0 scales, 32-value blocks.
//!
//! A block holds 32 values in 16 bytes plus one scale byte. Byte `k` of a block holds
//! element `2k` in its low nibble and element `2k + 1` in its high nibble. A nibble is an
//! E2M1 number (bit 3 = sign) and the block's value `j` is `FP4[nibble_j] · 2^(scale − 127)`.
//!
//! These are the scalar definitions; the fast kernels ([`crate::dequantize_into`], the CUDA kernel)
//! are tested against them.

/// Values per block (one scale per this many values).
pub const BLOCK_VALUES: usize = 32;
/// Bytes per block (two values per byte).
pub const BLOCK_BYTES: usize = 16;
/// The E8M0 exponent bias: a scale byte `s` means `2^(s − 127)`.
pub const E8M0_BIAS: i32 = 127;

/// FP4 E2M1 value of each nibble, as in transformers' `FP4_VALUES`.
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The exact value of one nibble under one scale byte, as an `f64`.
///
/// `FP4[nibble] · 2^(scale − 127)`, exact: every such value is representable in `f64`
/// (they span `2^-128 ..= 6 · 2^128`). Converting this to the output type with
/// round-to-nearest-even is what transformers (`torch.ldexp`) does, see [`crate`] docs:
/// scale 255 is not NaN but `2^128`, so `±0.5 · 2^128 = ±2^127` stays finite in f32/bf16
/// while `|v| ≥ 2` overflows to ±inf, and `±0` stays `±0` for every scale.
#[inline]
pub fn exact_value(nibble: u8, scale: u8) -> f64 {
    let v = f64::from(FP4_VALUES[usize::from(nibble & 0x0F)]);
    // 2^(scale-127) is a normal f64 for every byte: build it from its bits.
    let exp = i64::from(scale) - i64::from(E8M0_BIAS);
    let pow2 = f64::from_bits(((exp + 1023) as u64) << 52);
    v * pow2
}

/// The E8M0 scale byte that triton_kernels' `downcast_to_mxfp_torch` (ROUND_UP mode) chooses
/// for a block whose largest magnitude is `amax` (finite, `≥ 0`).
///
/// `amax / 6` in f32, then rounded *up* to a power of two on its bits:
/// `(bits + 0x007F_FFFF) & 0x7F80_0000`, and the byte is that exponent field.
/// An all-zero block gets scale 0.
#[inline]
pub fn scale_for_amax(amax: f32) -> u8 {
    let ds = amax / 6.0;
    let rounded = ds.to_bits().wrapping_add(0x007F_FFFF) & 0x7F80_0000;
    (rounded >> 23) as u8
}

/// `1 / 2^(scale − 127)` as triton computes it (`0` for scale byte 0, whose rounded
/// dequant scale is `0.0` in that function, i.e. an all-zero block).
#[inline]
pub fn quant_multiplier(scale: u8) -> f32 {
    if scale == 0 {
        0.0
    } else {
        1.0 / f32::from_bits(u32::from(scale) << 23)
    }
}

/// Encodes one already scaled f32 (`x / 2^(scale − 127)`) as an E2M1 nibble, bit for bit as
/// triton_kernels' `downcast_to_mxfp_torch`: round half away from zero (decided by the
/// first dropped bit), saturate at ±6, keep the sign (so `-0.0` → nibble 8).
#[inline]
pub fn encode_e2m1(q: f32) -> u8 {
    const E8_BIAS: u32 = 127;
    const E2_BIAS: u32 = 1;
    let bits = q.to_bits();
    let sign = bits & 0x8000_0000;
    let mut exponent = (bits >> 23) & 0xFF;
    let mut mantissa = bits & 0x7F_FFFF;
    if exponent < E8_BIAS {
        // Subnormal in E2M1: shift the mantissa (with its implicit 1) right. Torch's
        // `>>` on int32 yields 0 for shifts >= 31; the value shifted is < 2^23 anyway.
        let shift = E8_BIAS - exponent - 1;
        let m = 0x40_0000 | (mantissa >> 1);
        mantissa = if shift >= 31 { 0 } else { m >> shift };
    }
    exponent = exponent.max(E8_BIAS - E2_BIAS) - (E8_BIAS - E2_BIAS);
    let e2m1 = ((((exponent << 2) | (mantissa >> 21)) + 1) >> 1).min(7);
    ((sign >> 28) | e2m1) as u8
}
