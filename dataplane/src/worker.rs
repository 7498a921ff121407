//! The poll-mode worker: bursts from both ports, parse, classify, ESP, forward.
//!
//! Each stage handles a whole burst (VPP's vector discipline). On this path:
//! no allocation, no lock, no syscall; every input ends as forwarded or as a
//! counted drop.
//!
//! SA ownership: every SA has one owner worker, the only one that advances its
//! sequence number, replay window and lifetime counters. A packet that needs
//! an SA owned by another worker is handed to that worker through its inbox (a
//! bounded lock-free queue) and leaves through the owner's TX queue; so with
//! several workers on one SA, outbound sequence numbers stay unique and
//! increasing and replay detection stays exact.
//!
//! For the control channel (`ctl`), before classification: IKE to or from a
//! punted address is taken out of the traffic and queued for the control
//! thread; ARP and NDP are snooped for neighbours; an outbound packet whose
//! protect rule has no SA yet is queued to be held (while a control session
//! can negotiate it). Each is a bounded lock-free queue; full means a
//! counted drop, never a wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::config::MAX_BURST;
use crate::counters::{DropReason, PortSide, WorkerCounters};
use crate::ctl::{HeldItem, LearnRecord, PuntItem, PuntSet, Shared};
use crate::dpdk::{self, Burst, KeyV4, KeyV6, Mbuf, PortQueue};
use crate::esp::{self, DecapError, EncapError, EspLocation, PacketBuf, PROTO_ESP, PROTO_UDP};
use crate::filter::{Direction, FilterTable, FlowCache, Verdict, PROTO_ICMPV6};
use crate::latency::LatencyRecorder;
use crate::sa::{ReplayError, SaEvent};
use crate::sadb::{SaTable, Sadb};
use crate::snapshot::{Published, Reader};
use crate::wire::{self, parse_into, FrameKind};

/// Work handed to an SA's owner.
pub struct HandoffItem {
    pub mbuf: Mbuf,
    pub dir: Direction,
    pub l3: u16,
    pub job: Job,
}

/// What the owner must do with a handed-off packet.
#[derive(Clone, Copy)]
pub enum Job {
    /// Encapsulate with the outbound SA of this id (`sadb`: slot index and
    /// generation; a stale id finds no SA: `protect_no_sa`).
    Protect { slot: u32 },
    /// Decapsulate with the inbound SA of this id (stale: `no_sa`).
    Unprotect { slot: u32, loc: EspLocation },
    /// Send the frame as it is: out of port outside for `Direction::Out`,
    /// inside for `In` (a datagram control injects; the control thread has
    /// no TX queue of its own, so every queue keeps a single writer).
    Transmit,
}

/// The workers' inboxes.
pub struct Handoff {
    inboxes: Vec<ArrayQueue<HandoffItem>>,
}

impl Handoff {
    pub fn new(workers: usize, depth: usize) -> Handoff {
        Handoff {
            inboxes: (0..workers)
                .map(|_| ArrayQueue::new(depth.max(1)))
                .collect(),
        }
    }

    /// Queues work for `worker`; gives the item back when its inbox is full.
    pub fn push(&self, worker: usize, item: HandoffItem) -> Result<(), HandoffItem> {
        match self.inboxes.get(worker) {
            Some(q) => q.push(item),
            None => Err(item),
        }
    }
}

/// An SA event on its way to the control side (the summary and the log for now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaEventRecord {
    pub direction: Direction,
    /// The SA's id (`sadb`); if its name was unbound meanwhile, it finds no SA.
    pub slot: u32,
    pub spi: u32,
    pub event: SaEvent,
}

/// Everything one worker needs; moved onto its lcore.
pub struct Worker {
    pub id: usize,
    pub inside: PortQueue,
    pub outside: PortQueue,
    pub burst: usize,
    /// Flow-cache entries per direction and address family (0: no cache).
    pub flow_cache: usize,
    /// The filter table; control replaces it at run time. The worker checks
    /// for a new one after each RX burst (one atomic load).
    pub filter: Arc<Published<FilterTable>>,
    pub sadb: Arc<Sadb>,
    pub handoff: Arc<Handoff>,
    /// Queues to the control thread, the punt set, the session flag.
    pub ctl: Arc<Shared>,
    /// What to do with ESP whose SPI no inbound SA has: drop it, or classify it.
    pub drop_unknown_spi: bool,
    pub counters: Arc<WorkerCounters>,
    pub stop: Arc<AtomicBool>,
}

/// A worker's copies of what control publishes: refreshed every loop
/// iteration, and read after each RX burst.
struct Views {
    filter: Reader<FilterTable>,
    punt: Reader<PuntSet>,
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
    /// Each frame's verdict, and whether it has one still to act on.
    frame_verdict: [Verdict; MAX_BURST],
    pending: [bool; MAX_BURST],
    /// Offset of each frame's IP header.
    l3: [u16; MAX_BURST],
    /// Inbound: the frame was ESP, decrypted with an SA of this policy id
    /// (`Sa::policy`; u32::MAX: not ESP).
    from_policy: [u32; MAX_BURST],
    /// Flow caches per direction (index: `Direction as usize`); `None` when disabled.
    cache_v4: Option<[FlowCache<KeyV4>; 2]>,
    cache_v6: Option<[FlowCache<KeyV6>; 2]>,
    /// Handed-off packets being processed, per direction, and their verdicts.
    inbox: [Burst; 2],
    inbox_keep: [[bool; MAX_BURST]; 2],
    /// RX-to-TX latency of every burst.
    latency: LatencyRecorder,
}

const NOT_ESP: u32 = u32::MAX;

/// Inbound SA slots from which a burst's SAs are prefetched before use
/// (`prefetch_inbound_sas`): below, they stay in cache and the extra lookup
/// would only cost.
const PREFETCH_SAS_FROM: usize = 4096;

/// Sets the stop flag if the worker unwinds, so the others stop too.
struct StopOnPanic(Arc<AtomicBool>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// One burst's counts, before they go to the shared counters.
#[derive(Default)]
struct Tally {
    rx_bytes: u64,
    non_ip: u64,
    bypassed: u64,
    encrypted: u64,
    decrypted: u64,
    handed_off: u64,
    punted: u64,
    held: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Tally {
    #[inline]
    fn drop(&mut self, r: DropReason) -> bool {
        self.drops[r as usize] += 1;
        false
    }
}

fn encap_drop(e: EncapError) -> DropReason {
    match e {
        EncapError::NoRoom | EncapError::TooBig => DropReason::Oversize,
        EncapError::Fragment => DropReason::Fragment,
        EncapError::Malformed => DropReason::Malformed,
        EncapError::Expired => DropReason::Expired,
    }
}

fn decap_drop(e: DecapError) -> DropReason {
    match e {
        DecapError::Malformed | DecapError::BadTrailer => DropReason::Malformed,
        DecapError::Expired => DropReason::Expired,
        DecapError::Replay(ReplayError::Duplicate | ReplayError::TooOld) => DropReason::Replay,
        DecapError::Icv => DropReason::Icv,
        DecapError::Dummy => DropReason::Dummy,
        DecapError::WrongEncap => DropReason::NoSa,
    }
}

impl Worker {
    pub fn run(self) {
        let _guard = StopOnPanic(self.stop.clone());
        let mut burst = Burst::default();
        let n = self.flow_cache;
        let mut s = Box::new(Scratch {
            keep: [false; MAX_BURST],
            v4: [KeyV4::default(); MAX_BURST],
            v4_at: [0; MAX_BURST],
            v6: [KeyV6::default(); MAX_BURST],
            v6_at: [0; MAX_BURST],
            verdicts: [Verdict::Bypass; MAX_BURST],
            frame_verdict: [Verdict::Bypass; MAX_BURST],
            pending: [false; MAX_BURST],
            l3: [0; MAX_BURST],
            from_policy: [NOT_ESP; MAX_BURST],
            cache_v4: (n > 0).then(|| [FlowCache::new(n), FlowCache::new(n)]),
            cache_v6: (n > 0).then(|| [FlowCache::new(n), FlowCache::new(n)]),
            inbox: [Burst::default(), Burst::default()],
            inbox_keep: [[false; MAX_BURST]; 2],
            latency: LatencyRecorder::new(dpdk::tsc_hz(), dpdk::tsc()),
        });
        let c = &self.counters;
        c.lcore.set(dpdk::lcore_id() as u64);
        let mut views = Views {
            filter: self.filter.reader(),
            punt: self.ctl.punt.reader(),
        };
        let mut last = dpdk::tsc();
        // Between iterations this worker is inside no burst: a port whose
        // peer went away may be let go of then (dpdk.rs, "Peers that go away").
        let quiescence = dpdk::Quiescence::online(self.id);
        while !self.stop.load(Ordering::Relaxed) {
            quiescence.quiescent();
            // Lets go of replaced tables even while no frame arrives: control
            // frees them, and the SA slots they name, only after that.
            views.filter.get(&self.filter);
            views.punt.get(&self.ctl.punt);
            let n = self.step(Direction::Out, &mut views, &mut burst, &mut s)
                + self.step(Direction::In, &mut views, &mut burst, &mut s)
                + self.drain_inbox(&mut views, &mut s);
            // One TSC read per iteration: it ends this one and starts the next.
            let now = dpdk::tsc();
            let spent = now.wrapping_sub(last);
            last = now;
            c.total_cycles.add(spent);
            if n == 0 {
                c.idle_polls.add(1);
            } else {
                c.busy_polls.add(1);
                c.busy_cycles.add(spent);
            }
            s.latency.maybe_publish(now, &c.latency);
        }
        s.latency.publish(&c.latency);
    }

    fn queues(&self, dir: Direction) -> (PortQueue, PortQueue, PortSide, PortSide) {
        match dir {
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
        }
    }

    fn report(&self, dir: Direction, slot: u32, spi: u32, event: SaEvent) {
        // A full queue loses the record, not the packet; the summary counts it.
        if self
            .ctl
            .events
            .push(SaEventRecord {
                direction: dir,
                slot,
                spi,
                event,
            })
            .is_err()
        {
            self.counters.events_lost.add(1);
        }
    }

    /// One burst in one direction; returns how many frames it received.
    #[inline]
    fn step(&self, dir: Direction, views: &mut Views, burst: &mut Burst, s: &mut Scratch) -> usize {
        let (rx, tx, rx_side, tx_side) = self.queues(dir);
        let n = burst.rx(rx, self.burst);
        if n == 0 {
            return 0;
        }
        // The tables are read after the frames: a frame that arrives after
        // control was told "applied" meets what was applied.
        let filter = views.filter.get(&self.filter);
        let punt = views.punt.get(&self.ctl.punt);
        // IKE is looked for only while the punt set has addresses.
        let punt = (!punt.is_empty()).then_some(punt);
        let rx_at = dpdk::tsc();
        let c = &self.counters;
        c.rx_bursts.add(1);
        c.rx_burst_packets.add(n as u64);
        if filter.is_wire(dir)
            && (dir == Direction::Out || !self.sadb.has_inbound())
            && punt.is_none()
            && !self.ctl.session_up()
        {
            // No rule in this direction and default bypass (and, inbound, no SA
            // that ESP could be for; no IKE to punt; no control session that
            // wants neighbours learnt): a plain wire.
            let (out, rx_bytes) = burst.forward_all(tx);
            s.latency
                .record(dpdk::tsc().wrapping_sub(rx_at), out.sent as u64);
            c.rx[rx_side as usize].add(n as u64, rx_bytes);
            c.tx[tx_side as usize].add(out.sent as u64, out.sent_bytes);
            c.uninspected.add(n as u64);
            c.count_drop(DropReason::TxFull, out.refused as u64);
            return n;
        }
        let table = self.sadb.load();
        let mut t = Tally::default();
        let (mut n4, mut n6) = (0usize, 0usize);
        // Headers of the whole burst are fetched while the first are parsed.
        for i in 0..n {
            burst.prefetch_frame(i);
        }
        if dir == Direction::In && table.inbound.len() >= PREFETCH_SAS_FROM {
            self.prefetch_inbound_sas(&table, burst, n);
        }
        for i in 0..n {
            let len = burst.pkt_len(i);
            t.rx_bytes += len as u64;
            s.keep[i] = false;
            s.pending[i] = false;
            s.from_policy[i] = NOT_ESP;
            // Parse straight into the next free batch slot of each family.
            let kind = parse_into(burst.frame(i), len as usize, &mut s.v4[n4], &mut s.v6[n6]);
            let (l3, fragment, v4) = match kind {
                FrameKind::NonIp => {
                    s.keep[i] = true;
                    t.non_ip += 1;
                    continue;
                }
                FrameKind::Arp { l3 } => {
                    s.keep[i] = true;
                    t.non_ip += 1;
                    if let Some((ip, mac)) = wire::arp_sender(burst.frame(i), l3 as usize) {
                        self.learn(rx_side, ip.into(), mac);
                    }
                    continue;
                }
                FrameKind::Malformed(_) => {
                    t.drop(DropReason::Malformed);
                    continue;
                }
                FrameKind::V4 { fragment, l3 } => (l3, fragment, true),
                FrameKind::V6 { fragment, l3 } => (l3, fragment, false),
            };
            let (proto, sport, dport) = if v4 {
                let k = &s.v4[n4];
                (k.proto, k.sport, k.dport)
            } else {
                let k = &s.v6[n6];
                (k.proto, k.sport, k.dport)
            };
            if let Some(punt) = punt {
                if proto == PROTO_UDP
                    && !fragment
                    && self.punt_if_ike(
                        punt, burst, i, l3, v4, &s.v4[n4], &s.v6[n6], rx_side, &mut t,
                    )
                {
                    continue;
                }
            }
            // NDP: ICMPv6 neighbour solicitation / advertisement (type in sport).
            if !v4 && proto == PROTO_ICMPV6 && matches!(sport[1], wire::ICMPV6_NS | wire::ICMPV6_NA)
            {
                if let Some((ip, mac)) = wire::ndp_neighbor(burst.frame(i), l3 as usize) {
                    self.learn(rx_side, ip.into(), mac);
                }
            }
            if dir == Direction::In && !fragment {
                let dport = u16::from_be_bytes(dport);
                if proto == PROTO_ESP || (proto == PROTO_UDP && table.udp_ports.contains(&dport)) {
                    match self.inbound_esp(&table, burst, i, l3, &mut t) {
                        // Not ESP after all (IKE or a keepalive on the NAT-T port): classify it.
                        EspOutcome::NotEsp => {}
                        EspOutcome::Done => continue,
                        // Decrypted in place: classify the inner packet (the policy check).
                        EspOutcome::Decrypted { policy } => {
                            s.from_policy[i] = policy;
                            let len = burst.pkt_len(i) as usize;
                            match parse_into(burst.frame(i), len, &mut s.v4[n4], &mut s.v6[n6]) {
                                FrameKind::V4 { fragment, l3 } => self
                                    .queue(filter, dir, s, i, true, fragment, l3, &mut n4, &mut n6),
                                FrameKind::V6 { fragment, l3 } => self.queue(
                                    filter, dir, s, i, false, fragment, l3, &mut n4, &mut n6,
                                ),
                                // Garbage inside cannot be checked against the SA's selectors.
                                _ => {
                                    t.drop(DropReason::PolicyMismatch);
                                }
                            }
                            continue;
                        }
                    }
                }
            }
            self.queue(filter, dir, s, i, v4, fragment, l3, &mut n4, &mut n6);
        }
        if n4 > 0 {
            match &mut s.cache_v4 {
                Some(c) => filter.classify_v4_cached(
                    dir,
                    &mut c[dir as usize],
                    &s.v4[..n4],
                    &mut s.verdicts[..n4],
                ),
                None => filter.classify_v4(dir, false, &s.v4[..n4], &mut s.verdicts[..n4]),
            }
            for j in 0..n4 {
                s.frame_verdict[s.v4_at[j] as usize] = s.verdicts[j];
            }
        }
        if n6 > 0 {
            match &mut s.cache_v6 {
                Some(c) => filter.classify_v6_cached(
                    dir,
                    &mut c[dir as usize],
                    &s.v6[..n6],
                    &mut s.verdicts[..n6],
                ),
                None => filter.classify_v6(dir, false, &s.v6[..n6], &mut s.verdicts[..n6]),
            }
            for j in 0..n6 {
                s.frame_verdict[s.v6_at[j] as usize] = s.verdicts[j];
            }
        }
        // Act on the verdicts in arrival order, so that sequence numbers (and
        // hand-offs) follow the order the frames leave in.
        for i in 0..n {
            if s.pending[i] {
                s.keep[i] = self.apply(
                    dir,
                    s.frame_verdict[i],
                    &table,
                    burst,
                    i,
                    s.l3[i],
                    s.from_policy[i],
                    &mut t,
                );
            }
        }

        let out = burst.forward(&s.keep[..n], tx);
        s.latency
            .record(dpdk::tsc().wrapping_sub(rx_at), out.sent as u64);
        c.rx[rx_side as usize].add(n as u64, t.rx_bytes);
        self.publish(&t, tx_side, out);
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

    /// Queues frame `i`, whose key was parsed into slot n4 (IPv4) or n6 (IPv6),
    /// for a verdict: whole packets join the burst's batch; non-initial
    /// fragments (rare) are classified now in the port-agnostic fragment tries,
    /// their slot left for the next frame.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn queue(
        &self,
        filter: &FilterTable,
        dir: Direction,
        s: &mut Scratch,
        i: usize,
        v4: bool,
        fragment: bool,
        l3: u16,
        n4: &mut usize,
        n6: &mut usize,
    ) {
        s.l3[i] = l3;
        s.pending[i] = true;
        if fragment {
            let mut v = [Verdict::DefaultDiscard];
            if v4 {
                filter.classify_v4(dir, true, std::slice::from_ref(&s.v4[*n4]), &mut v);
            } else {
                filter.classify_v6(dir, true, std::slice::from_ref(&s.v6[*n6]), &mut v);
            }
            s.frame_verdict[i] = v[0];
        } else if v4 {
            s.v4_at[*n4] = i as u16;
            *n4 += 1;
        } else {
            s.v6_at[*n6] = i as u16;
            *n6 += 1;
        }
    }

    fn publish(&self, t: &Tally, tx_side: PortSide, out: crate::dpdk::TxOutcome) {
        let c = &self.counters;
        c.tx[tx_side as usize].add(out.sent as u64, out.sent_bytes);
        c.non_ip.add(t.non_ip);
        c.bypassed.add(t.bypassed);
        c.esp_encrypted.add(t.encrypted);
        c.esp_decrypted.add(t.decrypted);
        c.handed_off.add(t.handed_off);
        c.punted.add(t.punted);
        c.held.add(t.held);
        for r in DropReason::ALL {
            c.count_drop(r, t.drops[r as usize]);
        }
        c.count_drop(DropReason::TxFull, out.refused as u64);
    }

    /// Acts on a verdict; says whether the frame goes out (now).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn apply(
        &self,
        dir: Direction,
        v: Verdict,
        table: &SaTable,
        burst: &mut Burst,
        i: usize,
        l3: u16,
        from_policy: u32,
        t: &mut Tally,
    ) -> bool {
        if from_policy != NOT_ESP {
            // Decrypted: it must fall inside its SA's selectors, i.e. hit a protect
            // rule naming this SA's policy name (RFC 4301 §5.2, step 4). Inbound
            // protect verdicts carry policy ids, as the SA does.
            return match v {
                Verdict::Protect { sa, .. } if sa == from_policy => {
                    t.decrypted += 1;
                    true
                }
                _ => t.drop(DropReason::PolicyMismatch),
            };
        }
        match (v, dir) {
            (Verdict::Bypass, _) => {
                t.bypassed += 1;
                true
            }
            (Verdict::Discard { .. }, _) => t.drop(DropReason::PolicyDiscard),
            (Verdict::DefaultDiscard, _) => t.drop(DropReason::DefaultDiscard),
            // Plaintext where the policy requires ESP (RFC 4301 §5.2).
            (Verdict::Protect { .. }, Direction::In) => t.drop(DropReason::Unprotected),
            (Verdict::Protect { sa: slot, .. }, Direction::Out) => {
                let Some(sa) = table.outbound(slot) else {
                    // No SA (yet): hold it for control to negotiate one, or
                    // drop it. Never send it in plaintext.
                    if self.ctl.holding() {
                        let item = HeldItem {
                            mbuf: burst.take(i),
                            slot,
                            l3,
                        };
                        return match self.ctl.holds.push(item) {
                            Ok(()) => {
                                t.held += 1;
                                false
                            }
                            // The mbuf is freed with the item.
                            Err(_) => t.drop(DropReason::HoldOverflow),
                        };
                    }
                    return t.drop(DropReason::ProtectNoSa);
                };
                if sa.owner != self.id {
                    let item = HandoffItem {
                        mbuf: burst.take(i),
                        dir,
                        l3,
                        job: Job::Protect { slot },
                    };
                    return self.hand_off(sa.owner, item, t);
                }
                let Some(mut buf) = burst.packet_buf(i) else {
                    return t.drop(DropReason::Oversize);
                };
                let spi = sa.params.spi;
                match esp::encapsulate(sa, &mut buf, l3 as usize, &mut |e| {
                    self.report(dir, slot, spi, e)
                }) {
                    Ok(()) => {
                        t.encrypted += 1;
                        true
                    }
                    Err(e) => t.drop(encap_drop(e)),
                }
            }
        }
    }

    /// Takes frame `i` out of the traffic for control if it is IKE to or from
    /// a punted address (its key is `k4`/`k6`); says whether it did.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn punt_if_ike(
        &self,
        punt: &PuntSet,
        burst: &mut Burst,
        i: usize,
        l3: u16,
        v4: bool,
        k4: &KeyV4,
        k6: &KeyV6,
        port: PortSide,
        t: &mut Tally,
    ) -> bool {
        let (sport, dport) = if v4 {
            (k4.sport, k4.dport)
        } else {
            (k6.sport, k6.dport)
        };
        let (sport, dport) = (u16::from_be_bytes(sport), u16::from_be_bytes(dport));
        // Cheapest test first: most UDP is on neither IKE port.
        if !matches!(sport, wire::IKE_PORT | wire::NAT_T_PORT)
            && !matches!(dport, wire::IKE_PORT | wire::NAT_T_PORT)
        {
            return false;
        }
        let ours = if v4 {
            punt.contains_v4(&k4.src) || punt.contains_v4(&k4.dst)
        } else {
            punt.contains_v6(&k6.src) || punt.contains_v6(&k6.dst)
        };
        if !ours || !wire::is_ike(burst.frame(i), l3 as usize, sport, dport) {
            return false;
        }
        let item = PuntItem {
            mbuf: burst.take(i),
            port,
        };
        match self.ctl.punts.push(item) {
            Ok(()) => t.punted += 1,
            Err(_) => {
                t.drop(DropReason::PuntFull);
            }
        }
        true
    }

    /// Queues what a frame taught about a neighbour (a full queue loses it, counted).
    #[inline]
    fn learn(&self, port: PortSide, ip: std::net::IpAddr, mac: [u8; 6]) {
        if self
            .ctl
            .learned
            .push(LearnRecord { port, ip, mac })
            .is_err()
        {
            self.counters.events_lost.add(1);
        }
    }

    fn hand_off(&self, owner: usize, item: HandoffItem, t: &mut Tally) -> bool {
        match self.handoff.inboxes[owner].push(item) {
            Ok(()) => t.handed_off += 1,
            // The owner is behind: drop (the mbuf is freed with the item).
            Err(_) => {
                t.drop(DropReason::HandoffFull);
            }
        }
        false
    }

    /// Handles an inbound ESP candidate at frame `i`.
    fn inbound_esp(
        &self,
        table: &SaTable,
        burst: &mut Burst,
        i: usize,
        l3: u16,
        t: &mut Tally,
    ) -> EspOutcome {
        let Some(loc) = esp::locate_esp(burst.frame(i), l3 as usize, &table.udp_ports) else {
            return EspOutcome::NotEsp;
        };
        let Some((slot, sa)) = table.inbound_by_spi(loc.spi) else {
            if self.drop_unknown_spi {
                t.drop(DropReason::NoSa);
                return EspOutcome::Done;
            }
            return EspOutcome::NotEsp;
        };
        if sa.owner != self.id {
            let item = HandoffItem {
                mbuf: burst.take(i),
                dir: Direction::In,
                l3,
                job: Job::Unprotect { slot, loc },
            };
            self.hand_off(sa.owner, item, t);
            return EspOutcome::Done;
        }
        let Some(mut buf) = burst.packet_buf(i) else {
            t.drop(DropReason::Oversize);
            return EspOutcome::Done;
        };
        match esp::decapsulate(sa, &mut buf, &loc) {
            Ok(d) => {
                if let Some(e) = d.event {
                    self.report(Direction::In, slot, loc.spi, e);
                }
                EspOutcome::Decrypted { policy: sa.policy }
            }
            Err(e) => {
                t.drop(decap_drop(e));
                EspOutcome::Done
            }
        }
    }

    /// With many inbound SAs, each packet's SA (hash bucket, slot, SA, key)
    /// is most likely in no cache: looking up the whole burst's SAs first and
    /// prefetching them lets those misses overlap instead of stalling one
    /// packet after another (VPP's dual-loop idea). Only untagged Ethernet is
    /// looked at here; the main loop finds every SA again, now from cache.
    fn prefetch_inbound_sas(&self, table: &SaTable, burst: &Burst, n: usize) {
        for i in 0..n {
            let frame = burst.frame(i);
            if !matches!(frame.get(12..14), Some([0x08, 0x00] | [0x86, 0xdd])) {
                continue;
            }
            if let Some(loc) = esp::locate_esp(frame, 14, &table.udp_ports) {
                if let Some((_, sa)) = table.inbound_by_spi(loc.spi) {
                    sa.prefetch();
                }
            }
        }
    }

    /// Processes packets other workers handed to this one (it owns their SAs).
    fn drain_inbox(&self, views: &mut Views, s: &mut Scratch) -> usize {
        let inbox = &self.handoff.inboxes[self.id];
        if inbox.is_empty() {
            return 0;
        }
        let filter = views.filter.get(&self.filter);
        let table = self.sadb.load();
        let mut t = Tally::default();
        let mut n = 0;
        while n < self.burst {
            let Some(item) = inbox.pop() else { break };
            n += 1;
            let d = item.dir as usize;
            let b = &mut s.inbox[d];
            let idx = b.len();
            if let Err(m) = b.push(item.mbuf) {
                drop(m);
                t.drop(DropReason::HandoffFull);
                continue;
            }
            s.inbox_keep[d][idx] = match item.job {
                Job::Protect { slot } => self.protect_handed(&table, b, idx, slot, item.l3, &mut t),
                Job::Unprotect { slot, loc } => {
                    self.unprotect_handed(&table, filter, b, idx, slot, &loc, &mut t)
                }
                Job::Transmit => true,
            };
        }
        for dir in [Direction::Out, Direction::In] {
            let d = dir as usize;
            if s.inbox[d].is_empty() {
                continue;
            }
            let (_, tx, _, tx_side) = self.queues(dir);
            let out = s.inbox[d].forward(&s.inbox_keep[d], tx);
            self.publish(&t, tx_side, out);
            t = Tally::default();
        }
        n
    }

    /// Encrypts a handed-off outbound packet.
    fn protect_handed(
        &self,
        table: &SaTable,
        b: &mut Burst,
        idx: usize,
        slot: u32,
        l3: u16,
        t: &mut Tally,
    ) -> bool {
        let Some(sa) = table.outbound(slot) else {
            return t.drop(DropReason::ProtectNoSa);
        };
        let Some(mut buf) = b.packet_buf(idx) else {
            return t.drop(DropReason::Oversize);
        };
        let spi = sa.params.spi;
        match esp::encapsulate(sa, &mut buf, l3 as usize, &mut |e| {
            self.report(Direction::Out, slot, spi, e)
        }) {
            Ok(()) => {
                t.encrypted += 1;
                true
            }
            Err(e) => t.drop(encap_drop(e)),
        }
    }

    /// Decrypts a handed-off inbound packet and checks it against its SA's selectors.
    #[allow(clippy::too_many_arguments)]
    fn unprotect_handed(
        &self,
        table: &SaTable,
        filter: &FilterTable,
        b: &mut Burst,
        idx: usize,
        slot: u32,
        loc: &EspLocation,
        t: &mut Tally,
    ) -> bool {
        let Some(sa) = table.inbound(slot) else {
            return t.drop(DropReason::NoSa);
        };
        let Some(mut buf) = b.packet_buf(idx) else {
            return t.drop(DropReason::Oversize);
        };
        match esp::decapsulate(sa, &mut buf, loc) {
            Err(e) => t.drop(decap_drop(e)),
            Ok(d) => {
                if let Some(e) = d.event {
                    self.report(Direction::In, slot, loc.spi, e);
                }
                let len = buf.data().len();
                let (mut k4, mut k6) = (KeyV4::default(), KeyV6::default());
                let mut v = [Verdict::DefaultDiscard];
                match parse_into(buf.data(), len, &mut k4, &mut k6) {
                    FrameKind::V4 { fragment, .. } => {
                        filter.classify_v4(Direction::In, fragment, &[k4], &mut v)
                    }
                    FrameKind::V6 { fragment, .. } => {
                        filter.classify_v6(Direction::In, fragment, &[k6], &mut v)
                    }
                    _ => return t.drop(DropReason::PolicyMismatch),
                }
                match v[0] {
                    Verdict::Protect { sa: policy, .. } if policy == sa.policy => {
                        t.decrypted += 1;
                        true
                    }
                    _ => t.drop(DropReason::PolicyMismatch),
                }
            }
        }
    }
}

enum EspOutcome {
    NotEsp,
    /// Dropped or handed off.
    Done,
    /// Decrypted in place with an SA of this policy id.
    Decrypted {
        policy: u32,
    },
}
