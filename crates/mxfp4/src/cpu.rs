//! Fast CPU dequantization: rayon over rows (or over column groups when transposing), one
//! table lookup per packed byte ([`crate::lut`]), no per-element branches.
//!
//! - [`Layout::Checkpoint`]: each task owns a run of whole output rows; every byte writes
//!   its two values side by side.
//! - [`Layout::Transposed`]: each task owns the output rows of a few column groups
//!   (`GROUPS_PER_TASK · 32` rows of `[.., cols, rows]`, contiguous) and walks the input rows
//!   in tiles of `ROW_TILE`, so the cache lines it writes stay in L1 until they are full.

use rayon::prelude::*;

use crate::element::OutputElement;
use crate::error::Result;
use crate::format::{BLOCK_BYTES, BLOCK_VALUES};
use crate::lut::PairRow;
use crate::shape::{Layout, Mxfp4Shape};
use crate::slices::check_lengths;

/// Output rows per task in the checkpoint layout.
const ROWS_PER_TASK: usize = 16;
/// Column groups (of 32 output rows each) per task in the transposed layout.
const GROUPS_PER_TASK: usize = 4;
/// Input rows per tile in the transposed layout.
const ROW_TILE: usize = 64;

/// Dequantizes into a caller's buffer, on the CPU, using all rayon threads.
///
/// - `blocks`: `u8` bytes of `shape.blocks_dims()` (`[..., rows, cols/32, 16]`), row-major.
/// - `scales`: `u8` bytes of `shape.scales_dims()` (`[..., rows, cols/32]`), row-major.
/// - `out`: `shape.num_values()` elements; receives `shape.output_dims(layout)` row-major.
///
/// The slices may come straight from a memory-mapped file (nothing is copied first).
/// Bit-exact with transformers' `convert_moe_packed_tensors` for every byte and scale.
///
/// # Errors
/// [`crate::Mxfp4Error::Length`] when a slice's length does not match `shape`.
pub fn dequantize_into<T: OutputElement>(
    blocks: &[u8],
    scales: &[u8],
    shape: &Mxfp4Shape,
    layout: Layout,
    out: &mut [T],
) -> Result<()> {
    check_lengths(blocks, scales, out, shape, None)?;
    if out.is_empty() {
        return Ok(());
    }
    let table = T::pair_table();
    match layout {
        Layout::Checkpoint => checkpoint(blocks, scales, shape, table, out),
        Layout::Transposed => transposed(blocks, scales, shape, table, out),
    }
    Ok(())
}

/// Dequantizes into a new vector (see [`dequantize_into`]). The vector's memory is obtained
/// zeroed from the allocator and first touched by the worker threads.
///
/// # Errors
/// As [`dequantize_into`].
pub fn dequantize_to_vec<T: OutputElement>(
    blocks: &[u8],
    scales: &[u8],
    shape: &Mxfp4Shape,
    layout: Layout,
) -> Result<Vec<T>> {
    let mut out = T::zeroed_vec(shape.num_values());
    dequantize_into(blocks, scales, shape, layout, &mut out)?;
    Ok(out)
}

#[inline(always)]
fn decode_block<T: OutputElement>(row: &PairRow<T>, block: &[u8], dst: &mut [T]) {
    for (d, &b) in dst.chunks_exact_mut(2).zip(block) {
        d.copy_from_slice(&row[usize::from(b)]);
    }
}

fn checkpoint<T: OutputElement>(
    blocks: &[u8],
    scales: &[u8],
    shape: &Mxfp4Shape,
    table: &[PairRow<T>],
    out: &mut [T],
) {
    let (groups, cols) = (shape.groups(), shape.cols());
    let row_bytes = groups * BLOCK_BYTES;
    out.par_chunks_mut(cols * ROWS_PER_TASK)
        .zip(blocks.par_chunks(row_bytes * ROWS_PER_TASK))
        .zip(scales.par_chunks(groups * ROWS_PER_TASK))
        .for_each(|((out, blocks), scales)| {
            for ((dst, block), &s) in out
                .chunks_exact_mut(BLOCK_VALUES)
                .zip(blocks.chunks_exact(BLOCK_BYTES))
                .zip(scales)
            {
                decode_block(&table[usize::from(s)], block, dst);
            }
        });
}

fn transposed<T: OutputElement>(
    blocks: &[u8],
    scales: &[u8],
    shape: &Mxfp4Shape,
    table: &[PairRow<T>],
    out: &mut [T],
) {
    let (rows, groups, cols) = (shape.rows(), shape.groups(), shape.cols());
    let matrix_blocks = rows * groups;
    #[cfg(target_arch = "x86_64")]
    let kernel16 = as_u16_table(table).map(crate::transpose16::Kernel16::new);
    out.par_chunks_mut(cols * rows)
        .enumerate()
        .for_each(|(m, out_m)| {
            let blocks_m =
                &blocks[m * matrix_blocks * BLOCK_BYTES..][..matrix_blocks * BLOCK_BYTES];
            let scales_m = &scales[m * matrix_blocks..][..matrix_blocks];
            out_m
                .par_chunks_mut(GROUPS_PER_TASK * BLOCK_VALUES * rows)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let g0 = c * GROUPS_PER_TASK;
                    #[cfg(target_arch = "x86_64")]
                    if let (Some(k), Some(chunk16)) = (&kernel16, as_u16_slice(chunk)) {
                        k.task(blocks_m, scales_m, rows, groups, g0, chunk16);
                        return;
                    }
                    transposed_task(blocks_m, scales_m, rows, groups, g0, table, chunk)
                });
        });
}

/// Writes output rows `g0·32 ..` (as many groups as `chunk` holds) of one matrix.
fn transposed_task<T: OutputElement>(
    blocks: &[u8],
    scales: &[u8],
    rows: usize,
    groups: usize,
    g0: usize,
    table: &[PairRow<T>],
    chunk: &mut [T],
) {
    let ng = chunk.len() / (BLOCK_VALUES * rows);
    let mut vals = [T::ZERO; BLOCK_VALUES];
    for o0 in (0..rows).step_by(ROW_TILE) {
        let o1 = (o0 + ROW_TILE).min(rows);
        for gi in 0..ng {
            let g = g0 + gi;
            let dst = &mut chunk[gi * BLOCK_VALUES * rows..][..BLOCK_VALUES * rows];
            for o in o0..o1 {
                let b = o * groups + g;
                let block = &blocks[b * BLOCK_BYTES..][..BLOCK_BYTES];
                decode_block(&table[usize::from(scales[b])], block, &mut vals);
                for (j, &v) in vals.iter().enumerate() {
                    dst[j * rows + o] = v;
                }
            }
        }
    }
}

/// The table of a 16-bit output type (bf16, f16) seen as raw `u16` bits; `None` for f32.
#[cfg(target_arch = "x86_64")]
fn as_u16_table<T: OutputElement>(table: &[PairRow<T>]) -> Option<&[PairRow<u16>]> {
    (std::mem::size_of::<T>() == 2).then(|| {
        // SAFETY: `OutputElement` is sealed; its only 2-byte implementors are `bf16` and `f16`,
        // both `repr(transparent)` wrappers of `u16`, so `PairRow<T>` has the layout of
        // `PairRow<u16>`.
        unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<PairRow<u16>>(), table.len()) }
    })
}

/// A 16-bit output buffer (bf16, f16) seen as raw `u16` bits; `None` for f32.
#[cfg(target_arch = "x86_64")]
fn as_u16_slice<T: OutputElement>(out: &mut [T]) -> Option<&mut [u16]> {
    (std::mem::size_of::<T>() == 2).then(|| {
        // SAFETY: as in `as_u16_table`: `T` is `bf16` or `f16`, `repr(transparent)` over `u16`.
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u16>(), out.len()) }
    })
}
