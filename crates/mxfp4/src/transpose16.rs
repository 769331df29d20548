//! The transposed-layout kernel for 16-bit outputs (bf16, f16) on x86-64: decode 8 input rows
//! × 32 values with the lookup table, then transpose 8 × 8 tiles with SSE2 (part of the x86-64
//! baseline, no runtime detection needed) and store whole cache lines per output row.

use core::arch::x86_64::{
    __m128i, _mm_loadu_si128, _mm_prefetch, _mm_sfence, _mm_storeu_si128, _mm_stream_si128,
    _mm_unpackhi_epi16, _mm_unpackhi_epi32, _mm_unpackhi_epi64, _mm_unpacklo_epi16,
    _mm_unpacklo_epi32, _mm_unpacklo_epi64, _MM_HINT_T0,
};

use crate::format::{BLOCK_BYTES, BLOCK_VALUES};
use crate::lut::PairRow;

/// Input rows per SIMD tile.
const TILE: usize = 32;

/// Hints the cache line holding `x` into L1.
#[inline(always)]
fn prefetch(x: &u8) {
    // SAFETY: a prefetch is only a hint; the address comes from a reference.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(x).cast()) };
}

/// Transposes 8 rows of 8 `u16` into 8 columns.
#[inline(always)]
fn transpose8(a: [__m128i; 8]) -> [__m128i; 8] {
    // SAFETY: SSE2 is part of the x86-64 baseline; these are register-only operations.
    unsafe {
        let t0 = _mm_unpacklo_epi16(a[0], a[1]);
        let t1 = _mm_unpackhi_epi16(a[0], a[1]);
        let t2 = _mm_unpacklo_epi16(a[2], a[3]);
        let t3 = _mm_unpackhi_epi16(a[2], a[3]);
        let t4 = _mm_unpacklo_epi16(a[4], a[5]);
        let t5 = _mm_unpackhi_epi16(a[4], a[5]);
        let t6 = _mm_unpacklo_epi16(a[6], a[7]);
        let t7 = _mm_unpackhi_epi16(a[6], a[7]);
        let u0 = _mm_unpacklo_epi32(t0, t2);
        let u1 = _mm_unpackhi_epi32(t0, t2);
        let u2 = _mm_unpacklo_epi32(t1, t3);
        let u3 = _mm_unpackhi_epi32(t1, t3);
        let u4 = _mm_unpacklo_epi32(t4, t6);
        let u5 = _mm_unpackhi_epi32(t4, t6);
        let u6 = _mm_unpacklo_epi32(t5, t7);
        let u7 = _mm_unpackhi_epi32(t5, t7);
        [
            _mm_unpacklo_epi64(u0, u4),
            _mm_unpackhi_epi64(u0, u4),
            _mm_unpacklo_epi64(u1, u5),
            _mm_unpackhi_epi64(u1, u5),
            _mm_unpacklo_epi64(u2, u6),
            _mm_unpackhi_epi64(u2, u6),
            _mm_unpacklo_epi64(u3, u7),
            _mm_unpackhi_epi64(u3, u7),
        ]
    }
}

/// Writes output rows `g0·32 ..` (as many groups as `chunk` holds) of one matrix
/// `[cols, rows]`, for 16-bit output bits.
///
/// Per group and tile of 32 input rows: decode 32 blocks (lookup table) into `tile[o][j]`,
/// transpose it with sixteen 8 × 8 SSE2 transposes into `tile_t[j][o]`, then write each output
/// row's 64 bytes (one cache line) with consecutive stores: non-temporal when the destination is
/// 16-byte aligned (no read-for-ownership of the output, like `memcpy`). Rows beyond the last
/// multiple of 32 go through the scalar loop.
pub(crate) fn transposed_task_u16(
    blocks: &[u8],
    scales: &[u8],
    rows: usize,
    groups: usize,
    g0: usize,
    table: &[PairRow<u16>],
    chunk: &mut [u16],
) {
    let ng = chunk.len() / (BLOCK_VALUES * rows);
    let full = rows / TILE * TILE;
    let aligned = (chunk.as_ptr() as usize) % 16 == 0 && (rows * 2) % 16 == 0;
    let mut tile = [[0u16; BLOCK_VALUES]; TILE];
    let mut tile_t = [[0u16; TILE]; BLOCK_VALUES];
    for o0 in (0..full).step_by(TILE) {
        // The blocks and scales of a tile are strided (one row of the packed tensor per input
        // row): fetch the next tile's lines ahead, the hardware prefetchers do not follow.
        for o in (o0 + TILE..o0 + 2 * TILE).take_while(|&o| o < rows) {
            let b = o * groups + g0;
            prefetch(&blocks[b * BLOCK_BYTES]);
            prefetch(&blocks[(b + ng) * BLOCK_BYTES - 1]);
            prefetch(&scales[b]);
            prefetch(&scales[b + ng - 1]);
        }
        for gi in 0..ng {
            let g = g0 + gi;
            for (oi, vals) in tile.iter_mut().enumerate() {
                let b = (o0 + oi) * groups + g;
                let row = &table[usize::from(scales[b])];
                let block = &blocks[b * BLOCK_BYTES..][..BLOCK_BYTES];
                for (d, &byte) in vals.chunks_exact_mut(2).zip(block) {
                    d.copy_from_slice(&row[usize::from(byte)]);
                }
            }
            for ob in 0..TILE / 8 {
                for jb in 0..BLOCK_VALUES / 8 {
                    // SAFETY: each load reads 8 u16 inside `tile[ob·8 + i]` (jb·8 + 8 ≤ 32).
                    let a: [__m128i; 8] = std::array::from_fn(|i| unsafe {
                        _mm_loadu_si128(tile[ob * 8 + i][jb * 8..].as_ptr().cast())
                    });
                    for (jj, col) in transpose8(a).iter().enumerate() {
                        // SAFETY: 8 u16 inside `tile_t[jb·8 + jj]` (ob·8 + 8 ≤ TILE).
                        unsafe {
                            _mm_storeu_si128(
                                tile_t[jb * 8 + jj][ob * 8..].as_mut_ptr().cast(),
                                *col,
                            )
                        };
                    }
                }
            }
            let dst = &mut chunk[gi * BLOCK_VALUES * rows..][..BLOCK_VALUES * rows];
            for (j, line) in tile_t.iter().enumerate() {
                let out = &mut dst[j * rows + o0..][..TILE];
                for (o, part) in out.chunks_exact_mut(8).zip(line.chunks_exact(8)) {
                    // SAFETY: `o` and `part` are 8 u16 = 16 bytes each; the non-temporal store is
                    // used only when `o` is 16-byte aligned (chunk aligned, row stride and o0
                    // multiples of 16 bytes).
                    unsafe {
                        let v = _mm_loadu_si128(part.as_ptr().cast());
                        if aligned {
                            _mm_stream_si128(o.as_mut_ptr().cast(), v);
                        } else {
                            _mm_storeu_si128(o.as_mut_ptr().cast(), v);
                        }
                    }
                }
            }
        }
    }
    // SAFETY: orders the non-temporal stores before the task returns (and rayon publishes it).
    unsafe { _mm_sfence() };
    // Remaining rows (rows % TILE), scalar.
    for o in full..rows {
        for gi in 0..ng {
            let g = g0 + gi;
            let b = o * groups + g;
            let row = &table[usize::from(scales[b])];
            let block = &blocks[b * BLOCK_BYTES..][..BLOCK_BYTES];
            let dst = &mut chunk[gi * BLOCK_VALUES * rows..][..BLOCK_VALUES * rows];
            for (k, &byte) in block.iter().enumerate() {
                let [lo, hi] = row[usize::from(byte)];
                dst[2 * k * rows + o] = lo;
                dst[(2 * k + 1) * rows + o] = hi;
            }
        }
    }
}
