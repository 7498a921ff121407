//! A value that one writer (the control thread) replaces at run time and the
//! workers read every loop iteration and after every RX burst: the filter
//! table, the punt set.
//!
//! The value sits in an `ArcSwap`; next to it a version counter moves on with
//! every replacement. A worker keeps its own `Arc` of the value ([`Reader`])
//! and re-loads it only when the version changed, so an unchanged value costs
//! one atomic load per read instead of an `ArcSwap` guard (two atomic
//! read-modify-writes). A worker lets go of a replaced value at its next
//! iteration; the writer keeps the old value until then, so the last
//! reference (and the free) is never the worker's (see `ctl`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub struct Published<T> {
    current: ArcSwap<T>,
    version: AtomicU64,
}

impl<T> Published<T> {
    pub fn new(value: T) -> Published<T> {
        Published {
            current: ArcSwap::from_pointee(value),
            version: AtomicU64::new(0),
        }
    }

    /// Replaces the value; returns the old one, for the caller to free
    /// once no reader holds it (`Arc::strong_count == 1`).
    pub fn publish(&self, value: Arc<T>) -> Arc<T> {
        let old = self.current.swap(value);
        self.version.fetch_add(1, Ordering::Release);
        old
    }

    /// The current value (slow paths: the writer, statistics).
    pub fn load(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// A reader holding the current value.
    pub fn reader(&self) -> Reader<T> {
        let version = self.version.load(Ordering::Acquire);
        Reader {
            value: self.current.load_full(),
            version,
        }
    }
}

/// A worker's copy of a [`Published`] value.
pub struct Reader<T> {
    value: Arc<T>,
    version: u64,
}

impl<T> Reader<T> {
    /// The current value: one atomic load when it has not changed.
    #[inline]
    pub fn get(&mut self, p: &Published<T>) -> &T {
        let v = p.version.load(Ordering::Acquire);
        if v != self.version {
            // The version is read first: a value newer than it is fine (the
            // next call reloads once more), an older one impossible.
            self.value = p.current.load_full();
            self.version = v;
        }
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_every_replacement_and_let_go_of_old_values() {
        let p = Published::new(1u32);
        let mut r = p.reader();
        assert_eq!(*r.get(&p), 1);
        let old = p.publish(Arc::new(2));
        assert_eq!(Arc::strong_count(&old), 2, "the reader still holds 1");
        assert_eq!(*r.get(&p), 2);
        assert_eq!(Arc::strong_count(&old), 1, "...until it looks again");
        assert_eq!(**p.load(), 2);
        // Concurrently: the reader never sees a value go back, and sees the last.
        let p = Arc::new(p);
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                while last != 999 {
                    let v = *r.get(&p);
                    assert!(v >= last, "went back from {last} to {v}");
                    last = v;
                }
            })
        };
        for i in 3..1000 {
            let _ = p.publish(Arc::new(i));
        }
        reader.join().unwrap();
    }
}
