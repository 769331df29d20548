//! PEFT's `lora_A(x.to(float32))` for a bf16 (or f32) input: `h = x·Aᵀ` in f32.
//!
//! The candle composition casts the `[N, in]` input to a new f32 tensor (kept by autograd), runs an
//! f32 GEMM with only `r` output columns, and in the backward runs two more f32 GEMMs and a cast of
//! `∂x` back to the input's dtype. On CUDA [`down_proj`] does each direction in fused kernels that
//! read `x` in its own dtype (the conversion to f32 is exact): one warp per row for `h`, one thread per
//! four inputs for `∂x = ∂h·A` (rounded once to `x`'s dtype, as the cast's backward does), and a
//! two-pass deterministic column reduction for `∂A = ∂hᵀ·x`. Sums run in f32 in a different order
//! than cuBLAS's, so values agree with the composition to f32 rounding (GPU test `cuda_down_proj`).
//! Elsewhere, or for shapes the kernels do not take (rank above [`MAX_RANK`], `in` not a multiple of
//! 4), it is the composition.

use candle_core::{DType, Result, Tensor};

/// The largest rank the CUDA kernels take.
pub const MAX_RANK: usize = 16;

/// `x` `[N, in]` (f32 or bf16) · `a` `[r, in]` (f32)ᵀ → `[N, r]` f32, differentiable in `x` and `a`;
/// equal to `x.to_dtype(F32)?.matmul(&a.t()?)` up to f32 summation order.
pub fn down_proj(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::takes(x, a)? {
        return x.contiguous()?.apply_op2(&a.contiguous()?, cuda::DownFwd);
    }
    x.to_dtype(DType::F32)?.matmul(&a.t()?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
    use gptoss_model::nvrtc::{contiguous_range, Kernels};

    use super::MAX_RANK;

    const SRC: &str = r#"
#define RMAX 16

// Four consecutive values of x from element i (i a multiple of 4, the row 8- or 16-byte aligned).
__device__ __forceinline__ void ld4(const u16* p, u64 i, float* v) {
    const uint2 u = *reinterpret_cast<const uint2*>(p + i);
    v[0] = __uint_as_float(u.x << 16); v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16); v[3] = __uint_as_float(u.y & 0xffff0000u);
}
__device__ __forceinline__ void ld4(const float* p, u64 i, float* v) {
    const float4 u = *reinterpret_cast<const float4*>(p + i);
    v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
}

// h[row, j] = sum_i x[row, i] a[j, i]: one block per RPW rows (each A load serves all of them), its
// warps splitting i (a warp takes every (blockDim.x / 32)-th run of 128 inputs); the warps' partial
// sums are added in shared memory, in warp order.
#define RPW 4
template <typename T>
__device__ void fwd(const T* __restrict__ x, const float* __restrict__ a, float* __restrict__ h,
                    int n, int in, int r) {
    __shared__ float part[32][RPW][RMAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const u64 row0 = (u64)blockIdx.x * RPW;
    float acc[RPW][RMAX];
#pragma unroll
    for (int q = 0; q < RPW; ++q)
#pragma unroll
        for (int j = 0; j < RMAX; ++j) acc[q][j] = 0.f;
    for (int i = (warp * 32 + lane) * 4; i < in; i += warps * 128) {
        float v[RPW][4];
#pragma unroll
        for (int q = 0; q < RPW; ++q) {
            if (row0 + q < (u64)n) ld4(x, (row0 + q) * in + i, v[q]);
            else v[q][0] = v[q][1] = v[q][2] = v[q][3] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < RMAX; ++j) {
            if (j < r) {
                const float4 w = *reinterpret_cast<const float4*>(a + (u64)j * in + i);
#pragma unroll
                for (int q = 0; q < RPW; ++q)
                    acc[q][j] = fmaf(v[q][3], w.w, fmaf(v[q][2], w.z, fmaf(v[q][1], w.y, fmaf(v[q][0], w.x, acc[q][j]))));
            }
        }
    }
#pragma unroll
    for (int q = 0; q < RPW; ++q) {
#pragma unroll
        for (int j = 0; j < RMAX; ++j) {
            if (j < r) {
                const float s = warp_red(acc[q][j], false);
                if (lane == 0) part[warp][q][j] = s;
            }
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < RPW * r; t += blockDim.x) {
        const int q = t / r, j = t % r;
        if (row0 + q < (u64)n) {
            float s = 0.f;
            for (int w = 0; w < warps; ++w) s += part[w][q][j];
            h[(row0 + q) * r + j] = s;
        }
    }
}

// dx[row, i..i+4] = sum_j g[row, j] a[j, i..i+4], rounded to T: one thread per four outputs of
// RPW rows (each A load serves all of them).
template <typename T>
__device__ void dx(const float* __restrict__ g, const float* __restrict__ a, T* __restrict__ out,
                   int n, int in, int r) {
    const u64 quads = in / 4;
    const u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 groups = ((u64)n + RPW - 1) / RPW;
    if (q >= groups * quads) return;
    const u64 row0 = q / quads * RPW;
    const int i = (int)(q % quads) * 4;
    float s[RPW][4];
#pragma unroll
    for (int p = 0; p < RPW; ++p) s[p][0] = s[p][1] = s[p][2] = s[p][3] = 0.f;
    for (int j = 0; j < r; ++j) {
        const float4 w = *reinterpret_cast<const float4*>(a + (u64)j * in + i);
#pragma unroll
        for (int p = 0; p < RPW; ++p) {
            const float gj = row0 + p < (u64)n ? g[(row0 + p) * r + j] : 0.f;
            s[p][0] = fmaf(gj, w.x, s[p][0]); s[p][1] = fmaf(gj, w.y, s[p][1]);
            s[p][2] = fmaf(gj, w.z, s[p][2]); s[p][3] = fmaf(gj, w.w, s[p][3]);
        }
    }
#pragma unroll
    for (int p = 0; p < RPW; ++p) {
        if (row0 + p < (u64)n) {
            const u64 o = (row0 + p) * in + i;
            st(out, o, s[p][0]); st(out, o + 1, s[p][1]); st(out, o + 2, s[p][2]); st(out, o + 3, s[p][3]);
        }
    }
}

// part[s, j, i] = sum over rows s·per .. of g[row, j] x[row, i]: one thread per column i.
template <typename T>
__device__ void da_part(const float* __restrict__ g, const T* __restrict__ x, float* __restrict__ part,
                        int n, int in, int r, int per) {
    __shared__ float gs[32][RMAX];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = blockIdx.y;
    const int n0 = s * per, n1 = min(n, n0 + per);
    float acc[RMAX];
#pragma unroll
    for (int j = 0; j < RMAX; ++j) acc[j] = 0.f;
    for (int base = n0; base < n1; base += 32) {
        __syncthreads();
        for (int t = threadIdx.x; t < 32 * r; t += blockDim.x) {
            const int rr = t / r, j = t % r;
            gs[rr][j] = base + rr < n1 ? g[(u64)(base + rr) * r + j] : 0.f;
        }
        __syncthreads();
        const int m = min(32, n1 - base);
        if (i < in) {
            // four rows' loads in flight; rows past m have g = 0 and x = 0 (acc unchanged)
            for (int rr = 0; rr < m; rr += 4) {
                float xv[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) xv[u] = rr + u < m ? ld(x, (u64)(base + rr + u) * in + i) : 0.f;
#pragma unroll
                for (int u = 0; u < 4; ++u)
#pragma unroll
                    for (int j = 0; j < RMAX; ++j) if (j < r) acc[j] = fmaf(gs[rr + u][j], xv[u], acc[j]);
            }
        }
    }
    if (i < in) {
#pragma unroll
        for (int j = 0; j < RMAX; ++j) if (j < r) part[((u64)s * r + j) * in + i] = acc[j];
    }
}

// da[k] = sum_s part[s, k] (k over r·in), in order of s.
__device__ void da_sum(const float* __restrict__ part, float* __restrict__ da, int splits, u64 ri) {
    const u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= ri) return;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += part[(u64)s * ri + k];
    da[k] = v;
}

extern "C" __global__ void lora_down_fwd_f32(const float* x, const float* a, float* h, int n, int in, int r) { fwd<float>(x, a, h, n, in, r); }
extern "C" __global__ void lora_down_fwd_bf16(const u16* x, const float* a, float* h, int n, int in, int r) { fwd<u16>(x, a, h, n, in, r); }
extern "C" __global__ void lora_down_dx_f32(const float* g, const float* a, float* o, int n, int in, int r) { dx<float>(g, a, o, n, in, r); }
extern "C" __global__ void lora_down_dx_bf16(const float* g, const float* a, u16* o, int n, int in, int r) { dx<u16>(g, a, o, n, in, r); }
extern "C" __global__ void lora_down_da_part_f32(const float* g, const float* x, float* p, int n, int in, int r, int per) { da_part<float>(g, x, p, n, in, r, per); }
extern "C" __global__ void lora_down_da_part_bf16(const float* g, const u16* x, float* p, int n, int in, int r, int per) { da_part<u16>(g, x, p, n, in, r, per); }
extern "C" __global__ void lora_down_da_sum(const float* p, float* da, int splits, u64 ri) { da_sum(p, da, splits, ri); }
"#;

    static KERNELS: Kernels = Kernels::new("gptoss_lora_down", SRC);

    /// Whether the kernels take `x`, `a`: CUDA, x f32/bf16 `[N, in]`, a f32 `[r ≤ MAX_RANK, in]`,
    /// `in` a multiple of 4.
    pub(super) fn takes(x: &Tensor, a: &Tensor) -> Result<bool> {
        if !x.device().is_cuda() || x.rank() != 2 || a.rank() != 2 {
            return Ok(false);
        }
        let (_, in_dim) = x.dims2()?;
        let (r, a_in) = a.dims2()?;
        Ok(matches!(x.dtype(), DType::F32 | DType::BF16)
            && a.dtype() == DType::F32
            && a_in == in_dim
            && in_dim % 4 == 0
            && (1..=MAX_RANK).contains(&r))
    }

    fn int(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("lora down_proj: {what} = {v} > i32")))
    }

    /// A contiguous view's start, required to be a multiple of 4 elements (the 8/16-byte loads).
    fn start4(l: &Layout, what: &str) -> Result<(usize, usize)> {
        let (a, b) = contiguous_range(l, what)?;
        if a % 4 != 0 {
            candle_core::bail!("lora down_proj: {what} starts at element {a}, not a multiple of 4");
        }
        Ok((a, b))
    }

    fn cfg(blocks: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The forward, differentiable in both inputs.
    pub(super) struct DownFwd;

    impl CustomOp2 for DownFwd {
        fn name(&self) -> &'static str {
            "lora_down_fwd"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("lora_down_fwd: CUDA only (down_proj uses the candle ops elsewhere)")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (n, in_dim) = xl.shape().dims2()?;
            let (r, _) = wl.shape().dims2()?;
            let (x0, x1) = start4(xl, "x")?;
            let (a0, a1) = start4(wl, "a")?;
            let dev = xs.device().clone();
            let stream = dev.cuda_stream();
            let CudaStorageSlice::F32(aw) = &ws.slice else {
                candle_core::bail!("lora_down_fwd: a must be f32");
            };
            let av = aw.slice(a0..a1);
            // SAFETY: the kernel writes every one of the n·r outputs.
            let mut h = unsafe { dev.alloc::<f32>(n * r)? };
            let (ni, ii, ri) = (int(n, "N")?, int(in_dim, "in")?, int(r, "r")?);
            if n > 0 {
                macro_rules! run {
                    ($s:expr, $name:literal) => {{
                        let func = KERNELS.func(&dev, $name)?;
                        let xv = $s.slice(x0..x1);
                        let mut b = stream.launch_builder(&func);
                        b.arg(&xv);
                        b.arg(&av);
                        b.arg(&mut h);
                        b.arg(&ni);
                        b.arg(&ii);
                        b.arg(&ri);
                        // SAFETY: argument types and order match the kernel; x holds n·in values,
                        // a r·in, h n·r; one block of 8 warps per 4 rows.
                        unsafe { b.launch(cfg(n.div_ceil(4), 256)) }.w()?;
                    }};
                }
                match &xs.slice {
                    CudaStorageSlice::F32(s) => run!(s, "lora_down_fwd_f32"),
                    CudaStorageSlice::BF16(s) => run!(s, "lora_down_fwd_bf16"),
                    _ => candle_core::bail!("lora_down_fwd: x must be f32 or bf16"),
                }
            }
            Ok((CudaStorage::wrap_cuda_slice(h, dev), Shape::from((n, r))))
        }

        fn bwd(
            &self,
            x: &Tensor,
            a: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let g = g.contiguous()?;
            let dx = g.apply_op2_no_bwd(a, &DownDx { dtype: x.dtype() })?;
            let da = g.apply_op2_no_bwd(x, &DownDa)?;
            Ok((Some(dx), Some(da)))
        }
    }

    /// `∂x = g·A` in `dtype`: args `(g [N, r] f32, a [r, in] f32)`.
    struct DownDx {
        dtype: DType,
    }

    impl CustomOp2 for DownDx {
        fn name(&self) -> &'static str {
            "lora_down_dx"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("lora_down_dx: CUDA only")
        }

        fn cuda_fwd(
            &self,
            gs: &CudaStorage,
            gl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (n, r) = gl.shape().dims2()?;
            let (_, in_dim) = wl.shape().dims2()?;
            let (g0, g1) = contiguous_range(gl, "g")?;
            let (a0, a1) = start4(wl, "a")?;
            let dev = gs.device().clone();
            let stream = dev.cuda_stream();
            let (CudaStorageSlice::F32(gw), CudaStorageSlice::F32(aw)) = (&gs.slice, &ws.slice)
            else {
                candle_core::bail!("lora_down_dx: g and a must be f32");
            };
            let (gv, av) = (gw.slice(g0..g1), aw.slice(a0..a1));
            let (ni, ii, ri) = (int(n, "N")?, int(in_dim, "in")?, int(r, "r")?);
            // one thread per 4 outputs of 4 rows
            let quads = n.div_ceil(4) * (in_dim / 4);
            macro_rules! run {
                ($t:ty, $name:literal) => {{
                    // SAFETY: the kernel writes every one of the n·in outputs.
                    let mut o = unsafe { dev.alloc::<$t>(n * in_dim)? };
                    if quads > 0 {
                        let func = KERNELS.func(&dev, $name)?;
                        let mut b = stream.launch_builder(&func);
                        b.arg(&gv);
                        b.arg(&av);
                        b.arg(&mut o);
                        b.arg(&ni);
                        b.arg(&ii);
                        b.arg(&ri);
                        // SAFETY: argument types and order match the kernel; one thread per 4
                        // outputs of 4 rows.
                        unsafe { b.launch(cfg(quads.div_ceil(256), 256)) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(o, dev.clone())
                }};
            }
            let out = match self.dtype {
                DType::F32 => run!(f32, "lora_down_dx_f32"),
                DType::BF16 => run!(half::bf16, "lora_down_dx_bf16"),
                d => candle_core::bail!("lora_down_dx: unsupported dtype {d:?}"),
            };
            Ok((out, Shape::from((n, in_dim))))
        }
    }

    /// `∂A = gᵀ·x` f32: args `(g [N, r] f32, x [N, in])`.
    struct DownDa;

    impl CustomOp2 for DownDa {
        fn name(&self) -> &'static str {
            "lora_down_da"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("lora_down_da: CUDA only")
        }

        fn cuda_fwd(
            &self,
            gs: &CudaStorage,
            gl: &Layout,
            xs: &CudaStorage,
            xl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (n, r) = gl.shape().dims2()?;
            let (_, in_dim) = xl.shape().dims2()?;
            let (g0, g1) = contiguous_range(gl, "g")?;
            let (x0, x1) = contiguous_range(xl, "x")?;
            let dev = gs.device().clone();
            let stream = dev.cuda_stream();
            let CudaStorageSlice::F32(gw) = &gs.slice else {
                candle_core::bail!("lora_down_da: g must be f32");
            };
            let gv = gw.slice(g0..g1);
            let cols = in_dim.div_ceil(256);
            // about four blocks per SM of an H100/H200, at least 32 rows each
            let splits = (528 / cols.max(1)).clamp(1, n.div_ceil(32).max(1));
            let per = n.div_ceil(splits).max(1);
            let ri = r * in_dim;
            // SAFETY: da_part writes every partial of the splits·r·in.
            let mut part = unsafe { dev.alloc::<f32>(splits * ri)? };
            // SAFETY: da_sum writes every one of the r·in outputs.
            let mut da = unsafe { dev.alloc::<f32>(ri)? };
            let (ni, ii, rr, pi, si) = (
                int(n, "N")?,
                int(in_dim, "in")?,
                int(r, "r")?,
                int(per, "rows")?,
                int(splits, "splits")?,
            );
            if ri > 0 {
                macro_rules! run {
                    ($s:expr, $name:literal) => {{
                        let func = KERNELS.func(&dev, $name)?;
                        let xv = $s.slice(x0..x1);
                        let mut b = stream.launch_builder(&func);
                        b.arg(&gv);
                        b.arg(&xv);
                        b.arg(&mut part);
                        b.arg(&ni);
                        b.arg(&ii);
                        b.arg(&rr);
                        b.arg(&pi);
                        let c = LaunchConfig {
                            grid_dim: (cols as u32, splits as u32, 1),
                            block_dim: (256, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        // SAFETY: argument types and order match the kernel; g holds n·r, x n·in,
                        // part splits·r·in values.
                        unsafe { b.launch(c) }.w()?;
                    }};
                }
                match &xs.slice {
                    CudaStorageSlice::F32(s) => run!(s, "lora_down_da_part_f32"),
                    CudaStorageSlice::BF16(s) => run!(s, "lora_down_da_part_bf16"),
                    _ => candle_core::bail!("lora_down_da: x must be f32 or bf16"),
                }
                let func = KERNELS.func(&dev, "lora_down_da_sum")?;
                let ri64 = ri as u64;
                let mut b = stream.launch_builder(&func);
                b.arg(&part);
                b.arg(&mut da);
                b.arg(&si);
                b.arg(&ri64);
                // SAFETY: argument types and order match the kernel; part holds splits·r·in values.
                unsafe { b.launch(cfg(ri.div_ceil(256), 256)) }.w()?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(da, dev),
                Shape::from((r, in_dim)),
            ))
        }
    }
}
