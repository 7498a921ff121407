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

/// Writes one whole line with one write: stderr is unbuffered, and
/// `eprintln!` writes each formatted piece on its own (dozens of system calls
/// a line, and lines of several threads could interleave).
pub fn line(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut s = format!("bitw-control: {text}");
    s.push('\n');
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// Logs one line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}

/// Logs one line when `--verbose` is on.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::line(format_args!("debug: {}", format_args!($($arg)*)))
        }
    };
}
