//! Byte → value-pair lookup tables, one row of 256 pairs per scale byte.
//!
//! `table[scale][byte] = [value(low nibble), value(high nibble)]`, already rounded to the
//! output type, so the kernels have no per-element branches or arithmetic. The table for a
//! type is built once (65 536 pairs from [`crate::format::exact_value`]) and cached.

use crate::element::OutputElement;
use crate::format::exact_value;

/// The 256 value pairs of one scale byte.
pub type PairRow<T> = [[T; 2]; 256];

/// Builds the full table for `T`: 256 rows (scale bytes) of 256 pairs (packed bytes).
pub(crate) fn build_table<T: OutputElement>() -> Box<[PairRow<T>]> {
    (0..=255u8)
        .map(|scale| {
            let mut row = [[T::ZERO; 2]; 256];
            for (byte, pair) in row.iter_mut().enumerate() {
                let byte = byte as u8;
                pair[0] = T::from_exact(exact_value(byte & 0x0F, scale));
                pair[1] = T::from_exact(exact_value(byte >> 4, scale));
            }
            row
        })
        .collect()
}
