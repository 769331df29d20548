//! The CUDA device as this crate runs best on it.

use candle_core::Device;

use candle_core::Result;

/// CUDA device `ordinal` (candle's [`Device::new_cuda`]) with cudarc's per-allocation event tracking
/// turned off.
///
/// With tracking on (cudarc's default) every allocation creates two CUDA events and every kernel
/// argument records one, so that buffers shared between streams stay ordered: a few microseconds of
/// host time per op, thousands of times per training step. Candle runs every op on the device's one
/// stream, and the only side streams of this crate (the MoE grouped matmul's lanes) are ordered by
/// explicit joins, so the tracking buys nothing here. Use [`Device::new_cuda`] instead when other
/// code of the process runs candle tensors on streams of its own.
///
/// It also starts compiling every kernel module of this crate on background threads
/// ([`crate::runtime::nvrtc::precompile_in_background`]; PTX cached on disk), so that the model
/// load that usually follows hides the compilation and the first forward does not stall on it.
///
/// # Errors
/// When candle cannot open the device (no CUDA driver, no such ordinal, built without `cuda`).
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let dev = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        // SAFETY: only buffers created after this call go untracked, and all of them are used on
        // the device's stream or behind the explicit stream joins described above.
        unsafe { d.disable_event_tracking() };
        crate::runtime::nvrtc::precompile_in_background();
    }
    Ok(dev)
}

/// [`cuda_device`] when the crate is built with `cuda`, else the CPU (as candle's
/// [`Device::cuda_if_available`]).
///
/// # Errors
/// As [`cuda_device`].
pub fn cuda_if_available(ordinal: usize) -> Result<Device> {
    if candle_core::utils::cuda_is_available() {
        cuda_device(ordinal)
    } else {
        Ok(Device::Cpu)
    }
}
