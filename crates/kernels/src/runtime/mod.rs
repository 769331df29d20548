//! What every op of the crate shares: storage access, the NVRTC module cache, the CUDA device,
//! the `GPTOSS_NO_*` switches of the fused paths and the opt-in profile scopes.

pub mod device;
pub mod fast_path;
pub mod grid;
pub mod memory;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod profile;
pub(crate) mod storage;
