//! Per-worker counters.
//!
//! Each worker owns one [`WorkerCounters`] and is its only writer, so an
//! increment is a relaxed load and store (no locked read-modify-write on the
//! packet path); readers (the summary, later the control channel) load them
//! relaxed from any thread. The struct is cache-line aligned so two workers
//! never share a line.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::latency::{LatencyCounters, LatencySnapshot};

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
    /// Inbound ESP whose SPI no inbound SA has.
    NoSa,
    /// Inbound ESP replayed or older than the replay window.
    Replay,
    /// Inbound ESP whose ICV did not verify.
    Icv,
    /// The SA is expired (hard lifetime, sequence numbers used up).
    Expired,
    /// Decrypted, but outside the SA's selectors (no protect rule of that SA matches).
    PolicyMismatch,
    /// Plaintext arriving where a protect rule requires ESP.
    Unprotected,
    /// No room to add ESP headers (or a frame chained over several buffers).
    Oversize,
    /// The SA's owner worker had no room in its inbox.
    HandoffFull,
    /// An IP fragment a transport-mode SA would have to protect (transport
    /// mode protects whole datagrams; bitw does not reassemble).
    Fragment,
    /// A dummy packet (next header 59, RFC 4303 §2.6): discarded by design.
    Dummy,
    /// IKE for a punted address, but the queue to the control thread was full.
    PuntFull,
    /// IKE for a punted address while no control session was up (control side).
    PuntNoControl,
    /// A packet waiting for its SA found no room: the queue to the control
    /// thread was full (worker), or the hold store was (its oldest packet).
    HoldOverflow,
    /// A held packet waited longer than `control.hold_timeout` (control side).
    HoldTimeout,
    /// Control reported that negotiating the SA failed (control side).
    HoldFailed,
    /// A datagram control asked to inject could not be sent (control side).
    InjectFailed,
}

impl DropReason {
    pub const ALL: [DropReason; 21] = [
        DropReason::Malformed,
        DropReason::PolicyDiscard,
        DropReason::DefaultDiscard,
        DropReason::ProtectNoSa,
        DropReason::TxFull,
        DropReason::NoSa,
        DropReason::Replay,
        DropReason::Icv,
        DropReason::Expired,
        DropReason::PolicyMismatch,
        DropReason::Unprotected,
        DropReason::Oversize,
        DropReason::HandoffFull,
        DropReason::Fragment,
        DropReason::Dummy,
        DropReason::PuntFull,
        DropReason::PuntNoControl,
        DropReason::HoldOverflow,
        DropReason::HoldTimeout,
        DropReason::HoldFailed,
        DropReason::InjectFailed,
    ];

    /// The reasons counted on the control thread rather than by a worker.
    pub const CONTROL_SIDE: [DropReason; 6] = [
        DropReason::ProtectNoSa,
        DropReason::PuntNoControl,
        DropReason::HoldOverflow,
        DropReason::HoldTimeout,
        DropReason::HoldFailed,
        DropReason::InjectFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::PolicyDiscard => "policy_discard",
            DropReason::DefaultDiscard => "default_discard",
            DropReason::ProtectNoSa => "protect_no_sa",
            DropReason::TxFull => "tx_full",
            DropReason::NoSa => "no_sa",
            DropReason::Replay => "replay",
            DropReason::Icv => "icv",
            DropReason::Expired => "expired",
            DropReason::PolicyMismatch => "policy_mismatch",
            DropReason::Unprotected => "unprotected",
            DropReason::Oversize => "oversize",
            DropReason::HandoffFull => "handoff_full",
            DropReason::Fragment => "fragment",
            DropReason::Dummy => "dummy",
            DropReason::PuntFull => "punt_full",
            DropReason::PuntNoControl => "punt_no_control",
            DropReason::HoldOverflow => "hold_overflow",
            DropReason::HoldTimeout => "hold_timeout",
            DropReason::HoldFailed => "hold_failed",
            DropReason::InjectFailed => "inject_failed",
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
    pub drops: [Counter; DropReason::ALL.len()],
    /// Forwarded unchanged because they are not IP (ARP, NDP is IP, LLDP, …).
    pub non_ip: Counter,
    /// IP packets a bypass rule (or the default) let through.
    pub bypassed: Counter,
    /// Frames forwarded without parsing because their direction has no rules
    /// and bypasses by default (the box is a plain wire that way).
    pub uninspected: Counter,
    /// Packets encrypted / decrypted (and passed the inbound policy check).
    pub esp_encrypted: Counter,
    pub esp_decrypted: Counter,
    /// Packets passed to the worker that owns their SA.
    pub handed_off: Counter,
    /// SA events lost because the event queue was full.
    pub events_lost: Counter,
    /// Classifications answered by the worker's flow cache / by the tries.
    pub flow_cache_hits: Counter,
    pub flow_cache_misses: Counter,
    /// Loop iterations that found no packet / at least one.
    pub idle_polls: Counter,
    pub busy_polls: Counter,
    /// IKE frames taken out of the traffic for control.
    pub punted: Counter,
    /// Outbound packets handed to the control thread to wait for their SA.
    pub held: Counter,
    /// TSC cycles of loop iterations that moved packets / of all iterations.
    pub busy_cycles: Counter,
    pub total_cycles: Counter,
    /// Non-empty RX bursts and the frames they brought.
    pub rx_bursts: Counter,
    pub rx_burst_packets: Counter,
    /// The EAL lcore the worker runs on (set when it starts).
    pub lcore: Counter,
    /// RX-to-TX latency (`latency`), published about once a second.
    pub latency: LatencyCounters,
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
            esp_encrypted: self.esp_encrypted.get(),
            esp_decrypted: self.esp_decrypted.get(),
            handed_off: self.handed_off.get(),
            events_lost: self.events_lost.get(),
            flow_cache_hits: self.flow_cache_hits.get(),
            flow_cache_misses: self.flow_cache_misses.get(),
            idle_polls: self.idle_polls.get(),
            busy_polls: self.busy_polls.get(),
            punted: self.punted.get(),
            held: self.held.get(),
            busy_cycles: self.busy_cycles.get(),
            total_cycles: self.total_cycles.get(),
            rx_bursts: self.rx_bursts.get(),
            rx_burst_packets: self.rx_burst_packets.get(),
            lcore: self.lcore.get() as u32,
            latency: self.latency.snapshot(),
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
    pub esp_encrypted: u64,
    pub esp_decrypted: u64,
    pub handed_off: u64,
    pub events_lost: u64,
    pub flow_cache_hits: u64,
    pub flow_cache_misses: u64,
    pub idle_polls: u64,
    pub busy_polls: u64,
    pub punted: u64,
    pub held: u64,
    pub busy_cycles: u64,
    pub total_cycles: u64,
    pub rx_bursts: u64,
    pub rx_burst_packets: u64,
    pub lcore: u32,
    pub latency: LatencySnapshot,
}
