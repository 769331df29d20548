//! Output element types of the dequantizer: `f32`, `bf16`, `f16`.

use candle_core::DType;
use half::{bf16, f16};
use std::sync::OnceLock;

use crate::lut::{build_table, PairRow};

/// A float type the dequantizer writes. Sealed: implemented for `f32`, [`half::bf16`] and [`half::f16`].
pub trait OutputElement: Copy + Send + Sync + 'static + private::Sealed {
    /// The matching candle dtype.
    const DTYPE: DType;
    /// Zero (used only to pre-size buffers).
    const ZERO: Self;
    /// Rounds an exact value to this type, round-to-nearest-even, overflow to ±inf
    /// (what torch does when it stores an f32/f64 result in this dtype).
    fn from_exact(v: f64) -> Self;
    /// A zero-filled vector of `n` elements, obtained from the allocator as zeroed memory
    /// (fresh pages for large sizes: nothing is written until the kernel writes).
    fn zeroed_vec(n: usize) -> Vec<Self>;
    /// The raw bits, widened (for bit-exact comparisons in tests).
    fn to_bits_u32(self) -> u32;
    /// The value as f32 (exact for every dequantized value).
    fn to_f32(self) -> f32;
    /// The cached byte → value-pair table of this type (see [`PairRow`]), indexed by scale byte.
    fn pair_table() -> &'static [PairRow<Self>];
}

macro_rules! cached_table {
    ($t:ty) => {
        fn pair_table() -> &'static [PairRow<$t>] {
            static TABLE: OnceLock<Box<[PairRow<$t>]>> = OnceLock::new();
            TABLE.get_or_init(build_table::<$t>)
        }
    };
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl OutputElement for f32 {
    cached_table!(f32);
    const DTYPE: DType = DType::F32;
    const ZERO: Self = 0.0;
    #[inline]
    fn from_exact(v: f64) -> Self {
        v as f32
    }
    fn zeroed_vec(n: usize) -> Vec<Self> {
        let v = vec![0.0f32; n]; // std specialises zero floats to alloc_zeroed
        advise_huge_pages(&v);
        v
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// bf16 and f16: every MXFP4 value has at most 2 significant bits and its f32 rounding is exact
/// (or ±inf where the half type overflows too), so going through f32 rounds only once;
/// `from_f32` rounds to nearest even (for f16 also into subnormals).
macro_rules! half_output_element {
    ($t:ty, $dtype:expr) => {
        impl OutputElement for $t {
            cached_table!($t);
            const DTYPE: DType = $dtype;
            const ZERO: Self = <$t>::ZERO;
            #[inline]
            fn from_exact(v: f64) -> Self {
                <$t>::from_f32(v as f32)
            }
            fn zeroed_vec(n: usize) -> Vec<Self> {
                use half::vec::HalfBitsVecExt;
                let v: Vec<Self> = vec![0u16; n].reinterpret_into();
                advise_huge_pages(&v);
                v
            }
            fn to_bits_u32(self) -> u32 {
                u32::from(self.to_bits())
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
        }
    };
}

half_output_element!(bf16, DType::BF16);
half_output_element!(f16, DType::F16);

/// Asks Linux to back a large, still untouched buffer with transparent huge pages, so that the
/// kernel's first writes fault in 2 MiB pages instead of 4 KiB ones (about 5x less time for a
/// 1 GB output when THP is in `madvise` mode). Only a hint: errors are ignored.
fn advise_huge_pages<T>(v: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let end = start + std::mem::size_of_val(v);
        let aligned = start.next_multiple_of(HUGE);
        if end >= aligned + HUGE {
            let len = (end - aligned) / HUGE * HUGE;
            // SAFETY: madvise only changes the paging policy of pages inside `v`'s allocation;
            // MADV_HUGEPAGE never alters the contents (the memory is still zero on first read).
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}
