//! Weight-memory estimate for a config, with experts dequantized (bf16) or kept in MXFP4.

use std::fmt;

use crate::config::Config;
use crate::spec::{tensor_specs, ParamKind};

/// How the expert weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertFormat {
    /// Dequantized to bf16 (2 bytes per value) — what training uses.
    Bf16,
    /// Packed MXFP4: 16 bytes of nibbles plus 1 scale byte per 32 values (4.25 bits per value).
    Mxfp4,
}

/// Bytes of the weights of a config (every non-expert tensor in bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Total parameters (experts counted dequantized).
    pub parameters: u64,
    /// Expert weight matrices (`gate_up_proj`, `down_proj`) in the chosen format.
    pub expert_bytes: u64,
    /// Everything else (embeddings, attention, router, norms, biases, lm_head) in bf16.
    pub other_bytes: u64,
    /// The expert format.
    pub format: ExpertFormat,
}

impl MemoryEstimate {
    /// `expert_bytes + other_bytes`.
    pub fn total_bytes(&self) -> u64 {
        self.expert_bytes + self.other_bytes
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "{} parameters; experts ({:?}) {:.2} GiB + other (bf16) {:.2} GiB = {:.2} GiB of weights",
            self.parameters,
            self.format,
            gib(self.expert_bytes),
            gib(self.other_bytes),
            gib(self.total_bytes())
        )
    }
}

/// Weight memory of `config` with experts in `format` (weights only: no activations, KV cache or optimizer).
/// For gpt-oss-20b with MXFP4 experts this is the 13,761,264,768 bytes of the released checkpoint.
pub fn memory_estimate(config: &Config, format: ExpertFormat) -> MemoryEstimate {
    let (mut parameters, mut expert_bytes, mut other_bytes) = (0u64, 0u64, 0u64);
    for s in tensor_specs(config) {
        let n: u64 = s.shape.iter().product::<usize>() as u64;
        parameters += n;
        match (s.kind, format) {
            (ParamKind::Expert, ExpertFormat::Mxfp4) => expert_bytes += n / 32 * 17,
            (ParamKind::Expert, ExpertFormat::Bf16) => expert_bytes += 2 * n,
            _ => other_bytes += 2 * n,
        }
    }
    MemoryEstimate {
        parameters,
        expert_bytes,
        other_bytes,
        format,
    }
}
