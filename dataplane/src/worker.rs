//! The poll-mode worker: bursts from both ports, parse, classify, forward.
//!
//! Each stage handles a whole burst (VPP's vector discipline). On this path:
//! no allocation, no lock, no syscall; every input ends as forwarded or as a
//! counted drop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::MAX_BURST;
use crate::counters::{DropReason, PortSide, WorkerCounters};
use crate::dpdk::{Burst, KeyV4, KeyV6, PortQueue};
use crate::filter::{Direction, FilterTable, Verdict};
use crate::wire::{parse_segmented, Parsed};

/// Everything one worker needs; moved onto its lcore.
pub struct Worker {
    pub id: usize,
    pub inside: PortQueue,
    pub outside: PortQueue,
    pub burst: usize,
    pub filter: Arc<FilterTable>,
    pub counters: Arc<WorkerCounters>,
    pub stop: Arc<AtomicBool>,
}

/// Per-burst scratch space, allocated once per worker.
struct Scratch {
    keep: [bool; MAX_BURST],
    v4: [KeyV4; MAX_BURST],
    v4_at: [u16; MAX_BURST],
    v6: [KeyV6; MAX_BURST],
    v6_at: [u16; MAX_BURST],
    verdicts: [Verdict; MAX_BURST],
}

/// Sets the stop flag if the worker unwinds, so the others stop too.
struct StopOnPanic(Arc<AtomicBool>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

impl Worker {
    pub fn run(self) {
        let _guard = StopOnPanic(self.stop.clone());
        let mut burst = Burst::default();
        let mut s = Box::new(Scratch {
            keep: [false; MAX_BURST],
            v4: [KeyV4::default(); MAX_BURST],
            v4_at: [0; MAX_BURST],
            v6: [KeyV6::default(); MAX_BURST],
            v6_at: [0; MAX_BURST],
            verdicts: [Verdict::Bypass; MAX_BURST],
        });
        while !self.stop.load(Ordering::Relaxed) {
            let n = self.step(Direction::Out, &mut burst, &mut s)
                + self.step(Direction::In, &mut burst, &mut s);
            if n == 0 {
                self.counters.idle_polls.add(1);
            } else {
                self.counters.busy_polls.add(1);
            }
        }
    }

    /// One burst in one direction; returns how many frames it received.
    #[inline]
    fn step(&self, dir: Direction, burst: &mut Burst, s: &mut Scratch) -> usize {
        let (rx, tx, rx_side, tx_side) = match dir {
            Direction::Out => (
                self.inside,
                self.outside,
                PortSide::Inside,
                PortSide::Outside,
            ),
            Direction::In => (
                self.outside,
                self.inside,
                PortSide::Outside,
                PortSide::Inside,
            ),
        };
        let n = burst.rx(rx, self.burst);
        if n == 0 {
            return 0;
        }
        let c = &self.counters;
        let mut rx_bytes = 0u64;
        let (mut n4, mut n6) = (0usize, 0usize);
        let (mut malformed, mut non_ip) = (0u64, 0u64);
        for i in 0..n {
            let len = burst.pkt_len(i);
            rx_bytes += len as u64;
            s.keep[i] = false;
            match parse_segmented(burst.frame(i), len as usize) {
                Parsed::NonIp => {
                    s.keep[i] = true;
                    non_ip += 1;
                }
                Parsed::Malformed(_) => malformed += 1,
                Parsed::V4 {
                    key,
                    fragment: false,
                } => {
                    s.v4[n4] = key;
                    s.v4_at[n4] = i as u16;
                    n4 += 1;
                }
                Parsed::V6 {
                    key,
                    fragment: false,
                } => {
                    s.v6[n6] = key;
                    s.v6_at[n6] = i as u16;
                    n6 += 1;
                }
                // Non-initial fragments are rare: classify them one by one in the fragment tries.
                Parsed::V4 {
                    key,
                    fragment: true,
                } => {
                    let mut v = [Verdict::Bypass];
                    self.filter.classify_v4(dir, true, &[key], &mut v);
                    s.keep[i] = self.apply(v[0]);
                }
                Parsed::V6 {
                    key,
                    fragment: true,
                } => {
                    let mut v = [Verdict::Bypass];
                    self.filter.classify_v6(dir, true, &[key], &mut v);
                    s.keep[i] = self.apply(v[0]);
                }
            }
        }
        c.rx[rx_side as usize].add(n as u64, rx_bytes);
        c.non_ip.add(non_ip);
        c.count_drop(DropReason::Malformed, malformed);

        if n4 > 0 {
            self.filter
                .classify_v4(dir, false, &s.v4[..n4], &mut s.verdicts[..n4]);
            for j in 0..n4 {
                s.keep[s.v4_at[j] as usize] = self.apply(s.verdicts[j]);
            }
        }
        if n6 > 0 {
            self.filter
                .classify_v6(dir, false, &s.v6[..n6], &mut s.verdicts[..n6]);
            for j in 0..n6 {
                s.keep[s.v6_at[j] as usize] = self.apply(s.verdicts[j]);
            }
        }

        let out = burst.forward(&s.keep[..n], tx);
        c.tx[tx_side as usize].add(out.sent as u64, out.sent_bytes);
        c.count_drop(DropReason::TxFull, out.refused as u64);
        n
    }

    /// Counts a verdict and says whether the packet goes out.
    #[inline]
    fn apply(&self, v: Verdict) -> bool {
        let c = &self.counters;
        match v {
            Verdict::Bypass => {
                c.bypassed.add(1);
                true
            }
            Verdict::Discard { .. } => {
                c.count_drop(DropReason::PolicyDiscard, 1);
                false
            }
            Verdict::DefaultDiscard => {
                c.count_drop(DropReason::DefaultDiscard, 1);
                false
            }
            // No ESP yet: fail closed, never send protected traffic in plaintext.
            Verdict::Protect { .. } => {
                c.count_drop(DropReason::ProtectNoSa, 1);
                false
            }
        }
    }
}
