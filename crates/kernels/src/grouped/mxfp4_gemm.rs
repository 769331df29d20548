//! The grouped matmul with MXFP4-resident weights as **one** kernel: every expert's rows times its
//! weight, the MXFP4 blocks decoded tile by tile into shared memory inside the GEMM.
//!
//! The per-expert path ([`super::cuda`]) decodes each routed expert into a bf16 scratch matrix and
//! runs a cuBLAS GEMM on it: two launches per expert (64 per grouped call at 32 experts) and a
//! bf16 copy of every routed expert written and read back, however few rows it has. Here one
//! launch covers all experts: thread block `b` finds its expert from the tile offsets passed by
//! value, stages `128 × 32` tiles of `x` with `cp.async` (3 stages), reads the weight's MXFP4 bytes
//! (prefetched two k-steps ahead into registers), decodes them into one of two bf16 shared tiles
//! (byte-permute tables; the same bits as `gptoss_mxfp4`'s decoder, whose exact path handles
//! extreme exponents) while the other feeds `mma.sync` m16n8k16 (bf16 in, f32 accumulators, 8
//! warps of 64 × 32; 16-row tiles past the expert's rows are skipped), and rounds to bf16 once.
//!
//! It reads 4.25 bits per weight instead of writing and reading 16, so it wins where the experts
//! have few rows (generation: 1.4–1.5× the decode throughput on an H200); at training sizes
//! (≈ 256 rows per expert) it reaches ≈ 200–250 TFLOP/s against cuBLAS's ≈ 550 on decoded copies,
//! so [`chosen`] keeps the per-expert path there (see docs/performance.md).
//!
//! Both uses of a checkpoint matrix `W` `[rows, cols]` (blocks of 32 along `cols`):
//! - forward (`transposed: false`): `y = x · Wᵀ`, `k = cols` (one block per k-step and row);
//! - backward (`transposed: true`): `y = x · W`, `k = rows` (four blocks per row of W in a tile).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType};
use half::bf16;

use super::Spans;
use crate::nvrtc::Kernels;

/// Rows and columns of the output per thread block; k per step.
const BM: usize = 128;
const BN: usize = 128;
const BK: usize = 32;
/// Experts one call can take (the schedule is a kernel parameter: 2 KB at 128).
const MAX_EXPERTS: usize = 128;

const SRC: &str = r#"
#define GBM 128
#define GBN 128
#define GBK 32
#define MAXE 128

struct Sched {
    u32 count;            // experts with rows
    u32 tile0[MAXE + 1];  // first thread block of each; tile0[count] = the grid size
    u32 row0[MAXE];       // first row of x / y
    u32 rows[MAXE];
    u32 expert[MAXE];     // index into the weight's experts
};

__device__ __forceinline__ void gcp16(u32 smem, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void gldsm4(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void gldsm4t(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void gmma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
    return r;
}

// 16 consecutive values (two words of one block) with exponent e → 8 bf16 pairs, the bits of
// fast_bf16 / decode. Fast path (-125 <= e <= 125): the bf16 bits of magnitude m at exponent
// field E = 126 + e are byte tables indexed by m (prmt): high byte (E + off(m)) >> 1, low byte
// ((E + off(m)) & 1) << 7 | (m & 1) << 6, off = {-, 0, 1, 1, 2, 2, 3, 3}; zero for m = 0. The
// sign (bit 3 of each nibble) goes to bit 15 of its half.
__device__ __forceinline__ void decode16(uint2 w, int e, u32* out) {
    if (e >= -125 && e <= 125) {
        const u32 E = (u32)(126 + e), h = E >> 1, p = E & 1u;
        const u32 H = h * 0x01010101u;
        const u32 hi0 = (H & 0xFFFFFF00u) + (p ? 0x01010000u : 0u);
        const u32 hi1 = H + (p ? 0x02020101u : 0x01010101u);
        const u32 lo0 = p ? 0x40008000u : 0xC0800000u;
        const u32 lo1 = p ? 0x4000C080u : 0xC0804000u;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const u32 word = q ? w.y : w.x;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const u32 sel = (half ? word >> 16 : word) & 0x7777u;
                const u32 L = prmt(lo0, lo1, sel), Hb = prmt(hi0, hi1, sel);
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    u32 pair = prmt(L, Hb, j ? 0x7362u : 0x5140u);
                    const int byte = 2 * half + j;                 // the word's byte of this pair
                    const u32 t = prmt(word, 0u, 0x0404u | (byte << 4) | (byte << 12));
                    const u32 sg = ((t << 4) & 0x8000u) | (t & 0x80000000u);
                    out[4 * q + 2 * half + j] = pair | sg;
                }
            }
        }
    } else {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const u32 word = q ? w.y : w.x;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const u32 lo = (word >> (8 * b)) & 15u, hi = (word >> (8 * b + 4)) & 15u;
                out[4 * q + b] = (__float_as_uint(decode(lo, e)) >> 16)
                               | (__float_as_uint(decode(hi, e)) & 0xffff0000u);
            }
        }
    }
}

// y[rows of expert, N] = x[rows, K] · W_e (see the module docs for T); x, y bf16 row-major.
// Shared tiles without padding, 16-byte chunks XOR-swizzled so that ldmatrix is conflict-free:
// x and the [n][k] weight tile (64-byte rows): chunk c of row r at c ^ ((r >> 1) & 3); the [k][n]
// weight tile (256-byte rows): chunk c of row r at c ^ (r & 7).
template <int T>
__device__ __forceinline__ void mxgemm(const u16* __restrict__ x, const u8* __restrict__ blocks,
        const u8* __restrict__ scales, u16* __restrict__ y, int N, int K, int R, int G,
        const Sched& s) {
    __shared__ __align__(128) u16 As[3][GBM * GBK];
    __shared__ __align__(128) u16 Bs[2][GBN * GBK];
    const u32 tile = blockIdx.x;
    int lo = 0, hi = (int)s.count;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (s.tile0[mid] <= tile) lo = mid; else hi = mid;
    }
    const int ntn = (N + GBN - 1) / GBN;
    const u32 local = tile - s.tile0[lo];
    const int mt = (int)(local / ntn), nt = (int)(local % ntn);
    const int rows = (int)s.rows[lo] - mt * GBM;
    const u64 xrow0 = (u64)s.row0[lo] + (u64)mt * GBM;
    const int n0 = nt * GBN;
    const u64 ebase = (u64)s.expert[lo] * R;
    const int KT = K / GBK;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const u32 as0 = (u32)__cvta_generic_to_shared(&As[0][0]);
    const u32 bs0 = (u32)__cvta_generic_to_shared(&Bs[0][0]);
    // the 16-row mma tiles of this warp that hold output rows (the others are skipped)
    const int mlim = min(4, max(0, (rows - wm * 64 + 15) >> 4));

    // x: rows tid/4 and tid/4 + 64, chunk tid % 4
    const int ach = tid & 3;
    const u16* asrc[2];
    u32 adst[2];
    int abytes[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = (tid >> 2) + 64 * i;
        const bool ok = r < rows;
        asrc[i] = x + (xrow0 + (ok ? r : 0)) * (u64)K + ach * 8;
        adst[i] = as0 + (u32)(r * 64 + ((ach ^ ((r >> 1) & 3)) << 4));
        abytes[i] = ok ? 16 : 0;
    }
    auto load_a = [&](int kt, int st) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            gcp16(adst[i] + st * (GBM * GBK * 2), asrc[i] + kt * GBK, abytes[i]);
    };
    // weight: this thread's 8 bytes of one block per k-step, and its scale
    bool bok;
    const u8* bsrc;
    const u8* ssrc;
    u64 bstep, sstep;
    u32 bdst;  // byte offset of this thread's row in a Bs buffer
    int c0, c1;  // its two (swizzled) 16-byte chunks
    if (T == 0) {
        const int nl = tid >> 1, half = tid & 1, n = n0 + nl;
        bok = n < N;
        const u64 row = ebase + (bok ? n : 0);
        bsrc = blocks + row * G * 16 + half * 8;
        ssrc = scales + row * G;
        bstep = 16;
        sstep = 1;
        bdst = (u32)(nl * 64);
        c0 = (2 * half) ^ ((nl >> 1) & 3);
        c1 = (2 * half + 1) ^ ((nl >> 1) & 3);
    } else {
        const int kl = tid >> 3, j = tid & 7;
        bok = n0 + j * 16 < N;
        const u64 row = ebase + kl, blk = bok ? (n0 >> 5) + (j >> 1) : 0;
        bsrc = blocks + (row * G + blk) * 16 + (j & 1) * 8;
        ssrc = scales + row * G + blk;
        bstep = (u64)GBK * G * 16;
        sstep = (u64)GBK * G;
        bdst = (u32)(kl * 256);
        c0 = (2 * j) ^ (kl & 7);
        c1 = (2 * j + 1) ^ (kl & 7);
    }
    auto load_b = [&](int kt, uint2& w, int& e) {
        w = bok ? __ldg((const uint2*)(bsrc + kt * bstep)) : make_uint2(0u, 0u);
        e = bok ? (int)__ldg(ssrc + kt * sstep) - 127 : 0;
    };
    auto decode_to = [&](const uint2& w, int e, int buf) {
        u32 v[8];
        decode16(w, e, v);
        const u32 base = bs0 + buf * (GBN * GBK * 2) + bdst;
        asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n"
                     :: "r"(base + (c0 << 4)), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]));
        asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n"
                     :: "r"(base + (c1 << 4)), "r"(v[4]), "r"(v[5]), "r"(v[6]), "r"(v[7]));
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

    // raw weight prefetched two k-steps ahead: wc for the next decode, wn2 the one after
    uint2 wc, wn2;
    int ec, en;
    load_a(0, 0);
    asm volatile("cp.async.commit_group;\n" ::);
    if (KT > 1) load_a(1, 1);
    asm volatile("cp.async.commit_group;\n" ::);
    load_b(0, wc, ec);
    if (KT > 1) load_b(1, wn2, en);
    decode_to(wc, ec, 0);
    wc = wn2;
    ec = en;
    if (KT > 2) load_b(2, wn2, en);
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
    for (int kt = 0; kt < KT; ++kt) {
        if (kt + 2 < KT) load_a(kt + 2, (kt + 2) % 3);
        asm volatile("cp.async.commit_group;\n" ::);
        if (kt + 1 < KT) {
            decode_to(wc, ec, (kt + 1) & 1);
            wc = wn2;
            ec = en;
            if (kt + 3 < KT) load_b(kt + 3, wn2, en);
        }
        const u32 A = as0 + (kt % 3) * (GBM * GBK * 2);
        const u32 B = bs0 + (kt & 1) * (GBN * GBK * 2);
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                if (mi >= mlim) continue;
                const int r = wm * 64 + mi * 16 + (lane & 15), c = kk * 2 + (lane >> 4);
                gldsm4(a[mi], A + r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
            }
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                u32 r4[4];
                if (T == 0) {
                    const int r = wn * 32 + p * 16 + (lane & 7) + ((lane >> 4) << 3);
                    const int c = kk * 2 + ((lane >> 3) & 1);
                    gldsm4(r4, B + r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
                } else {
                    const int r = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                    const int c = (wn * 32 + p * 16 + (lane >> 4) * 8) >> 3;
                    gldsm4t(r4, B + r * 256 + ((c ^ (r & 7)) << 4));
                }
                b[2 * p][0] = r4[0];
                b[2 * p][1] = r4[1];
                b[2 * p + 1][0] = r4[2];
                b[2 * p + 1][1] = r4[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj)
                    if (mi < mlim) gmma(acc[mi][nj], a[mi], b[nj][0], b[nj][1]);
        }
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
    }
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
            const int r = wm * 64 + mi * 16 + g, c = n0 + wn * 32 + nj * 8 + 2 * tq;
            if (c >= N) continue;
            if (r < rows) {
                const u32 v = (__float_as_uint(bf16_round(acc[mi][nj][0])) >> 16)
                            | (__float_as_uint(bf16_round(acc[mi][nj][1])) & 0xffff0000u);
                *(u32*)(y + (xrow0 + r) * (u64)N + c) = v;
            }
            if (r + 8 < rows) {
                const u32 v = (__float_as_uint(bf16_round(acc[mi][nj][2])) >> 16)
                            | (__float_as_uint(bf16_round(acc[mi][nj][3])) & 0xffff0000u);
                *(u32*)(y + (xrow0 + r + 8) * (u64)N + c) = v;
            }
        }
}

extern "C" __global__ void __launch_bounds__(256, 2) mxfp4_gemm_fwd(const u16* x, const u8* blocks,
        const u8* scales, u16* y, int N, int K, int R, int G, const __grid_constant__ Sched s) {
    mxgemm<0>(x, blocks, scales, y, N, K, R, G, s);
}
extern "C" __global__ void __launch_bounds__(256, 2) mxfp4_gemm_bwd(const u16* x, const u8* blocks,
        const u8* scales, u16* y, int N, int K, int R, int G, const __grid_constant__ Sched s) {
    mxgemm<1>(x, blocks, scales, y, N, K, R, G, s);
}
"#;

pub(crate) static KERNELS: Kernels =
    Kernels::with_deps("gptoss_mxfp4_gemm", &[gptoss_mxfp4::DEVICE_DECODE], SRC);

/// When the fused kernel runs (`GPTOSS_MXFP4_GEMM`: `0` never, `1` whenever it can, unset: when
/// the experts have at most [`AUTO_ROWS`] rows on average).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Never,
    Always,
    Auto,
}

fn mode() -> Mode {
    static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("GPTOSS_MXFP4_GEMM").as_deref() {
        Ok("0") => Mode::Never,
        Ok("1") => Mode::Always,
        _ => Mode::Auto,
    })
}

/// Average rows per expert up to which [`Mode::Auto`] picks the fused kernel. Below it the
/// per-expert path is dominated by decoding whole experts for a few rows (generation: 1–16 rows
/// per expert) and by its two launches per expert; at gpt-oss-20b training sizes (≈ 256 rows per
/// expert at 2048 tokens) cuBLAS's GEMMs on decoded copies are faster on the device (measured on an
/// H200: docs/performance.md).
const AUTO_ROWS: usize = 64;

/// Whether a grouped matmul of `m` bf16 rows over `busy` experts with rows goes through the fused
/// kernel (given that its shapes are supported).
pub(super) fn chosen(dtype: DType, m: usize, busy: usize) -> bool {
    dtype == DType::BF16
        && match mode() {
            Mode::Never => false,
            Mode::Always => true,
            Mode::Auto => m <= AUTO_ROWS * busy.max(1),
        }
}

/// The kernel's `Sched` parameter.
#[repr(C)]
#[derive(Clone, Copy)]
struct Sched {
    count: u32,
    tile0: [u32; MAX_EXPERTS + 1],
    row0: [u32; MAX_EXPERTS],
    rows: [u32; MAX_EXPERTS],
    expert: [u32; MAX_EXPERTS],
}

// SAFETY: plain `repr(C)` u32 data, laid out like the kernel's `struct Sched`.
unsafe impl DeviceRepr for Sched {}

/// Whether the fused kernel runs a call: [`chosen`], `k` a multiple of 32, `n` even, `x` starting
/// on a 16-byte boundary, at most [`MAX_EXPERTS`] experts with rows, row counts within u32.
pub(super) fn supports(
    dtype: DType,
    (k, n): (usize, usize),
    x0: usize,
    spans: &Spans,
    m: usize,
) -> bool {
    let busy = spans.iter().filter(|s| s.2 > 0).count();
    chosen(dtype, m, busy)
        && k % BK == 0
        && k > 0
        && x0 % 8 == 0
        && n % 2 == 0
        && busy <= MAX_EXPERTS
        && u32::try_from(m).is_ok()
}

/// `x` `[M, k]` bf16 (contiguous from element `x0`) times the MXFP4 weight of each span's expert →
/// `out` `[M, n]` bf16 (rows outside the spans untouched). `blocks`/`scales`: the checkpoint
/// tensors' storages from byte/element `b0`/`s0`, `[E, rows, groups, 16]` / `[E, rows, groups]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    x: &CudaStorage,
    x0: usize,
    (blocks, b0): (&CudaStorage, usize),
    (scales, s0): (&CudaStorage, usize),
    (rows, groups, transposed): (usize, usize, bool),
    spans: &Spans,
    out: &mut CudaStorage,
    (k, n): (usize, usize),
) -> candle_core::Result<()> {
    let dev = x.device().clone();
    let ntn = n.div_ceil(BN);
    let mut s = Sched {
        count: 0,
        tile0: [0; MAX_EXPERTS + 1],
        row0: [0; MAX_EXPERTS],
        rows: [0; MAX_EXPERTS],
        expert: [0; MAX_EXPERTS],
    };
    let mut tiles = 0usize;
    for &(e, off, len) in spans.iter().filter(|s| s.2 > 0) {
        let i = s.count as usize;
        if i >= MAX_EXPERTS {
            candle_core::bail!("grouped_matmul: more than {MAX_EXPERTS} experts in one call");
        }
        let u = |v: usize| -> candle_core::Result<u32> {
            u32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("grouped_matmul: {v} > u32")))
        };
        s.tile0[i] = u(tiles)?;
        s.row0[i] = u(off)?;
        s.rows[i] = u(len)?;
        s.expert[i] = u(e)?;
        s.count += 1;
        tiles += len.div_ceil(BM) * ntn;
    }
    if tiles == 0 {
        return Ok(());
    }
    s.tile0[s.count as usize] = u32::try_from(tiles)
        .map_err(|_| candle_core::Error::Msg("grouped_matmul: too many tiles".into()))?;
    let int = |v: usize| -> candle_core::Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("grouped_matmul: {v} > i32")))
    };
    let xv = x.as_cuda_slice::<bf16>()?.slice(x0..);
    let bv = blocks.as_cuda_slice::<u8>()?.slice(b0..);
    let sv = scales.as_cuda_slice::<u8>()?.slice(s0..);
    let ov = out.as_cuda_slice_mut::<bf16>()?;
    let name = if transposed {
        "mxfp4_gemm_bwd"
    } else {
        "mxfp4_gemm_fwd"
    };
    let f = KERNELS.func(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (n32, k32, r32, g32) = (int(n)?, int(k)?, int(rows)?, int(groups)?);
    b.arg(&xv).arg(&bv).arg(&sv).arg(ov);
    b.arg(&n32).arg(&k32).arg(&r32).arg(&g32).arg(&s);
    let cfg = LaunchConfig {
        grid_dim: (int(tiles)? as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds the spans' rows × k bf16 from x0, out the same rows × n; the weight storages
    // hold `rows × groups` blocks (16 bytes) and scales per expert for every expert index of the
    // spans (checked by the caller against the blocks' shape); the kernel reads and writes
    // nothing else (rows past a span's end and columns past n are masked).
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
