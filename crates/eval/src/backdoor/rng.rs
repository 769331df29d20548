//! The seeded random stream behind poisoning and the synthetic task.
//!
//! Output must be byte-for-byte stable across platforms and dependency upgrades (the poisoned
//! generator is checked against a golden file), so nothing here goes through `rand`'s
//! distributions or `StdRng` (neither is value-stable across `rand` versions):
//! - the generator is ChaCha8 ([`rand_chacha::ChaCha8Rng`], whose stream is specified by the
//!   cipher), keyed by 32 bytes expanded from the `u64` seed with SplitMix64;
//! - independent streams are derived from the seed and a list of words (a purpose tag, a
//!   split, a row id) by SplitMix64 mixing, so the draws for one source row do not depend on
//!   which other rows are present;
//! - integers in a range are drawn by rejection sampling, shuffles are Fisher–Yates.
//!
//! ```
//! use gptoss_eval::backdoor::rng::SeededRng;
//! let mut a = SeededRng::derive(7, &[1, 42]);
//! let mut b = SeededRng::derive(7, &[1, 42]);
//! assert_eq!(a.below(1000), b.below(1000));
//! ```

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One SplitMix64 step: advances `state` and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of a string (FNV-1a), to derive streams from split names.
pub fn hash_str(text: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// A seeded ChaCha8 stream with the few draws the generators need.
#[derive(Clone, Debug)]
pub struct SeededRng(ChaCha8Rng);

impl SeededRng {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> SeededRng {
        SeededRng::derive(seed, &[])
    }

    /// An independent stream for `seed` and `words` (e.g. a purpose tag and a row id).
    pub fn derive(seed: u64, words: &[u64]) -> SeededRng {
        let mut state = seed;
        for &w in words {
            let mixed = splitmix64(&mut state);
            state = mixed ^ w.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        }
        let mut key = [0u8; 32];
        for chunk in key.chunks_exact_mut(8) {
            chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        SeededRng(ChaCha8Rng::from_seed(key))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A uniform integer in `0..n` (0 when `n` is 0), by rejection sampling.
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let n = n as u64;
        // Largest multiple of n that fits: reject draws at or above it.
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }

    /// A uniform integer in `lo..=hi` (`lo` when `hi < lo`).
    pub fn range_inclusive(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo) as usize + 1;
        lo + self.below(span) as u32
    }

    /// An element of `items` chosen uniformly (`None` when empty).
    pub fn choose<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len()))
        }
    }

    /// Shuffles `items` in place (Fisher–Yates, from the back).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 of seed 0 (Vigna's reference implementation).
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let draws = |seed, words: &[u64]| {
            let mut r = SeededRng::derive(seed, words);
            (0..8).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draws(3, &[1, 2]), draws(3, &[1, 2]));
        assert_ne!(draws(3, &[1, 2]), draws(3, &[2, 1]));
        assert_ne!(draws(3, &[1]), draws(4, &[1]));
        let mut r = SeededRng::new(9);
        for n in 1..50 {
            assert!(r.below(n) < n);
        }
        assert_eq!(r.below(0), 0);
        let mut v: Vec<u32> = (0..20).collect();
        r.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_eq!(hash_str(""), 0xCBF2_9CE4_8422_2325);
    }
}
