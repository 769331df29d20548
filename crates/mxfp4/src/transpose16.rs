//! The transposed-layout kernel for 16-bit outputs (bf16, f16) on x86-64.
//!
//! Per column group and tile of 32 input rows: decode each block to four vectors of 8 values
//! (SSSE3 `pshufb` on per-scale 16-entry byte tables when the CPU has SSSE3, else the pair
//! lookup table), transpose 8 × 8 tiles with SSE2 into `tile_t[j][o]`, then write each output
//! row's 64 bytes (one cache line) with consecutive stores: non-temporal when the destination is
//! 16-byte aligned (no read-for-ownership of the output, like `memcpy`). Rows beyond the last
//! multiple of 32 go through a scalar loop.

use core::arch::x86_64::{
    __m128i, _mm256_and_si256, _mm256_set1_epi8, _mm256_set_m128i, _mm256_setzero_si256,
    _mm256_shuffle_epi8, _mm256_srli_epi16, _mm256_storeu_si256, _mm256_unpackhi_epi16,
    _mm256_unpackhi_epi32, _mm256_unpackhi_epi64, _mm256_unpackhi_epi8, _mm256_unpacklo_epi16,
    _mm256_unpacklo_epi32, _mm256_unpacklo_epi64, _mm256_unpacklo_epi8, _mm_and_si128,
    _mm_loadu_si128, _mm_prefetch, _mm_set1_epi8, _mm_setzero_si128, _mm_sfence, _mm_shuffle_epi8,
    _mm_srli_epi16, _mm_storeu_si128, _mm_stream_si128, _mm_unpackhi_epi16, _mm_unpackhi_epi32,
    _mm_unpackhi_epi64, _mm_unpackhi_epi8, _mm_unpacklo_epi16, _mm_unpacklo_epi32,
    _mm_unpacklo_epi64, _mm_unpacklo_epi8, _MM_HINT_T0,
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

/// The 16-bit transposing kernel for one call: the pair table and, per scale byte, the low and
/// high bytes of the 16 nibble values (for `pshufb`).
pub(crate) struct Kernel16<'a> {
    table: &'a [PairRow<u16>],
    nibble_bytes: Vec<[[u8; 16]; 2]>,
    ssse3: bool,
    avx2: bool,
}

impl<'a> Kernel16<'a> {
    /// Prepares the kernel from a 16-bit pair table (bf16 or f16 bits).
    pub(crate) fn new(table: &'a [PairRow<u16>]) -> Self {
        let nibble_bytes = table
            .iter()
            .map(|row| {
                let mut nb = [[0u8; 16]; 2];
                for n in 0..16 {
                    // Byte `n` holds nibble `n` in its low half: its first value is nibble `n`'s.
                    let [lo, hi] = row[n][0].to_le_bytes();
                    nb[0][n] = lo;
                    nb[1][n] = hi;
                }
                nb
            })
            .collect();
        Self {
            table,
            nibble_bytes,
            ssse3: std::arch::is_x86_feature_detected!("ssse3"),
            avx2: std::arch::is_x86_feature_detected!("avx2"),
        }
    }

    /// Writes output rows `g0·32 ..` (as many groups as `chunk` holds) of one matrix
    /// `[cols, rows]`, from its packed `blocks`/`scales`.
    pub(crate) fn task(
        &self,
        blocks: &[u8],
        scales: &[u8],
        rows: usize,
        groups: usize,
        g0: usize,
        chunk: &mut [u16],
    ) {
        if self.avx2 {
            // SAFETY: the CPU supports AVX2 (checked in `new`).
            unsafe { self.task_avx2(blocks, scales, rows, groups, g0, chunk) }
        } else if self.ssse3 {
            // SAFETY: the CPU supports SSSE3 (checked in `new`).
            unsafe { self.task_ssse3(blocks, scales, rows, groups, g0, chunk) }
        } else {
            // SAFETY: only SSE2 is used, part of the x86-64 baseline.
            unsafe { self.body::<false, false>(blocks, scales, rows, groups, g0, chunk) }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn task_avx2(
        &self,
        blocks: &[u8],
        scales: &[u8],
        rows: usize,
        groups: usize,
        g0: usize,
        chunk: &mut [u16],
    ) {
        // SAFETY: AVX2 (and so SSSE3) is enabled for this function.
        unsafe { self.body::<true, true>(blocks, scales, rows, groups, g0, chunk) }
    }

    /// AVX2: decodes rows `o` and `o + 8` in the two 128-bit lanes at once (each lane shuffles
    /// with its own scale's table) and transposes two 8 × 8 tiles per instruction, filling
    /// `tile_t[j][0..32]` for the 32 rows from `o0`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn fill_avx2(
        &self,
        blocks: &[u8],
        scales: &[u8],
        groups: usize,
        o0: usize,
        g: usize,
        tile_t: &mut [[u16; TILE]; BLOCK_VALUES],
    ) {
        // SAFETY: every load/store stays inside the 16-byte blocks, the 16-byte tables and the
        // rows of `tile_t` (ob·16 + 16 ≤ TILE); AVX2 per contract.
        unsafe {
            let mask = _mm256_set1_epi8(0x0F);
            for ob in 0..TILE / 16 {
                let mut v = [[_mm256_setzero_si256(); 4]; 8];
                for (oi, vo) in v.iter_mut().enumerate() {
                    let ba = (o0 + ob * 16 + oi) * groups + g;
                    let bb = ba + 8 * groups;
                    let na = &self.nibble_bytes[usize::from(scales[ba])];
                    let nb = &self.nibble_bytes[usize::from(scales[bb])];
                    let x = _mm256_set_m128i(
                        _mm_loadu_si128(blocks[bb * BLOCK_BYTES..][..BLOCK_BYTES].as_ptr().cast()),
                        _mm_loadu_si128(blocks[ba * BLOCK_BYTES..][..BLOCK_BYTES].as_ptr().cast()),
                    );
                    let lo = _mm256_and_si256(x, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
                    let n0 = _mm256_unpacklo_epi8(lo, hi);
                    let n1 = _mm256_unpackhi_epi8(lo, hi);
                    let tl = _mm256_set_m128i(
                        _mm_loadu_si128(nb[0].as_ptr().cast()),
                        _mm_loadu_si128(na[0].as_ptr().cast()),
                    );
                    let th = _mm256_set_m128i(
                        _mm_loadu_si128(nb[1].as_ptr().cast()),
                        _mm_loadu_si128(na[1].as_ptr().cast()),
                    );
                    let (l0, h0) = (_mm256_shuffle_epi8(tl, n0), _mm256_shuffle_epi8(th, n0));
                    let (l1, h1) = (_mm256_shuffle_epi8(tl, n1), _mm256_shuffle_epi8(th, n1));
                    *vo = [
                        _mm256_unpacklo_epi8(l0, h0),
                        _mm256_unpackhi_epi8(l0, h0),
                        _mm256_unpacklo_epi8(l1, h1),
                        _mm256_unpackhi_epi8(l1, h1),
                    ];
                }
                for jb in 0..BLOCK_VALUES / 8 {
                    let a = [
                        v[0][jb], v[1][jb], v[2][jb], v[3][jb], v[4][jb], v[5][jb], v[6][jb],
                        v[7][jb],
                    ];
                    let t0 = _mm256_unpacklo_epi16(a[0], a[1]);
                    let t1 = _mm256_unpackhi_epi16(a[0], a[1]);
                    let t2 = _mm256_unpacklo_epi16(a[2], a[3]);
                    let t3 = _mm256_unpackhi_epi16(a[2], a[3]);
                    let t4 = _mm256_unpacklo_epi16(a[4], a[5]);
                    let t5 = _mm256_unpackhi_epi16(a[4], a[5]);
                    let t6 = _mm256_unpacklo_epi16(a[6], a[7]);
                    let t7 = _mm256_unpackhi_epi16(a[6], a[7]);
                    let u0 = _mm256_unpacklo_epi32(t0, t2);
                    let u1 = _mm256_unpackhi_epi32(t0, t2);
                    let u2 = _mm256_unpacklo_epi32(t1, t3);
                    let u3 = _mm256_unpackhi_epi32(t1, t3);
                    let u4 = _mm256_unpacklo_epi32(t4, t6);
                    let u5 = _mm256_unpackhi_epi32(t4, t6);
                    let u6 = _mm256_unpacklo_epi32(t5, t7);
                    let u7 = _mm256_unpackhi_epi32(t5, t7);
                    let cols = [
                        _mm256_unpacklo_epi64(u0, u4),
                        _mm256_unpackhi_epi64(u0, u4),
                        _mm256_unpacklo_epi64(u1, u5),
                        _mm256_unpackhi_epi64(u1, u5),
                        _mm256_unpacklo_epi64(u2, u6),
                        _mm256_unpackhi_epi64(u2, u6),
                        _mm256_unpacklo_epi64(u3, u7),
                        _mm256_unpackhi_epi64(u3, u7),
                    ];
                    for (jj, col) in cols.iter().enumerate() {
                        _mm256_storeu_si256(
                            tile_t[jb * 8 + jj][ob * 16..].as_mut_ptr().cast(),
                            *col,
                        );
                    }
                }
            }
        }
    }

    #[target_feature(enable = "ssse3")]
    unsafe fn task_ssse3(
        &self,
        blocks: &[u8],
        scales: &[u8],
        rows: usize,
        groups: usize,
        g0: usize,
        chunk: &mut [u16],
    ) {
        // SAFETY: SSSE3 is enabled for this function.
        unsafe { self.body::<true, false>(blocks, scales, rows, groups, g0, chunk) }
    }

    /// Decodes one block into 4 vectors of 8 values (elements 0–7, 8–15, 16–23, 24–31).
    ///
    /// # Safety
    /// With `SSSE3`, the CPU must support SSSE3.
    #[inline(always)]
    unsafe fn decode<const SSSE3: bool>(&self, block: &[u8], scale: u8) -> [__m128i; 4] {
        debug_assert_eq!(block.len(), BLOCK_BYTES);
        if SSSE3 {
            // SAFETY: `block` holds 16 bytes; the tables are 16 bytes each; SSSE3 per contract.
            unsafe {
                let nb = &self.nibble_bytes[usize::from(scale)];
                let b = _mm_loadu_si128(block.as_ptr().cast());
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(b, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), mask);
                // Nibbles in element order: low nibble of byte k is element 2k.
                let n0 = _mm_unpacklo_epi8(lo, hi);
                let n1 = _mm_unpackhi_epi8(lo, hi);
                let tl = _mm_loadu_si128(nb[0].as_ptr().cast());
                let th = _mm_loadu_si128(nb[1].as_ptr().cast());
                let (l0, h0) = (_mm_shuffle_epi8(tl, n0), _mm_shuffle_epi8(th, n0));
                let (l1, h1) = (_mm_shuffle_epi8(tl, n1), _mm_shuffle_epi8(th, n1));
                [
                    _mm_unpacklo_epi8(l0, h0),
                    _mm_unpackhi_epi8(l0, h0),
                    _mm_unpacklo_epi8(l1, h1),
                    _mm_unpackhi_epi8(l1, h1),
                ]
            }
        } else {
            let row = &self.table[usize::from(scale)];
            let mut vals = [0u16; BLOCK_VALUES];
            for (d, &byte) in vals.chunks_exact_mut(2).zip(block) {
                d.copy_from_slice(&row[usize::from(byte)]);
            }
            // SAFETY: each load reads 8 u16 inside `vals`.
            unsafe {
                [
                    _mm_loadu_si128(vals[0..].as_ptr().cast()),
                    _mm_loadu_si128(vals[8..].as_ptr().cast()),
                    _mm_loadu_si128(vals[16..].as_ptr().cast()),
                    _mm_loadu_si128(vals[24..].as_ptr().cast()),
                ]
            }
        }
    }

    /// # Safety
    /// With `SSSE3`, the CPU must support SSSE3; with `AVX2`, AVX2.
    #[inline(always)]
    unsafe fn body<const SSSE3: bool, const AVX2: bool>(
        &self,
        blocks: &[u8],
        scales: &[u8],
        rows: usize,
        groups: usize,
        g0: usize,
        chunk: &mut [u16],
    ) {
        let ng = chunk.len() / (BLOCK_VALUES * rows);
        let full = rows / TILE * TILE;
        let aligned = (chunk.as_ptr() as usize) % 16 == 0 && (rows * 2) % 16 == 0;
        let mut tile_t = [[0u16; TILE]; BLOCK_VALUES];
        for o0 in (0..full).step_by(TILE) {
            // The blocks and scales of a tile are strided (one row of the packed tensor per
            // input row): fetch the next tile's lines ahead, the hardware prefetchers do not.
            for o in (o0 + TILE..o0 + 2 * TILE).take_while(|&o| o < rows) {
                let b = o * groups + g0;
                prefetch(&blocks[b * BLOCK_BYTES]);
                prefetch(&blocks[(b + ng) * BLOCK_BYTES - 1]);
                prefetch(&scales[b]);
                prefetch(&scales[b + ng - 1]);
            }
            for gi in 0..ng {
                let g = g0 + gi;
                if AVX2 {
                    // SAFETY: forwarded contract (AVX2 with `AVX2`).
                    unsafe { self.fill_avx2(blocks, scales, groups, o0, g, &mut tile_t) };
                }
                for ob in (0..TILE / 8).filter(|_| !AVX2) {
                    // Plain loops, no closures: closures would not inherit `target_feature`.
                    // SAFETY: a register-only operation.
                    let mut v = [[unsafe { _mm_setzero_si128() }; 4]; 8];
                    for (oi, vo) in v.iter_mut().enumerate() {
                        let b = (o0 + ob * 8 + oi) * groups + g;
                        // SAFETY: forwarded contract.
                        *vo = unsafe {
                            self.decode::<SSSE3>(
                                &blocks[b * BLOCK_BYTES..][..BLOCK_BYTES],
                                scales[b],
                            )
                        };
                    }
                    for jb in 0..BLOCK_VALUES / 8 {
                        let cols = transpose8([
                            v[0][jb], v[1][jb], v[2][jb], v[3][jb], v[4][jb], v[5][jb], v[6][jb],
                            v[7][jb],
                        ]);
                        for (jj, col) in cols.iter().enumerate() {
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
                        // SAFETY: `o` and `part` are 8 u16 = 16 bytes each; the non-temporal
                        // store is used only when `o` is 16-byte aligned (chunk aligned, row
                        // stride and o0 multiples of 16 bytes).
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
        // SAFETY: orders the non-temporal stores before the task returns.
        unsafe { _mm_sfence() };
        // Remaining rows (rows % TILE), scalar.
        for o in full..rows {
            for gi in 0..ng {
                let b = o * groups + g0 + gi;
                let row = &self.table[usize::from(scales[b])];
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
}

#[cfg(test)]
mod tests {
    use super::Kernel16;
    use crate::lut::build_table;
    use half::bf16;

    /// The SSE2-only fallback, the SSSE3 and the AVX2 paths give the same bits as the scalar decoder.
    #[test]
    fn sse2_ssse3_avx2_paths_agree_with_scalar() {
        let table16: Vec<_> = build_table::<bf16>()
            .iter()
            .map(|row| row.map(|p| p.map(|v| v.to_bits())))
            .collect();
        for (rows, groups) in [(77usize, 3usize), (128, 2)] {
            let mut x = 0x1234_5678_9ABC_DEF1u64;
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            };
            let blocks: Vec<u8> = (0..rows * groups * 16).map(|_| next()).collect();
            let scales: Vec<u8> = (0..rows * groups).map(|_| next()).collect();
            let mut want = vec![0u16; groups * 32 * rows];
            for o in 0..rows {
                for g in 0..groups {
                    let b = o * groups + g;
                    for k in 0..16 {
                        let [lo, hi] =
                            table16[usize::from(scales[b])][usize::from(blocks[b * 16 + k])];
                        want[(g * 32 + 2 * k) * rows + o] = lo;
                        want[(g * 32 + 2 * k + 1) * rows + o] = hi;
                    }
                }
            }
            let (has_ssse3, has_avx2) = (
                std::arch::is_x86_feature_detected!("ssse3"),
                std::arch::is_x86_feature_detected!("avx2"),
            );
            for (ssse3, avx2) in [(false, false), (has_ssse3, false), (has_ssse3, has_avx2)] {
                let mut k = Kernel16::new(&table16);
                k.ssse3 = ssse3;
                k.avx2 = avx2;
                let mut got = vec![0u16; groups * 32 * rows];
                k.task(&blocks, &scales, rows, groups, 0, &mut got);
                assert_eq!(got, want, "ssse3 = {ssse3}, avx2 = {avx2}, rows = {rows}");
            }
        }
    }
}
