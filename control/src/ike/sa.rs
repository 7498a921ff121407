//! One IKE SA as a state machine without I/O (RFC 7296): IKE_SA_INIT and
//! IKE_AUTH with a pre-shared key or with certificates ([`Auth`]; what is
//! sent and checked: [`super::auth`]) and the first Child SA (ESP, AEAD,
//! tunnel or transport mode), then CREATE_CHILD_SA for more Child SAs, Child
//! SA rekeys (optional PFS) and IKE SA rekeys (both ends each), and
//! INFORMATIONAL liveness checks and deletes (both ends).
//!
//! The engine is driven as quinn-proto drives a connection:
//!
//! - inputs: [`IkeSa::handle`] with `(now, Datagram)` for every IKE message
//!   the I/O layer routes to this SA (non-ESP marker already removed; after
//!   an IKE rekey, datagrams for every pair in [`IkeSa::all_spis`] go to
//!   the same object), and [`IkeSa::handle_timeout`] when
//!   [`IkeSa::poll_timeout`]'s instant passes;
//! - outputs: [`IkeSa::poll_transmit`] (datagrams with the addresses to send
//!   from and to: the engine answers from the address a request was sent
//!   to, because bitw speaks as the terminal, and moves to port 4500 after
//!   NAT detection; the I/O layer adds the non-ESP marker there, except to
//!   a NAT-T keepalive, whose payload is the single octet
//!   [`NAT_KEEPALIVE`] and goes as it is, RFC 3948 §2.3),
//!   [`IkeSa::poll_event`] ([`IkeEvent`]: SAs established, rekeyed,
//!   deleted, failed; datagrams rejected) and [`IkeSa::stats`] (every
//!   rejected datagram, by reason).
//!
//! A responder starts with [`IkeSa::responder`] and its first datagram (the
//! IKE_SA_INIT request; [`super::cookie::CookieJar`] may vet it first); an
//! initiator with [`IkeSa::initiate`], which queues the IKE_SA_INIT request.
//! Randomness (nonces, DH values, AEAD IV starts, timer jitter) and SPIs are
//! injected ([`SpiAllocator`]), so tests run deterministically.
//!
//! Our requests go one at a time (window 1): [`IkeSa::create_child`],
//! [`IkeSa::rekey_child`], [`IkeSa::rekey_ike`], [`IkeSa::delete_child`],
//! [`IkeSa::send_liveness_check`] and [`IkeSa::delete`] queue behind an
//! outstanding request and go in order. The timers of [`Config`] and
//! [`ChildConfig`] run inside: Child SA rekeys (less up to 10 % at random,
//! so both ends do not collide) and deletes at their life time, IKE SA
//! rekeys, liveness checks when the peer was silent for `dpd_delay` (no
//! answer: [`IkeEvent::Failed`] with reason `"timeout"`), NAT-T keepalives.
//! After a Child SA rekey we initiated, the engine deletes the old SA.
//!
//! An IKE rekey (RFC 7296 §2.18) keeps this object: it continues as the new
//! IKE SA (new SPIs and keys, message IDs from 0, the same Child SAs) and
//! keeps the old SA's keys, SPIs and message IDs until the old SA's Delete
//! is done (sent by the rekey's initiator, answered by the responder) or
//! given up. Simultaneous IKE rekeys (§2.8.2, as strongSwan does them):
//! both requests are answered, and once both exchanges are done the new SA
//! created with the lowest of the four nonces loses: its creator deletes
//! it, the other new SA stays and its creator deletes the old one. If the
//! peer's exchange completes and it deletes the old SA before answering
//! ours, its new SA stays and ours is dropped; a request to rekey an SA
//! that was already rekeyed gets TEMPORARY_FAILURE (§2.25.2).
//!
//! Simultaneous Child SA rekeys (§2.8.1) go the same way: a peer's rekey of
//! the SA our outstanding rekey replaces is answered (and its new SA
//! reported, `initiated: false`), and when ours is answered the exchange
//! with the lowest of the four nonces loses. If ours lost, we delete our new
//! SA at once and never report it (the peer deletes the old SA, which moves
//! our outbound traffic to its new SA); if ours won, our new SA is reported
//! (`initiated: true`) and we delete the old one, and the peer deletes its
//! redundant new SA ([`IkeEvent::ChildSaDeleted`] here). A peer's REKEY_SA
//! for an SA a rekey replaced already, or that we are deleting, gets
//! TEMPORARY_FAILURE (§2.25.1): when the peer's request comes after our
//! rekey of that SA completed, ours stays and the peer's fails.
//!
//! Nothing a peer sends can make the engine panic: every datagram is checked
//! by the message decoder, SK payloads are opened before their content is
//! believed, and a rejected datagram leaves the state as it was (apart from
//! the counter that records why and an [`IkeEvent::Rejected`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bitw_common::sa_params::{AeadAlg, NAT_T_PORT_DEFAULT};
use rand_core::CryptoRngCore;

use crate::ike::auth;
use crate::ike::crypto::{self, ChildSaKeyLengths, EspKeys, IkeSaKeys, IvSource, SkCipher};
use crate::ike::dh::{self, KeyPair};
use crate::ike::dn;
use crate::ike::message::{
    decode_payload_chain, nat_detection_hash, AddressRange, AuthMethod, AuthPayload, CertPayload,
    DeletePayload, ExchangeType, Header, IdPayload, IdType, KePayload, Message, MessageView,
    NotifyPayload, NotifyType, Payload, PayloadType, PayloadsExt, ProtocolId, TrafficSelector,
    TsPayload, TsRange,
};
use crate::ike::proposal::{self, accept_reply, offer, select, DhGroup, DhMode, Proposal};

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
/// A NAT-T keepalive's only octet (RFC 3948 §2.3).
pub const NAT_KEEPALIVE: u8 = 0xff;
/// How long after a failed rekey we try again.
const REKEY_RETRY: Duration = Duration::from_secs(30);
/// How long the old IKE SA waits for its Delete after a rekey the peer
/// initiated (the peer may also retransmit the rekey request meanwhile).
const OLD_IKE_SA_WAIT: Duration = Duration::from_secs(60);
/// How often an initiator follows a COOKIE request before giving up.
const MAX_COOKIE_ROUNDS: u8 = 2;

// ------------------------------------------------------------------ config

/// An identity (RFC 7296 §3.5): what we send as IDi/IDr and what the peer's
/// must be. [`Identity::matches`] compares by type and data exactly, except
/// distinguished names, which are compared by meaning ([`super::dn`]).
/// `==` compares the bytes.
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

    /// Whether the peer's ID payload names this identity: DNs by meaning
    /// ([`dn::equal`]: string types, case and insignificant spaces aside),
    /// anything else byte for byte.
    pub fn matches(&self, id: &IdPayload) -> bool {
        match self {
            Identity::DerDn(der) => id.id_type == IdType::DER_ASN1_DN && dn::equal(der, &id.data),
            _ => self.to_payload() == *id,
        }
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

/// One Child SA a connection can set up: what it carries and how long its
/// keys live.
#[derive(Debug, Clone)]
pub struct ChildConfig {
    /// The Child SA's name, for events and [`IkeSa::create_child`].
    pub name: String,
    /// ESP proposals; AEAD only (the dataplane's transforms). A DH group in
    /// them means PFS for CREATE_CHILD_SA.
    pub esp_proposals: Vec<Proposal>,
    /// Our side's traffic selectors.
    pub local_ts: Vec<TsRange>,
    /// The peer's side's traffic selectors.
    pub remote_ts: Vec<TsRange>,
    pub mode: ChildMode,
    /// Rekey this long after the Child SA was established (None: never).
    pub rekey_time: Option<Duration>,
    /// Delete it this long after establishment if no rekey succeeded (None:
    /// never). strongSwan's default is rekey_time * 1.1.
    pub life_time: Option<Duration>,
}

/// One connection: who we are, who the peer must be, the key, what we
/// accept, its Child SAs and its timers.
#[derive(Debug, Clone)]
pub struct Config {
    /// The connection's name, for events.
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
    /// The Child SAs, in order of preference: a responder takes the first
    /// whose selectors meet the initiator's.
    pub children: Vec<ChildConfig>,
    /// Rekey the IKE SA this long after it was established (None: never).
    pub ike_rekey_time: Option<Duration>,
    /// Send a liveness check when nothing came from the peer for this long
    /// (None: never).
    pub dpd_delay: Option<Duration>,
    /// With a NAT detected: send a NAT-T keepalive this often (None: never).
    pub keepalive_interval: Option<Duration>,
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
    /// We sent the request of the exchange that made this SA. For a rekey it
    /// says when to move outbound traffic to the new SA (make-before-break):
    /// at once when we initiated (the peer installed the new inbound SA
    /// before it answered), after the old SA's Delete when the peer did.
    /// After simultaneous rekeys, a rekey we initiated supersedes the
    /// peer's of the same old SA reported before it (that one lost and the
    /// peer deletes it): its outbound SA must never be used.
    pub initiated: bool,
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
    /// A Child SA could not be set up or rekeyed (IKE_AUTH's, or a
    /// CREATE_CHILD_SA); the IKE SA stays.
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
    /// The IKE SA was rekeyed (RFC 7296 §2.18): the new SPIs are in use, the
    /// Child SAs moved over. The old SPIs stay in [`IkeSa::all_spis`] until
    /// the old SA's Delete is done.
    IkeSaRekeyed {
        old_spis: (u64, u64),
        new_spis: (u64, u64),
    },
    /// A datagram was rejected (also counted in [`Stats::rejected`]).
    Rejected {
        reason: &'static str,
        detail: String,
    },
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
    /// Our IKE SA rekeys that were refused or could not be sent (each is
    /// tried again later).
    pub ike_rekeys_failed: u64,
    /// Our Child SA rekeys that lost to a simultaneous rekey of the peer's
    /// (RFC 7296 §2.8.1): their new SAs were deleted at once.
    pub child_rekeys_redundant: u64,
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
    /// Initiator: the child config IKE_AUTH sets up.
    child: usize,
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
    DeleteChild {
        inbound_spi: u32,
    },
    /// CREATE_CHILD_SA for a new or a rekeyed Child SA ([`ChildExchange`]).
    CreateChild,
    /// CREATE_CHILD_SA rekeying the IKE SA ([`IkeRekey`]).
    RekeyIke,
}

/// A request waiting for the window (one request at a time, RFC 7296 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    CreateChild { config: usize },
    RekeyChild { inbound_spi: u32 },
    RekeyIke,
    DeleteChild { inbound_spi: u32 },
    Liveness,
    DeleteIke,
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
    /// Index into `config.children`.
    config: usize,
    inbound_spi: u32,
    outbound_spi: u32,
    mode: ChildMode,
    local_ts: Vec<TsRange>,
    remote_ts: Vec<TsRange>,
    /// When we rekey it (cleared once a rekey is under way or done).
    rekey_at: Option<Instant>,
    /// When we delete it if it is still there.
    expire_at: Option<Instant>,
    /// A rekey (ours or the peer's) replaced it: it waits for its Delete,
    /// is not rekeyed again, and a peer's REKEY_SA for it gets
    /// TEMPORARY_FAILURE (RFC 7296 §2.25.1).
    replaced: bool,
    /// Our new SA that lost simultaneous rekeys (RFC 7296 §2.8.1): never
    /// reported, kept only until its Delete is answered.
    redundant: bool,
}

/// Our CREATE_CHILD_SA request for a new or rekeyed Child SA, until
/// answered.
struct ChildExchange {
    config: usize,
    /// Rekeying: the old SA's inbound SPI.
    rekeys: Option<u32>,
    new_inbound_spi: u32,
    ni: Vec<u8>,
    /// With PFS: our DH pair.
    dh: Option<KeyPair>,
    mode: ChildMode,
    /// Sent again with the group an INVALID_KE_PAYLOAD asked for.
    ke_retried: bool,
}

/// Our CREATE_CHILD_SA request rekeying the IKE SA, until answered.
struct IkeRekey {
    new_spi: u64,
    ni: Vec<u8>,
    dh: KeyPair,
    /// Sent again with the group an INVALID_KE_PAYLOAD asked for.
    ke_retried: bool,
}

/// The new IKE SA of the peer's rekey that we answered while ours was
/// outstanding (RFC 7296 §2.8.2): which of the two stays is decided when
/// ours is answered.
struct PeerRekey {
    generation: Generation,
    ni: Vec<u8>,
    nr: Vec<u8>,
}

/// The peer's rekey of a Child SA that we answered while our own rekey of
/// it was outstanding (RFC 7296 §2.8.1): which new SA stays is decided when
/// ours is answered.
struct PeerChildRekey {
    /// The old SA's inbound SPI.
    old: u32,
    ni: Vec<u8>,
    nr: Vec<u8>,
}

/// One IKE SA's SPIs, keys and message windows. After an IKE rekey the
/// object holds two: the new one in use and the old one until its Delete.
struct Generation {
    /// Who initiated this IKE SA: the original initiator, or after a rekey
    /// whoever initiated the rekey (RFC 7296 §2.18). It sets the I flag and
    /// which keys are "initiator" keys.
    role: Role,
    spi_i: u64,
    spi_r: u64,
    suite: Option<proposal::IkeSuite>,
    keys: Option<IkeSaKeys>,
    /// Message ID of the next request the peer may send.
    peer_next_id: u32,
    cached: Option<CachedResponse>,
    /// Message ID of our next request.
    our_next_id: u32,
    pending: Option<Pending>,
}

impl Generation {
    fn new(role: Role) -> Generation {
        Generation {
            role,
            spi_i: 0,
            spi_r: 0,
            suite: None,
            keys: None,
            peer_next_id: 0,
            cached: None,
            our_next_id: 0,
            pending: None,
        }
    }
}

/// An IKE SA replaced by a rekey (or the loser of simultaneous rekeys),
/// until its Delete is done.
struct OldSa {
    generation: Generation,
    /// Dropped then even without a Delete.
    deadline: Instant,
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
    /// Whether we are the original initiator (the first IKE SA's role).
    original_role: Role,
    state: State,
    rng: Box<dyn CryptoRngCore + Send>,
    spis: Box<dyn SpiAllocator>,
    /// The IKE SA in use.
    cur: Generation,
    /// IKE SAs a rekey replaced, until their Deletes are done.
    olds: Vec<OldSa>,
    /// A datagram of the old IKE SA is being handled (`cur` and `old` are
    /// swapped meanwhile).
    on_old: bool,
    /// The old IKE SA's Delete is done: drop it.
    old_done: bool,
    local: SocketAddr,
    remote: SocketAddr,
    nat_detected: bool,
    init: InitExchange,
    /// Our CREATE_CHILD_SA for a Child SA in flight.
    child_exchange: Option<ChildExchange>,
    /// Our IKE SA rekey in flight.
    ike_rekey: Option<IkeRekey>,
    /// The peer's IKE SA rekey answered while ours was in flight.
    peer_rekey: Option<PeerRekey>,
    /// The peer's rekey of the Child SA our `child_exchange` rekeys,
    /// answered while ours was in flight.
    peer_child_rekey: Option<PeerChildRekey>,
    /// Responder: when the half-open SA is dropped without IKE_AUTH.
    half_open_deadline: Option<Instant>,
    children: Vec<ChildSa>,
    /// Our requests waiting for the window.
    queue: VecDeque<Queued>,
    ike_rekey_at: Option<Instant>,
    dpd_at: Option<Instant>,
    keepalive_at: Option<Instant>,
    transmit: VecDeque<Datagram>,
    events: VecDeque<IkeEvent>,
    stats: Stats,
}

impl fmt::Debug for IkeSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IkeSa")
            .field("name", &self.config.name)
            .field("role", &self.cur.role)
            .field("state", &self.state)
            .field("spi_i", &format_args!("{:016x}", self.cur.spi_i))
            .field("spi_r", &format_args!("{:016x}", self.cur.spi_r))
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
    /// `remote` from `local` and arms its retransmission. IKE_AUTH sets up
    /// the Child SA of `config.children` named `child`; without one of that
    /// name the SA fails at once with reason `"config"`.
    pub fn initiate(
        now: Instant,
        config: Config,
        child: &str,
        local: SocketAddr,
        remote: SocketAddr,
        rng: Box<dyn CryptoRngCore + Send>,
        spis: Box<dyn SpiAllocator>,
    ) -> IkeSa {
        let mut sa = IkeSa::new(config, Role::Initiator, local, remote, rng, spis);
        sa.cur.spi_i = sa.spis.ike_spi();
        sa.state = State::InitSent;
        let mut ni = vec![0u8; OUR_NONCE_LEN];
        sa.rng.fill_bytes(&mut ni);
        sa.init.ni = ni;
        let Some(index) = sa.child_index(child) else {
            sa.fail(failure("config", format!("no Child SA named {child:?}")));
            return sa;
        };
        sa.init.child = index;
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
            original_role: role,
            state: State::AwaitInit,
            rng,
            spis,
            cur: Generation::new(role),
            olds: Vec::new(),
            on_old: false,
            old_done: false,
            local,
            remote,
            nat_detected: false,
            init: InitExchange::default(),
            child_exchange: None,
            ike_rekey: None,
            peer_rekey: None,
            peer_child_rekey: None,
            half_open_deadline: None,
            children: Vec::new(),
            queue: VecDeque::new(),
            ike_rekey_at: None,
            dpd_at: None,
            keepalive_at: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    // -------------------------------------------------------------- API

    /// The IKE SPIs of the IKE SA in use, as in the header (initiator's,
    /// responder's; 0 while unknown): the I/O layer routes datagrams by them.
    pub fn spis(&self) -> (u64, u64) {
        (self.cur.spi_i, self.cur.spi_r)
    }

    /// Every SPI pair this object answers to now: the IKE SA in use and,
    /// after a rekey until its Delete is done, the old one.
    pub fn all_spis(&self) -> Vec<(u64, u64)> {
        let mut all = vec![self.spis()];
        all.extend(
            self.olds
                .iter()
                .map(|o| (o.generation.spi_i, o.generation.spi_r)),
        );
        all
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

    /// When [`handle_timeout`](IkeSa::handle_timeout) is due: the earliest
    /// of the retransmissions (of both IKE SAs during a rekey), the
    /// half-open limit, the old IKE SA's limit, the rekey and life times of
    /// the Child SAs, the IKE SA's rekey, DPD and NAT-T keepalives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let mut deadlines: Vec<Option<Instant>> = vec![
            self.cur.pending.as_ref().map(|p| p.deadline),
            self.half_open_deadline
                .filter(|_| self.state == State::AwaitAuth),
        ];
        for old in &self.olds {
            deadlines.push(Some(old.deadline));
            deadlines.push(old.generation.pending.as_ref().map(|p| p.deadline));
        }
        if self.state == State::Established {
            deadlines.extend([self.ike_rekey_at, self.dpd_at, self.keepalive_at]);
            for child in &self.children {
                deadlines.extend([child.rekey_at, child.expire_at]);
            }
        }
        deadlines.into_iter().flatten().min()
    }

    /// Runs what is due: retransmits our outstanding request (or gives up
    /// after the configured tries), drops a half-open SA, and starts the
    /// rekeys, deletes, liveness checks and keepalives the timers ask for.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::AwaitAuth && self.half_open_deadline.is_some_and(|d| now >= d) {
            self.fail(failure(
                "half_open_timeout",
                format!("no IKE_AUTH within {HALF_OPEN_TIMEOUT:?} of IKE_SA_INIT"),
            ));
            return;
        }
        if let Err(detail) = self.retransmit_due(now) {
            self.fail(failure("timeout", detail));
            return;
        }
        for index in (0..self.olds.len()).rev() {
            let expired = now >= self.olds[index].deadline;
            // An old SA's Delete going unanswered ends that SA only.
            let gave_up = self
                .with_old(index, |sa| sa.retransmit_due(now).is_err())
                .unwrap_or(false);
            if (expired || gave_up) && index < self.olds.len() {
                let old = self.olds.remove(index);
                self.drop_old(old);
            }
        }
        if self.state == State::Established {
            self.run_timers(now);
        }
        self.drive(now);
    }

    /// Handles one received IKE message.
    pub fn handle(&mut self, now: Instant, datagram: Datagram) {
        let was_awaiting_init = self.state == State::AwaitInit;
        let result = if let Some(index) = self.old_index(&datagram.payload) {
            self.with_old(index, |sa| sa.dispatch(now, &datagram))
                .unwrap_or(Ok(()))
        } else {
            self.dispatch(now, &datagram)
        };
        match result {
            Ok(()) => {
                // Anything authentic from the peer shows it alive (DPD).
                if self.state == State::Established {
                    self.dpd_at = self.config.dpd_delay.map(|d| later(now, d));
                }
            }
            Err(r) => {
                *self.stats.rejected.entry(r.reason).or_insert(0) += 1;
                self.events.push_back(IkeEvent::Rejected {
                    reason: r.reason,
                    detail: describe_datagram(&datagram),
                });
            }
        }
        if was_awaiting_init && self.state == State::AwaitAuth {
            self.half_open_deadline = Some(later(now, HALF_OPEN_TIMEOUT));
        }
        self.drive(now);
    }

    /// Sends an empty INFORMATIONAL request (RFC 7296 §1.4): the peer must
    /// answer. Without an answer after the retries the SA fails with
    /// reason `"timeout"`. Queued while another request is outstanding;
    /// `false` when the SA is not established.
    pub fn send_liveness_check(&mut self, now: Instant) -> bool {
        self.request(now, Queued::Liveness)
    }

    /// Deletes the IKE SA (and its Child SAs) with the peer. The SA closes
    /// with [`IkeEvent::Deleted`] when the peer answers, or fails on timeout.
    /// Queued behind an outstanding request.
    pub fn delete(&mut self, now: Instant) -> bool {
        self.request(now, Queued::DeleteIke)
    }

    /// Deletes the Child SA whose inbound SPI is `inbound_spi`; queued
    /// behind an outstanding request (asking twice queues it once).
    /// `false` when the SA is not established or there is no such Child SA.
    pub fn delete_child(&mut self, now: Instant, inbound_spi: u32) -> bool {
        if !self.children.iter().any(|c| c.inbound_spi == inbound_spi) {
            return false;
        }
        self.request(now, Queued::DeleteChild { inbound_spi })
    }

    /// Rekeys the Child SA whose inbound SPI is `inbound_spi` with a
    /// CREATE_CHILD_SA exchange (RFC 7296 §2.8), with PFS when its ESP
    /// proposals name a DH group. The new SA comes as
    /// [`IkeEvent::ChildSaEstablished`] with `rekeys` set, and the engine
    /// then deletes the old one itself (a [`delete_child`](IkeSa::delete_child)
    /// of it by the caller is harmless); a refusal comes as
    /// [`IkeEvent::ChildSaFailed`] and the old SA stays. If the peer rekeys
    /// the same SA at once and its rekey wins (see the module
    /// documentation), ours ends without an event of its own: the peer's new
    /// SA is the successor. Queued behind an
    /// outstanding request; `false` when the SA is not established or there
    /// is no such Child SA (or a rekey replaced it already).
    pub fn rekey_child(&mut self, now: Instant, inbound_spi: u32) -> bool {
        let Some(child) = self
            .children
            .iter_mut()
            .find(|c| c.inbound_spi == inbound_spi && !c.replaced)
        else {
            return false;
        };
        if self.state != State::Established {
            return false;
        }
        child.rekey_at = None;
        self.request(now, Queued::RekeyChild { inbound_spi })
    }

    /// Sets up another Child SA of `config.children` named `child` with a
    /// CREATE_CHILD_SA exchange (with PFS when its ESP proposals name a DH
    /// group): [`IkeEvent::ChildSaEstablished`] (`rekeys: None`) or
    /// [`IkeEvent::ChildSaFailed`]. Queued behind an outstanding request;
    /// `false` when the SA is not established or no child has that name.
    pub fn create_child(&mut self, now: Instant, child: &str) -> bool {
        match self.child_index(child) {
            Some(config) => self.request(now, Queued::CreateChild { config }),
            None => false,
        }
    }

    /// Rekeys the IKE SA (RFC 7296 §1.3.2, §2.18): CREATE_CHILD_SA with our
    /// new SPI, a nonce and a KE of the current group. When answered, this
    /// object continues as the new IKE SA ([`IkeEvent::IkeSaRekeyed`]) and
    /// deletes the old one. Queued behind an outstanding request; `false`
    /// when the SA is not established.
    pub fn rekey_ike(&mut self, now: Instant) -> bool {
        self.request(now, Queued::RekeyIke)
    }

    // -------------------------------------------------------------- queue and timers

    fn child_index(&self, name: &str) -> Option<usize> {
        self.config.children.iter().position(|c| c.name == name)
    }

    fn request(&mut self, now: Instant, q: Queued) -> bool {
        if self.state != State::Established {
            return false;
        }
        self.enqueue(q);
        self.drive(now);
        true
    }

    /// Queues `q` unless the same request is already queued or
    /// outstanding (a new Child SA is never a duplicate).
    fn enqueue(&mut self, q: Queued) {
        let outstanding = match q {
            Queued::CreateChild { .. } => false,
            Queued::RekeyChild { inbound_spi } => self
                .child_exchange
                .as_ref()
                .is_some_and(|c| c.rekeys == Some(inbound_spi)),
            Queued::RekeyIke => self.ike_rekey.is_some(),
            Queued::DeleteChild { inbound_spi } => self
                .cur
                .pending
                .as_ref()
                .is_some_and(|p| p.kind == RequestKind::DeleteChild { inbound_spi }),
            Queued::Liveness => self
                .cur
                .pending
                .as_ref()
                .is_some_and(|p| p.kind == RequestKind::Liveness),
            Queued::DeleteIke => self
                .cur
                .pending
                .as_ref()
                .is_some_and(|p| p.kind == RequestKind::DeleteIke),
        };
        let queued = !matches!(q, Queued::CreateChild { .. }) && self.queue.contains(&q);
        if !outstanding && !queued {
            self.queue.push_back(q);
        }
    }

    /// Sends queued requests while the window is free.
    fn drive(&mut self, now: Instant) {
        while self.state == State::Established && self.cur.pending.is_none() {
            let Some(&next) = self.queue.front() else {
                return;
            };
            // One Child SA exchange at a time (one may still be answered
            // under the old IKE SA), and no IKE rekey before the last one's
            // old SA is gone.
            let wait = match next {
                Queued::CreateChild { .. } | Queued::RekeyChild { .. } => {
                    self.child_exchange.is_some()
                }
                Queued::RekeyIke => !self.olds.is_empty() || self.ike_rekey.is_some(),
                _ => false,
            };
            if wait {
                return;
            }
            self.queue.pop_front();
            self.start(now, next);
        }
    }

    fn start(&mut self, now: Instant, q: Queued) {
        match q {
            Queued::CreateChild { config } => {
                if let Err(f) = self.send_create_child(now, config, None, None) {
                    self.child_failed(config, f.reason);
                }
            }
            Queued::RekeyChild { inbound_spi } => {
                // A rekey of the peer's may have replaced it meanwhile.
                let Some(old) = self
                    .children
                    .iter()
                    .find(|c| c.inbound_spi == inbound_spi && !c.replaced)
                    .cloned()
                else {
                    return;
                };
                if let Err(f) = self.send_create_child(now, old.config, Some(&old), None) {
                    self.child_failed(old.config, f.reason);
                }
            }
            Queued::RekeyIke => {
                if self.send_ike_rekey(now, None).is_err() {
                    self.ike_rekey_failed(now);
                }
            }
            Queued::DeleteChild { inbound_spi } => {
                if self.children.iter().any(|c| c.inbound_spi == inbound_spi) {
                    self.send_informational(
                        now,
                        RequestKind::DeleteChild { inbound_spi },
                        vec![Payload::Delete(DeletePayload::esp(&[inbound_spi]))],
                    );
                }
            }
            Queued::Liveness => {
                self.send_informational(now, RequestKind::Liveness, Vec::new());
            }
            Queued::DeleteIke => {
                self.send_informational(
                    now,
                    RequestKind::DeleteIke,
                    vec![Payload::Delete(DeletePayload::ike())],
                );
            }
        }
    }

    /// `now + wait` less up to a tenth of `wait` at random, as strongSwan's
    /// rekey jitter: both ends with the same times do not collide.
    fn jittered(&mut self, now: Instant, wait: Duration) -> Instant {
        let tenth = u64::try_from(wait.as_millis() / 10).unwrap_or(u64::MAX);
        let jitter = if tenth == 0 {
            0
        } else {
            self.rng.next_u64() % (tenth + 1)
        };
        later(now, wait.saturating_sub(Duration::from_millis(jitter)))
    }

    /// Arms the IKE SA's timers when it is (newly) in use.
    fn arm_ike_timers(&mut self, now: Instant) {
        self.ike_rekey_at = self.config.ike_rekey_time.map(|t| self.jittered(now, t));
        self.dpd_at = self.config.dpd_delay.map(|d| later(now, d));
        self.keepalive_at = self
            .config
            .keepalive_interval
            .filter(|_| self.nat_detected)
            .map(|i| later(now, i));
    }

    fn run_timers(&mut self, now: Instant) {
        let due = |t: &mut Option<Instant>| {
            if t.is_some_and(|t| now >= t) {
                *t = None;
                true
            } else {
                false
            }
        };
        let mut requests = Vec::new();
        for child in &mut self.children {
            if due(&mut child.rekey_at) {
                requests.push(Queued::RekeyChild {
                    inbound_spi: child.inbound_spi,
                });
            }
            if due(&mut child.expire_at) {
                requests.push(Queued::DeleteChild {
                    inbound_spi: child.inbound_spi,
                });
            }
        }
        if due(&mut self.ike_rekey_at) {
            requests.push(Queued::RekeyIke);
        }
        if due(&mut self.dpd_at) {
            self.dpd_at = self.config.dpd_delay.map(|d| later(now, d));
            // An outstanding or queued request checks liveness already.
            if self.cur.pending.is_none() && self.queue.is_empty() {
                requests.push(Queued::Liveness);
            }
        }
        for q in requests {
            self.enqueue(q);
        }
        if due(&mut self.keepalive_at) {
            self.keepalive_at = self.config.keepalive_interval.map(|i| later(now, i));
            // RFC 3948 §2.3: one octet 0xff, sent without the non-ESP marker.
            self.transmit.push_back(Datagram {
                src: self.local,
                dst: self.remote,
                payload: vec![NAT_KEEPALIVE],
            });
        }
    }

    /// Retransmits the current generation's outstanding request if due;
    /// `Err` (with the log detail) once the tries are used up.
    fn retransmit_due(&mut self, now: Instant) -> Result<(), String> {
        let Some(pending) = self.cur.pending.as_mut() else {
            return Ok(());
        };
        if now < pending.deadline {
            return Ok(());
        }
        let retransmit = self.config.retransmit;
        if pending.sent >= retransmit.tries.max(1) {
            let detail = format!(
                "no answer to {:?} after {} transmissions",
                pending.kind, pending.sent
            );
            self.cur.pending = None;
            return Err(detail);
        }
        pending.sent += 1;
        pending.deadline = later(now, retransmit.interval(pending.sent));
        self.transmit.push_back(pending.datagram.clone());
        self.stats.retransmits_sent += 1;
        Ok(())
    }

    /// Which old IKE SA a datagram names by its SPIs, if any.
    fn old_index(&self, payload: &[u8]) -> Option<usize> {
        let spi_i = u64::from_be_bytes(payload.get(0..8)?.try_into().ok()?);
        let spi_r = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
        self.olds
            .iter()
            .position(|o| (o.generation.spi_i, o.generation.spi_r) == (spi_i, spi_r))
    }

    /// Runs `f` with old IKE SA `index`'s generation in `cur` (the handlers
    /// then work on it unchanged); drops that SA afterwards if `f` finished
    /// it.
    fn with_old<T>(&mut self, index: usize, f: impl FnOnce(&mut IkeSa) -> T) -> Option<T> {
        if index >= self.olds.len() {
            return None;
        }
        let mut old = self.olds.remove(index);
        std::mem::swap(&mut self.cur, &mut old.generation);
        self.on_old = true;
        let result = f(self);
        self.on_old = false;
        std::mem::swap(&mut self.cur, &mut old.generation);
        if std::mem::take(&mut self.old_done) {
            self.drop_old(old);
        } else {
            let at = index.min(self.olds.len());
            self.olds.insert(at, old);
        }
        Some(result)
    }

    /// Forgets the old IKE SA, and what was still outstanding on it.
    fn drop_old(&mut self, old: OldSa) {
        match old.generation.pending.map(|p| p.kind) {
            Some(RequestKind::CreateChild) => {
                self.peer_child_rekey = None;
                if let Some(exchange) = self.child_exchange.take() {
                    self.child_failed(exchange.config, "ike_rekeyed");
                }
            }
            Some(RequestKind::RekeyIke) => {
                self.ike_rekey = None;
                self.stats.ike_rekeys_failed += 1;
            }
            _ => {}
        }
    }

    fn child_failed(&mut self, config: usize, reason: &'static str) {
        let name = self
            .config
            .children
            .get(config)
            .map_or_else(|| self.config.name.clone(), |c| c.name.clone());
        self.events
            .push_back(IkeEvent::ChildSaFailed { name, reason });
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
            self.handle_request(now, dg, &view)
        }
    }

    fn handle_request(&mut self, now: Instant, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        // The I flag says who sent it: the original initiator's requests
        // carry it, ours are answered only when we are the responder.
        let from_original_initiator = header.flags.is_initiator();
        if self.state != State::AwaitInit && header.spi_i != self.cur.spi_i {
            return Err(reject("bad_spi"));
        }
        if from_original_initiator != (self.cur.role == Role::Responder) {
            return Err(reject("bad_flags"));
        }
        if self.state == State::AwaitInit {
            return self.handle_init_request(dg, view);
        }
        if let Some(cached) = &self.cur.cached {
            let init_retransmit = header.exchange == ExchangeType::IKE_SA_INIT && header.spi_r == 0;
            if header.message_id == cached.message_id
                && (init_retransmit || header.spi_r == self.cur.spi_r)
            {
                if cached.request != dg.payload {
                    return Err(reject("retransmit_mismatch"));
                }
                self.transmit.push_back(cached.response.clone());
                self.stats.retransmits_answered += 1;
                return Ok(());
            }
        }
        if header.spi_r != self.cur.spi_r {
            return Err(reject("bad_spi"));
        }
        if header.message_id != self.cur.peer_next_id {
            return Err(reject("bad_message_id"));
        }
        match (self.state, header.exchange) {
            (State::AwaitAuth, ExchangeType::IKE_AUTH) => self.handle_auth_request(now, dg, view),
            (State::Established, ExchangeType::INFORMATIONAL) => {
                self.handle_informational_request(now, dg, view)
            }
            (State::Established, ExchangeType::CREATE_CHILD_SA) => {
                self.handle_create_child_request(now, dg, view)
            }
            _ => Err(reject("unexpected_exchange")),
        }
    }

    fn handle_response(&mut self, now: Instant, dg: &Datagram, view: &MessageView<'_>) -> Handled {
        let header = view.header();
        let Some(pending) = &self.cur.pending else {
            return Err(reject("unexpected_response"));
        };
        if header.spi_i != self.cur.spi_i {
            return Err(reject("bad_spi"));
        }
        if header.message_id != pending.message_id {
            return Err(reject("bad_message_id"));
        }
        // The response comes from the other party: its I flag is set
        // exactly when it is the original initiator.
        if header.flags.is_initiator() == (self.cur.role == Role::Initiator) {
            return Err(reject("bad_flags"));
        }
        if pending.kind != RequestKind::Init && header.spi_r != self.cur.spi_r {
            return Err(reject("bad_spi"));
        }
        match pending.kind {
            RequestKind::Init => self.handle_init_response(now, dg, view),
            RequestKind::Auth => self.handle_auth_response(now, view),
            RequestKind::CreateChild | RequestKind::RekeyIke
                if header.exchange != ExchangeType::CREATE_CHILD_SA =>
            {
                Err(reject("unexpected_exchange"))
            }
            RequestKind::CreateChild => self.handle_create_child_response(now, view),
            RequestKind::RekeyIke => self.handle_ike_rekey_response(now, view),
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
        if suite.dh.iana_id() != ke.group {
            // The peer may retry with the group we want (RFC 7296 §1.3).
            self.answer_init_error(
                dg,
                &header,
                NotifyPayload::invalid_ke(suite.dh.iana_id()),
                "invalid_ke_payload",
            );
            return Ok(());
        }
        let ni = ni.to_vec();
        let pair = KeyPair::generate(suite.dh, &mut *self.rng).map_err(|_| reject("internal"))?;
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

        self.cur.spi_i = header.spi_i;
        self.cur.spi_r = spi_r;
        self.local = dg.dst;
        self.remote = dg.src;
        self.nat_detected = nat;
        self.cur.suite = Some(suite);
        self.cur.keys = Some(keys);
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
    fn handle_auth_request(
        &mut self,
        now: Instant,
        dg: &Datagram,
        view: &MessageView<'_>,
    ) -> Handled {
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
            Ok((child_payloads, config, child)) => {
                reply.extend(child_payloads);
                Some((config, child))
            }
            Err((notify, f, config)) => {
                reply.push(Payload::Notify(NotifyPayload::new(notify, vec![])));
                *self.stats.errors_sent.entry(f.reason).or_insert(0) += 1;
                self.child_failed(config, f.reason);
                None
            }
        };
        let response = self
            .seal(header.response(), &reply)
            .map_err(|_| reject("internal"))?;
        self.state = State::Established;
        self.respond(dg, header.message_id, response);
        self.push_established(remote_id, initial_contact);
        self.arm_ike_timers(now);
        if let Some((config, child)) = child {
            self.install_child(now, config, child);
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

    /// The first child config whose selectors meet the peer's (RFC 7296
    /// §2.9): its index and the narrowed TSi and TSr.
    fn select_child_config(
        &self,
        tsi: &[TrafficSelector],
        tsr: &[TrafficSelector],
    ) -> Option<(usize, Vec<TsRange>, Vec<TsRange>)> {
        self.config
            .children
            .iter()
            .enumerate()
            .find_map(|(index, child)| {
                let ts_i = narrow(tsi, &child.remote_ts);
                let ts_r = narrow(tsr, &child.local_ts);
                (!ts_i.is_empty() && !ts_r.is_empty()).then_some((index, ts_i, ts_r))
            })
    }

    /// The Child SA of an IKE_AUTH request: the child config, the ESP
    /// proposal, the narrowed selectors, our SPI and the keys; or the error
    /// notify to send (with the child config it concerns, if any).
    #[allow(clippy::type_complexity)]
    fn accept_child(
        &mut self,
        payloads: &[Payload],
    ) -> Result<(Vec<Payload>, usize, ChildSaEstablished), (NotifyType, Failure, usize)> {
        let (Some(sa), Some(tsi), Some(tsr)) = (payloads.sa(), payloads.ts_i(), payloads.ts_r())
        else {
            return Err((
                NotifyType::INVALID_SYNTAX,
                failure("invalid_syntax", "IKE_AUTH without SA, TSi or TSr"),
                usize::MAX,
            ));
        };
        let Some((config, ts_i, ts_r)) = self.select_child_config(&tsi.selectors, &tsr.selectors)
        else {
            return Err((
                NotifyType::TS_UNACCEPTABLE,
                failure(
                    "ts_unacceptable",
                    "no overlap of the peer's selectors with any child's",
                ),
                usize::MAX,
            ));
        };
        let child_config = &self.config.children[config];
        let agreed = select(&child_config.esp_proposals, sa, DhMode::Skip).map_err(|e| {
            (
                NotifyType::NO_PROPOSAL_CHOSEN,
                failure("no_proposal_chosen", e),
                config,
            )
        })?;
        let mode = if child_config.mode == ChildMode::Transport
            && payloads.notify(NotifyType::USE_TRANSPORT_MODE).is_some()
        {
            ChildMode::Transport
        } else {
            ChildMode::Tunnel
        };
        let inbound_spi = self.spis.esp_spi();
        let child = self
            .child_from_agreed(
                config,
                &agreed,
                inbound_spi,
                mode,
                ts_r.clone(),
                ts_i.clone(),
                self.first_child_keymat(),
            )
            .map_err(|f| (NotifyType::NO_PROPOSAL_CHOSEN, f, config))?;
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
        Ok((out, config, child))
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
    fn handle_informational_request(
        &mut self,
        now: Instant,
        dg: &Datagram,
        view: &MessageView<'_>,
    ) -> Handled {
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
        for child in deleted.into_iter().filter(|c| !c.redundant) {
            self.events.push_back(IkeEvent::ChildSaDeleted {
                name: child.name,
                inbound_spi: child.inbound_spi,
                outbound_spi: child.outbound_spi,
            });
        }
        if delete_ike {
            if self.on_old {
                // An old IKE SA after a rekey: only it goes.
                self.old_done = true;
            } else if let Some(theirs) = self.peer_rekey.take() {
                // Simultaneous rekeys: the peer finished its own and deleted
                // this SA before answering ours; its new SA stays.
                self.switch_to(now, theirs.generation, OLD_IKE_SA_WAIT);
                // It stays only for the answer to our rekey, still due.
                if self
                    .olds
                    .last()
                    .is_some_and(|o| o.generation.pending.is_none())
                {
                    if let Some(old) = self.olds.pop() {
                        self.drop_old(old);
                    }
                }
            } else {
                self.close_deleted();
            }
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
    /// the agreed proposal has a DH group; or a rekey of the IKE SA.
    /// Refusals are answered with the error notify, and the IKE SA stays.
    fn handle_create_child_request(
        &mut self,
        now: Instant,
        dg: &Datagram,
        view: &MessageView<'_>,
    ) -> Handled {
        let header = view.header();
        let (first, plaintext) = self.open(view)?;
        let payloads = match decode_payload_chain(first, &plaintext) {
            Ok(p) => p,
            Err(e) => {
                let reply = [Payload::Notify(NotifyPayload::new(
                    NotifyType::INVALID_SYNTAX,
                    vec![],
                ))];
                let response = self
                    .seal(header.response(), &reply)
                    .map_err(|_| reject("internal"))?;
                *self.stats.errors_sent.entry(e.reason()).or_insert(0) += 1;
                self.respond(dg, header.message_id, response);
                return Ok(());
            }
        };
        let rekeys_ike = payloads
            .sa()
            .is_some_and(|sa| sa.proposals.iter().any(|p| p.protocol == ProtocolId::IKE));
        if rekeys_ike {
            return self.handle_ike_rekey_request(now, dg, &header, &payloads);
        }
        let (reply, child) = match self.accept_create_child(&payloads) {
            Ok((reply, config, child, nr)) => (reply, Some((config, child, nr))),
            Err((notify, f)) => {
                *self.stats.errors_sent.entry(f.reason).or_insert(0) += 1;
                (vec![Payload::Notify(notify)], None)
            }
        };
        let response = self
            .seal(header.response(), &reply)
            .map_err(|_| reject("internal"))?;
        self.respond(dg, header.message_id, response);
        if let Some((config, child, nr)) = child {
            // Simultaneous rekeys (RFC 7296 §2.8.1): the peer rekeys the SA
            // our outstanding request rekeys; which new SA stays is decided
            // when ours is answered.
            if let Some(old) = child.rekeys.filter(|old| {
                self.child_exchange
                    .as_ref()
                    .is_some_and(|e| e.rekeys == Some(*old))
            }) {
                self.peer_child_rekey = Some(PeerChildRekey {
                    old,
                    ni: payloads.nonce().map(<[u8]>::to_vec).unwrap_or_default(),
                    nr,
                });
            }
            self.install_child(now, config, child);
        }
        Ok(())
    }

    /// Whether a Delete of our Child SA `inbound_spi` is outstanding or
    /// queued.
    fn deleting_child(&self, inbound_spi: u32) -> bool {
        let delete = RequestKind::DeleteChild { inbound_spi };
        self.cur.pending.as_ref().is_some_and(|p| p.kind == delete)
            || self.olds.iter().any(|o| {
                o.generation
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.kind == delete)
            })
            || self.queue.contains(&Queued::DeleteChild { inbound_spi })
    }

    /// The Child SA of a CREATE_CHILD_SA request and the response payloads,
    /// or the error notify to answer with.
    #[allow(clippy::type_complexity)]
    fn accept_create_child(
        &mut self,
        payloads: &[Payload],
    ) -> Result<(Vec<Payload>, usize, ChildSaEstablished, Vec<u8>), (NotifyPayload, Failure)> {
        let error = |t: NotifyType, reason: &'static str, detail: &str| {
            (NotifyPayload::new(t, vec![]), failure(reason, detail))
        };
        let (Some(sa), Some(ni), Some(tsi), Some(tsr)) = (
            payloads.sa(),
            payloads.nonce(),
            payloads.ts_i(),
            payloads.ts_r(),
        ) else {
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
                    .and_then(|spi| self.children.iter().find(|c| c.outbound_spi == spi));
                // RFC 7296 §2.25.1: an SA a rekey replaced, or that we are
                // deleting, is not rekeyed (the peer's rekey collided with
                // ours and ours completed first, or with our Delete).
                if let Some(old) = old {
                    if old.replaced || self.deleting_child(old.inbound_spi) {
                        return Err(error(
                            NotifyType::TEMPORARY_FAILURE,
                            "temporary_failure",
                            "the Child SA is being rekeyed or deleted",
                        ));
                    }
                }
                match old.map(|c| (c.inbound_spi, c.config)) {
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
        // A rekey keeps the old SA's child config; a new SA takes the first
        // whose selectors meet the peer's.
        let selected = match rekeys {
            Some((_, config)) => {
                let child = &self.config.children[config];
                let ts_i = narrow(&tsi.selectors, &child.remote_ts);
                let ts_r = narrow(&tsr.selectors, &child.local_ts);
                (!ts_i.is_empty() && !ts_r.is_empty()).then_some((config, ts_i, ts_r))
            }
            None => self.select_child_config(&tsi.selectors, &tsr.selectors),
        };
        let Some((config, ts_i, ts_r)) = selected else {
            return Err(error(
                NotifyType::TS_UNACCEPTABLE,
                "ts_unacceptable",
                "no overlap of the peer's selectors with ours",
            ));
        };
        let rekeys = rekeys.map(|(old, _)| old);
        let child_config = &self.config.children[config];
        let ke = payloads.ke();
        let agreed = select(
            &child_config.esp_proposals,
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
            (Some(g), Some(k)) if k.group == g.iana_id() => Some(k),
            (Some(g), _) => {
                return Err((
                    NotifyPayload::invalid_ke(g.iana_id()),
                    failure("invalid_ke_payload", "the KE group is not the agreed one"),
                ))
            }
        };
        let wants_transport = child_config.mode == ChildMode::Transport;
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
        let mode = if wants_transport && payloads.notify(NotifyType::USE_TRANSPORT_MODE).is_some() {
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
                config,
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
        reply.push(Payload::Nonce(nr.clone()));
        reply.extend(our_ke.map(Payload::Ke));
        reply.push(Payload::TsI(ts_payload(&ts_i)));
        reply.push(Payload::TsR(ts_payload(&ts_r)));
        Ok((reply, config, child, nr))
    }

    /// A CREATE_CHILD_SA request rekeying the IKE SA (RFC 7296 §1.3.2):
    /// answered with our new SPI, Nr and KEr, and this object then
    /// continues as the new IKE SA while the old one waits for the peer's
    /// Delete. While our own IKE rekey is outstanding (simultaneous rekeys,
    /// RFC 7296 §2.8.2) the new SA waits in `peer_rekey` until ours is
    /// answered, and then the lowest of the four nonces decides.
    fn handle_ike_rekey_request(
        &mut self,
        now: Instant,
        dg: &Datagram,
        header: &Header,
        payloads: &[Payload],
    ) -> Handled {
        let (reply, new) = match self.accept_ike_rekey(payloads) {
            Ok((reply, new)) => (reply, Some(new)),
            Err((notify, f)) => {
                *self.stats.errors_sent.entry(f.reason).or_insert(0) += 1;
                (vec![Payload::Notify(notify)], None)
            }
        };
        let response = self
            .seal(header.response(), &reply)
            .map_err(|_| reject("internal"))?;
        self.respond(dg, header.message_id, response);
        match new {
            Some(new) if self.ike_rekey.is_some() => self.peer_rekey = Some(new),
            Some(new) => self.switch_to(now, new.generation, OLD_IKE_SA_WAIT),
            None => {}
        }
        Ok(())
    }

    /// The new IKE SA of a peer's IKE rekey and our reply, or the error
    /// notify to answer with.
    fn accept_ike_rekey(
        &mut self,
        payloads: &[Payload],
    ) -> Result<(Vec<Payload>, PeerRekey), (NotifyPayload, Failure)> {
        let error = |t: NotifyType, reason: &'static str, detail: &str| {
            (NotifyPayload::new(t, vec![]), failure(reason, detail))
        };
        // An old SA (already rekeyed) is not rekeyed again (RFC 7296
        // §2.25.2); nor is the current one before the last rekey is done.
        if self.on_old || !self.olds.is_empty() || self.peer_rekey.is_some() {
            return Err(error(
                NotifyType::TEMPORARY_FAILURE,
                "temporary_failure",
                "the last IKE rekey is still finishing",
            ));
        }
        let (Some(sa), Some(ni), Some(ke)) = (payloads.sa(), payloads.nonce(), payloads.ke())
        else {
            return Err(error(
                NotifyType::INVALID_SYNTAX,
                "invalid_syntax",
                "IKE rekey without SA, Nonce or KE",
            ));
        };
        if !NONCE_LEN_RANGE.contains(&ni.len()) {
            return Err(error(
                NotifyType::INVALID_SYNTAX,
                "bad_nonce",
                "nonce length",
            ));
        }
        let agreed = select(
            &self.config.ike_proposals,
            sa,
            DhMode::Negotiate {
                ke_group: Some(ke.group),
            },
        )
        .map_err(|e| {
            (
                NotifyPayload::new(NotifyType::NO_PROPOSAL_CHOSEN, vec![]),
                failure("no_proposal_chosen", e),
            )
        })?;
        let Some(suite) = agreed.ike().copied() else {
            return Err(error(NotifyType::NO_PROPOSAL_CHOSEN, "internal", "not IKE"));
        };
        if suite.dh.iana_id() != ke.group {
            return Err((
                NotifyPayload::invalid_ke(suite.dh.iana_id()),
                failure("invalid_ke_payload", "the KE group is not the agreed one"),
            ));
        }
        let peer_spi = <[u8; 8]>::try_from(agreed.peer_spi.as_slice())
            .map(u64::from_be_bytes)
            .ok()
            .filter(|spi| *spi != 0)
            .ok_or_else(|| error(NotifyType::INVALID_SYNTAX, "invalid_syntax", "IKE SPI"))?;
        let group = dh::DhGroup::from_iana_id(ke.group)
            .ok_or_else(|| error(NotifyType::NO_PROPOSAL_CHOSEN, "internal", "DH group"))?;
        let pair = KeyPair::generate(group, &mut *self.rng)
            .map_err(|_| error(NotifyType::NO_PROPOSAL_CHOSEN, "internal", "DH"))?;
        let shared = pair
            .agree(&ke.data)
            .map_err(|_| error(NotifyType::INVALID_SYNTAX, "bad_ke", "bad KE data"))?;
        let mut nr = vec![0u8; OUR_NONCE_LEN];
        self.rng.fill_bytes(&mut nr);
        let our_spi = self.spis.ike_spi();
        let keys = self
            .rekeyed_keys(&suite, shared.as_bytes(), ni, &nr, peer_spi, our_spi)
            .map_err(|e| error(NotifyType::NO_PROPOSAL_CHOSEN, "internal", &e))?;
        let reply = vec![
            Payload::Sa(agreed.reply(our_spi.to_be_bytes().to_vec())),
            Payload::Nonce(nr.clone()),
            Payload::Ke(KePayload {
                group: ke.group,
                data: pair.public_value().to_vec(),
            }),
        ];
        let mut new = Generation::new(Role::Responder);
        new.spi_i = peer_spi;
        new.spi_r = our_spi;
        new.suite = Some(suite);
        new.keys = Some(keys);
        Ok((
            reply,
            PeerRekey {
                generation: new,
                ni: ni.to_vec(),
                nr,
            },
        ))
    }

    /// The keys of the IKE SA that replaces the current one (RFC 7296
    /// §2.18): "i" is whoever initiated the rekey.
    fn rekeyed_keys(
        &self,
        suite: &proposal::IkeSuite,
        shared: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> Result<IkeSaKeys, String> {
        let keys = self.cur.keys.as_ref().ok_or("no IKE keys")?;
        keys.rekeyed(
            crypto_suite(suite)?,
            shared,
            ni,
            nr,
            &spi_i.to_be_bytes(),
            &spi_r.to_be_bytes(),
        )
        .map_err(|e| e.to_string())
    }

    /// Puts the new IKE SA in use; the current one becomes an old one,
    /// kept at most `wait` for its Delete.
    fn switch_to(&mut self, now: Instant, new: Generation, wait: Duration) {
        let old = std::mem::replace(&mut self.cur, new);
        let old_spis = (old.spi_i, old.spi_r);
        self.olds.push(OldSa {
            generation: old,
            deadline: later(now, wait),
        });
        self.events.push_back(IkeEvent::IkeSaRekeyed {
            old_spis,
            new_spis: self.spis(),
        });
        self.arm_ike_timers(now);
    }

    /// Sends our CREATE_CHILD_SA request rekeying the IKE SA, with a KE of
    /// the current group or of `retry_group` (INVALID_KE_PAYLOAD's).
    fn send_ike_rekey(
        &mut self,
        now: Instant,
        retry_group: Option<DhGroup>,
    ) -> Result<(), Failure> {
        let group = retry_group
            .or(self.cur.suite.map(|s| s.dh))
            .or_else(|| proposal::preferred_dh_group(&self.config.ike_proposals))
            .ok_or_else(|| failure("config", "no DH group"))?;
        let pair = KeyPair::generate(group, &mut *self.rng).map_err(|e| failure("internal", e))?;
        let mut ni = vec![0u8; OUR_NONCE_LEN];
        self.rng.fill_bytes(&mut ni);
        let new_spi = self.spis.ike_spi();
        let payloads = [
            Payload::Sa(offer(
                &self.config.ike_proposals,
                &new_spi.to_be_bytes(),
                DhMode::Negotiate {
                    ke_group: Some(group.iana_id()),
                },
            )),
            Payload::Nonce(ni.clone()),
            Payload::Ke(KePayload {
                group: group.iana_id(),
                data: pair.public_value().to_vec(),
            }),
        ];
        let header = self.request_header(ExchangeType::CREATE_CHILD_SA);
        let bytes = self
            .seal(header, &payloads)
            .map_err(|e| failure("internal", e))?;
        self.ike_rekey = Some(IkeRekey {
            new_spi,
            ni,
            dh: pair,
            ke_retried: retry_group.is_some(),
        });
        self.send_request(now, RequestKind::RekeyIke, bytes);
        Ok(())
    }

    /// The answer to our IKE rekey: switch to the new IKE SA and delete the
    /// old one; or, refused, try again later. If we also answered a rekey
    /// of the peer meanwhile (RFC 7296 §2.8.2), the new SA created with the
    /// lowest of the four nonces loses and its creator deletes it; a
    /// refusal of ours leaves the peer's.
    fn handle_ike_rekey_response(&mut self, now: Instant, view: &MessageView<'_>) -> Handled {
        let (first, plaintext) = self.open(view)?;
        let payloads = decode_payload_chain(first, &plaintext).map_err(|e| reject(e.reason()))?;
        self.complete_request();
        let Some(rekey) = self.ike_rekey.take() else {
            return Err(reject("internal"));
        };
        if self.on_old {
            // The peer deleted this SA after its own simultaneous rekey,
            // whose new SA we took: ours is moot, and this SA is done.
            self.stats.ike_rekeys_failed += 1;
            self.old_done = true;
            return Ok(());
        }
        if self.peer_rekey.is_none() {
            let wanted = wanted_group(&payloads, rekey.dh.group(), rekey.ke_retried)
                .filter(|g| self.config.ike_proposals.iter().any(|p| p.dh.contains(g)));
            if let Some(group) = wanted {
                // RFC 7296 §1.3: the same request again with the wanted group.
                if self.send_ike_rekey(now, Some(group)).is_err() {
                    self.ike_rekey_failed(now);
                }
                return Ok(());
            }
        }
        let theirs = self.peer_rekey.take();
        let ours = match self.ike_from_rekey_response(&payloads, &rekey) {
            Ok(ours) => ours,
            Err(_) => {
                self.ike_rekey_failed(now);
                if let Some(theirs) = theirs {
                    self.switch_to(now, theirs.generation, OLD_IKE_SA_WAIT);
                }
                return Ok(());
            }
        };
        let (ours, nr) = ours;
        let ours_lose = theirs.as_ref().is_some_and(|t| {
            let lowest_ours = rekey.ni.as_slice().min(nr.as_slice());
            let lowest_theirs = t.ni.as_slice().min(t.nr.as_slice());
            lowest_ours < lowest_theirs
        });
        match theirs {
            Some(theirs) if ours_lose => {
                self.stats.ike_rekeys_failed += 1;
                // The peer deletes the old SA; we delete ours, which lost.
                self.switch_to(now, theirs.generation, OLD_IKE_SA_WAIT);
                self.olds.push(OldSa {
                    generation: ours,
                    deadline: later(now, OLD_IKE_SA_WAIT),
                });
                self.delete_old(now, self.olds.len() - 1);
            }
            theirs => {
                self.switch_to(now, ours, OLD_IKE_SA_WAIT);
                // RFC 7296 §2.18: the rekey's initiator deletes the old SA,
                // under the old keys.
                self.delete_old(now, self.olds.len() - 1);
                // The peer's new SA lost: the peer deletes it.
                if let Some(theirs) = theirs {
                    self.olds.push(OldSa {
                        generation: theirs.generation,
                        deadline: later(now, OLD_IKE_SA_WAIT),
                    });
                }
            }
        }
        Ok(())
    }

    /// Sends the Delete of old IKE SA `index`, under its keys.
    fn delete_old(&mut self, now: Instant, index: usize) {
        self.with_old(index, |sa| {
            sa.send_informational(
                now,
                RequestKind::DeleteIke,
                vec![Payload::Delete(DeletePayload::ike())],
            )
        });
    }

    /// The new IKE SA our rekey made, and the peer's nonce.
    fn ike_from_rekey_response(
        &self,
        payloads: &[Payload],
        rekey: &IkeRekey,
    ) -> Result<(Generation, Vec<u8>), Failure> {
        if let Some(error) = payloads.notifies().find(|n| n.notify_type.is_error()) {
            return Err(failure(notify_reason(error.notify_type), error.notify_type));
        }
        let (Some(sa), Some(nr), Some(ke)) = (payloads.sa(), payloads.nonce(), payloads.ke())
        else {
            return Err(failure("invalid_syntax", "no SA, Nonce or KE"));
        };
        if !NONCE_LEN_RANGE.contains(&nr.len()) {
            return Err(failure("bad_nonce", "nonce length"));
        }
        let group = rekey.dh.group().iana_id();
        let agreed = accept_reply(
            &self.config.ike_proposals,
            sa,
            DhMode::Negotiate {
                ke_group: Some(group),
            },
        )
        .map_err(|e| failure("bad_proposal_reply", e))?;
        let suite = agreed
            .ike()
            .copied()
            .ok_or_else(|| failure("internal", "not IKE"))?;
        let peer_spi = <[u8; 8]>::try_from(agreed.peer_spi.as_slice())
            .map(u64::from_be_bytes)
            .ok()
            .filter(|spi| *spi != 0)
            .ok_or_else(|| failure("invalid_syntax", "IKE SPI"))?;
        if ke.group != group {
            return Err(failure("bad_ke", "KE of another group"));
        }
        let shared = rekey.dh.agree(&ke.data).map_err(|e| failure("bad_ke", e))?;
        let keys = self
            .rekeyed_keys(
                &suite,
                shared.as_bytes(),
                &rekey.ni,
                nr,
                rekey.new_spi,
                peer_spi,
            )
            .map_err(|e| failure("internal", e))?;
        let mut new = Generation::new(Role::Initiator);
        new.spi_i = rekey.new_spi;
        new.spi_r = peer_spi;
        new.suite = Some(suite);
        new.keys = Some(keys);
        Ok((new, nr.to_vec()))
    }

    fn ike_rekey_failed(&mut self, now: Instant) {
        self.stats.ike_rekeys_failed += 1;
        self.ike_rekey_at = Some(self.jittered(now, REKEY_RETRY));
    }

    /// Sends our CREATE_CHILD_SA request for a new Child SA of child config
    /// `config`, or rekeying `old`.
    /// `retry_group`: the PFS group an INVALID_KE_PAYLOAD asked for.
    fn send_create_child(
        &mut self,
        now: Instant,
        config: usize,
        old: Option<&ChildSa>,
        retry_group: Option<DhGroup>,
    ) -> Result<(), Failure> {
        let child_config = self
            .config
            .children
            .get(config)
            .ok_or_else(|| failure("config", "no such child"))?;
        let group =
            retry_group.or_else(|| proposal::preferred_dh_group(&child_config.esp_proposals));
        let dh = match group {
            Some(g) => {
                Some(KeyPair::generate(g, &mut *self.rng).map_err(|e| failure("internal", e))?)
            }
            None => None,
        };
        let mut ni = vec![0u8; OUR_NONCE_LEN];
        self.rng.fill_bytes(&mut ni);
        let new_inbound_spi = self.spis.esp_spi();
        let (mode, local_ts, remote_ts) = match old {
            Some(c) => (c.mode, c.local_ts.clone(), c.remote_ts.clone()),
            None => (
                child_config.mode,
                child_config.local_ts.clone(),
                child_config.remote_ts.clone(),
            ),
        };
        let mut payloads = Vec::new();
        if mode == ChildMode::Transport {
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::USE_TRANSPORT_MODE,
                vec![],
            )));
        }
        if let Some(c) = old {
            payloads.push(Payload::Notify(NotifyPayload::rekey_esp(c.inbound_spi)));
        }
        payloads.push(Payload::Sa(offer(
            &child_config.esp_proposals,
            &new_inbound_spi.to_be_bytes(),
            DhMode::Negotiate {
                ke_group: group.map(|g| g.iana_id()),
            },
        )));
        payloads.push(Payload::Nonce(ni.clone()));
        if let Some(pair) = &dh {
            payloads.push(Payload::Ke(KePayload {
                group: pair.group().iana_id(),
                data: pair.public_value().to_vec(),
            }));
        }
        payloads.push(Payload::TsI(ts_payload(&local_ts)));
        payloads.push(Payload::TsR(ts_payload(&remote_ts)));
        let header = self.request_header(ExchangeType::CREATE_CHILD_SA);
        let bytes = self
            .seal(header, &payloads)
            .map_err(|e| failure("internal", e))?;
        self.child_exchange = Some(ChildExchange {
            config,
            rekeys: old.map(|c| c.inbound_spi),
            new_inbound_spi,
            ni,
            dh,
            mode,
            ke_retried: retry_group.is_some(),
        });
        self.send_request(now, RequestKind::CreateChild, bytes);
        Ok(())
    }

    fn request_header(&self, exchange: ExchangeType) -> Header {
        Header::request(
            exchange,
            self.cur.spi_i,
            self.cur.spi_r,
            self.cur.our_next_id,
            self.cur.role == Role::Initiator,
        )
    }

    /// Sends an INFORMATIONAL request (the window must be free).
    fn send_informational(&mut self, now: Instant, kind: RequestKind, payloads: Vec<Payload>) {
        let header = self.request_header(ExchangeType::INFORMATIONAL);
        if let Ok(bytes) = self.seal(header, &payloads) {
            self.send_request(now, kind, bytes);
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
            RequestKind::DeleteIke if self.on_old => self.old_done = true,
            RequestKind::DeleteIke => self.close_deleted(),
            RequestKind::DeleteChild { inbound_spi } => {
                if let Some(pos) = self
                    .children
                    .iter()
                    .position(|c| c.inbound_spi == inbound_spi)
                {
                    let child = self.children.remove(pos);
                    if !child.redundant {
                        self.events.push_back(IkeEvent::ChildSaDeleted {
                            name: child.name,
                            inbound_spi: child.inbound_spi,
                            outbound_spi: child.outbound_spi,
                        });
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The answer to our CREATE_CHILD_SA for a Child SA: the new SA (and,
    /// for a rekey, the old one's Delete queued), or (on an error notify)
    /// [`IkeEvent::ChildSaFailed`] with an old SA left in place.
    fn handle_create_child_response(&mut self, now: Instant, view: &MessageView<'_>) -> Handled {
        let (first, plaintext) = self.open(view)?;
        let payloads = decode_payload_chain(first, &plaintext).map_err(|e| reject(e.reason()))?;
        self.complete_request();
        let Some(exchange) = self.child_exchange.take() else {
            return Err(reject("internal"));
        };
        let wanted = exchange
            .dh
            .as_ref()
            .and_then(|pair| wanted_group(&payloads, pair.group(), exchange.ke_retried))
            .filter(|g| {
                self.config
                    .children
                    .get(exchange.config)
                    .is_some_and(|c| c.esp_proposals.iter().any(|p| p.dh.contains(g)))
            });
        if let Some(group) = wanted {
            // RFC 7296 §1.3: the same request again with the wanted group
            // (not for an SA that a rekey of the peer's replaced meanwhile).
            let old = exchange
                .rekeys
                .and_then(|spi| {
                    self.children
                        .iter()
                        .find(|c| c.inbound_spi == spi && !c.replaced)
                })
                .cloned();
            if exchange.rekeys.is_none() || old.is_some() {
                match self.send_create_child(now, exchange.config, old.as_ref(), Some(group)) {
                    Ok(()) => return Ok(()),
                    Err(f) => {
                        self.child_failed(exchange.config, f.reason);
                        return Ok(());
                    }
                }
            }
        }
        // The peer's rekey of the same SA that we answered meanwhile.
        let theirs = self
            .peer_child_rekey
            .take()
            .filter(|t| exchange.rekeys == Some(t.old));
        match self.child_from_create_response(&payloads, &exchange) {
            Ok(child) => {
                let nr = payloads.nonce().unwrap_or_default();
                let ours_lose = theirs.as_ref().is_some_and(|t| {
                    let lowest_ours = exchange.ni.as_slice().min(nr);
                    let lowest_theirs = t.ni.as_slice().min(t.nr.as_slice());
                    lowest_ours < lowest_theirs
                });
                if ours_lose {
                    self.redundant_child(exchange.config, &child);
                } else {
                    self.install_child(now, exchange.config, child);
                    // RFC 7296 §2.8: the rekey's initiator deletes the old
                    // SA (if the peer's rekey lost, the peer deletes its
                    // new SA).
                    if let Some(old) = exchange.rekeys {
                        self.enqueue(Queued::DeleteChild { inbound_spi: old });
                    }
                }
            }
            Err(f) => {
                self.child_failed(exchange.config, f.reason);
                // A failed rekey is tried again later, while the SA lives
                // and no rekey of the peer's replaced it.
                if let Some(old) = exchange.rekeys {
                    let retry = self.jittered(now, REKEY_RETRY);
                    if let Some(c) = self
                        .children
                        .iter_mut()
                        .find(|c| c.inbound_spi == old && !c.replaced)
                    {
                        c.rekey_at = Some(retry);
                    }
                }
            }
        }
        Ok(())
    }

    /// Our Child SA rekey lost to the peer's simultaneous one (RFC 7296
    /// §2.8.1): the peer's new SA replaces the old one (the peer deletes
    /// the old SA), and we delete our new SA at once. It is never reported:
    /// nothing was installed for it here, and the peer moves its traffic to
    /// the winner.
    fn redundant_child(&mut self, config: usize, child: &ChildSaEstablished) {
        self.stats.child_rekeys_redundant += 1;
        let mut sa = remembered(config, child);
        sa.replaced = true;
        sa.redundant = true;
        self.children.push(sa);
        self.enqueue(Queued::DeleteChild {
            inbound_spi: child.inbound_spi,
        });
    }

    fn child_from_create_response(
        &self,
        payloads: &[Payload],
        exchange: &ChildExchange,
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
        let child_config = self
            .config
            .children
            .get(exchange.config)
            .ok_or_else(|| failure("internal", "no child config"))?;
        let transport = payloads.notify(NotifyType::USE_TRANSPORT_MODE).is_some();
        if transport != (exchange.mode == ChildMode::Transport) {
            return Err(failure("mode_mismatch", "the responder chose another mode"));
        }
        let ke_group = exchange.dh.as_ref().map(|p| p.group().iana_id());
        let agreed = accept_reply(
            &child_config.esp_proposals,
            sa,
            DhMode::Negotiate { ke_group },
        )
        .map_err(|e| failure("bad_proposal_reply", e))?;
        let shared = match &exchange.dh {
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
            replied_selectors(child_config, &tsi.selectors, &tsr.selectors)?;
        let keymat = Keymat {
            shared: shared.as_ref().map(|s| s.as_bytes()),
            ni: &exchange.ni,
            nr,
            we_initiated: true,
        };
        let mut child = self.child_from_agreed(
            exchange.config,
            &agreed,
            exchange.new_inbound_spi,
            exchange.mode,
            local_ts,
            remote_ts,
            keymat,
        )?;
        child.rekeys = exchange.rekeys;
        Ok(child)
    }

    // -------------------------------------------------------------- initiator

    fn send_init_request(&mut self, now: Instant, group: proposal::DhGroup) -> Result<(), Failure> {
        let pair = KeyPair::generate(group, &mut *self.rng).map_err(|e| failure("internal", e))?;
        let header = Header::request(ExchangeType::IKE_SA_INIT, self.cur.spi_i, 0, 0, true);
        let mut payloads = Vec::new();
        if let Some(cookie) = &self.init.cookie {
            payloads.push(Payload::Notify(NotifyPayload::cookie(cookie.clone())));
        }
        payloads.push(Payload::Sa(offer(
            &self.config.ike_proposals,
            &[],
            DhMode::Negotiate {
                ke_group: Some(group.iana_id()),
            },
        )));
        payloads.push(Payload::Ke(KePayload {
            group: group.iana_id(),
            data: pair.public_value().to_vec(),
        }));
        payloads.push(Payload::Nonce(self.init.ni.clone()));
        payloads.push(Payload::Notify(NotifyPayload::nat_detection_source(
            self.cur.spi_i,
            0,
            self.local,
        )));
        payloads.push(Payload::Notify(NotifyPayload::nat_detection_destination(
            self.cur.spi_i,
            0,
            self.remote,
        )));
        payloads.extend(self.init_auth_payloads(false));
        let bytes = Message::new(header, payloads)
            .encode()
            .map_err(|e| failure("internal", e))?;
        self.init.dh = Some(pair);
        self.init.request = bytes.clone();
        self.cur.our_next_id = 0;
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
            self.cur.pending = None;
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
                self.cur.pending = None;
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
            self.cur.spi_i,
            header.spi_r,
        )
        .map_err(|_| reject("internal"))?;
        let nat = detect_nat(&payloads, self.cur.spi_i, header.spi_r, dg.src, dg.dst);

        self.complete_request();
        self.cur.spi_r = header.spi_r;
        self.init.nr = nr.to_vec();
        self.init.response = dg.payload.clone();
        self.init.peer_sig_hashes = signature_hashes(&payloads);
        self.init.dh = None;
        self.cur.suite = Some(suite);
        self.cur.keys = Some(keys);
        self.nat_detected = nat;
        if nat {
            // RFC 7296 §2.23: after a NAT is detected, IKE moves to 4500.
            self.local.set_port(NAT_T_PORT_DEFAULT);
            self.remote.set_port(NAT_T_PORT_DEFAULT);
        }
        self.cur.our_next_id = 1;
        self.cur.peer_next_id = 0;
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
        let offered = proposal::DhGroup::from_iana_id(group)
            .filter(|g| self.config.ike_proposals.iter().any(|p| p.dh.contains(g)));
        match offered {
            Some(g) if !self.init.ke_retried => {
                self.init.ke_retried = true;
                self.cur.pending = None;
                if let Err(f) = self.send_init_request(now, g) {
                    self.fail(f);
                }
                Ok(())
            }
            _ => {
                self.cur.pending = None;
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
        self.cur.pending = None;
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
        let child = self
            .config
            .children
            .get(self.init.child)
            .ok_or_else(|| failure("config", "no such child"))?;
        if child.mode == ChildMode::Transport {
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::USE_TRANSPORT_MODE,
                vec![],
            )));
        }
        payloads.push(Payload::Sa(offer(
            &child.esp_proposals,
            &child_spi.to_be_bytes(),
            DhMode::Skip,
        )));
        payloads.push(Payload::TsI(ts_payload(&child.local_ts)));
        payloads.push(Payload::TsR(ts_payload(&child.remote_ts)));
        let header = Header::request(
            ExchangeType::IKE_AUTH,
            self.cur.spi_i,
            self.cur.spi_r,
            1,
            true,
        );
        let bytes = self
            .seal(header, &payloads)
            .map_err(|e| failure("internal", e))?;
        self.send_request(now, RequestKind::Auth, bytes);
        Ok(())
    }

    /// IKE_AUTH response: authenticate the responder, then the Child SA.
    fn handle_auth_response(&mut self, now: Instant, view: &MessageView<'_>) -> Handled {
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
        self.cur.peer_next_id = 0;
        self.push_established(Identity::from_payload(idr), false);
        self.arm_ike_timers(now);
        let config = self.init.child;
        match self.child_from_response(&payloads) {
            Ok(child) => self.install_child(now, config, child),
            Err(f) => self.child_failed(config, f.reason),
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
        let config = self.init.child;
        let child = self
            .config
            .children
            .get(config)
            .ok_or_else(|| failure("config", "no such child"))?;
        let agreed = accept_reply(&child.esp_proposals, sa, DhMode::Skip)
            .map_err(|e| failure("bad_proposal_reply", e))?;
        let (local_ts, remote_ts) = replied_selectors(child, &tsi.selectors, &tsr.selectors)?;
        let transport = payloads.notify(NotifyType::USE_TRANSPORT_MODE).is_some();
        let mode = match (child.mode, transport) {
            (ChildMode::Transport, true) => ChildMode::Transport,
            (ChildMode::Tunnel, false) => ChildMode::Tunnel,
            _ => return Err(failure("mode_mismatch", "the responder chose another mode")),
        };
        let inbound_spi = self.init.child_spi;
        self.child_from_agreed(
            config,
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
    #[allow(clippy::too_many_arguments)]
    fn child_from_agreed(
        &self,
        config: usize,
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
            .cur
            .keys
            .as_ref()
            .ok_or_else(|| failure("internal", "no IKE keys"))?;
        let lengths =
            ChildSaKeyLengths::for_esp(esp.encryption, None).map_err(|e| failure("internal", e))?;
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
        let name = self
            .config
            .children
            .get(config)
            .ok_or_else(|| failure("internal", "no child config"))?
            .name
            .clone();
        Ok(ChildSaEstablished {
            name,
            mode,
            inbound_spi,
            outbound_spi,
            aead,
            esn: esp.esn == proposal::Esn::Yes,
            rekeys: None,
            initiated: keymat.we_initiated,
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
            we_initiated: self.cur.role == Role::Initiator,
        }
    }

    /// Remembers a new Child SA with its rekey and life timers, and reports
    /// it; a rekeyed one's predecessor is replaced (not rekeyed again: the
    /// new one is).
    fn install_child(&mut self, now: Instant, config: usize, child: ChildSaEstablished) {
        let (rekey_time, life_time) = self
            .config
            .children
            .get(config)
            .map_or((None, None), |c| (c.rekey_time, c.life_time));
        let rekey_at = rekey_time.map(|t| self.jittered(now, t));
        if let Some(old) = child.rekeys {
            if let Some(c) = self.children.iter_mut().find(|c| c.inbound_spi == old) {
                c.rekey_at = None;
                c.replaced = true;
            }
        }
        let mut sa = remembered(config, &child);
        sa.rekey_at = rekey_at;
        sa.expire_at = life_time.map(|t| later(now, t));
        self.children.push(sa);
        self.events.push_back(IkeEvent::ChildSaEstablished(child));
    }

    fn push_established(&mut self, remote_id: Identity, initial_contact: bool) {
        let Some(suite) = self.cur.suite else { return };
        self.events.push_back(IkeEvent::IkeSaEstablished {
            local_id: self.config.local_id.clone(),
            remote_id,
            suite,
            spi_i: self.cur.spi_i,
            spi_r: self.cur.spi_r,
            initiator: self.original_role == Role::Initiator,
            local: self.local,
            remote: self.remote,
            nat_detected: self.nat_detected,
            initial_contact,
        });
    }

    /// Our AUTH payload over our ID payload (RFC 7296 §2.15).
    fn our_auth(&self, our_id: &IdPayload) -> Result<AuthPayload, Failure> {
        let keys = self
            .cur
            .keys
            .as_ref()
            .ok_or_else(|| failure("internal", "no keys"))?;
        let octets = match self.cur.role {
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
            .cur
            .keys
            .as_ref()
            .ok_or_else(|| failure("internal", "no keys"))?;
        let octets = match self.cur.role {
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
            self.cur.spi_i,
            self.cur.spi_r,
            self.cur.our_next_id,
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
        let keys = self.cur.keys.as_ref()?;
        Some(match self.cur.role {
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
        let keys = self.cur.keys.as_ref().ok_or("no keys")?;
        let ours = match self.cur.role {
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
        self.cur.cached = Some(CachedResponse {
            message_id,
            request: dg.payload.clone(),
            response: response.clone(),
        });
        self.cur.peer_next_id = message_id.wrapping_add(1);
        self.stats.requests_answered += 1;
        self.transmit.push_back(response);
    }

    fn send_request(&mut self, now: Instant, kind: RequestKind, payload: Vec<u8>) {
        let datagram = Datagram {
            src: self.local,
            dst: self.remote,
            payload,
        };
        self.cur.pending = Some(Pending {
            kind,
            message_id: self.cur.our_next_id,
            datagram: datagram.clone(),
            sent: 1,
            deadline: later(now, self.config.retransmit.interval(1)),
        });
        self.transmit.push_back(datagram);
    }

    /// Our outstanding request was answered.
    fn complete_request(&mut self) {
        if self.cur.pending.take().is_some() {
            self.cur.our_next_id = self.cur.our_next_id.wrapping_add(1);
        }
    }

    fn fail(&mut self, f: Failure) {
        self.close();
        self.events.push_back(IkeEvent::Failed {
            reason: f.reason,
            detail: f.detail,
        });
    }

    fn close_deleted(&mut self) {
        self.close();
        self.children.clear();
        self.events.push_back(IkeEvent::Deleted);
    }

    /// Closed: nothing is sent or timed any more.
    fn close(&mut self) {
        self.state = State::Closed;
        self.cur.pending = None;
        self.olds.clear();
        self.peer_rekey = None;
        self.peer_child_rekey = None;
        self.queue.clear();
        self.child_exchange = None;
        self.ike_rekey = None;
    }
}

// ------------------------------------------------------------------ helpers

/// The Child SA as the IKE SA remembers it, without timers.
fn remembered(config: usize, child: &ChildSaEstablished) -> ChildSa {
    ChildSa {
        name: child.name.clone(),
        config,
        inbound_spi: child.inbound_spi,
        outbound_spi: child.outbound_spi,
        mode: child.mode,
        local_ts: child.local_ts.clone(),
        remote_ts: child.remote_ts.clone(),
        rekey_at: None,
        expire_at: None,
        replaced: false,
        redundant: false,
    }
}

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

/// `now + wait`, or `now` where the clock cannot represent it (never
/// panics, unlike `Instant + Duration`).
fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).unwrap_or(now)
}

/// The group an INVALID_KE_PAYLOAD answer asks for, if it is another than
/// `sent` and we have not retried yet.
fn wanted_group(payloads: &[Payload], sent: DhGroup, retried: bool) -> Option<DhGroup> {
    payloads
        .notifies()
        .find_map(NotifyPayload::invalid_ke_group)
        .and_then(DhGroup::from_iana_id)
        .filter(|g| *g != sent && !retried)
}

/// The counter reason of an error notify a peer sent.
fn notify_reason(notify: NotifyType) -> &'static str {
    match notify {
        NotifyType::NO_PROPOSAL_CHOSEN => "no_proposal_chosen",
        NotifyType::AUTHENTICATION_FAILED => "auth_failed",
        NotifyType::TS_UNACCEPTABLE => "ts_unacceptable",
        NotifyType::INVALID_SYNTAX => "invalid_syntax",
        NotifyType::INVALID_KE_PAYLOAD => "invalid_ke_payload",
        NotifyType::TEMPORARY_FAILURE => "temporary_failure",
        NotifyType::CHILD_SA_NOT_FOUND => "child_sa_not_found",
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

/// The negotiated suite's transforms as the key schedule takes them.
fn crypto_suite(suite: &proposal::IkeSuite) -> Result<crypto::IkeSuite, String> {
    crypto::IkeSuite::new(suite.encryption, suite.integrity, suite.prf).map_err(|e| e.to_string())
}

fn derive_ike_keys(
    suite: &proposal::IkeSuite,
    shared: &[u8],
    ni: &[u8],
    nr: &[u8],
    spi_i: u64,
    spi_r: u64,
) -> Result<IkeSaKeys, String> {
    IkeSaKeys::initial(
        crypto_suite(suite)?,
        shared,
        ni,
        nr,
        &spi_i.to_be_bytes(),
        &spi_r.to_be_bytes(),
    )
    .map_err(|e| e.to_string())
}

/// What the log says about a rejected datagram: its size, addresses and,
/// if the header decodes, exchange, message ID and flags.
fn describe_datagram(dg: &Datagram) -> String {
    let mut text = format!("{} octets from {} to {}", dg.payload.len(), dg.src, dg.dst);
    if let Ok(view) = MessageView::new_checked(&dg.payload) {
        let h = view.header();
        text.push_str(&format!(
            ": {} {} {}",
            h.exchange,
            if h.flags.is_response() {
                "response"
            } else {
                "request"
            },
            h.message_id
        ));
    }
    text
}

fn ts_payload(ranges: &[TsRange]) -> TsPayload {
    TsPayload {
        selectors: ranges.iter().copied().map(TrafficSelector::Range).collect(),
    }
}

/// The selectors a responder answered with, as ranges, if they are within
/// what `config` proposes (an initiator never accepts wider ones).
fn replied_selectors(
    config: &ChildConfig,
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

/// The address-range selectors of a TS payload (others are ignored: bitw
/// has no use for them).
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
