//! gptoss-sft (work in progress).
