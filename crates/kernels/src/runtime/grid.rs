//! Launch-size arithmetic in 64 bits: element counts of long-context tensors pass 2^32
//! (131,072 tokens × top-4 × 5,760 gate/up columns = 3.0·10⁹), so a count is never cast to `u32`
//! before it is divided into blocks.

/// Blocks of `threads` for a grid-stride loop over `n` elements: `ceil(n / threads)` clamped to
/// `1..=max_blocks` (the kernel's loop covers the rest), computed without truncating `n`.
pub fn grid_stride_blocks(n: usize, threads: u32, max_blocks: u32) -> u32 {
    let want = n.div_ceil(threads.max(1) as usize);
    want.clamp(1, max_blocks.max(1) as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_u32_are_not_truncated() {
        // a plain `n as u32` would give 0 (→ 1 block) and 5 (→ 1 block) here
        assert_eq!(grid_stride_blocks(1 << 32, 256, 132 * 32), 132 * 32);
        assert_eq!(grid_stride_blocks((1 << 32) + 5, 256, 132 * 16), 132 * 16);
        assert_eq!(
            grid_stride_blocks(3 * 1_000_000_000, 256, u32::MAX),
            11_718_750
        );
        assert_eq!(grid_stride_blocks(0, 256, 4096), 1);
        assert_eq!(grid_stride_blocks(257, 256, 4096), 2);
    }
}
