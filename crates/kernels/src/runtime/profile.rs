//! Opt-in wall-clock profile of the pieces of a step (`GPTOSS_PROFILE=1` or `GPTOSS_PROFILE=host`).
//!
//! [`scope`] runs a closure and adds the elapsed time to a per-label total. With `GPTOSS_PROFILE=1`
//! it synchronizes the device before and after, so host work, host↔device syncs and kernel time of a
//! piece all show up (nsys is not available on every GPU machine; ncu only gives kernel times). With
//! `GPTOSS_PROFILE=host` it does not synchronize: the totals are the host's time to enqueue each
//! piece plus any time it blocks inside it (a device→host copy), which tells a launch-bound step
//! from a kernel-bound one. Off (the default) it is a plain call. [`report`] returns the totals,
//! [`reset`] clears them.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::Device;

/// What [`scope`] does, from `GPTOSS_PROFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Unset or `0`: a plain call.
    Off,
    /// `host`: host-side time, no synchronization.
    Host,
    /// Anything else: device-synchronized time.
    Synced,
}

/// The mode chosen by `GPTOSS_PROFILE` (read once).
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("GPTOSS_PROFILE").as_deref() {
        Err(_) | Ok("0") | Ok("") => Mode::Off,
        Ok("host") => Mode::Host,
        Ok(_) => Mode::Synced,
    })
}

fn table() -> &'static Mutex<BTreeMap<&'static str, (f64, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, (f64, u64)>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Runs `f`, timed under `label` when `GPTOSS_PROFILE` is set (see [`Mode`]).
pub fn scope<T, E: From<candle_core::Error>>(
    label: &'static str,
    dev: &Device,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let synced = match mode() {
        Mode::Off => return f(),
        Mode::Host => false,
        Mode::Synced => true,
    };
    if synced {
        dev.synchronize()?;
    }
    let t = Instant::now();
    let out = f()?;
    if synced {
        dev.synchronize()?;
    }
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

/// The totals of [`report`] as printable lines per step (`steps` steps timed since the last
/// [`reset`]): a heading that says what the times are, then one line per label with its
/// milliseconds and calls per step. `None` when nothing was timed (profiling off).
pub fn per_step_table(steps: usize) -> Option<String> {
    let rows = report();
    if rows.is_empty() {
        return None;
    }
    let how = match mode() {
        Mode::Host => "host time to enqueue (and block), not synchronized",
        _ => "device-synchronized",
    };
    let n = steps.max(1) as f64;
    let mut out =
        format!("profile (GPTOSS_PROFILE, {how}, per step over the {steps} timed steps):");
    for (label, secs, calls) in rows {
        out.push_str(&format!(
            "\n  {label:<20} {:>9.3} ms  {:>7.1} calls/step",
            secs * 1e3 / n,
            calls as f64 / n
        ));
    }
    Some(out)
}

/// Clears the totals.
pub fn reset() {
    if let Ok(mut m) = table().lock() {
        m.clear();
    }
}
