//! The key exchange proxy: IKEv2 spoken *as* the terminals.
//!
//! The dataplane punts every IKE datagram to or from a terminal's address
//! (UDP 500, and 4500 with the non-ESP marker) instead of forwarding it, and
//! tells control when a terminal's packet hits a protect rule whose SA is
//! missing (an acquire). This module turns those into IKE SAs:
//!
//! - **responder**: an IKE_SA_INIT from a counterpart to a terminal's
//!   address starts an [`IkeSa`] of the connection that pairs the two; its
//!   answers leave from the terminal's address (the dataplane injects them on
//!   port `outside`), so the counterpart never learns the box exists;
//! - **initiator**: an acquire for a child's outbound SA (`connection/child`)
//!   starts IKE as the terminal, or a new Child SA in the IKE SA that is up;
//!   the held packets go out once the SA is installed, or are dropped
//!   (counted) when the negotiation fails.
//!
//! Established Child SAs become [`Change`]s for the daemon, which installs
//! them in the dataplane through its usual atomic batches; the daemon reports
//! back with [`Proxy::change_done`], which is when make-before-break rekeys
//! move on. One IKE SA per connection, i.e. per terminal and counterpart:
//! several terminals talking to one counterpart each have their own IKE SA,
//! with the terminal's own address and identity, as if each ran IKE itself.
//!
//! The module is I/O-free like the engine: it is fed punts, acquires, expire
//! events and time, and yields [`Action`]s. The daemon owns the clock and the
//! link.

mod identity;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitw_common::config::{Config, ConfigError};
use bitw_common::connection::{ChildMode as CfgMode, ConnAuth, Connection, StartAction};
use bitw_common::proto::{Acquire, ExpireReason, LimitsSpec, Origin, PortName, Punt, SaSpec};
use bitw_common::rules::Direction;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::ike::cookie::CookieJar;
use crate::ike::message::{ExchangeType, Header};
use crate::ike::proposal::{parse_proposals, Protocol};
use crate::ike::sa::{
    prefix_selector, Auth, ChildConfig, ChildMode, ChildSaEstablished, Config as IkeConfig,
    Datagram, Identity, IkeEvent, IkeSa, Psk, PubkeyAuth, Retransmit, SpiAllocator,
};
use crate::{debug, info};

pub use wire::{IKE_PORT, NAT_T_PORT};

/// Half-open responder SAs (IKE_SA_INIT answered, no IKE_AUTH yet) kept at
/// most; beyond this new IKE_SA_INIT requests are dropped (counted).
const MAX_HALF_OPEN: usize = 1024;
/// From this many half-open SAs on, an IKE_SA_INIT must carry a cookie
/// (RFC 7296 §2.6): a flood of spoofed requests then costs a hash each, not
/// a DH computation and state.
const COOKIE_THRESHOLD: usize = 64;
/// Rejected IKE datagrams are logged (info) at most once per reason in this
/// long; the lines left out are counted in the next one.
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What the daemon must do for the proxy.
#[derive(Debug)]
pub enum Action {
    /// Send this IP datagram out of a port (the dataplane adds Ethernet).
    Inject { port: PortName, packet: Vec<u8> },
    /// Change the dataplane's SAs; report with [`Proxy::change_done`].
    Change(Change),
    /// Negotiation for this outbound SA failed: drop its held packets.
    AcquireFailed { sa: String },
}

/// SAs to install (or replace, by name and direction) and remove at once.
#[derive(Debug)]
pub struct Change {
    pub id: u64,
    /// For logs and answers: "child `meter-hq/data` up (SPIs ...)".
    pub what: String,
    pub install: Vec<SaSpec>,
    pub remove: Vec<(String, Direction)>,
}

/// The IKE SAs, by state, for metrics and `bitwctl ike list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IkeCounts {
    pub connecting: usize,
    pub established: usize,
}

/// Counters the exporter shows.
#[derive(Debug, Clone, Default)]
pub struct ProxyStats {
    /// Handshakes (IKE SA set-up) by result: `ok`, or the failure reason.
    pub handshakes: BTreeMap<String, u64>,
    /// Set-up times of successful handshakes, seconds (drained by the exporter).
    pub handshake_seconds: Vec<f64>,
    /// Datagrams the proxy or an engine rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Our requests sent again after a timeout, all IKE SAs together.
    pub retransmits: u64,
    pub cookies_sent: u64,
    pub child_sas: BTreeMap<String, u64>,
}

/// One IKE SA as `bitwctl ike list` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IkeSaInfo {
    pub id: u64,
    pub connection: String,
    pub terminal: String,
    pub local: String,
    pub remote: String,
    pub state: String,
    pub initiator: bool,
    pub spi_i: String,
    pub spi_r: String,
    pub nat: bool,
    pub age_seconds: f64,
    pub children: Vec<ChildInfo>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChildInfo {
    pub name: String,
    pub inbound_spi: String,
    pub outbound_spi: String,
    pub aead: String,
    pub encap: bool,
    pub installed: bool,
    pub age_seconds: f64,
}

/// A connection ready to run: the config and the engine's version of it.
struct Conn {
    cfg: Connection,
    engine: IkeConfig,
}

/// A Child SA the proxy installed or is installing.
#[derive(Debug, Clone)]
struct ChildRec {
    /// The outbound SA's name, `connection/child`.
    name: String,
    inbound_spi: u32,
    outbound_spi: u32,
    aead: &'static str,
    encap: bool,
    installed: bool,
    since: Instant,
    /// A rekey the peer started: our outbound SA moves to this child only
    /// when the old one is deleted (the peer may not have the new inbound SA
    /// before that). The old child's inbound SPI and the outbound SA to install.
    successor_of: Option<(u32, Box<SaSpec>)>,
}

/// An IKE SA and what hangs off it.
struct Ike {
    conn: usize,
    sa: IkeSa,
    started: Instant,
    established: Option<Instant>,
    initiator: bool,
    /// Child SAs by inbound SPI.
    children: BTreeMap<u32, ChildRec>,
    /// Outbound SA names (`connection/child`) asked for (acquires, `start`)
    /// and not yet established.
    waiting: Vec<String>,
    /// Initiator: the child that IKE_AUTH sets up.
    auth_child: Option<String>,
    /// The (SPIi, SPIr) pairs the proxy routes to this IKE SA.
    routes: Vec<(u64, u64)>,
    /// Child SA installs under way: until the dataplane has them, what the
    /// engine sends waits in `held`, so the peer never uses (or stops using)
    /// an SA before bitw can (make-before-break; the answer that lets the
    /// peer send on a new SA, or the Delete of an old one, waits).
    installs_pending: usize,
    held: Vec<Datagram>,
}

/// What a pending [`Change`] does when the dataplane took it.
#[derive(Debug, Clone)]
enum AfterChange {
    ChildInstalled { ike: u64, inbound_spi: u32 },
    Nothing,
}

/// SPIs handed to the engines: random, never one an installed or pending
/// inbound SA already has (the dataplane refuses duplicates).
#[derive(Clone, Default)]
struct SharedSpis(Arc<Mutex<HashSet<u32>>>);

impl SpiAllocator for SharedSpis {
    fn ike_spi(&mut self) -> u64 {
        loop {
            let spi = OsRng.next_u64();
            if spi != 0 {
                return spi;
            }
        }
    }

    fn esp_spi(&mut self) -> u32 {
        let mut used = self.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let spi = OsRng.next_u32();
            if spi >= 256 && used.insert(spi) {
                return spi;
            }
        }
    }
}

/// Rate limit of the rejected-datagram log lines, per reason: hostile or
/// broken traffic shows without `--verbose` but cannot flood the log.
#[derive(Debug, Default)]
struct RejectLog(HashMap<&'static str, (Instant, u64)>);

impl RejectLog {
    /// Whether a line for `reason` may go at `now`: `Some(n)` with the `n`
    /// lines left out since the last one, else `None` (counted).
    fn admit(&mut self, now: Instant, reason: &'static str) -> Option<u64> {
        match self.0.get_mut(reason) {
            Some((last, left_out))
                if now.saturating_duration_since(*last) < REJECT_LOG_INTERVAL =>
            {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                *last = now;
                Some(std::mem::take(left_out))
            }
            None => {
                self.0.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

/// " (+N more since the last line)" when lines were left out.
fn left_out(n: u64) -> String {
    if n > 0 {
        format!(" (+{n} more since the last line)")
    } else {
        String::new()
    }
}

/// The proxy. See the module documentation.
pub struct Proxy {
    conns: Vec<Conn>,
    ikes: BTreeMap<u64, Ike>,
    next_ike: u64,
    /// (SPIi, SPIr) → IKE SA; an initiator's first pair has SPIr 0.
    routes: HashMap<(u64, u64), u64>,
    /// Responders until IKE_AUTH: (peer address, SPIi). Also the count of
    /// half-open SAs that cookies and the limit go by.
    half_open: HashMap<(IpAddr, u64), u64>,
    cookies: CookieJar,
    spis: SharedSpis,
    changes: BTreeMap<u64, AfterChange>,
    next_change: u64,
    actions: VecDeque<Action>,
    ip_id: u16,
    reject_log: RejectLog,
    pub stats: ProxyStats,
}

/// A connection's engine configuration, or the config error that stops it.
fn engine_config(config: &Config, i: usize, c: &Connection) -> Result<IkeConfig, ConfigError> {
    let field = |f: &str| format!("connection[{i}].{f}");
    let ike_proposals = parse_proposals(Protocol::Ike, &c.proposals.join(","))
        .map_err(|e| config.field_error(&field("proposals"), e.to_string()))?;
    let auth = match &c.auth {
        ConnAuth::Psk { psk, .. } => Auth::Psk(Psk::new(psk.to_vec())),
        ConnAuth::Pubkey {
            local_cert,
            local_key,
            ca_certs,
        } => {
            let pubkey = PubkeyAuth::load(local_cert, local_key, ca_certs).map_err(|e| {
                // The message names the file; point at the field that names it.
                let f = if e.contains(&local_key.display().to_string()) {
                    "local_key"
                } else if e.contains(&local_cert.display().to_string()) {
                    "local_cert"
                } else {
                    "ca_certs"
                };
                config.field_error(&field(f), e)
            })?;
            Auth::Pubkey(Arc::new(pubkey))
        }
    };
    let local_id = match (&auth, parse_identity(&c.local_id)) {
        // With a certificate, a DN identity is the certificate's subject as
        // the certificate encodes it (what the peer compares it with).
        (Auth::Pubkey(p), Ok(Identity::DerDn(_))) => Identity::DerDn(p.subject_der().to_vec()),
        (_, id) => id.map_err(|e| config.field_error(&field("local_id"), e))?,
    };
    let ts = |prefixes: &[bitw_common::rules::Prefix]| {
        prefixes
            .iter()
            .filter_map(|p| prefix_selector(p.addr, p.len))
            .collect::<Vec<_>>()
    };
    let mut children = Vec::new();
    for (j, child) in c.children.iter().enumerate() {
        let cfield = format!("connection[{i}].children[{j}].esp_proposals");
        let esp_proposals = parse_proposals(Protocol::Esp, &child.esp_proposals.join(","))
            .map_err(|e| config.field_error(&cfield, e.to_string()))?;
        children.push(ChildConfig {
            name: child.name.clone(),
            esp_proposals,
            local_ts: ts(&child.local_ts),
            remote_ts: ts(&child.remote_ts),
            mode: match child.mode {
                CfgMode::Tunnel => ChildMode::Tunnel,
                CfgMode::Transport => ChildMode::Transport,
            },
            rekey_time: child.rekey_time,
            life_time: child.life_time,
        });
    }
    Ok(IkeConfig {
        name: c.name.clone(),
        local_id,
        remote_id: parse_identity(&c.remote_id)
            .map_err(|e| config.field_error(&field("remote_id"), e))?,
        send_remote_id: true,
        send_initial_contact: true,
        auth,
        ike_proposals,
        children,
        ike_rekey_time: c.rekey_time,
        dpd_delay: c.dpd_delay,
        keepalive_interval: c.keepalive_interval,
        retransmit: Retransmit {
            timeout: c.retransmit_timeout,
            backoff: c.retransmit_base,
            tries: c.retransmit_tries,
        },
    })
}

pub use identity::parse_identity;

/// Checks every connection of `config` as the proxy would run it.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    for (i, c) in config.connections.iter().enumerate() {
        engine_config(config, i, c)?;
    }
    Ok(())
}

fn hex_key(keys: &crate::ike::crypto::EspKeys) -> Zeroizing<String> {
    Zeroizing::new(hex::encode(keys.encryption.as_bytes()))
}

impl Proxy {
    pub fn new(config: &Config) -> Result<Proxy, ConfigError> {
        let mut conns = Vec::new();
        for (i, c) in config.connections.iter().enumerate() {
            conns.push(Conn {
                engine: engine_config(config, i, c)?,
                cfg: c.clone(),
            });
        }
        Ok(Proxy {
            conns,
            ikes: BTreeMap::new(),
            next_ike: 1,
            routes: HashMap::new(),
            half_open: HashMap::new(),
            cookies: CookieJar::new(Instant::now(), Box::new(OsRng)),
            spis: SharedSpis::default(),
            changes: BTreeMap::new(),
            next_change: 1,
            actions: VecDeque::new(),
            ip_id: 1,
            reject_log: RejectLog::default(),
            stats: ProxyStats::default(),
        })
    }

    /// A reloaded configuration: connections that did not change keep
    /// their IKE SAs; the IKE SAs of changed or removed ones are deleted
    /// with the peer (a changed one negotiates again on traffic or `start`).
    pub fn reconfigure(&mut self, now: Instant, config: &Config) -> Result<(), ConfigError> {
        let fresh = Proxy::new(config)?;
        let mut remap = HashMap::new();
        for (old_i, old) in self.conns.iter().enumerate() {
            if let Some(new_i) = fresh.conns.iter().position(|n| n.cfg == old.cfg) {
                remap.insert(old_i, new_i);
            }
        }
        let gone: Vec<(u64, usize)> = self
            .ikes
            .iter()
            .filter(|(_, k)| !remap.contains_key(&k.conn))
            .map(|(id, k)| (*id, k.conn))
            .collect();
        for (id, conn) in gone {
            info!(
                "reload: connection `{}` changed or was removed: deleting IKE SA #{id}",
                self.conns[conn].cfg.name
            );
            if let Some(k) = self.ikes.get_mut(&id) {
                k.sa.delete(now);
            }
            self.drain(now, id);
            // Its Child SAs go now; the Delete needs no answer to matter.
            self.close(id, conn, "connection changed by a reload");
        }
        for ike in self.ikes.values_mut() {
            ike.conn = remap[&ike.conn];
        }
        self.conns = fresh.conns;
        self.link_up(now);
        Ok(())
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.conns.iter().map(|c| &c.cfg)
    }

    /// The next instant [`handle_timeout`](Proxy::handle_timeout) is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.ikes.values().filter_map(|i| i.sa.poll_timeout()).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .ikes
            .iter()
            .filter(|(_, i)| i.sa.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(ike) = self.ikes.get_mut(&id) {
                let before = ike.sa.stats().retransmits_sent;
                ike.sa.handle_timeout(now);
                self.stats.retransmits += ike.sa.stats().retransmits_sent - before;
            }
            self.drain(now, id);
        }
    }

    /// The dataplane (re)connected: connections with `start_action = start`
    /// that have no IKE SA start one.
    pub fn link_up(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            if self.conns[i].cfg.start_action == StartAction::Start
                && !self.ikes.values().any(|k| k.conn == i)
            {
                let all = self.conns[i]
                    .cfg
                    .children
                    .iter()
                    .map(|c| self.conns[i].cfg.child_sa_name(&c.name))
                    .collect();
                self.initiate(now, i, all);
            }
        }
    }

    /// The counts by state.
    pub fn counts(&self) -> IkeCounts {
        let mut c = IkeCounts::default();
        for i in self.ikes.values() {
            if i.sa.is_established() {
                c.established += 1;
            } else {
                c.connecting += 1;
            }
        }
        c
    }

    // ---- inputs ----

    /// An IKE datagram the dataplane punted.
    pub fn punt(&mut self, now: Instant, p: &Punt) {
        if p.port != PortName::Outside {
            // A terminal doing IKE itself: it is not for us to answer, and
            // forwarding it would let it bypass the box.
            return self.reject(
                now,
                "from_inside",
                format!(
                    "IKE from {} on port inside ignored (the terminal runs no IKE through bitw)",
                    p.src
                ),
            );
        }
        let src = SocketAddr::new(p.src, p.sport);
        let dst = SocketAddr::new(p.dst, p.dport);
        let bytes = &p.payload.0;
        if bytes == &wire::KEEPALIVE {
            return; // a peer's NAT-T keepalive
        }
        let header = match Header::decode(bytes) {
            Ok(h) => h,
            Err(e) => return self.reject(now, "malformed", format!("from {src}: {e}")),
        };
        let datagram = Datagram {
            src,
            dst,
            payload: bytes.clone(),
        };
        // The SPI pair names the IKE SA; the answer to our IKE_SA_INIT carries
        // the responder's new SPI, and a retransmitted IKE_SA_INIT none yet.
        let known = self
            .routes
            .get(&(header.spi_i, header.spi_r))
            .or_else(|| self.routes.get(&(header.spi_i, 0)))
            .copied()
            .or_else(|| {
                (header.spi_r == 0)
                    .then(|| self.half_open.get(&(p.src, header.spi_i)).copied())
                    .flatten()
            });
        if let Some(id) = known {
            if let Some(ike) = self.ikes.get_mut(&id) {
                ike.sa.handle(now, datagram);
            }
            return self.drain(now, id);
        }
        if header.exchange != ExchangeType::IKE_SA_INIT
            || header.spi_r != 0
            || header.flags.is_response()
        {
            return self.reject(
                now,
                "unknown_spi",
                format!(
                    "{:?} from {src} to {dst} for IKE SPIs {:016x}/{:016x}: no such IKE SA",
                    header.exchange, header.spi_i, header.spi_r
                ),
            );
        }
        let Some(conn) = self.conn_for(p.dst, p.src) else {
            return self.reject(
                now,
                "no_connection",
                format!(
                    "IKE_SA_INIT from {src} to {dst}: no connection pairs terminal {} with {}",
                    p.dst, p.src
                ),
            );
        };
        // Responders that answered IKE_SA_INIT and wait for IKE_AUTH.
        let half_open = self.half_open.len();
        if half_open >= MAX_HALF_OPEN {
            return self.reject(
                now,
                "half_open_full",
                format!("IKE_SA_INIT from {src}: {MAX_HALF_OPEN} half-open IKE SAs already"),
            );
        }
        if half_open >= COOKIE_THRESHOLD {
            if let Err(reply) = self.cookies.check(now, &datagram) {
                self.stats.cookies_sent += 1;
                debug!(
                    "IKE_SA_INIT from {src}: {half_open} half-open IKE SAs, answered with a COOKIE"
                );
                return self.transmit(&reply);
            }
        }
        let sa = IkeSa::responder(
            self.conns[conn].engine.clone(),
            dst,
            src,
            Box::new(OsRng),
            Box::new(self.spis.clone()),
        );
        let id = self.add(now, conn, sa, false);
        self.half_open.insert((p.src, header.spi_i), id);
        if let Some(ike) = self.ikes.get_mut(&id) {
            ike.sa.handle(now, datagram);
        }
        self.drain(now, id);
    }

    /// A terminal's packet hit a child's protect rule with no SA. `false`
    /// when the SA is not one of the proxy's (the daemon handles it).
    pub fn acquire(&mut self, now: Instant, a: &Acquire) -> bool {
        if a.direction != Direction::Out {
            return false;
        }
        let Some((conn, child)) = self.child_of(&a.sa) else {
            return false;
        };
        if self.conns[conn].cfg.start_action == StartAction::None {
            info!(
                "acquire for `{}`: connection `{}` has start_action = none: waiting for the counterpart to initiate; the held packets are dropped",
                a.sa, self.conns[conn].cfg.name
            );
            self.actions
                .push_back(Action::AcquireFailed { sa: a.sa.clone() });
            return true;
        }
        // An IKE SA of this connection, up or under way, takes the child.
        if let Some(id) = self.ike_of(conn) {
            let ike = self.ikes.get_mut(&id).expect("ike_of gives a live id");
            let known =
                ike.waiting.contains(&a.sa) || ike.children.values().any(|c| c.name == a.sa);
            if !known {
                ike.waiting.push(a.sa.clone());
                if ike.sa.is_established() {
                    info!(
                        "acquire for `{}` ({} -> {}): a new Child SA in IKE SA #{id}",
                        a.sa, a.src, a.dst
                    );
                    let name = self.conns[conn].cfg.children[child].name.clone();
                    ike.sa.create_child(now, &name);
                    self.drain(now, id);
                }
            }
            return true;
        }
        info!(
            "acquire for `{}` ({} -> {}): initiating connection `{}` as terminal `{}`",
            a.sa, a.src, a.dst, self.conns[conn].cfg.name, self.conns[conn].cfg.terminal
        );
        self.initiate(now, conn, vec![a.sa.clone()]);
        true
    }

    /// The dataplane reports an SA at a lifetime limit.
    pub fn expire(
        &mut self,
        now: Instant,
        sa: &str,
        direction: Direction,
        spi: u32,
        reason: ExpireReason,
    ) {
        // The child whose SA it is: the outbound SA by name (the newest
        // child of that name has it), an inbound one by its SPI.
        let found = self.ikes.iter().find_map(|(id, k)| {
            k.children
                .values()
                .filter(|c| match direction {
                    Direction::Out => c.name == sa && c.outbound_spi == spi,
                    Direction::In => c.inbound_spi == spi,
                })
                .map(|c| (*id, c.inbound_spi))
                .next()
        });
        let Some((id, inbound_spi)) = found else {
            return;
        };
        let ike = self.ikes.get_mut(&id).expect("found above");
        match reason {
            ExpireReason::SoftLifetime => {
                info!("SA `{sa}` ({}) reached its soft lifetime: rekeying its Child SA in IKE SA #{id}", direction.as_str());
                ike.sa.rekey_child(now, inbound_spi);
            }
            ExpireReason::HardLifetime | ExpireReason::SequenceExhausted => {
                info!(
                    "SA `{sa}` ({}) expired in the dataplane: deleting its Child SA with the peer",
                    direction.as_str()
                );
                ike.sa.delete_child(now, inbound_spi);
            }
        }
        self.drain(now, id);
    }

    /// The daemon applied (or failed to apply) a [`Change`].
    pub fn change_done(&mut self, now: Instant, id: u64, ok: bool) {
        let Some(after) = self.changes.remove(&id) else {
            return;
        };
        match after {
            AfterChange::ChildInstalled { ike, inbound_spi } => {
                if let Some(i) = self.ikes.get_mut(&ike) {
                    if let Some(c) = i.children.get_mut(&inbound_spi) {
                        c.installed = ok;
                    }
                    i.installs_pending = i.installs_pending.saturating_sub(1);
                    if i.installs_pending == 0 {
                        for d in std::mem::take(&mut i.held) {
                            self.transmit(&d);
                        }
                    }
                }
                if !ok {
                    // The dataplane refused the SA: tell the peer it is gone.
                    if let Some(i) = self.ikes.get_mut(&ike) {
                        i.sa.delete_child(now, inbound_spi);
                    }
                    self.drain(now, ike);
                }
            }
            AfterChange::Nothing => {}
        }
    }

    // ---- admin ----

    /// `bitwctl ike initiate CONNECTION`.
    pub fn admin_initiate(&mut self, now: Instant, name: &str) -> Result<String, String> {
        let conn = self
            .conns
            .iter()
            .position(|c| c.cfg.name == name)
            .ok_or_else(|| format!("no connection named `{name}`"))?;
        if let Some((id, ike)) = self.ikes.iter().find(|(_, k)| k.conn == conn) {
            return Err(format!(
                "connection `{name}` has IKE SA #{id} already ({})",
                if ike.sa.is_established() {
                    "established"
                } else {
                    "connecting"
                }
            ));
        }
        let all = self.conns[conn]
            .cfg
            .children
            .iter()
            .map(|c| self.conns[conn].cfg.child_sa_name(&c.name))
            .collect();
        let id = self.initiate(now, conn, all);
        Ok(format!("initiating connection `{name}` (IKE SA #{id})"))
    }

    /// `bitwctl ike terminate CONNECTION|ID`: deletes the IKE SA(s) with
    /// the peer; their Child SAs leave the dataplane.
    pub fn admin_terminate(&mut self, now: Instant, what: &str) -> Result<String, String> {
        let ids: Vec<u64> = self
            .ikes
            .iter()
            .filter(|(id, k)| {
                self.conns[k.conn].cfg.name == what || what.parse::<u64>().ok() == Some(**id)
            })
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return Err(format!("no IKE SA of connection or with id `{what}`"));
        }
        for id in &ids {
            if let Some(ike) = self.ikes.get_mut(id) {
                if !ike.sa.delete(now) {
                    // Not established: nothing to tell the peer.
                    let conn = ike.conn;
                    self.close(*id, conn, "terminated by the administrator");
                    continue;
                }
            }
            self.drain(now, *id);
        }
        Ok(format!(
            "deleting {} IKE SA(s): {}",
            ids.len(),
            ids.iter()
                .map(|i| format!("#{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// `bitwctl ike list`.
    pub fn list(&self, now: Instant) -> Vec<IkeSaInfo> {
        self.ikes
            .iter()
            .map(|(id, k)| {
                let (local, remote) = k.sa.addresses();
                let (spi_i, spi_r) = k.sa.spis();
                let cfg = &self.conns[k.conn].cfg;
                IkeSaInfo {
                    id: *id,
                    connection: cfg.name.clone(),
                    terminal: cfg.terminal.clone(),
                    local: local.to_string(),
                    remote: remote.to_string(),
                    state: if k.sa.is_established() {
                        "established".into()
                    } else {
                        "connecting".into()
                    },
                    initiator: k.initiator,
                    spi_i: format!("{spi_i:016x}"),
                    spi_r: format!("{spi_r:016x}"),
                    nat: k.sa.nat_detected(),
                    age_seconds: now
                        .saturating_duration_since(k.established.unwrap_or(k.started))
                        .as_secs_f64(),
                    children: k
                        .children
                        .values()
                        .map(|c| ChildInfo {
                            name: c.name.clone(),
                            inbound_spi: format!("{:08x}", c.inbound_spi),
                            outbound_spi: format!("{:08x}", c.outbound_spi),
                            aead: c.aead.into(),
                            encap: c.encap,
                            installed: c.installed,
                            age_seconds: now.saturating_duration_since(c.since).as_secs_f64(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    // ---- internals ----

    fn reject(&mut self, now: Instant, reason: &'static str, detail: String) {
        *self.stats.rejected.entry(reason.to_string()).or_default() += 1;
        if let Some(n) = self.reject_log.admit(now, reason) {
            info!("IKE datagram rejected ({reason}): {detail}{}", left_out(n));
        }
    }

    /// The connection that pairs `terminal` with `peer`.
    fn conn_for(&self, terminal: IpAddr, peer: IpAddr) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.cfg.terminal_address == terminal && c.cfg.remote_addrs.contains(&peer))
    }

    /// The connection and child an outbound SA name (`connection/child`) belongs to.
    fn child_of(&self, sa: &str) -> Option<(usize, usize)> {
        let (conn, child) = sa.split_once('/')?;
        let i = self.conns.iter().position(|c| c.cfg.name == conn)?;
        let j = self.conns[i]
            .cfg
            .children
            .iter()
            .position(|c| c.name == child)?;
        Some((i, j))
    }

    /// The connection's IKE SA: the established one, else one being set up.
    fn ike_of(&self, conn: usize) -> Option<u64> {
        let mine = || self.ikes.iter().filter(move |(_, k)| k.conn == conn);
        mine()
            .find(|(_, k)| k.sa.is_established())
            .or_else(|| mine().next())
            .map(|(id, _)| *id)
    }

    fn add(&mut self, now: Instant, conn: usize, sa: IkeSa, initiator: bool) -> u64 {
        let id = self.next_ike;
        self.next_ike += 1;
        self.ikes.insert(
            id,
            Ike {
                conn,
                sa,
                started: now,
                established: None,
                initiator,
                children: BTreeMap::new(),
                waiting: Vec::new(),
                auth_child: None,
                routes: Vec::new(),
                installs_pending: 0,
                held: Vec::new(),
            },
        );
        id
    }

    /// Starts IKE as the terminal; `waiting` names the outbound SAs wanted
    /// (the first goes into IKE_AUTH, the others follow as CREATE_CHILD_SA).
    fn initiate(&mut self, now: Instant, conn: usize, waiting: Vec<String>) -> u64 {
        let c = &self.conns[conn];
        let first = waiting
            .first()
            .and_then(|w| w.split_once('/'))
            .map(|(_, child)| child.to_string())
            .unwrap_or_else(|| c.cfg.children[0].name.clone());
        let local = SocketAddr::new(c.cfg.terminal_address, IKE_PORT);
        let remote = SocketAddr::new(c.cfg.remote_addrs[0], IKE_PORT);
        let sa = IkeSa::initiate(
            now,
            c.engine.clone(),
            &first,
            local,
            remote,
            Box::new(OsRng),
            Box::new(self.spis.clone()),
        );
        let auth_child = c.cfg.child_sa_name(&first);
        let id = self.add(now, conn, sa, true);
        if let Some(ike) = self.ikes.get_mut(&id) {
            ike.waiting = waiting;
            if !ike.waiting.contains(&auth_child) {
                ike.waiting.insert(0, auth_child.clone());
            }
            ike.auth_child = Some(auth_child);
        }
        self.drain(now, id);
        id
    }

    /// Keeps the routes to an IKE SA in line with the SPI pairs it answers
    /// to (a rekey adds one; the old one goes with its Delete).
    fn update_routes(&mut self, id: u64) {
        let Some(ike) = self.ikes.get_mut(&id) else {
            return;
        };
        let mut now_routes: Vec<(u64, u64)> = ike.sa.all_spis();
        let (spi_i, spi_r) = ike.sa.spis();
        if ike.initiator && spi_r == 0 && spi_i != 0 {
            now_routes.push((spi_i, 0));
        }
        now_routes.retain(|(i, r)| *i != 0 || *r != 0);
        if now_routes == ike.routes {
            return;
        }
        for r in ike.routes.iter().filter(|r| !now_routes.contains(r)) {
            if self.routes.get(r) == Some(&id) {
                self.routes.remove(r);
            }
        }
        for r in &now_routes {
            self.routes.insert(*r, id);
        }
        // A responder stays in `half_open` until IKE_AUTH: a repeated
        // IKE_SA_INIT (our answer was lost) still carries SPIr 0 and must
        // reach it, to be answered again from its cache.
        if ike.established.is_some() {
            self.half_open.retain(|_, v| *v != id);
        }
        ike.routes = now_routes;
    }

    /// Acts on an IKE SA's events, then sends what it wants sent (events
    /// first: a Child SA being installed holds the datagrams back).
    fn drain(&mut self, now: Instant, id: u64) {
        loop {
            let Some(ike) = self.ikes.get_mut(&id) else {
                return;
            };
            if let Some(ev) = ike.sa.poll_event() {
                self.event(now, id, ev);
                continue;
            }
            let Some(d) = ike.sa.poll_transmit() else {
                break;
            };
            if ike.installs_pending > 0 {
                ike.held.push(d);
            } else {
                self.transmit(&d);
            }
        }
        self.update_routes(id);
        let closed = self.ikes.get(&id).is_some_and(|k| k.sa.is_closed());
        if closed {
            let conn = self.ikes[&id].conn;
            self.close(id, conn, "closed");
        }
    }

    fn transmit(&mut self, d: &Datagram) {
        let payload = wire::udp_payload(d.src, d.dst, &d.payload);
        self.ip_id = self.ip_id.wrapping_add(1);
        match wire::udp_datagram(d.src, d.dst, &payload, self.ip_id) {
            Some(packet) => self.actions.push_back(Action::Inject {
                port: PortName::Outside,
                packet,
            }),
            None => info!(
                "cannot send IKE from {} to {}: {} bytes",
                d.src,
                d.dst,
                payload.len()
            ),
        }
    }

    fn event(&mut self, now: Instant, id: u64, ev: IkeEvent) {
        let Some(ike) = self.ikes.get_mut(&id) else {
            return;
        };
        let conn = ike.conn;
        let name = self.conns[conn].cfg.name.clone();
        match ev {
            IkeEvent::IkeSaEstablished {
                local_id,
                remote_id,
                suite,
                spi_i,
                spi_r,
                initiator,
                local,
                remote,
                nat_detected,
                initial_contact,
            } => {
                ike.established = Some(now);
                let took = now.saturating_duration_since(ike.started);
                *self.stats.handshakes.entry("ok".into()).or_default() += 1;
                self.stats.handshake_seconds.push(took.as_secs_f64());
                let suite = [
                    Some(suite.encryption.name()),
                    suite.integrity.map(|i| i.name()),
                    Some(suite.prf.name()),
                    Some(suite.dh.name()),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("-");
                info!(
                    "IKE SA #{id} of connection `{name}` established as {} ({local} [{local_id}] <-> {remote} [{remote_id}]), {suite}, SPIs {spi_i:016x}_i {spi_r:016x}_r{}, in {:.1} ms",
                    if initiator { "initiator" } else { "responder" },
                    if nat_detected { ", NAT-T (ESP in UDP 4500)" } else { "" },
                    took.as_secs_f64() * 1e3
                );
                // Children asked for besides the one IKE_AUTH carries.
                let more: Vec<String> = ike
                    .waiting
                    .iter()
                    .filter(|w| Some(*w) != ike.auth_child.as_ref())
                    .filter_map(|w| w.split_once('/').map(|(_, c)| c.to_string()))
                    .collect();
                for child in more {
                    ike.sa.create_child(now, &child);
                }
                if initial_contact {
                    self.initial_contact(id, conn);
                }
            }
            IkeEvent::ChildSaEstablished(child) => self.child_up(now, id, child),
            IkeEvent::ChildSaFailed {
                name: child,
                reason,
            } => {
                info!("IKE SA #{id} (`{name}`): Child SA `{child}` refused: {reason}");
                *self
                    .stats
                    .child_sas
                    .entry(format!("failed_{reason}"))
                    .or_default() += 1;
                let sa = format!("{name}/{child}");
                if let Some(pos) = ike.waiting.iter().position(|w| *w == sa) {
                    ike.waiting.remove(pos);
                    self.actions.push_back(Action::AcquireFailed { sa });
                }
            }
            IkeEvent::ChildSaDeleted {
                name: child,
                inbound_spi,
                outbound_spi,
            } => {
                info!(
                    "IKE SA #{id} (`{name}`): Child SA `{name}/{child}` deleted (SPIs {inbound_spi:08x}_i {outbound_spi:08x}_o)"
                );
                if let Some(rec) = ike.children.remove(&inbound_spi) {
                    self.remove_child(id, &rec);
                }
            }
            IkeEvent::IkeSaRekeyed { old_spis, new_spis } => {
                *self
                    .stats
                    .child_sas
                    .entry("ike_rekeyed".into())
                    .or_default() += 1;
                info!(
                    "IKE SA #{id} of connection `{name}` rekeyed: SPIs {:016x}_i {:016x}_r -> {:016x}_i {:016x}_r",
                    old_spis.0, old_spis.1, new_spis.0, new_spis.1
                );
            }
            IkeEvent::Rejected { reason, detail } => {
                *self.stats.rejected.entry(reason.to_string()).or_default() += 1;
                if let Some(n) = self.reject_log.admit(now, reason) {
                    info!(
                        "IKE SA #{id} (`{name}`) rejected a datagram ({reason}): {detail}{}",
                        left_out(n)
                    );
                }
            }
            IkeEvent::Failed { reason, detail } => {
                if ike.established.is_none() {
                    *self.stats.handshakes.entry(reason.to_string()).or_default() += 1;
                }
                info!("IKE SA #{id} of connection `{name}` failed ({reason}): {detail}");
            }
            IkeEvent::Deleted => info!("IKE SA #{id} of connection `{name}` deleted"),
        }
    }

    /// The peer holds no other IKE SA with this terminal: older ones of the
    /// connection are stale (RFC 7296 §2.4).
    fn initial_contact(&mut self, id: u64, conn: usize) {
        let stale: Vec<u64> = self
            .ikes
            .iter()
            .filter(|(other, k)| **other != id && k.conn == conn && k.established.is_some())
            .map(|(other, _)| *other)
            .collect();
        for s in stale {
            info!("IKE SA #{s}: the peer sent INITIAL_CONTACT on #{id}, so #{s} is stale and goes");
            self.close(s, conn, "replaced after INITIAL_CONTACT");
        }
    }

    fn child_up(&mut self, now: Instant, id: u64, child: ChildSaEstablished) {
        let Some(ike) = self.ikes.get_mut(&id) else {
            return;
        };
        let conn = ike.conn;
        let cfg = &self.conns[conn].cfg;
        let Some(cchild) = cfg.children.iter().find(|c| c.name == child.name) else {
            info!(
                "IKE SA #{id}: a Child SA of unknown config `{}` ignored",
                child.name
            );
            return;
        };
        let out_name = cfg.child_sa_name(&cchild.name);
        let local = child.local.ip();
        let remote = child.remote.ip();
        let (encap, sport, dport) = match child.udp_encap {
            Some(u) => ("udp", u.local_port, u.remote_port),
            None => ("none", NAT_T_PORT, NAT_T_PORT),
        };
        let mode = match child.mode {
            ChildMode::Tunnel => "tunnel",
            ChildMode::Transport => "transport",
        };
        let tunnel = child.mode == ChildMode::Tunnel;
        let limits = |soft: u64, hard: u64| LimitsSpec { soft, hard };
        let out = SaSpec {
            name: out_name.clone(),
            direction: Direction::Out,
            spi: child.outbound_spi,
            mode: mode.into(),
            tunnel_src: tunnel.then_some(local),
            tunnel_dst: tunnel.then_some(remote),
            encap: encap.into(),
            udp_sport: sport,
            udp_dport: dport,
            aead: child.aead.name().into(),
            key: hex_key(&child.outbound_keys),
            esn: child.esn,
            replay_window: 0,
            lifetime_packets: limits(cchild.rekey_packets, cchild.life_packets),
            lifetime_bytes: limits(cchild.rekey_bytes, cchild.life_bytes),
            origin: Origin::Ike,
            policy: None,
        };
        // The inbound SA mirrors the outbound one.
        let inb = SaSpec {
            name: inbound_sa_name(&out_name, child.inbound_spi),
            direction: Direction::In,
            spi: child.inbound_spi,
            tunnel_src: out.tunnel_dst,
            tunnel_dst: out.tunnel_src,
            // Inbound ESP-in-UDP is recognised by its destination port: ours.
            udp_sport: dport,
            udp_dport: sport,
            key: hex_key(&child.inbound_keys),
            replay_window: cchild.replay_window,
            // The child's inbound rules name `connection/child`: every inbound
            // SA of the child (old and new during a rekey) passes them.
            policy: Some(out_name.clone()),
            ..out.clone()
        };
        info!(
            "IKE SA #{id}: Child SA `{out_name}` up: {mode}, {}, SPIs {:08x}_i {:08x}_o{}{}",
            child.aead.name(),
            child.inbound_spi,
            child.outbound_spi,
            if child.udp_encap.is_some() {
                ", ESP in UDP"
            } else {
                ""
            },
            match child.rekeys {
                Some(old) => format!(
                    ", rekeying {old:08x}_i ({} started it)",
                    if child.initiated { "we" } else { "the peer" }
                ),
                None => String::new(),
            }
        );
        *self
            .stats
            .child_sas
            .entry(
                if child.rekeys.is_some() {
                    "rekeyed"
                } else {
                    "established"
                }
                .into(),
            )
            .or_default() += 1;
        // Make-before-break: the new inbound SA goes in at once; the outbound
        // SA moves now if we started the rekey (the peer answered, so it has
        // the new inbound SA), else when the peer deletes the old SA.
        let (install, successor_of) = match child.rekeys {
            Some(old) if !child.initiated => (vec![inb], Some((old, Box::new(out)))),
            _ => (vec![inb, out], None),
        };
        // Simultaneous rekeys (RFC 7296 §2.8.1): ours won, so a rekey of the
        // same old SA the peer started lost; the peer deletes it, and its
        // outbound SA must not take over when the old SA goes.
        if let (Some(old), true) = (child.rekeys, child.initiated) {
            for rec in ike.children.values_mut() {
                if rec.successor_of.as_ref().is_some_and(|(o, _)| *o == old) {
                    debug!(
                        "IKE SA #{id}: Child SA {:08x}_i lost simultaneous rekeys to {:08x}_i",
                        rec.inbound_spi, child.inbound_spi
                    );
                    rec.successor_of = None;
                }
            }
        }
        ike.children.insert(
            child.inbound_spi,
            ChildRec {
                name: out_name.clone(),
                inbound_spi: child.inbound_spi,
                outbound_spi: child.outbound_spi,
                aead: child.aead.name(),
                encap: child.udp_encap.is_some(),
                installed: false,
                since: now,
                successor_of,
            },
        );
        ike.waiting.retain(|w| *w != out_name);
        ike.installs_pending += 1;
        let change = self.next_change;
        self.next_change += 1;
        self.changes.insert(
            change,
            AfterChange::ChildInstalled {
                ike: id,
                inbound_spi: child.inbound_spi,
            },
        );
        self.actions.push_back(Action::Change(Change {
            id: change,
            what: format!(
                "Child SA `{out_name}` of IKE SA #{id} (SPIs {:08x}_i {:08x}_o)",
                child.inbound_spi, child.outbound_spi
            ),
            install,
            remove: vec![],
        }));
    }

    /// Takes a Child SA's SAs out of the dataplane. Its outbound SA goes
    /// only if no other child of the same name has taken it over; a rekey's
    /// successor waiting for this deletion gets the outbound SA now.
    fn remove_child(&mut self, id: u64, rec: &ChildRec) {
        self.spis
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&rec.inbound_spi);
        let mut remove = vec![(inbound_sa_name(&rec.name, rec.inbound_spi), Direction::In)];
        let mut install = Vec::new();
        let successor = self
            .ikes
            .values_mut()
            .flat_map(|k| k.children.values_mut())
            .find(|c| {
                c.successor_of
                    .as_ref()
                    .is_some_and(|(old, _)| *old == rec.inbound_spi)
            });
        if let Some(next) = successor {
            if let Some((_, out)) = next.successor_of.take() {
                install.push(*out);
            }
        } else {
            let others = self
                .ikes
                .values()
                .flat_map(|k| k.children.values())
                .any(|c| c.name == rec.name && c.inbound_spi != rec.inbound_spi);
            if !others {
                remove.push((rec.name.clone(), Direction::Out));
            }
        }
        let change = self.next_change;
        self.next_change += 1;
        self.changes.insert(change, AfterChange::Nothing);
        self.actions.push_back(Action::Change(Change {
            id: change,
            what: format!(
                "Child SA `{}` of IKE SA #{id} gone (SPI {:08x}_i)",
                rec.name, rec.inbound_spi
            ),
            install,
            remove,
        }));
    }

    /// Forgets an IKE SA; its Child SAs leave the dataplane, and acquires
    /// waiting on it fail.
    fn close(&mut self, id: u64, conn: usize, why: &str) {
        let Some(ike) = self.ikes.remove(&id) else {
            return;
        };
        debug!(
            "IKE SA #{id} of connection `{}` removed: {why}",
            self.conns[conn].cfg.name
        );
        for r in &ike.routes {
            if self.routes.get(r) == Some(&id) {
                self.routes.remove(r);
            }
        }
        self.half_open.retain(|_, v| *v != id);
        for rec in ike.children.values() {
            self.remove_child(id, rec);
        }
        for sa in ike.waiting {
            self.actions.push_back(Action::AcquireFailed { sa });
        }
    }
}

/// Inbound SAs are named by their SPI: during a rekey two of them live side
/// by side (under the policy name `connection/child`).
pub fn inbound_sa_name(out_name: &str, spi: u32) -> String {
    format!("{out_name}/{spi:08x}")
}

#[cfg(test)]
mod tests;
