//! The CUDA grouped matmul: one cuBLAS GEMM per span, reading `x` and writing the output rows in
//! place (no per-span allocation or copy), and for MXFP4 weights one dequantization of that span's
//! expert into a scratch matrix just before its GEMM.
//!
//! One expert's GEMM (gpt-oss-20b at 2048 tokens: about 256 rows × 5760 × 2880) fills only a third of
//! an H100/H200's SMs, so the spans are spread over a few side streams ("lanes", each with its own
//! cuBLAS handle and scratch matrix) that run concurrently: the lanes wait for the device's stream
//! before starting and the device's stream waits for every lane before anything reads the output.
//! Within a lane the next dequantization starts after the previous GEMM has read the scratch (stream
//! order). `GPTOSS_GROUPED_LANES` (default 4) sets the number of lanes; 1 runs everything on the
//! device's stream.
//!
//! Row-major `Y[len, n] = X[len, k] · W[k, n]` is the column-major `Yᵀ = Wᵀ · Xᵀ`: cuBLAS computes
//! `C (n × len) = op(A) (n × k) · B (k × len)` with `B` = the rows of `x` (`ldb = k`) and `C` = the
//! rows of the output (`ldc = n`). `A` is the weight slice: with unit stride along `n` it is the
//! column-major `Wᵀ` already (`op = N`, `lda` = its row stride), with unit stride along `k` it is
//! `W` column-major (`op = T`, `lda` = its column stride).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys, CudaBlas};
use candle_core::cuda_backend::cudarc::cublaslt::sys as lt_sys;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, SyncOnDrop};
use candle_core::cuda_backend::{DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

use super::lt::{Call, Lt};
use super::mxfp4_gemm;
use super::{check_spans, GroupedWeight, Spans};
use crate::storage::cuda_of;

/// The number of lanes (`GPTOSS_GROUPED_LANES`, default 4, at least 1), read once.
fn lane_count() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("GPTOSS_GROUPED_LANES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4usize)
            .max(1)
    })
}

/// Bytes of cuBLASLt workspace per lane.
const WORKSPACE_BYTES: usize = 16 << 20;

/// A stream with the cuBLAS handle bound to it (the fallback) and its cuBLASLt workspace.
struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    workspace: CudaSlice<u8>,
}

impl Lane {
    fn new(stream: Arc<CudaStream>) -> candle_core::Result<Self> {
        Ok(Self {
            blas: CudaBlas::new(stream.clone()).w()?,
            workspace: stream.alloc_zeros::<u8>(WORKSPACE_BYTES).w()?,
            stream,
        })
    }

    /// The GEMM engine for this lane.
    fn engine<'a>(&'a self, lt: &'a Lt) -> Engine<'a> {
        let (workspace, _) = self.workspace.device_ptr(&self.stream);
        Engine {
            lt,
            handle: *self.blas.handle(),
            stream: self.stream.cu_stream() as _,
            workspace,
        }
    }
}

/// A device's lanes: `main` on the device's stream, `side` on their own streams, and the
/// cuBLASLt handle they share (its algorithm cache is per device).
struct Lanes {
    main: Lane,
    side: Vec<Lane>,
    lt: Lt,
}

/// The lanes of a device, created on first use and kept for the process.
fn lanes(dev: &CudaDevice) -> candle_core::Result<Arc<Lanes>> {
    static LANES: OnceLock<Mutex<HashMap<DeviceId, Arc<Lanes>>>> = OnceLock::new();
    let mut map = LANES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| candle_core::Error::Msg("grouped_matmul: lane table poisoned".into()))?;
    if let Some(l) = map.get(&dev.id()) {
        return Ok(l.clone());
    }
    let main = dev.cuda_stream();
    let ctx = main.context().clone();
    let mut side = Vec::new();
    for _ in 0..lane_count() {
        side.push(Lane::new(ctx.new_stream().w()?)?);
    }
    let l = Arc::new(Lanes {
        main: Lane::new(main)?,
        side,
        lt: Lt::new()?,
    });
    map.insert(dev.id(), l.clone());
    Ok(l)
}

/// Spreads the non-empty spans over `n` lanes, largest first onto the least-loaded lane.
fn assign(spans: &Spans, n: usize) -> Vec<Vec<(usize, usize, usize)>> {
    let mut order: Vec<_> = spans.iter().copied().filter(|s| s.2 > 0).collect();
    order.sort_by_key(|s| std::cmp::Reverse(s.2));
    let mut load = vec![0usize; n];
    let mut out = vec![Vec::new(); n];
    for sp in order {
        let i = (0..n).min_by_key(|&i| load[i]).unwrap_or(0);
        load[i] += sp.2;
        out[i].push(sp);
    }
    out
}

/// The raw device address of a storage's first element, with cudarc's read-tracking guard.
fn raw<'a>(
    s: &'a CudaStorage,
    stream: &'a CudaStream,
) -> candle_core::Result<(u64, SyncOnDrop<'a>)> {
    Ok(match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(stream),
        DType::BF16 => s.as_cuda_slice::<bf16>()?.device_ptr(stream),
        DType::F16 => s.as_cuda_slice::<f16>()?.device_ptr(stream),
        d => candle_core::bail!("grouped_matmul: dtype {d:?} is not supported on CUDA"),
    })
}

/// The cuBLAS data type of a float dtype.
fn data_type(dtype: DType) -> candle_core::Result<sys::cudaDataType> {
    Ok(match dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        d => candle_core::bail!("grouped_matmul: dtype {d:?} is not supported on CUDA"),
    })
}

/// One expert's `[k, n]` weight slice: element `(i, o)` at `ptr + (i·s_in + o·s_out)` elements.
struct Slice {
    ptr: u64,
    s_in: usize,
    s_out: usize,
}

/// The GEMMs' fixed parts.
struct Gemm {
    dtype: DType,
    elt: u64,
    k: usize,
    n: usize,
    x: u64,
    out: u64,
}

/// Where a lane's GEMMs run: cuBLASLt with a cached algorithm, else cuBLAS on the same stream.
struct Engine<'a> {
    lt: &'a Lt,
    handle: sys::cublasHandle_t,
    stream: lt_sys::cudaStream_t,
    workspace: u64,
}

impl Gemm {
    /// Rows `off..off+len`: `out[off..] = x[off..] · W`, on the engine's stream.
    fn span(&self, eng: &Engine, w: &Slice, off: usize, len: usize) -> candle_core::Result<()> {
        let (k, n) = (self.k, self.n);
        let (op, lda) = if w.s_out == 1 && (w.s_in >= n || k == 1) {
            (sys::cublasOperation_t::CUBLAS_OP_N, w.s_in.max(n))
        } else if w.s_in == 1 && (w.s_out >= k || n == 1) {
            (sys::cublasOperation_t::CUBLAS_OP_T, w.s_out.max(k))
        } else {
            candle_core::bail!(
                "grouped_matmul: weight slice strides ({}, {}) of [{k}, {n}] have no unit stride",
                w.s_in,
                w.s_out
            );
        };
        let int = |v: usize| -> candle_core::Result<i32> {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("grouped_matmul: {v} > i32")))
        };
        let b = self.x + (off * k) as u64 * self.elt;
        let c = self.out + (off * n) as u64 * self.elt;
        let call = Call {
            dtype: self.dtype,
            trans: op == sys::cublasOperation_t::CUBLAS_OP_T,
            n,
            k,
            len,
            lda,
            a: w.ptr,
            b,
            c,
        };
        if eng
            .lt
            .gemm(&call, eng.stream, eng.workspace, WORKSPACE_BYTES)?
        {
            return Ok(());
        }
        let dt = data_type(self.dtype)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: A spans the weight slice (strides checked against its layout by the caller), B the
        // `len` rows of `x` from row `off`, C the same rows of the `[M, n]` output; all three live
        // on the handle's stream for the duration of the call (their guards are held by the caller).
        unsafe {
            blas::gemm_ex(
                eng.handle,
                op,
                sys::cublasOperation_t::CUBLAS_OP_N,
                int(n)?,
                int(len)?,
                int(k)?,
                (&alpha as *const f32).cast::<c_void>(),
                w.ptr as *const c_void,
                dt,
                int(lda)?,
                b as *const c_void,
                dt,
                int(k)?,
                (&beta as *const f32).cast::<c_void>(),
                c as *mut c_void,
                dt,
                int(n)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()
    }
}

/// Where each expert's `[k, n]` weight slice comes from.
enum Source<'a> {
    /// A dense `[E, k, n]` storage: base address, start offset and strides (elements).
    Dense {
        ptr: u64,
        start: usize,
        stride: [usize; 3],
    },
    /// MXFP4 blocks/scales storages: expert `e` is bytes `b0 + e·per_expert ..` of the blocks,
    /// dequantized as a `[rows, cols]` row-major matrix (`2 · per_expert` values) into the lane's
    /// scratch.
    Packed {
        blocks: &'a CudaStorage,
        scales: &'a CudaStorage,
        b0: usize,
        per_expert: usize,
        strides: (usize, usize),
    },
}

impl Source<'_> {
    /// Runs the spans of one lane on `stream` / `handle`, in order.
    fn run(
        &self,
        gemm: &Gemm,
        spans: &[(usize, usize, usize)],
        stream: &CudaStream,
        eng: &Engine,
        scratch: Option<&mut CudaStorage>,
    ) -> candle_core::Result<()> {
        match (self, scratch) {
            (Self::Dense { ptr, start, stride }, _) => {
                for &(e, off, len) in spans {
                    let slice = Slice {
                        ptr: ptr + (start + e * stride[0]) as u64 * gemm.elt,
                        s_in: stride[1],
                        s_out: stride[2],
                    };
                    gemm.span(eng, &slice, off, len)?;
                }
            }
            (
                Self::Packed {
                    blocks,
                    scales,
                    b0,
                    per_expert,
                    strides,
                    ..
                },
                Some(scratch),
            ) => {
                for &(e, off, len) in spans {
                    let start = b0 + e * per_expert;
                    gptoss_mxfp4::dequantize_checkpoint_into(
                        blocks,
                        start..start + per_expert,
                        scales,
                        scratch,
                        stream,
                    )?;
                    let (ptr, _g) = raw(scratch, stream)?;
                    let (s_in, s_out) = *strides;
                    gemm.span(eng, &Slice { ptr, s_in, s_out }, off, len)?;
                }
            }
            (Self::Packed { .. }, None) => {
                candle_core::bail!("grouped_matmul: MXFP4 weights need a scratch matrix")
            }
        }
        Ok(())
    }
}

/// `x` `[M, k]` contiguous (rows grouped by `spans`) times `w` `[E, k, n]` → `[M, n]`, dtype of `x`.
pub(super) fn grouped(
    s: &CudaStorage,
    l: &Layout,
    w: &GroupedWeight,
    spans: &Spans,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (m, k) = l.shape().dims2()?; // k matches the weight: checked by `grouped_matmul`
    let (e_count, _, n) = w.dims()?;
    let Some((x0, _)) = l.contiguous_offsets() else {
        candle_core::bail!("grouped_matmul: x must be contiguous");
    };
    let dev = s.device().clone();
    let dtype = s.dtype();
    let shape = Shape::from((m, n));
    let out = if check_spans(spans, e_count, m)? {
        // SAFETY: every row is written by one span's GEMM below (the spans tile 0..m).
        unsafe { dev.alloc_uninit(&shape, dtype)? }
    } else {
        dev.zeros_impl(&shape, dtype)?
    };
    let main = dev.cuda_stream();
    let elt = dtype.size_in_bytes() as u64;
    let (x_ptr, gx) = raw(s, &main)?;
    let (out_ptr, go) = raw(&out, &main)?;
    let gemm = Gemm {
        dtype,
        elt,
        k,
        n,
        x: x_ptr + x0 as u64 * elt,
        out: out_ptr,
    };
    // Held until the GEMMs are enqueued: the dense weight's storage guard.
    let dense_guard;
    let packed_guards;
    let source = match w {
        GroupedWeight::Dense(t) => {
            if t.dtype() != dtype {
                candle_core::bail!("grouped_matmul: x is {dtype:?}, the weight {:?}", t.dtype());
            }
            dense_guard = t.storage_and_layout();
            let (ws, wl) = (&dense_guard.0, dense_guard.1);
            let ptr = raw(cuda_of(ws, "grouped_matmul weight")?, &main)?.0;
            let st = wl.stride();
            Source::Dense {
                ptr,
                start: wl.start_offset(),
                stride: [st[0], st[1], st[2]],
            }
        }
        GroupedWeight::Packed {
            blocks,
            scales,
            dtype: wdt,
            transposed,
        } => {
            if *wdt != dtype {
                candle_core::bail!(
                    "grouped_matmul: x is {dtype:?}, the weight dequantizes to {wdt:?}"
                );
            }
            let (_, rows, groups, _) = blocks.dims4()?;
            let cols = groups * 32;
            packed_guards = (blocks.storage_and_layout(), scales.storage_and_layout());
            let ((bs, bl), (ss, sl)) = (&packed_guards.0, &packed_guards.1);
            let (Some((b0, _)), Some((s0, _))) = (bl.contiguous_offsets(), sl.contiguous_offsets())
            else {
                candle_core::bail!("grouped_matmul: MXFP4 blocks and scales must be contiguous");
            };
            if b0 != s0 * 16 {
                candle_core::bail!(
                    "grouped_matmul: MXFP4 blocks at byte {b0} do not match scales at {s0}"
                );
            }
            if mxfp4_gemm::supports(dtype, (k, n), x0, spans, m) {
                drop((gx, go));
                let mut out = out;
                mxfp4_gemm::launch(
                    s,
                    x0,
                    (cuda_of(bs, "grouped_matmul blocks")?, b0),
                    (cuda_of(ss, "grouped_matmul scales")?, s0),
                    (rows, groups, *transposed),
                    spans,
                    &mut out,
                    (k, n),
                )?;
                return Ok((out, shape));
            }
            Source::Packed {
                blocks: cuda_of(bs, "grouped_matmul blocks")?,
                scales: cuda_of(ss, "grouped_matmul scales")?,
                b0,
                per_expert: rows * cols / 2,
                // `[rows, cols]` row-major used as `[cols, rows]`: (i, o) → o·cols + i; or transposed.
                strides: if *transposed { (cols, 1) } else { (1, cols) },
            }
        }
    };
    let busy = spans.iter().filter(|sp| sp.2 > 0).count();
    let n_lanes = lane_count().min(busy).max(1);
    let work = assign(spans, n_lanes);
    let mut scratch = Vec::new();
    if let Source::Packed { per_expert, .. } = &source {
        for _ in 0..n_lanes {
            // SAFETY: each span's dequantization writes the whole matrix before its GEMM reads it.
            scratch.push(unsafe { dev.alloc_uninit(&Shape::from(2 * per_expert), dtype)? });
        }
    }
    let lanes = lanes(&dev)?;
    if n_lanes == 1 {
        let eng = lanes.main.engine(&lanes.lt);
        source.run(&gemm, &work[0], &main, &eng, scratch.first_mut())?;
    } else {
        for (i, (lane, part)) in lanes.side.iter().zip(&work).enumerate() {
            // the lane starts after everything enqueued so far (x, out and the scratch exist)
            lane.stream.join(&main).w()?;
            let eng = lane.engine(&lanes.lt);
            source.run(&gemm, part, &lane.stream, &eng, scratch.get_mut(i))?;
        }
        for lane in lanes.side.iter().take(n_lanes) {
            main.join(&lane.stream).w()?;
        }
    }
    drop((gx, go));
    Ok((out, shape))
}

#[cfg(test)]
mod tests {
    //! Run on the GPU machine: `cargo test --release --features cuda -p gptoss-model --lib grouped`.
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor, Var};

    use super::super::{grouped_matmul, GroupedWeight, Spans};
    use crate::test_util::rel_diff;

    /// Forward and input gradient of `w` on `x` with loss weights `g`.
    fn run(
        x: &Tensor,
        w: &GroupedWeight,
        spans: &Spans,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let x = Var::from_tensor(x)?;
        let y = grouped_matmul(x.as_tensor(), w, spans)?;
        let grads = (y.to_dtype(DType::F32)? * g)?.sum_all()?.backward()?;
        let Some(dx) = grads.get(x.as_tensor()) else {
            candle_core::bail!("no gradient for x");
        };
        Ok((y.to_dtype(DType::F32)?, dx.to_dtype(DType::F32)?))
    }

    #[test]
    fn packed_and_dense_match_the_cpu() -> candle_core::Result<()> {
        // event tracking on (candle's default) and off (the crate's device)
        let tracked = Device::new_cuda(0)?;
        let untracked = crate::test_util::gpu()?;
        for gpu in [tracked, untracked] {
            check_on(&gpu)?;
        }
        Ok(())
    }

    /// The fused MXFP4 GEMM (bf16 packed weights) against cuBLAS on the decoded weight, forward and
    /// transposed (input gradient), at gpt-oss-20b's gate/up and down shapes: a span of two 128-row
    /// tiles (the second partial), single rows, an empty span, experts out of order.
    #[test]
    fn fused_mxfp4_matches_the_decoded_weight_at_gpt_oss_shapes() -> candle_core::Result<()> {
        let dev = crate::test_util::gpu()?;
        let order = [4usize, 0, 1, 5, 2, 3];
        let lens = [130usize, 1, 0, 64, 77, 5];
        let mut v = Vec::new();
        let mut off = 0;
        for (&e, &len) in order.iter().zip(&lens) {
            v.push((e, off, len));
            off += len;
        }
        let (spans, m): (Spans, usize) = (Arc::new(v), off);
        for (rows, cols) in [(5760usize, 2880usize), (2880, 2880)] {
            let packed = super::timings::random_packed(&dev, order.len(), rows, cols)?;
            let dense = GroupedWeight::Dense(packed.dense()?);
            let x = Tensor::randn(0f32, 1.0, (m, cols), &dev)?.to_dtype(DType::BF16)?;
            let g = Tensor::randn(0f32, 1.0, (m, rows), &dev)?;
            assert!(
                packed.decoded_in_kernel(&x, &spans),
                "the fused kernel must be chosen for these row counts"
            );
            let (y, dx) = run(&x, &packed, &spans, &g)?;
            let (y_ref, dx_ref) = run(&x, &dense, &spans, &g)?;
            let (dy, ddx) = (rel_diff(&y, &y_ref)?, rel_diff(&dx, &dx_ref)?);
            assert!(dy < 1e-2, "[{rows}, {cols}]: output differs by {dy}");
            assert!(
                ddx < 1e-2,
                "[{rows}, {cols}]: input gradient differs by {ddx}"
            );
        }
        Ok(())
    }

    /// Three spans on three lanes, f32 and bf16, against the CPU.
    fn check_on(gpu: &Device) -> candle_core::Result<()> {
        let gpu = gpu.clone();
        let cpu = Device::Cpu;
        let (e, rows, cols, m) = (4, 96, 64, 37);
        let spans: Spans = Arc::new(vec![(2, 0, 10), (3, 10, 20), (1, 30, 7)]);
        let blocks = Tensor::rand(0f32, 256f32, (e, rows, cols / 32, 16), &cpu)?
            .floor()?
            .clamp(0f32, 255f32)?
            .to_dtype(DType::U8)?;
        let scales = Tensor::rand(120f32, 126f32, (e, rows, cols / 32), &cpu)?
            .floor()?
            .to_dtype(DType::U8)?;
        let x = Tensor::randn(0f32, 1.0, (m, cols), &cpu)?;
        let g = Tensor::randn(0f32, 1.0, (m, rows), &cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let packed = |d: &Device| -> candle_core::Result<GroupedWeight> {
                Ok(GroupedWeight::Packed {
                    blocks: blocks.to_device(d)?,
                    scales: scales.to_device(d)?,
                    dtype,
                    transposed: false,
                })
            };
            let dense_t = packed(&cpu)?.dense()?; // [E, in, out] view of a contiguous [E, out, in]
            let dense_c = dense_t.contiguous()?; // [E, in, out] contiguous
            let xd = x.to_dtype(dtype)?;
            let (y_ref, dx_ref) = run(&xd, &packed(&cpu)?, &spans, &g)?;
            let cases = [
                ("packed", packed(&gpu)?),
                (
                    "dense transposed",
                    GroupedWeight::Dense(dense_t.to_device(&gpu)?),
                ),
                (
                    "dense contiguous",
                    GroupedWeight::Dense(dense_c.to_device(&gpu)?),
                ),
            ];
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            for (name, w) in cases {
                let (y, dx) = run(&xd.to_device(&gpu)?, &w, &spans, &g.to_device(&gpu)?)?;
                let (y, dx) = (y.to_device(&cpu)?, dx.to_device(&cpu)?);
                let (dy, ddx) = (rel_diff(&y, &y_ref)?, rel_diff(&dx, &dx_ref)?);
                assert!(dy < tol, "{name} {dtype:?}: output differs by {dy}");
                assert!(
                    ddx < tol,
                    "{name} {dtype:?}: input gradient differs by {ddx}"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod timings {
    //! Figures, not assertions: `GPTOSS_GROUPED_LANES=N t_lib grouped::cuda::timings --ignored
    //! --nocapture` on the GPU machine prints the grouped matmul's wall time at the gpt-oss-20b
    //! gate_up shape next to one dense GEMM of the same FLOPs.
    use std::sync::Arc;
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor};

    use super::super::{grouped_matmul, GroupedWeight, Spans};

    fn time(
        dev: &Device,
        n: usize,
        f: impl Fn() -> candle_core::Result<()>,
    ) -> candle_core::Result<f64> {
        f()?;
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..n {
            f()?;
        }
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
    }

    /// Random MXFP4 weights `[e, rows, cols]` (decoded to bf16), E8M0 scales 117..=121.
    pub(super) fn random_packed(
        dev: &Device,
        e: usize,
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<GroupedWeight> {
        GroupedWeight::random_mxfp4((e, rows, cols), 117, 121, dev)
    }

    #[test]
    #[ignore = "GPU figures; run by hand on the GPU machine"]
    fn gate_up_shape() -> candle_core::Result<()> {
        let dev = crate::test_util::gpu()?;
        let (e, rows, cols, per) = (32usize, 5760usize, 2880usize, 256usize);
        let m = e * per;
        let x = Tensor::randn(0f32, 1.0, (m, cols), &dev)?.to_dtype(DType::BF16)?;
        let spans: Spans = Arc::new((0..e).map(|i| (i, i * per, per)).collect());
        let packed = random_packed(&dev, e, rows, cols)?;
        let dense = GroupedWeight::Dense(packed.dense()?);
        let w0 = packed.dense()?.get(0)?; // [in, out] view
        let flops = 2.0 * (m * rows * cols) as f64;
        let report = |name: &str, ms: f64| {
            println!("{name:<34} {ms:8.3} ms  {:7.1} TFLOP/s", flops / ms / 1e9);
        };
        report(
            "one dense GEMM [8192x2880]x[2880x5760]",
            time(&dev, 10, || x.matmul(&w0).map(|_| ()))?,
        );
        report(
            "grouped dense (32 x 256 rows)",
            time(&dev, 10, || grouped_matmul(&x, &dense, &spans).map(|_| ()))?,
        );
        report(
            "grouped MXFP4 (32 x 256 rows)",
            time(&dev, 10, || grouped_matmul(&x, &packed, &spans).map(|_| ()))?,
        );
        let deq = time(&dev, 10, || packed.dense().map(|_| ()))?;
        println!("{:<34} {deq:8.3} ms", "dequantize all 32 experts");
        let g = Tensor::randn(0f32, 1.0, (m, rows), &dev)?.to_dtype(DType::BF16)?;
        let dt = dense.transpose()?;
        let pt = packed.transpose()?;
        report(
            "grouped dense, transposed (bwd)",
            time(&dev, 10, || grouped_matmul(&g, &dt, &spans).map(|_| ()))?,
        );
        report(
            "grouped MXFP4, transposed (bwd)",
            time(&dev, 10, || grouped_matmul(&g, &pt, &spans).map(|_| ()))?,
        );
        Ok(())
    }

    /// Host enqueue time (no synchronization inside the timed loop) and wall time per call.
    fn host_and_wall(
        dev: &Device,
        n: usize,
        f: impl Fn(usize) -> candle_core::Result<()>,
    ) -> candle_core::Result<(f64, f64)> {
        f(0)?;
        dev.synchronize()?;
        let t = Instant::now();
        for i in 0..n {
            f(i + 1)?;
        }
        let host = t.elapsed().as_secs_f64();
        dev.synchronize()?;
        let wall = t.elapsed().as_secs_f64();
        Ok((host * 1e6 / n as f64, wall * 1e6 / n as f64))
    }

    /// Spans of 32 experts over `m` rows, uneven like real routing, different for each `seed`.
    fn uneven_spans(m: usize, seed: usize) -> Spans {
        let mut v = Vec::new();
        let mut off = 0;
        for e in 0..32usize {
            let len = if e == 31 {
                m - off
            } else {
                (m / 32) * (60 + (e * 37 + seed * 11) % 81) / 100
            };
            v.push((e, off, len));
            off += len;
        }
        Arc::new(v)
    }

    #[test]
    #[ignore = "GPU figures; run by hand on the GPU machine"]
    fn host_enqueue() -> candle_core::Result<()> {
        let dev = crate::test_util::gpu()?;
        let (e, rows, cols, m) = (32usize, 5760usize, 2880usize, 8192usize);
        let x = Tensor::randn(0f32, 1.0, (m, cols), &dev)?.to_dtype(DType::BF16)?;
        let packed = random_packed(&dev, e, rows, cols)?;
        let dense = GroupedWeight::Dense(packed.dense()?);
        let fixed = uneven_spans(m, 0);
        let show = |name: &str, (h, w): (f64, f64)| {
            println!("{name:<44} host {h:9.1} us/call   wall {w:9.1} us/call");
        };
        let n = 5;
        for (name, w, seed) in [("dense", &dense, 100), ("MXFP4", &packed, 200)] {
            show(
                &format!("grouped {name}, same spans"),
                host_and_wall(&dev, n, |_| grouped_matmul(&x, w, &fixed).map(|_| ()))?,
            );
            show(
                &format!("grouped {name}, new spans each call"),
                host_and_wall(&dev, n, |i| {
                    grouped_matmul(&x, w, &uneven_spans(m, i + seed)).map(|_| ())
                })?,
            );
        }
        let w0 = dense_weight_of(&dense)?;
        let xs = x.narrow(0, 0, 256)?;
        show(
            "32 candle matmuls [256x2880]x[2880x5760]",
            host_and_wall(&dev, n, |_| {
                for _ in 0..32 {
                    xs.matmul(&w0)?;
                }
                Ok(())
            })?,
        );
        let small = Tensor::zeros(1024, DType::F32, &dev)?;
        show(
            "64 candle affine ops on 1024 floats",
            host_and_wall(&dev, n, |_| {
                for _ in 0..64 {
                    small.affine(2.0, 1.0)?;
                }
                Ok(())
            })?,
        );
        Ok(())
    }

    /// Expert 0's `[in, out]` weight of a dense grouped weight.
    fn dense_weight_of(w: &GroupedWeight) -> candle_core::Result<Tensor> {
        match w {
            GroupedWeight::Dense(t) => t.get(0),
            GroupedWeight::Packed { .. } => w.dense()?.get(0),
        }
    }
}
