//! Opt-in wall-clock profile of the pieces of a step (`GPTOSS_PROFILE=1`).
//!
//! [`scope`] runs a closure; when profiling is on it synchronizes the device before and after and
//! adds the elapsed time to a per-label total, so host work, host↔device syncs and kernel time of a
//! piece all show up (nsys is not available on every GPU machine; ncu only gives kernel times). Off
//! (the default) it is a plain call. [`report`] returns the totals, [`reset`] clears them.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::Device;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("GPTOSS_PROFILE").is_some_and(|v| v != "0"))
}

fn table() -> &'static Mutex<BTreeMap<&'static str, (f64, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, (f64, u64)>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Runs `f`, timed under `label` (device-synchronized) when `GPTOSS_PROFILE` is set.
pub fn scope<T, E: From<candle_core::Error>>(
    label: &'static str,
    dev: &Device,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !enabled() {
        return f();
    }
    dev.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    dev.synchronize()?;
    let dt = t.elapsed().as_secs_f64();
    if let Ok(mut m) = table().lock() {
        let e = m.entry(label).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
    }
    Ok(out)
}

/// `(label, total seconds, calls)` of every scope timed since the last [`reset`], by label.
pub fn report() -> Vec<(&'static str, f64, u64)> {
    table()
        .lock()
        .map(|m| m.iter().map(|(k, v)| (*k, v.0, v.1)).collect())
        .unwrap_or_default()
}

/// Clears the totals.
pub fn reset() {
    if let Ok(mut m) = table().lock() {
        m.clear();
    }
}
