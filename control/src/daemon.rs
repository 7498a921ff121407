//! The control process: one engine thread that owns all state, fed by the
//! link, the admin socket, the exporter and the signal handler.
//!
//! Changes to the dataplane go one at a time (an [`Op`]): each starts from
//! a fresh `GetState`, plans the difference against a candidate desired
//! state ([`desired::plan`]), sends one atomic batch, and only when the
//! dataplane accepts it does the candidate become control's state. So a
//! refused change leaves nothing half-done, and two changes never race.
//! With the link down a change is taken at once and applied on reconnect
//! (every reconnect starts with a reconcile).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use bitw_common::config::Config;
use bitw_common::proto::{
    Applied, DataplaneState, Event, ExpireReason, Origin, PortName, Reply, Request, SaChange,
    SaInfo, Stats, PROTOCOL_VERSION,
};
use bitw_common::rules::Direction;

use crate::admin::{
    AcquireInfo, AdminRequest, AdminResponse, AdminServer, ChangeResult, CountersInfo, ErrorKind,
    IkeResult, IkeStatus, LinkInfo, NeighborEntry, PolicyEntry, ReloadInfo, SaCounts, SaEntry,
    StatusInfo, TerminalConnection, TerminalEntry, TerminalsInfo,
};
use crate::desired::{self, Desired, Plan, Removals, SaKey};
use crate::link::{self, LinkCmd, LinkConfig, LinkEvent};
use crate::metrics::{self, IkeSnapshot, Metrics, Snapshot};
use crate::proxy::{self, Proxy};
use crate::{debug, info, unix_now};

/// How long an admin client waits for the engine.
const ADMIN_WAIT: Duration = Duration::from_secs(60);
/// Neighbours remembered (the oldest are forgotten beyond this).
const MAX_NEIGHBORS: usize = 65536;
/// SAs whose acquires are remembered for `bitwctl status`.
const MAX_ACQUIRED: usize = 1024;

/// What the engine is told.
pub enum EngineMsg {
    Admin(Box<AdminRequest>, Sender<AdminResponse>),
    /// The exporter wants the dataplane's counters (`None`: not available).
    Stats(Sender<Option<Arc<Stats>>>),
    /// SIGHUP (no one to answer) or `bitwctl reload`.
    Reload(Option<Sender<AdminResponse>>),
    Stop,
}

/// A running control process.
pub struct Daemon {
    tx: Sender<EngineMsg>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    engine_done: Receiver<()>,
    pub admin_socket: PathBuf,
    /// Where the exporter listens (the actual port when 0 was configured).
    pub metrics_addr: Option<SocketAddr>,
}

impl Daemon {
    /// Binds the admin socket and the exporter and starts every thread.
    pub fn start(config: Config) -> anyhow::Result<Daemon> {
        let metrics = Metrics::new();
        metrics.last_reload_success.set(unix_now());
        let admin = AdminServer::bind(
            &config.control.admin_socket,
            config.control.admin_socket_mode,
        )
        .context("admin socket")?;
        let http = match config.control.metrics_listen {
            Some(addr) => Some(metrics::bind(addr).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let metrics_addr = http.as_ref().map(|(_, a)| *a);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = unbounded::<EngineMsg>();
        let (link_tx, link_rx) = unbounded::<LinkCmd>();
        let (ev_tx, ev_rx) = unbounded::<LinkEvent>();
        let (done_tx, done_rx) = bounded::<()>(0);
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        metrics.add_dataplane_collector(stats_source(tx.clone()), snapshot.clone())?;

        let link_cfg = LinkConfig {
            endpoint: config.control.socket.clone(),
            tls: config.control.tls.clone(),
            ping_interval: config.control.ping_interval,
            reconnect_interval: config.control.reconnect_interval,
            software: crate::software(),
        };
        let admin_socket = config.control.admin_socket.clone();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .with_context(|| format!("starting thread {name}"))
        };
        let mut threads = Vec::new();
        let proxy = Proxy::new(&config).map_err(anyhow::Error::msg)?;
        let mut engine = Engine::new(config, metrics.clone(), snapshot, link_tx, proxy);
        threads.push(spawn(
            "engine",
            Box::new(move || {
                engine.run(rx, ev_rx);
                drop(done_tx);
            }),
        )?);
        {
            let (m, s) = (metrics.clone(), stop.clone());
            threads.push(spawn(
                "link",
                Box::new(move || link::run(link_cfg, link_rx, ev_tx, m, s)),
            )?);
        }
        {
            let (t, s) = (tx.clone(), stop.clone());
            threads.push(spawn(
                "admin",
                Box::new(move || {
                    admin.serve(s, move |req| {
                        let (rtx, rrx) = bounded(1);
                        if t.send(EngineMsg::Admin(Box::new(req), rtx)).is_err() {
                            return AdminResponse::err(
                                ErrorKind::Refused,
                                "bitw-control is stopping",
                            );
                        }
                        rrx.recv_timeout(ADMIN_WAIT).unwrap_or_else(|_| {
                            AdminResponse::err(
                                ErrorKind::Refused,
                                "bitw-control did not answer in time",
                            )
                        })
                    })
                }),
            )?);
        }
        if let Some((server, addr)) = http {
            let (m, s) = (metrics.clone(), stop.clone());
            info!("metrics on http://{addr}/metrics");
            threads.push(spawn(
                "metrics",
                Box::new(move || metrics::serve(server, m, s)),
            )?);
        }
        info!("admin socket {}", admin_socket.display());
        Ok(Daemon {
            tx,
            stop,
            threads,
            engine_done: done_rx,
            admin_socket,
            metrics_addr,
        })
    }

    /// Re-reads the configuration (SIGHUP).
    pub fn reload(&self) {
        let _ = self.tx.send(EngineMsg::Reload(None));
    }

    /// Disconnects (a receive fails) when the engine has stopped.
    pub fn engine_done(&self) -> &Receiver<()> {
        &self.engine_done
    }

    /// Stops every thread; the admin socket file is removed. The link
    /// thread is told to stop but not waited for: it may sit in a TCP
    /// connect to an unreachable host, and it holds nothing to clean up.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.tx.send(EngineMsg::Stop);
        for t in self.threads {
            if t.thread().name() != Some("link") {
                let _ = t.join();
            }
        }
    }
}

/// The exporter's view of the dataplane's counters: fetched through the
/// engine at most once a second, waiting at most a second.
fn stats_source(tx: Sender<EngineMsg>) -> Box<dyn Fn() -> Option<Arc<Stats>> + Send + Sync> {
    type Cache = Option<(Instant, Arc<Stats>)>;
    let cache: Mutex<Cache> = Mutex::new(None);
    Box::new(move || {
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, s)) = c.as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return Some(s.clone());
            }
        }
        let (rtx, rrx) = bounded(1);
        tx.send(EngineMsg::Stats(rtx)).ok()?;
        let s = rrx.recv_timeout(Duration::from_secs(1)).ok().flatten()?;
        *c = Some((Instant::now(), s.clone()));
        Some(s)
    })
}

// ---- the engine ----

struct UpInfo {
    session: u64,
    peer: String,
    version: u16,
    software: String,
    instance: String,
}

struct LinkState {
    up: Option<UpInfo>,
    since_unix: f64,
    last_error: Option<String>,
    /// The last connect error logged, so a dead dataplane is reported once.
    logged_error: Option<String>,
    last_rtt: Option<Duration>,
    reconciled: bool,
    connects: u64,
    last_instance: Option<String>,
}

enum Query {
    Status,
    SaList,
    SaShow {
        name: String,
        direction: Option<Direction>,
    },
    PolicyList,
    Terminals,
    Counters,
}

enum Pending {
    SyncState,
    SyncApply,
    Query(Query, Sender<AdminResponse>),
    Stats,
    AcquireFailed(String),
    Inject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Reconcile,
    Change,
    Reload,
    Ike,
}

/// One change on its way to the dataplane.
struct Op {
    kind: OpKind,
    /// What it does, for logs and answers ("sa add `x` (out)").
    what: String,
    candidate: Desired,
    removals: Removals,
    notes: Vec<String>,
    waiter: Option<Sender<AdminResponse>>,
    plan: Option<Plan>,
    config: Option<Box<Config>>,
    /// The IKE proxy's change this op carries.
    ike_change: Option<u64>,
}

enum Queued {
    Reconcile,
    Ike(proxy::Change),
    Admin(Box<AdminRequest>, Sender<AdminResponse>),
    Reload(Box<Config>, Vec<String>, Option<Sender<AdminResponse>>),
}

enum Outcome {
    /// The dataplane is down: applied when it is back.
    Offline,
    /// Nothing differed.
    Unchanged,
    Applied(Applied),
}

struct AcquireRec {
    count: u64,
    last_unix: f64,
    last_flow: String,
    logged: Option<Instant>,
    suppressed: u64,
}

struct NeighborRec {
    mac: String,
    first_seen_unix: f64,
    last_seen_unix: f64,
}

struct Engine {
    config: Config,
    desired: Desired,
    metrics: Arc<Metrics>,
    snapshot: Arc<Mutex<Snapshot>>,
    to_link: Sender<LinkCmd>,
    started: Instant,
    link: LinkState,
    /// The dataplane's tables as last reported (patched after each batch).
    dp: Option<DataplaneState>,
    next_token: u64,
    pending: HashMap<u64, Pending>,
    current: Option<Op>,
    queue: VecDeque<Queued>,
    stats_waiters: Vec<Sender<Option<Arc<Stats>>>>,
    stats_inflight: bool,
    acquires: u64,
    expires: BTreeMap<String, u64>,
    punts: u64,
    hold_dropped: u64,
    acquired: HashMap<SaKey, AcquireRec>,
    neighbors: HashMap<(PortName, IpAddr), NeighborRec>,
    last_reload: Option<ReloadInfo>,
    proxy: Proxy,
}

fn key_str(k: &SaKey) -> String {
    format!("`{}` ({})", k.0, k.1.as_str())
}

fn expire_reason(r: ExpireReason) -> &'static str {
    match r {
        ExpireReason::SoftLifetime => "soft_lifetime",
        ExpireReason::HardLifetime => "hard_lifetime",
        ExpireReason::SequenceExhausted => "sequence_exhausted",
    }
}

impl Engine {
    fn new(
        config: Config,
        metrics: Arc<Metrics>,
        snapshot: Arc<Mutex<Snapshot>>,
        to_link: Sender<LinkCmd>,
        proxy: Proxy,
    ) -> Engine {
        let desired = Desired::from_config(&config);
        let mut e = Engine {
            desired,
            metrics,
            snapshot,
            to_link,
            started: Instant::now(),
            link: LinkState {
                up: None,
                since_unix: unix_now(),
                last_error: Some("not connected yet".into()),
                logged_error: None,
                last_rtt: None,
                reconciled: false,
                connects: 0,
                last_instance: None,
            },
            dp: None,
            next_token: 1,
            pending: HashMap::new(),
            current: None,
            queue: VecDeque::new(),
            stats_waiters: Vec::new(),
            stats_inflight: false,
            acquires: 0,
            expires: metrics::EXPIRE_REASONS
                .iter()
                .map(|r| (r.to_string(), 0))
                .collect(),
            punts: 0,
            hold_dropped: 0,
            acquired: HashMap::new(),
            neighbors: HashMap::new(),
            last_reload: None,
            proxy,
            config,
        };
        e.publish();
        e
    }

    fn run(&mut self, rx: Receiver<EngineMsg>, events: Receiver<LinkEvent>) {
        info!(
            "started (config {}, {} SAs, {} rules, {} terminals); dataplane at {}",
            self.config.path.display(),
            self.desired.sas.len(),
            self.desired.rules.len(),
            self.config.terminals.len(),
            self.config.control.socket
        );
        loop {
            // IKE timers (retransmissions, liveness checks, rekeys) wake the loop.
            let wait = self
                .proxy
                .poll_timeout()
                .map_or(Duration::from_secs(3600), |t| {
                    t.saturating_duration_since(Instant::now())
                });
            select! {
                recv(rx) -> msg => match msg {
                    Ok(EngineMsg::Admin(req, tx)) => self.admin(*req, tx),
                    Ok(EngineMsg::Stats(tx)) => self.want_stats(tx),
                    Ok(EngineMsg::Reload(w)) => self.reload(w),
                    Ok(EngineMsg::Stop) | Err(_) => break,
                },
                recv(events) -> ev => match ev {
                    Ok(ev) => self.link_event(ev),
                    Err(_) => break,
                },
                default(wait) => self.proxy.handle_timeout(Instant::now()),
            }
            self.proxy_actions();
            self.publish_ike();
        }
        info!("stopping");
    }

    /// Carries out what the IKE proxy asked for.
    fn proxy_actions(&mut self) {
        let mut queued = false;
        while let Some(a) = self.proxy.poll_action() {
            match a {
                proxy::Action::Inject { port, packet } => {
                    // With the link down the datagram is lost; IKE retransmits.
                    self.send(
                        Request::Inject {
                            port,
                            packet: bitw_common::proto::Packet(packet),
                        },
                        Pending::Inject,
                    );
                }
                proxy::Action::AcquireFailed { sa } => {
                    self.send(
                        Request::AcquireFailed { sa: sa.clone() },
                        Pending::AcquireFailed(sa),
                    );
                }
                proxy::Action::Change(c) => {
                    self.queue.push_back(Queued::Ike(c));
                    queued = true;
                }
            }
        }
        if queued {
            self.start_next();
        }
    }

    fn session(&self) -> Option<u64> {
        self.link.up.as_ref().map(|u| u.session)
    }

    /// Sends a request on the current session; `None` when the link is down.
    fn send(&mut self, request: Request, pending: Pending) -> Option<u64> {
        let session = self.session()?;
        let token = self.next_token;
        self.next_token += 1;
        self.to_link
            .send(LinkCmd::Request {
                session,
                token,
                request,
            })
            .ok()?;
        self.pending.insert(token, pending);
        Some(token)
    }

    fn publish(&mut self) {
        self.publish_snapshot();
        self.publish_ike();
    }

    fn publish_snapshot(&self) {
        let mut s = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        s.link_up = self.link.up.is_some();
        let sas = self.dp.as_ref().map(|d| d.sas.as_slice()).unwrap_or(&[]);
        s.sas_in = sas.iter().filter(|x| x.direction == Direction::In).count();
        s.sas_out = sas.iter().filter(|x| x.direction == Direction::Out).count();
        s.terminals = self.config.terminals.len();
        s.neighbors_inside = self
            .neighbors
            .keys()
            .filter(|k| k.0 == PortName::Inside)
            .count();
        s.neighbors_outside = self
            .neighbors
            .keys()
            .filter(|k| k.0 == PortName::Outside)
            .count();
    }

    /// The IKE proxy's numbers for the exporter: its set-up times go into
    /// the histogram (drained here), its counters and SA counts into the
    /// snapshot. Cheap (a few small maps): the engine loop runs it after
    /// every message, so a scrape sees the proxy as of its last step.
    fn publish_ike(&mut self) {
        for secs in self.proxy.stats.handshake_seconds.drain(..) {
            self.metrics.observe_ike_handshake(secs);
        }
        let counts = self.proxy.counts();
        let st = &self.proxy.stats;
        let ike = IkeSnapshot {
            connections: self.proxy.connections().count(),
            connecting: counts.connecting,
            established: counts.established,
            handshakes: st.handshakes.clone(),
            rejected: st.rejected.clone(),
            retransmits: st.retransmits,
            cookies_sent: st.cookies_sent,
            child_sas: st.child_sas.clone(),
        };
        let mut s = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        s.ike = ike;
    }

    // ---- link events ----

    fn link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::ConnectFailed { reason } | LinkEvent::Refused { reason } => {
                if self.link.logged_error.as_deref() != Some(&reason) {
                    info!(
                        "dataplane link down: {reason}; retrying every {:?}",
                        self.config.control.reconnect_interval
                    );
                    self.link.logged_error = Some(reason.clone());
                }
                self.link.last_error = Some(reason);
            }
            LinkEvent::Up {
                session,
                peer,
                version,
                software,
                instance,
            } => {
                info!("dataplane link up (instance {instance}, protocol v{version}, {software}, {peer})");
                if let Some(old) = self.link.last_instance.as_ref().filter(|o| **o != instance) {
                    info!("the dataplane restarted (instance {old} -> {instance}): reconciling re-installs what control holds");
                }
                self.link.last_instance = Some(instance.clone());
                self.link.up = Some(UpInfo {
                    session,
                    peer,
                    version,
                    software,
                    instance,
                });
                self.link.since_unix = unix_now();
                self.link.last_error = None;
                self.link.logged_error = None;
                self.link.reconciled = false;
                self.link.connects += 1;
                self.publish();
                self.queue.push_front(Queued::Reconcile);
                self.start_next();
                self.proxy.link_up(Instant::now());
            }
            LinkEvent::Down { session, reason } => {
                if self.session() != Some(session) {
                    return;
                }
                info!(
                    "dataplane link down: {reason}; retrying every {:?}",
                    self.config.control.reconnect_interval
                );
                self.link.up = None;
                self.link.since_unix = unix_now();
                self.link.logged_error = Some(reason.clone());
                self.link.last_error = Some(reason);
                self.link.reconciled = false;
                self.dp = None;
                let tokens: Vec<u64> = self.pending.keys().copied().collect();
                for t in tokens {
                    self.failed(t, "the dataplane link went down");
                }
                self.publish();
                self.start_next();
            }
            LinkEvent::Reply {
                token,
                reply,
                elapsed,
            } => self.reply(token, reply, elapsed),
            LinkEvent::Failed { token, reason } => self.failed(token, &reason),
            LinkEvent::Event(e) => self.event(*e),
            LinkEvent::Rtt(d) => self.link.last_rtt = Some(d),
            LinkEvent::Garbled(m) => info!("dataplane link: {m}"),
        }
    }

    fn reply(&mut self, token: u64, reply: Reply, elapsed: Duration) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        match (p, reply) {
            (Pending::SyncState, Reply::State(st)) => self.planned(st),
            (Pending::SyncApply, Reply::Applied(a)) => {
                self.metrics.observe_install(elapsed);
                self.metrics
                    .sa_installs
                    .inc_by(a.sas_installed.saturating_add(a.sas_replaced) as u64);
                self.metrics.sa_removals.inc_by(a.sas_removed as u64);
                if let Some(op) = self.current.take() {
                    self.commit(op, Outcome::Applied(a));
                }
            }
            (Pending::SyncState | Pending::SyncApply, other) => {
                let message = match other {
                    Reply::Error { message } => message,
                    o => format!("unexpected reply {o:?}"),
                };
                if let Some(op) = self.current.take() {
                    self.refused(op, message);
                }
            }
            (Pending::Query(q, tx), Reply::State(st)) => {
                self.absorb(&st);
                let _ = tx.send(self.answer(q));
            }
            (Pending::Query(Query::Counters, tx), Reply::Stats(s)) => {
                let drops = s.drops_total();
                let _ = tx.send(AdminResponse::ok(&CountersInfo { stats: *s, drops }));
            }
            (Pending::Query(Query::Counters, tx), Reply::Error { message }) => {
                let _ = tx.send(AdminResponse::err(ErrorKind::Dataplane, message));
            }
            (Pending::Query(q, tx), _) => {
                let _ = tx.send(self.answer(q));
            }
            (Pending::Stats, Reply::Stats(s)) => {
                self.stats_inflight = false;
                let s = Arc::new(*s);
                for w in self.stats_waiters.drain(..) {
                    let _ = w.send(Some(s.clone()));
                }
            }
            (Pending::Stats, _) => self.stats_failed(),
            (Pending::AcquireFailed(sa), Reply::Error { message }) => {
                debug!("AcquireFailed for SA `{sa}` refused: {message}")
            }
            (Pending::AcquireFailed(_), _) => {}
            (Pending::Inject, Reply::Error { message }) => {
                debug!("IKE datagram not injected: {message}")
            }
            (Pending::Inject, _) => {}
        }
    }

    fn failed(&mut self, token: u64, reason: &str) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        match p {
            Pending::SyncState | Pending::SyncApply => {
                if let Some(op) = self.current.take() {
                    if op.kind == OpKind::Reconcile {
                        info!("reconcile interrupted: {reason}");
                        self.start_next();
                    } else {
                        self.commit(op, Outcome::Offline);
                    }
                }
            }
            Pending::Query(Query::Counters, tx) => {
                let _ = tx.send(AdminResponse::err(
                    ErrorKind::Dataplane,
                    format!("no counters: {reason}"),
                ));
            }
            Pending::Query(q, tx) => {
                let _ = tx.send(self.answer(q));
            }
            Pending::Stats => self.stats_failed(),
            Pending::AcquireFailed(_) | Pending::Inject => {}
        }
    }

    fn stats_failed(&mut self) {
        self.stats_inflight = false;
        for w in self.stats_waiters.drain(..) {
            let _ = w.send(None);
        }
    }

    fn want_stats(&mut self, tx: Sender<Option<Arc<Stats>>>) {
        if self.session().is_none() {
            let _ = tx.send(None);
            return;
        }
        self.stats_waiters.push(tx);
        if !self.stats_inflight {
            let sa_limit = self.config.control.metrics_sa_limit;
            if self
                .send(Request::GetStats { sa_limit }, Pending::Stats)
                .is_some()
            {
                self.stats_inflight = true;
            } else {
                self.stats_failed();
            }
        }
    }

    /// Takes what a `GetState` said: the table view and the neighbours.
    fn absorb(&mut self, st: &DataplaneState) {
        let now = unix_now();
        for n in &st.neighbors {
            self.learn(n.port, n.ip, n.mac.to_string(), now, false);
        }
        self.dp = Some(st.clone());
        self.publish();
    }

    fn learn(&mut self, port: PortName, ip: IpAddr, mac: String, now: f64, seen_now: bool) {
        if let Some(n) = self.neighbors.get_mut(&(port, ip)) {
            if seen_now || n.mac != mac {
                n.last_seen_unix = now;
            }
            n.mac = mac;
            return;
        }
        if self.neighbors.len() >= MAX_NEIGHBORS {
            if let Some(oldest) = self
                .neighbors
                .iter()
                .min_by(|a, b| a.1.last_seen_unix.total_cmp(&b.1.last_seen_unix))
                .map(|(k, _)| *k)
            {
                self.neighbors.remove(&oldest);
            }
        }
        self.neighbors.insert(
            (port, ip),
            NeighborRec {
                mac,
                first_seen_unix: now,
                last_seen_unix: now,
            },
        );
    }

    // ---- dataplane events ----

    fn event(&mut self, e: Event) {
        match e {
            Event::Acquire(a) => {
                self.metrics.events.with_label_values(&["acquire"]).inc();
                self.acquires += 1;
                if self.proxy.acquire(Instant::now(), &a) {
                    return;
                }
                let key = (a.sa.clone(), a.direction);
                // A rule naming the SA counts: an administrator said it comes later.
                let known = self.desired.find_sa(&a.sa, a.direction).is_some()
                    || !self.desired.rules_using(&a.sa, a.direction).is_empty();
                let flow = format!(
                    "{} port {} -> {} port {} proto {} (rule `{}`)",
                    a.src, a.sport, a.dst, a.dport, a.proto, a.rule
                );
                if !self.acquired.contains_key(&key) && self.acquired.len() >= MAX_ACQUIRED {
                    if let Some(oldest) = self
                        .acquired
                        .iter()
                        .min_by(|x, y| x.1.last_unix.total_cmp(&y.1.last_unix))
                        .map(|(k, _)| k.clone())
                    {
                        self.acquired.remove(&oldest);
                    }
                }
                let rec = self.acquired.entry(key.clone()).or_insert(AcquireRec {
                    count: 0,
                    last_unix: 0.0,
                    last_flow: String::new(),
                    logged: None,
                    suppressed: 0,
                });
                rec.count += 1;
                rec.last_unix = unix_now();
                rec.last_flow = flow.clone();
                // One line per SA and second at most: a busy flow must not flood the log.
                if rec
                    .logged
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    let more = std::mem::take(&mut rec.suppressed);
                    rec.logged = Some(Instant::now());
                    let more = if more > 0 {
                        format!(" (+{more} more since the last line)")
                    } else {
                        String::new()
                    };
                    if self.desired.find_sa(&a.sa, a.direction).is_some() {
                        info!("acquire for SA {}: {flow}{more}; packets are held until it is installed", key_str(&key));
                    } else if known {
                        info!("acquire for SA {}: {flow}{more}; not installed and no [[connection]] negotiates it: packets are held until it is added (bitwctl sa add) or they time out", key_str(&key));
                    } else {
                        info!("acquire for SA {}: {flow}{more}; control does not know this SA (no [[sa]], no [[connection]] child): the held packets are dropped", key_str(&key));
                    }
                } else {
                    rec.suppressed += 1;
                }
                if !known {
                    self.send(
                        Request::AcquireFailed { sa: a.sa.clone() },
                        Pending::AcquireFailed(a.sa),
                    );
                }
            }
            Event::Expire {
                sa,
                direction,
                spi,
                reason,
            } => {
                self.proxy
                    .expire(Instant::now(), &sa, direction, spi, reason);
                self.metrics.events.with_label_values(&["expire"]).inc();
                let r = expire_reason(reason);
                *self.expires.entry(r.to_string()).or_default() += 1;
                let origin = self
                    .desired
                    .find_sa(&sa, direction)
                    .map_or("unknown", |s| s.origin.as_str());
                let what = match reason {
                    ExpireReason::SoftLifetime => "reached its soft lifetime",
                    ExpireReason::HardLifetime => "reached its hard lifetime and expired",
                    ExpireReason::SequenceExhausted => "ran out of sequence numbers and expired",
                };
                let then = if origin == "ike" {
                    "; IKE rekeys or deletes its Child SA"
                } else if reason == ExpireReason::SoftLifetime {
                    ""
                } else {
                    "; a static SA is not rekeyed: replace it with bitwctl or the config"
                };
                info!(
                    "SA `{sa}` ({}, SPI {spi:#010x}, origin {origin}) {what}{then}",
                    direction.as_str()
                );
            }
            Event::Learned(n) => {
                self.metrics.events.with_label_values(&["learned"]).inc();
                let terminal = self
                    .config
                    .terminals
                    .iter()
                    .find(|t| t.address == n.ip)
                    .map(|t| t.name.clone());
                let new = !self.neighbors.contains_key(&(n.port, n.ip));
                self.learn(n.port, n.ip, n.mac.to_string(), unix_now(), true);
                match terminal {
                    Some(t) if new => info!(
                        "terminal `{t}` ({}) seen on port {} at {}",
                        n.ip,
                        n.port.as_str(),
                        n.mac
                    ),
                    _ => debug!(
                        "neighbour {} at {} on port {}",
                        n.ip,
                        n.mac,
                        n.port.as_str()
                    ),
                }
                self.publish();
            }
            Event::Punt(p) => {
                self.metrics.events.with_label_values(&["punt"]).inc();
                self.punts += 1;
                debug!(
                    "punted IKE {}:{} -> {}:{} on port {} ({} bytes{})",
                    p.src,
                    p.sport,
                    p.dst,
                    p.dport,
                    p.port.as_str(),
                    p.payload.0.len(),
                    if p.nat_t { ", NAT-T" } else { "" }
                );
                self.proxy.punt(Instant::now(), &p);
            }
            Event::HoldDropped {
                sa,
                packets,
                reason,
            } => {
                self.metrics
                    .events
                    .with_label_values(&["hold_dropped"])
                    .inc();
                self.hold_dropped = self.hold_dropped.saturating_add(packets);
                info!("{packets} packets held for SA `{sa}` dropped: {reason}");
            }
        }
    }

    // ---- changes ----

    fn admin(&mut self, req: AdminRequest, tx: Sender<AdminResponse>) {
        let q = match req {
            AdminRequest::Status => Query::Status,
            AdminRequest::SaList => Query::SaList,
            AdminRequest::SaShow { name, direction } => Query::SaShow { name, direction },
            AdminRequest::PolicyList => Query::PolicyList,
            AdminRequest::Terminals => Query::Terminals,
            AdminRequest::Counters => Query::Counters,
            AdminRequest::Reload => return self.reload(Some(tx)),
            // The proxy's state is all here: no dataplane round trip. What
            // initiate/terminate set off goes out with the engine loop's
            // `proxy_actions`.
            AdminRequest::IkeList => {
                let _ = tx.send(AdminResponse::ok(&self.proxy.list(Instant::now())));
                return;
            }
            AdminRequest::IkeInitiate { connection } => {
                let r = self.proxy.admin_initiate(Instant::now(), &connection);
                return self.ike_answer(r, tx);
            }
            AdminRequest::IkeTerminate { name } => {
                let r = self.proxy.admin_terminate(Instant::now(), &name);
                return self.ike_answer(r, tx);
            }
            change => {
                self.queue.push_back(Queued::Admin(Box::new(change), tx));
                return self.start_next();
            }
        };
        let request = match q {
            Query::Counters => Request::GetStats { sa_limit: 1 << 20 },
            _ => Request::GetState,
        };
        // Queries go to the dataplane for fresh counters when it is there.
        if self.session().is_some() {
            // (If the link thread is gone the sender drops and the client is told.)
            self.send(request, Pending::Query(q, tx));
            return;
        }
        let _ = tx.send(match q {
            Query::Counters => AdminResponse::err(
                ErrorKind::Dataplane,
                format!(
                    "the dataplane is not connected ({}): no counters",
                    self.link.last_error.as_deref().unwrap_or("down")
                ),
            ),
            q => self.answer(q),
        });
    }

    fn ike_answer(&mut self, r: Result<String, String>, tx: Sender<AdminResponse>) {
        let _ = tx.send(match r {
            Ok(message) => {
                info!("admin: {message}");
                AdminResponse::ok(&IkeResult { message })
            }
            Err(e) => AdminResponse::err(ErrorKind::Refused, e),
        });
        self.publish_ike();
    }

    fn reload(&mut self, waiter: Option<Sender<AdminResponse>>) {
        let path = self.config.path.clone();
        match crate::load_config(&path) {
            Err(e) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                let message = e.to_string();
                info!("reload failed, keeping the running configuration: {message}");
                self.last_reload = Some(ReloadInfo {
                    at_unix: unix_now(),
                    ok: false,
                    message: message.clone(),
                });
                if let Some(w) = waiter {
                    let _ = w.send(AdminResponse::err(ErrorKind::Config, message));
                }
            }
            Ok(c) => {
                let notes = restart_notes(&self.config, &c);
                for n in &notes {
                    info!("reload: {n}");
                }
                self.queue
                    .push_back(Queued::Reload(Box::new(c), notes, waiter));
                self.start_next();
            }
        }
    }

    /// The candidate state of an admin change.
    fn prepare(
        &self,
        req: AdminRequest,
    ) -> Result<(String, Desired, Removals, Vec<String>), String> {
        match req {
            AdminRequest::SaAdd { sa } => {
                let what = format!(
                    "sa add `{}` ({}, SPI {:#010x})",
                    sa.name,
                    sa.direction.as_str(),
                    sa.spi
                );
                let (d, notes) = self.desired.add_sa(sa)?;
                Ok((what, d, Removals::default(), notes))
            }
            AdminRequest::SaDel { name, direction } => {
                let (d, rm, notes) = self.desired.del_sa(&name, direction)?;
                let what = format!(
                    "sa del {}",
                    rm.sas.iter().map(key_str).collect::<Vec<_>>().join(", ")
                );
                Ok((what, d, rm, notes))
            }
            AdminRequest::PolicyAdd {
                rule,
                before,
                position,
            } => {
                let what = format!("policy add `{}`", rule.name);
                let (d, notes) = self.desired.add_rule(rule, before.as_deref(), position)?;
                Ok((what, d, Removals::default(), notes))
            }
            AdminRequest::PolicyDel { name } => {
                let what = format!("policy del `{name}`");
                let (d, rm, notes) = self.desired.del_rule(&name)?;
                Ok((what, d, rm, notes))
            }
            _ => Err("not a change".into()),
        }
    }

    /// Starts the next queued change when none is under way.
    fn start_next(&mut self) {
        while self.current.is_none() {
            let Some(q) = self.queue.pop_front() else {
                return;
            };
            let op = match q {
                Queued::Reconcile => {
                    if self.session().is_none() {
                        continue;
                    }
                    Op {
                        kind: OpKind::Reconcile,
                        what: "reconcile".into(),
                        candidate: self.desired.clone(),
                        removals: Removals::default(),
                        notes: vec![],
                        waiter: None,
                        plan: None,
                        config: None,
                        ike_change: None,
                    }
                }
                Queued::Ike(c) => Op {
                    kind: OpKind::Ike,
                    what: c.what,
                    candidate: self.desired.ike_change(&c.install, &c.remove),
                    removals: Removals {
                        sas: c.remove,
                        rules: vec![],
                    },
                    notes: vec![],
                    waiter: None,
                    plan: None,
                    config: None,
                    ike_change: Some(c.id),
                },
                Queued::Admin(req, tx) => match self.prepare(*req) {
                    Ok((what, candidate, removals, notes)) => Op {
                        kind: OpKind::Change,
                        what,
                        candidate,
                        removals,
                        notes,
                        waiter: Some(tx),
                        plan: None,
                        config: None,
                        ike_change: None,
                    },
                    Err(e) => {
                        let _ = tx.send(AdminResponse::err(ErrorKind::Refused, e));
                        continue;
                    }
                },
                Queued::Reload(config, mut notes, waiter) => {
                    let (candidate, warnings) = self.desired.with_config(&config);
                    for w in &warnings {
                        info!("reload: {w}");
                    }
                    notes.extend(warnings);
                    Op {
                        kind: OpKind::Reload,
                        what: format!("reload of {}", config.path.display()),
                        candidate,
                        removals: Removals::default(),
                        notes,
                        waiter,
                        plan: None,
                        config: Some(config),
                        ike_change: None,
                    }
                }
            };
            if self.send(Request::GetState, Pending::SyncState).is_some() {
                self.current = Some(op);
            } else if op.kind != OpKind::Reconcile {
                self.commit(op, Outcome::Offline);
            }
        }
    }

    /// The dataplane's state arrived for the change under way: plan and send.
    fn planned(&mut self, st: DataplaneState) {
        self.absorb(&st);
        let Some(mut op) = self.current.take() else {
            return;
        };
        let plan = desired::plan(&op.candidate, &st, &op.removals);
        for l in &plan.lost {
            info!(
                "SA `{}` ({}, origin {}, adopted) is gone from the dataplane (it restarted) and control never held its key: it cannot be re-installed; add it again with `bitwctl sa add`",
                l.name,
                l.direction.as_str(),
                l.origin.as_str()
            );
        }
        for a in &plan.adopted_sas {
            info!(
                "adopted SA `{}` ({}, SPI {:#010x}, origin {}) from the dataplane; control holds no key for it, so it cannot be re-installed if the dataplane restarts",
                a.name,
                a.direction.as_str(),
                a.spi,
                a.origin.as_str()
            );
        }
        for r in &plan.adopted_rules {
            info!("adopted rule `{r}` from the dataplane");
        }
        op.candidate = plan.desired.clone();
        if plan.is_empty() {
            op.plan = Some(plan);
            return self.commit(op, Outcome::Unchanged);
        }
        let batch = plan.batch.clone();
        op.plan = Some(plan);
        if self
            .send(Request::Apply(batch), Pending::SyncApply)
            .is_some()
        {
            self.current = Some(op);
        } else if op.kind != OpKind::Reconcile {
            self.commit(op, Outcome::Offline);
        }
    }

    /// The dataplane refused a change: nothing of it is kept.
    fn refused(&mut self, op: Op, message: String) {
        match op.kind {
            OpKind::Reconcile => {
                info!("reconcile failed: the dataplane refused the changes: {message}");
            }
            OpKind::Change => info!("{} refused by the dataplane: {message}", op.what),
            OpKind::Ike => {
                info!("{} refused by the dataplane: {message}", op.what);
                if let Some(id) = op.ike_change {
                    self.proxy.change_done(Instant::now(), id, false);
                }
            }
            OpKind::Reload => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                info!(
                    "{} refused by the dataplane, keeping the running configuration: {message}",
                    op.what
                );
                self.last_reload = Some(ReloadInfo {
                    at_unix: unix_now(),
                    ok: false,
                    message: format!("the dataplane refused it: {message}"),
                });
            }
        }
        if let Some(w) = op.waiter {
            let _ = w.send(AdminResponse::err(ErrorKind::Dataplane, message));
        }
        self.start_next();
    }

    fn commit(&mut self, op: Op, outcome: Outcome) {
        let Op {
            kind,
            what,
            candidate,
            notes,
            waiter,
            plan,
            config,
            ike_change,
            ..
        } = op;
        self.desired = candidate;
        if let Some(id) = ike_change {
            self.proxy.change_done(Instant::now(), id, true);
        }
        if let (Some(dp), Some(p), Outcome::Applied(_)) = (self.dp.as_mut(), &plan, &outcome) {
            patch(dp, p);
        }
        // (new, replaced, unchanged, removed) SAs.
        let (new, replaced, unchanged, removed) = match (&outcome, &plan) {
            (Outcome::Applied(a), Some(p)) => (
                a.sas_installed,
                a.sas_replaced,
                p.unchanged.len().saturating_add(a.sas_unchanged),
                a.sas_removed,
            ),
            (_, Some(p)) => (0, 0, p.unchanged.len(), 0),
            _ => (0, 0, 0, 0),
        };
        let installed = new.saturating_add(replaced);
        let (adopted, rules_adopted) = plan
            .as_ref()
            .map_or((0, 0), |p| (p.adopted_sas.len(), p.adopted_rules.len()));
        let tables = plan.as_ref().map_or(String::new(), |p| {
            let mut t = Vec::new();
            if rules_adopted > 0 {
                t.push(format!("{rules_adopted} rules adopted"));
            }
            if p.policy_changed {
                t.push(format!(
                    "filter table replaced ({} rules)",
                    self.desired.rules.len()
                ));
            }
            if p.punt_changed {
                t.push(format!("{} punt addresses", self.desired.punt_addrs.len()));
            }
            if let Outcome::Applied(a) = &outcome {
                if a.released > 0 {
                    t.push(format!("{} held packets released", a.released));
                }
            }
            if t.is_empty() {
                String::new()
            } else {
                format!("; {}", t.join(", "))
            }
        });
        let counts = format!("{installed} installed, {unchanged} unchanged, {removed} removed, {adopted} adopted{tables}");
        let message = match (&outcome, kind) {
            (Outcome::Offline, _) => format!(
                "{what}: taken; the dataplane is not connected, so it is applied when it is back"
            ),
            (_, OpKind::Reconcile) => format!("reconciled: {counts}"),
            (_, _) => format!("{what}: {counts}"),
        };
        info!("{message}");
        if kind == OpKind::Reconcile {
            self.link.reconciled = true;
        }
        if let Some(c) = config {
            self.config = *c;
            if let Err(e) = self.proxy.reconfigure(Instant::now(), &self.config) {
                info!("reload: the IKE connections were not changed: {e}");
            }
            self.metrics.reloads.with_label_values(&["ok"]).inc();
            self.metrics.last_reload_success.set(unix_now());
            self.last_reload = Some(ReloadInfo {
                at_unix: unix_now(),
                ok: true,
                message: message.clone(),
            });
        }
        if let Some(w) = waiter {
            let (dataplane, applied) = match outcome {
                Outcome::Offline => ("pending", None),
                Outcome::Unchanged => ("unchanged", None),
                Outcome::Applied(a) => ("applied", Some(a)),
            };
            let _ = w.send(AdminResponse::ok(&ChangeResult {
                message,
                notes,
                dataplane: dataplane.into(),
                sas_installed: new,
                sas_replaced: replaced,
                sas_unchanged: unchanged,
                sas_removed: removed,
                sas_adopted: adopted,
                rules_adopted,
                applied,
            }));
        }
        self.publish();
        self.start_next();
    }

    // ---- answers ----

    fn answer(&self, q: Query) -> AdminResponse {
        match q {
            Query::Status => AdminResponse::ok(&self.status()),
            Query::SaList => AdminResponse::ok(&self.sa_entries()),
            Query::SaShow { name, direction } => {
                let hits: Vec<SaEntry> = self
                    .sa_entries()
                    .into_iter()
                    .filter(|e| e.name == name && direction.is_none_or(|d| d == e.direction))
                    .collect();
                if hits.is_empty() {
                    AdminResponse::err(ErrorKind::Refused, format!("no SA named `{name}`"))
                } else {
                    AdminResponse::ok(&hits)
                }
            }
            Query::PolicyList => AdminResponse::ok(&self.policy_list()),
            Query::Terminals => AdminResponse::ok(&self.terminals()),
            Query::Counters => AdminResponse::err(ErrorKind::Dataplane, "no counters"),
        }
    }

    fn status(&self) -> StatusInfo {
        let mut sas = SaCounts::default();
        for s in &self.desired.sas {
            sas.total += 1;
            match s.origin {
                Origin::Config => sas.config += 1,
                Origin::Admin => sas.admin += 1,
                Origin::Ike => sas.ike += 1,
            }
            if s.is_adopted() {
                sas.adopted += 1;
            }
        }
        let up = self.link.up.as_ref();
        let mut acquired: Vec<AcquireInfo> = self
            .acquired
            .iter()
            .map(|((sa, dir), r)| AcquireInfo {
                sa: sa.clone(),
                direction: *dir,
                count: r.count,
                last_unix: r.last_unix,
                last_flow: r.last_flow.clone(),
                known: self.desired.find_sa(sa, *dir).is_some()
                    || !self.desired.rules_using(sa, *dir).is_empty(),
            })
            .collect();
        acquired.sort_by(|a, b| b.last_unix.total_cmp(&a.last_unix));
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            config_file: std::fs::canonicalize(&self.config.path)
                .unwrap_or_else(|_| self.config.path.clone()),
            admin_socket: self.config.control.admin_socket.clone(),
            metrics_listen: self.config.control.metrics_listen.map(|a| a.to_string()),
            dataplane: LinkInfo {
                state: if up.is_some() { "up" } else { "down" }.into(),
                endpoint: self.config.control.socket.to_string(),
                peer: up.map(|u| u.peer.clone()),
                instance: up.map(|u| u.instance.clone()),
                software: up.map(|u| u.software.clone()),
                protocol_version: up.map(|u| u.version),
                since_unix: self.link.since_unix,
                last_rtt_seconds: self.link.last_rtt.map(|d| d.as_secs_f64()),
                last_error: self.link.last_error.clone(),
                reconciled: self.link.reconciled,
                connects: self.link.connects,
            },
            sas,
            rules: self.desired.rules.len(),
            default_action: match self.desired.default_action {
                bitw_common::proto::DefaultActionName::Bypass => "bypass",
                bitw_common::proto::DefaultActionName::Discard => "discard",
            }
            .into(),
            terminals: self.config.terminals.len(),
            neighbors: self.neighbors.len(),
            held_packets: up.and(self.dp.as_ref()).map(|d| d.held_packets),
            acquires: self.acquires,
            expires: self.expires.clone(),
            punts: self.punts,
            hold_dropped_packets: self.hold_dropped,
            acquired_sas: acquired,
            last_reload: self.last_reload.clone(),
            ike: {
                let c = self.proxy.counts();
                IkeStatus {
                    connections: self.proxy.connections().count(),
                    established: c.established,
                    connecting: c.connecting,
                }
            },
        }
    }

    fn sa_entries(&self) -> Vec<SaEntry> {
        let dp = self.link.up.as_ref().and(self.dp.as_ref());
        self.desired
            .sas
            .iter()
            .filter_map(|d| {
                let held = dp.and_then(|s| {
                    s.sas
                        .iter()
                        .find(|i| i.name == d.name && i.direction == d.direction)
                });
                let base = d
                    .spec
                    .as_ref()
                    .map(SaInfo::from_spec)
                    .or_else(|| d.adopted.clone())?;
                let fp = d.fingerprint();
                let state = match (dp, held) {
                    (None, _) => "unknown",
                    (Some(_), None) => "not_installed",
                    (Some(_), Some(h)) if Some(&h.fingerprint) != fp.as_ref() => "differs",
                    (Some(_), Some(h)) if h.expired => "expired",
                    (Some(_), Some(_)) => "installed",
                };
                let udp = d.spec.as_ref().filter(|s| s.encap == "udp");
                Some(SaEntry {
                    name: d.name.clone(),
                    direction: d.direction,
                    spi: base.spi,
                    spi_hex: format!("{:#010x}", base.spi),
                    mode: base.mode.clone(),
                    tunnel_src: base.tunnel_src,
                    tunnel_dst: base.tunnel_dst,
                    encap: base.encap.clone(),
                    udp_sport: udp.map(|s| s.udp_sport),
                    udp_dport: udp.map(|s| s.udp_dport),
                    aead: base.aead.clone(),
                    esn: base.esn,
                    replay_window: base.replay_window,
                    lifetime_packets: d.spec.as_ref().map(|s| s.lifetime_packets),
                    lifetime_bytes: d.spec.as_ref().map(|s| s.lifetime_bytes),
                    origin: d.origin.as_str().into(),
                    adopted: d.is_adopted(),
                    state: state.into(),
                    packets: held.map(|h| h.packets),
                    bytes: held.map(|h| h.bytes),
                    sequence: held.map(|h| h.sequence),
                    owner_worker: held.map(|h| h.owner_worker),
                    fingerprint: fp,
                    policy: base.policy.clone(),
                    rules: self.desired.rules_using(d.policy_name(), d.direction),
                    acquires: self.acquired.get(&d.key()).map_or(0, |r| r.count),
                })
            })
            .collect()
    }

    fn policy_list(&self) -> Vec<PolicyEntry> {
        let dp = self.link.up.as_ref().and(self.dp.as_ref());
        self.desired
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let s = &r.spec;
                let sa_installed = match (&s.sa, dp) {
                    (Some(sa), Some(st)) => Some(st.sas.iter().any(|x| {
                        // Inbound rules name SAs by policy name.
                        x.policy.as_deref().unwrap_or(&x.name) == sa
                            && x.direction == s.direction
                            && !x.expired
                    })),
                    _ => None,
                };
                PolicyEntry {
                    position: i + 1,
                    name: s.name.clone(),
                    direction: s.direction,
                    src: s.src.clone(),
                    dst: s.dst.clone(),
                    proto: s.proto.clone(),
                    sport: s.sport.clone(),
                    dport: s.dport.clone(),
                    action: s.action.clone(),
                    sa: s.sa.clone(),
                    origin: s.origin.as_str().into(),
                    adopted: r.adopted,
                    sa_installed,
                }
            })
            .collect()
    }

    fn terminals(&self) -> TerminalsInfo {
        let terminal_of = |ip: &IpAddr| {
            self.config
                .terminals
                .iter()
                .find(|t| t.address == *ip)
                .map(|t| t.name.clone())
        };
        let mut neighbors: Vec<NeighborEntry> = self
            .neighbors
            .iter()
            .map(|((port, ip), n)| NeighborEntry {
                port: port.as_str().into(),
                ip: *ip,
                mac: n.mac.clone(),
                first_seen_unix: n.first_seen_unix,
                last_seen_unix: n.last_seen_unix,
                terminal: terminal_of(ip),
            })
            .collect();
        neighbors.sort_by(|a, b| (&a.port, a.ip).cmp(&(&b.port, b.ip)));
        let ikes = self.proxy.list(Instant::now());
        let terminals = self
            .config
            .terminals
            .iter()
            .map(|t| {
                // Prefer where a terminal should be: inside.
                let seen = [PortName::Inside, PortName::Outside]
                    .iter()
                    .find_map(|p| self.neighbors.get(&(*p, t.address)).map(|n| (p, n)));
                TerminalEntry {
                    name: t.name.clone(),
                    address: t.address,
                    port: seen.map(|(p, _)| p.as_str().to_string()),
                    mac: seen.map(|(_, n)| n.mac.clone()),
                    last_seen_unix: seen.map(|(_, n)| n.last_seen_unix),
                    connections: self
                        .proxy
                        .connections()
                        .filter(|c| c.terminal == t.name)
                        .map(|c| TerminalConnection {
                            name: c.name.clone(),
                            ike: ike_state(&ikes, &c.name).into(),
                        })
                        .collect(),
                }
            })
            .collect();
        TerminalsInfo {
            terminals,
            neighbors,
        }
    }
}

/// A connection's IKE state for `terminals`: established when one of its IKE
/// SAs is, else connecting when one is being set up, else none.
fn ike_state(ikes: &[proxy::IkeSaInfo], connection: &str) -> &'static str {
    let mine = || ikes.iter().filter(|i| i.connection == connection);
    if mine().any(|i| i.state == "established") {
        "established"
    } else if mine().next().is_some() {
        "connecting"
    } else {
        "none"
    }
}

/// Updates the table view after a batch was applied.
fn patch(dp: &mut DataplaneState, plan: &Plan) {
    for c in &plan.batch.sas {
        match c {
            SaChange::Remove { name, direction } => dp
                .sas
                .retain(|s| !(s.name == *name && s.direction == *direction)),
            SaChange::Install(spec) => {
                dp.sas
                    .retain(|s| !(s.name == spec.name && s.direction == spec.direction));
                dp.sas.push(SaInfo::from_spec(spec));
            }
        }
    }
    if let Some(p) = &plan.batch.policy {
        dp.policy = Some(p.clone());
    }
    if let Some(a) = &plan.batch.punt_addrs {
        dp.punt_addrs = a.clone();
    }
}

/// What a reload cannot change without a restart.
fn restart_notes(old: &Config, new: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    let (o, n) = (&old.control, &new.control);
    let mut control = Vec::new();
    if o.socket != n.socket || o.tls != n.tls {
        control.push("socket/tls");
    }
    if o.admin_socket != n.admin_socket || o.admin_socket_mode != n.admin_socket_mode {
        control.push("admin_socket");
    }
    if o.metrics_listen != n.metrics_listen {
        control.push("metrics_listen");
    }
    if o.ping_interval != n.ping_interval || o.reconnect_interval != n.reconnect_interval {
        control.push("ping_interval/reconnect_interval");
    }
    if !control.is_empty() {
        notes.push(format!(
            "warning: [control] {} changed: that takes effect when bitw-control restarts",
            control.join(", ")
        ));
    }
    let mut dp_old = old.dataplane.clone();
    dp_old.default_action = new.dataplane.default_action;
    if dp_old != new.dataplane
        || old.eal != new.eal
        || old.inside != new.inside
        || old.outside != new.outside
    {
        notes.push(
            "warning: [eal], [ports] or [dataplane] settings changed: they take effect when bitw-dataplane restarts"
                .into(),
        );
    }
    notes
}
