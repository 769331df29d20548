//! Which fused CUDA paths are on: each replaces reference candle ops for tensors on a CUDA device
//! unless its `GPTOSS_NO_*` variable is set (read once per process; for A/B checks). The CPU always
//! keeps the reference ops that the parity tests pin.

use std::sync::OnceLock;

use candle_core::Tensor;

/// A fused path and the variable that turns it off.
#[derive(Debug, Clone, Copy)]
pub enum FastPath {
    /// The fused sink-softmax kernel in the reference attention (`GPTOSS_NO_FUSED_SOFTMAX`).
    SinkSoftmax,
    /// The chunked attention core (`GPTOSS_NO_CHUNKED_ATTN`).
    ChunkedAttention,
    /// The fused RMSNorm and RoPE kernels (`GPTOSS_NO_FUSED_ELEMENTWISE`).
    Elementwise,
    /// The flash-attention forward kernel inside the chunked core (`GPTOSS_NO_FLASH_FWD`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    FlashForward,
    /// The flash-attention backward kernels after the flash forward (`GPTOSS_NO_FLASH_BWD`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    FlashBackward,
}

impl FastPath {
    fn off_var(self) -> &'static str {
        match self {
            Self::SinkSoftmax => "GPTOSS_NO_FUSED_SOFTMAX",
            Self::ChunkedAttention => "GPTOSS_NO_CHUNKED_ATTN",
            Self::Elementwise => "GPTOSS_NO_FUSED_ELEMENTWISE",
            Self::FlashForward => "GPTOSS_NO_FLASH_FWD",
            Self::FlashBackward => "GPTOSS_NO_FLASH_BWD",
        }
    }

    /// Whether this path is used for `t` (on CUDA and not switched off).
    pub fn on_for(self, t: &Tensor) -> bool {
        static OFF: [OnceLock<bool>; 5] = [const { OnceLock::new() }; 5];
        t.device().is_cuda()
            && !*OFF[self as usize].get_or_init(|| std::env::var_os(self.off_var()).is_some())
    }
}
