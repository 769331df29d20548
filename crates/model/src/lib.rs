//! gptoss-model (work in progress).
