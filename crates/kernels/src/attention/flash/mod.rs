//! The attention core with sinks as tensor-core kernels (CUDA, bf16, head dim 64), flash-attention
//! style: no score tensor in memory, forward or backward.
//!
//! Forward ([`FlashFwd`]): one thread block per 64 query rows of one head (4 warps × 16 rows). For
//! each tile of 64 keys the block stages K and V in shared memory (`cp.async`, double-buffered: the
//! next tile loads while this one is computed); each warp computes its 16 × 64 scores with
//! `mma.sync.m16n8k16` (bf16 in, f32 accumulate), applies the scale and the mask, updates the
//! running row maximum and sum in base 2 (`exp2f` of `x·log₂e`; the sink enters as the initial
//! maximum with weight 1), rounds the probabilities to bf16 and accumulates `P·V` with the same
//! MMA; it also keeps each row's log-sum-exp for the backward. The key tiles are limited to the
//! rows' causal / sliding-window range (and, with packed documents, start at the document of the
//! block's first row). Visibility is computed from indices ([`crate::attention::KeyMask`]: causal,
//! window, per-key validity `[B, Tk]`, per-key document start `[B, Tk]`), with no per-element test
//! for tiles every row of a warp sees completely; no `[T, Tk]` mask exists.
//!
//! Backward ([`backward`]): `D = Σ dO·O` per row, then one block per 64 keys and query head
//! recomputes `Pᵀ` from the saved log-sum-exp for the query tiles that see those keys and
//! accumulates `dV += Pᵀ·dO`, `dK += dSᵀ·Q` (`dS = P ∘ (dP − D) · scale`) in registers and
//! `dQ += dS·K` into an f32 buffer with atomics; dK/dV are added to f32 buffers at the end (the
//! heads of a key/value group share them); one pass rounds all three to bf16.
//!
//! Numerically this is the chunked core's softmax evaluated online: scores stay f32 (the chunked
//! path rounds them to bf16 first) and probabilities are rounded to bf16 for the MMAs, so results
//! agree within bf16 rounding (checked by the CUDA test in `attn_core`).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

use super::KeyMask;
use crate::nvrtc::{contiguous_range, Kernels};
use crate::storage::cuda_of;

mod src;

pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_flash", src::SRC);

/// Whether the kernels handle these inputs: CUDA, bf16, head dim 64, `nh` a multiple of `nkv`,
/// the mask's per-key arrays (if any) of `[B, Tk]`, start offsets of whole 16-byte chunks (the
/// kernel copies 16-byte chunks).
pub(crate) fn supports(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&KeyMask>) -> bool {
    let (qd, kd) = (q.dims(), k.dims());
    let aligned = |x: &Tensor| x.layout().start_offset() % 8 == 0;
    let shapes = qd.len() == 4
        && kd.len() == 4
        && v.dims() == kd
        && qd[3] == 64
        && kd[3] == 64
        && kd[0] == qd[0]
        && kd[1] > 0
        && qd[1] % kd[1] == 0
        && kd[2] >= qd[2];
    let mask_ok = mask.is_none_or(|m| m.check(qd[0], kd[2]).is_ok());
    shapes
        && mask_ok
        && q.device().is_cuda()
        && [q, k, v]
            .iter()
            .all(|x| x.dtype() == DType::BF16 && aligned(x))
}

/// The flash forward as a candle op on `q` `[B, nh, T, 64]`, `k`/`v` `[B, nkv, Tk, 64]` (bf16,
/// contiguous; check [`supports`] first) → the attention output as `[B, T, nh, 64]` (bf16,
/// contiguous: the layout the output projection reads). Not differentiable by itself: the attention
/// core's autograd node runs it as its forward and [`backward`] as its backward.
pub(crate) struct FlashFwd {
    /// `[B, Tk]` u8 key validity (contiguous), if any.
    valid: Option<Tensor>,
    /// `[B, Tk]` u32 document start of every key (contiguous), if any.
    doc_start: Option<Tensor>,
    /// Causal / window rules apply (else every key is visible).
    masked: bool,
    sinks: Tensor,
    scale: f32,
    window: usize,
    /// Base-2 log-sum-exp of every row `[B, nh, T]` (f32), left by the last forward for the backward.
    lse: Mutex<Option<CudaSlice<f32>>>,
}

/// The `(t, tk, nh, nkv)` of a call, as the kernels take them.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    t: usize,
    nkv: usize,
    tk: usize,
}

impl Dims {
    fn of(ql: &Layout, kl: &Layout) -> candle_core::Result<Self> {
        let (b, nh, t, _) = ql.shape().dims4()?;
        let (_, nkv, tk, _) = kl.shape().dims4()?;
        Ok(Self { b, nh, t, nkv, tk })
    }

    fn ints(&self) -> [i32; 4] {
        [
            self.t as i32,
            self.tk as i32,
            self.nh as i32,
            self.nkv as i32,
        ]
    }
}

/// The bf16 view of a contiguous operand.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> candle_core::Result<CudaView<'a, bf16>> {
    let (a, b) = contiguous_range(l, what)?;
    Ok(s.as_cuda_slice::<bf16>()?.slice(a..b))
}

/// The view of a contiguous operand of element type `T`.
fn slice_of<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let (a, b) = contiguous_range(l, what)?;
    Ok(cuda_of(s, what)?.as_cuda_slice::<T>()?.slice(a..b))
}

/// The q, k, v storages of a custom op call: their dims, the device and the bf16 views.
type Views<'a> = (CudaView<'a, bf16>, CudaView<'a, bf16>, CudaView<'a, bf16>);

fn inputs<'a>(
    q: (&'a CudaStorage, &Layout),
    k: (&'a CudaStorage, &Layout),
    v: (&'a CudaStorage, &Layout),
) -> candle_core::Result<(Dims, CudaDevice, Views<'a>)> {
    let views = (
        view(q.0, q.1, "flash attention: q")?,
        view(k.0, k.1, "flash attention: k")?,
        view(v.0, v.1, "flash attention: v")?,
    );
    Ok((Dims::of(q.1, k.1)?, q.0.device().clone(), views))
}

impl FlashFwd {
    /// With `mask` (`None`: every key visible), `sinks` `[nh]`, `scale`.
    pub(crate) fn new(
        mask: Option<&KeyMask>,
        sinks: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Self> {
        let arr = |x: Option<&Tensor>, dt: DType| -> candle_core::Result<Option<Tensor>> {
            x.map(|x| x.to_dtype(dt)?.contiguous()).transpose()
        };
        Ok(Self {
            valid: arr(mask.and_then(|m| m.key_valid.as_ref()), DType::U8)?,
            doc_start: arr(mask.and_then(|m| m.doc_start.as_ref()), DType::U32)?,
            masked: mask.is_some(),
            sinks: sinks.to_dtype(DType::F32)?.contiguous()?,
            scale: scale as f32,
            // without a mask the kernels ignore the window (every key is visible)
            window: mask.and_then(|m| m.window).unwrap_or(0),
            lse: Mutex::new(None),
        })
    }

    /// Calls `f` with the views of the key-validity and document-start arrays (or `None`) and the
    /// kernels' mask mode (0 all visible, 2 causal / window from indices, plus the arrays).
    fn with_mask<R>(
        &self,
        f: impl FnOnce(
            Option<CudaView<'_, u8>>,
            Option<CudaView<'_, u32>>,
            i32,
        ) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let vg = self.valid.as_ref().map(|m| m.storage_and_layout());
        let dg = self.doc_start.as_ref().map(|m| m.storage_and_layout());
        let vv = match &vg {
            Some((s, l)) => Some(slice_of::<u8>(s, l, "flash attention: key_valid")?),
            None => None,
        };
        let dv = match &dg {
            Some((s, l)) => Some(slice_of::<u32>(s, l, "flash attention: doc_start")?),
            None => None,
        };
        f(vv, dv, if self.masked { 2 } else { 0 })
    }

    /// The log-sum-exp slot.
    fn lock_lse(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<CudaSlice<f32>>>> {
        self.lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("flash attention: lse lock poisoned".into()))
    }
}

impl CustomOp3 for FlashFwd {
    fn name(&self) -> &'static str {
        "flash-attention-forward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention: CUDA only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (dm, dev, (qv, kv, vv)) = inputs((qs, ql), (ks, kl), (vs, vl))?;
        let (sg, sl) = self.sinks.storage_and_layout();
        let (s0, s1) = contiguous_range(sl, "flash attention: sinks")?;
        let sv = cuda_of(&sg, "flash attention: sinks")?
            .as_cuda_slice::<f32>()?
            .slice(s0..s1);
        let rows = dm.b * dm.nh * dm.t;
        // SAFETY: every row < t of every head is written by its block (output and lse).
        let mut out = unsafe { dev.alloc::<bf16>(rows * 64)? };
        let mut lse = unsafe { dev.alloc::<f32>(rows.max(1))? };
        if rows > 0 {
            self.with_mask(|valid, dstart, mode| {
                let f = KERNELS.func(&dev, "flash_fwd_bf16")?;
                let stream = dev.cuda_stream();
                let mut a = stream.launch_builder(&f);
                let null = 0u64;
                let [ti, tki, nhi, nkvi] = dm.ints();
                let wi = self.window as i32;
                a.arg(&qv).arg(&kv).arg(&vv);
                match &valid {
                    Some(m) => a.arg(m),
                    None => a.arg(&null),
                };
                match &dstart {
                    Some(m) => a.arg(m),
                    None => a.arg(&null),
                };
                a.arg(&sv).arg(&mut out).arg(&mut lse);
                a.arg(&ti).arg(&tki).arg(&nhi).arg(&nkvi);
                a.arg(&self.scale).arg(&wi).arg(&mode);
                let cfg = LaunchConfig {
                    grid_dim: (dm.t.div_ceil(64) as u32, dm.nh as u32, dm.b as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: shapes checked by `supports` and the layouts above; the kernel stays
                // within q `[b, nh, t, 64]`, out `[b, t, nh, 64]`, k/v `[b, nkv, tk, 64]`,
                // key_valid / doc_start `[b, tk]`, sinks `[nh]`, lse `[b, nh, t]`.
                unsafe { a.launch(cfg) }.w()?;
                Ok(())
            })?;
        }
        *self.lock_lse()? = Some(lse);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((dm.b, dm.t, dm.nh, 64)),
        ))
    }
}

/// `(∂q, ∂k, ∂v)` (bf16, shapes of `q`, `k`, `v`) of the last [`FlashFwd`] call of `fwd` on these
/// inputs, for its output `o` and output gradient `go` (both `[B, T, nh, 64]`).
pub(crate) fn backward(
    fwd: &FlashFwd,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    go: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let Some(lse) = fwd.lock_lse()?.take() else {
        candle_core::bail!("flash attention backward: no forward statistics (backward run twice?)");
    };
    let op = FlashBwd {
        fwd,
        o: o.to_dtype(DType::BF16)?.contiguous()?,
        go: aligned_copy(&go.to_dtype(DType::BF16)?.contiguous()?)?,
        lse,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let all = q.apply_op3_no_bwd(&k, &v, &op)?;
    let (nq, nk) = (q.elem_count(), k.elem_count());
    Ok((
        all.narrow(0, 0, nq)?.reshape(q.dims())?,
        all.narrow(0, nq, nk)?.reshape(k.dims())?,
        all.narrow(0, nq + nk, nk)?.reshape(v.dims())?,
    ))
}

/// `x` itself when it starts on a 16-byte boundary (what `cp.async` needs), else a fresh copy.
fn aligned_copy(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.layout().start_offset() % 8 == 0 {
        Ok(x.clone())
    } else {
        x.copy()
    }
}

/// The backward launches; output: `∂q`, `∂k`, `∂v` back to back (flat bf16).
struct FlashBwd<'a> {
    fwd: &'a FlashFwd,
    o: Tensor,
    go: Tensor,
    lse: CudaSlice<f32>,
}

impl FlashBwd<'_> {
    fn launch(
        &self,
        dev: &CudaDevice,
        (q, k, v): Views<'_>,
        dm: Dims,
    ) -> candle_core::Result<CudaStorage> {
        let (og, ol) = self.o.storage_and_layout();
        let (gg, gl) = self.go.storage_and_layout();
        let ov = view(cuda_of(&og, "flash backward: o")?, ol, "flash backward: o")?;
        let gv = view(
            cuda_of(&gg, "flash backward: grad")?,
            gl,
            "flash backward: grad",
        )?;
        let rows = dm.b * dm.nh * dm.t;
        let (nq, nk) = (rows * 64, dm.b * dm.nkv * dm.tk * 64);
        let stream = dev.cuda_stream();
        // SAFETY: every element is written by the final cast.
        let mut out = unsafe { dev.alloc::<bf16>(nq + 2 * nk)? };
        if rows == 0 || nk == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(
                dev.alloc_zeros::<bf16>(nq + 2 * nk)?,
                dev.clone(),
            ));
        }
        // D = Σ dO·O per row
        // SAFETY: one value per row is written.
        let mut dvec = unsafe { dev.alloc::<f32>(rows)? };
        let [ti, tki, nhi, nkvi] = dm.ints();
        {
            let f = KERNELS.func(dev, "flash_bwd_dot")?;
            let mut a = stream.launch_builder(&f);
            let rows64 = rows as u64;
            a.arg(&ov)
                .arg(&gv)
                .arg(&mut dvec)
                .arg(&ti)
                .arg(&nhi)
                .arg(&rows64);
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `rows` rows of 64 values in o and grad, `rows` outputs.
            unsafe { a.launch(cfg) }.w()?;
        }
        // dq | dk | dv accumulated in f32, then rounded to bf16 in one pass
        let mut acc = dev.alloc_zeros::<f32>(nq + 2 * nk)?;
        self.fwd.with_mask(|valid, dstart, mode| {
            let f = KERNELS.func(dev, "flash_bwd_bf16")?;
            let mut a = stream.launch_builder(&f);
            let null = 0u64;
            let (mut dq, mut rest) = acc.split_at_mut(nq);
            let (mut dk, mut dv) = rest.split_at_mut(nk);
            a.arg(&q).arg(&k).arg(&v).arg(&gv).arg(&self.lse).arg(&dvec);
            match &valid {
                Some(m) => a.arg(m),
                None => a.arg(&null),
            };
            match &dstart {
                Some(m) => a.arg(m),
                None => a.arg(&null),
            };
            a.arg(&mut dq).arg(&mut dk).arg(&mut dv);
            let wi = self.fwd.window as i32;
            a.arg(&ti).arg(&tki).arg(&nhi).arg(&nkvi);
            a.arg(&self.fwd.scale).arg(&wi).arg(&mode);
            let cfg = LaunchConfig {
                grid_dim: (dm.tk.div_ceil(64) as u32, dm.nh as u32, dm.b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as the forward, plus dout `[b, t, nh, 64]`, lse/dvec `[b, nh, t]`, dq
            // `[b, nh, t, 64]`, dk/dv `[b, nkv, tk, 64]` (f32).
            unsafe { a.launch(cfg) }.w()?;
            Ok(())
        })?;
        {
            let f = KERNELS.func(dev, "flash_bwd_cast")?;
            let mut a = stream.launch_builder(&f);
            let total = nq + 2 * nk;
            let n = total as u64;
            a.arg(&acc).arg(&mut out).arg(&n);
            let cfg = LaunchConfig {
                grid_dim: (
                    crate::runtime::grid::grid_stride_blocks(total, 256, 132 * 16),
                    1,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `total` values in and out.
            unsafe { a.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for FlashBwd<'_> {
    fn name(&self) -> &'static str {
        "flash-attention-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention: CUDA only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (dm, dev, views) = inputs((qs, ql), (ks, kl), (vs, vl))?;
        let out = self.launch(&dev, views, dm)?;
        let n = dm.b * dm.nh * dm.t * 64 + 2 * dm.b * dm.nkv * dm.tk * 64;
        Ok((out, Shape::from(n)))
    }
}
