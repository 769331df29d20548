//! cuBLASLt GEMMs for the grouped matmul, with the algorithm chosen once per shape class.
//!
//! `cublasGemmEx` runs cuBLAS's algorithm heuristic for every shape it has not seen; the experts'
//! row counts change with every routing, and on the GPU machine one such call cost ≈ 70 µs of
//! host time against ≈ 10 µs for a cached one (`grouped::cuda::timings::host_enqueue`): a 24-layer
//! step spent most of its host time there. Here the heuristic runs once per
//! (dtype, transpose, n, k, lda, rows rounded up to a bucket, pointer alignments), and every later
//! GEMM of that class reuses the algorithm through `cublasLtMatmul` (an algorithm valid for the
//! bucket's row count is valid for fewer rows; a call it does not support reports so and the caller
//! falls back to `cublasGemmEx`). The B and C layout descriptors are cached too, by shape: a step
//! runs thousands of expert GEMMs, and the host time is what bounds it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::DType;

/// `C (n × len) = op(A) · B (k × len)`, column-major, as in `cuda::Gemm::span`.
pub(super) struct Call {
    /// Element type of A, B and C.
    pub dtype: DType,
    /// Whether `op(A) = Aᵀ` (A stored `k × n`) rather than A (stored `n × k`).
    pub trans: bool,
    pub n: usize,
    pub k: usize,
    pub len: usize,
    pub lda: usize,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

/// What selects an algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    trans: bool,
    n: usize,
    k: usize,
    lda: usize,
    bucket: usize,
    align: [u32; 3],
}

/// A chosen algorithm with its matmul descriptor and A layout (both fixed per key).
struct Choice {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A `rows × cols` column-major layout with leading dimension `ld`, as a cache key.
type LayoutKey = (DType, usize, usize, usize);

/// One cuBLASLt handle, its algorithm cache (`None`: the heuristic found nothing; use the
/// fallback) and the B/C matrix layouts made so far (descriptors are immutable once made; a
/// routing produces a few hundred distinct row counts, so the cache stays small).
pub(super) struct Lt {
    handle: sys::cublasLtHandle_t,
    choices: Mutex<HashMap<Key, Option<Choice>>>,
    layouts: Mutex<HashMap<LayoutKey, LayoutPtr>>,
}

/// A cached layout descriptor (never destroyed: the cache lives as long as the process).
#[derive(Clone, Copy)]
struct LayoutPtr(sys::cublasLtMatrixLayout_t);

// SAFETY: the handle and the descriptors are only used under the cache's mutex or read-only after
// creation (cuBLASLt handles and descriptors may be used from any thread, not concurrently mutated).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

/// Rows rounded up to the bucket whose algorithm serves them.
fn bucket(len: usize) -> usize {
    if len <= 16 {
        // decode-time row counts (a few tokens per expert) get algorithms of their own
        len
    } else if len <= 512 {
        len.next_multiple_of(32)
    } else if len <= 4096 {
        len.next_multiple_of(256)
    } else {
        len.next_power_of_two()
    }
}

/// A cuBLASLt status as a candle error.
fn lt_err(e: result::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("grouped_matmul: cuBLASLt: {e:?}"))
}

/// The largest power of two (at most 256 bytes) dividing a device address.
fn align_of(ptr: u64) -> u32 {
    1u32 << ptr.trailing_zeros().min(8)
}

fn data_type(dtype: DType) -> candle_core::Result<sys::cudaDataType> {
    Ok(match dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        d => candle_core::bail!("grouped_matmul: dtype {d:?} is not supported on CUDA"),
    })
}

/// A column-major `rows × cols` layout with leading dimension `ld`.
fn layout(
    dtype: DType,
    rows: usize,
    cols: usize,
    ld: usize,
) -> candle_core::Result<sys::cublasLtMatrixLayout_t> {
    result::create_matrix_layout(data_type(dtype)?, rows as u64, cols as u64, ld as i64)
        .map_err(lt_err)
}

/// Destroys layouts made by [`layout`] (errors ignored: nothing to recover).
fn drop_layouts(ls: &[sys::cublasLtMatrixLayout_t]) {
    for &l in ls {
        // SAFETY: each layout was created by `layout` and is destroyed once.
        let _ = unsafe { result::destroy_matrix_layout(l) };
    }
}

impl Lt {
    /// A new handle with an empty cache.
    pub(super) fn new() -> candle_core::Result<Self> {
        Ok(Self {
            handle: result::create_handle().map_err(lt_err)?,
            choices: Mutex::new(HashMap::new()),
            layouts: Mutex::new(HashMap::new()),
        })
    }

    /// The cached layout of a `rows × cols` matrix with leading dimension `ld` (made on first use).
    fn cached_layout(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> candle_core::Result<sys::cublasLtMatrixLayout_t> {
        let mut map = self.layouts.lock().map_err(|_| {
            candle_core::Error::Msg("grouped_matmul: cuBLASLt layout cache poisoned".into())
        })?;
        Ok(match map.entry((dtype, rows, cols, ld)) {
            Entry::Occupied(e) => e.get().0,
            Entry::Vacant(e) => e.insert(LayoutPtr(layout(dtype, rows, cols, ld)?)).0,
        })
    }

    /// Runs `call` on `stream` with `workspace` (`ws_bytes` bytes). `Ok(false)`: no cached or
    /// supported algorithm for this call; nothing was enqueued and the caller should use
    /// `cublasGemmEx`.
    pub(super) fn gemm(
        &self,
        call: &Call,
        stream: sys::cudaStream_t,
        workspace: u64,
        ws_bytes: usize,
    ) -> candle_core::Result<bool> {
        let key = Key {
            dtype: call.dtype,
            trans: call.trans,
            n: call.n,
            k: call.k,
            lda: call.lda,
            bucket: bucket(call.len),
            align: [align_of(call.a), align_of(call.b), align_of(call.c)],
        };
        let mut choices = self.choices.lock().map_err(|_| {
            candle_core::Error::Msg("grouped_matmul: cuBLASLt cache poisoned".into())
        })?;
        let choice = match choices.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(self.choose(&key, ws_bytes)?),
        };
        let Some(choice) = choice else {
            return Ok(false);
        };
        let b = self.cached_layout(call.dtype, call.k, call.len, call.k)?;
        let c = self.cached_layout(call.dtype, call.n, call.len, call.n)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: A, B and C are the caller's device buffers for these shapes (checked by the
        // caller as for `cublasGemmEx`); the descriptors and layouts are live; `workspace` holds
        // `ws_bytes` bytes on `stream`'s device, used by this stream only.
        let status = unsafe {
            result::matmul(
                self.handle,
                choice.desc,
                (&alpha as *const f32).cast::<c_void>(),
                (&beta as *const f32).cast::<c_void>(),
                call.a as *const c_void,
                choice.a,
                call.b as *const c_void,
                b,
                call.c as *const c_void,
                c,
                call.c as *mut c_void,
                c,
                &choice.algo,
                workspace as *mut c_void,
                ws_bytes,
                stream,
            )
        };
        match status {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Ok(false),
            Err(e) => Err(candle_core::Error::Msg(format!(
                "grouped_matmul: cublasLtMatmul ({}x{}x{}) failed: {e:?}",
                call.n, call.len, call.k
            ))),
        }
    }

    /// Runs the heuristic for `key` (rows = its bucket); `None` when it offers nothing.
    fn choose(&self, key: &Key, ws_bytes: usize) -> candle_core::Result<Option<Choice>> {
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(lt_err)?;
        let op = if key.trans {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        };
        let (a_rows, a_cols) = if key.trans {
            (key.k, key.n)
        } else {
            (key.n, key.k)
        };
        let a = layout(key.dtype, a_rows, a_cols, key.lda)?;
        let b = layout(key.dtype, key.k, key.bucket, key.k)?;
        let c = layout(key.dtype, key.n, key.bucket, key.n)?;
        let pref = result::create_matmul_pref().map_err(lt_err)?;
        let ws = ws_bytes as u64;
        type P = sys::cublasLtMatmulPreferenceAttributes_t;
        let prefs = [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
        ];
        // SAFETY: live descriptors; each attribute gets a value of its documented type
        // (TRANSA: i32 cublasOperation_t, MAX_WORKSPACE_BYTES: u64, MIN_ALIGNMENT_*: u32).
        let found = unsafe {
            result::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&(op as i32) as *const i32).cast::<c_void>(),
                std::mem::size_of::<i32>(),
            )
            .map_err(lt_err)?;
            result::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const u64).cast::<c_void>(),
                std::mem::size_of::<u64>(),
            )
            .map_err(lt_err)?;
            for (attr, v) in prefs {
                result::set_matmul_pref_attribute(
                    pref,
                    attr,
                    (&v as *const u32).cast::<c_void>(),
                    std::mem::size_of::<u32>(),
                )
                .map_err(lt_err)?;
            }
            let found = result::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            let _ = result::destroy_matmul_pref(pref);
            found
        };
        drop_layouts(&[b, c]);
        match found {
            Ok(h) => Ok(Some(Choice {
                desc,
                a,
                algo: h.algo,
            })),
            Err(_) => {
                drop_layouts(&[a]);
                // SAFETY: created above, not used elsewhere.
                let _ = unsafe { result::destroy_matmul_desc(desc) };
                Ok(None)
            }
        }
    }
}
