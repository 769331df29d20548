//! [`routed_matmul`]: each row of `x` times the MXFP4 weight of *its own* expert, the expert read
//! from a device tensor — the MoE's expert matmuls without grouping the rows by expert first.
//!
//! [`super::grouped_matmul`] needs the rows sorted by expert and the groups' sizes on the host
//! (they set its launches), so the MoE copies the `N·k` routing indices to the host once per layer:
//! a host wait per layer and step, which at decode sizes (a few rows) costs more than the layer's
//! math. Here row `r` of `x` `[M, K]` is multiplied by expert `row_expert[r]`'s weight inside the
//! kernel: nothing leaves the device, the rows keep their routing order (`n·k + j`), and the launch
//! depends only on `M`. Each routed row reads its expert's MXFP4 bytes (4.25 bits per weight) once;
//! rows that share an expert read it again (from L2 when they run together), so the MoE uses this
//! only where the rows are few ([`chosen`]).
//!
//! CUDA kernel (bf16 `x`, weights not transposed): thread block = 8 warps × 4 output columns of one
//! row; the row of `x` is staged in shared memory as f32 (padded by one word per 32 so the lanes'
//! reads hit distinct banks); lane `l` takes the 16-byte MXFP4 blocks `l, l + 32, …` of its four
//! columns' weight rows (coalesced 512-byte loads per warp and column, four in flight), decodes each
//! value exactly (`gptoss_mxfp4`'s `fast_bf16` bits, or `decode` for extreme scales), accumulates in
//! f32 with `fma`, and each column's warp sum is rounded to bf16 once. Elsewhere (CPU, f32, transposed weights) the op is [`routed_matmul_dense`].

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::GroupedWeight;

/// Rows (`N·k`) up to which [`chosen`] lets the MoE use [`routed_matmul`] (`GPTOSS_ROUTED_MATMUL`:
/// `0` never, `1` whenever the kernel applies, unset: up to this many rows). Past it the rows
/// share experts often enough that reading each expert once ([`super::grouped_matmul`]) wins.
/// Measured (H100, gpt-oss-20b shape, decode tok/s routed against grouped, docs/performance.md
/// sessions 14 and 16): 4 rows (batch 1, k = 4) 127 / 97 and 103 / 97, 8 rows (batch 2) 211 / 164,
/// 16 rows (batch 4) 296 / 252, 32 rows (batch 8) 368 / 397 and 372 / 412: routed up to batch 4.
pub const AUTO_ROWS: usize = 16;

/// `x` `[M, in]` and `row_expert` `[M]` u32 (each row's expert), `w` `[E, in, out]` frozen →
/// `[M, out]` in `x`'s dtype: row `r` is `x[r] · w[row_expert[r]]`. Not differentiable (inference
/// only: `x` is detached). On CUDA with bf16 rows and an MXFP4 weight used as stored
/// (`transposed: false`) one kernel; otherwise [`routed_matmul_dense`].
///
/// An index outside `0..E` gives NaN rows on CUDA (the indices are not read on the host) and an
/// error elsewhere.
pub fn routed_matmul(
    x: &Tensor,
    w: &GroupedWeight,
    row_expert: &Tensor,
) -> candle_core::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (_, wk, _) = w.dims()?;
    if wk != k || row_expert.dims() != [m] || row_expert.dtype() != DType::U32 {
        candle_core::bail!(
            "routed_matmul: x {:?}, row_expert {:?} {:?}: expected [M, {wk}] and [M] u32",
            x.dims(),
            row_expert.dims(),
            row_expert.dtype()
        );
    }
    match w {
        GroupedWeight::Packed {
            blocks,
            scales,
            dtype,
            transposed: false,
        } if x.device().is_cuda() && x.dtype() == DType::BF16 && *dtype == DType::BF16 => {
            let op = Routed {
                blocks: blocks.contiguous()?,
                scales: scales.contiguous()?,
            };
            x.detach()
                .contiguous()?
                .apply_op2_no_bwd(&row_expert.contiguous()?, &op)
        }
        _ => routed_matmul_dense(x, w, row_expert),
    }
}

/// [`routed_matmul`] with candle ops (the reference, and the path off CUDA): the routed experts'
/// weights gathered per row ([`GroupedWeight::gathered`]: `[M, in, out]`, only those experts
/// decoded when packed), one batched matmul.
pub fn routed_matmul_dense(
    x: &Tensor,
    w: &GroupedWeight,
    row_expert: &Tensor,
) -> candle_core::Result<Tensor> {
    let per_row = w.gathered(row_expert)?.dense()?;
    x.detach()
        .unsqueeze(1)?
        .matmul(&per_row.to_dtype(x.dtype())?)?
        .squeeze(1)
}

/// Whether the MoE should run `rows` routed rows of `x` through [`routed_matmul`] (CUDA, bf16,
/// at most [`AUTO_ROWS`] rows unless `GPTOSS_ROUTED_MATMUL` says otherwise).
pub fn chosen(x: &Tensor, rows: usize) -> bool {
    let mode = std::env::var("GPTOSS_ROUTED_MATMUL");
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && rows > 0
        && match mode.as_deref() {
            Ok("0") => false,
            Ok("1") => true,
            _ => rows <= AUTO_ROWS,
        }
}

/// The CUDA op: blocks `u8 [E, out, in/32, 16]` and scales `u8 [E, out, in/32]` (contiguous).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Routed {
    blocks: Tensor,
    scales: Tensor,
}

impl CustomOp2 for Routed {
    fn name(&self) -> &'static str {
        "routed-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "routed_matmul: the fused op runs on CUDA only (the CPU uses routed_matmul_dense)"
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        idx: &candle_core::CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::launch(self, x, xl, idx, il)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Shape};
    use half::bf16;

    use super::Routed;
    use crate::nvrtc::{contiguous_range, Kernels};
    use crate::storage::cuda_of;

    /// Output columns per thread block (four per warp).
    const COLS: usize = 32;

    const SRC: &str = r#"
__device__ __forceinline__ u16 bf16_rn(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u16)0x7FC0u;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// y[m, c] = sum_k x[m, k] * W_e[c, k], e = row_expert[m]; W_e: blocks [E, R, G, 16] bytes and
// scales [E, R, G] (R = out, G = K / 32). Grid (ceil(R / 32), M), 256 threads: warp w computes
// columns 4 (8 b + w) .. + 3 of row m = blockIdx.y; dynamic shared memory: G * 33 floats.
extern "C" __global__ void __launch_bounds__(256) routed_mxfp4_matmul(
        const u16* __restrict__ x, const u8* __restrict__ blocks, const u8* __restrict__ scales,
        const u32* __restrict__ row_expert, u16* __restrict__ y, int R, int G, int E) {
    extern __shared__ float xs[];
    const u64 m = blockIdx.y;
    const int K = G * 32;
    const u16* xr = x + m * (u64)K;
    for (int i = threadIdx.x; i < K; i += blockDim.x)
        xs[(i >> 5) * 33 + (i & 31)] = __uint_as_float((u32)xr[i] << 16);
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c0 = (blockIdx.x * 8 + warp) * 4;
    if (c0 >= R) return;
    const u32 e = row_expert[m];
    if (e >= (u32)E) {
        if (lane < 4 && c0 + lane < R) y[m * (u64)R + c0 + lane] = (u16)0x7FC0u;
        return;
    }
    const u64 row0 = (u64)e * (u64)R + (u64)c0;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int g = lane; g < G; g += 32) {
        uint4 q[4];
        int ex[4];
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
            const bool in = c0 + cc < R;
            const u64 blk = (row0 + cc) * (u64)G + g;
            q[cc] = in ? __ldg(reinterpret_cast<const uint4*>(blocks) + blk) : make_uint4(0u, 0u, 0u, 0u);
            ex[cc] = in ? (int)__ldg(scales + blk) - 127 : 0;
        }
        const float* xv = xs + g * 33;
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
            const u32 w[4] = {q[cc].x, q[cc].y, q[cc].z, q[cc].w};
            const int e2 = ex[cc];
            float a = acc[cc];
            if (e2 >= -125 && e2 <= 125) {
#pragma unroll
                for (int j = 0; j < 32; ++j)
                    a = fmaf(__uint_as_float(fast_bf16((w[j >> 3] >> (4 * (j & 7))) & 15u, e2) << 16), xv[j], a);
            } else {
#pragma unroll
                for (int j = 0; j < 32; ++j)
                    a = fmaf(decode((w[j >> 3] >> (4 * (j & 7))) & 15u, e2), xv[j], a);
            }
            acc[cc] = a;
        }
    }
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[cc] += __shfl_xor_sync(0xFFFFFFFFu, acc[cc], o);
    }
    if (lane < 4 && c0 + lane < R) {
        const float v = lane == 0 ? acc[0] : lane == 1 ? acc[1] : lane == 2 ? acc[2] : acc[3];
        y[m * (u64)R + c0 + lane] = bf16_rn(v);
    }
}
"#;

    pub(crate) static KERNELS: Kernels =
        Kernels::with_deps("gptoss_routed", &[gptoss_mxfp4::DEVICE_DECODE], SRC);

    pub(super) fn launch(
        op: &Routed,
        x: &CudaStorage,
        xl: &Layout,
        idx: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (e, r, g, _) = op.blocks.dims4()?;
        if g * 32 != k || op.scales.dims() != [e, r, g] {
            candle_core::bail!(
                "routed_matmul: blocks {:?} / scales {:?} do not take {k} inputs",
                op.blocks.dims(),
                op.scales.dims()
            );
        }
        let (x0, _) = contiguous_range(xl, "routed_matmul: x")?;
        let (i0, _) = contiguous_range(il, "routed_matmul: row_expert")?;
        let (bs, bl) = op.blocks.storage_and_layout();
        let (ss, sl) = op.scales.storage_and_layout();
        let (b0, _) = contiguous_range(bl, "routed_matmul: blocks")?;
        let (s0, _) = contiguous_range(sl, "routed_matmul: scales")?;
        if b0 % 16 != 0 {
            candle_core::bail!("routed_matmul: the blocks must start on a 16-byte boundary");
        }
        let dev = x.device().clone();
        let shape = Shape::from((m, r));
        // SAFETY: the kernel writes every element (rows 0..m, columns 0..r).
        let mut out = unsafe { dev.alloc_uninit(&shape, candle_core::DType::BF16)? };
        let int = |v: usize| -> candle_core::Result<i32> {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("routed_matmul: {v} > i32")))
        };
        let grid_y = u32::try_from(m)
            .ok()
            .filter(|&v| v <= 65_535)
            .ok_or_else(|| candle_core::Error::Msg(format!("routed_matmul: {m} rows > 65535")))?;
        let xv = x.as_cuda_slice::<bf16>()?.slice(x0..);
        let iv = idx.as_cuda_slice::<u32>()?.slice(i0..);
        let bv = cuda_of(&bs, "routed_matmul: blocks")?
            .as_cuda_slice::<u8>()?
            .slice(b0..);
        let sv = cuda_of(&ss, "routed_matmul: scales")?
            .as_cuda_slice::<u8>()?
            .slice(s0..);
        let ov = out.as_cuda_slice_mut::<bf16>()?;
        let f = KERNELS.func(&dev, "routed_mxfp4_matmul")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (r32, g32, e32) = (int(r)?, int(g)?, int(e)?);
        b.arg(&xv).arg(&bv).arg(&sv).arg(&iv).arg(ov);
        b.arg(&r32).arg(&g32).arg(&e32);
        let cfg = LaunchConfig {
            grid_dim: (int(r.div_ceil(COLS))? as u32, grid_y, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: u32::try_from(g * 33 * 4)
                .map_err(|_| candle_core::Error::Msg("routed_matmul: K too large".into()))?,
        };
        // SAFETY: x holds m × k bf16 from x0 and row_expert m u32 from i0; the blocks and scales
        // hold e × r × g blocks (16 bytes) and scales (shapes checked above); an index ≥ e is not
        // dereferenced (NaN row); out is m × r bf16, each element written once.
        unsafe { b.launch(cfg) }.w()?;
        drop((bs, ss));
        Ok((out, shape))
    }
}

#[cfg(feature = "cuda")]
pub(crate) use cuda::KERNELS;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The dense path is each row times its own expert.
    #[test]
    fn dense_rows_use_their_own_expert() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (e, k, n) = (3, 4, 5);
        let w = Tensor::randn(0f32, 1.0, (e, k, n), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (4, k), &dev)?;
        let idx = Tensor::new(&[2u32, 0, 2, 1], &dev)?;
        let y = routed_matmul(&x, &GroupedWeight::Dense(w.clone()), &idx)?;
        for (r, &ex) in [2usize, 0, 2, 1].iter().enumerate() {
            let want = x.narrow(0, r, 1)?.matmul(&w.get(ex)?)?.squeeze(0)?;
            let d = (y.get(r)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "row {r} differs by {d}");
        }
        assert!(routed_matmul(&x, &GroupedWeight::Dense(w), &Tensor::new(&[0u32], &dev)?).is_err());
        Ok(())
    }
}
