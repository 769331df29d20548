//! Attention with sinks: the fused sink softmax, the chunked attention core and (CUDA) the
//! flash-attention kernels it runs when the shapes allow.

mod chunked;
#[cfg(feature = "cuda")]
pub(crate) mod flash;
pub(crate) mod sink_softmax;

pub use chunked::{
    sink_attention, sink_attention_structural, sink_attention_token_major, CHUNK_ELEMS,
};
pub use sink_softmax::sink_softmax;
