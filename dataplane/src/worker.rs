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
use crate::filter::{Direction, FilterTable, FlowCache, Verdict};
use crate::wire::{parse_into, FrameKind};

/// Everything one worker needs; moved onto its lcore.
pub struct Worker {
    pub id: usize,
    pub inside: PortQueue,
    pub outside: PortQueue,
    pub burst: usize,
    /// Flow-cache entries per direction and address family (0: no cache).
    pub flow_cache: usize,
    pub filter: Arc<FilterTable>,
    pub counters: Arc<WorkerCounters>,
    pub stop: Arc<AtomicBool>,
}

/// Per-burst scratch space, allocated once per worker.
struct Scratch {
    keep: [bool; MAX_BURST],
    /// Batch slots: frame i's key is parsed into slot n4 (or n6) <= i, and
    /// kept there only if the frame turns out to be IPv4 (IPv6).
    v4: [KeyV4; MAX_BURST],
    v4_at: [u16; MAX_BURST],
    v6: [KeyV6; MAX_BURST],
    v6_at: [u16; MAX_BURST],
    verdicts: [Verdict; MAX_BURST],
    /// Flow caches per direction (index: `Direction as usize`); `None` when disabled.
    cache_v4: Option<[FlowCache<KeyV4>; 2]>,
    cache_v6: Option<[FlowCache<KeyV6>; 2]>,
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
            cache_v4: (self.flow_cache > 0).then(|| {
                [
                    FlowCache::new(self.flow_cache),
                    FlowCache::new(self.flow_cache),
                ]
            }),
            cache_v6: (self.flow_cache > 0).then(|| {
                [
                    FlowCache::new(self.flow_cache),
                    FlowCache::new(self.flow_cache),
                ]
            }),
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
        if self.filter.is_wire(dir) {
            // No rule in this direction and default bypass: a plain wire.
            let (out, rx_bytes) = burst.forward_all(tx);
            c.rx[rx_side as usize].add(n as u64, rx_bytes);
            c.tx[tx_side as usize].add(out.sent as u64, out.sent_bytes);
            c.uninspected.add(n as u64);
            c.count_drop(DropReason::TxFull, out.refused as u64);
            return n;
        }
        // Counts are kept locally and added to the shared counters once per burst.
        let mut t = Tally::default();
        let (mut n4, mut n6) = (0usize, 0usize);
        // Headers of the whole burst are fetched while the first are parsed.
        for i in 0..n {
            burst.prefetch_frame(i);
        }
        for i in 0..n {
            let len = burst.pkt_len(i);
            t.rx_bytes += len as u64;
            s.keep[i] = false;
            // Parse straight into the next free batch slot of each family.
            match parse_into(burst.frame(i), len as usize, &mut s.v4[n4], &mut s.v6[n6]) {
                FrameKind::NonIp => {
                    s.keep[i] = true;
                    t.non_ip += 1;
                }
                FrameKind::Malformed(_) => t.malformed += 1,
                FrameKind::V4 { fragment: false } => {
                    s.v4_at[n4] = i as u16;
                    n4 += 1;
                }
                FrameKind::V6 { fragment: false } => {
                    s.v6_at[n6] = i as u16;
                    n6 += 1;
                }
                // Non-initial fragments are rare: classify them one by one in the
                // fragment tries (their slot is reused by the next packet).
                FrameKind::V4 { fragment: true } => {
                    let mut v = [Verdict::Bypass];
                    self.filter
                        .classify_v4(dir, true, std::slice::from_ref(&s.v4[n4]), &mut v);
                    s.keep[i] = t.apply(v[0]);
                }
                FrameKind::V6 { fragment: true } => {
                    let mut v = [Verdict::Bypass];
                    self.filter
                        .classify_v6(dir, true, std::slice::from_ref(&s.v6[n6]), &mut v);
                    s.keep[i] = t.apply(v[0]);
                }
            }
        }
        if n4 > 0 {
            match &mut s.cache_v4 {
                Some(c) => self.filter.classify_v4_cached(
                    dir,
                    &mut c[dir as usize],
                    &s.v4[..n4],
                    &mut s.verdicts[..n4],
                ),
                None => self
                    .filter
                    .classify_v4(dir, false, &s.v4[..n4], &mut s.verdicts[..n4]),
            }
            for j in 0..n4 {
                s.keep[s.v4_at[j] as usize] = t.apply(s.verdicts[j]);
            }
        }
        if n6 > 0 {
            match &mut s.cache_v6 {
                Some(c) => self.filter.classify_v6_cached(
                    dir,
                    &mut c[dir as usize],
                    &s.v6[..n6],
                    &mut s.verdicts[..n6],
                ),
                None => self
                    .filter
                    .classify_v6(dir, false, &s.v6[..n6], &mut s.verdicts[..n6]),
            }
            for j in 0..n6 {
                s.keep[s.v6_at[j] as usize] = t.apply(s.verdicts[j]);
            }
        }

        let out = burst.forward(&s.keep[..n], tx);
        c.rx[rx_side as usize].add(n as u64, t.rx_bytes);
        c.tx[tx_side as usize].add(out.sent as u64, out.sent_bytes);
        c.non_ip.add(t.non_ip);
        c.bypassed.add(t.bypassed);
        c.count_drop(DropReason::Malformed, t.malformed);
        c.count_drop(DropReason::PolicyDiscard, t.policy_discard);
        c.count_drop(DropReason::DefaultDiscard, t.default_discard);
        c.count_drop(DropReason::ProtectNoSa, t.protect_no_sa);
        c.count_drop(DropReason::TxFull, out.refused as u64);
        if let (Some(c4), Some(c6)) = (&s.cache_v4, &s.cache_v6) {
            let hits =
                c4.iter().map(|x| x.hits).sum::<u64>() + c6.iter().map(|x| x.hits).sum::<u64>();
            let misses =
                c4.iter().map(|x| x.misses).sum::<u64>() + c6.iter().map(|x| x.misses).sum::<u64>();
            c.flow_cache_hits.set(hits);
            c.flow_cache_misses.set(misses);
        }
        n
    }
}

/// One burst's counts, before they go to the shared counters.
#[derive(Default)]
struct Tally {
    rx_bytes: u64,
    non_ip: u64,
    bypassed: u64,
    malformed: u64,
    policy_discard: u64,
    default_discard: u64,
    protect_no_sa: u64,
}

impl Tally {
    /// Counts a verdict and says whether the packet goes out.
    #[inline]
    fn apply(&mut self, v: Verdict) -> bool {
        match v {
            Verdict::Bypass => {
                self.bypassed += 1;
                true
            }
            Verdict::Discard { .. } => {
                self.policy_discard += 1;
                false
            }
            Verdict::DefaultDiscard => {
                self.default_discard += 1;
                false
            }
            // No ESP yet: fail closed, never send protected traffic in plaintext.
            Verdict::Protect { .. } => {
                self.protect_no_sa += 1;
                false
            }
        }
    }
}
