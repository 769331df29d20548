//! Ctrl-C (SIGINT/SIGTERM) → a flag the training loop polls after every optimizer step, so it can
//! save a checkpoint and return cleanly instead of dying mid-write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Installs the process-wide handler (idempotent). If another handler is already installed by the
/// application, ours is skipped and [`request`] can still be called by that handler.
pub fn install() {
    INSTALL.call_once(|| {
        // An application that installed its own handler keeps it; it can call `request()`.
        let _ = ctrlc::set_handler(on_signal);
    });
}

/// The signal handler: the first Ctrl-C asks the loop to stop after the current step (it then
/// saves a checkpoint); a second one, while that is pending, exits at once with status 130.
fn on_signal() {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        eprintln!("\nsecond Ctrl-C: aborting without saving");
        std::process::exit(130);
    }
    eprintln!("\nCtrl-C: stopping after this optimizer step and saving a checkpoint (Ctrl-C again to abort)");
}

/// Asks the running training loop to stop after the current optimizer step.
pub fn request() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested (and not yet [`clear`]ed).
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Clears a pending request (at the start of a training run).
pub fn clear() {
    INTERRUPTED.store(false, Ordering::SeqCst);
}
