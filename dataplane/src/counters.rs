//! Per-worker counters.
//!
//! Each worker owns one [`WorkerCounters`] and is its only writer, so an
//! increment is a relaxed load and store (no locked read-modify-write on the
//! packet path); readers (the summary, later the control channel) load them
//! relaxed from any thread. The struct is cache-line aligned so two workers
//! never share a line.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A counter with a single writer.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: load + store is exact and cheaper than fetch_add.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Overwrites the value (for totals the writer keeps itself).
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a packet was dropped. Stable names: they appear in JSON and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Truncated or inconsistent Ethernet/IP/transport headers.
    Malformed,
    /// A discard rule matched.
    PolicyDiscard,
    /// No rule matched and the default action is discard.
    DefaultDiscard,
    /// A protect rule matched but no SA can protect it (never sent in plaintext).
    ProtectNoSa,
    /// The TX queue was full.
    TxFull,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::Malformed,
        DropReason::PolicyDiscard,
        DropReason::DefaultDiscard,
        DropReason::ProtectNoSa,
        DropReason::TxFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::PolicyDiscard => "policy_discard",
            DropReason::DefaultDiscard => "default_discard",
            DropReason::ProtectNoSa => "protect_no_sa",
            DropReason::TxFull => "tx_full",
        }
    }
}

/// Port index used in counter arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSide {
    Inside = 0,
    Outside = 1,
}

#[derive(Default, Debug)]
pub struct Traffic {
    pub packets: Counter,
    pub bytes: Counter,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TrafficSnapshot {
    pub packets: u64,
    pub bytes: u64,
}

impl Traffic {
    #[inline]
    pub fn add(&self, packets: u64, bytes: u64) {
        self.packets.add(packets);
        self.bytes.add(bytes);
    }

    pub fn snapshot(&self) -> TrafficSnapshot {
        TrafficSnapshot {
            packets: self.packets.get(),
            bytes: self.bytes.get(),
        }
    }
}

/// One worker's counters.
#[repr(align(64))]
#[derive(Default, Debug)]
pub struct WorkerCounters {
    /// Received, per port (index: [`PortSide`]).
    pub rx: [Traffic; 2],
    /// Transmitted, per port.
    pub tx: [Traffic; 2],
    /// Dropped, per [`DropReason`] (index: position in `DropReason::ALL`).
    pub drops: [Counter; 5],
    /// Forwarded unchanged because they are not IP (ARP, NDP is IP, LLDP, …).
    pub non_ip: Counter,
    /// IP packets a bypass rule (or the default) let through.
    pub bypassed: Counter,
    /// Frames forwarded without parsing because their direction has no rules
    /// and bypasses by default (the box is a plain wire that way).
    pub uninspected: Counter,
    /// Classifications answered by the worker's flow cache / by the tries.
    pub flow_cache_hits: Counter,
    pub flow_cache_misses: Counter,
    /// Loop iterations that found no packet / at least one.
    pub idle_polls: Counter,
    pub busy_polls: Counter,
}

impl WorkerCounters {
    #[inline]
    pub fn count_drop(&self, reason: DropReason, n: u64) {
        self.drops[reason as usize].add(n);
    }

    pub fn snapshot(&self, worker: usize) -> WorkerSnapshot {
        WorkerSnapshot {
            worker,
            rx_inside: self.rx[0].snapshot(),
            rx_outside: self.rx[1].snapshot(),
            tx_inside: self.tx[0].snapshot(),
            tx_outside: self.tx[1].snapshot(),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), self.drops[*r as usize].get()))
                .collect(),
            non_ip: self.non_ip.get(),
            bypassed: self.bypassed.get(),
            uninspected: self.uninspected.get(),
            flow_cache_hits: self.flow_cache_hits.get(),
            flow_cache_misses: self.flow_cache_misses.get(),
            idle_polls: self.idle_polls.get(),
            busy_polls: self.busy_polls.get(),
        }
    }
}

/// A consistent-enough copy of one worker's counters, for output.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub worker: usize,
    pub rx_inside: TrafficSnapshot,
    pub rx_outside: TrafficSnapshot,
    pub tx_inside: TrafficSnapshot,
    pub tx_outside: TrafficSnapshot,
    pub drops: std::collections::BTreeMap<String, u64>,
    pub non_ip: u64,
    pub bypassed: u64,
    pub uninspected: u64,
    pub flow_cache_hits: u64,
    pub flow_cache_misses: u64,
    pub idle_polls: u64,
    pub busy_polls: u64,
}
