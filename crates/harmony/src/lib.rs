//! gptoss-harmony (work in progress).
