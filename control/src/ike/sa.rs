//! One IKE SA as a state machine without I/O (RFC 7296): IKE_SA_INIT and
//! IKE_AUTH with a pre-shared key or with certificates ([`Auth`]; what is
//! sent and checked: [`super::auth`]) and the first Child SA (ESP, AEAD,
//! tunnel or transport mode), then CREATE_CHILD_SA for Child SAs (new or rekeyed,
//! with optional PFS; both ends), and INFORMATIONAL liveness checks and
//! deletes (both ends). Rekeying the IKE SA itself is not implemented: a
//! peer's request gets NO_ADDITIONAL_SAS.
//!
//! The engine is driven as quinn-proto drives a connection:
//!
//! - inputs: [`IkeSa::handle`] with `(now, Datagram)` for every IKE message
//!   the I/O layer routes to this SA (non-ESP marker already removed), and
//!   [`IkeSa::handle_timeout`] when [`IkeSa::poll_timeout`]'s instant passes;
//! - outputs: [`IkeSa::poll_transmit`] (datagrams with the addresses to send
//!   from and to: the engine answers from the address a request was sent
//!   to, because bitw speaks as the terminal, and moves to port 4500 after
//!   NAT detection; the I/O layer adds the non-ESP marker there),
//!   [`IkeSa::poll_event`] ([`IkeEvent`]: SAs established, deleted, failed)
//!   and [`IkeSa::stats`] (every rejected datagram, by reason).
//!
//! A responder starts with [`IkeSa::responder`] and its first datagram (the
//! IKE_SA_INIT request); an initiator with [`IkeSa::initiate`], which queues
//! the IKE_SA_INIT request. Randomness (nonces, DH values, AEAD IV starts)
//! and SPIs are injected ([`SpiAllocator`]), so tests run deterministically.
//!
//! Nothing a peer sends can make the engine panic: every datagram is checked
//! by the message decoder, SK payloads are opened before their content is
//! believed, and a rejected datagram leaves the state as it was (apart from
//! the counter that records why).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bitw_common::sa_params::{AeadAlg, NAT_T_PORT_DEFAULT};
use rand_core::CryptoRngCore;

use crate::ike::auth;
use crate::ike::crypto::{self, ChildSaKeyLengths, EspKeys, IkeSaKeys, IvSource, SkCipher};
use crate::ike::dh::{self, KeyPair};
use crate::ike::message::{
    decode_payload_chain, nat_detection_hash, AddressRange, AuthMethod, AuthPayload, CertPayload,
    DeletePayload, ExchangeType, Header, IdPayload, IdType, KePayload, Message, MessageView,
    NotifyPayload, NotifyType, Payload, PayloadType, PayloadsExt, ProtocolId, TrafficSelector,
    TsPayload, TsRange,
};
use crate::ike::proposal::{self, accept_reply, offer, select, DhMode, Proposal};

/// Nonce length we send (RFC 7296 §2.10: at least half the PRF's key size,
/// at least 128 bits; 32 octets covers every PRF bitw offers).
const OUR_NONCE_LEN: usize = 32;
/// The nonce lengths RFC 7296 §3.9 allows a peer.
const NONCE_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=256;
/// The longest retransmission interval, whatever the back-off says.
const MAX_RETRANSMIT_INTERVAL: Duration = Duration::from_secs(120);
/// How long a responder waits for IKE_AUTH after answering IKE_SA_INIT
/// before it drops the half-open SA (and its DH secret).
pub const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an initiator follows a COOKIE request before giving up.
const MAX_COOKIE_ROUNDS: u8 = 2;

// ------------------------------------------------------------------ config

/// An identity (RFC 7296 §3.5): what we send as IDi/IDr and what the peer's
/// must be. Compared by type and data exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
    Fqdn(String),
    /// An e-mail style identity (ID_RFC822_ADDR).
    Rfc822(String),
    /// A distinguished name as DER (ID_DER_ASN1_DN).
    DerDn(Vec<u8>),
    /// Any other type, raw (what a peer may send us).
    Other {
        id_type: IdType,
        data: Vec<u8>,
    },
}

impl Identity {
    /// The ID payload carrying this identity.
    pub fn to_payload(&self) -> IdPayload {
        let (id_type, data) = match self {
            Identity::Ipv4(a) => (IdType::IPV4_ADDR, a.octets().to_vec()),
            Identity::Ipv6(a) => (IdType::IPV6_ADDR, a.octets().to_vec()),
            Identity::Fqdn(s) => (IdType::FQDN, s.as_bytes().to_vec()),
            Identity::Rfc822(s) => (IdType::RFC822_ADDR, s.as_bytes().to_vec()),
            Identity::DerDn(der) => (IdType::DER_ASN1_DN, der.clone()),
            Identity::Other { id_type, data } => (*id_type, data.clone()),
        };
        IdPayload { id_type, data }
    }

    /// The identity an ID payload names.
    pub fn from_payload(id: &IdPayload) -> Identity {
        let text = || String::from_utf8(id.data.clone()).ok();
        let parsed = match id.id_type {
            IdType::IPV4_ADDR | IdType::IPV6_ADDR => id.ip_addr().map(|a| match a {
                IpAddr::V4(a) => Identity::Ipv4(a),
                IpAddr::V6(a) => Identity::Ipv6(a),
            }),
            IdType::FQDN => text().map(Identity::Fqdn),
            IdType::RFC822_ADDR => text().map(Identity::Rfc822),
            IdType::DER_ASN1_DN => Some(Identity::DerDn(id.data.clone())),
            _ => None,
        };
        parsed.unwrap_or_else(|| Identity::Other {
            id_type: id.id_type,
            data: id.data.clone(),
        })
    }

    /// Whether the peer's ID payload names this identity.
    pub fn matches(&self, id: &IdPayload) -> bool {
        self.to_payload() == *id
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Ipv4(a) => write!(f, "{a}"),
            Identity::Ipv6(a) => write!(f, "{a}"),
            Identity::Fqdn(s) => write!(f, "{s}"),
            Identity::Rfc822(s) => write!(f, "{s}"),
            Identity::DerDn(der) => write!(f, "dn:{}", hex::encode(der)),
            Identity::Other { id_type, data } => write!(f, "{id_type}:{}", hex::encode(data)),
        }
    }
}

pub use crate::ike::auth::{Auth, Psk, PubkeyAuth};

/// ESP encapsulation mode of a Child SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildMode {
    Tunnel,
    /// Only when both sides want it (USE_TRANSPORT_MODE, RFC 7296 §1.3.1).
    Transport,
}

/// Retransmission of our requests (RFC 7296 §2.1): the first after
/// `timeout`, each next one `backoff` times later, at most
/// [`MAX_RETRANSMIT_INTERVAL`] apart; after `tries` transmissions without
/// an answer the SA fails with reason `"timeout"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retransmit {
    pub timeout: Duration,
    /// Values below 1 are read as 1.
    pub backoff: f64,
    /// Transmissions in all, the first included (at least 1).
    pub tries: u32,
}

impl Default for Retransmit {
    fn default() -> Retransmit {
        Retransmit {
            timeout: Duration::from_secs(1),
            backoff: 2.0,
            tries: 5,
        }
    }
}

impl Retransmit {
    /// The wait after the `sent`-th transmission (1 = the first).
    fn interval(&self, sent: u32) -> Duration {
        let exponent = i32::try_from(sent.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.backoff.max(1.0).powi(exponent);
        Duration::try_from_secs_f64(self.timeout.as_secs_f64() * factor)
            .unwrap_or(MAX_RETRANSMIT_INTERVAL)
            .min(MAX_RETRANSMIT_INTERVAL)
    }
}

/// SA lifetimes; stored for the rekeying that is not implemented yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub ike_rekey: Duration,
    pub child_rekey: Duration,
}

impl Default for Lifetimes {
    fn default() -> Lifetimes {
        Lifetimes {
            ike_rekey: Duration::from_secs(4 * 3600),
            child_rekey: Duration::from_secs(3600),
        }
    }
}

/// One connection: who we are, who the peer must be, the key, what we
/// accept, and the one Child SA.
#[derive(Debug, Clone)]
pub struct Config {
    /// The connection's (and its Child SA's) name, for events.
    pub name: String,
    pub local_id: Identity,
    pub remote_id: Identity,
    /// Whether an initiator names the responder's identity (IDr) in IKE_AUTH.
    pub send_remote_id: bool,
    /// Whether an initiator sends INITIAL_CONTACT in IKE_AUTH (it holds no
    /// other SA with the peer, which may then drop stale ones).
    pub send_initial_contact: bool,
    /// How we authenticate, and how the peer must.
    pub auth: Auth,
    /// IKE proposals, in order of preference ([`proposal::parse_proposals`]).
    pub ike_proposals: Vec<Proposal>,
    /// ESP proposals; AEAD only (the dataplane's transforms).
    pub esp_proposals: Vec<Proposal>,
    /// Our side's traffic selectors of the Child SA.
    pub local_ts: Vec<TsRange>,
    /// The peer's side's traffic selectors of the Child SA.
    pub remote_ts: Vec<TsRange>,
    pub mode: ChildMode,
    pub lifetimes: Lifetimes,
    pub retransmit: Retransmit,
}

/// The selector of a whole prefix (every protocol and port):
/// `prefix_selector("10.1.0.0".parse()?, 16)`. `None` when `len` is too long
/// for the family.
pub fn prefix_selector(addr: IpAddr, len: u8) -> Option<TsRange> {
    let addresses = match addr {
        IpAddr::V4(a) => {
            let host_bits = 32u32.checked_sub(u32::from(len))?;
            let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
            let start = u32::from(a) & mask;
            AddressRange::V4 {
                start: Ipv4Addr::from(start),
                end: Ipv4Addr::from(start | !mask),
            }
        }
        IpAddr::V6(a) => {
            let host_bits = 128u32.checked_sub(u32::from(len))?;
            let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
            let start = u128::from(a) & mask;
            AddressRange::V6 {
                start: Ipv6Addr::from(start),
                end: Ipv6Addr::from(start | !mask),
            }
        }
    };
    Some(TsRange {
        ip_protocol: 0,
        start_port: 0,
        end_port: u16::MAX,
        addresses,
    })
}

// ------------------------------------------------------------------ I/O types

/// An IKE message and its addresses. `payload` never carries the non-ESP
/// marker: the I/O layer strips it on receipt and adds it when `src` or
/// `dst` is port 4500.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Where SPIs come from: the I/O layer's allocator keeps them unique across
/// all SAs of the appliance (IKE SPIs route datagrams; inbound ESP SPIs
/// name the dataplane's SAs). Tests inject a counter.
pub trait SpiAllocator: Send {
    /// A fresh, non-zero IKE SPI.
    fn ike_spi(&mut self) -> u64;
    /// A fresh inbound ESP SPI (≥ 256: 1–255 are reserved, RFC 4303 §2.1).
    fn esp_spi(&mut self) -> u32;
}

/// SPIs drawn at random, for an allocator that checks uniqueness itself.
pub struct RandomSpis<R>(pub R);

impl<R: CryptoRngCore + Send> SpiAllocator for RandomSpis<R> {
    fn ike_spi(&mut self) -> u64 {
        loop {
            let spi = self.0.next_u64();
            if spi != 0 {
                return spi;
            }
        }
    }

    fn esp_spi(&mut self) -> u32 {
        loop {
            let spi = self.0.next_u32();
            if spi >= 256 {
                return spi;
            }
        }
    }
}

/// UDP encapsulation of ESP (RFC 3948) for a Child SA whose path has a NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpEncap {
    pub local_port: u16,
    pub remote_port: u16,
}

/// A Child SA ready for the dataplane: both directions.
#[derive(Debug)]
pub struct ChildSaEstablished {
    pub name: String,
    pub mode: ChildMode,
    /// Our inbound SPI (we chose it).
    pub inbound_spi: u32,
    /// The peer's inbound SPI: the SPI of our outbound SA.
    pub outbound_spi: u32,
    pub aead: AeadAlg,
    /// Whether extended sequence numbers were agreed.
    pub esn: bool,
    /// The inbound SPI of the Child SA this one replaces (CREATE_CHILD_SA
    /// with REKEY_SA); the old SA stays until its Delete.
    pub rekeys: Option<u32>,
    /// Keys of packets the peer sends us (key then salt).
    pub inbound_keys: EspKeys,
    /// Keys of packets we send the peer.
    pub outbound_keys: EspKeys,
    /// The agreed selectors of our side and of the peer's side.
    pub local_ts: Vec<TsRange>,
    pub remote_ts: Vec<TsRange>,
    pub udp_encap: Option<UdpEncap>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// What the engine reports to the I/O layer.
#[derive(Debug)]
pub enum IkeEvent {
    IkeSaEstablished {
        local_id: Identity,
        remote_id: Identity,
        suite: proposal::IkeSuite,
        spi_i: u64,
        spi_r: u64,
        /// We are the IKE SA's original initiator.
        initiator: bool,
        local: SocketAddr,
        remote: SocketAddr,
        nat_detected: bool,
        /// The peer sent INITIAL_CONTACT (RFC 7296 §2.4): it holds no other
        /// SA with us, so older SAs with this peer are stale and can go.
        initial_contact: bool,
    },
    ChildSaEstablished(ChildSaEstablished),
    /// The Child SA of IKE_AUTH was refused; the IKE SA stays.
    ChildSaFailed {
        name: String,
        reason: &'static str,
    },
    /// The peer deleted a Child SA (or we did and the peer confirmed).
    ChildSaDeleted {
        name: String,
        inbound_spi: u32,
        outbound_spi: u32,
    },
    /// The IKE SA could not be set up or broke; the engine is closed.
    Failed {
        reason: &'static str,
        detail: String,
    },
    /// The IKE SA was deleted (by either side); the engine is closed.
    Deleted,
}

/// Counters: every datagram rejected, by reason (decode errors' reasons,
/// `bad_spi`, `bad_message_id`, `icv`, ...), and what was answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub rejected: BTreeMap<&'static str, u64>,
    /// Error notifies we sent, by reason (`no_proposal_chosen`, ...).
    pub errors_sent: BTreeMap<&'static str, u64>,
    /// Requests answered (first time).
    pub requests_answered: u64,
    /// Retransmitted requests answered from the cache.
    pub retransmits_answered: u64,
    /// Our requests sent again after a timeout.
    pub retransmits_sent: u64,
}

impl Stats {
    /// How many datagrams were rejected for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(reason).copied().unwrap_or(0)
    }

    /// All rejected datagrams.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

// ------------------------------------------------------------------ state

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Initiator,
    Responder,
}

/// Where the SA is. Exchange-specific data lives in the [`IkeSa`] fields
/// the states name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Responder: waiting for an acceptable IKE_SA_INIT request.
    AwaitInit,
    /// Initiator: IKE_SA_INIT request sent.
    InitSent,
    /// Responder: IKE_SA_INIT answered, waiting for IKE_AUTH.
    AwaitAuth,
    /// Initiator: IKE_AUTH request sent.
    AuthSent,
    Established,
    /// Failed or deleted: every datagram is dropped.
    Closed,
}

/// What IKE_SA_INIT produced and IKE_AUTH needs.
#[derive(Default)]
struct InitExchange {
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// The IKE_SA_INIT request and response as sent: AUTH signs them.
    request: Vec<u8>,
    response: Vec<u8>,
    /// Initiator: our DH pair (regenerated after INVALID_KE_PAYLOAD).
    dh: Option<KeyPair>,
    /// Initiator: the responder's COOKIE to repeat.
    cookie: Option<Vec<u8>>,
    cookie_rounds: u8,
    ke_retried: bool,
    /// Initiator: the inbound ESP SPI offered in IKE_AUTH.
    child_spi: u32,
    /// The hashes of the peer's SIGNATURE_HASH_ALGORITHMS (RFC 7427), if sent.
    peer_sig_hashes: Option<Vec<u16>>,
}

/// The last response we sent, for retransmitted requests (window size 1).
struct CachedResponse {
    message_id: u32,
    request: Vec<u8>,
    response: Datagram,
}

/// What our outstanding request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Init,
    Auth,
    Liveness,
    DeleteIke,
    DeleteChild { inbound_spi: u32 },
    RekeyChild,
}

struct Pending {
    kind: RequestKind,
    message_id: u32,
    datagram: Datagram,
    sent: u32,
    deadline: Instant,
}

/// A Child SA as the IKE SA remembers it (the keys went to the dataplane).
#[derive(Debug, Clone)]
struct ChildSa {
    name: String,
    inbound_spi: u32,
    outbound_spi: u32,
    mode: ChildMode,
    local_ts: Vec<TsRange>,
    remote_ts: Vec<TsRange>,
}

/// Our CREATE_CHILD_SA request that rekeys a Child SA, until answered.
struct ChildRekey {
    old_inbound_spi: u32,
    new_inbound_spi: u32,
    ni: Vec<u8>,
    /// With PFS: our DH pair.
    dh: Option<KeyPair>,
    mode: ChildMode,
}

/// What a Child SA's keys derive from (RFC 7296 §2.17).
struct Keymat<'a> {
    /// g^ir of a CREATE_CHILD_SA with KE payloads (PFS).
    shared: Option<&'a [u8]>,
    /// The nonces of the exchange that creates the Child SA.
    ni: &'a [u8],
    nr: &'a [u8],
    /// We sent that exchange's request.
    we_initiated: bool,
}

/// A datagram's rejection: a stable reason and, for the log, what.
#[derive(Debug)]
struct Reject {
    reason: &'static str,
}

fn reject(reason: &'static str) -> Reject {
    Reject { reason }
}

type Handled = Result<(), Reject>;

/// A failure that ends the IKE SA or one of its negotiations: the reason
/// for counters and the detail for the log.
struct Failure {
    reason: &'static str,
    detail: String,
}

fn failure(reason: &'static str, detail: impl fmt::Display) -> Failure {
    Failure {
        reason,
        detail: detail.to_string(),
    }
}

/// One IKE SA. See the module documentation.
pub struct IkeSa {
    config: Config,
    role: Role,
    state: State,
    rng: Box<dyn CryptoRngCore + Send>,
    spis: Box<dyn SpiAllocator>,
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
    nat_detected: bool,
    init: InitExchange,
    suite: Option<proposal::IkeSuite>,
    keys: Option<IkeSaKeys>,
    /// Message ID of the next request the peer may send.
    peer_next_id: u32,
    cached: Option<CachedResponse>,
    /// Message ID of our next request.
    our_next_id: u32,
    pending: Option<Pending>,
    /// Our Child SA rekey in flight.
    child_rekey: Option<ChildRekey>,
    /// Responder: when the half-open SA is dropped without IKE_AUTH.
    half_open_deadline: Option<Instant>,
    children: Vec<ChildSa>,
    transmit: VecDeque<Datagram>,
    events: VecDeque<IkeEvent>,
    stats: Stats,
}

impl fmt::Debug for IkeSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IkeSa")
            .field("name", &self.config.name)
            .field("role", &self.role)
            .field("state", &self.state)
            .field("spi_i", &format_args!("{:016x}", self.spi_i))
            .field("spi_r", &format_args!("{:016x}", self.spi_r))
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl IkeSa {
    /// A responder waiting for its first IKE_SA_INIT request, which the I/O
    /// layer hands to [`handle`](IkeSa::handle) next. `local` / `remote` are
    /// replaced by the request's addresses.
    pub fn responder(
        config: Config,
        local: SocketAddr,
        remote: SocketAddr,
        rng: Box<dyn CryptoRngCore + Send>,
        spis: Box<dyn SpiAllocator>,
    ) -> IkeSa {
        IkeSa::new(config, Role::Responder, local, remote, rng, spis)
    }

    /// An initiator: allocates our SPI, queues the IKE_SA_INIT request to
    /// `remote` from `local` and arms its retransmission.
    pub fn initiate(
        now: Instant,
        config: Config,
        local: SocketAddr,
        remote: SocketAddr,
        rng: Box<dyn CryptoRngCore + Send>,
        spis: Box<dyn SpiAllocator>,
    ) -> IkeSa {
        let mut sa = IkeSa::new(config, Role::Initiator, local, remote, rng, spis);
        sa.spi_i = sa.spis.ike_spi();
        sa.state = State::InitSent;
        let mut ni = vec![0u8; OUR_NONCE_LEN];
        sa.rng.fill_bytes(&mut ni);
        sa.init.ni = ni;
        match proposal::preferred_dh_group(&sa.config.ike_proposals) {
            Some(group) => {
                if let Err(f) = sa.send_init_request(now, group) {
                    sa.fail(f);
                }
            }
            None => sa.fail(failure("config", "no IKE proposal names a DH group")),
        }
        sa
    }

    fn new(
        config: Config,
        role: Role,
        local: SocketAddr,
        remote: SocketAddr,
        rng: Box<dyn CryptoRngCore + Send>,
        spis: Box<dyn SpiAllocator>,
    ) -> IkeSa {
        IkeSa {
            config,
            role,
            state: State::AwaitInit,
            rng,
            spis,
            spi_i: 0,
            spi_r: 0,
            local,
            remote,
            nat_detected: false,
            init: InitExchange::default(),
            suite: None,
            keys: None,
            peer_next_id: 0,
            cached: None,
            our_next_id: 0,
            pending: None,
            half_open_deadline: None,
            child_rekey: None,
            children: Vec::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    // -------------------------------------------------------------- API

    /// The IKE SPIs as in the header (initiator's, responder's; 0 while
    /// unknown): the I/O layer routes datagrams by them.
    pub fn spis(&self) -> (u64, u64) {
        (self.spi_i, self.spi_r)
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Failed or deleted: the I/O layer may drop the SA once the queues
    /// are drained.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether IKE_SA_INIT found a NAT between the peers (ESP then goes in
    /// UDP).
    pub fn nat_detected(&self) -> bool {
        self.nat_detected
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The addresses IKE uses now (ours, the peer's).
    pub fn addresses(&self) -> (SocketAddr, SocketAddr) {
        (self.local, self.remote)
    }

    pub fn poll_transmit(&mut self) -> Option<Datagram> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<IkeEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](IkeSa::handle_timeout) is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let half_open = self
            .half_open_deadline
            .filter(|_| self.state == State::AwaitAuth);
        match (self.pending.as_ref().map(|p| p.deadline), half_open) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Retransmits our outstanding request, or gives up after the
    /// configured tries.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::AwaitAuth && self.half_open_deadline.is_some_and(|d| now >= d) {
            self.fail(failure(
                "half_open_timeout",
                format!("no IKE_AUTH within {HALF_OPEN_TIMEOUT:?} of IKE_SA_INIT"),
            ));
            return;
        }
        let Some(pending) = self.pending.as_mut() else {
            return;
        };
        if now < pending.deadline {
            return;
        }
        let retransmit = self.config.retransmit;
        if pending.sent >= retransmit.tries.max(1) {
            let detail = format!(
                "no answer to {:?} after {} transmissions",
                pending.kind, pending.sent
            );
            self.pending = None;
            self.fail(failure("timeout", detail));
            return;
        }
        pending.sent += 1;
        pending.deadline = later(now, retransmit.interval(pending.sent));
        self.transmit.push_back(pending.datagram.clone());
        self.stats.retransmits_sent += 1;
    }

    /// Handles one received IKE message.
    pub fn handle(&mut self, now: Instant, datagram: Datagram) {
        let was_awaiting_init = self.state == State::AwaitInit;
        if let Err(r) = self.dispatch(now, &datagram) {
            *self.stats.rejected.entry(r.reason).or_insert(0) += 1;
        }
        if was_awaiting_init && self.state == State::AwaitAuth {
            self.half_open_deadline = Some(later(now, HALF_OPEN_TIMEOUT));
        }
    }

    /// Sends an empty INFORMATIONAL request (RFC 7296 §1.4): the peer must
    /// answer. Without an answer after the retries the SA fails.
    pub fn send_liveness_check(&mut self, now: Instant) -> bool {
        self.send_informational(now, RequestKind::Liveness, Vec::new())
    }

    /// Deletes the IKE SA (and its Child SAs) with the peer. The SA closes
    /// with [`IkeEvent::Deleted`] when the peer answers, or fails on timeout.
    pub fn delete(&mut self, now: Instant) -> bool {
        self.send_informational(
            now,
            RequestKind::DeleteIke,
            vec![Payload::Delete(DeletePayload::ike())],
        )
    }

    /// Deletes the Child SA whose inbound SPI is `inbound_spi`.
    pub fn delete_child(&mut self, now: Instant, inbound_spi: u32) -> bool {
        if !self.children.iter().any(|c| c.inbound_spi == inbound_spi) {
            return false;
        }
        self.send_informational(
            now,
            RequestKind::DeleteChild { inbound_spi },
            vec![Payload::Delete(DeletePayload::esp(&[inbound_spi]))],
        )
    }

    /// Rekeys the Child SA whose inbound SPI is `inbound_spi` with a
    /// CREATE_CHILD_SA exchange (RFC 7296 §2.8), with PFS when the ESP
    /// proposals name a DH group. The new SA comes as
    /// [`IkeEvent::ChildSaEstablished`] with `rekeys` set; the old one stays
    /// until [`delete_child`](IkeSa::delete_child) removes it, which the
    /// caller does once the new one is installed. `false` when the SA is not
    /// established, a request is outstanding, or there is no such Child SA.
    pub fn rekey_child(&mut self, now: Instant, inbound_spi: u32) -> bool {
        if self.state != State::Established || self.pending.is_some() {
            return false;
        }
        let Some(old) = self
            .children
            .iter()
            .find(|c| c.inbound_spi == inbound_spi)
            .cloned()
        else {
            return false;
        };
        let group = proposal::preferred_dh_group(&self.config.esp_proposals);
        let dh = match group.and_then(|g| dh::DhGroup::from_iana_id(g.id())) {
            Some(g) => match KeyPair::generate(g, &mut *self.rng) {
                Ok(pair) => Some(pair),
                Err(_) => return false,
            },
            None => None,
        };
        let mut ni = vec![0u8; OUR_NONCE_LEN];
        self.rng.fill_bytes(&mut ni);
        let new_inbound_spi = self.spis.esp_spi();
        let mut payloads = Vec::new();
        if old.mode == ChildMode::Transport {
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::USE_TRANSPORT_MODE,
                vec![],
            )));
        }
        payloads.push(Payload::Notify(NotifyPayload::rekey_esp(inbound_spi)));
        payloads.push(Payload::Sa(offer(
            &self.config.esp_proposals,
            &new_inbound_spi.to_be_bytes(),
            DhMode::Negotiate {
                ke_group: group.map(|g| g.id()),
            },
        )));
        payloads.push(Payload::Nonce(ni.clone()));
        if let Some(pair) = &dh {
            payloads.push(Payload::Ke(KePayload {
                group: pair.group().iana_id(),
                data: pair.public_value().to_vec(),
            }));
        }
        payloads.push(Payload::TsI(ts_payload(&old.local_ts)));
        payloads.push(Payload::TsR(ts_payload(&old.remote_ts)));
        let header = Header::request(
            ExchangeType::CREATE_CHILD_SA,
            self.spi_i,
            self.spi_r,
            self.our_next_id,
            self.role == Role::Initiator,
        );
        let Ok(bytes) = self.seal(header, &payloads) else {
            return false;
        };
        self.child_rekey = Some(ChildRekey {
            old_inbound_spi: inbound_spi,
            new_inbound_spi,
            ni,
            dh,
            mode: old.mode,
        });
        self.send_request(now, RequestKind::RekeyChild, bytes);
        true
    }

    // -------------------------------------------------------------- dispatch

    fn dispatch(&mut self, now: Instant, dg: &Datagram) -> Handled {
        if self.state == State::Closed {
            return Err(reject("closed"));
        }
        let view = MessageView::new_checked(&dg.payload).map_err(|e| reject(e.reason()))?;
        let header = view.header();
        if header.flags.is_response() {
            self.handle_response(now, dg, &view)
        } else {
            self.handle_request(dg, &view)
        }
    }

    fn handle_request(&mut self, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        // The I flag says who sent it: the original initiator's requests
        // carry it, ours are answered only when we are the responder.
        let from_original_initiator = header.flags.is_initiator();
        if from_original_initiator != (self.role == Role::Responder) {
            return Err(reject("bad_flags"));
        }
        if self.state == State::AwaitInit {
            return self.handle_init_request(dg, view);
        }
        if header.spi_i != self.spi_i {
            return Err(reject("bad_spi"));
        }
        if let Some(cached) = &self.cached {
            let init_retransmit = header.exchange == ExchangeType::IKE_SA_INIT && header.spi_r == 0;
            if header.message_id == cached.message_id
                && (init_retransmit || header.spi_r == self.spi_r)
            {
                if cached.request != dg.payload {
                    return Err(reject("retransmit_mismatch"));
                }
                self.transmit.push_back(cached.response.clone());
                self.stats.retransmits_answered += 1;
                return Ok(());
            }
        }
        if header.spi_r != self.spi_r {
            return Err(reject("bad_spi"));
        }
        if header.message_id != self.peer_next_id {
            return Err(reject("bad_message_id"));
        }
        match (self.state, header.exchange) {
            (State::AwaitAuth, ExchangeType::IKE_AUTH) => self.handle_auth_request(dg, view),
            (State::Established, ExchangeType::INFORMATIONAL) => {
                self.handle_informational_request(dg, view)
            }
            (State::Established, ExchangeType::CREATE_CHILD_SA) => {
                self.handle_create_child_request(dg, view)
            }
            _ => Err(reject("unexpected_exchange")),
        }
    }

    fn handle_response(&mut self, now: Instant, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        let Some(pending) = &self.pending else {
            return Err(reject("unexpected_response"));
        };
        if header.spi_i != self.spi_i {
            return Err(reject("bad_spi"));
        }
        if header.message_id != pending.message_id {
            return Err(reject("bad_message_id"));
        }
        // The response comes from the other party: its I flag is set
        // exactly when it is the original initiator.
        if header.flags.is_initiator() == (self.role == Role::Initiator) {
            return Err(reject("bad_flags"));
        }
        if pending.kind != RequestKind::Init && header.spi_r != self.spi_r {
            return Err(reject("bad_spi"));
        }
        match pending.kind {
            RequestKind::Init => self.handle_init_response(now, dg, view),
            RequestKind::Auth => self.handle_auth_response(view),
            RequestKind::RekeyChild => {
                if header.exchange != ExchangeType::CREATE_CHILD_SA {
                    return Err(reject("unexpected_exchange"));
                }
                self.handle_rekey_child_response(view)
            }
            _ if header.exchange != ExchangeType::INFORMATIONAL => {
                Err(reject("unexpected_exchange"))
            }
            kind => self.handle_informational_response(kind, view),
        }
    }

    // -------------------------------------------------------------- responder

    /// IKE_SA_INIT request (RFC 7296 §1.2): negotiate the suite, agree on a
    /// DH secret, derive the keys, answer. Nothing changes unless the
    /// request is accepted (INVALID_KE_PAYLOAD leaves us waiting for the
    /// retry).
    fn handle_init_request(&mut self, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        if header.exchange != ExchangeType::IKE_SA_INIT {
            return Err(reject("unexpected_exchange"));
        }
        if header.spi_i == 0 || header.spi_r != 0 {
            return Err(reject("bad_spi"));
        }
        if header.message_id != 0 {
            return Err(reject("bad_message_id"));
        }
        let payloads = view.decode_payloads().map_err(|e| reject(e.reason()))?;
        let (Some(sa), Some(ke), Some(ni)) = (payloads.sa(), payloads.ke(), payloads.nonce())
        else {
            self.answer_init_error(
                dg,
                &header,
                NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]),
                "invalid_syntax",
            );
            return Err(reject("missing_payload"));
        };
        if !NONCE_LEN_RANGE.contains(&ni.len()) {
            self.answer_init_error(
                dg,
                &header,
                NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]),
                "invalid_syntax",
            );
            return Err(reject("bad_nonce"));
        }
        let agreed = match select(
            &self.config.ike_proposals,
            sa,
            DhMode::Negotiate {
                ke_group: Some(ke.group),
            },
        ) {
            Ok(agreed) => agreed,
            Err(e) => {
                self.answer_init_error(
                    dg,
                    &header,
                    NotifyPayload::new(NotifyType::NO_PROPOSAL_CHOSEN, vec![]),
                    "no_proposal_chosen",
                );
                self.fail(failure("no_proposal_chosen", e));
                return Ok(());
            }
        };
        let Some(suite) = agreed.ike().copied() else {
            return Err(reject("internal"));
        };
        if suite.dh.id() != ke.group {
            // The peer may retry with the group we want (RFC 7296 §1.3).
            self.answer_init_error(
                dg,
                &header,
                NotifyPayload::invalid_ke(suite.dh.id()),
                "invalid_ke_payload",
            );
            return Ok(());
        }
        let ni = ni.to_vec();
        let Some(group) = dh::DhGroup::from_iana_id(suite.dh.id()) else {
            return Err(reject("internal"));
        };
        let pair = KeyPair::generate(group, &mut *self.rng).map_err(|_| reject("internal"))?;
        let Ok(shared) = pair.agree(&ke.data) else {
            self.answer_init_error(
                dg,
                &header,
                NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]),
                "invalid_syntax",
            );
            return Err(reject("bad_ke"));
        };
        let spi_r = self.spis.ike_spi();
        let mut nr = vec![0u8; OUR_NONCE_LEN];
        self.rng.fill_bytes(&mut nr);
        let keys = derive_ike_keys(&suite, shared.as_bytes(), &ni, &nr, header.spi_i, spi_r)
            .map_err(|_| reject("internal"))?;
        let nat = detect_nat(&payloads, header.spi_i, 0, dg.src, dg.dst);

        let mut response_header = header.response();
        response_header.spi_r = spi_r;
        let response = Message::new(
            response_header,
            vec![
                Payload::Sa(agreed.reply(Vec::new())),
                Payload::Ke(KePayload {
                    group: ke.group,
                    data: pair.public_value().to_vec(),
                }),
                Payload::Nonce(nr.clone()),
                Payload::Notify(NotifyPayload::nat_detection_source(
                    header.spi_i,
                    spi_r,
                    dg.dst,
                )),
                Payload::Notify(NotifyPayload::nat_detection_destination(
                    header.spi_i,
                    spi_r,
                    dg.src,
                )),
            ]
            .into_iter()
            .chain(self.init_auth_payloads(true))
            .collect(),
        )
        .encode()
        .map_err(|_| reject("internal"))?;

        self.spi_i = header.spi_i;
        self.spi_r = spi_r;
        self.local = dg.dst;
        self.remote = dg.src;
        self.nat_detected = nat;
        self.suite = Some(suite);
        self.keys = Some(keys);
        self.init = InitExchange {
            ni,
            nr,
            request: dg.payload.clone(),
            response: response.clone(),
            peer_sig_hashes: signature_hashes(&payloads),
            ..InitExchange::default()
        };
        self.state = State::AwaitAuth;
        self.respond(dg, header.message_id, response);
        Ok(())
    }

    /// An unencrypted error answer to an IKE_SA_INIT request (SPIr zero:
    /// we keep no state for it).
    fn answer_init_error(
        &mut self,
        dg: &Datagram,
        header: &Header,
        notify: NotifyPayload,
        reason: &'static str,
    ) {
        let message = Message::new(header.response(), vec![Payload::Notify(notify)]);
        if let Ok(bytes) = message.encode() {
            self.transmit.push_back(Datagram {
                src: dg.dst,
                dst: dg.src,
                payload: bytes,
            });
            *self.stats.errors_sent.entry(reason).or_insert(0) += 1;
        }
    }

    /// IKE_AUTH request (RFC 7296 §1.2, §2.15): open, authenticate the peer,
    /// set up the Child SA, answer.
    fn handle_auth_request(&mut self, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        let inner = self.open(view)?;
        let payloads = match decode_payload_chain(inner.0, &inner.1) {
            Ok(p) => p,
            Err(e) => {
                self.answer_auth_failure(
                    dg,
                    &header,
                    NotifyType::INVALID_SYNTAX,
                    failure("invalid_syntax", e),
                );
                return Ok(());
            }
        };
        let (Some(idi), Some(auth)) = (payloads.id_i(), payloads.auth()) else {
            self.answer_auth_failure(
                dg,
                &header,
                NotifyType::INVALID_SYNTAX,
                failure("invalid_syntax", "IKE_AUTH without IDi or AUTH"),
            );
            return Ok(());
        };
        if let Err(f) = self.authenticate_initiator(&payloads, idi, auth) {
            self.answer_auth_failure(dg, &header, NotifyType::AUTHENTICATION_FAILED, f);
            return Ok(());
        }
        let remote_id = Identity::from_payload(idi);
        let initial_contact = payloads.notify(NotifyType::INITIAL_CONTACT).is_some();
        let idr = self.config.local_id.to_payload();
        let our_auth = match self.our_auth(&idr) {
            Ok(a) => a,
            Err(f) => {
                self.answer_auth_failure(dg, &header, NotifyType::AUTHENTICATION_FAILED, f);
                return Ok(());
            }
        };
        let mut reply = vec![Payload::IdR(idr)];
        if let Auth::Pubkey(pk) = &self.config.auth {
            reply.extend(pk.cert_payloads().map(Payload::Cert));
        }
        reply.push(Payload::Auth(our_auth));
        self.local = dg.dst;
        self.remote = dg.src;
        let childless =
            payloads.sa().is_none() && payloads.ts_i().is_none() && payloads.ts_r().is_none();
        let child = match self.accept_child(&payloads) {
            // RFC 6023: an IKE_AUTH without SA, TSi and TSr sets up no
            // Child SA, and that is no error.
            Err(_) if childless => None,
            Ok((child_payloads, child)) => {
                reply.extend(child_payloads);
                Some(child)
            }
            Err((notify, f)) => {
                reply.push(Payload::Notify(NotifyPayload::new(notify, vec![])));
                *self.stats.errors_sent.entry(f.reason).or_insert(0) += 1;
                self.events.push_back(IkeEvent::ChildSaFailed {
                    name: self.config.name.clone(),
                    reason: f.reason,
                });
                None
            }
        };
        let response = self
            .seal(header.response(), &reply)
            .map_err(|_| reject("internal"))?;
        self.state = State::Established;
        self.respond(dg, header.message_id, response);
        self.push_established(remote_id, initial_contact);
        if let Some(child) = child {
            self.install_child(child);
        }
        Ok(())
    }

    /// Checks IDi, IDr (if sent) and the AUTH payload of an IKE_AUTH
    /// request.
    fn authenticate_initiator(
        &self,
        payloads: &[Payload],
        idi: &IdPayload,
        auth: &AuthPayload,
    ) -> Result<(), Failure> {
        if !self.config.remote_id.matches(idi) {
            return Err(failure(
                "peer_id_mismatch",
                format!(
                    "the peer is {}, not {}",
                    Identity::from_payload(idi),
                    self.config.remote_id
                ),
            ));
        }
        if let Some(idr) = payloads.id_r() {
            if !self.config.local_id.matches(idr) {
                return Err(failure(
                    "idr_mismatch",
                    format!(
                        "the peer wants {}, we are {}",
                        Identity::from_payload(idr),
                        self.config.local_id
                    ),
                ));
            }
        }
        self.verify_peer_auth(payloads, idi, auth)
    }

    /// The Child SA of an IKE_AUTH request: the ESP proposal, the narrowed
    /// selectors, our SPI and the keys; or the error notify to send.
    #[allow(clippy::type_complexity)]
    fn accept_child(
        &mut self,
        payloads: &[Payload],
    ) -> Result<(Vec<Payload>, ChildSaEstablished), (NotifyType, Failure)> {
        let (Some(sa), Some(tsi), Some(tsr)) = (payloads.sa(), payloads.ts_i(), payloads.ts_r())
        else {
            return Err((
                NotifyType::INVALID_SYNTAX,
                failure("invalid_syntax", "IKE_AUTH without SA, TSi or TSr"),
            ));
        };
        let agreed = select(&self.config.esp_proposals, sa, DhMode::Skip).map_err(|e| {
            (
                NotifyType::NO_PROPOSAL_CHOSEN,
                failure("no_proposal_chosen", e),
            )
        })?;
        let ts_i = narrow(&tsi.selectors, &self.config.remote_ts);
        let ts_r = narrow(&tsr.selectors, &self.config.local_ts);
        if ts_i.is_empty() || ts_r.is_empty() {
            return Err((
                NotifyType::TS_UNACCEPTABLE,
                failure(
                    "ts_unacceptable",
                    "no overlap of the peer's selectors with ours",
                ),
            ));
        }
        let mode = if self.config.mode == ChildMode::Transport
            && payloads.notify(NotifyType::USE_TRANSPORT_MODE).is_some()
        {
            ChildMode::Transport
        } else {
            ChildMode::Tunnel
        };
        let inbound_spi = self.spis.esp_spi();
        let child = self
            .child_from_agreed(
                &agreed,
                inbound_spi,
                mode,
                ts_r.clone(),
                ts_i.clone(),
                self.first_child_keymat(),
            )
            .map_err(|f| (NotifyType::NO_PROPOSAL_CHOSEN, f))?;
        let mut out = Vec::new();
        if mode == ChildMode::Transport {
            out.push(Payload::Notify(NotifyPayload::new(
                NotifyType::USE_TRANSPORT_MODE,
                vec![],
            )));
        }
        out.push(Payload::Sa(
            agreed.reply(inbound_spi.to_be_bytes().to_vec()),
        ));
        out.push(Payload::TsI(ts_payload(&ts_i)));
        out.push(Payload::TsR(ts_payload(&ts_r)));
        Ok((out, child))
    }

    /// An encrypted IKE_AUTH error answer; the IKE SA is then gone.
    fn answer_auth_failure(
        &mut self,
        dg: &Datagram,
        header: &Header,
        notify: NotifyType,
        f: Failure,
    ) {
        if let Ok(response) = self.seal(
            header.response(),
            &[Payload::Notify(NotifyPayload::new(notify, vec![]))],
        ) {
            self.transmit.push_back(Datagram {
                src: dg.dst,
                dst: dg.src,
                payload: response,
            });
            *self.stats.errors_sent.entry(f.reason).or_insert(0) += 1;
        }
        self.fail(f);
    }

    // -------------------------------------------------------------- informational

    /// INFORMATIONAL request: liveness check (empty), Delete of the IKE SA or
    /// of Child SAs (RFC 7296 §1.4.1).
    fn handle_informational_request(&mut self, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        let (first, plaintext) = self.open(view)?;
        let payloads = match decode_payload_chain(first, &plaintext) {
            Ok(p) => p,
            Err(e) => {
                // Authenticated but malformed: tell the peer (RFC 7296 §2.21.1).
                let notify =
                    Payload::Notify(NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]));
                let response = self
                    .seal(header.response(), &[notify])
                    .map_err(|_| reject("internal"))?;
                *self.stats.errors_sent.entry("invalid_syntax").or_insert(0) += 1;
                self.respond(dg, header.message_id, response);
                return Err(reject(e.reason()));
            }
        };
        let mut reply = Vec::new();
        let mut delete_ike = false;
        let mut deleted = Vec::new();
        for delete in payloads.deletes() {
            match delete.protocol {
                ProtocolId::IKE => delete_ike = true,
                ProtocolId::ESP => {
                    for spi in delete.spis_u32().unwrap_or_default() {
                        if let Some(pos) = self.children.iter().position(|c| c.outbound_spi == spi)
                        {
                            deleted.push(self.children.remove(pos));
                        }
                    }
                }
                _ => {}
            }
        }
        if !delete_ike && !deleted.is_empty() {
            let ours: Vec<u32> = deleted.iter().map(|c| c.inbound_spi).collect();
            reply.push(Payload::Delete(DeletePayload::esp(&ours)));
        }
        let response = self
            .seal(header.response(), &reply)
            .map_err(|_| reject("internal"))?;
        self.respond(dg, header.message_id, response);
        for child in deleted {
            self.events.push_back(IkeEvent::ChildSaDeleted {
                name: child.name,
                inbound_spi: child.inbound_spi,
                outbound_spi: child.outbound_spi,
            });
        }
        if delete_ike {
            self.close_deleted();
        } else if payloads.notify(NotifyType::AUTHENTICATION_FAILED).is_some() {
            // An initiator that could not authenticate us (RFC 7296 §2.21.2).
            self.fail(failure(
                "auth_failed",
                "the peer refused our authentication",
            ));
        }
        Ok(())
    }

    /// CREATE_CHILD_SA request (RFC 7296 §1.3): a new or rekeyed Child SA
    /// (REKEY_SA names the old one by the peer's inbound SPI), with PFS when
    /// the agreed proposal has a DH group. Rekeying the IKE SA is not
    /// implemented: NO_ADDITIONAL_SAS tells the peer without harming the SA.
    /// Refusals are answered with the error notify, and the IKE SA stays.
    fn handle_create_child_request(&mut self, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        let (first, plaintext) = self.open(view)?;
        let (reply, child, reason) = match decode_payload_chain(first, &plaintext) {
            Ok(payloads) => match self.accept_create_child(&payloads) {
                Ok((reply, child)) => (reply, Some(child), None),
                Err((notify, f)) => (vec![Payload::Notify(notify)], None, Some(f.reason)),
            },
            Err(e) => (
                vec![Payload::Notify(NotifyPayload::new(
                    NotifyType::INVALID_SYNTAX,
                    vec![],
                ))],
                None,
                Some(e.reason()),
            ),
        };
        let response = self
            .seal(header.response(), &reply)
            .map_err(|_| reject("internal"))?;
        if let Some(reason) = reason {
            *self.stats.errors_sent.entry(reason).or_insert(0) += 1;
        }
        self.respond(dg, header.message_id, response);
        if let Some(child) = child {
            self.install_child(child);
        }
        Ok(())
    }

    /// The Child SA of a CREATE_CHILD_SA request and the response payloads,
    /// or the error notify to answer with.
    #[allow(clippy::type_complexity)]
    fn accept_create_child(
        &mut self,
        payloads: &[Payload],
    ) -> Result<(Vec<Payload>, ChildSaEstablished), (NotifyPayload, Failure)> {
        let error = |t: NotifyType, reason: &'static str, detail: &str| {
            (NotifyPayload::new(t, vec![]), failure(reason, detail))
        };
        let (Some(sa), Some(ni), Some(tsi), Some(tsr)) = (
            payloads.sa(),
            payloads.nonce(),
            payloads.ts_i(),
            payloads.ts_r(),
        ) else {
            if payloads
                .sa()
                .is_some_and(|sa| sa.proposals.iter().any(|p| p.protocol == ProtocolId::IKE))
            {
                return Err(error(
                    NotifyType::NO_ADDITIONAL_SAS,
                    "no_additional_sas",
                    "rekeying the IKE SA is not implemented",
                ));
            }
            return Err(error(
                NotifyType::INVALID_SYNTAX,
                "invalid_syntax",
                "CREATE_CHILD_SA without SA, Nonce, TSi or TSr",
            ));
        };
        if !NONCE_LEN_RANGE.contains(&ni.len()) {
            return Err(error(
                NotifyType::INVALID_SYNTAX,
                "bad_nonce",
                "nonce length",
            ));
        }
        let rekeys = match payloads.notify(NotifyType::REKEY_SA) {
            Some(n) => {
                let old = n
                    .spi_u32()
                    .and_then(|spi| self.children.iter().find(|c| c.outbound_spi == spi))
                    .map(|c| c.inbound_spi);
                match old {
                    Some(old) => Some(old),
                    None => {
                        let mut notify = NotifyPayload::new(NotifyType::CHILD_SA_NOT_FOUND, vec![]);
                        notify.protocol = ProtocolId::ESP;
                        notify.spi = n.spi.clone();
                        return Err((
                            notify,
                            failure("child_sa_not_found", "REKEY_SA names no Child SA"),
                        ));
                    }
                }
            }
            None => None,
        };
        let ke = payloads.ke();
        let agreed = select(
            &self.config.esp_proposals,
            sa,
            DhMode::Negotiate {
                ke_group: ke.map(|k| k.group),
            },
        )
        .map_err(|e| {
            (
                NotifyPayload::new(NotifyType::NO_PROPOSAL_CHOSEN, vec![]),
                failure("no_proposal_chosen", e),
            )
        })?;
        let pfs_group = agreed.esp().and_then(|e| e.dh);
        let pfs = match (pfs_group, ke) {
            (None, _) => None,
            (Some(g), Some(k)) if k.group == g.id() => Some(k),
            (Some(g), _) => {
                return Err((
                    NotifyPayload::invalid_ke(g.id()),
                    failure("invalid_ke_payload", "the KE group is not the agreed one"),
                ))
            }
        };
        let ts_i = narrow(&tsi.selectors, &self.config.remote_ts);
        let ts_r = narrow(&tsr.selectors, &self.config.local_ts);
        if ts_i.is_empty() || ts_r.is_empty() {
            return Err(error(
                NotifyType::TS_UNACCEPTABLE,
                "ts_unacceptable",
                "no overlap of the peer's selectors with ours",
            ));
        }
        let (our_ke, shared) = match pfs {
            Some(k) => {
                let group = dh::DhGroup::from_iana_id(k.group)
                    .ok_or_else(|| error(NotifyType::NO_PROPOSAL_CHOSEN, "internal", "DH group"))?;
                let pair = KeyPair::generate(group, &mut *self.rng)
                    .map_err(|_| error(NotifyType::NO_PROPOSAL_CHOSEN, "internal", "DH"))?;
                let shared = pair
                    .agree(&k.data)
                    .map_err(|_| error(NotifyType::INVALID_SYNTAX, "bad_ke", "bad KE data"))?;
                (
                    Some(KePayload {
                        group: k.group,
                        data: pair.public_value().to_vec(),
                    }),
                    Some(shared),
                )
            }
            None => (None, None),
        };
        let mode = if self.config.mode == ChildMode::Transport
            && payloads.notify(NotifyType::USE_TRANSPORT_MODE).is_some()
        {
            ChildMode::Transport
        } else {
            ChildMode::Tunnel
        };
        let mut nr = vec![0u8; OUR_NONCE_LEN];
        self.rng.fill_bytes(&mut nr);
        let inbound_spi = self.spis.esp_spi();
        let keymat = Keymat {
            shared: shared.as_ref().map(|s| s.as_bytes()),
            ni,
            nr: &nr,
            we_initiated: false,
        };
        let mut child = self
            .child_from_agreed(
                &agreed,
                inbound_spi,
                mode,
                ts_r.clone(),
                ts_i.clone(),
                keymat,
            )
            .map_err(|f| {
                (
                    NotifyPayload::new(NotifyType::NO_PROPOSAL_CHOSEN, vec![]),
                    f,
                )
            })?;
        child.rekeys = rekeys;
        let mut reply = Vec::new();
        if mode == ChildMode::Transport {
            reply.push(Payload::Notify(NotifyPayload::new(
                NotifyType::USE_TRANSPORT_MODE,
                vec![],
            )));
        }
        reply.push(Payload::Sa(
            agreed.reply(inbound_spi.to_be_bytes().to_vec()),
        ));
        reply.push(Payload::Nonce(nr));
        reply.extend(our_ke.map(Payload::Ke));
        reply.push(Payload::TsI(ts_payload(&ts_i)));
        reply.push(Payload::TsR(ts_payload(&ts_r)));
        Ok((reply, child))
    }

    fn send_informational(
        &mut self,
        now: Instant,
        kind: RequestKind,
        payloads: Vec<Payload>,
    ) -> bool {
        if self.state != State::Established || self.pending.is_some() {
            return false;
        }
        let header = Header::request(
            ExchangeType::INFORMATIONAL,
            self.spi_i,
            self.spi_r,
            self.our_next_id,
            self.role == Role::Initiator,
        );
        match self.seal(header, &payloads) {
            Ok(bytes) => {
                self.send_request(now, kind, bytes);
                true
            }
            Err(_) => false,
        }
    }

    fn handle_informational_response(
        &mut self,
        kind: RequestKind,
        view: &MessageView<'_>,
    ) -> Handled {
        let (first, plaintext) = self.open(view)?;
        // The content is checked but not needed: the answer to a liveness
        // check is empty, and a Delete's answer names SAs that go anyway.
        decode_payload_chain(first, &plaintext).map_err(|e| reject(e.reason()))?;
        self.complete_request();
        match kind {
            RequestKind::DeleteIke => self.close_deleted(),
            RequestKind::DeleteChild { inbound_spi } => {
                if let Some(pos) = self
                    .children
                    .iter()
                    .position(|c| c.inbound_spi == inbound_spi)
                {
                    let child = self.children.remove(pos);
                    self.events.push_back(IkeEvent::ChildSaDeleted {
                        name: child.name,
                        inbound_spi: child.inbound_spi,
                        outbound_spi: child.outbound_spi,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The answer to our Child SA rekey: the new SA, or (on an error
    /// notify) [`IkeEvent::ChildSaFailed`] with the old SA left in place.
    fn handle_rekey_child_response(&mut self, view: &MessageView<'_>) -> Handled {
        let (first, plaintext) = self.open(view)?;
        let payloads = decode_payload_chain(first, &plaintext).map_err(|e| reject(e.reason()))?;
        self.complete_request();
        let Some(rekey) = self.child_rekey.take() else {
            return Err(reject("internal"));
        };
        match self.child_from_rekey_response(&payloads, &rekey) {
            Ok(child) => self.install_child(child),
            Err(f) => self.events.push_back(IkeEvent::ChildSaFailed {
                name: self.config.name.clone(),
                reason: f.reason,
            }),
        }
        Ok(())
    }

    fn child_from_rekey_response(
        &self,
        payloads: &[Payload],
        rekey: &ChildRekey,
    ) -> Result<ChildSaEstablished, Failure> {
        if let Some(error) = payloads.notifies().find(|n| n.notify_type.is_error()) {
            return Err(failure(notify_reason(error.notify_type), error.notify_type));
        }
        let (Some(sa), Some(nr), Some(tsi), Some(tsr)) = (
            payloads.sa(),
            payloads.nonce(),
            payloads.ts_i(),
            payloads.ts_r(),
        ) else {
            return Err(failure("invalid_syntax", "no SA, Nonce, TSi or TSr"));
        };
        if !NONCE_LEN_RANGE.contains(&nr.len()) {
            return Err(failure("bad_nonce", "nonce length"));
        }
        let ke_group = rekey.dh.as_ref().map(|p| p.group().iana_id());
        let agreed = accept_reply(
            &self.config.esp_proposals,
            sa,
            DhMode::Negotiate { ke_group },
        )
        .map_err(|e| failure("bad_proposal_reply", e))?;
        let shared = match &rekey.dh {
            Some(pair) => {
                let ke = payloads
                    .ke()
                    .filter(|k| k.group == pair.group().iana_id())
                    .ok_or_else(|| failure("bad_ke", "no KE of our group"))?;
                Some(pair.agree(&ke.data).map_err(|e| failure("bad_ke", e))?)
            }
            None => None,
        };
        let (local_ts, remote_ts) =
            replied_selectors(&self.config, &tsi.selectors, &tsr.selectors)?;
        let keymat = Keymat {
            shared: shared.as_ref().map(|s| s.as_bytes()),
            ni: &rekey.ni,
            nr,
            we_initiated: true,
        };
        let mut child = self.child_from_agreed(
            &agreed,
            rekey.new_inbound_spi,
            rekey.mode,
            local_ts,
            remote_ts,
            keymat,
        )?;
        child.rekeys = Some(rekey.old_inbound_spi);
        Ok(child)
    }

    // -------------------------------------------------------------- initiator

    fn send_init_request(&mut self, now: Instant, group: proposal::DhGroup) -> Result<(), Failure> {
        let dh_group = dh::DhGroup::from_iana_id(group.id())
            .ok_or_else(|| failure("internal", "DH group without an implementation"))?;
        let pair =
            KeyPair::generate(dh_group, &mut *self.rng).map_err(|e| failure("internal", e))?;
        let header = Header::request(ExchangeType::IKE_SA_INIT, self.spi_i, 0, 0, true);
        let mut payloads = Vec::new();
        if let Some(cookie) = &self.init.cookie {
            payloads.push(Payload::Notify(NotifyPayload::cookie(cookie.clone())));
        }
        payloads.push(Payload::Sa(offer(
            &self.config.ike_proposals,
            &[],
            DhMode::Negotiate {
                ke_group: Some(group.id()),
            },
        )));
        payloads.push(Payload::Ke(KePayload {
            group: group.id(),
            data: pair.public_value().to_vec(),
        }));
        payloads.push(Payload::Nonce(self.init.ni.clone()));
        payloads.push(Payload::Notify(NotifyPayload::nat_detection_source(
            self.spi_i, 0, self.local,
        )));
        payloads.push(Payload::Notify(NotifyPayload::nat_detection_destination(
            self.spi_i,
            0,
            self.remote,
        )));
        payloads.extend(self.init_auth_payloads(false));
        let bytes = Message::new(header, payloads)
            .encode()
            .map_err(|e| failure("internal", e))?;
        self.init.dh = Some(pair);
        self.init.request = bytes.clone();
        self.our_next_id = 0;
        self.send_request(now, RequestKind::Init, bytes);
        Ok(())
    }

    /// IKE_SA_INIT response: follow INVALID_KE_PAYLOAD or COOKIE, or accept
    /// the suite, agree on the keys and send IKE_AUTH.
    fn handle_init_response(
        &mut self,
        now: Instant,
        dg: &Datagram,
        view: &MessageView<'_>,
    ) -> Handled {
        let header = view.header();
        if header.exchange != ExchangeType::IKE_SA_INIT {
            return Err(reject("unexpected_exchange"));
        }
        let payloads = view.decode_payloads().map_err(|e| reject(e.reason()))?;
        if let Some(group) = payloads
            .notifies()
            .find_map(NotifyPayload::invalid_ke_group)
        {
            return self.retry_with_group(now, group);
        }
        if let Some(cookie) = payloads.notify(NotifyType::COOKIE) {
            return self.retry_with_cookie(now, cookie.data.clone());
        }
        if let Some(error) = payloads.notifies().find(|n| n.notify_type.is_error()) {
            let reason = notify_reason(error.notify_type);
            self.pending = None;
            self.fail(failure(
                reason,
                format!("the responder answered {}", error.notify_type),
            ));
            return Ok(());
        }
        if header.spi_r == 0 {
            return Err(reject("bad_spi"));
        }
        let (Some(sa), Some(ke), Some(nr)) = (payloads.sa(), payloads.ke(), payloads.nonce())
        else {
            return Err(reject("missing_payload"));
        };
        if !NONCE_LEN_RANGE.contains(&nr.len()) {
            return Err(reject("bad_nonce"));
        }
        let Some(pair) = self.init.dh.as_ref() else {
            return Err(reject("internal"));
        };
        let our_group = pair.group().iana_id();
        let agreed = match accept_reply(
            &self.config.ike_proposals,
            sa,
            DhMode::Negotiate {
                ke_group: Some(our_group),
            },
        ) {
            Ok(a) => a,
            Err(e) => {
                self.pending = None;
                self.fail(failure("bad_proposal_reply", e));
                return Ok(());
            }
        };
        let Some(suite) = agreed.ike().copied() else {
            return Err(reject("internal"));
        };
        if ke.group != our_group {
            return Err(reject("bad_ke"));
        }
        let shared = pair.agree(&ke.data).map_err(|_| reject("bad_ke"))?;
        let keys = derive_ike_keys(
            &suite,
            shared.as_bytes(),
            &self.init.ni,
            nr,
            self.spi_i,
            header.spi_r,
        )
        .map_err(|_| reject("internal"))?;
        let nat = detect_nat(&payloads, self.spi_i, header.spi_r, dg.src, dg.dst);

        self.complete_request();
        self.spi_r = header.spi_r;
        self.init.nr = nr.to_vec();
        self.init.response = dg.payload.clone();
        self.init.peer_sig_hashes = signature_hashes(&payloads);
        self.init.dh = None;
        self.suite = Some(suite);
        self.keys = Some(keys);
        self.nat_detected = nat;
        if nat {
            // RFC 7296 §2.23: after a NAT is detected, IKE moves to 4500.
            self.local.set_port(NAT_T_PORT_DEFAULT);
            self.remote.set_port(NAT_T_PORT_DEFAULT);
        }
        self.our_next_id = 1;
        self.peer_next_id = 0;
        match self.send_auth_request(now) {
            Ok(()) => {
                self.state = State::AuthSent;
                Ok(())
            }
            Err(f) => {
                self.fail(f);
                Ok(())
            }
        }
    }

    fn retry_with_group(&mut self, now: Instant, group: u16) -> Handled {
        let offered = proposal::DhGroup::from_id(group)
            .filter(|g| self.config.ike_proposals.iter().any(|p| p.dh.contains(g)));
        match offered {
            Some(g) if !self.init.ke_retried => {
                self.init.ke_retried = true;
                self.pending = None;
                if let Err(f) = self.send_init_request(now, g) {
                    self.fail(f);
                }
                Ok(())
            }
            _ => {
                self.pending = None;
                self.fail(failure(
                    "invalid_ke_payload",
                    format!("the responder wants DH group {group}, which we do not offer or already tried"),
                ));
                Ok(())
            }
        }
    }

    fn retry_with_cookie(&mut self, now: Instant, cookie: Vec<u8>) -> Handled {
        if self.init.cookie_rounds >= MAX_COOKIE_ROUNDS || cookie.is_empty() || cookie.len() > 64 {
            return Err(reject("bad_cookie"));
        }
        self.init.cookie_rounds += 1;
        self.init.cookie = Some(cookie);
        let Some(group) = self.init.dh.as_ref().map(KeyPair::group) else {
            return Err(reject("internal"));
        };
        let Some(group) = proposal::DhGroup::from_id(group.iana_id()) else {
            return Err(reject("internal"));
        };
        self.pending = None;
        if let Err(f) = self.send_init_request(now, group) {
            self.fail(f);
        }
        Ok(())
    }

    fn send_auth_request(&mut self, now: Instant) -> Result<(), Failure> {
        let idi = self.config.local_id.to_payload();
        let auth = self.our_auth(&idi)?;
        let child_spi = self.spis.esp_spi();
        self.init.child_spi = child_spi;
        let mut payloads = vec![Payload::IdI(idi)];
        if let Auth::Pubkey(pk) = &self.config.auth {
            payloads.extend(pk.cert_payloads().map(Payload::Cert));
            payloads.push(Payload::CertReq(pk.certreq()));
        }
        if self.config.send_remote_id {
            payloads.push(Payload::IdR(self.config.remote_id.to_payload()));
        }
        payloads.push(Payload::Auth(auth));
        if self.config.send_initial_contact {
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::INITIAL_CONTACT,
                vec![],
            )));
        }
        if self.config.mode == ChildMode::Transport {
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::USE_TRANSPORT_MODE,
                vec![],
            )));
        }
        payloads.push(Payload::Sa(offer(
            &self.config.esp_proposals,
            &child_spi.to_be_bytes(),
            DhMode::Skip,
        )));
        payloads.push(Payload::TsI(ts_payload(&self.config.local_ts)));
        payloads.push(Payload::TsR(ts_payload(&self.config.remote_ts)));
        let header = Header::request(ExchangeType::IKE_AUTH, self.spi_i, self.spi_r, 1, true);
        let bytes = self
            .seal(header, &payloads)
            .map_err(|e| failure("internal", e))?;
        self.send_request(now, RequestKind::Auth, bytes);
        Ok(())
    }

    /// IKE_AUTH response: authenticate the responder, then the Child SA.
    fn handle_auth_response(&mut self, view: &MessageView<'_>) -> Handled {
        if view.header().exchange != ExchangeType::IKE_AUTH {
            return Err(reject("unexpected_exchange"));
        }
        let (first, plaintext) = self.open(view)?;
        self.complete_request();
        let payloads = match decode_payload_chain(first, &plaintext) {
            Ok(p) => p,
            Err(e) => {
                self.fail(failure("invalid_syntax", e));
                return Ok(());
            }
        };
        let (Some(idr), Some(auth)) = (payloads.id_r(), payloads.auth()) else {
            let reason = payloads
                .notifies()
                .find(|n| n.notify_type.is_error())
                .map_or("invalid_syntax", |n| notify_reason(n.notify_type));
            self.fail(failure(reason, "the IKE_AUTH response has no IDr or AUTH"));
            return Ok(());
        };
        if !self.config.remote_id.matches(idr) {
            self.fail(failure(
                "peer_id_mismatch",
                format!(
                    "the responder is {}, not {}",
                    Identity::from_payload(idr),
                    self.config.remote_id
                ),
            ));
            return Ok(());
        }
        if let Err(f) = self.verify_peer_auth(&payloads, idr, auth) {
            self.tell_auth_failed();
            self.fail(f);
            return Ok(());
        }
        self.state = State::Established;
        self.peer_next_id = 0;
        self.push_established(Identity::from_payload(idr), false);
        match self.child_from_response(&payloads) {
            Ok(child) => self.install_child(child),
            Err(f) => self.events.push_back(IkeEvent::ChildSaFailed {
                name: self.config.name.clone(),
                reason: f.reason,
            }),
        }
        Ok(())
    }

    fn child_from_response(&mut self, payloads: &[Payload]) -> Result<ChildSaEstablished, Failure> {
        if let Some(error) = payloads.notifies().find(|n| n.notify_type.is_error()) {
            return Err(failure(notify_reason(error.notify_type), error.notify_type));
        }
        let (Some(sa), Some(tsi), Some(tsr)) = (payloads.sa(), payloads.ts_i(), payloads.ts_r())
        else {
            return Err(failure("invalid_syntax", "no SA, TSi or TSr"));
        };
        let agreed = accept_reply(&self.config.esp_proposals, sa, DhMode::Skip)
            .map_err(|e| failure("bad_proposal_reply", e))?;
        let (local_ts, remote_ts) =
            replied_selectors(&self.config, &tsi.selectors, &tsr.selectors)?;
        let transport = payloads.notify(NotifyType::USE_TRANSPORT_MODE).is_some();
        let mode = match (self.config.mode, transport) {
            (ChildMode::Transport, true) => ChildMode::Transport,
            (ChildMode::Tunnel, false) => ChildMode::Tunnel,
            _ => return Err(failure("mode_mismatch", "the responder chose another mode")),
        };
        let inbound_spi = self.init.child_spi;
        self.child_from_agreed(
            &agreed,
            inbound_spi,
            mode,
            local_ts,
            remote_ts,
            self.first_child_keymat(),
        )
    }

    // -------------------------------------------------------------- shared

    /// The Child SA an agreement gives, with its KEYMAT (RFC 7296 §2.17):
    /// the exchange initiator's outbound keys are initiator→responder.
    fn child_from_agreed(
        &self,
        agreed: &proposal::Agreed,
        inbound_spi: u32,
        mode: ChildMode,
        local_ts: Vec<TsRange>,
        remote_ts: Vec<TsRange>,
        keymat: Keymat<'_>,
    ) -> Result<ChildSaEstablished, Failure> {
        let esp = agreed
            .esp()
            .ok_or_else(|| failure("internal", "not an ESP agreement"))?;
        let aead = esp
            .encryption
            .aead_alg()
            .ok_or_else(|| failure("no_proposal_chosen", "ESP without an AEAD"))?;
        let outbound_spi = <[u8; 4]>::try_from(agreed.peer_spi.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| failure("invalid_syntax", "an ESP SPI is not 4 octets"))?;
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| failure("internal", "no IKE keys"))?;
        let lengths = ChildSaKeyLengths::for_esp(crypto_encryption(esp.encryption), None)
            .map_err(|e| failure("internal", e))?;
        let child_keys = keys
            .child_sa_keys(keymat.shared, keymat.ni, keymat.nr, lengths)
            .map_err(|e| failure("internal", e))?;
        let (outbound_keys, inbound_keys) = if keymat.we_initiated {
            (
                child_keys.initiator_to_responder,
                child_keys.responder_to_initiator,
            )
        } else {
            (
                child_keys.responder_to_initiator,
                child_keys.initiator_to_responder,
            )
        };
        Ok(ChildSaEstablished {
            name: self.config.name.clone(),
            mode,
            inbound_spi,
            outbound_spi,
            aead,
            esn: esp.esn == proposal::Esn::Yes,
            rekeys: None,
            inbound_keys,
            outbound_keys,
            local_ts,
            remote_ts,
            udp_encap: self.nat_detected.then_some(UdpEncap {
                local_port: self.local.port(),
                remote_port: self.remote.port(),
            }),
            local: self.local,
            remote: self.remote,
        })
    }

    /// The KEYMAT inputs of the Child SA set up by IKE_AUTH: the
    /// IKE_SA_INIT nonces, no new DH secret.
    fn first_child_keymat(&self) -> Keymat<'_> {
        Keymat {
            shared: None,
            ni: &self.init.ni,
            nr: &self.init.nr,
            we_initiated: self.role == Role::Initiator,
        }
    }

    fn install_child(&mut self, child: ChildSaEstablished) {
        self.children.push(ChildSa {
            name: child.name.clone(),
            inbound_spi: child.inbound_spi,
            outbound_spi: child.outbound_spi,
            mode: child.mode,
            local_ts: child.local_ts.clone(),
            remote_ts: child.remote_ts.clone(),
        });
        self.events.push_back(IkeEvent::ChildSaEstablished(child));
    }

    fn push_established(&mut self, remote_id: Identity, initial_contact: bool) {
        let Some(suite) = self.suite else { return };
        self.events.push_back(IkeEvent::IkeSaEstablished {
            local_id: self.config.local_id.clone(),
            remote_id,
            suite,
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            initiator: self.role == Role::Initiator,
            local: self.local,
            remote: self.remote,
            nat_detected: self.nat_detected,
            initial_contact,
        });
    }

    /// Our AUTH payload over our ID payload (RFC 7296 §2.15).
    fn our_auth(&self, our_id: &IdPayload) -> Result<AuthPayload, Failure> {
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| failure("internal", "no keys"))?;
        let octets = match self.role {
            Role::Initiator => keys.initiator_signed_octets(
                &self.init.request,
                &self.init.nr,
                &our_id.body_bytes(),
            ),
            Role::Responder => keys.responder_signed_octets(
                &self.init.response,
                &self.init.ni,
                &our_id.body_bytes(),
            ),
        };
        match &self.config.auth {
            Auth::Psk(psk) => Ok(AuthPayload {
                method: AuthMethod::SHARED_KEY_MESSAGE_INTEGRITY_CODE,
                data: crypto::auth_psk(keys.suite().prf(), psk.as_bytes(), &octets),
            }),
            Auth::Pubkey(pk) => pk
                .sign(&octets, self.init.peer_sig_hashes.as_deref())
                .map_err(|e| failure("sign_failed", e)),
        }
    }

    /// Checks the peer's AUTH payload over its ID payload (and with
    /// certificates, the CERT payloads among `payloads`).
    fn verify_peer_auth(
        &self,
        payloads: &[Payload],
        peer_id: &IdPayload,
        auth: &AuthPayload,
    ) -> Result<(), Failure> {
        if matches!(self.config.auth, Auth::Psk(_))
            && auth.method != AuthMethod::SHARED_KEY_MESSAGE_INTEGRITY_CODE
        {
            return Err(failure(
                "auth_method",
                format!("the peer authenticates with {}, we use a PSK", auth.method),
            ));
        }
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| failure("internal", "no keys"))?;
        let octets = match self.role {
            Role::Responder => keys.initiator_signed_octets(
                &self.init.request,
                &self.init.nr,
                &peer_id.body_bytes(),
            ),
            Role::Initiator => keys.responder_signed_octets(
                &self.init.response,
                &self.init.ni,
                &peer_id.body_bytes(),
            ),
        };
        match &self.config.auth {
            Auth::Psk(psk) => {
                crypto::verify_auth_psk(keys.suite().prf(), psk.as_bytes(), &octets, &auth.data)
                    .map_err(|e| failure("auth_failed", e))
            }
            Auth::Pubkey(pk) => {
                let certs: Vec<&CertPayload> = payloads
                    .iter()
                    .filter_map(|p| match p {
                        Payload::Cert(c) => Some(c),
                        _ => None,
                    })
                    .collect();
                pk.verify(&certs, peer_id, auth, &octets)
                    .map_err(|e| failure(e.reason, e.detail))
            }
        }
    }

    /// IKE_SA_INIT's payloads of certificate authentication: the hashes we
    /// take (RFC 7427 §4) and, from a responder, the CAs we trust (CERTREQ).
    fn init_auth_payloads(&self, certreq: bool) -> Vec<Payload> {
        let Auth::Pubkey(pk) = &self.config.auth else {
            return Vec::new();
        };
        let mut out = vec![Payload::Notify(NotifyPayload::signature_hash_algorithms(
            &auth::OUR_SIGNATURE_HASHES,
        ))];
        if certreq {
            out.push(Payload::CertReq(pk.certreq()));
        }
        out
    }

    /// Initiator: the responder did not authenticate. Tell it in an
    /// INFORMATIONAL request of its own (RFC 7296 §2.21.2), sent once and
    /// not awaited: the SA is closed right after.
    fn tell_auth_failed(&mut self) {
        let header = Header::request(
            ExchangeType::INFORMATIONAL,
            self.spi_i,
            self.spi_r,
            self.our_next_id,
            true,
        );
        let notify = Payload::Notify(NotifyPayload::new(
            NotifyType::AUTHENTICATION_FAILED,
            vec![],
        ));
        if let Ok(bytes) = self.seal(header, &[notify]) {
            self.transmit.push_back(Datagram {
                src: self.local,
                dst: self.remote,
                payload: bytes,
            });
            *self.stats.errors_sent.entry("auth_failed").or_insert(0) += 1;
        }
    }

    /// The cipher of what we send, and of what the peer sends: by the
    /// original initiator, not by who sends the request.
    fn ciphers(&self) -> Option<(&SkCipher, &SkCipher)> {
        let keys = self.keys.as_ref()?;
        Some(match self.role {
            Role::Initiator => (keys.initiator_cipher(), keys.responder_cipher()),
            Role::Responder => (keys.responder_cipher(), keys.initiator_cipher()),
        })
    }

    /// Opens the SK payload of a received message: the first inner payload
    /// type and the inner chain.
    fn open(&self, view: &MessageView<'_>) -> Result<(PayloadType, Vec<u8>), Reject> {
        let sk = view.encrypted().ok_or_else(|| reject("not_encrypted"))?;
        if view.payloads().len() != 1 {
            return Err(reject("unencrypted_payloads"));
        }
        let (_, theirs) = self.ciphers().ok_or_else(|| reject("internal"))?;
        let plaintext = theirs
            .open(sk.associated_data(), sk.body())
            .map_err(|_| reject("icv"))?;
        Ok((sk.first_inner(), plaintext))
    }

    /// An encrypted message with `payloads` inside its SK payload.
    fn seal(&mut self, header: Header, payloads: &[Payload]) -> Result<Vec<u8>, String> {
        let keys = self.keys.as_ref().ok_or("no keys")?;
        let ours = match self.role {
            Role::Initiator => keys.initiator_cipher(),
            Role::Responder => keys.responder_cipher(),
        };
        let rng = &mut *self.rng;
        Message::encode_encrypted(
            &header,
            payloads,
            |len| ours.sk_body_len(len).unwrap_or(0),
            |out, plaintext| {
                let body = ours.seal(out, plaintext, IvSource::Generate(rng))?;
                out.extend_from_slice(&body);
                Ok::<(), crypto::CryptoError>(())
            },
        )
        .map_err(|e| e.to_string())
    }

    /// Sends a response to the request in `dg` from the address it was sent
    /// to, and caches it for retransmissions of that request.
    fn respond(&mut self, dg: &Datagram, message_id: u32, payload: Vec<u8>) {
        let response = Datagram {
            src: dg.dst,
            dst: dg.src,
            payload,
        };
        self.cached = Some(CachedResponse {
            message_id,
            request: dg.payload.clone(),
            response: response.clone(),
        });
        self.peer_next_id = message_id.wrapping_add(1);
        self.stats.requests_answered += 1;
        self.transmit.push_back(response);
    }

    fn send_request(&mut self, now: Instant, kind: RequestKind, payload: Vec<u8>) {
        let datagram = Datagram {
            src: self.local,
            dst: self.remote,
            payload,
        };
        self.pending = Some(Pending {
            kind,
            message_id: self.our_next_id,
            datagram: datagram.clone(),
            sent: 1,
            deadline: later(now, self.config.retransmit.interval(1)),
        });
        self.transmit.push_back(datagram);
    }

    /// Our outstanding request was answered.
    fn complete_request(&mut self) {
        if self.pending.take().is_some() {
            self.our_next_id = self.our_next_id.wrapping_add(1);
        }
    }

    fn fail(&mut self, f: Failure) {
        self.state = State::Closed;
        self.pending = None;
        self.events.push_back(IkeEvent::Failed {
            reason: f.reason,
            detail: f.detail,
        });
    }

    fn close_deleted(&mut self) {
        self.state = State::Closed;
        self.pending = None;
        self.children.clear();
        self.events.push_back(IkeEvent::Deleted);
    }
}

// ------------------------------------------------------------------ helpers

/// `now + wait`, or `now` where the clock cannot represent it (never
/// panics, unlike `Instant + Duration`).
/// The hash IDs of a SIGNATURE_HASH_ALGORITHMS notify, if there is one.
fn signature_hashes(payloads: &[Payload]) -> Option<Vec<u16>> {
    payloads
        .notify(NotifyType::SIGNATURE_HASH_ALGORITHMS)
        .map(|n| {
            n.data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect()
        })
}

fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).unwrap_or(now)
}

/// The counter reason of an error notify a peer sent.
fn notify_reason(notify: NotifyType) -> &'static str {
    match notify {
        NotifyType::NO_PROPOSAL_CHOSEN => "no_proposal_chosen",
        NotifyType::AUTHENTICATION_FAILED => "auth_failed",
        NotifyType::TS_UNACCEPTABLE => "ts_unacceptable",
        NotifyType::INVALID_SYNTAX => "invalid_syntax",
        NotifyType::INVALID_KE_PAYLOAD => "invalid_ke_payload",
        _ => "peer_error",
    }
}

/// NAT detection (RFC 7296 §2.23) from the peer's notifies: a NAT when its
/// source hash does not match the address we saw it from, or its
/// destination hash not the address we received on. strongSwan with
/// kernel-libipsec always fakes its source hash, which correctly reads as
/// a NAT (it wants UDP-encapsulated ESP). No notifies: no NAT handling.
fn detect_nat(
    payloads: &[Payload],
    spi_i: u64,
    spi_r: u64,
    src: SocketAddr,
    dst: SocketAddr,
) -> bool {
    let hashes = |t: NotifyType| -> Vec<&[u8]> {
        payloads
            .notifies()
            .filter(|n| n.notify_type == t)
            .map(|n| n.data.as_slice())
            .collect()
    };
    let sources = hashes(NotifyType::NAT_DETECTION_SOURCE_IP);
    let destinations = hashes(NotifyType::NAT_DETECTION_DESTINATION_IP);
    if sources.is_empty() || destinations.is_empty() {
        return false;
    }
    let peer_seen = nat_detection_hash(spi_i, spi_r, src);
    let we_seen = nat_detection_hash(spi_i, spi_r, dst);
    let peer_behind_nat = !sources.contains(&peer_seen.as_slice());
    let we_behind_nat = !destinations.contains(&we_seen.as_slice());
    peer_behind_nat || we_behind_nat
}

fn crypto_encryption(e: proposal::Encryption) -> crypto::Encryption {
    match e {
        proposal::Encryption::Aes128Cbc => crypto::Encryption::AesCbc128,
        proposal::Encryption::Aes256Cbc => crypto::Encryption::AesCbc256,
        proposal::Encryption::Aes128Gcm16 => crypto::Encryption::AesGcm16_128,
        proposal::Encryption::Aes256Gcm16 => crypto::Encryption::AesGcm16_256,
        proposal::Encryption::ChaCha20Poly1305 => crypto::Encryption::ChaCha20Poly1305,
    }
}

fn crypto_integrity(i: proposal::Integrity) -> Option<crypto::Integrity> {
    crypto::Integrity::from_iana_id(i.transform_id())
}

fn crypto_prf(p: proposal::Prf) -> Option<crypto::Prf> {
    crypto::Prf::from_iana_id(p.transform_id())
}

fn derive_ike_keys(
    suite: &proposal::IkeSuite,
    shared: &[u8],
    ni: &[u8],
    nr: &[u8],
    spi_i: u64,
    spi_r: u64,
) -> Result<IkeSaKeys, String> {
    let integrity = match suite.integrity {
        Some(i) => Some(crypto_integrity(i).ok_or("integrity without an implementation")?),
        None => None,
    };
    let prf = crypto_prf(suite.prf).ok_or("PRF without an implementation")?;
    let crypto_suite = crypto::IkeSuite::new(crypto_encryption(suite.encryption), integrity, prf)
        .map_err(|e| e.to_string())?;
    IkeSaKeys::initial(
        crypto_suite,
        shared,
        ni,
        nr,
        &spi_i.to_be_bytes(),
        &spi_r.to_be_bytes(),
    )
    .map_err(|e| e.to_string())
}

fn ts_payload(ranges: &[TsRange]) -> TsPayload {
    TsPayload {
        selectors: ranges.iter().copied().map(TrafficSelector::Range).collect(),
    }
}

/// The address-range selectors of a TS payload (others are ignored: bitw
/// has no use for them).
/// The selectors a responder answered with, as ranges, if they are within
/// what `config` proposes (an initiator never accepts wider ones).
fn replied_selectors(
    config: &Config,
    tsi: &[TrafficSelector],
    tsr: &[TrafficSelector],
) -> Result<(Vec<TsRange>, Vec<TsRange>), Failure> {
    let local_ts = ranges(tsi);
    let remote_ts = ranges(tsr);
    if local_ts.is_empty()
        || remote_ts.is_empty()
        || !all_within(&local_ts, &config.local_ts)
        || !all_within(&remote_ts, &config.remote_ts)
    {
        return Err(failure(
            "ts_unacceptable",
            "the responder's selectors exceed ours",
        ));
    }
    Ok((local_ts, remote_ts))
}

fn ranges(selectors: &[TrafficSelector]) -> Vec<TsRange> {
    selectors
        .iter()
        .filter_map(|s| match s {
            TrafficSelector::Range(r) => Some(*r),
            TrafficSelector::Unknown { .. } => None,
        })
        .collect()
}

/// The responder's narrowing (RFC 7296 §2.9): every non-empty intersection
/// of a peer selector with one of ours, in the peer's order, duplicates
/// removed.
pub fn narrow(peer: &[TrafficSelector], ours: &[TsRange]) -> Vec<TsRange> {
    let mut out: Vec<TsRange> = Vec::new();
    for theirs in ranges(peer) {
        for mine in ours {
            if let Some(both) = intersect(&theirs, mine) {
                if !out.contains(&both) {
                    out.push(both);
                }
            }
        }
    }
    out
}

/// The selector both allow, if any: same family, compatible protocol, the
/// overlap of ports and addresses.
pub fn intersect(a: &TsRange, b: &TsRange) -> Option<TsRange> {
    let ip_protocol = match (a.ip_protocol, b.ip_protocol) {
        (0, p) | (p, 0) => p,
        (p, q) if p == q => p,
        _ => return None,
    };
    let start_port = a.start_port.max(b.start_port);
    let end_port = a.end_port.min(b.end_port);
    if start_port > end_port {
        return None;
    }
    let addresses = match (a.addresses, b.addresses) {
        (AddressRange::V4 { start: s1, end: e1 }, AddressRange::V4 { start: s2, end: e2 }) => {
            let (start, end) = (s1.max(s2), e1.min(e2));
            (start <= end).then_some(AddressRange::V4 { start, end })?
        }
        (AddressRange::V6 { start: s1, end: e1 }, AddressRange::V6 { start: s2, end: e2 }) => {
            let (start, end) = (s1.max(s2), e1.min(e2));
            (start <= end).then_some(AddressRange::V6 { start, end })?
        }
        _ => return None,
    };
    Some(TsRange {
        ip_protocol,
        start_port,
        end_port,
        addresses,
    })
}

/// Whether every selector lies inside one of `allowed`.
fn all_within(selectors: &[TsRange], allowed: &[TsRange]) -> bool {
    selectors
        .iter()
        .all(|s| allowed.iter().any(|a| intersect(s, a) == Some(*s)))
}

#[cfg(test)]
#[path = "sa_tests.rs"]
mod tests;
