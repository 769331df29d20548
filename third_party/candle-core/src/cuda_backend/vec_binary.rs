//! [gptoss patch] Vectorized bf16 add/sub/mul for two contiguous operands of one shape.
//!
//! candle-kernels' binary kernels handle one element per thread; for the bf16 activations and
//! gradients of a training step (millions of elements per call) that runs at about a third of
//! the memory bandwidth. These kernels take eight elements (16 bytes) per thread with the native
//! `add/sub/mul.rn.bf16x2` instructions, whose round-to-nearest-even of the exact result is what
//! `__hadd`/`__hsub`/`__hmul` give, so the values are the same bit for bit. Any shape, layout or
//! device the fast path does not take (or a failure to build it) falls back to the generic kernel.

use super::{CudaDevice, CudaStorageSlice};
use crate::Layout;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::OnceLock;

const MODULE: &str = "gptoss_vec_binary";

const SRC: &str = r#"
#define VEC_OP(NAME, INSN) \
extern "C" __global__ void NAME(const uint4* a, const uint4* b, uint4* o, unsigned long long n) { \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; \
         i += (unsigned long long)gridDim.x * blockDim.x) { \
        const uint4 x = a[i], y = b[i]; \
        uint4 z; \
        asm(INSN " %0, %1, %2;" : "=r"(z.x) : "r"(x.x), "r"(y.x)); \
        asm(INSN " %0, %1, %2;" : "=r"(z.y) : "r"(x.y), "r"(y.y)); \
        asm(INSN " %0, %1, %2;" : "=r"(z.z) : "r"(x.z), "r"(y.z)); \
        asm(INSN " %0, %1, %2;" : "=r"(z.w) : "r"(x.w), "r"(y.w)); \
        o[i] = z; \
    } \
}
VEC_OP(vadd_bf16, "add.rn.bf16x2")
VEC_OP(vsub_bf16, "sub.rn.bf16x2")
VEC_OP(vmul_bf16, "mul.rn.bf16x2")
"#;

/// The PTX (sm_90: the bf16x2 add/sub instructions need it), or `None` when NVRTC failed.
fn ptx() -> Option<&'static str> {
    static PTX: OnceLock<Option<String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some("sm_90"),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(SRC, opts)
            .ok()
            .map(|p| p.to_src())
    })
    .as_deref()
}

/// Whether the device runs sm_90 code (compute capability 9.0 or newer), read once per process.
fn sm90(dev: &CudaDevice) -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let ctx = dev.cuda_stream().context().clone();
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map(|m| m >= 9)
            .unwrap_or(false)
    })
}

/// `lhs ∘ rhs` for `kernel` "badd" / "bsub" / "bmul" on two contiguous bf16 operands of one
/// shape whose element count and start offsets are multiples of 8; `None` for anything else.
pub(crate) fn try_binary(
    kernel: &str,
    lhs: &CudaStorageSlice,
    lhs_l: &Layout,
    rhs: &CudaStorageSlice,
    rhs_l: &Layout,
    dev: &CudaDevice,
) -> Option<CudaStorageSlice> {
    let name = match kernel {
        "badd" => "vadd_bf16",
        "bsub" => "vsub_bf16",
        "bmul" => "vmul_bf16",
        _ => return None,
    };
    let (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) = (lhs, rhs) else {
        return None;
    };
    let n = lhs_l.shape().elem_count();
    let (a0, b0) = (lhs_l.start_offset(), rhs_l.start_offset());
    if lhs_l.shape() != rhs_l.shape()
        || !lhs_l.is_contiguous()
        || !rhs_l.is_contiguous()
        || n == 0
        || n % 8 != 0
        || a0 % 8 != 0
        || b0 % 8 != 0
        || !sm90(dev)
    {
        return None;
    }
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?).ok()?;
    let (av, bv) = (a.slice(a0..a0 + n), b.slice(b0..b0 + n));
    // SAFETY: the kernel writes all n elements.
    let out = unsafe { dev.alloc::<half::bf16>(n) }.ok()?;
    let n16 = (n / 8) as u64;
    let cfg = LaunchConfig {
        grid_dim: ((n16 as u32).div_ceil(256).clamp(1, 1 << 16), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = func.builder();
    builder.arg(&av);
    builder.arg(&bv);
    builder.arg(&out);
    builder.arg(&n16);
    // SAFETY: argument types match the kernel; a, b and out hold n = 8·n16 bf16 each, 16-byte
    // aligned (offsets multiples of 8 elements of 256-byte aligned allocations).
    unsafe { builder.launch(cfg) }.ok()?;
    Some(CudaStorageSlice::BF16(out))
}
