//! CUDA path of [`super::AdamW::step`]: the whole update of one f32 parameter in one kernel.
//!
//! The candle-op composition launches about 13 kernels per parameter; the cookbook LoRA has 204
//! parameters, so on the GPU machine the optimizer step was ≈ 30 ms of launches. The kernel below
//! computes the same f32 operations in the same order, each rounded to nearest without FMA
//! contraction (`__fmul_rn`, `__fadd_rn`, `__fsqrt_rn`, `__fdiv_rn`), so it gives the CPU
//! composition's values bit for bit (test `cuda_optim`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, InplaceOp2, Layout, Result, Tensor};
use gptoss_model::nvrtc::{contiguous_range, Kernels};

const SRC: &str = r#"
extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, u64 n,
        int decay, float keep, float one_minus_b1, float b2, float one_minus_b2,
        float inv_bc2_sqrt, float eps, float step_size) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = g[i];
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
}
"#;

static KERNELS: Kernels = Kernels::new("gptoss_adamw", SRC);

/// The f32 scalars of one update, each the f32 rounding of the f64 value the CPU path uses.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scalars {
    /// Whether weight decay applies (`p ← p·keep` first).
    pub decay: bool,
    /// `1 − lr·wd`.
    pub keep: f64,
    /// `1 − β1`.
    pub one_minus_b1: f64,
    /// `β2`.
    pub b2: f64,
    /// `1 − β2`.
    pub one_minus_b2: f64,
    /// `1 / sqrt(1 − β2^t)`.
    pub inv_bc2_sqrt: f64,
    /// `ε`.
    pub eps: f64,
    /// `lr / (1 − β1^t)`.
    pub step_size: f64,
}

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
        let s = self.s;
        let f = |x: f64| x as f32;
        let (decay, keep, omb1, b2, omb2, inv, eps, ss) = (
            i32::from(s.decay),
            f(s.keep),
            f(s.one_minus_b1),
            f(s.b2),
            f(s.one_minus_b2),
            f(s.inv_bc2_sqrt),
            f(s.eps),
            f(s.step_size),
        );
        let n64 = n as u64;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&mut pv);
        b.arg(&m);
        b.arg(&v);
        b.arg(&gv);
        b.arg(&n64);
        b.arg(&decay);
        b.arg(&keep);
        b.arg(&omb1);
        b.arg(&b2);
        b.arg(&omb2);
        b.arg(&inv);
        b.arg(&eps);
        b.arg(&ss);
        // SAFETY: argument types and order match `adamw_f32`; p, m, v and g hold n f32 each.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}
