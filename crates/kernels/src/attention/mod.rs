//! Attention with sinks: the fused sink softmax, the chunked attention core and (CUDA) the
//! flash-attention kernels it runs when the shapes allow. Which keys a query sees is O(T)
//! structure ([`KeyMask`]: causal, sliding window, padding, packed documents), tested from
//! indices; no `[T, Tk]` mask of a whole call is ever built.

mod chunked;
#[cfg(feature = "cuda")]
pub(crate) mod flash;
pub(crate) mod sink_softmax;
mod visibility;

pub use chunked::{sink_attention, sink_attention_token_major, CHUNK_ELEMS};
pub use sink_softmax::sink_softmax;
pub use visibility::{rows_per_chunk, KeyMask};
