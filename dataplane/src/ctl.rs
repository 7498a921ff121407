//! The dataplane end of the control channel.
//!
//! One ordinary thread (not an EAL lcore; it never polls a port) serves one
//! control session at a time over [`bitw_common::channel`] and is the only
//! writer of the SA database, the filter table and the punt set after
//! startup. It talks to the workers through bounded lock-free queues only
//! ([`Shared`]): workers push punted IKE, packets to hold, neighbours they
//! saw and SA events; the control thread pushes work (released held packets,
//! injected frames) into the workers' hand-off inboxes, so every TX queue
//! and every SA's state keeps a single writer.
//!
//! The protocol is in [`bitw_common::proto`]; what this end does:
//! - a second connection while a session is up (or being opened) gets
//!   `HelloReply::Refused` naming the reason and is closed;
//! - a session silent for [`SILENCE_LIMIT`] is dropped (control pings every
//!   couple of seconds); when a session ends for any reason the dataplane
//!   logs one line and forwards on with the tables it has;
//! - `Apply` checks the whole batch before changing anything, then publishes
//!   without stopping traffic: SAs installed/replaced, filter table swapped,
//!   SAs removed, punt set replaced; then held packets whose SA is now there
//!   go to the SA's owner worker in arrival order;
//! - requests are answered in order; events go out as they happen.

mod hold;
mod neighbors;
mod plan;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;

use bitw_common::channel::{ChannelError, Conn, Listener};
use bitw_common::config::{Config, DefaultAction};
use bitw_common::proto::{
    self, Acquire, Applied, Batch, DataplaneState, DefaultActionName, Event, ExpireReason,
    FromDataplane, Hello, HelloReply, Mac, Origin, PolicySpec, PortName, PortStats, Punt, Reply,
    Request, RuleSpec, SaInfo, SaSlots, SaSpec, SaStats, Stats, ToDataplane, TrafficCount,
    WorkerStats,
};

use crate::counters::{DropReason, PortSide, WorkerCounters};
use crate::dpdk::{self, Mbuf, Mempool};
use crate::filter::{Direction, FilterTable, FlowKey, Verdict};
use crate::sa::{SaEvent, SaParams};
use crate::sadb::{FastMap, SaChange, SaTable, Sadb};
use crate::snapshot::Published;
use crate::wire::{self, FrameKind};
use crate::worker::{Handoff, HandoffItem, Job, SaEventRecord};

pub use hold::{Held, HoldStore};
pub use neighbors::{BoundedMap, Neighbors, NEIGHBOR_CAP};
pub use plan::{check_datagram, plan_batch, Plan, SaMeta, INJECT_MAX};

/// A session that sends nothing for this long is dropped.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(15);
/// A connection must say hello within this time.
const HELLO_LIMIT: Duration = Duration::from_secs(5);
/// Queue depths between the workers and the control thread.
pub const PUNT_QUEUE: usize = 1024;
pub const HOLD_QUEUE: usize = 1024;
pub const LEARN_QUEUE: usize = 1024;
pub const EVENT_QUEUE: usize = 4096;
/// Connections being refused at once (each on a short-lived thread).
const MAX_REFUSING: usize = 4;
/// How long releasing a held packet waits for room in its owner's inbox.
const RELEASE_WAIT: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------
// What the workers share with the control thread.

/// Addresses whose IKE is punted to control, sorted for binary search.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PuntSet {
    v4: Vec<[u8; 4]>,
    v6: Vec<[u8; 16]>,
}

impl PuntSet {
    pub fn new(addrs: &[IpAddr]) -> PuntSet {
        let mut s = PuntSet::default();
        for a in addrs {
            match a {
                IpAddr::V4(a) => s.v4.push(a.octets()),
                IpAddr::V6(a) => s.v6.push(a.octets()),
            }
        }
        s.v4.sort_unstable();
        s.v4.dedup();
        s.v6.sort_unstable();
        s.v6.dedup();
        s
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    #[inline]
    pub fn contains_v4(&self, a: &[u8; 4]) -> bool {
        self.v4.binary_search(a).is_ok()
    }

    #[inline]
    pub fn contains_v6(&self, a: &[u8; 16]) -> bool {
        self.v6.binary_search(a).is_ok()
    }

    pub fn addrs(&self) -> Vec<IpAddr> {
        self.v4
            .iter()
            .map(|a| IpAddr::from(*a))
            .chain(self.v6.iter().map(|a| IpAddr::from(*a)))
            .collect()
    }
}

/// An IKE frame a worker took out of the traffic.
pub struct PuntItem {
    pub mbuf: Mbuf,
    pub port: PortSide,
}

/// An outbound packet whose SA (id `slot`, see `sadb`) is not installed.
pub struct HeldItem {
    pub mbuf: Mbuf,
    pub slot: u32,
    pub l3: u16,
}

/// A neighbour a worker saw in ARP or NDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnRecord {
    pub port: PortSide,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// The workers' side of the control channel: queues to the control thread
/// and what it publishes for them. Workers only push and load.
pub struct Shared {
    /// IKE of these addresses is punted (looked for only while not empty).
    pub punt: Published<PuntSet>,
    session_up: AtomicBool,
    /// `control.hold_packets > 0`.
    hold: bool,
    pub punts: ArrayQueue<PuntItem>,
    pub holds: ArrayQueue<HeldItem>,
    pub learned: ArrayQueue<LearnRecord>,
    pub events: ArrayQueue<SaEventRecord>,
}

impl Shared {
    pub fn new(hold_packets: usize) -> Shared {
        Shared {
            punt: Published::new(PuntSet::default()),
            session_up: AtomicBool::new(false),
            hold: hold_packets > 0,
            punts: ArrayQueue::new(PUNT_QUEUE),
            holds: ArrayQueue::new(HOLD_QUEUE),
            learned: ArrayQueue::new(LEARN_QUEUE),
            events: ArrayQueue::new(EVENT_QUEUE),
        }
    }

    /// Whether a control session is up (it wants neighbours, acquires).
    #[inline]
    pub fn session_up(&self) -> bool {
        self.session_up.load(Ordering::Acquire)
    }

    /// Whether packets without their SA are held: only while a session can
    /// negotiate the SA; otherwise they are dropped (`protect_no_sa`).
    #[inline]
    pub fn holding(&self) -> bool {
        self.hold && self.session_up()
    }

    /// Replaces the punt set; returns the old one (to be freed by the caller).
    fn set_punt(&self, set: PuntSet) -> Arc<PuntSet> {
        self.punt.publish(Arc::new(set))
    }
}

// ---------------------------------------------------------------------------
// Counters of the control side (one writer: the control thread).

/// What the control thread counted; read for `GetStats` and the exit summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ControlTotals {
    /// Drops on the control side, by reason (the control-side reasons always present).
    pub drops: BTreeMap<String, u64>,
    pub sessions: u64,
    pub acquires: u64,
    pub punted: u64,
    pub injected: u64,
    pub inject_failed: u64,
    pub released: u64,
    pub learned: u64,
    pub soft_lifetime: u64,
    pub hard_lifetime: u64,
    pub sequence_exhausted: u64,
    /// Packets still held when the dataplane stopped (freed, not sent).
    pub held_at_exit: u64,
}

impl ControlTotals {
    fn new() -> ControlTotals {
        ControlTotals {
            drops: DropReason::CONTROL_SIDE
                .iter()
                .map(|r| (r.as_str().to_string(), 0))
                .collect(),
            ..Default::default()
        }
    }

    fn count_drop(&mut self, r: DropReason, n: u64) {
        *self.drops.entry(r.as_str().to_string()).or_default() += n;
    }
}

// ---------------------------------------------------------------------------
// The control thread.

/// Everything the control thread needs from the process.
pub struct CtlSetup<'a> {
    pub config: &'a Config,
    pub listener: Listener,
    pub pool: &'a Mempool,
    pub sadb: Arc<Sadb>,
    pub filter: Arc<Published<FilterTable>>,
    pub handoff: Arc<Handoff>,
    pub shared: Arc<Shared>,
    pub counters: Vec<Arc<WorkerCounters>>,
    /// (name, device, DPDK port id) of inside and outside.
    pub ports: [(String, String, u16); 2],
    pub stop: Arc<AtomicBool>,
    /// Set once every worker has returned: nothing more will be queued.
    pub workers_done: Arc<AtomicBool>,
    pub started: Instant,
}

enum Phase {
    AwaitHello,
    Ready,
}

struct Session {
    conn: Conn,
    phase: Phase,
    opened: Instant,
    last_rx: Instant,
}

pub struct Ctl<'a> {
    listener: Option<Listener>,
    pool: &'a Mempool,
    sadb: Arc<Sadb>,
    filter: Arc<Published<FilterTable>>,
    handoff: Arc<Handoff>,
    shared: Arc<Shared>,
    counters: Vec<Arc<WorkerCounters>>,
    ports: [(String, String, u16); 2],
    stop: Arc<AtomicBool>,
    workers_done: Arc<AtomicBool>,
    started: Instant,
    instance: String,
    software: String,
    burst: usize,
    meta: FastMap<(String, Direction), SaMeta>,
    policy: PolicySpec,
    punt_addrs: Vec<IpAddr>,
    neighbors: Neighbors,
    hold: HoldStore<Mbuf>,
    session: Option<Session>,
    refusing: Arc<AtomicUsize>,
    /// Replaced filter tables and punt sets, freed here once no worker holds them.
    retired: Vec<Arc<FilterTable>>,
    retired_punt: Vec<Arc<PuntSet>>,
    totals: ControlTotals,
    /// The SA names the current filter table's protect rules give (out, in),
    /// and the table generation they are from.
    rule_names: ([HashSet<String>; 2], Option<u32>),
    /// Held packets dropped this round, for one HoldDropped event per (SA, reason).
    hold_dropped: BTreeMap<(String, &'static str), u64>,
}

fn port_name(p: PortSide) -> PortName {
    match p {
        PortSide::Inside => PortName::Inside,
        PortSide::Outside => PortName::Outside,
    }
}

fn traffic(t: crate::counters::TrafficSnapshot) -> TrafficCount {
    TrafficCount {
        packets: t.packets,
        bytes: t.bytes,
    }
}

/// The instance name: pid and start time, new with every start.
pub fn instance_name() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}@{}.{:09}",
        std::process::id(),
        t.as_secs(),
        t.subsec_nanos()
    )
}

/// The policy of the configuration file, as control sees it.
pub fn config_policy(cfg: &Config) -> PolicySpec {
    PolicySpec {
        rules: cfg
            .policies
            .iter()
            .map(|r| RuleSpec::from_rule(r, Origin::Config))
            .collect(),
        default_action: match cfg.dataplane.default_action {
            DefaultAction::Bypass => DefaultActionName::Bypass,
            DefaultAction::Discard => DefaultActionName::Discard,
        },
    }
}

/// The installed SAs as planning asks about them: by name through the SA
/// database's name bindings, by SPI through the snapshot's indexes.
struct Live<'a> {
    sadb: &'a Sadb,
    table: &'a SaTable,
}

impl crate::ctl::plan::Installed for Live<'_> {
    fn params(&self, name: &str, direction: Direction) -> Option<SaParams> {
        let id = self.sadb.find_slot(name, direction)?;
        self.table
            .get(direction, id)
            .filter(|sa| sa.params.name == name)
            .map(|sa| sa.params.clone())
    }
    fn spi_owner(&self, direction: Direction, spi: u32) -> Option<String> {
        self.table
            .by_spi(direction, spi)
            .map(|sa| sa.params.name.clone())
    }
}

fn log(msg: std::fmt::Arguments) {
    eprintln!("bitw-dataplane: {msg}");
}

impl<'a> Ctl<'a> {
    pub fn new(s: CtlSetup<'a>) -> Ctl<'a> {
        let c = &s.config.control;
        let meta = s
            .config
            .sas
            .iter()
            .map(|p| {
                (
                    (p.name.clone(), p.direction),
                    SaMeta {
                        origin: Origin::Config,
                        fingerprint: proto::params_fingerprint(p),
                    },
                )
            })
            .collect();
        Ctl {
            listener: Some(s.listener),
            pool: s.pool,
            sadb: s.sadb,
            filter: s.filter,
            handoff: s.handoff,
            shared: s.shared,
            counters: s.counters,
            ports: s.ports,
            stop: s.stop,
            workers_done: s.workers_done,
            started: s.started,
            instance: instance_name(),
            software: format!("bitw-dataplane {}", env!("CARGO_PKG_VERSION")),
            burst: s.config.dataplane.burst,
            meta,
            policy: config_policy(s.config),
            punt_addrs: Vec::new(),
            neighbors: Neighbors::new(NEIGHBOR_CAP),
            hold: HoldStore::new(c.hold_packets, c.hold_timeout, c.acquire_interval),
            session: None,
            refusing: Arc::new(AtomicUsize::new(0)),
            retired: Vec::new(),
            retired_punt: Vec::new(),
            totals: ControlTotals::new(),
            rule_names: Default::default(),
            hold_dropped: BTreeMap::new(),
        }
    }

    /// Serves until the stop flag is set; then frees what it holds and
    /// removes the socket. Returns its totals.
    pub fn run(mut self) -> ControlTotals {
        let mut last_reclaim = Instant::now();
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            let now = Instant::now();
            let busy = self.drain_queues(now);
            self.expire_held(now);
            self.flush_hold_dropped();
            if stopping {
                break;
            }
            self.accept();
            self.serve(busy);
            if last_reclaim.elapsed() >= Duration::from_millis(100) {
                self.reclaim();
                last_reclaim = Instant::now();
            }
        }
        // What the workers queue until they return (SA events above all) is
        // still logged and counted; then what is held is freed, not sent.
        while !self.workers_done.load(Ordering::Acquire) {
            self.drain_queues(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
        self.drain_queues(Instant::now());
        let left = self.hold.drain().len() as u64;
        self.totals.held_at_exit = left;
        if let Some(s) = self.session.take() {
            log(format_args!(
                "control session {} closed: the dataplane is stopping",
                s.conn.peer()
            ));
        }
        self.shared.session_up.store(false, Ordering::Relaxed);
        self.listener.take(); // removes the socket file
        self.retired.clear();
        self.retired_punt.clear();
        self.sadb.reclaim();
        self.totals.clone()
    }

    /// Frees the retired tables no worker holds any more (filter tables
    /// first: freed SA slots wait for both), and so frees the SA slots whose
    /// quarantine is over.
    fn reclaim(&mut self) {
        self.retired.retain(|t| Arc::strong_count(t) > 1);
        self.retired_punt.retain(|t| Arc::strong_count(t) > 1);
        self.sadb.reclaim();
    }

    // ---- sessions ----

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        // A few per round, so a burst of connection attempts cannot stall us.
        for _ in 0..4 {
            let conn = match listener.accept() {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(e) => {
                    log(format_args!("control channel: accept failed: {e}"));
                    return;
                }
            };
            if let Some(s) = &self.session {
                let reason = format!(
                    "another control session is active (from {}, for {} s); one at a time",
                    s.conn.peer(),
                    s.opened.elapsed().as_secs()
                );
                self.refuse(conn, reason);
                continue;
            }
            let now = Instant::now();
            self.session = Some(Session {
                conn,
                phase: Phase::AwaitHello,
                opened: now,
                last_rx: now,
            });
        }
    }

    /// Answers a connection's hello with `Refused` on a short-lived thread.
    fn refuse(&self, mut conn: Conn, reason: String) {
        if self.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
            return; // dropped: closes the connection
        }
        let refusing = self.refusing.clone();
        let spawned = std::thread::Builder::new()
            .name("bitw-ctl-refuse".into())
            .spawn(move || {
                // Read the hello first, so the reply is not lost to a reset.
                let _ = conn.recv_within::<serde_json::Value>(Duration::from_secs(2));
                let _ = conn.send(&HelloReply::Refused { reason });
                refusing.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn end_session(&mut self, why: &str) {
        if let Some(s) = self.session.take() {
            self.shared.session_up.store(false, Ordering::Relaxed);
            if matches!(s.phase, Phase::Ready) {
                log(format_args!(
                    "control session {} ended ({why}); forwarding on with {} SAs and {} rules",
                    s.conn.peer(),
                    self.sadb.load().len(),
                    self.filter.load().rule_count()
                ));
            } else {
                log(format_args!(
                    "control connection {} closed before its hello completed ({why})",
                    s.conn.peer()
                ));
            }
        }
    }

    /// Receives and answers what the session sent (or waits a little).
    fn serve(&mut self, busy: bool) {
        // Punted IKE waits at most this long for the control thread: it is
        // part of every IKE round trip, so the idle wait is short too.
        let wait = if busy {
            Duration::from_micros(200)
        } else {
            Duration::from_millis(1)
        };
        if self.session.is_none() {
            std::thread::sleep(wait);
            return;
        }
        for n in 0..64 {
            let Some(s) = self.session.as_mut() else {
                return;
            };
            let limit = match s.phase {
                Phase::AwaitHello => HELLO_LIMIT,
                Phase::Ready => SILENCE_LIMIT,
            };
            if s.last_rx.elapsed() > limit {
                let why = format!("silent for more than {} s", limit.as_secs());
                self.end_session(&why);
                return;
            }
            let timeout = if n == 0 {
                wait
            } else {
                Duration::from_millis(1)
            };
            // Kept raw, then decoded once into its type: a batch of many SAs
            // never becomes a generic JSON tree first.
            match s
                .conn
                .recv::<Box<serde_json::value::RawValue>>(Some(timeout))
            {
                Ok(None) => return,
                Ok(Some(msg)) => {
                    s.last_rx = Instant::now();
                    match s.phase {
                        Phase::AwaitHello => self.hello(&msg),
                        Phase::Ready => self.request(&msg),
                    }
                }
                Err(ChannelError::Closed) => {
                    self.end_session("closed by control");
                    return;
                }
                Err(ChannelError::Decode(e)) => {
                    // The frame was consumed: the stream is still in step.
                    self.reply(
                        0,
                        Reply::Error {
                            message: format!("undecodable message: {e}"),
                        },
                    );
                }
                Err(e) => {
                    self.end_session(&e.to_string());
                    return;
                }
            }
        }
    }

    fn hello(&mut self, msg: &serde_json::value::RawValue) {
        let verdict = serde_json::from_str::<Hello>(msg.get())
            .map_err(|e| format!("not a hello message: {e}"))
            .and_then(|h| proto::negotiate(&h).map(|v| (v, h)));
        let Some(s) = self.session.as_mut() else {
            return;
        };
        match verdict {
            Err(reason) => {
                let _ = s.conn.send(&HelloReply::Refused {
                    reason: reason.clone(),
                });
                let peer = s.conn.peer().to_string();
                self.session = None;
                log(format_args!("control connection {peer} refused: {reason}"));
            }
            Ok((version, h)) => {
                let welcome = HelloReply::Welcome {
                    version,
                    software: self.software.clone(),
                    instance: self.instance.clone(),
                };
                // Up before the welcome leaves: a frame the control sends once
                // welcomed must already meet workers that learn neighbours for
                // it (they forward uninspected while no session is up).
                s.phase = Phase::Ready;
                self.shared.session_up.store(true, Ordering::Release);
                if let Err(e) = s.conn.send(&welcome) {
                    self.end_session(&e.to_string());
                    return;
                }
                let peer = s.conn.peer().to_string();
                self.totals.sessions += 1;
                log(format_args!(
                    "control session {peer} started ({}, protocol version {version})",
                    h.software
                ));
                // Negotiations still wanted: the new session hears of each once.
                for a in self.hold.reacquire_all(Instant::now()) {
                    self.totals.acquires += 1;
                    self.emit(Event::Acquire(a));
                }
            }
        }
    }

    fn session_ready(&self) -> bool {
        matches!(
            self.session,
            Some(Session {
                phase: Phase::Ready,
                ..
            })
        )
    }

    /// Sends an event if a session is up (the session ends if sending fails).
    fn emit(&mut self, event: Event) -> bool {
        if !self.session_ready() {
            return false;
        }
        let Some(s) = self.session.as_mut() else {
            return false;
        };
        match s.conn.send(&FromDataplane::Event { event }) {
            Ok(()) => true,
            Err(e) => {
                self.end_session(&format!("sending an event failed: {e}"));
                false
            }
        }
    }

    fn reply(&mut self, id: u64, reply: Reply) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if let Err(e) = s.conn.send(&FromDataplane::Reply { id, reply }) {
            self.end_session(&format!("sending a reply failed: {e}"));
        }
    }

    fn request(&mut self, msg: &serde_json::value::RawValue) {
        let received = Instant::now();
        let (id, req) = match ToDataplane::from_json(msg.get()) {
            Ok(r) => (r.id, r.request),
            Err(e) => {
                // Which request failed, if it says.
                let id = serde_json::from_str::<serde_json::Value>(msg.get())
                    .ok()
                    .and_then(|v| v.get("id").and_then(|v| v.as_u64()));
                match id {
                    None => self.reply(
                        0,
                        Reply::Error {
                            message: "a request without a numeric `id`".into(),
                        },
                    ),
                    Some(id) => self.reply(
                        id,
                        Reply::Error {
                            message: format!("cannot decode the request: {e}"),
                        },
                    ),
                }
                return;
            }
        };
        let reply = match req {
            Request::Apply(batch) => {
                // Slots freed by the last Apply are reusable now if the
                // workers have moved on (they let go at their next burst).
                self.reclaim();
                let r = self.apply(&batch, received);
                // Accepted or refused (planning binds names too).
                self.unbind_unused();
                match r {
                    Ok(a) => Reply::Applied(a),
                    Err(message) => Reply::Error { message },
                }
            }
            Request::Inject { port, packet } => match self.inject(port, &packet.0) {
                Ok(()) => {
                    self.totals.injected += 1;
                    Reply::Injected
                }
                Err(message) => {
                    self.totals.inject_failed += 1;
                    self.totals.count_drop(DropReason::InjectFailed, 1);
                    Reply::Error { message }
                }
            },
            Request::AcquireFailed { sa } => {
                self.acquire_failed(&sa);
                Reply::Done
            }
            Request::GetState => Reply::State(self.state()),
            Request::GetStats { sa_limit } => Reply::Stats(Box::new(self.stats(sa_limit))),
            Request::Ping => Reply::Pong,
        };
        self.reply(id, reply);
    }

    // ---- requests ----

    fn apply(&mut self, batch: &Batch, received: Instant) -> Result<Applied, String> {
        let sadb = self.sadb.clone();
        let table = sadb.load();
        let current = Live {
            sadb: &sadb,
            table: &table,
        };
        let plan = plan_batch(batch, &current, &|n, d| sadb.slot(n, d));
        drop(table);
        let plan = plan?;
        let Plan {
            early_removes,
            installs,
            late_removes,
            table,
            punt,
            meta,
            mut applied,
        } = plan;
        let removed: Vec<(String, Direction)> = early_removes
            .iter()
            .chain(&late_removes)
            .filter_map(|c| match c {
                SaChange::Remove { name, direction } => Some((name.clone(), *direction)),
                SaChange::Install(_) => None,
            })
            .collect();
        // 1. New and replaced SAs (and removals whose SPI they take), all at once.
        if !installs.is_empty() || !early_removes.is_empty() {
            let mut first = early_removes;
            first.extend(installs);
            self.sadb.apply(first).map_err(|e| e.to_string())?;
        }
        // 2. The filter table.
        if let Some((t, spec)) = table {
            let old = self.filter.publish(Arc::new(t));
            self.retired.push(old);
            self.policy = spec;
        }
        // 3. SAs no longer wanted.
        if !late_removes.is_empty() {
            if let Err(e) = self.sadb.apply(late_removes) {
                // Checked above; reaching this is a bug, and the rest is in place.
                return Err(format!(
                    "applied except the removal of SAs: {e} (please report this)"
                ));
            }
        }
        // 4. The punt set.
        if let Some(addrs) = punt {
            let set = PuntSet::new(&addrs);
            self.punt_addrs = set.addrs();
            let old = self.shared.set_punt(set);
            self.retired_punt.push(old);
        }
        for (key, m) in meta {
            self.meta.insert(key, m);
        }
        // What the batch removed (only removals end an SA's life).
        for key in &removed {
            self.meta.remove(key);
        }
        let f = self.filter.load();
        applied.policy_generation = f.generation() as u64;
        applied.rules = f.rule_count();
        drop(f);
        applied.released = self.release_ready();
        applied.apply_seconds = received.elapsed().as_secs_f64();
        Ok(applied)
    }

    /// Unbinds the SA names nothing uses any more (no installed SA by name
    /// or inbound policy name, no protect rule of the current filter table),
    /// so their slots are reused (see `sadb`); packets held for an unbound
    /// outbound name can never leave and are dropped (`hold_failed`).
    fn unbind_unused(&mut self) {
        let filter = self.filter.load();
        if self.rule_names.1 != Some(filter.generation()) {
            let mut names: [HashSet<String>; 2] = Default::default();
            for d in [Direction::Out, Direction::In] {
                for r in filter.rules(d) {
                    if let crate::filter::Action::Protect { sa } = &r.action {
                        names[(d == Direction::In) as usize].insert(sa.clone());
                    }
                }
            }
            self.rule_names = (names, Some(filter.generation()));
        }
        drop(filter);
        let retired: Vec<std::sync::Weak<dyn std::any::Any + Send + Sync>> = self
            .retired
            .iter()
            .map(|t| {
                let w: std::sync::Weak<FilterTable> = Arc::downgrade(t);
                w as std::sync::Weak<dyn std::any::Any + Send + Sync>
            })
            .collect();
        let gone = self.sadb.unbind_unused(&self.rule_names.0, &retired);
        for u in gone {
            if u.direction != Direction::Out {
                continue;
            }
            let n = self.hold.take_slot(u.id).len() as u64;
            if n > 0 {
                self.totals.count_drop(DropReason::HoldFailed, n);
                *self
                    .hold_dropped
                    .entry((u.name, DropReason::HoldFailed.as_str()))
                    .or_default() += n;
            }
        }
    }

    fn inject(&mut self, port: PortName, packet: &[u8]) -> Result<(), String> {
        let (src, dst, ethertype) = check_datagram(packet)?;
        let (src_mac, dst_mac) = self.neighbors.macs_for(port, src, dst)?;
        let mut eth = [0u8; 14];
        eth[..6].copy_from_slice(&dst_mac.0);
        eth[6..12].copy_from_slice(&src_mac.0);
        eth[12..].copy_from_slice(&ethertype.to_be_bytes());
        let mbuf = self
            .pool
            .alloc_frame(&[&eth, packet])
            .ok_or("no packet buffer free in the pool")?;
        let item = HandoffItem {
            mbuf,
            dir: match port {
                PortName::Outside => Direction::Out,
                PortName::Inside => Direction::In,
            },
            l3: 14,
            job: Job::Transmit,
        };
        // Worker 0 sends it on its TX queue of that port.
        self.handoff
            .push(0, item)
            .map_err(|_| "worker 0's inbox is full; try again".to_string())
    }

    fn acquire_failed(&mut self, sa: &str) {
        let Some(slot) = self.sadb.find_slot(sa, Direction::Out) else {
            return;
        };
        let n = self.hold.take_slot(slot).len() as u64;
        if n > 0 {
            self.totals.count_drop(DropReason::HoldFailed, n);
            *self
                .hold_dropped
                .entry((sa.to_string(), DropReason::HoldFailed.as_str()))
                .or_default() += n;
        }
    }

    fn sa_info(&self) -> Vec<SaInfo> {
        let table = self.sadb.load();
        table
            .iter()
            .map(|(d, _, sa)| {
                let meta = self.meta.get(&(sa.params.name.clone(), d));
                let spec = SaSpec::from_params(&sa.params, Origin::Config);
                SaInfo {
                    name: spec.name.clone(),
                    direction: d,
                    spi: spec.spi,
                    mode: spec.mode.clone(),
                    tunnel_src: spec.tunnel_src,
                    tunnel_dst: spec.tunnel_dst,
                    encap: spec.encap.clone(),
                    aead: spec.aead.clone(),
                    esn: spec.esn,
                    replay_window: spec.replay_window,
                    origin: meta.map_or(Origin::Config, |m| m.origin),
                    fingerprint: meta.map_or_else(
                        || proto::params_fingerprint(&sa.params),
                        |m| m.fingerprint.clone(),
                    ),
                    packets: sa.packets.load(Ordering::Relaxed),
                    bytes: sa.bytes.load(Ordering::Relaxed),
                    sequence: match d {
                        Direction::Out => sa.seq.load(Ordering::Relaxed),
                        Direction::In => sa.top_seen.load(Ordering::Relaxed),
                    },
                    expired: sa.is_expired(),
                    owner_worker: sa.owner,
                    policy: spec.policy.clone(),
                }
            })
            .collect()
    }

    fn state(&self) -> DataplaneState {
        DataplaneState {
            instance: self.instance.clone(),
            sas: self.sa_info(),
            policy: Some(self.policy.clone()),
            punt_addrs: self.punt_addrs.clone(),
            neighbors: self.neighbors.list(),
            held_packets: self.hold.len(),
        }
    }

    fn stats(&self, sa_limit: usize) -> Stats {
        let ports = self
            .ports
            .iter()
            .map(|(name, device, id)| {
                let d = dpdk::port_stats(*id);
                PortStats {
                    name: name.clone(),
                    device: device.clone(),
                    rx: TrafficCount {
                        packets: d.rx_packets,
                        bytes: d.rx_bytes,
                    },
                    tx: TrafficCount {
                        packets: d.tx_packets,
                        bytes: d.tx_bytes,
                    },
                    rx_missed: d.rx_missed,
                    rx_errors: d.rx_errors,
                    tx_errors: d.tx_errors,
                }
            })
            .collect();
        let workers = self
            .counters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = c.snapshot(i);
                WorkerStats {
                    worker: i,
                    lcore: s.lcore,
                    rx_inside: traffic(s.rx_inside),
                    rx_outside: traffic(s.rx_outside),
                    tx_inside: traffic(s.tx_inside),
                    tx_outside: traffic(s.tx_outside),
                    drops: s.drops,
                    non_ip: s.non_ip,
                    bypassed: s.bypassed,
                    uninspected: s.uninspected,
                    esp_encrypted: s.esp_encrypted,
                    esp_decrypted: s.esp_decrypted,
                    handed_off: s.handed_off,
                    punted: s.punted,
                    held: s.held,
                    events_lost: s.events_lost,
                    flow_cache_hits: s.flow_cache_hits,
                    flow_cache_misses: s.flow_cache_misses,
                    idle_polls: s.idle_polls,
                    busy_polls: s.busy_polls,
                    busy_cycles: s.busy_cycles,
                    total_cycles: s.total_cycles,
                    rx_bursts: s.rx_bursts,
                    rx_burst_packets: s.rx_burst_packets,
                    latency: s.latency,
                }
            })
            .collect();
        let table = self.sadb.load();
        let sas = table
            .iter()
            .take(sa_limit)
            .map(|(d, _, sa)| SaStats {
                name: sa.params.name.clone(),
                direction: d,
                spi: sa.params.spi,
                packets: sa.packets.load(Ordering::Relaxed),
                bytes: sa.bytes.load(Ordering::Relaxed),
                expired: sa.is_expired(),
            })
            .collect();
        let t = &self.totals;
        Stats {
            instance: self.instance.clone(),
            software: self.software.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            burst_size: self.burst,
            tsc_hz: dpdk::tsc_hz(),
            ports,
            workers,
            control_drops: t.drops.clone(),
            sa_count: table.len(),
            sa_slots: {
                let u = self.sadb.slot_use();
                SaSlots {
                    bound: u.bound,
                    free: u.free,
                    waiting: u.waiting,
                    table: u.table_slots,
                }
            },
            sas,
            held_packets: self.hold.len(),
            acquires: t.acquires,
            expires: [
                ("soft_lifetime", t.soft_lifetime),
                ("hard_lifetime", t.hard_lifetime),
                ("sequence_exhausted", t.sequence_exhausted),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            punted: t.punted,
            injected: t.injected,
            inject_failed: t.inject_failed,
            control_sessions: t.sessions,
        }
    }

    // ---- what the workers queued ----

    /// Handles everything the workers queued; says whether there was any.
    fn drain_queues(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(e) = self.shared.events.pop() {
            any = true;
            self.sa_event(e);
        }
        while let Some(l) = self.shared.learned.pop() {
            any = true;
            if let Some(n) = self.neighbors.learn(port_name(l.port), l.ip, Mac(l.mac)) {
                self.totals.learned += 1;
                self.emit(Event::Learned(n));
            }
        }
        while let Some(p) = self.shared.punts.pop() {
            any = true;
            self.punted(p);
        }
        while let Some(h) = self.shared.holds.pop() {
            any = true;
            self.held(h, now);
        }
        any
    }

    fn sa_event(&mut self, e: SaEventRecord) {
        let table = self.sadb.load();
        let sa = match e.direction {
            Direction::Out => table.outbound(e.slot),
            Direction::In => table.inbound(e.slot),
        };
        let name = sa.map_or_else(|| "?".to_string(), |s| s.params.name.clone());
        drop(table);
        let (what, reason) = match e.event {
            SaEvent::SoftLifetime => {
                self.totals.soft_lifetime += 1;
                (
                    "soft lifetime reached (rekey now)",
                    ExpireReason::SoftLifetime,
                )
            }
            SaEvent::HardLifetime => {
                self.totals.hard_lifetime += 1;
                (
                    "hard lifetime reached: SA expired",
                    ExpireReason::HardLifetime,
                )
            }
            SaEvent::SequenceExhausted => {
                self.totals.sequence_exhausted += 1;
                (
                    "sequence numbers used up: SA expired",
                    ExpireReason::SequenceExhausted,
                )
            }
        };
        log(format_args!(
            "SA {name} ({} SPI {:#010x}): {what}",
            e.direction.as_str(),
            e.spi
        ));
        self.emit(Event::Expire {
            sa: name,
            direction: e.direction,
            spi: e.spi,
            reason,
        });
    }

    fn punted(&mut self, p: PuntItem) {
        let port = port_name(p.port);
        let frame = p.mbuf.to_vec();
        drop(p.mbuf);
        let Some(v) = wire::udp_view(&frame) else {
            // The worker checked it; a frame that changed its mind is dropped.
            self.totals.count_drop(DropReason::Malformed, 1);
            return;
        };
        if let Some(n) =
            self.neighbors
                .learn_frame(port, v.src, v.dst, Mac(v.src_mac), Mac(v.dst_mac))
        {
            self.totals.learned += 1;
            self.emit(Event::Learned(n));
        }
        if !self.session_ready() {
            self.totals.count_drop(DropReason::PuntNoControl, 1);
            return;
        }
        let mut payload = &frame[v.payload.clone()];
        let ike_port = v.sport == wire::IKE_PORT || v.dport == wire::IKE_PORT;
        let nat_t = !ike_port && payload.len() >= 4 && payload[..4] == [0; 4];
        if nat_t {
            payload = &payload[4..];
        }
        let event = Event::Punt(Punt {
            port,
            src_mac: Mac(v.src_mac),
            dst_mac: Mac(v.dst_mac),
            vlans: v.vlans.clone(),
            src: v.src,
            dst: v.dst,
            sport: v.sport,
            dport: v.dport,
            nat_t,
            payload: proto::Packet(payload.to_vec()),
        });
        if self.emit(event) {
            self.totals.punted += 1;
        } else {
            self.totals.count_drop(DropReason::PuntNoControl, 1);
        }
    }

    /// A packet a worker could not protect for want of its SA.
    fn held(&mut self, h: HeldItem, now: Instant) {
        let data = h.mbuf.data();
        let (mut k4, mut k6) = (Default::default(), Default::default());
        let key = match wire::parse_into(data, h.mbuf.pkt_len() as usize, &mut k4, &mut k6) {
            FrameKind::V4 { fragment, .. } => FlowKey {
                src: IpAddr::from(k4.src),
                dst: IpAddr::from(k4.dst),
                proto: k4.proto,
                sport: u16::from_be_bytes(k4.sport),
                dport: u16::from_be_bytes(k4.dport),
                fragment,
            },
            FrameKind::V6 { fragment, .. } => FlowKey {
                src: IpAddr::from(k6.src),
                dst: IpAddr::from(k6.dst),
                proto: k6.proto,
                sport: u16::from_be_bytes(k6.sport),
                dport: u16::from_be_bytes(k6.dport),
                fragment,
            },
            _ => {
                self.totals.count_drop(DropReason::ProtectNoSa, 1);
                return;
            }
        };
        let (src_mac, dst_mac) = (
            Mac(data
                .get(6..12)
                .and_then(|m| m.try_into().ok())
                .unwrap_or_default()),
            Mac(data
                .get(0..6)
                .and_then(|m| m.try_into().ok())
                .unwrap_or_default()),
        );
        if let Some(n) =
            self.neighbors
                .learn_frame(PortName::Inside, key.src, key.dst, src_mac, dst_mac)
        {
            self.totals.learned += 1;
            self.emit(Event::Learned(n));
        }
        // The rule that wants it, by today's table (which may have changed
        // since the worker looked): it must still protect with this SA.
        let filter = self.filter.load();
        let rule = match filter.classify_one(Direction::Out, &key) {
            Verdict::Protect { rule, sa } if sa == h.slot => {
                filter.rules(Direction::Out).get(rule as usize).cloned()
            }
            _ => None,
        };
        drop(filter);
        let Some(rule) = rule else {
            self.totals.count_drop(DropReason::ProtectNoSa, 1);
            return;
        };
        let crate::filter::Action::Protect { sa: sa_name } = &rule.action else {
            self.totals.count_drop(DropReason::ProtectNoSa, 1);
            return;
        };
        // The SA may have arrived meanwhile: then straight to its owner.
        let owner = self.sadb.load().outbound(h.slot).map(|sa| sa.owner);
        if let Some(owner) = owner {
            self.hand_to_owner(owner, h.slot, h.l3, h.mbuf);
            return;
        }
        let flow = Acquire {
            sa: sa_name.clone(),
            rule: rule.name.clone(),
            direction: Direction::Out,
            src: key.src,
            dst: key.dst,
            proto: key.proto,
            sport: key.sport,
            dport: key.dport,
        };
        let pushed = self.hold.push(
            Held {
                slot: h.slot,
                l3: h.l3,
                since: now,
                flow: flow.clone(),
                pkt: h.mbuf,
            },
            now,
        );
        if let Some(old) = pushed.evicted {
            self.totals.count_drop(DropReason::HoldOverflow, 1);
            *self
                .hold_dropped
                .entry((old.flow.sa.clone(), DropReason::HoldOverflow.as_str()))
                .or_default() += 1;
        }
        if pushed.acquire && self.emit(Event::Acquire(flow)) {
            self.totals.acquires += 1;
        }
    }

    fn expire_held(&mut self, now: Instant) {
        if self.hold.is_empty() {
            return;
        }
        for h in self.hold.expire(now) {
            self.totals.count_drop(DropReason::HoldTimeout, 1);
            *self
                .hold_dropped
                .entry((h.flow.sa.clone(), DropReason::HoldTimeout.as_str()))
                .or_default() += 1;
        }
    }

    fn flush_hold_dropped(&mut self) {
        if self.hold_dropped.is_empty() {
            return;
        }
        for ((sa, reason), packets) in std::mem::take(&mut self.hold_dropped) {
            self.emit(Event::HoldDropped {
                sa,
                packets,
                reason: reason.to_string(),
            });
        }
    }

    /// Releases the held packets whose SA is installed now, to the SA's
    /// owner worker, in arrival order. Returns how many went.
    fn release_ready(&mut self) -> usize {
        let table = self.sadb.load();
        let ready: Vec<(u32, usize)> = self
            .hold
            .slots()
            .into_iter()
            .filter_map(|slot| table.outbound(slot).map(|sa| (slot, sa.owner)))
            .collect();
        drop(table);
        let mut n = 0;
        for (slot, owner) in ready {
            for h in self.hold.take_slot(slot) {
                if self.hand_to_owner(owner, slot, h.l3, h.pkt) {
                    n += 1;
                }
            }
        }
        self.totals.released += n as u64;
        n
    }

    /// Hands a held packet to the worker that owns its SA, waiting briefly
    /// for room in its inbox (this is not the packet path).
    fn hand_to_owner(&mut self, owner: usize, slot: u32, l3: u16, mbuf: Mbuf) -> bool {
        let mut item = HandoffItem {
            mbuf,
            dir: Direction::Out,
            l3,
            job: Job::Protect { slot },
        };
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            match self.handoff.push(owner, item) {
                Ok(()) => return true,
                Err(back) if Instant::now() < deadline && !self.stop.load(Ordering::Relaxed) => {
                    item = back;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => {
                    self.totals.count_drop(DropReason::HandoffFull, 1);
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punt_set_lookups() {
        let s = PuntSet::new(&[
            "10.0.0.9".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
        ]);
        assert!(s.contains_v4(&[10, 0, 0, 1]) && s.contains_v4(&[10, 0, 0, 9]));
        assert!(!s.contains_v4(&[10, 0, 0, 2]));
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert!(s.contains_v6(&v6.octets()));
        assert_eq!(s.addrs().len(), 3);
        assert!(PuntSet::new(&[]).is_empty());
    }
}
