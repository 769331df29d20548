//! Run-time compiled CUDA kernels (NVRTC) shared by the fused ops of this workspace.
//!
//! A [`Kernels`] value names one CUDA module: its source (the [`PRELUDE`] of common device helpers
//! followed by the module's own code) is compiled once per process for `sm_90`, and
//! [`Kernels::func`] hands out a launchable function, loaded once per device by candle.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::CudaDevice;

/// Device helpers every module can use: `u16`/`u32`/`u64` typedefs, `ld`/`st` of f32 and bf16
/// (stored as `u16`, round-to-nearest-even like `half::bf16::from_f32`, NaN kept), `ldv`/`stv` of
/// `N` consecutive values in one 4/8/16-byte access, and warp/block max/sum reductions (`block_red`
/// needs `blockDim.x` a multiple of 32 and a `float[32]` scratch).
pub const PRELUDE: &str = r#"
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const u16* p, u64 i) { return __uint_as_float(((u32)p[i]) << 16); }
__device__ __forceinline__ float bf16_round(float v) {
    u32 b = __float_as_uint(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) return __uint_as_float(0x7fc00000u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return __uint_as_float(b & 0xffff0000u);
}
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(u16* p, u64 i, float v) { p[i] = (u16)(__float_as_uint(bf16_round(v)) >> 16); }

// N consecutive elements of p from index i, as f32. VEC: one 4/8/16-byte access (p + i aligned).
template <typename T, int N, bool VEC>
__device__ __forceinline__ void ldv(const T* __restrict__ p, u64 i, float* o) {
    constexpr int B = N * (int)sizeof(T);
    if constexpr (VEC && B >= 4) {
        constexpr int W = B / 4;
        u32 w[W];
        if constexpr (W == 4) {
            const uint4 r = *reinterpret_cast<const uint4*>(p + i);
            w[0] = r.x; w[1] = r.y; w[2] = r.z; w[3] = r.w;
        } else if constexpr (W == 2) {
            const uint2 r = *reinterpret_cast<const uint2*>(p + i);
            w[0] = r.x; w[1] = r.y;
        } else {
            w[0] = *reinterpret_cast<const u32*>(p + i);
        }
#pragma unroll
        for (int q = 0; q < W; ++q) {
            if constexpr (sizeof(T) == 4) {
                o[q] = __uint_as_float(w[q]);
            } else {
                o[2 * q] = __uint_as_float(w[q] << 16);
                o[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
            }
        }
    } else {
#pragma unroll
        for (int q = 0; q < N; ++q) o[q] = ld(p, i + q);
    }
}

template <typename T, int N, bool VEC>
__device__ __forceinline__ void stv(T* __restrict__ p, u64 i, const float* v) {
    constexpr int B = N * (int)sizeof(T);
    if constexpr (VEC && B >= 4) {
        constexpr int W = B / 4;
        u32 w[W];
#pragma unroll
        for (int q = 0; q < W; ++q) {
            if constexpr (sizeof(T) == 4) {
                w[q] = __float_as_uint(v[q]);
            } else {
                w[q] = (__float_as_uint(bf16_round(v[2 * q])) >> 16)
                     | (__float_as_uint(bf16_round(v[2 * q + 1])) & 0xffff0000u);
            }
        }
        if constexpr (W == 4) {
            *reinterpret_cast<uint4*>(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
        } else if constexpr (W == 2) {
            *reinterpret_cast<uint2*>(p + i) = make_uint2(w[0], w[1]);
        } else {
            *reinterpret_cast<u32*>(p + i) = w[0];
        }
    } else {
#pragma unroll
        for (int q = 0; q < N; ++q) st(p, i + q, v[q]);
    }
}

__device__ __forceinline__ float warp_red(float v, bool mx) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = mx ? fmaxf(v, w) : v + w;
    }
    return v;
}

__device__ float block_red(float v, bool mx, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_red(v, mx);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float ident = mx ? __int_as_float(0xff800000) : 0.f;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : ident;
    if (w == 0) v = warp_red(v, mx);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}
"#;

/// One NVRTC module: a name (unique per process) and its source after [`PRELUDE`].
pub struct Kernels {
    module: &'static str,
    deps: &'static [&'static str],
    src: &'static str,
    ptx: OnceLock<Result<String, String>>,
}

impl Kernels {
    /// A module named `module` with device code `src` (compiled on first use).
    pub const fn new(module: &'static str, src: &'static str) -> Self {
        Self::with_deps(module, &[], src)
    }

    /// As [`Self::new`], with device code of other crates (`deps`, in order) between the
    /// [`PRELUDE`] and `src`.
    pub const fn with_deps(
        module: &'static str,
        deps: &'static [&'static str],
        src: &'static str,
    ) -> Self {
        Self {
            module,
            deps,
            src,
            ptx: OnceLock::new(),
        }
    }

    fn ptx(&self) -> candle_core::Result<&str> {
        self.ptx
            .get_or_init(|| {
                let opts = CompileOptions {
                    arch: Some("sm_90"),
                    ..Default::default()
                };
                let deps = self.deps.concat();
                compile_ptx_with_opts(format!("{PRELUDE}{deps}{}", self.src), opts)
                    .map(|p| p.to_src())
                    .map_err(|e| format!("{}: NVRTC compilation failed: {e:?}", self.module))
            })
            .as_deref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// The `extern "C"` kernel `name` of this module on `dev`; launch it on `dev.cuda_stream()`
    /// (`stream.launch_builder(&func)`), the stream candle's own kernels run on.
    pub fn func(&self, dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
        let f = dev.get_or_load_custom_func(name, self.module, self.ptx()?)?;
        Ok((*f).clone())
    }
}

/// The contiguous `[start, end)` element range of a layout, or an error naming `what`.
pub fn contiguous_range(
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input not contiguous")))
}
