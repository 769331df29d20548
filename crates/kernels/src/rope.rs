//! The half-split RoPE rotation of gpt-oss attention as one kernel forward and one backward
//! instead of several candle ops over `[B, heads, T, d]`.
//!
//! The forward reproduces the reference op bit for bit, with the rounding of every bf16 operation
//! (`x1·cos − x2·sin` rounds the two products and the difference, as candle and torch do). The
//! backward runs in f32 and rounds once. The cos/sin tables are frozen (no gradient). The CPU
//! implementation is the reference the kernel is tested against; the model uses this op on CUDA
//! only (see [`crate::FastPath::Elementwise`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::storage::cpu_out;

/// Rounds to the storage precision of `dtype` (bf16: round to nearest even; f32: as is).
fn round(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Half-split rotation of `x` `[B, heads, T, d]` (f32/bf16, any strides with a unit last stride,
/// e.g. the transposed view of a `[B, T, heads, d]` projection) with `cos`/`sin` `[B or 1, 1, T,
/// d/2]` (x's dtype, frozen) → contiguous `[B, heads, T, d]`: `cat(x1·cos − x2·sin, x2·cos +
/// x1·sin)` with the rounding of the reference (`gptoss_model::apply_rotary`). Differentiable in `x`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    // apply_op1 records the backward only when x takes part in autograd
    x.apply_op1(RotaryOp::new(x, cos, sin, false)?)
}

/// [`rotary`] of a token-major `x` `[B, T, heads, d]` (e.g. a projection's output reshaped, any
/// strides with a unit last stride) → contiguous `[B, heads, T, d]`, the same values as
/// `rotary(&x.transpose(1, 2)?, ..)`. Its gradient comes back `[B, T, heads, d]` contiguous, so no
/// transpose enters the autograd graph (a transpose's gradient would be materialized).
pub fn rotary_tokens_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1(RotaryOp::new(x, cos, sin, true)?)
}

struct RotaryOp {
    cos: Tensor,
    sin: Tensor,
    cos_batch: usize,
    /// The backward: rotate by −θ (`dx1 = g1·cos + g2·sin`, `dx2 = g2·cos − g1·sin`), rounded once.
    inverse: bool,
    /// Whether the (input, output) are token-major `[B, T, heads, d]` rather than `[B, heads, T, d]`.
    tokens_first: (bool, bool),
}

impl RotaryOp {
    /// The forward op for `x` (`[B, heads, T, d]`, or `[B, T, heads, d]` when `tokens_first`) after
    /// checking it against `cos`/`sin` `[B or 1, 1, T, d/2]`.
    fn new(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        tokens_first: bool,
    ) -> candle_core::Result<Self> {
        let (_, a, b, d) = x.dims4()?;
        let t = if tokens_first { a } else { b };
        let (cb, one, ct, half) = cos.dims4()?;
        if one != 1 || ct != t || 2 * half != d || sin.dims() != cos.dims() || x.stride()[3] != 1 {
            candle_core::bail!(
                "rotary: x {:?} (strides {:?}, token-major: {tokens_first}) does not fit cos/sin {:?}",
                x.dims(),
                x.stride(),
                cos.dims()
            );
        }
        Ok(Self {
            cos: cos.to_dtype(x.dtype())?.contiguous()?,
            sin: sin.to_dtype(x.dtype())?.contiguous()?,
            cos_batch: cb,
            inverse: false,
            tokens_first: (tokens_first, false),
        })
    }

    /// `(B, heads, T, d)` and the input strides in that order.
    fn dims(&self, l: &Layout) -> candle_core::Result<([usize; 4], [usize; 3])> {
        let (a, b, c, d) = l.shape().dims4()?;
        let st = l.stride();
        Ok(if self.tokens_first.0 {
            ([a, c, b, d], [st[0], st[2], st[1]])
        } else {
            ([a, b, c, d], [st[0], st[1], st[2]])
        })
    }

    /// The output's shape and its strides in `(B, heads, T)` order.
    fn out(&self, [b, nh, t, d]: [usize; 4]) -> (Shape, [usize; 3]) {
        if self.tokens_first.1 {
            (Shape::from((b, t, nh, d)), [t * nh * d, d, nh * d])
        } else {
            (Shape::from((b, nh, t, d)), [nh * t * d, t * d, d])
        }
    }
}

impl CustomOp1 for RotaryOp {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let ([b, nh, t, d], st) = self.dims(l)?;
        let (shape, ost) = self.out([b, nh, t, d]);
        let half = d / 2;
        let x: Vec<f32> = match s {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            _ => candle_core::bail!("rotary: unsupported dtype {:?}", s.dtype()),
        };
        let cos = self
            .cos
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sin = self
            .sin
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let dt = s.dtype();
        let mut out = vec![0f32; b * nh * t * d];
        for bi in 0..b {
            for h in 0..nh {
                for ti in 0..t {
                    let src = l.start_offset() + bi * st[0] + h * st[1] + ti * st[2];
                    let dst = bi * ost[0] + h * ost[1] + ti * ost[2];
                    let cb = if self.cos_batch > 1 { bi } else { 0 };
                    for i in 0..half {
                        let (c, s_) =
                            (cos[(cb * t + ti) * half + i], sin[(cb * t + ti) * half + i]);
                        let (x1, x2) = (x[src + i], x[src + half + i]);
                        let (a, bb) = if self.inverse {
                            (x1 * c + x2 * s_, x2 * c - x1 * s_)
                        } else {
                            (
                                round(round(x1 * c, dt) - round(x2 * s_, dt), dt),
                                round(round(x2 * c, dt) + round(x1 * s_, dt), dt),
                            )
                        };
                        out[dst + i] = a;
                        out[dst + half + i] = bb;
                    }
                }
            }
        }
        Ok((cpu_out(out, dt, "rotary")?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (dims, st) = self.dims(l)?;
        let (shape, ost) = self.out(dims);
        let geo = cuda::Geometry { dims, st, ost };
        Ok((
            cuda::rotary(
                s,
                l,
                &geo,
                &self.cos,
                &self.sin,
                self.cos_batch,
                self.inverse,
            )?,
            shape,
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // the gradient comes back in the input's layout
        let op = RotaryOp {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            cos_batch: self.cos_batch,
            inverse: true,
            tokens_first: (self.tokens_first.1, self.tokens_first.0),
        };
        Ok(Some(g.to_dtype(x.dtype())?.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};
    use half::bf16;

    use crate::nvrtc::{contiguous_range, Kernels};

    const SRC: &str = r#"
__device__ __forceinline__ float rnd(float v, bool b16) { return b16 ? bf16_round(v) : v; }

// x: (b, h, t) at strides (sb, sh, st) (unit last stride); out at strides (ob, oh, ot); cos/sin
// [cb, 1, T, d/2].
template <typename T>
__device__ void rotary(const T* __restrict__ x, const T* __restrict__ cs, const T* __restrict__ sn,
                       T* __restrict__ out, int nh, int t, int half, int cb,
                       u64 sb, u64 shh, u64 stt, u64 ob, u64 oh, u64 ot, int inverse, bool b16, u64 nrows) {
    // blockDim.y rows per block, blockDim.x threads along the row's first half.
    const u64 row = (u64)blockIdx.x * blockDim.y + threadIdx.y;  // (b*nh + h)*T + ti
    if (row >= nrows) return;
    // 32-bit index arithmetic (the host checks nrows < 2^32)
    const u32 r32 = (u32)row;
    const int ti = (int)(r32 % (u32)t);
    const u32 bh = r32 / (u32)t;
    const int h = (int)(bh % (u32)nh);
    const int b = (int)(bh / (u32)nh);
    const u64 src = (u64)b * sb + (u64)h * shh + (u64)ti * stt;
    const u64 dst = (u64)b * ob + (u64)h * oh + (u64)ti * ot;
    const u64 co = ((u64)(cb > 1 ? b : 0) * t + ti) * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = ld(cs, co + i), s = ld(sn, co + i);
        const float x1 = ld(x, src + i), x2 = ld(x, src + half + i);
        float a, bb;
        // __fmul_rn/__fadd_rn: no fused multiply-add, the same roundings as the CPU reference.
        if (inverse) { a = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)); bb = __fsub_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)); }
        else {
            a = rnd(__fsub_rn(rnd(__fmul_rn(x1, c), b16), rnd(__fmul_rn(x2, s), b16)), b16);
            bb = rnd(__fadd_rn(rnd(__fmul_rn(x2, c), b16), rnd(__fmul_rn(x1, s), b16)), b16);
        }
        st(out, dst + i, a);
        st(out, dst + half + i, bb);
    }
}

extern "C" __global__ void rotary_f32(const float* x, const float* c, const float* s, float* o, int nh, int t, int half, int cb,
    u64 sb, u64 sh, u64 st, u64 ob, u64 oh, u64 ot, int inv, u64 rows) { rotary<float>(x, c, s, o, nh, t, half, cb, sb, sh, st, ob, oh, ot, inv, false, rows); }
extern "C" __global__ void rotary_bf16(const u16* x, const u16* c, const u16* s, u16* o, int nh, int t, int half, int cb,
    u64 sb, u64 sh, u64 st, u64 ob, u64 oh, u64 ot, int inv, u64 rows) { rotary<u16>(x, c, s, o, nh, t, half, cb, sb, sh, st, ob, oh, ot, inv, true, rows); }
"#;

    pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_rotary", SRC);

    /// `(B, heads, T, d)`, the input strides and the output strides in `(B, heads, T)` order.
    pub(super) struct Geometry {
        pub dims: [usize; 4],
        pub st: [usize; 3],
        pub ost: [usize; 3],
    }

    pub(super) fn rotary(
        s: &CudaStorage,
        l: &Layout,
        geo: &Geometry,
        cos: &Tensor,
        sin: &Tensor,
        cos_batch: usize,
        inverse: bool,
    ) -> Result<CudaStorage> {
        let [bsz, nh, t, d] = geo.dims;
        let (st, ost) = (geo.st, geo.ost);
        if l.stride()[3] != 1 {
            candle_core::bail!(
                "rotary: the last dimension must have stride 1, got {:?}",
                l.stride()
            );
        }
        let rows = bsz * nh * t;
        if u32::try_from(rows).is_err() {
            candle_core::bail!(
                "rotary: {rows} rows (batch × heads × tokens) exceed the kernel's u32 index"
            );
        }
        let half = d / 2;
        let dev = s.device().clone();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let (Storage::Cuda(cc), Storage::Cuda(sc)) = (&*cs, &*ss) else {
            candle_core::bail!("rotary: cos/sin not on CUDA")
        };
        let (c0, c1) = contiguous_range(cl, "rotary cos")?;
        let (s0, s1) = contiguous_range(sl, "rotary sin")?;
        // The view may start anywhere in its storage: pass the slice from its start offset on.
        let start = l.start_offset();
        let (nh_i, t_i, half_i, cb_i, inv_i) = (
            nh as i32,
            t as i32,
            half as i32,
            cos_batch as i32,
            i32::from(inverse),
        );
        let (sb, sh, stt) = (st[0] as u64, st[1] as u64, st[2] as u64);
        let (ob, oh, ot) = (ost[0] as u64, ost[1] as u64, ost[2] as u64);
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let func = KERNELS.func(&dev, $name)?;
                let stream = dev.cuda_stream();
                let full = s.as_cuda_slice::<$t>()?;
                let xv = full.slice(start..);
                let cv = cc.as_cuda_slice::<$t>()?.slice(c0..c1);
                let sv = sc.as_cuda_slice::<$t>()?.slice(s0..s1);
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$t>(rows * d)? };
                if rows > 0 {
                    let mut bld = stream.launch_builder(&func);
                    bld.arg(&xv);
                    bld.arg(&cv);
                    bld.arg(&sv);
                    bld.arg(&mut out);
                    bld.arg(&nh_i);
                    bld.arg(&t_i);
                    bld.arg(&half_i);
                    bld.arg(&cb_i);
                    bld.arg(&sb);
                    bld.arg(&sh);
                    bld.arg(&stt);
                    bld.arg(&ob);
                    bld.arg(&oh);
                    bld.arg(&ot);
                    bld.arg(&inv_i);
                    let rows64 = rows as u64;
                    bld.arg(&rows64);
                    // several rows per block: one row of a 64-wide head is only 32 threads
                    let tx = (half as u32).next_power_of_two().clamp(32, 256);
                    let ty = (256 / tx).max(1);
                    let cfg = LaunchConfig {
                        grid_dim: ((rows as u32).div_ceil(ty), 1, 1),
                        block_dim: (tx, ty, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: argument types and order match `rotary_*`; `out` holds rows · d
                    // elements, `xv` the strided view the layout describes.
                    unsafe { bld.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match s.dtype() {
            DType::F32 => run!(f32, "rotary_f32"),
            DType::BF16 => run!(bf16, "rotary_bf16"),
            d => candle_core::bail!("rotary: unsupported dtype {d:?}"),
        })
    }
}
