//! Run-time compiled CUDA kernels (NVRTC) shared by the fused ops of this workspace.
//!
//! A [`Kernels`] value names one CUDA module: its source (the [`PRELUDE`] of common device helpers
//! followed by the module's own code) is compiled once per process for `sm_90`, and
//! [`Kernels::func`] hands out a launchable function, loaded once per device by candle.
//!
//! Compiled PTX is kept on disk ([`cache_dir`]: `GPTOSS_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/gptoss/kernels`, else `~/.cache/gptoss/kernels`; `GPTOSS_KERNEL_CACHE=off`
//! disables it), one file per module and source version, next to the exact source it was made
//! from: a cached file is used only when its recorded source equals the current one, so an edited
//! kernel is recompiled and a stale file is never run. [`precompile_all`] compiles every module of
//! the crate on parallel threads (what [`precompile_in_background`] starts while a model loads), so
//! that the first forward of a process finds its kernels ready.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
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
                let src = format!("{PRELUDE}{}{}", self.deps.concat(), self.src);
                let cached = cache_dir().map(|d| CachedPtx::new(&d, self.module, &src));
                if let Some(ptx) = cached.as_ref().and_then(CachedPtx::read) {
                    return Ok(ptx);
                }
                let opts = CompileOptions {
                    arch: Some(ARCH),
                    ..Default::default()
                };
                let ptx = compile_ptx_with_opts(&src, opts)
                    .map(|p| p.to_src())
                    .map_err(|e| format!("{}: NVRTC compilation failed: {e:?}", self.module))?;
                if let Some(c) = &cached {
                    // a cache that cannot be written only costs the next process a compile
                    let _ = c.write(&ptx);
                }
                Ok(ptx)
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

/// The GPU architecture every module is compiled for.
const ARCH: &str = "sm_90";

/// Where compiled PTX is kept: `GPTOSS_KERNEL_CACHE` (`off` or empty: nowhere), else
/// `$XDG_CACHE_HOME/gptoss/kernels`, else `$HOME/.cache/gptoss/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("GPTOSS_KERNEL_CACHE") {
        Some(v) if v.is_empty() || v == "off" || v == "0" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("gptoss").join("kernels")),
    }
}

/// One module's cache entry: `<module>-<hash>.ptx` with the source it was compiled from beside
/// it in `<module>-<hash>.cu` (the hash only spreads versions over file names; equality of the
/// recorded source decides a hit).
struct CachedPtx {
    ptx: PathBuf,
    src_path: PathBuf,
    key: String,
}

impl CachedPtx {
    fn new(dir: &std::path::Path, module: &str, src: &str) -> Self {
        let key = format!("// {ARCH}\n{src}");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let stem = format!("{module}-{:016x}", h.finish());
        Self {
            ptx: dir.join(format!("{stem}.ptx")),
            src_path: dir.join(format!("{stem}.cu")),
            key,
        }
    }

    /// The cached PTX when its recorded source is this one.
    fn read(&self) -> Option<String> {
        let recorded = std::fs::read_to_string(&self.src_path).ok()?;
        if recorded != self.key {
            return None;
        }
        std::fs::read_to_string(&self.ptx).ok()
    }

    /// Writes the PTX, then the source that validates it, each through a temporary file and a
    /// rename (a reader never sees half a file; a crash between the two leaves a miss).
    fn write(&self, ptx: &str) -> std::io::Result<()> {
        if let Some(d) = self.ptx.parent() {
            std::fs::create_dir_all(d)?;
        }
        for (path, text) in [(&self.ptx, ptx), (&self.src_path, self.key.as_str())] {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    }
}

/// Every NVRTC module of this crate.
fn all_modules() -> [&'static Kernels; 11] {
    [
        &crate::adamw::cuda::KERNELS,
        &crate::attention::flash::KERNELS,
        &crate::attention::sink_softmax::cuda::KERNELS,
        &crate::grouped::mxfp4_gemm::KERNELS,
        &crate::grouped::routed::KERNELS,
        &crate::lm_loss::cuda::KERNELS,
        &crate::lora::cuda::KERNELS,
        &crate::moe::cuda::KERNELS,
        &crate::norm::cuda::KERNELS,
        &crate::rope::cuda::KERNELS,
        &crate::scaled_delta::cuda::KERNELS,
    ]
}

/// Compiles (or reads from the cache) every module of the crate, one thread per module; returns
/// the first compilation error. Later [`Kernels::func`] calls find the PTX ready.
pub fn precompile_all() -> candle_core::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = all_modules()
            .into_iter()
            .map(|k| s.spawn(move || k.ptx().map(|_| ())))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(candle_core::Error::Msg(
                        "NVRTC compile thread panicked".into(),
                    ))
                })
            })
            .collect::<candle_core::Result<Vec<()>>>()
            .map(|_| ())
    })
}

/// Starts [`precompile_all`] on a background thread and returns at once (errors surface again
/// at the kernel's first use, where they name the module).
pub fn precompile_in_background() {
    std::thread::spawn(|| {
        let _ = precompile_all();
    });
}

/// The contiguous `[start, end)` element range of a layout, or an error naming `what`.
pub fn contiguous_range(
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input not contiguous")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_ptx_is_used_only_for_its_own_source() {
        let dir = std::env::temp_dir().join(format!("gptoss-ptx-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = CachedPtx::new(&dir, "m", "extern \"C\" __global__ void f() {}");
        assert_eq!(a.read(), None, "empty cache");
        a.write(".version 8.0\n// a").unwrap();
        assert_eq!(a.read().as_deref(), Some(".version 8.0\n// a"));
        // an edited kernel is a miss, also when its file name collides with the old one's
        let b = CachedPtx::new(&dir, "m", "extern \"C\" __global__ void g() {}");
        assert_eq!(b.read(), None);
        let forged = CachedPtx {
            ptx: a.ptx.clone(),
            src_path: a.src_path.clone(),
            key: b.key.clone(),
        };
        assert_eq!(forged.read(), None, "recorded source differs: not a hit");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_module_compiles() {
        precompile_all().unwrap();
    }
}
