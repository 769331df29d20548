//! gptoss-mxfp4 (work in progress).
