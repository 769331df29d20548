//! The CUDA kernel (feature `cuda`): compiled at run time with NVRTC, launched through candle's
//! cudarc device, so [`crate::dequantize`] works unchanged on CUDA tensors.
//!
//! Each value is decoded arithmetically: the E2M1 nibble becomes an f32, `ldexpf` applies the
//! scale exactly (overflow → ±inf, like `torch.ldexp`), and the f32 is narrowed with
//! round-to-nearest-even (bf16: the top 16 bits, exact because every value has at most two
//! significant bits; f16: `cvt.rn.f16.f32`). The CPU reference test compares all of it.
//!
//! - checkpoint layout: one thread per 4 packed bytes → 8 values, 16/32-byte stores; for f32 and
//!   bf16 output and scales 2..=252 (every real checkpoint's) the value is built with integer ops on
//!   the exponent field instead of `ldexpf` (fewer instructions per value; same bits);
//! - transposed layout: a thread block decodes a tile of 64 input rows × 32 values into shared
//!   memory and writes it out as 32 output rows × 64 values (coalesced).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Result};
use half::{bf16, f16};

use crate::shape::{Layout, Mxfp4Shape};

const MODULE: &str = "gptoss_mxfp4";
/// Input rows per thread block in the transposed kernel.
const TILE_ROWS: u32 = 64;

/// CUDA device helpers that decode one E2M1 nibble with its E8M0 exponent `e = scale − 127`, for
/// other crates' kernels that read MXFP4 blocks themselves (e.g. a fused GEMM): `decode` gives the
/// exact f32 value (`ldexpf`, any exponent), `fast_bf16` the bf16 bits directly (valid for
/// `−125 ≤ e ≤ 125`). Both are what this crate's own CUDA kernels use. Defines the `u8`/`u16`/`u32`/
/// `u64` typedefs.
pub const DEVICE_DECODE: &str = r#"
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float decode(u32 nib, int e) {
    u32 mag = nib & 7u, ex = mag >> 1, m = mag & 1u;
    u32 bits = ex == 0u ? (m ? 0x3F000000u : 0u) : (((ex + 126u) << 23) | (m << 22));
    bits |= (nib & 8u) << 28;
    return ldexpf(__uint_as_float(bits), e);
}

// bf16 bits of an E2M1 value times 2^e, for |e| <= 125: the value has at most two significant bits
// and its exponent lies in [-1, 2], so the product is a normal number whose bits are the value's
// bits with e added to the exponent field (exact; zero stays signed zero). f32 bits are these << 16.
__device__ __forceinline__ u32 fast_bf16(u32 nib, int e) {
    u32 mag = nib & 7u, ex = mag >> 1, m = mag & 1u;
    u32 bits = mag == 0u ? 0u
             : (ex == 0u ? 0x3F00u : (((ex + 126u) << 7) | (m << 6))) + (u32)(e << 7);
    return bits | ((nib & 8u) << 12);
}
"#;

const SRC: &str = r#"
template <int K> struct Out;
template <> struct Out<0> { typedef u32 T; static __device__ __forceinline__ u32 conv(float f) { return __float_as_uint(f); } };
template <> struct Out<1> { typedef u16 T; static __device__ __forceinline__ u16 conv(float f) { return (u16)(__float_as_uint(f) >> 16); } };
template <> struct Out<2> { typedef u16 T; static __device__ __forceinline__ u16 conv(float f) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; } };

__device__ __forceinline__ void store8(u16* dst, const u16* v) {
    uint4 q = make_uint4(v[0] | ((u32)v[1] << 16), v[2] | ((u32)v[3] << 16),
                         v[4] | ((u32)v[5] << 16), v[6] | ((u32)v[7] << 16));
    *reinterpret_cast<uint4*>(dst) = q;
}
__device__ __forceinline__ void store8(u32* dst, const u32* v) {
    reinterpret_cast<uint4*>(dst)[0] = make_uint4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<uint4*>(dst)[1] = make_uint4(v[4], v[5], v[6], v[7]);
}

template <int K> struct Fast;
template <> struct Fast<0> { static __device__ __forceinline__ u32 conv(u32 nib, int e) { return fast_bf16(nib, e) << 16; } };
template <> struct Fast<1> { static __device__ __forceinline__ u16 conv(u32 nib, int e) { return (u16)fast_bf16(nib, e); } };

// Decodes word `i` (8 values) of the blocks into `out`.
template <int K>
__device__ __forceinline__ void decode_word(u32 w, int e, typename Out<K>::T* __restrict__ out, u64 i) {
    typedef typename Out<K>::T T;
    T v[8];
    if (K != 2 && e >= -125 && e <= 125) {
#pragma unroll
        for (int b = 0; b < 8; ++b) v[b] = (T)Fast<K == 2 ? 1 : K>::conv((w >> (4 * b)) & 15u, e);
    } else {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            u32 byte = (w >> (8 * b)) & 0xFFu;
            v[2 * b] = Out<K>::conv(decode(byte & 15u, e));
            v[2 * b + 1] = Out<K>::conv(decode(byte >> 4, e));
        }
    }
    store8(out + i * 8, v);
}

// Each thread decodes UNROLL words spaced blockDim.x apart (all loads issued before the stores:
// more bytes in flight per thread; every load and store instruction stays coalesced).
#define UNROLL 4
template <int K>
__device__ void checkpoint(const u32* __restrict__ blocks, const u8* __restrict__ scales,
                           typename Out<K>::T* __restrict__ out, u64 n_words) {
    const u64 step = (u64)gridDim.x * blockDim.x * UNROLL;
    for (u64 base = (u64)blockIdx.x * blockDim.x * UNROLL + threadIdx.x; base < n_words; base += step) {
        u32 w[UNROLL];
        int e[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const u64 i = base + (u64)u * blockDim.x;
            w[u] = i < n_words ? __ldg(blocks + i) : 0u;
            e[u] = i < n_words ? (int)__ldg(scales + (i >> 2)) - 127 : 0;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const u64 i = base + (u64)u * blockDim.x;
            if (i < n_words) decode_word<K>(w[u], e[u], out, i);
        }
    }
}

template <int K>
__device__ void transposed(const u32* __restrict__ blocks, const u8* __restrict__ scales,
                           typename Out<K>::T* __restrict__ out, int rows, int groups) {
    typedef typename Out<K>::T T;
    __shared__ T tile[32][64 + 2];
    const int r0 = blockIdx.x * 64, g = blockIdx.y;
    const u64 m = blockIdx.z;
    const int t = threadIdx.x, r = t >> 2, w = t & 3;
    if (r0 + r < rows) {
        u64 blk = (m * rows + r0 + r) * groups + g;
        u32 word = __ldg(blocks + blk * 4 + w);
        int e = (int)__ldg(scales + blk) - 127;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            u32 byte = (word >> (8 * b)) & 0xFFu;
            tile[w * 8 + 2 * b][r] = Out<K>::conv(decode(byte & 15u, e));
            tile[w * 8 + 2 * b + 1][r] = Out<K>::conv(decode(byte >> 4, e));
        }
    }
    __syncthreads();
    const int j = t >> 3, c0 = (t & 7) * 8;
    const int n = min(8, rows - r0 - c0);
    if (n <= 0) return;
    T* dst = out + ((m * groups + g) * 32 + j) * (u64)rows + r0 + c0;
    if (n == 8 && (rows & 7) == 0) {
        T v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = tile[j][c0 + i];
        store8(dst, v);
    } else {
        for (int i = 0; i < n; ++i) dst[i] = tile[j][c0 + i];
    }
}

#define KERNELS(K, NAME)                                                                           \
extern "C" __global__ void __launch_bounds__(256) mxfp4_checkpoint_##NAME(const u32* b, const u8* s, \
        typename Out<K>::T* o, u64 n) { checkpoint<K>(b, s, o, n); }                             \
extern "C" __global__ void __launch_bounds__(256) mxfp4_transposed_##NAME(const u32* b, const u8* s, \
        typename Out<K>::T* o, int rows, int groups) { transposed<K>(b, s, o, rows, groups); }
KERNELS(0, f32)
KERNELS(1, bf16)
KERNELS(2, f16)
"#;

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let ptx = PTX.get_or_init(|| {
        let opts = CompileOptions {
            arch: Some("sm_90"),
            ..Default::default()
        };
        compile_ptx_with_opts(format!("{DEVICE_DECODE}{SRC}"), opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("mxfp4: NVRTC compilation failed: {e:?}"))
    });
    ptx.as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The kernel name suffix of an output dtype.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("mxfp4 dequantize: unsupported output dtype {d:?}"),
    })
}

/// Dequantizes the blocks `blocks[range]` (bytes, whole 16-byte blocks) with their scales
/// `scales[range.start / 16 ..]` into the first `2 · range.len()` elements of `out`, in the
/// checkpoint layout (row-major `[rows, cols]` for the rows whose blocks these are), on `stream`
/// (`out`'s device's own stream, or a side stream of the same context). No allocation: the per-expert dequantization of the MoE's grouped matmul writes
/// each expert into one reused scratch buffer this way.
///
/// # Shapes and dtypes
/// `blocks`, `scales`: contiguous `u8` storages (e.g. a whole `[E, out, in/32, 16]` / `[E, out, in/32]`
/// pair, `range` selecting expert `e`'s `out · in / 2` bytes); `out`: `f32`, `bf16` or `f16`.
///
/// # Errors
/// A range that is not whole 16-byte-aligned blocks, inputs too short, a non-`u8` input, an
/// unsupported `out` dtype or an `out` shorter than the result.
pub fn dequantize_checkpoint_into(
    blocks: &CudaStorage,
    range: std::ops::Range<usize>,
    scales: &CudaStorage,
    out: &mut CudaStorage,
    stream: &CudaStream,
) -> Result<()> {
    if range.start % 16 != 0 || range.len() % 16 != 0 {
        candle_core::bail!(
            "mxfp4 dequantize: block bytes {}..{} are not whole 16-byte blocks",
            range.start,
            range.end
        );
    }
    let nblocks = range.len() / 16;
    let b = blocks.as_cuda_slice::<u8>()?;
    let s = scales.as_cuda_slice::<u8>()?;
    let s_range = range.start / 16..range.end / 16;
    if range.end > b.len() || s_range.end > s.len() {
        candle_core::bail!(
            "mxfp4 dequantize: blocks {}..{} / scales {}..{} outside storages of {} / {} bytes",
            range.start,
            range.end,
            s_range.start,
            s_range.end,
            b.len(),
            s.len()
        );
    }
    let dev = out.device().clone();
    let (b, s) = (b.slice(range), s.slice(s_range));
    let func = dev.get_or_load_custom_func(
        &format!("mxfp4_checkpoint_{}", suffix(out.dtype())?),
        MODULE,
        ptx()?,
    )?;
    let n = nblocks * 32;
    macro_rules! run {
        ($t:ty) => {{
            let o = out.as_cuda_slice_mut::<$t>()?;
            if o.len() < n {
                candle_core::bail!(
                    "mxfp4 dequantize: output of {} elements, {n} needed",
                    o.len()
                );
            }
            launch_checkpoint(stream, &func, &b, &s, &mut o.slice_mut(0..n), nblocks)
        }};
    }
    match out.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(bf16),
        _ => run!(f16),
    }
}

/// One checkpoint-layout launch: `nblocks` blocks → `32 · nblocks` values in `out`.
fn launch_checkpoint<T: DeviceRepr>(
    stream: &CudaStream,
    func: &CudaFunction,
    blocks: &CudaView<u8>,
    scales: &CudaView<u8>,
    out: &mut CudaViewMut<T>,
    nblocks: usize,
) -> Result<()> {
    if nblocks == 0 {
        return Ok(());
    }
    let words = (nblocks * 4) as u64;
    let grid = (words as u32).div_ceil(256 * 4).clamp(1, 1 << 20);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(func);
    b.arg(blocks);
    b.arg(scales);
    b.arg(out);
    b.arg(&words);
    // SAFETY: the kernel reads `words` u32 of blocks (4 per block), one scale per block, and writes
    // 8 values per word: the lengths were checked by the callers.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Dequantizes contiguous `u8` CUDA storages into a new CUDA storage of `dtype`.
pub(crate) fn dequantize_cuda(
    s1: &CudaStorage,
    l1: &candle_core::Layout,
    s2: &CudaStorage,
    l2: &candle_core::Layout,
    shape: &Mxfp4Shape,
    dtype: DType,
    layout: Layout,
) -> Result<CudaStorage> {
    let not_contig = || candle_core::Error::Msg("mxfp4 dequantize: input not contiguous".into());
    let (b0, b1) = l1.contiguous_offsets().ok_or_else(not_contig)?;
    let (c0, c1) = l2.contiguous_offsets().ok_or_else(not_contig)?;
    if b0 % 16 != 0 {
        candle_core::bail!(
            "mxfp4 dequantize: blocks start at byte offset {b0}, not a multiple of 16"
        );
    }
    let dev = s1.device().clone();
    let blocks = s1.as_cuda_slice::<u8>()?.slice(b0..b1);
    let scales = s2.as_cuda_slice::<u8>()?.slice(c0..c1);
    let n = shape.num_values();
    let layout_name = match layout {
        Layout::Checkpoint => "checkpoint",
        Layout::Transposed => "transposed",
    };
    let func = dev.get_or_load_custom_func(
        &format!("mxfp4_{layout_name}_{}", suffix(dtype)?),
        MODULE,
        ptx()?,
    )?;
    let transposed = LaunchConfig {
        grid_dim: (
            (shape.rows() as u32).div_ceil(TILE_ROWS),
            shape.groups() as u32,
            shape.matrices() as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows, groups) = (shape.rows() as i32, shape.groups() as i32);
    macro_rules! run {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel before the storage is read.
            let mut out = unsafe { dev.alloc::<$t>(n)? };
            match layout {
                Layout::Checkpoint => launch_checkpoint(
                    &dev.cuda_stream(),
                    &func,
                    &blocks,
                    &scales,
                    &mut out.slice_mut(..),
                    shape.num_blocks(),
                )?,
                Layout::Transposed if n > 0 => {
                    let mut b = func.builder();
                    b.arg(&blocks);
                    b.arg(&scales);
                    b.arg(&mut out);
                    b.arg(&rows);
                    b.arg(&groups);
                    unsafe { b.launch(transposed) }.w()?;
                }
                Layout::Transposed => {}
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => run!(f32),
        DType::BF16 => run!(bf16),
        _ => run!(f16),
    })
}
