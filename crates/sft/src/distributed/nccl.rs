//! [`Nccl`]: one process per GPU, sums over the ranks by NCCL all-reduces enqueued on a
//! communication stream of the candle device, ordered by events after the compute stream's work
//! that made their inputs and before the work that reads their sums (no host synchronisation).
//! A gradient bucket ([`GradReducer::start_bucket`]) runs there while the compute stream goes on
//! with the backward of the layers below; every NCCL call of the communicator goes to that one
//! stream, so the calls run in the order they were issued, the same on every rank.
//!
//! `libnccl.so.2` is opened at run time (`GPTOSS_NCCL_LIBRARY` names another file): building
//! needs no NCCL, and a single-GPU run never loads it. PyTorch wheels ship it under
//! `site-packages/nvidia/nccl/lib`; put that directory on `LD_LIBRARY_PATH`. (candle's own `nccl`
//! feature enables cudarc's NCCL module, which with this workspace's `dynamic-linking` CUDA build
//! links `-lnccl` at build time; the few NCCL entry points used here are bound directly.)
//!
//! The unique id goes from rank 0 to the others through the TCP [`super::rendezvous`], whose
//! connections then watch for a dead rank: NCCL itself would wait for it forever.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::{DType, Device, Tensor};
use libloading::Library;

use super::rendezvous::{meet, FailureHandler, RendezvousSpec, Watch};
use super::{GradReducer, LaunchEnv, PendingSum};
use crate::error::{Result, SftError};

/// NCCL's `ncclUniqueId`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
/// `ncclFloat32`, `ncclFloat64`, `ncclSum` of `nccl.h`.
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_SUM: c_int = 0;

/// The NCCL entry points used.
struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    _lib: Library,
}

/// The symbol `symbol` of `lib` as a `T` (an `extern "C"` function pointer).
fn sym<T: Copy>(lib: &Library, name: &str, symbol: &[u8]) -> std::result::Result<T, String> {
    // SAFETY: every caller's `T` is the C signature that nccl.h declares for `symbol`.
    unsafe { lib.get::<T>(symbol) }
        .map(|s| *s)
        .map_err(|e| format!("{name}: {}: {e}", String::from_utf8_lossy(symbol)))
}

impl Api {
    fn load() -> std::result::Result<Self, String> {
        let name = std::env::var("GPTOSS_NCCL_LIBRARY").unwrap_or_else(|_| "libnccl.so.2".into());
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        let lib = unsafe { Library::new(&name) }.map_err(|e| {
            format!(
                "cannot load {name} ({e}); put the directory holding it on LD_LIBRARY_PATH \
                 (PyTorch ships it in site-packages/nvidia/nccl/lib) or name the file in \
                 GPTOSS_NCCL_LIBRARY"
            )
        })?;
        Ok(Self {
            get_unique_id: sym(&lib, &name, b"ncclGetUniqueId")?,
            comm_init_rank: sym(&lib, &name, b"ncclCommInitRank")?,
            all_reduce: sym(&lib, &name, b"ncclAllReduce")?,
            group_start: sym(&lib, &name, b"ncclGroupStart")?,
            group_end: sym(&lib, &name, b"ncclGroupEnd")?,
            comm_destroy: sym(&lib, &name, b"ncclCommDestroy")?,
            get_error_string: sym(&lib, &name, b"ncclGetErrorString")?,
            get_version: sym(&lib, &name, b"ncclGetVersion")?,
            _lib: lib,
        })
    }

    fn describe(&self, code: c_int) -> String {
        // SAFETY: NCCL returns a static NUL-terminated string for any code.
        let p = unsafe { (self.get_error_string)(code) };
        if p.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: non-null, NUL-terminated, static.
        let s = unsafe { CStr::from_ptr(p) };
        format!("NCCL error {code}: {}", s.to_string_lossy())
    }
}

/// One rank of an NCCL job (see the module docs).
pub struct Nccl {
    api: Api,
    comm: Comm,
    rank: usize,
    world: usize,
    device: Device,
    watch: Mutex<Option<Watch>>,
    /// Serialises calls on the communicator (NCCL's are not thread-safe).
    lock: Mutex<()>,
    /// The stream every NCCL call is enqueued on (made on first use).
    comm_stream: std::sync::OnceLock<Arc<CudaStream>>,
}

// SAFETY: the communicator is only used under `lock`; NCCL communicators may be used from any
// thread, one call at a time.
unsafe impl Send for Nccl {}
// SAFETY: as above.
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the job of `env` on `device` (its CUDA device): loads NCCL, meets the other ranks
    /// on `MASTER_ADDR:port` within `timeout` (rank 0 makes the unique id), starts the liveness
    /// watch (`on_failure` gets the error naming a rank that died), and creates the
    /// communicator.
    pub fn init(
        env: &LaunchEnv,
        device: &Device,
        timeout: Duration,
        on_failure: FailureHandler,
    ) -> Result<Self> {
        let err = |message: String| SftError::Distributed {
            rank: env.rank,
            world_size: env.world_size,
            message,
        };
        let api = Api::load().map_err(&err)?;
        let cuda = device
            .as_cuda_device()
            .map_err(|e| err(format!("NCCL needs a CUDA device: {e}")))?;
        let spec = RendezvousSpec {
            rank: env.rank,
            world_size: env.world_size,
            addr: env.master_addr.clone(),
            port: env.rendezvous_port,
            timeout,
        };
        let meeting = meet(&spec, || {
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: `id` is a valid out-pointer.
            let rc = unsafe { (api.get_unique_id)(&mut id) };
            if rc != 0 {
                return Err(err(format!("ncclGetUniqueId: {}", api.describe(rc))));
            }
            Ok(id.internal.iter().map(|&c| c as u8).collect())
        })?;
        if meeting.payload.len() != 128 {
            return Err(err(format!(
                "rank 0 sent a unique id of {} bytes, NCCL's has 128",
                meeting.payload.len()
            )));
        }
        let mut id = UniqueId { internal: [0; 128] };
        for (d, &s) in id.internal.iter_mut().zip(&meeting.payload) {
            *d = s as c_char;
        }
        let watch = meeting.watch(on_failure)?;
        cuda.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| err(format!("binding the CUDA context: {e}")))?;
        let mut comm: Comm = std::ptr::null_mut();
        let (world, rank) = (env.world_size as c_int, env.rank as c_int);
        // SAFETY: valid out-pointer; the id is the one every rank received.
        let rc = unsafe { (api.comm_init_rank)(&mut comm, world, id, rank) };
        if rc != 0 {
            return Err(err(format!("ncclCommInitRank: {}", api.describe(rc))));
        }
        Ok(Self {
            api,
            comm,
            rank: env.rank,
            world: env.world_size,
            device: device.clone(),
            watch: Mutex::new(Some(watch)),
            lock: Mutex::new(()),
            comm_stream: std::sync::OnceLock::new(),
        })
    }

    /// NCCL's version as `major.minor.patch`.
    pub fn version(&self) -> String {
        let mut v: c_int = 0;
        // SAFETY: valid out-pointer.
        unsafe { (self.api.get_version)(&mut v) };
        let (major, minor, patch) = if v >= 10000 {
            (v / 10000, (v % 10000) / 100, v % 100)
        } else {
            (v / 1000, (v % 1000) / 100, v % 100)
        };
        format!("{major}.{minor}.{patch}")
    }

    /// The normal end of the run: tells the other ranks goodbye (so that their watch does not
    /// report this rank when it exits).
    pub fn finish(&self) {
        if let Some(w) = self.watch.lock().ok().and_then(|mut w| w.take()) {
            w.finish();
        }
    }

    fn err(&self, message: String) -> SftError {
        SftError::Distributed {
            rank: self.rank,
            world_size: self.world,
            message,
        }
    }

    /// The device's compute stream and the communication stream.
    fn streams(&self) -> Result<(Arc<CudaStream>, Arc<CudaStream>)> {
        let compute = self.device.as_cuda_device()?.cuda_stream();
        if let Some(c) = self.comm_stream.get() {
            return Ok((compute, c.clone()));
        }
        let c = compute
            .fork()
            .map_err(|e| self.err(format!("creating the NCCL stream: {e}")))?;
        Ok((compute, self.comm_stream.get_or_init(|| c).clone()))
    }

    /// Enqueues in-place sums of `tensors` (contiguous, on this rank's device, of `dtype`) in one
    /// NCCL group on the communication stream, after the compute stream's work so far. Returns
    /// the compute and communication streams (the caller orders the sums' readers after them).
    fn enqueue_all_reduce(
        &self,
        tensors: &[Tensor],
        dtype: DType,
    ) -> Result<(Arc<CudaStream>, Arc<CudaStream>)> {
        let nccl_type = match dtype {
            DType::F32 => NCCL_FLOAT32,
            DType::F64 => NCCL_FLOAT64,
            other => return Err(self.err(format!("all-reduce of {other:?}"))),
        };
        let (compute, comm) = self.streams()?;
        comm.join(&compute)
            .map_err(|e| self.err(format!("ordering the NCCL stream: {e}")))?;
        let _one = self
            .lock
            .lock()
            .map_err(|_| self.err("NCCL lock poisoned".into()))?;
        // SAFETY: group calls have no preconditions.
        let rc = unsafe { (self.api.group_start)() };
        if rc != 0 {
            return Err(self.err(format!("ncclGroupStart: {}", self.api.describe(rc))));
        }
        let mut failed = None;
        for (k, t) in tensors.iter().enumerate() {
            match self.enqueue(t, dtype, nccl_type, &comm) {
                Ok(()) => {}
                Err(e) => {
                    failed = Some(format!("bucket {k}: {e}"));
                    break;
                }
            }
        }
        // SAFETY: closes the group opened above.
        let rc = unsafe { (self.api.group_end)() };
        if let Some(m) = failed {
            return Err(self.err(m));
        }
        if rc != 0 {
            return Err(self.err(format!("ncclGroupEnd: {}", self.api.describe(rc))));
        }
        Ok((compute, comm))
    }

    /// [`Self::enqueue_all_reduce`], with the compute stream's later work ordered after the sums.
    fn all_reduce_in_place(&self, tensors: &[Tensor], dtype: DType) -> Result<()> {
        let (compute, comm) = self.enqueue_all_reduce(tensors, dtype)?;
        compute
            .join(&comm)
            .map_err(|e| self.err(format!("ordering after the NCCL stream: {e}")))
    }

    fn enqueue(
        &self,
        t: &Tensor,
        dtype: DType,
        nccl_type: c_int,
        stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> std::result::Result<(), String> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        if t.dtype() != dtype {
            return Err(format!("{:?} tensor in a {dtype:?} reduction", t.dtype()));
        }
        let (st, l) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*st else {
            return Err("tensor is not on a CUDA device".into());
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            return Err("tensor is not contiguous".into());
        };
        let n = b - a;
        // the address only: the communication stream was ordered after the tensor's writers
        let ptr = match dtype {
            DType::F32 => {
                let view = cs
                    .as_cuda_slice::<f32>()
                    .map_err(|e| e.to_string())?
                    .slice(a..b);
                let (p, _guard) = view.device_ptr(stream);
                p
            }
            _ => {
                let view = cs
                    .as_cuda_slice::<f64>()
                    .map_err(|e| e.to_string())?
                    .slice(a..b);
                let (p, _guard) = view.device_ptr(stream);
                p
            }
        };
        let buf = ptr as *mut c_void;
        // SAFETY: `buf` holds `n` elements of `dtype` on this rank's device; the tensors were made
        // by the caller for this reduction and are read by nobody else meanwhile; the stream
        // waits for the compute stream's work so far (their producers), and the compute stream
        // waits for it before their readers (`all_reduce_in_place`, `PendingSum::wait`).
        let rc = unsafe {
            (self.api.all_reduce)(
                buf,
                buf,
                n,
                nccl_type,
                NCCL_SUM,
                self.comm,
                stream.cu_stream() as *mut c_void,
            )
        };
        if rc != 0 {
            return Err(format!("ncclAllReduce: {}", self.api.describe(rc)));
        }
        Ok(())
    }
}

impl GradReducer for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn finish(&self) {
        Nccl::finish(self)
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let t = Tensor::from_slice(values, values.len(), &self.device)?;
        self.all_reduce_in_place(std::slice::from_ref(&t), DType::F64)?;
        values.copy_from_slice(&t.to_vec1::<f64>()?);
        Ok(())
    }

    fn all_reduce_buckets(&self, buckets: Vec<Tensor>) -> Result<Vec<Tensor>> {
        // fresh copies the reduction may write into (the buckets may share storage elsewhere)
        let own = buckets
            .iter()
            .map(|b| Ok(b.to_dtype(DType::F32)?.contiguous()?.copy()?))
            .collect::<Result<Vec<_>>>()?;
        self.all_reduce_in_place(&own, DType::F32)?;
        Ok(own)
    }

    fn start_bucket(&self, bucket: Tensor) -> Result<PendingSum> {
        // the caller hands the bucket over: it is summed in place
        let own = bucket.to_dtype(DType::F32)?.contiguous()?;
        let (compute, comm) = self.enqueue_all_reduce(std::slice::from_ref(&own), DType::F32)?;
        let done = comm
            .record_event(None)
            .map_err(|e| self.err(format!("recording the NCCL event: {e}")))?;
        let (rank, world) = (self.rank, self.world);
        Ok(PendingSum::new(move || {
            compute.wait(&done).map_err(|e| SftError::Distributed {
                rank,
                world_size: world,
                message: format!("waiting for the NCCL stream: {e}"),
            })?;
            Ok(own)
        }))
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: the communicator was created by ncclCommInitRank and is not used after.
            unsafe { (self.api.comm_destroy)(self.comm) };
        }
    }
}
