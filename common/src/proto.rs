//! The control channel between `bitw-control` (client) and `bitw-dataplane`
//! (server): messages and their meaning. Framing and transports are in
//! [`crate::channel`].
//!
//! Every frame is a 4-byte big-endian length and a JSON document (at most
//! [`MAX_FRAME`] bytes). JSON keeps the channel readable with `socat` and
//! stable across versions; SA installs cost a few microseconds to encode,
//! far below what installing them costs.
//!
//! Session:
//! 1. control connects and sends [`Hello`]; the dataplane answers
//!    [`HelloReply::Welcome`] (the version both speak) or
//!    [`HelloReply::Refused`] and closes. Versions: each side names the
//!    range it speaks; the highest common one is used.
//! 2. control sends [`ToDataplane`] (a request with an id); the dataplane
//!    answers each with [`FromDataplane::Reply`] carrying the same id, in
//!    order, and sends [`FromDataplane::Event`] whenever something happens
//!    (punted IKE, acquire, expire, a learned neighbour).
//! 3. Either side may close. The dataplane keeps its tables and forwards on;
//!    it accepts one control session at a time.
//!
//! Keys travel only in [`SaSpec::key`] (control → dataplane); nothing the
//! dataplane sends back contains key material.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::rules::{Action, Direction, PortRange, Prefix, Protocol, Rule};
use crate::sa_params::{AeadAlg, Encap, Limits, Mode, SaParams, NAT_T_PORT_DEFAULT, SALT_LEN};

/// The protocol versions this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
pub const PROTOCOL_MIN_VERSION: u16 = 1;
/// The first field of every hello, so a stray client is told apart at once.
pub const MAGIC: &str = "bitw-control-channel";
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 16 << 20;

/// First message of a session (control → dataplane).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub magic: String,
    pub min_version: u16,
    pub max_version: u16,
    /// e.g. "bitw-control 0.1.0"
    pub software: String,
}

impl Hello {
    pub fn new(software: &str) -> Hello {
        Hello {
            magic: MAGIC.into(),
            min_version: PROTOCOL_MIN_VERSION,
            max_version: PROTOCOL_VERSION,
            software: software.into(),
        }
    }
}

/// The dataplane's answer to [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum HelloReply {
    Welcome {
        version: u16,
        software: String,
        /// Changes each time the dataplane starts (pid and start time), so
        /// control can tell a restarted dataplane from a reconnect.
        instance: String,
    },
    Refused {
        reason: String,
    },
}

/// Picks the version for a session, or says why there is none.
pub fn negotiate(hello: &Hello) -> Result<u16, String> {
    if hello.magic != MAGIC {
        return Err(format!(
            "not a bitw control channel client (magic `{}`)",
            hello.magic
        ));
    }
    let v = hello.max_version.min(PROTOCOL_VERSION);
    if v < hello.min_version.max(PROTOCOL_MIN_VERSION) {
        return Err(format!(
            "no common protocol version: client speaks {}..={}, dataplane {}..={}",
            hello.min_version, hello.max_version, PROTOCOL_MIN_VERSION, PROTOCOL_VERSION
        ));
    }
    Ok(v)
}

/// A request from control.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToDataplane {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

impl ToDataplane {
    /// Decodes a request. An `apply` is read straight into its [`Batch`]:
    /// the derived decoder (a flattened, tagged enum) first copies the whole
    /// message into an intermediate tree, twice, which for a batch of 10 000
    /// SAs cost more than installing them. Same result, same errors.
    pub fn from_json(s: &str) -> serde_json::Result<ToDataplane> {
        #[derive(Deserialize)]
        struct Head<'a> {
            id: u64,
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        match serde_json::from_str::<Head>(s) {
            // Batch ignores the `id` and `type` members.
            Ok(h) if h.kind == "apply" => Ok(ToDataplane {
                id: h.id,
                request: Request::Apply(serde_json::from_str(s)?),
            }),
            _ => serde_json::from_str(s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Request {
    /// Changes applied all together or not at all ([`Reply::Applied`] or
    /// [`Reply::Error`] with nothing changed). Traffic keeps flowing: new
    /// SAs are published before the rules that use them, rules are
    /// withdrawn before the SAs they used.
    Apply(Batch),
    /// Send an IP datagram (starting with its IP header) out of a port. The
    /// dataplane adds the Ethernet header from what it has learned.
    Inject { port: PortName, packet: Packet },
    /// Negotiation for an SA failed: drop the packets held for it (counted).
    AcquireFailed { sa: String },
    /// What the dataplane holds: [`Reply::State`].
    GetState,
    /// Counters: [`Reply::Stats`].
    GetStats {
        /// Per-SA counters for at most this many SAs.
        sa_limit: usize,
    },
    /// Liveness and round-trip time: [`Reply::Pong`].
    Ping,
}

/// One atomic change of the dataplane's tables.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Batch {
    /// Install (or replace, by name and direction) and remove SAs, in order.
    #[serde(default)]
    pub sas: Vec<SaChange>,
    /// The whole filter table, replacing the current one; `None` keeps it.
    #[serde(default)]
    pub policy: Option<PolicySpec>,
    /// Addresses whose IKE traffic is punted to control (replaces the set);
    /// `None` keeps it.
    #[serde(default)]
    pub punt_addrs: Option<Vec<IpAddr>>,
}

// Batches are control messages, not packet-path data: a few hundred bytes per
// change do not matter, and boxing would change every constructor.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum SaChange {
    /// Installs the SA; an SA of that name and direction is replaced unless
    /// its parameters are identical (then it is kept with its state).
    Install(SaSpec),
    Remove {
        name: String,
        direction: Direction,
    },
}

/// An [`SaChange`] as it arrives, read in one pass: a derived internally
/// tagged enum first copies every SA (key included, never zeroed) into an
/// intermediate tree. The members are [`SaSpec`]'s, with its defaults.
#[derive(Deserialize)]
struct SaChangeWire {
    op: ChangeOp,
    name: Option<String>,
    direction: Option<Direction>,
    spi: Option<u32>,
    mode: Option<String>,
    tunnel_src: Option<IpAddr>,
    tunnel_dst: Option<IpAddr>,
    encap: Option<String>,
    udp_sport: Option<u16>,
    udp_dport: Option<u16>,
    aead: Option<String>,
    key: Option<Zeroizing<String>>,
    esn: Option<bool>,
    replay_window: Option<u32>,
    lifetime_packets: Option<LimitsSpec>,
    lifetime_bytes: Option<LimitsSpec>,
    origin: Option<Origin>,
    policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ChangeOp {
    Install,
    Remove,
}

impl<'de> Deserialize<'de> for SaChange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SaChange, D::Error> {
        use serde::de::Error;
        let w = SaChangeWire::deserialize(d)?;
        let name = w.name.ok_or_else(|| D::Error::missing_field("name"))?;
        let direction = w
            .direction
            .ok_or_else(|| D::Error::missing_field("direction"))?;
        Ok(match w.op {
            ChangeOp::Remove => SaChange::Remove { name, direction },
            ChangeOp::Install => SaChange::Install(SaSpec {
                name,
                direction,
                spi: w.spi.ok_or_else(|| D::Error::missing_field("spi"))?,
                mode: w.mode.ok_or_else(|| D::Error::missing_field("mode"))?,
                tunnel_src: w.tunnel_src,
                tunnel_dst: w.tunnel_dst,
                encap: w.encap.ok_or_else(|| D::Error::missing_field("encap"))?,
                udp_sport: w.udp_sport.unwrap_or(NAT_T_PORT_DEFAULT),
                udp_dport: w.udp_dport.unwrap_or(NAT_T_PORT_DEFAULT),
                aead: w.aead.ok_or_else(|| D::Error::missing_field("aead"))?,
                key: w.key.ok_or_else(|| D::Error::missing_field("key"))?,
                esn: w.esn.ok_or_else(|| D::Error::missing_field("esn"))?,
                replay_window: w.replay_window.unwrap_or_default(),
                lifetime_packets: w.lifetime_packets.unwrap_or_default(),
                lifetime_bytes: w.lifetime_bytes.unwrap_or_default(),
                origin: w.origin.unwrap_or_default(),
                policy: w.policy,
            }),
        })
    }
}

/// The filter table: ordered rules (both directions; first match per
/// direction wins) and the action for IP packets no rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub rules: Vec<RuleSpec>,
    pub default_action: DefaultActionName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultActionName {
    Bypass,
    Discard,
}

/// Who asked for an SA or a rule; control uses it to reconcile after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// From the configuration file.
    #[default]
    Config,
    /// Added by an administrator through bitwctl.
    Admin,
    /// Negotiated by IKE.
    Ike,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Admin => "admin",
            Origin::Ike => "ike",
        }
    }
}

/// A port by its configured name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortName {
    Inside,
    Outside,
}

impl PortName {
    pub fn as_str(self) -> &'static str {
        match self {
            PortName::Inside => "inside",
            PortName::Outside => "outside",
        }
    }
}

impl Direction {
    /// The port a direction's traffic arrives on.
    pub fn rx_port(self) -> PortName {
        match self {
            Direction::Out => PortName::Inside,
            Direction::In => PortName::Outside,
        }
    }
}

impl Serialize for Direction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Raw bytes, hex on the wire.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Packet(pub Vec<u8>);

impl fmt::Debug for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Packet({} bytes)", self.0.len())
    }
}

impl Serialize for Packet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Packet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map(Packet).map_err(serde::de::Error::custom)
    }
}

/// A MAC address, `aa:bb:cc:dd:ee:ff` on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut m = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!("`{s}` is not a MAC address like 02:00:00:00:00:01"));
        }
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16)
                .map_err(|_| format!("`{s}` is not a MAC address like 02:00:00:00:00:01"))?;
        }
        Ok(Mac(m))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A filter rule on the wire; the same fields and spellings as `[[policy]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSpec {
    pub name: String,
    pub direction: Direction,
    /// "any" or a prefix.
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub sport: String,
    pub dport: String,
    /// protect | bypass | discard
    pub action: String,
    /// protect only
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sa: Option<String>,
    #[serde(default)]
    pub origin: Origin,
}

impl RuleSpec {
    pub fn from_rule(r: &Rule, origin: Origin) -> RuleSpec {
        let pfx = |p: Option<Prefix>| p.map_or("any".to_string(), |p| p.to_string());
        let (action, sa) = match &r.action {
            Action::Bypass => ("bypass", None),
            Action::Discard => ("discard", None),
            Action::Protect { sa } => ("protect", Some(sa.clone())),
        };
        RuleSpec {
            name: r.name.clone(),
            direction: r.direction,
            src: pfx(r.src),
            dst: pfx(r.dst),
            proto: r.proto.to_string(),
            sport: r.sport.to_string(),
            dport: r.dport.to_string(),
            action: action.into(),
            sa,
            origin,
        }
    }

    /// Validates and converts; the error names the field.
    pub fn to_rule(&self) -> Result<Rule, String> {
        let ctx = |field: &str, e: String| format!("rule `{}`: {field}: {e}", self.name);
        let pfx = |field: &str, s: &str| -> Result<Option<Prefix>, String> {
            if s.trim() == "any" {
                Ok(None)
            } else {
                s.parse::<Prefix>().map(Some).map_err(|e| ctx(field, e))
            }
        };
        if self.name.is_empty() {
            return Err("a rule without a name".into());
        }
        let src = pfx("src", &self.src)?;
        let dst = pfx("dst", &self.dst)?;
        if let (Some(s), Some(d)) = (src, dst) {
            if s.is_ipv4() != d.is_ipv4() {
                return Err(ctx(
                    "dst",
                    "src and dst are of different address families".into(),
                ));
            }
        }
        let proto: Protocol = self.proto.parse().map_err(|e| ctx("proto", e))?;
        let sport: PortRange = self.sport.parse().map_err(|e| ctx("sport", e))?;
        let dport: PortRange = self.dport.parse().map_err(|e| ctx("dport", e))?;
        let action = match (self.action.as_str(), &self.sa) {
            ("bypass", None) => Action::Bypass,
            ("discard", None) => Action::Discard,
            ("protect", Some(sa)) if !sa.is_empty() => Action::Protect { sa: sa.clone() },
            ("protect", _) => return Err(ctx("sa", "a protect rule names its SA".into())),
            ("bypass" | "discard", Some(_)) => {
                return Err(ctx("sa", "only protect rules name an SA".into()))
            }
            (other, _) => {
                return Err(ctx(
                    "action",
                    format!("`{other}`: expected protect, bypass or discard"),
                ))
            }
        };
        let rule = Rule {
            name: self.name.clone(),
            direction: self.direction,
            src,
            dst,
            proto,
            sport,
            dport,
            action,
        };
        let portless = !proto.has_ports() && !matches!(proto, Protocol::Icmp | Protocol::Icmpv6);
        if portless && (!sport.is_any() || !dport.is_any()) {
            return Err(ctx("sport", format!("protocol {proto} has no ports")));
        }
        Ok(rule)
    }
}

/// Soft and hard limits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LimitsSpec {
    pub soft: u64,
    pub hard: u64,
}

/// An SA on the wire, key included (control → dataplane only).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaSpec {
    pub name: String,
    pub direction: Direction,
    pub spi: u32,
    /// tunnel | transport
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_src: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_dst: Option<IpAddr>,
    /// none | udp
    pub encap: String,
    #[serde(default = "nat_t_port")]
    pub udp_sport: u16,
    #[serde(default = "nat_t_port")]
    pub udp_dport: u16,
    /// aes128gcm16 | aes256gcm16 | chacha20poly1305
    pub aead: String,
    /// Key then 4-byte salt, hex.
    pub key: Zeroizing<String>,
    pub esn: bool,
    #[serde(default)]
    pub replay_window: u32,
    #[serde(default)]
    pub lifetime_packets: LimitsSpec,
    #[serde(default)]
    pub lifetime_bytes: LimitsSpec,
    #[serde(default)]
    pub origin: Origin,
    /// Inbound SAs: the name inbound protect rules use for this SA; absent:
    /// the SA's own name. Several inbound SAs may share one (make-before-break
    /// rekeying: the old and the new SA of a Child SA under the same rule).
    /// Outbound SAs must not have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

fn nat_t_port() -> u16 {
    NAT_T_PORT_DEFAULT
}

impl fmt::Debug for SaSpec {
    // Never print keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaSpec")
            .field("name", &self.name)
            .field("direction", &self.direction)
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("mode", &self.mode)
            .field("aead", &self.aead)
            .field("origin", &self.origin)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl SaSpec {
    pub fn from_params(p: &SaParams, origin: Origin) -> SaSpec {
        let (mode, tunnel_src, tunnel_dst) = match p.mode {
            Mode::Transport => ("transport", None, None),
            Mode::Tunnel { src, dst } => ("tunnel", Some(src), Some(dst)),
        };
        let (encap, udp_sport, udp_dport) = match p.encap {
            Encap::None => ("none", NAT_T_PORT_DEFAULT, NAT_T_PORT_DEFAULT),
            Encap::Udp { sport, dport } => ("udp", sport, dport),
        };
        SaSpec {
            name: p.name.clone(),
            direction: p.direction,
            spi: p.spi,
            mode: mode.into(),
            tunnel_src,
            tunnel_dst,
            encap: encap.into(),
            udp_sport,
            udp_dport,
            aead: p.alg.name().into(),
            key: Zeroizing::new(hex::encode(&p.key_material[..])),
            esn: p.esn,
            replay_window: p.replay_window,
            lifetime_packets: LimitsSpec {
                soft: p.lifetime_packets.soft,
                hard: p.lifetime_packets.hard,
            },
            lifetime_bytes: LimitsSpec {
                soft: p.lifetime_bytes.soft,
                hard: p.lifetime_bytes.hard,
            },
            origin,
            policy: p.policy.clone(),
        }
    }

    /// Validates and converts; the error names the SA and the field, never the key.
    pub fn to_params(&self) -> Result<SaParams, String> {
        let ctx = |field: &str, e: &str| format!("SA `{}`: {field}: {e}", self.name);
        if self.name.is_empty() {
            return Err("an SA without a name".into());
        }
        if self.spi < 256 {
            return Err(ctx("spi", "SPIs 0-255 are reserved (RFC 4303 §2.1)"));
        }
        let alg = AeadAlg::from_name(&self.aead).ok_or_else(|| {
            ctx(
                "aead",
                &format!(
                    "`{}`: expected aes128gcm16, aes256gcm16 or chacha20poly1305",
                    self.aead
                ),
            )
        })?;
        let key = Zeroizing::new(
            hex::decode(self.key.trim()).map_err(|_| ctx("key", "not hexadecimal"))?,
        );
        let want = alg.key_len() + SALT_LEN;
        if key.len() != want {
            return Err(ctx(
                "key",
                &format!(
                    "{} bytes; {} wants {want} (key and 4-byte salt)",
                    key.len(),
                    alg.name()
                ),
            ));
        }
        let mode = match (self.mode.as_str(), self.tunnel_src, self.tunnel_dst) {
            ("transport", None, None) => Mode::Transport,
            ("transport", _, _) => {
                return Err(ctx(
                    "tunnel_src",
                    "transport mode takes no tunnel addresses",
                ))
            }
            ("tunnel", Some(src), Some(dst)) => {
                if src.is_ipv4() != dst.is_ipv4() {
                    return Err(ctx(
                        "tunnel_dst",
                        "tunnel_src and tunnel_dst are of different address families",
                    ));
                }
                Mode::Tunnel { src, dst }
            }
            ("tunnel", _, _) => {
                return Err(ctx(
                    "tunnel_src",
                    "tunnel mode needs tunnel_src and tunnel_dst",
                ))
            }
            (other, _, _) => {
                return Err(ctx(
                    "mode",
                    &format!("`{other}`: expected tunnel or transport"),
                ))
            }
        };
        let encap = match self.encap.as_str() {
            "none" => Encap::None,
            "udp" => Encap::Udp {
                sport: self.udp_sport,
                dport: self.udp_dport,
            },
            other => return Err(ctx("encap", &format!("`{other}`: expected none or udp"))),
        };
        if self.replay_window > 1 << 20 {
            return Err(ctx("replay_window", "more than 1048576 packets"));
        }
        match (&self.policy, self.direction) {
            (None, _) => {}
            (Some(_), Direction::Out) => {
                return Err(ctx(
                    "policy",
                    "only inbound SAs take a policy name (an outbound SA is replaced by name)",
                ))
            }
            (Some(p), Direction::In) if p.trim().is_empty() || p.trim() != p => {
                return Err(ctx(
                    "policy",
                    "empty, or with leading or trailing white space",
                ))
            }
            (Some(_), Direction::In) => {}
        }
        Ok(SaParams {
            name: self.name.clone(),
            direction: self.direction,
            spi: self.spi,
            mode,
            encap,
            alg,
            key_material: key,
            esn: self.esn,
            replay_window: self.replay_window,
            lifetime_packets: Limits {
                soft: self.lifetime_packets.soft,
                hard: self.lifetime_packets.hard,
            },
            lifetime_bytes: Limits {
                soft: self.lifetime_bytes.soft,
                hard: self.lifetime_bytes.hard,
            },
            policy: self.policy.clone(),
        })
    }

    /// A digest of everything that defines the SA (key included, origin not),
    /// so control can tell whether the dataplane holds exactly this SA
    /// without the dataplane ever sending keys back.
    pub fn fingerprint(&self) -> String {
        match self.to_params() {
            Ok(p) => params_fingerprint(&p),
            // Never installed, so never compared with an installed SA's.
            Err(_) => fingerprint(&self.to_params_unchecked_repr()),
        }
    }

    fn to_params_unchecked_repr(&self) -> String {
        let mut s = self.clone();
        s.origin = Origin::Config;
        s.key = Zeroizing::new(s.key.trim().to_ascii_lowercase());
        serde_json::to_string(&s).expect("an SaSpec always serialises")
    }
}

/// SHA-256 of `s`, hex, first 16 bytes: the SA fingerprint.
fn fingerprint(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    hex::encode(&d.as_ref()[..16])
}

/// The fingerprint of installed SA parameters (same value as
/// [`SaSpec::fingerprint`]): SHA-256 over a fixed binary encoding of every
/// member, each length-prefixed or of fixed size, so no two SAs share one.
/// (It was SHA-256 of the SA's JSON: a microsecond per SA installed.)
pub fn params_fingerprint(p: &SaParams) -> String {
    fn bytes(h: &mut ring::digest::Context, b: &[u8]) {
        h.update(&(b.len() as u32).to_be_bytes());
        h.update(b);
    }
    fn ip(h: &mut ring::digest::Context, a: &IpAddr) {
        match a {
            IpAddr::V4(a) => bytes(h, &a.octets()),
            IpAddr::V6(a) => bytes(h, &a.octets()),
        }
    }
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(b"bitw-sa-fingerprint-2\0");
    bytes(&mut h, p.name.as_bytes());
    h.update(&[p.direction as u8]);
    h.update(&p.spi.to_be_bytes());
    match &p.mode {
        Mode::Transport => h.update(&[0]),
        Mode::Tunnel { src, dst } => {
            h.update(&[1]);
            ip(&mut h, src);
            ip(&mut h, dst);
        }
    }
    match p.encap {
        Encap::None => h.update(&[0]),
        Encap::Udp { sport, dport } => {
            h.update(&[1]);
            h.update(&sport.to_be_bytes());
            h.update(&dport.to_be_bytes());
        }
    }
    h.update(&[p.alg as u8]);
    bytes(&mut h, &p.key_material);
    h.update(&[p.esn as u8]);
    h.update(&p.replay_window.to_be_bytes());
    for l in [p.lifetime_packets, p.lifetime_bytes] {
        h.update(&l.soft.to_be_bytes());
        h.update(&l.hard.to_be_bytes());
    }
    match &p.policy {
        None => h.update(&[0]),
        Some(name) => {
            h.update(&[1]);
            bytes(&mut h, name.as_bytes());
        }
    }
    hex::encode(&h.finish().as_ref()[..16])
}

/// A reply from the dataplane, matched to its request by `id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FromDataplane {
    Reply {
        id: u64,
        #[serde(flatten)]
        reply: Reply,
    },
    Event {
        #[serde(flatten)]
        event: Event,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Reply {
    Applied(Applied),
    Injected,
    Done,
    State(DataplaneState),
    Stats(Box<Stats>),
    Pong,
    /// The request was refused; nothing changed.
    Error {
        message: String,
    },
}

/// What an [`Request::Apply`] changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    pub sas_installed: usize,
    pub sas_replaced: usize,
    pub sas_unchanged: usize,
    pub sas_removed: usize,
    /// The filter table's generation after the batch (changes when the rules do).
    pub policy_generation: u64,
    pub rules: usize,
    /// Held packets released to their new SAs.
    pub released: usize,
    /// Time from receipt to the new tables being visible to the workers.
    pub apply_seconds: f64,
}

/// The dataplane's tables as control needs them to reconcile (no keys).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataplaneState {
    pub instance: String,
    pub sas: Vec<SaInfo>,
    pub policy: Option<PolicySpec>,
    pub punt_addrs: Vec<IpAddr>,
    pub neighbors: Vec<Neighbor>,
    /// Packets held for SAs that are not installed yet.
    pub held_packets: usize,
}

/// An installed SA, without its key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SaInfo {
    pub name: String,
    pub direction: Direction,
    pub spi: u32,
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_src: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_dst: Option<IpAddr>,
    pub encap: String,
    pub aead: String,
    pub esn: bool,
    pub replay_window: u32,
    pub origin: Origin,
    /// [`SaSpec::fingerprint`] of what was installed.
    pub fingerprint: String,
    pub packets: u64,
    pub bytes: u64,
    /// Outbound: last sequence number sent; inbound: highest received.
    pub sequence: u64,
    pub expired: bool,
    pub owner_worker: usize,
    /// Inbound: the name inbound protect rules use for this SA when it is
    /// not the SA's own (see [`SaSpec::policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl SaInfo {
    /// What an SA looks like before it has carried traffic (no key, its fingerprint).
    pub fn from_spec(spec: &SaSpec) -> SaInfo {
        SaInfo {
            name: spec.name.clone(),
            direction: spec.direction,
            spi: spec.spi,
            mode: spec.mode.clone(),
            tunnel_src: spec.tunnel_src,
            tunnel_dst: spec.tunnel_dst,
            encap: spec.encap.clone(),
            aead: spec.aead.clone(),
            esn: spec.esn,
            replay_window: spec.replay_window,
            origin: spec.origin,
            fingerprint: spec.fingerprint(),
            packets: 0,
            bytes: 0,
            sequence: 0,
            expired: false,
            owner_worker: 0,
            policy: spec.policy.clone(),
        }
    }
}

/// An address seen on a port with its MAC (ARP/NDP snooping, punted frames).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Neighbor {
    pub port: PortName,
    pub ip: IpAddr,
    pub mac: Mac,
}

/// Something the dataplane tells control without being asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Event {
    /// An IKE datagram to or from a registered address (not forwarded).
    Punt(Punt),
    /// A packet hit a protect rule whose SA is not installed; it is held.
    Acquire(Acquire),
    /// An SA reached a lifetime or ran out of sequence numbers.
    Expire {
        sa: String,
        direction: Direction,
        spi: u32,
        reason: ExpireReason,
    },
    /// A new or moved neighbour on a port (ARP/NDP or IP source).
    Learned(Neighbor),
    /// Held packets dropped (timeout, failure, overflow), for visibility.
    HoldDropped {
        sa: String,
        packets: u64,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Punt {
    pub port: PortName,
    pub src_mac: Mac,
    pub dst_mac: Mac,
    /// 802.1Q/802.1ad tags, outermost first (the VLAN ids).
    #[serde(default)]
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// Port 4500 with the non-ESP marker (the marker is stripped from `payload`).
    pub nat_t: bool,
    /// The IKE message (UDP payload, without the non-ESP marker).
    pub payload: Packet,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Acquire {
    pub sa: String,
    pub rule: String,
    pub direction: Direction,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExpireReason {
    SoftLifetime,
    HardLifetime,
    SequenceExhausted,
}

/// Traffic counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrafficCount {
    pub packets: u64,
    pub bytes: u64,
}

/// One port's counters: the workers' view and the device's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortStats {
    pub name: String,
    pub device: String,
    pub rx: TrafficCount,
    pub tx: TrafficCount,
    /// Frames the device dropped because the workers did not keep up.
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

/// One worker's counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStats {
    pub worker: usize,
    pub lcore: u32,
    pub rx_inside: TrafficCount,
    pub rx_outside: TrafficCount,
    pub tx_inside: TrafficCount,
    pub tx_outside: TrafficCount,
    /// By reason (`malformed`, `replay`, …); every reason present.
    pub drops: BTreeMap<String, u64>,
    pub non_ip: u64,
    pub bypassed: u64,
    pub uninspected: u64,
    pub esp_encrypted: u64,
    pub esp_decrypted: u64,
    pub handed_off: u64,
    pub punted: u64,
    pub held: u64,
    pub events_lost: u64,
    pub flow_cache_hits: u64,
    pub flow_cache_misses: u64,
    pub idle_polls: u64,
    pub busy_polls: u64,
    /// TSC cycles spent in polls that found packets, and in all polls.
    pub busy_cycles: u64,
    pub total_cycles: u64,
    /// Non-empty RX bursts and the packets they brought (fill = packets /
    /// bursts / burst size).
    pub rx_bursts: u64,
    pub rx_burst_packets: u64,
    /// RX-to-TX latency through this worker (absent from older dataplanes).
    #[serde(default)]
    pub latency: LatencyStats,
}

/// Upper bounds (ns) of the latency histogram's buckets, besides +Inf.
pub const LATENCY_BUCKETS_NS: [u64; 12] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

/// One worker's per-packet latency from the RX burst that received a packet
/// to the TX burst that sent it (dataplane `latency` module), in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Since the worker started: packets recorded and their latencies' sum.
    pub packets: u64,
    pub sum_ns: u64,
    /// Since the worker started.
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    /// The last second or so.
    pub recent_p50_ns: u64,
    pub recent_p99_ns: u64,
    pub recent_p999_ns: u64,
    pub recent_max_ns: u64,
    /// Packets at or under each bound of [`LATENCY_BUCKETS_NS`], since start
    /// (cumulative, like Prometheus buckets).
    pub buckets: Vec<u64>,
}

/// Per-SA counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaStats {
    pub name: String,
    pub direction: Direction,
    pub spi: u32,
    pub packets: u64,
    pub bytes: u64,
    pub expired: bool,
}

/// The dataplane's SA slots: every SA name, inbound policy name and SA name
/// a protect rule gives has one while anything uses it; freed slots are
/// reused (docs/dataplane.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaSlots {
    /// Names that have a slot now (outbound + inbound).
    pub bound: usize,
    /// Freed slots ready for reuse.
    pub free: usize,
    /// Freed slots waiting until no retired table may mention them.
    pub waiting: usize,
    /// Length of the SA tables (outbound + inbound), used or not.
    pub table: usize,
}

/// Everything countable, for `bitwctl counters` and the exporter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub instance: String,
    pub software: String,
    pub uptime_seconds: f64,
    pub burst_size: usize,
    pub tsc_hz: u64,
    pub ports: Vec<PortStats>,
    pub workers: Vec<WorkerStats>,
    /// Drops outside the workers (the hold queue, punt/inject), by reason.
    pub control_drops: BTreeMap<String, u64>,
    pub sa_count: usize,
    /// How the dataplane's SA slots are used (absent from older dataplanes:
    /// zeros).
    #[serde(default)]
    pub sa_slots: SaSlots,
    /// Per-SA counters, the first `sa_limit` SAs.
    pub sas: Vec<SaStats>,
    pub held_packets: usize,
    pub acquires: u64,
    pub expires: BTreeMap<String, u64>,
    pub punted: u64,
    pub injected: u64,
    pub inject_failed: u64,
    pub control_sessions: u64,
}

impl Stats {
    /// Total drops by reason over workers and the control side.
    pub fn drops_total(&self) -> BTreeMap<String, u64> {
        let mut t = self.control_drops.clone();
        for w in &self.workers {
            for (r, n) in &w.drops {
                *t.entry(r.clone()).or_default() += n;
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SaSpec {
        SaSpec {
            name: "to-hq".into(),
            direction: Direction::Out,
            spi: 0x1001,
            mode: "tunnel".into(),
            tunnel_src: Some("172.16.0.1".parse().unwrap()),
            tunnel_dst: Some("172.16.0.2".parse().unwrap()),
            encap: "none".into(),
            udp_sport: 4500,
            udp_dport: 4500,
            aead: "aes128gcm16".into(),
            key: Zeroizing::new("00112233445566778899aabbccddeeff01020304".into()),
            esn: true,
            replay_window: 0,
            lifetime_packets: LimitsSpec::default(),
            lifetime_bytes: LimitsSpec::default(),
            origin: Origin::Admin,
            policy: None,
        }
    }

    #[test]
    fn sa_spec_round_trips_and_fingerprint_ignores_origin() {
        let s = spec();
        let p = s.to_params().unwrap();
        let back = SaSpec::from_params(&p, Origin::Admin);
        assert_eq!(back, s);
        assert_eq!(params_fingerprint(&p), s.fingerprint());
        let mut other = s.clone();
        other.key = Zeroizing::new("00112233445566778899aabbccddeeff01020305".into());
        assert_ne!(other.fingerprint(), s.fingerprint());
        assert!(
            !format!("{s:?}").contains("0011"),
            "Debug must not show the key"
        );
    }

    /// The one-pass SaChange decoder against the derived format: every
    /// member read (none left to its default), SaSpec's defaults, the
    /// missing member named, and the request fast path equal to the derived
    /// decoder.
    #[test]
    fn sa_changes_decode_in_one_pass_like_the_derived_format() {
        let mut every = spec();
        (every.direction, every.udp_sport, every.udp_dport) = (Direction::In, 1, 2);
        (every.replay_window, every.origin) = (64, Origin::Ike);
        every.lifetime_packets = LimitsSpec { soft: 3, hard: 4 };
        every.lifetime_bytes = LimitsSpec { soft: 5, hard: 6 };
        every.policy = Some("p".into());
        every.encap = "udp".into();
        let changes = vec![
            SaChange::Install(every.clone()),
            SaChange::Remove {
                name: "old".into(),
                direction: Direction::Out,
            },
        ];
        let json = serde_json::to_string(&changes).unwrap();
        let back: Vec<SaChange> = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        match &back[0] {
            SaChange::Install(s) => assert_eq!(s, &every),
            c => panic!("{c:?}"),
        }

        let minimal = r#"{"op":"install","name":"a","direction":"out","spi":4097,
            "mode":"transport","encap":"none","aead":"aes128gcm16",
            "key":"00112233445566778899aabbccddeeff01020304","esn":false}"#;
        let SaChange::Install(m) = serde_json::from_str(minimal).unwrap() else {
            panic!("not an install")
        };
        assert_eq!((m.udp_sport, m.udp_dport), (4500, 4500));
        assert_eq!(
            (m.replay_window, m.origin, m.policy),
            (0, Origin::Config, None)
        );
        assert_eq!(m.lifetime_bytes, LimitsSpec::default());
        let e = serde_json::from_str::<SaChange>(&minimal.replace(r#""spi":4097,"#, ""));
        assert!(e.unwrap_err().to_string().contains("missing field `spi`"));
        let e = serde_json::from_str::<SaChange>(&minimal.replace("install", "frob"));
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("unknown variant `frob`"));

        let req = ToDataplane {
            id: 9,
            request: Request::Apply(Batch {
                sas: changes,
                policy: Some(PolicySpec {
                    rules: vec![],
                    default_action: DefaultActionName::Discard,
                }),
                punt_addrs: Some(vec!["192.0.2.1".parse().unwrap()]),
            }),
        };
        let json = serde_json::to_string(&req).unwrap();
        let fast = ToDataplane::from_json(&json).unwrap();
        let derived: ToDataplane = serde_json::from_str(&json).unwrap();
        assert_eq!(fast.id, 9);
        assert_eq!(serde_json::to_string(&fast).unwrap(), json);
        assert_eq!(serde_json::to_string(&derived).unwrap(), json);
        let ping = r#"{"id":3,"type":"ping"}"#;
        assert!(matches!(
            ToDataplane::from_json(ping).unwrap().request,
            Request::Ping
        ));
        for bad in [
            r#"{"type":"apply"}"#,
            r#"{"id":1,"type":"apply","sas":[{"op":"x"}]}"#,
        ] {
            assert_eq!(
                ToDataplane::from_json(bad).is_err(),
                serde_json::from_str::<ToDataplane>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_member_of_an_sa_changes_its_fingerprint() {
        let base = spec().to_params().unwrap();
        let mut seen = std::collections::HashSet::new();
        assert!(seen.insert(params_fingerprint(&base)));
        let variants: Vec<fn(&mut SaParams)> = vec![
            |p| p.name.push('x'),
            |p| p.direction = Direction::In,
            |p| p.spi += 1,
            |p| p.mode = Mode::Transport,
            |p| {
                p.mode = Mode::Tunnel {
                    src: "172.16.0.2".parse().unwrap(),
                    dst: "172.16.0.1".parse().unwrap(),
                }
            },
            |p| {
                p.encap = Encap::Udp {
                    sport: 4500,
                    dport: 4500,
                }
            },
            |p| {
                p.encap = Encap::Udp {
                    sport: 4500,
                    dport: 4501,
                }
            },
            |p| p.alg = AeadAlg::Aes256Gcm16,
            |p| p.key_material[0] ^= 1,
            |p| p.esn = !p.esn,
            |p| p.replay_window = 64,
            |p| p.lifetime_packets.soft = 1,
            |p| p.lifetime_packets.hard = 1,
            |p| p.lifetime_bytes.soft = 1,
            |p| p.lifetime_bytes.hard = 1,
            |p| p.policy = Some(String::new()),
            |p| p.policy = Some("to-hq".into()),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut p = base.clone();
            change(&mut p);
            assert!(
                seen.insert(params_fingerprint(&p)),
                "change {i} kept the fingerprint"
            );
        }
    }

    #[test]
    fn sa_spec_errors_name_the_field() {
        let mut s = spec();
        s.key = Zeroizing::new("0011".into());
        assert!(s.to_params().unwrap_err().contains("key"));
        let mut s = spec();
        s.spi = 3;
        assert!(s.to_params().unwrap_err().contains("spi"));
        let mut s = spec();
        s.tunnel_dst = Some("2001:db8::1".parse().unwrap());
        assert!(s.to_params().unwrap_err().contains("tunnel_dst"));
        let mut s = spec();
        s.aead = "des".into();
        assert!(s.to_params().unwrap_err().contains("aead"));
        // A policy name is for inbound SAs only.
        let mut s = spec();
        s.policy = Some("p".into());
        assert!(s
            .to_params()
            .unwrap_err()
            .contains("SA `to-hq`: policy: only inbound SAs"));
        s.direction = Direction::In;
        assert_eq!(s.to_params().unwrap().policy_name(), "p");
        s.policy = Some(" ".into());
        assert!(s.to_params().unwrap_err().contains("policy"));
    }

    #[test]
    fn sa_policy_is_optional_on_the_wire_and_part_of_the_fingerprint() {
        let mut s = spec();
        s.direction = Direction::In;
        let j = serde_json::to_string(&s).unwrap();
        assert!(!j.contains("policy"), "absent, not null: {j}");
        // JSON from before the field still decodes, to the same SA.
        let back: SaSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.to_params().unwrap().policy_name(), "to-hq");
        let plain = s.fingerprint();
        s.policy = Some("p".into());
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"policy\":\"p\""), "{j}");
        assert_ne!(s.fingerprint(), plain, "another policy: another SA");
        let p = s.to_params().unwrap();
        assert_eq!(SaSpec::from_params(&p, Origin::Admin), s);
        assert_eq!(params_fingerprint(&p), s.fingerprint());
        let info = SaInfo::from_spec(&s);
        assert_eq!(info.policy.as_deref(), Some("p"));
        let j = serde_json::to_string(&info).unwrap();
        assert!(j.contains("\"policy\":\"p\""), "{j}");
    }

    #[test]
    fn rule_spec_round_trips() {
        let r = RuleSpec {
            name: "web".into(),
            direction: Direction::Out,
            src: "10.0.0.0/24".into(),
            dst: "any".into(),
            proto: "tcp".into(),
            sport: "any".into(),
            dport: "80-443".into(),
            action: "protect".into(),
            sa: Some("to-hq".into()),
            origin: Origin::Config,
        };
        let rule = r.to_rule().unwrap();
        assert_eq!(RuleSpec::from_rule(&rule, Origin::Config), r);
        let mut bad = r.clone();
        bad.sa = None;
        assert!(bad.to_rule().unwrap_err().contains("sa"));
        let mut bad = r.clone();
        bad.proto = "gre".into();
        assert!(bad.to_rule().unwrap_err().contains("proto"));
    }

    #[test]
    fn messages_are_json_with_ids() {
        let m = ToDataplane {
            id: 7,
            request: Request::Apply(Batch {
                sas: vec![SaChange::Install(spec())],
                policy: None,
                punt_addrs: Some(vec!["10.99.0.1".parse().unwrap()]),
            }),
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("\"type\":\"apply\""), "{j}");
        let back: ToDataplane = serde_json::from_str(&j).unwrap();
        assert_eq!(back.id, 7);
        let r = FromDataplane::Reply {
            id: 7,
            reply: Reply::Applied(Applied::default()),
        };
        let j = serde_json::to_string(&r).unwrap();
        let back: FromDataplane = serde_json::from_str(&j).unwrap();
        assert!(matches!(
            back,
            FromDataplane::Reply {
                id: 7,
                reply: Reply::Applied(_)
            }
        ));
    }

    #[test]
    fn versions_negotiate() {
        assert_eq!(negotiate(&Hello::new("t")), Ok(PROTOCOL_VERSION));
        let mut h = Hello::new("t");
        h.min_version = PROTOCOL_VERSION + 1;
        h.max_version = PROTOCOL_VERSION + 3;
        assert!(negotiate(&h)
            .unwrap_err()
            .contains("no common protocol version"));
        h.magic = "GET / HTTP/1.1".into();
        assert!(negotiate(&h).unwrap_err().contains("magic"));
    }
}
