//! One line per event on stderr, prefixed `bitw-control:` so tests and
//! journald can grep it. Keys are never passed here (the types that hold
//! them print without them).

use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Logs one line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        eprintln!("bitw-control: {}", format_args!($($arg)*))
    };
}

/// Logs one line when `--verbose` is on.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            eprintln!("bitw-control: debug: {}", format_args!($($arg)*))
        }
    };
}
