//! Fused attention softmax with learned sinks (forward and backward), for the CUDA path.
//!
//! `p[b,h,i,j] = exp(s·scale + mask − m) / (Σ_j exp(s·scale + mask − m) + exp(sink[h] − m))` with
//! `m = max(max_j(s·scale + mask), sink[h])`, computed in f32 from bf16/f32 scores, in one kernel
//! (one thread block per row) instead of the dozen candle ops over `[B, nh, T, Tk]` tensors of the
//! reference path in `attention.rs`. The backward is `∂s = scale · p ⊙ (g − Σ_j g·p)` (the sink
//! column is not part of the output; sinks are frozen and get no gradient).
//!
//! The CPU implementation of both ops is the reference the kernels are tested against.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::storage::{cpu_f32, cpu_out};

/// Softmax with sinks: `scores` raw `q·kᵀ` `[B, nh, T, Tk]` (bf16 or f32), `mask` additive
/// `[B or 1, 1, T, Tk]` (same dtype; 0 or −inf), `sinks` `[nh]` (any float dtype), `scale` the
/// `1/√d` factor → probabilities `[B, nh, T, Tk]` in the scores' dtype. Differentiable in `scores`.
pub fn sink_softmax(
    scores: &Tensor,
    mask: Option<&Tensor>,
    sinks: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, _nh, t, tk) = scores.dims4()?;
    let scores = scores.contiguous()?;
    let mask = match mask {
        Some(m) => m.to_dtype(scores.dtype())?.contiguous()?,
        None => Tensor::zeros((1, 1, t, tk), scores.dtype(), scores.device())?,
    };
    let (mb, one, mt, mtk) = mask.dims4()?;
    if one != 1 || mt != t || mtk != tk || (mb != 1 && mb != b) {
        candle_core::bail!(
            "sink_softmax: mask {:?} does not fit scores {:?}",
            mask.dims(),
            scores.dims()
        );
    }
    let sinks = sinks.to_dtype(DType::F32)?.contiguous()?;
    scores.apply_op3(
        &mask,
        &sinks,
        SinkSoftmax {
            scale: scale as f32,
        },
    )
}

struct SinkSoftmax {
    scale: f32,
}

struct SinkSoftmaxBwd {
    scale: f32,
}

/// (rows, Tk, T, nh, mask batch) of a scores layout and mask layout.
fn dims(l: &Layout, ml: &Layout) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let (b, nh, t, tk) = l.shape().dims4()?;
    let mb = ml.shape().dims4()?.0;
    Ok((b * nh * t, tk, t, nh, mb))
}

impl CustomOp3 for SinkSoftmax {
    fn name(&self) -> &'static str {
        "sink-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        k: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, tk, t, nh, mb) = dims(l, ml)?;
        let (sv, mv, kv) = (
            cpu_f32(s, l, "sink_softmax")?,
            cpu_f32(m, ml, "sink_softmax mask")?,
            cpu_f32(k, kl, "sink_softmax sinks")?,
        );
        let mut out = vec![0f32; rows * tk];
        for r in 0..rows {
            let i = r % t;
            let h = (r / t) % nh;
            let b = r / (t * nh);
            let mrow = &mv[((if mb > 1 { b } else { 0 }) * t + i) * tk..][..tk];
            let srow = &sv[r * tk..][..tk];
            let x: Vec<f32> = srow
                .iter()
                .zip(mrow)
                .map(|(s, m)| s * self.scale + m)
                .collect();
            let mx = x.iter().fold(kv[h], |a, &v| a.max(v));
            let sum: f32 = x.iter().map(|v| (v - mx).exp()).sum::<f32>() + (kv[h] - mx).exp();
            for (o, v) in out[r * tk..][..tk].iter_mut().zip(&x) {
                *o = (v - mx).exp() / sum;
            }
        }
        Ok((cpu_out(out, s.dtype(), "sink_softmax")?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, tk, t, nh, mb) = dims(l, ml)?;
        let out = cuda::forward(s, l, m, ml, k, kl, (rows, tk, t, nh, mb), self.scale)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _m: &Tensor,
        _k: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ds = sink_softmax_grad(res, grad, self.scale as f64)?;
        Ok((Some(ds), None, None))
    }
}

/// The backward of [`sink_softmax`] as a plain function: probabilities `p` and their gradient `g`
/// (`[.., Tk]`, same shape) → `∂s = scale · p ⊙ (g − Σ_j g·p)` in `p`'s dtype (not differentiable).
pub(crate) fn sink_softmax_grad(p: &Tensor, g: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let g = g.to_dtype(p.dtype())?.contiguous()?;
    p.contiguous()?.apply_op2_no_bwd(
        &g,
        &SinkSoftmaxBwd {
            scale: scale as f32,
        },
    )
}

impl CustomOp2 for SinkSoftmaxBwd {
    fn name(&self) -> &'static str {
        "sink-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let tk = *pl.shape().dims().last().unwrap_or(&1);
        let (pv, gv) = (
            cpu_f32(p, pl, "sink_softmax backward")?,
            cpu_f32(g, gl, "sink_softmax backward")?,
        );
        let mut out = vec![0f32; pv.len()];
        for ((o, p), g) in out.chunks_mut(tk).zip(pv.chunks(tk)).zip(gv.chunks(tk)) {
            let dot: f32 = p.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((o, p), g) in o.iter_mut().zip(p).zip(g) {
                *o = self.scale * p * (g - dot);
            }
        }
        Ok((
            cpu_out(out, p.dtype(), "sink_softmax backward")?,
            pl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let tk = *pl.shape().dims().last().unwrap_or(&1);
        let rows = pl.shape().elem_count() / tk.max(1);
        Ok((
            cuda::backward(p, pl, g, gl, rows, tk, self.scale)?,
            pl.shape().clone(),
        ))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::bf16;

    use crate::nvrtc::{contiguous_range, Kernels};

    const THREADS: u32 = 256;
    /// Row elements each thread keeps in registers (rows up to `THREADS · PER_THREAD` keys are read
    /// once; longer rows are re-read from memory).
    const SRC: &str = r#"
#define PER_THREAD 16

template <typename T>
__device__ void fwd(const T* __restrict__ s, const T* __restrict__ m, const float* __restrict__ sinks,
                    T* __restrict__ out, int t, int nh, int tk, int mb, float scale) {
    __shared__ float sh[32];
    const u64 row = blockIdx.x;
    const int i = (int)(row % t);
    const u64 bh = row / t;
    const int h = (int)(bh % nh);
    const int b = (int)(bh / nh);
    const u64 so = row * (u64)tk;
    const u64 mo = ((u64)(mb > 1 ? b : 0) * t + i) * (u64)tk;
    const float sink = sinks[h];
    const float ninf = __int_as_float(0xff800000);
    float x[PER_THREAD];
    const bool cached = tk <= PER_THREAD * (int)blockDim.x;
    float mx = sink;
    if (cached) {
#pragma unroll
        for (int c = 0; c < PER_THREAD; ++c) {
            const int j = threadIdx.x + c * blockDim.x;
            x[c] = j < tk ? ld(s, so + j) * scale + ld(m, mo + j) : ninf;
            mx = fmaxf(mx, x[c]);
        }
    } else {
        for (int j = threadIdx.x; j < tk; j += blockDim.x) mx = fmaxf(mx, ld(s, so + j) * scale + ld(m, mo + j));
    }
    mx = block_red(mx, true, sh);
    float sum = 0.f;
    if (cached) {
#pragma unroll
        for (int c = 0; c < PER_THREAD; ++c) { x[c] = expf(x[c] - mx); sum += x[c]; }
    } else {
        for (int j = threadIdx.x; j < tk; j += blockDim.x) sum += expf(ld(s, so + j) * scale + ld(m, mo + j) - mx);
    }
    sum = block_red(sum, false, sh) + expf(sink - mx);
    const float inv = 1.f / sum;
    if (cached) {
#pragma unroll
        for (int c = 0; c < PER_THREAD; ++c) {
            const int j = threadIdx.x + c * blockDim.x;
            if (j < tk) st(out, so + j, x[c] * inv);
        }
    } else {
        for (int j = threadIdx.x; j < tk; j += blockDim.x)
            st(out, so + j, expf(ld(s, so + j) * scale + ld(m, mo + j) - mx) * inv);
    }
}

template <typename T>
__device__ void bwd(const T* __restrict__ p, const T* __restrict__ g, T* __restrict__ out, int tk, float scale) {
    __shared__ float sh[32];
    const u64 o = (u64)blockIdx.x * (u64)tk;
    float pv[PER_THREAD], gv[PER_THREAD];
    const bool cached = tk <= PER_THREAD * (int)blockDim.x;
    float dot = 0.f;
    if (cached) {
#pragma unroll
        for (int c = 0; c < PER_THREAD; ++c) {
            const int j = threadIdx.x + c * blockDim.x;
            pv[c] = j < tk ? ld(p, o + j) : 0.f;
            gv[c] = j < tk ? ld(g, o + j) : 0.f;
            dot += pv[c] * gv[c];
        }
    } else {
        for (int j = threadIdx.x; j < tk; j += blockDim.x) dot += ld(p, o + j) * ld(g, o + j);
    }
    dot = block_red(dot, false, sh);
    if (cached) {
#pragma unroll
        for (int c = 0; c < PER_THREAD; ++c) {
            const int j = threadIdx.x + c * blockDim.x;
            if (j < tk) st(out, o + j, scale * pv[c] * (gv[c] - dot));
        }
    } else {
        for (int j = threadIdx.x; j < tk; j += blockDim.x)
            st(out, o + j, scale * ld(p, o + j) * (ld(g, o + j) - dot));
    }
}

extern "C" __global__ void sink_softmax_fwd_f32(const float* s, const float* m, const float* k, float* o,
    int t, int nh, int tk, int mb, float scale) { fwd<float>(s, m, k, o, t, nh, tk, mb, scale); }
extern "C" __global__ void sink_softmax_fwd_bf16(const u16* s, const u16* m, const float* k, u16* o,
    int t, int nh, int tk, int mb, float scale) { fwd<u16>(s, m, k, o, t, nh, tk, mb, scale); }
extern "C" __global__ void sink_softmax_bwd_f32(const float* p, const float* g, float* o, int tk, float scale) {
    bwd<float>(p, g, o, tk, scale); }
extern "C" __global__ void sink_softmax_bwd_bf16(const u16* p, const u16* g, u16* o, int tk, float scale) {
    bwd<u16>(p, g, o, tk, scale); }
"#;

    pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_sink_softmax", SRC);

    /// Threads per row: enough for the row to fit the registers when possible, at least one warp.
    fn launch(rows: usize, tk: usize) -> LaunchConfig {
        let want = tk
            .div_ceil(16)
            .next_power_of_two()
            .clamp(32, THREADS as usize) as u32;
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (want, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn offsets(l: &Layout) -> Result<(usize, usize)> {
        contiguous_range(l, "sink_softmax")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        s: &CudaStorage,
        l: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        (rows, tk, t, nh, mb): (usize, usize, usize, usize, usize),
        scale: f32,
    ) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let ((s0, s1), (m0, m1), (k0, k1)) = (offsets(l)?, offsets(ml)?, offsets(kl)?);
        let sinks = k.as_cuda_slice::<f32>()?.slice(k0..k1);
        let (t, nh, tk_i, mb) = (t as i32, nh as i32, tk as i32, mb as i32);
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let func = KERNELS.func(&dev, $name)?;
                let stream = dev.cuda_stream();
                let sv = s.as_cuda_slice::<$t>()?.slice(s0..s1);
                let mv = m.as_cuda_slice::<$t>()?.slice(m0..m1);
                // SAFETY: the kernel writes every element of every row.
                let mut out = unsafe { dev.alloc::<$t>(rows * tk)? };
                if rows > 0 && tk > 0 {
                    let mut b = stream.launch_builder(&func);
                    b.arg(&sv);
                    b.arg(&mv);
                    b.arg(&sinks);
                    b.arg(&mut out);
                    b.arg(&t);
                    b.arg(&nh);
                    b.arg(&tk_i);
                    b.arg(&mb);
                    b.arg(&scale);
                    unsafe { b.launch(launch(rows, tk)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match s.dtype() {
            DType::F32 => run!(f32, "sink_softmax_fwd_f32"),
            DType::BF16 => run!(bf16, "sink_softmax_fwd_bf16"),
            d => candle_core::bail!("sink_softmax: unsupported dtype {d:?}"),
        })
    }

    pub(super) fn backward(
        p: &CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        rows: usize,
        tk: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let dev = p.device().clone();
        let ((p0, p1), (g0, g1)) = (offsets(pl)?, offsets(gl)?);
        let tk_i = tk as i32;
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let func = KERNELS.func(&dev, $name)?;
                let stream = dev.cuda_stream();
                let pv = p.as_cuda_slice::<$t>()?.slice(p0..p1);
                let gv = g.as_cuda_slice::<$t>()?.slice(g0..g1);
                // SAFETY: the kernel writes every element of every row.
                let mut out = unsafe { dev.alloc::<$t>(rows * tk)? };
                if rows > 0 && tk > 0 {
                    let mut b = stream.launch_builder(&func);
                    b.arg(&pv);
                    b.arg(&gv);
                    b.arg(&mut out);
                    b.arg(&tk_i);
                    b.arg(&scale);
                    unsafe { b.launch(launch(rows, tk)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match p.dtype() {
            DType::F32 => run!(f32, "sink_softmax_bwd_f32"),
            DType::BF16 => run!(bf16, "sink_softmax_bwd_bf16"),
            d => candle_core::bail!("sink_softmax: unsupported dtype {d:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The reference path of `attention.rs` (candle ops).
    fn reference(
        s: &Tensor,
        m: &Tensor,
        sinks: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let nh = s.dim(1)?;
        let x = (s * scale)?.broadcast_add(m)?;
        let sinks = sinks.reshape((1, nh, 1, 1))?;
        let max = x
            .max_keepdim(D::Minus1)?
            .broadcast_maximum(&sinks)?
            .detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        let es = sinks.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&(e.sum_keepdim(D::Minus1)? + es)?)
    }

    #[test]
    fn cpu_op_matches_reference_values_and_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, nh, t) = (2, 3, 5);
        let s = Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, nh, t, t), &dev)?)?;
        // causal mask with padding of the first key in batch row 1
        let mut mv = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j == 0) {
                        mv[(bi * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let m = Tensor::from_vec(mv, (b, 1, t, t), &dev)?;
        let sinks = Tensor::randn(0f32, 1.0, nh, &dev)?;
        let g = Tensor::randn(0f32, 1.0, (b, nh, t, t), &dev)?;
        let scale = 0.125;
        let a = sink_softmax(s.as_tensor(), Some(&m), &sinks, scale)?;
        let r = reference(s.as_tensor(), &m, &sinks, scale)?;
        let d = (&a - &r)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "forward differs by {d}");
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let gr = (&r * &g)?.sum_all()?.backward()?;
        let (Some(x), Some(y)) = (ga.get(s.as_tensor()), gr.get(s.as_tensor())) else {
            panic!("missing gradient");
        };
        let d = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "gradient differs by {d}");
        Ok(())
    }
}
