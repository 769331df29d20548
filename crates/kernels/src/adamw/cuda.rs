//! CUDA kernels of [`super::update`] (the whole update of one f32 parameter in one kernel) and of
//! [`super::fused_clip_and_step`].

use crate::nvrtc::{contiguous_range, Kernels};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, InplaceOp2, Layout, Result, Tensor};

use super::{Item, Scalars};

const SRC: &str = r#"
// One element's update (see the module docs); g already clipped.
__device__ __forceinline__ void adamw_elem(float* p, float* m, float* v, float gi, u64 i,
        int decay, float keep, float one_minus_b1, float b2, float one_minus_b2,
        float inv_bc2_sqrt, float eps, float step_size) {
    float pi = p[i];
    if (decay) pi = __fadd_rn(__fmul_rn(pi, keep), 0.f);
    // m + (g - m)·(1 − β1)
    const float mi = __fadd_rn(m[i], __fadd_rn(__fmul_rn(__fsub_rn(gi, m[i]), one_minus_b1), 0.f));
    // v·β2 + (g·(1 − β2))·g
    const float vi = __fadd_rn(__fadd_rn(__fmul_rn(v[i], b2), 0.f),
                               __fmul_rn(__fadd_rn(__fmul_rn(gi, one_minus_b2), 0.f), gi));
    // sqrt(v)/sqrt(1 − β2^t) + ε
    const float den = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_bc2_sqrt), 0.f), 1.f), eps);
    const float upd = __fdiv_rn(__fadd_rn(__fmul_rn(mi, step_size), 0.f), den);
    p[i] = __fsub_rn(pi, upd);
    m[i] = mi;
    v[i] = vi;
}

extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, u64 n,
        int decay, float keep, float one_minus_b1, float b2, float one_minus_b2,
        float inv_bc2_sqrt, float eps, float step_size) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        adamw_elem(p, m, v, g[i], i, decay, keep, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt,
                   eps, step_size);
}

// One parameter of the multi-tensor kernels (five 8-byte words, as uploaded by the host).
struct Item { float* p; float* m; float* v; const float* g; u64 n; };

// sq[b] = Σ g² of item b (one block per item; each square rounded, then summed in f32).
extern "C" __global__ void grad_sqsum_f32(const Item* items, float* sq) {
    __shared__ float sh[32];
    const Item it = items[blockIdx.x];
    float s = 0.f;
    for (u64 i = threadIdx.x; i < it.n; i += blockDim.x) s = __fadd_rn(s, __fmul_rn(it.g[i], it.g[i]));
    s = block_red(s, false, sh);
    if (threadIdx.x == 0) sq[blockIdx.x] = s;
}

// out[0] = sqrt(Σ_b sqrt(sq[b])²) (the norm of the per-item norms), out[1] = the clip coefficient
// min(max_norm / (out[0] + 1e-6), 1) (1 without clipping). One block.
extern "C" __global__ void clip_coef_f32(const float* sq, int count, int clip, float max_norm, float* out) {
    __shared__ float sh[32];
    float s = 0.f;
    for (int b = threadIdx.x; b < count; b += blockDim.x) {
        const float n = __fsqrt_rn(sq[b]);
        s = __fadd_rn(s, __fmul_rn(n, n));
    }
    s = block_red(s, false, sh);
    if (threadIdx.x == 0) {
        const float total = __fsqrt_rn(s);
        out[0] = total;
        out[1] = clip ? fminf(__fdiv_rn(max_norm, __fadd_rn(total, 1e-6f)), 1.f) : 1.f;
    }
}

// Every item's update (blockIdx.y = item), the gradient times coef[1] first when clipping.
extern "C" __global__ void adamw_all_f32(const Item* items, const float* coef, int clip,
        int decay, float keep, float one_minus_b1, float b2, float one_minus_b2,
        float inv_bc2_sqrt, float eps, float step_size) {
    const Item it = items[blockIdx.y];
    const float c = clip ? coef[1] : 1.f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < it.n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = clip ? __fmul_rn(it.g[i], c) : it.g[i];
        adamw_elem(it.p, it.m, it.v, gi, i, decay, keep, one_minus_b1, b2, one_minus_b2,
                   inv_bc2_sqrt, eps, step_size);
    }
}
"#;

pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_adamw", SRC);

/// Updates `param` (f32, contiguous, CUDA) and its moments `m`, `v` (same shape) in place from
/// `grad` (f32, same shape).
pub(super) fn step(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    s: Scalars,
) -> Result<()> {
    param.inplace_op2(
        grad,
        &AdamWOp {
            m: m.clone(),
            v: v.clone(),
            s,
        },
    )
}

/// The in-place op on the parameter (dst) with the gradient (src); the moments are updated
/// through their device addresses.
struct AdamWOp {
    m: Tensor,
    v: Tensor,
    s: Scalars,
}

/// The device address of element `start` of an f32 CUDA tensor's storage (contiguous, `n` long).
fn f32_ptr(t: &Tensor, n: usize, what: &str) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*st else {
        candle_core::bail!("adamw: {what} is not on a CUDA device");
    };
    let (a, b) = contiguous_range(l, what)?;
    if b - a != n {
        candle_core::bail!("adamw: {what} has {} elements, the parameter {n}", b - a);
    }
    let stream = cs.device().cuda_stream();
    let view = cs.as_cuda_slice::<f32>()?.slice(a..b);
    let (ptr, _guard) = view.device_ptr(&stream);
    Ok(ptr)
}

impl InplaceOp2 for AdamWOp {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("adamw: CUDA only (the CPU uses the candle-op composition)")
    }

    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (p0, p1) = contiguous_range(pl, "adamw parameter")?;
        let (g0, g1) = contiguous_range(gl, "adamw gradient")?;
        let n = p1 - p0;
        if g1 - g0 != n {
            candle_core::bail!("adamw: gradient of {} elements, parameter {n}", g1 - g0);
        }
        if n == 0 {
            return Ok(());
        }
        // SAFETY of the writes below: m and v are the optimizer's own moment tensors (never
        // handed out mutably, not views of the parameter or the gradient), so the kernel's
        // in-place writes to them alias nothing candle reads concurrently.
        let m = f32_ptr(&self.m, n, "exp_avg")?;
        let v = f32_ptr(&self.v, n, "exp_avg_sq")?;
        let dev = p.device().clone();
        let stream = dev.cuda_stream();
        let func = KERNELS.func(&dev, "adamw_f32")?;
        let (CudaStorageSlice::F32(ps), CudaStorageSlice::F32(gs)) = (&mut p.slice, &g.slice)
        else {
            candle_core::bail!("adamw: parameter and gradient must be f32 on CUDA");
        };
        let mut pv = ps.slice_mut(p0..p1);
        let gv = gs.slice(g0..g1);
        let n64 = n as u64;
        let cfg = LaunchConfig {
            grid_dim: (crate::runtime::grid::grid_stride_blocks(n, 256, 4096), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&mut pv);
        b.arg(&m);
        b.arg(&v);
        b.arg(&gv);
        b.arg(&n64);
        let scalars = KernelScalars::of(self.s);
        scalars.push(&mut b);
        // SAFETY: argument types and order match `adamw_f32`; p, m, v and g hold n f32 each.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// The scalar kernel arguments of an update, in the kernels' order.
struct KernelScalars {
    decay: i32,
    f: [f32; 7],
}

impl KernelScalars {
    /// Each the f32 rounding of the f64 value the CPU path uses.
    fn of(s: Scalars) -> Self {
        let f = |x: f64| x as f32;
        Self {
            decay: i32::from(s.decay),
            f: [
                f(s.keep),
                f(s.one_minus_b1),
                f(s.b2),
                f(s.one_minus_b2),
                f(s.inv_bc2_sqrt),
                f(s.eps),
                f(s.step_size),
            ],
        }
    }

    /// Pushes `decay, keep, one_minus_b1, b2, one_minus_b2, inv_bc2_sqrt, eps, step_size`.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.decay);
        for v in &self.f {
            b.arg(v);
        }
    }
}

/// Clip (when `max_norm` is given) and AdamW update of every item in three launches; returns the
/// pre-clip total norm, a scalar f32 tensor on the device. `items` must not be empty.
pub(super) fn clip_and_step(items: &[Item], s: Scalars, max_norm: Option<f64>) -> Result<Tensor> {
    let Some(first) = items.first() else {
        candle_core::bail!("adamw: no parameters to update");
    };
    let dev = first.param.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let mut table = Vec::with_capacity(items.len() * 5);
    for it in items {
        let n = it.param.elem_count();
        // SAFETY of the kernels' writes through these addresses: the parameter is updated in
        // place like `step` does (through candle's in-place op there), the moments are the
        // optimizer's own tensors, and nothing reads them while the update runs (stream order).
        table.push(f32_ptr(it.param, n, "parameter")?);
        table.push(f32_ptr(it.exp_avg, n, "exp_avg")?);
        table.push(f32_ptr(it.exp_avg_sq, n, "exp_avg_sq")?);
        table.push(f32_ptr(it.grad, n, "gradient")?);
        table.push(n as u64);
    }
    let table = stream.clone_htod(&table).w()?;
    let count = i32::try_from(items.len())
        .map_err(|_| candle_core::Error::Msg("adamw: too many parameters".into()))?;
    let mut sq = stream.alloc_zeros::<f32>(items.len()).w()?;
    let mut out = stream.alloc_zeros::<f32>(2).w()?;
    let f = KERNELS.func(&dev, "grad_sqsum_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&table).arg(&mut sq);
    let cfg = LaunchConfig {
        grid_dim: (items.len() as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `table` holds one 5-word item per block (addresses of n f32 each); sq has one
    // float per item.
    unsafe { b.launch(cfg) }.w()?;
    let clip = i32::from(max_norm.is_some());
    let max = max_norm.unwrap_or(0.0) as f32;
    let f = KERNELS.func(&dev, "clip_coef_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&sq).arg(&count).arg(&clip).arg(&max).arg(&mut out);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: sq holds `count` floats, out 2.
    unsafe { b.launch(cfg) }.w()?;
    let f = KERNELS.func(&dev, "adamw_all_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&table).arg(&out).arg(&clip);
    let scalars = KernelScalars::of(s);
    scalars.push(&mut b);
    let cfg = LaunchConfig {
        grid_dim: (32, items.len() as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as for `grad_sqsum_f32`; each item's p, m, v are written at indices below its n.
    unsafe { b.launch(cfg) }.w()?;
    let total = CudaStorage::wrap_cuda_slice(out, dev.clone());
    let total = Tensor::from_storage(
        candle_core::Storage::Cuda(total),
        2usize,
        candle_core::op::BackpropOp::none(),
        false,
    );
    total.narrow(0, 0, 1)?.squeeze(0)
}
