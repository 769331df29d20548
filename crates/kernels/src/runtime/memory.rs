//! Device memory figures from CUDA's default memory pool (what candle allocates from): the bytes
//! allocated now and their high-water mark (what `torch.cuda.max_memory_allocated` reports for
//! PyTorch), the reserved high-water mark, and the device's free/total memory. Off CUDA every
//! figure is 0 and [`MemoryPool::of`] is `None`.

use candle_core::Device;

/// Allocated and reserved bytes of a device's default memory pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes allocated now.
    pub allocated: u64,
    /// High-water mark of allocated bytes since the last [`MemoryPool::reset_high`].
    pub peak_allocated: u64,
    /// High-water mark of reserved bytes since the last [`MemoryPool::reset_high`].
    pub peak_reserved: u64,
}

/// A CUDA device's default memory pool.
pub struct MemoryPool(#[cfg(feature = "cuda")] cuda::Pool);

impl MemoryPool {
    /// The pool of `dev` (`None` off CUDA or when the driver does not answer).
    pub fn of(dev: &Device) -> Option<Self> {
        #[cfg(feature = "cuda")]
        return cuda::Pool::of(dev).map(Self);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = dev;
            None
        }
    }

    /// The pool's current figures.
    pub fn stats(&self) -> PoolStats {
        #[cfg(feature = "cuda")]
        return self.0.stats();
        #[cfg(not(feature = "cuda"))]
        PoolStats::default()
    }

    /// Restarts both high-water marks from the current figures.
    pub fn reset_high(&self) {
        #[cfg(feature = "cuda")]
        self.0.reset_high();
    }

    /// Never release freed pool memory back to the driver (release threshold unlimited), like
    /// PyTorch's caching allocator; by default CUDA returns it at every synchronization.
    pub fn keep_memory(&self) {
        #[cfg(feature = "cuda")]
        self.0.keep_memory();
    }
}

/// `(free, total)` bytes of the current CUDA device (`(0, 0)` off CUDA).
pub fn device_memory() -> (usize, usize) {
    #[cfg(feature = "cuda")]
    return cuda::info();
    #[cfg(not(feature = "cuda"))]
    (0, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::Device;

    use super::PoolStats;

    pub struct Pool(sys::CUmemoryPool);

    impl Pool {
        pub fn of(dev: &Device) -> Option<Pool> {
            let cd = dev.as_cuda_device().ok()?;
            let stream = cd.cuda_stream();
            let ctx = stream.context();
            ctx.bind_to_thread().ok()?;
            // SAFETY: the device handle comes from a live context.
            unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
                .ok()
                .map(Pool)
        }

        fn get(&self, attr: sys::CUmemPool_attribute) -> u64 {
            let mut v: u64 = 0;
            // SAFETY: the attributes read here are 64-bit counters.
            let _ = unsafe {
                result::mem_pool::get_attribute(self.0, attr, &mut v as *mut u64 as *mut _)
            };
            v
        }

        pub fn stats(&self) -> PoolStats {
            use sys::CUmemPool_attribute::*;
            PoolStats {
                allocated: self.get(CU_MEMPOOL_ATTR_USED_MEM_CURRENT),
                peak_allocated: self.get(CU_MEMPOOL_ATTR_USED_MEM_HIGH),
                peak_reserved: self.get(CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH),
            }
        }

        pub fn keep_memory(&self) {
            let mut max: u64 = u64::MAX;
            // SAFETY: the release threshold is a 64-bit value.
            let _ = unsafe {
                result::mem_pool::set_attribute(
                    self.0,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut max as *mut u64 as *mut _,
                )
            };
        }

        pub fn reset_high(&self) {
            use sys::CUmemPool_attribute::*;
            for attr in [
                CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero: u64 = 0;
                // SAFETY: resetting a high-water mark takes a 64-bit zero.
                let _ = unsafe {
                    result::mem_pool::set_attribute(self.0, attr, &mut zero as *mut u64 as *mut _)
                };
            }
        }
    }

    pub fn info() -> (usize, usize) {
        result::mem_get_info().unwrap_or((0, 0))
    }
}
