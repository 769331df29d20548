//! gptoss-lora (work in progress).
