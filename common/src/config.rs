//! The dataplane's TOML configuration: loading and validation.
//!
//! Every error names the file, the line and the field (`policy[2].dst`), so an
//! operator can fix it without reading code. Values with their own syntax
//! (prefixes, port ranges, protocols) are parsed while TOML is deserialised,
//! so the `toml` crate attaches the location; checks that need several fields
//! keep the field's span (`toml::Spanned`) and compute the line from it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::channel::{Endpoint, TlsFiles};
use crate::connection::{load_connections, Connection, RawConnection};
use crate::rules::{Action, Direction, PortRange, Prefix, Protocol, Rule};
use crate::sa_params::{AeadAlg, Encap, Limits, Mode, SaParams, NAT_T_PORT_DEFAULT};

/// Largest burst a worker asks of a port (and the size of its per-burst arrays).
pub const MAX_BURST: usize = 256;

/// A configuration that failed to load: where, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Dotted path of the field, e.g. `policy[1].sport`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// What to do with an IP packet that no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Bypass,
    Discard,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EalConfig {
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneConfig {
    pub workers: usize,
    pub burst: usize,
    pub default_action: DefaultAction,
    /// CPUs to pin the workers to; `None` = the last `workers` CPUs this process may use.
    pub cores: Option<Vec<usize>>,
    pub rx_descriptors: u16,
    pub tx_descriptors: u16,
    /// mbufs in the pool (shared by all workers and ports).
    pub mbufs: u32,
    /// Flow-cache entries per worker, direction and address family; 0 = no cache.
    pub flow_cache: usize,
    /// Inbound ESP with an SPI no SA has: drop it (true), or classify it like
    /// any packet (false, for ESP between other hosts that passes through).
    pub drop_unknown_spi: bool,
    /// Packets a worker's inbox holds for SAs it owns (handed over by other workers).
    pub handoff_depth: usize,
    /// The library that seals and opens AES-GCM on the packet path.
    pub crypto: CryptoBackend,
}

/// `dataplane.crypto`: which library does AES-GCM on the packet path
/// (ChaCha20-Poly1305 always uses ring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CryptoBackend {
    /// intel-ipsec-mb when it runs on this CPU with AES-NI, else ring.
    #[default]
    Auto,
    /// intel-ipsec-mb (Debian `libipsec-mb1`), DPDK's own AES-GCM library;
    /// the dataplane refuses to start where it cannot use it.
    IntelIpsecMb,
    /// ring (BoringSSL's assembly).
    Ring,
}

impl CryptoBackend {
    pub fn name(self) -> &'static str {
        match self {
            CryptoBackend::Auto => "auto",
            CryptoBackend::IntelIpsecMb => "intel-ipsec-mb",
            CryptoBackend::Ring => "ring",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// A DPDK device: vdev arguments (`net_pcap0,rx_pcap=…`) or a PCI address.
    pub device: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub eal: EalConfig,
    pub dataplane: DataplaneConfig,
    pub inside: PortConfig,
    pub outside: PortConfig,
    /// Rules in file order; the filter keeps the order per direction.
    pub policies: Vec<Rule>,
    /// Static SAs, keys loaded from their key files.
    pub sas: Vec<SaParams>,
    /// The control channel, admin socket and exporter (`[control]`).
    pub control: ControlConfig,
    /// Terminals bitw acts for (`[[terminal]]`).
    pub terminals: Vec<Terminal>,
    /// IKE peerings on the terminals' behalf (`[[connection]]`).
    pub connections: Vec<Connection>,
    /// Lines of the connection fields that bitw-control checks later.
    field_lines: BTreeMap<String, usize>,
}

/// `[control]`: how the two processes and the administrator reach each other.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// Where the dataplane listens and control connects: a Unix socket path
    /// or `tls://host:port`.
    pub socket: Endpoint,
    /// Permissions of a Unix `socket` (default 0600).
    pub socket_mode: u32,
    /// Mutual TLS for a `tls://` socket.
    pub tls: Option<TlsFiles>,
    /// Where control serves bitwctl.
    pub admin_socket: PathBuf,
    pub admin_socket_mode: u32,
    /// The Prometheus exporter's address; `None` = off.
    pub metrics_listen: Option<SocketAddr>,
    /// Per-SA metric series are exported for at most this many SAs.
    pub metrics_sa_limit: usize,
    /// Packets held (all SAs together) while an SA is being negotiated;
    /// the oldest is dropped when full.
    pub hold_packets: usize,
    /// Held packets are dropped after this long without their SA.
    pub hold_timeout: Duration,
    /// An acquire is repeated for the same flow at most this often.
    pub acquire_interval: Duration,
    /// Control's liveness check of the dataplane link, and its reconnect pace.
    pub ping_interval: Duration,
    pub reconnect_interval: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: Endpoint::Unix(PathBuf::from("/run/bitw/dataplane.sock")),
            socket_mode: 0o600,
            tls: None,
            admin_socket: PathBuf::from("/run/bitw/control.sock"),
            admin_socket_mode: 0o600,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9469))),
            metrics_sa_limit: 1000,
            hold_packets: 1024,
            hold_timeout: Duration::from_secs(5),
            acquire_interval: Duration::from_secs(1),
            ping_interval: Duration::from_secs(2),
            reconnect_interval: Duration::from_millis(500),
        }
    }
}

/// `[[terminal]]`: a device behind port `inside` that bitw speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    pub name: String,
    pub address: IpAddr,
}

// ---- raw shapes, as they are written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    eal: Option<RawEal>,
    dataplane: Option<RawDataplane>,
    ports: RawPorts,
    #[serde(default)]
    policy: Vec<RawPolicy>,
    #[serde(default)]
    sa: Vec<RawSa>,
    control: Option<RawControl>,
    #[serde(default)]
    terminal: Vec<RawTerminal>,
    #[serde(default)]
    connection: Vec<RawConnection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<String>>,
    socket_mode: Option<Spanned<IntOrStrMode>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_server_name: Option<String>,
    admin_socket: Option<Spanned<PathBuf>>,
    admin_socket_mode: Option<Spanned<IntOrStrMode>>,
    metrics_listen: Option<Spanned<String>>,
    metrics_sa_limit: Option<usize>,
    hold_packets: Option<Spanned<usize>>,
    hold_timeout: Option<Spanned<DurationValue>>,
    acquire_interval: Option<Spanned<DurationValue>>,
    ping_interval: Option<Spanned<DurationValue>>,
    reconnect_interval: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTerminal {
    name: Spanned<String>,
    address: Spanned<IpAddr>,
}

/// A file mode: `"0600"` / `"0o660"` (octal strings) or a number.
struct IntOrStrMode(u32);

impl<'de> Deserialize<'de> for IntOrStrMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IntOrStr {
            expecting: "a file mode such as \"0600\"",
            from_int: |n| {
                u32::try_from(n)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .map(IntOrStrMode)
                    .ok_or_else(|| {
                        format!("{n} is not a file mode; write it as a string, \"0600\"")
                    })
            },
            from_str: |text| {
                let t = text.trim();
                let t = t.strip_prefix("0o").unwrap_or(t);
                u32::from_str_radix(t, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .map(IntOrStrMode)
                    .ok_or_else(|| {
                        format!("`{text}` is not a file mode such as \"0600\" or \"0660\"")
                    })
            },
        })
    }
}

/// A duration: `"500ms"`, `"5s"`, `"2m"`, `"4h"`, `"1d"`, or a number of seconds.
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IntOrStr {
            expecting: "a duration such as \"5s\"",
            from_int: |n| {
                u64::try_from(n)
                    .map(|s| DurationValue(Duration::from_secs(s)))
                    .map_err(|_| format!("{n} is not a duration"))
            },
            from_str: |t| parse_duration(t).map(DurationValue),
        })
    }
}

/// Parses `"500ms"`, `"5s"`, `"2m"`, `"4h"`, `"1d"` (or bare seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!("`{text}` is not a duration such as \"500ms\", \"5s\", \"2m\", \"4h\" or \"1d\"")
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(bad)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSa {
    name: Spanned<String>,
    direction: Direction,
    spi: Spanned<Spi>,
    mode: Spanned<RawMode>,
    tunnel_src: Option<Spanned<IpAddr>>,
    tunnel_dst: Option<Spanned<IpAddr>>,
    #[serde(default)]
    encap: RawEncap,
    udp_sport: Option<u16>,
    udp_dport: Option<u16>,
    aead: Spanned<String>,
    key_file: Spanned<PathBuf>,
    #[serde(default = "default_true")]
    esn: bool,
    replay_window: Option<Spanned<u32>>,
    #[serde(default)]
    lifetime_packets: RawLimits,
    #[serde(default)]
    lifetime_bytes: RawLimits,
    policy: Option<Spanned<String>>,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Tunnel,
    Transport,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum RawEncap {
    #[default]
    None,
    Udp,
}

#[derive(Deserialize, Clone, Copy, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    soft: u64,
    #[serde(default)]
    hard: u64,
}

/// An SPI written as "0x00001001" or as a number.
#[derive(Clone, Copy)]
struct Spi(u32);

impl<'de> Deserialize<'de> for Spi {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IntOrStr {
            expecting: "an SPI: \"0x00001001\" or a number",
            from_int: |n| {
                u32::try_from(n)
                    .map(Spi)
                    .map_err(|_| format!("SPI {n} does not fit 32 bits"))
            },
            from_str: |s| {
                let t = s.trim();
                let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(h) => u32::from_str_radix(h, 16),
                    None => t.parse::<u32>(),
                };
                v.map(Spi).map_err(|_| {
                    format!("`{s}` is not an SPI: expected \"0x00001001\" or a decimal number")
                })
            },
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEal {
    #[serde(default)]
    args: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    workers: Option<Spanned<usize>>,
    burst: Option<Spanned<usize>>,
    default_action: Option<DefaultAction>,
    cores: Option<Spanned<Vec<usize>>>,
    rx_descriptors: Option<Spanned<u16>>,
    tx_descriptors: Option<Spanned<u16>>,
    mbufs: Option<Spanned<u32>>,
    flow_cache: Option<Spanned<usize>>,
    unknown_spi: Option<UnknownSpi>,
    crypto: Option<CryptoBackend>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum UnknownSpi {
    Drop,
    Classify,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    inside: RawPort,
    outside: RawPort,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    device: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    direction: Direction,
    src: Option<Spanned<AnyPrefix>>,
    dst: Option<Spanned<AnyPrefix>>,
    proto: Option<Spanned<Protocol>>,
    sport: Option<Spanned<PortRange>>,
    dport: Option<Spanned<PortRange>>,
    action: Spanned<RawAction>,
    sa: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    Protect,
    Bypass,
    Discard,
}

/// `any` (the default) or an IPv4/IPv6 prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AnyPrefix(Option<Prefix>);

impl<'de> Deserialize<'de> for AnyPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "any" {
            return Ok(AnyPrefix(None));
        }
        Prefix::from_str(&s)
            .map(|p| AnyPrefix(Some(p)))
            .map_err(serde::de::Error::custom)
    }
}

/// Accepts an integer or a string, and says so when given anything else.
struct IntOrStr<T> {
    expecting: &'static str,
    from_int: fn(i64) -> Result<T, String>,
    from_str: fn(&str) -> Result<T, String>,
}

impl<T> serde::de::Visitor<'_> for IntOrStr<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        (self.from_int)(v).map_err(E::custom)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_str)(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IntOrStr {
            expecting: "a protocol: any, tcp, udp, sctp, icmp, icmpv6 or a number 0-255",
            from_int: |n| match u8::try_from(n) {
                Ok(n) => Protocol::from_str(&n.to_string()),
                Err(_) => Err(format!("protocol number {n} is not in 0..=255")),
            },
            from_str: Protocol::from_str,
        })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IntOrStr {
            expecting: "a port: any, 443 or \"1000-2000\"",
            from_int: |n| {
                u16::try_from(n)
                    .map(|p| PortRange { lo: p, hi: p })
                    .map_err(|_| format!("port {n} is not in 0..=65535"))
            },
            from_str: PortRange::from_str,
        })
    }
}

impl<'de> Deserialize<'de> for Direction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "out" => Ok(Direction::Out),
            "in" => Ok(Direction::In),
            other => Err(serde::de::Error::custom(format!(
                "unknown direction `{other}`: expected `out` (inside -> outside) or `in` (outside -> inside)"
            ))),
        }
    }
}

/// 1-based line of byte offset `pos` in `text`.
pub(crate) fn line_of(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

pub(crate) struct Ctx<'a> {
    pub(crate) file: &'a Path,
    pub(crate) text: &'a str,
}

impl Ctx<'_> {
    /// Line of the `sa` key of the `i`-th `[[policy]]` table (or of its header).
    fn line_of_policy(&self, i: usize) -> Option<usize> {
        let mut n = 0;
        let mut header = None;
        for (no, l) in self.text.lines().enumerate() {
            let t = l.trim();
            if t.starts_with('[') {
                if header.is_some() {
                    break; // the next table: no `sa` key seen
                }
                if t.starts_with("[[policy]]") {
                    if n == i {
                        header = Some(no + 1);
                    }
                    n += 1;
                }
            } else if header.is_some() && t.split('=').next().map(str::trim) == Some("sa") {
                return Some(no + 1);
            }
        }
        header
    }

    pub(crate) fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        field: String,
        message: String,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line_of(self.text, span.start)),
            field: Some(field),
            message,
        })
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is used in messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        let ctx = Ctx { file: path, text };

        let eal = EalConfig {
            args: raw.eal.map(|e| e.args).unwrap_or_else(default_eal_args),
        };

        let rd = raw.dataplane.unwrap_or(RawDataplane {
            workers: None,
            burst: None,
            default_action: None,
            cores: None,
            rx_descriptors: None,
            tx_descriptors: None,
            mbufs: None,
            flow_cache: None,
            unknown_spi: None,
            crypto: None,
        });
        let workers = match rd.workers {
            Some(w) if *w.get_ref() == 0 || *w.get_ref() > 64 => {
                return ctx.err(
                    w.span(),
                    "dataplane.workers".into(),
                    format!("{} workers: expected 1 to 64 (one per core)", w.get_ref()),
                )
            }
            Some(w) => w.into_inner(),
            None => 1,
        };
        let burst = match rd.burst {
            Some(b) if *b.get_ref() == 0 || *b.get_ref() > MAX_BURST => {
                return ctx.err(
                    b.span(),
                    "dataplane.burst".into(),
                    format!(
                        "burst {} is out of range: expected 1 to {MAX_BURST} (32 is usual)",
                        b.get_ref()
                    ),
                )
            }
            Some(b) => b.into_inner(),
            None => 32,
        };
        let cores = match rd.cores {
            Some(c) if c.get_ref().len() != workers => {
                return ctx.err(
                    c.span(),
                    "dataplane.cores".into(),
                    format!(
                        "{} cores listed for {workers} workers: list one core per worker",
                        c.get_ref().len()
                    ),
                )
            }
            Some(c) => {
                let mut sorted = c.get_ref().clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != workers {
                    return ctx.err(
                        c.span(),
                        "dataplane.cores".into(),
                        "a core is listed twice: each worker needs its own core".into(),
                    );
                }
                Some(c.into_inner())
            }
            None => None,
        };
        let descriptors = |v: Option<Spanned<u16>>, name: &str| -> Result<u16, ConfigError> {
            match v {
                Some(d)
                    if !(64..=16384).contains(d.get_ref()) || !d.get_ref().is_power_of_two() =>
                {
                    ctx.err(
                        d.span(),
                        format!("dataplane.{name}"),
                        format!(
                            "{} descriptors: expected a power of two from 64 to 16384",
                            d.get_ref()
                        ),
                    )
                }
                Some(d) => Ok(d.into_inner()),
                None => Ok(1024),
            }
        };
        let rx_descriptors = descriptors(rd.rx_descriptors, "rx_descriptors")?;
        let tx_descriptors = descriptors(rd.tx_descriptors, "tx_descriptors")?;
        let mbufs = match rd.mbufs {
            Some(m) if *m.get_ref() < 1024 => {
                return ctx.err(m.span(), "dataplane.mbufs".into(), format!(
                    "{} mbufs is too few: at least 1024 (descriptors and bursts of every queue hold mbufs)",
                    m.get_ref()))
            }
            Some(m) => m.into_inner(),
            None => 0, // sized from the queues below
        };
        let needed = (workers as u32)
            * 2
            * (rx_descriptors as u32 + tx_descriptors as u32 + 2 * burst as u32);
        let mbufs = if mbufs == 0 {
            (needed + 4096).next_power_of_two() - 1
        } else {
            mbufs
        };

        let flow_cache = match rd.flow_cache {
            Some(f) if *f.get_ref() > 1 << 20 => {
                return ctx.err(
                    f.span(),
                    "dataplane.flow_cache".into(),
                    format!(
                        "{} entries is more than the 1048576 allowed (0 turns the cache off)",
                        f.get_ref()
                    ),
                )
            }
            Some(f) => f.into_inner(),
            None => 4096,
        };
        let dataplane = DataplaneConfig {
            flow_cache,
            drop_unknown_spi: rd.unknown_spi != Some(UnknownSpi::Classify),
            handoff_depth: 4096,
            crypto: rd.crypto.unwrap_or_default(),
            workers,
            burst,
            default_action: rd.default_action.unwrap_or(DefaultAction::Bypass),
            cores,
            rx_descriptors,
            tx_descriptors,
            mbufs,
        };

        let port = |p: RawPort, name: &str| -> Result<PortConfig, ConfigError> {
            let dev = p.device.get_ref().trim();
            if dev.is_empty() {
                return ctx.err(
                    p.device.span(),
                    format!("ports.{name}.device"),
                    "empty device: give vdev arguments (net_pcap0,rx_pcap=…) or a PCI address"
                        .into(),
                );
            }
            Ok(PortConfig {
                device: dev.to_string(),
            })
        };
        let inside = port(raw.ports.inside, "inside")?;
        let outside = port(raw.ports.outside, "outside")?;
        if device_name(&inside.device) == device_name(&outside.device) {
            return Err(ConfigError {
                file: path.to_path_buf(),
                line: None,
                field: Some("ports.outside.device".into()),
                message: format!(
                    "inside and outside are the same device `{}`",
                    device_name(&inside.device)
                ),
            });
        }

        let mut policies = Vec::with_capacity(raw.policy.len());
        // Names seen so far: duplicates are found in O(1), so large tables load in linear time.
        let mut rule_names: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (i, p) in raw.policy.into_iter().enumerate() {
            let field = |f: &str| format!("policy[{i}].{f}");
            let name = p.name.get_ref().trim().to_string();
            if name.is_empty() {
                return ctx.err(p.name.span(), field("name"), "empty rule name".into());
            }
            if !rule_names.insert(name.clone()) {
                return ctx.err(
                    p.name.span(),
                    field("name"),
                    format!("rule name `{name}` is used twice"),
                );
            }
            let prefix = |p: &Option<Spanned<AnyPrefix>>| p.as_ref().and_then(|s| s.get_ref().0);
            let (src, dst) = (prefix(&p.src), prefix(&p.dst));
            if let (Some(s), Some(d), Some(dspan)) = (src, dst, p.dst.as_ref()) {
                if s.is_ipv4() != d.is_ipv4() {
                    return ctx.err(
                        dspan.span(),
                        field("dst"),
                        format!("`{d}` and src `{s}` are of different address families"),
                    );
                }
            }
            let action = match (*p.action.get_ref(), &p.sa) {
                (RawAction::Protect, Some(sa)) if !sa.get_ref().trim().is_empty() => {
                    Action::Protect {
                        sa: sa.get_ref().trim().to_string(),
                    }
                }
                (RawAction::Protect, _) => {
                    return ctx.err(
                        p.action.span(),
                        field("sa"),
                        "a protect rule needs `sa = \"<name of an SA>\"`".into(),
                    )
                }
                (_, Some(sa)) => {
                    return ctx.err(
                        sa.span(),
                        field("sa"),
                        "`sa` is only meaningful with action = \"protect\"".into(),
                    )
                }
                (RawAction::Bypass, None) => Action::Bypass,
                (RawAction::Discard, None) => Action::Discard,
            };
            // Where to point when a check involves a field the rule may not spell out.
            let span_of = |f: Option<std::ops::Range<usize>>| f.unwrap_or_else(|| p.action.span());
            let proto = p.proto.as_ref().map_or(Protocol::Any, |x| *x.get_ref());
            let proto_span = span_of(p.proto.as_ref().map(|x| x.span()));
            let sport = p.sport.as_ref().map_or(PortRange::ANY, |x| *x.get_ref());
            let dport = p.dport.as_ref().map_or(PortRange::ANY, |x| *x.get_ref());
            // The first port field written, for messages about ports in general.
            let (port_field, port_span) = match (&p.sport, &p.dport) {
                (Some(s), _) if !s.get_ref().is_any() => ("sport", s.span()),
                (_, Some(d)) => ("dport", d.span()),
                (Some(s), None) => ("sport", s.span()),
                (None, None) => ("sport", p.action.span()),
            };
            let icmp_like = matches!(proto, Protocol::Icmp | Protocol::Icmpv6);
            if !(proto.has_ports() || icmp_like || (sport.is_any() && dport.is_any())) {
                return ctx.err(port_span, field(port_field), format!(
                    "ports need proto = tcp, udp, sctp or another protocol with ports (or icmp/icmpv6, where sport is the type and dport the code); this rule has proto {proto}"));
            }
            let family = src.or(dst);
            if let (Protocol::Icmp, Some(pf)) = (proto, family) {
                if !pf.is_ipv4() {
                    return ctx.err(
                        proto_span,
                        field("proto"),
                        "icmp is IPv4's; use icmpv6 with IPv6 prefixes".into(),
                    );
                }
            }
            if let (Protocol::Icmpv6, Some(pf)) = (proto, family) {
                if pf.is_ipv4() {
                    return ctx.err(
                        proto_span,
                        field("proto"),
                        "icmpv6 is IPv6's; use icmp with IPv4 prefixes".into(),
                    );
                }
            }
            if icmp_like {
                for (name, range, spanned) in
                    [("sport", sport, &p.sport), ("dport", dport, &p.dport)]
                {
                    if !range.is_any() && range.hi > 255 {
                        let what = if name == "sport" { "type" } else { "code" };
                        return ctx.err(
                            span_of(spanned.as_ref().map(|x| x.span())),
                            field(name),
                            format!(
                                "for icmp/icmpv6, {name} is the ICMP {what}: 0 to 255, not {range}"
                            ),
                        );
                    }
                }
            }
            policies.push(Rule {
                name,
                direction: p.direction,
                src,
                dst,
                proto,
                sport,
                dport,
                action,
            });
        }

        let sas = load_sas(&ctx, raw.sa, &policies)?;
        let control = load_control(&ctx, raw.control)?;
        let terminals = load_terminals(&ctx, raw.terminal)?;
        let static_names: Vec<&str> = policies
            .iter()
            .map(|p| p.name.as_str())
            .chain(sas.iter().map(|s| s.name.as_str()))
            .collect();
        let mut field_lines = BTreeMap::new();
        let connections = load_connections(
            &ctx,
            raw.connection,
            &terminals,
            &static_names,
            &mut field_lines,
        )?;

        Ok(Config {
            path: path.to_path_buf(),
            eal,
            dataplane,
            inside,
            outside,
            policies,
            sas,
            control,
            terminals,
            connections,
            field_lines,
        })
    }

    /// An error about a field checked after loading (bitw-control's checks
    /// of proposals and certificates), with the field's line when known.
    pub fn field_error(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: self.field_lines.get(field).copied(),
            field: Some(field.to_string()),
            message: message.into(),
        }
    }
}

fn load_control(ctx: &Ctx, raw: Option<RawControl>) -> Result<ControlConfig, ConfigError> {
    let mut c = ControlConfig::default();
    let Some(r) = raw else { return Ok(c) };
    if let Some(s) = &r.socket {
        c.socket = s
            .get_ref()
            .parse()
            .or_else(|e| ctx.err(s.span(), "control.socket".into(), e))?;
    }
    if let Some(m) = r.socket_mode {
        c.socket_mode = m.into_inner().0;
    }
    if let Some(m) = r.admin_socket_mode {
        c.admin_socket_mode = m.into_inner().0;
    }
    let tls_given = [
        r.tls_cert.is_some(),
        r.tls_key.is_some(),
        r.tls_ca.is_some(),
    ];
    match (r.tls_cert, r.tls_key, r.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            c.tls = Some(TlsFiles {
                cert,
                key,
                ca,
                server_name: r.tls_server_name,
            })
        }
        _ if tls_given.iter().any(|g| *g) => {
            return Err(ConfigError {
                file: ctx.file.to_path_buf(),
                line: None,
                field: Some("control.tls_cert".into()),
                message: "mutual TLS needs all three of tls_cert, tls_key and tls_ca".into(),
            })
        }
        _ => {}
    }
    if let (Endpoint::Tls(_), None, Some(s)) = (&c.socket, &c.tls, &r.socket) {
        return ctx.err(
            s.span(),
            "control.socket".into(),
            "a tls:// socket needs tls_cert, tls_key and tls_ca in [control]".into(),
        );
    }
    if let Some(a) = r.admin_socket {
        if a.get_ref().as_os_str().is_empty() {
            return ctx.err(a.span(), "control.admin_socket".into(), "empty path".into());
        }
        c.admin_socket = a.into_inner();
    }
    if let Some(m) = &r.metrics_listen {
        let t = m.get_ref().trim();
        c.metrics_listen = if t.is_empty() || t == "off" {
            None
        } else {
            Some(t.parse().or_else(|_| {
                ctx.err(
                    m.span(),
                    "control.metrics_listen".into(),
                    format!("`{t}` is not an address:port such as 127.0.0.1:9469 (or \"off\")"),
                )
            })?)
        };
    }
    if let Some(n) = r.metrics_sa_limit {
        c.metrics_sa_limit = n;
    }
    if let Some(h) = r.hold_packets {
        if *h.get_ref() > 1 << 20 {
            return ctx.err(
                h.span(),
                "control.hold_packets".into(),
                format!("{} is more than the 1048576 allowed", h.get_ref()),
            );
        }
        c.hold_packets = h.into_inner();
    }
    let positive = |v: Spanned<DurationValue>, field: &str| -> Result<Duration, ConfigError> {
        if v.get_ref().0.is_zero() {
            return ctx.err(
                v.span(),
                format!("control.{field}"),
                "must be more than 0".into(),
            );
        }
        Ok(v.into_inner().0)
    };
    if let Some(v) = r.hold_timeout {
        c.hold_timeout = positive(v, "hold_timeout")?;
    }
    if let Some(v) = r.acquire_interval {
        c.acquire_interval = positive(v, "acquire_interval")?;
    }
    if let Some(v) = r.ping_interval {
        c.ping_interval = positive(v, "ping_interval")?;
    }
    if let Some(v) = r.reconnect_interval {
        c.reconnect_interval = positive(v, "reconnect_interval")?;
    }
    Ok(c)
}

fn load_terminals(ctx: &Ctx, raw: Vec<RawTerminal>) -> Result<Vec<Terminal>, ConfigError> {
    let mut out: Vec<Terminal> = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let name = t.name.get_ref().trim().to_string();
        if name.is_empty() {
            return ctx.err(
                t.name.span(),
                format!("terminal[{i}].name"),
                "empty name".into(),
            );
        }
        if out.iter().any(|o| o.name == name) {
            return ctx.err(
                t.name.span(),
                format!("terminal[{i}].name"),
                format!("terminal name `{name}` is used twice"),
            );
        }
        let address = *t.address.get_ref();
        if let Some(o) = out.iter().find(|o| o.address == address) {
            return ctx.err(
                t.address.span(),
                format!("terminal[{i}].address"),
                format!("{address} is already terminal `{}`'s address", o.name),
            );
        }
        out.push(Terminal { name, address });
    }
    Ok(out)
}

/// Validates the `[[sa]]` tables, reads their keys, and checks that every
/// protect rule names an SA of its direction.
fn load_sas(ctx: &Ctx, raw: Vec<RawSa>, policies: &[Rule]) -> Result<Vec<SaParams>, ConfigError> {
    use std::collections::HashMap;
    let mut sas: Vec<SaParams> = Vec::with_capacity(raw.len());
    // Indexes over `sas` (name -> index, (direction, SPI) -> index): checks in
    // O(1), so a file of many SAs loads in linear time.
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut by_spi: HashMap<(Direction, u32), usize> = HashMap::new();
    for (i, r) in raw.into_iter().enumerate() {
        let field = |f: &str| format!("sa[{i}].{f}");
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() {
            return ctx.err(r.name.span(), field("name"), "empty SA name".into());
        }
        if by_name.contains_key(&name) {
            return ctx.err(
                r.name.span(),
                field("name"),
                format!("SA name `{name}` is used twice"),
            );
        }
        let spi = r.spi.get_ref().0;
        if spi < 256 {
            return ctx.err(
                r.spi.span(),
                field("spi"),
                format!(
                    "SPI {spi:#x} is reserved (RFC 4303 §2.1: 1-255 are reserved, 0 is never sent)"
                ),
            );
        }
        if let Some(other) = by_spi.get(&(r.direction, spi)).map(|&k| &sas[k]) {
            return ctx.err(
                r.spi.span(),
                field("spi"),
                format!(
                    "SPI {spi:#010x} is already used by SA `{}` of the same direction",
                    other.name
                ),
            );
        }
        let alg = AeadAlg::from_name(r.aead.get_ref().trim()).map_or_else(
            || {
                ctx.err(
                    r.aead.span(),
                    field("aead"),
                    format!(
                        "unknown AEAD `{}`: expected aes128gcm16, aes256gcm16 or chacha20poly1305",
                        r.aead.get_ref()
                    ),
                )
            },
            Ok,
        )?;
        let mode = match (*r.mode.get_ref(), &r.tunnel_src, &r.tunnel_dst) {
            (RawMode::Tunnel, Some(s), Some(d)) => {
                if s.get_ref().is_ipv4() != d.get_ref().is_ipv4() {
                    return ctx.err(d.span(), field("tunnel_dst"), format!(
                        "`{}` and tunnel_src `{}` are of different address families", d.get_ref(), s.get_ref()));
                }
                Mode::Tunnel { src: *s.get_ref(), dst: *d.get_ref() }
            }
            (RawMode::Tunnel, _, _) => {
                return ctx.err(r.mode.span(), field(if r.tunnel_src.is_none() { "tunnel_src" } else { "tunnel_dst" }),
                    "tunnel mode needs tunnel_src and tunnel_dst (the outer addresses)".into())
            }
            (RawMode::Transport, Some(t), _) | (RawMode::Transport, None, Some(t)) => {
                return ctx.err(t.span(), field("tunnel_src"),
                    "tunnel_src/tunnel_dst are for mode = \"tunnel\"; transport mode keeps the packet's addresses".into())
            }
            (RawMode::Transport, None, None) => Mode::Transport,
        };
        let encap = match r.encap {
            RawEncap::None => {
                if r.udp_sport.is_some() || r.udp_dport.is_some() {
                    return ctx.err(
                        r.name.span(),
                        field("udp_sport"),
                        "udp_sport/udp_dport need encap = \"udp\"".into(),
                    );
                }
                Encap::None
            }
            RawEncap::Udp => Encap::Udp {
                sport: r.udp_sport.unwrap_or(NAT_T_PORT_DEFAULT),
                dport: r.udp_dport.unwrap_or(NAT_T_PORT_DEFAULT),
            },
        };
        let replay_window = match (&r.replay_window, r.direction) {
            (Some(w), Direction::Out) => {
                return ctx.err(w.span(), field("replay_window"), "replay_window is for inbound SAs (direction = \"in\")".into())
            }
            (Some(w), Direction::In) if *w.get_ref() > 1 << 20 => {
                return ctx.err(w.span(), field("replay_window"), format!(
                    "window of {} packets is more than the 1048576 supported (0 turns replay checks off)", w.get_ref()))
            }
            (Some(w), Direction::In) => *w.get_ref(),
            (None, Direction::In) => 1024,
            (None, Direction::Out) => 0,
        };
        let policy = match (&r.policy, r.direction) {
            (None, _) => None,
            (Some(p), Direction::Out) => {
                return ctx.err(p.span(), field("policy"), "policy is for inbound SAs (direction = \"in\"); an outbound SA is replaced by name".into())
            }
            (Some(p), Direction::In) => {
                let p = p.get_ref().trim();
                if p.is_empty() {
                    return ctx.err(r.policy.as_ref().unwrap().span(), field("policy"), "empty policy name (leave it out to use the SA's name)".into());
                }
                Some(p.to_string())
            }
        };
        for (lname, l) in [
            ("lifetime_packets", r.lifetime_packets),
            ("lifetime_bytes", r.lifetime_bytes),
        ] {
            if l.soft != 0 && l.hard != 0 && l.soft >= l.hard {
                return ctx.err(
                    r.name.span(),
                    field(lname),
                    format!(
                        "soft limit {} must be below the hard limit {}",
                        l.soft, l.hard
                    ),
                );
            }
        }
        let key_material = read_key_file(r.key_file.get_ref()).or_else(|m| {
            ctx.err(
                r.key_file.span(),
                field("key_file"),
                format!("{}: {m}", r.key_file.get_ref().display()),
            )
        })?;
        let want = alg.key_len() + crate::sa_params::SALT_LEN;
        if key_material.len() != want {
            return ctx.err(
                r.key_file.span(),
                field("key_file"),
                format!(
                    "{} holds {} bytes; {} needs {want} ({} bytes of key, then the 4-byte salt)",
                    r.key_file.get_ref().display(),
                    key_material.len(),
                    alg.name(),
                    alg.key_len()
                ),
            );
        }
        sas.push(SaParams {
            name,
            direction: r.direction,
            spi,
            mode,
            encap,
            alg,
            key_material,
            esn: r.esn,
            replay_window,
            lifetime_packets: Limits {
                soft: r.lifetime_packets.soft,
                hard: r.lifetime_packets.hard,
            },
            lifetime_bytes: Limits {
                soft: r.lifetime_bytes.soft,
                hard: r.lifetime_bytes.hard,
            },
            policy,
        });
        by_name.insert(sas[sas.len() - 1].name.clone(), sas.len() - 1);
        by_spi.insert((r.direction, spi), sas.len() - 1);
    }
    let inbound_policies: std::collections::HashSet<&str> = sas
        .iter()
        .filter(|s| s.direction == Direction::In)
        .map(|s| s.policy_name())
        .collect();
    // Every protect rule must name an SA of its own direction; an inbound
    // rule names inbound SAs by their policy name (the SA's name by default).
    for (i, rule) in policies.iter().enumerate() {
        if let Action::Protect { sa } = &rule.action {
            if rule.direction == Direction::In && inbound_policies.contains(sa.as_str()) {
                continue;
            }
            match by_name.get(sa).map(|&k| &sas[k]) {
                Some(s) if s.direction == rule.direction && s.direction == Direction::In => {
                    return Err(ConfigError {
                        file: ctx.file.to_path_buf(),
                        line: ctx.line_of_policy(i),
                        field: Some(format!("policy[{i}].sa")),
                        message: format!(
                            "SA `{sa}` has policy = \"{}\": inbound rules name it by that",
                            s.policy_name()
                        ),
                    })
                }
                Some(s) if s.direction == rule.direction => {}
                Some(s) => {
                    return Err(ConfigError {
                        file: ctx.file.to_path_buf(),
                        line: ctx.line_of_policy(i),
                        field: Some(format!("policy[{i}].sa")),
                        message: format!(
                            "SA `{sa}` is an {} SA but rule `{}` is for direction {}",
                            s.direction.as_str(),
                            rule.name,
                            rule.direction.as_str()
                        ),
                    })
                }
                None => {
                    return Err(ConfigError {
                        file: ctx.file.to_path_buf(),
                        line: ctx.line_of_policy(i),
                        field: Some(format!("policy[{i}].sa")),
                        message: if rule.direction == Direction::In {
                            format!("no [[sa]] is named `{sa}` or has policy = \"{sa}\"")
                        } else {
                            format!("no [[sa]] is named `{sa}`")
                        },
                    })
                }
            }
        }
    }
    Ok(sas)
}

/// Reads a hex key file (whitespace, colons and a 0x prefix allowed). It must
/// not be readable by group or others: keys are secrets.
fn read_key_file(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the key file: {e}"))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "the key file is readable by others (mode {:o}); run `chmod 600 {}`",
            mode & 0o777,
            path.display()
        ));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the key file: {e}"))?,
    );
    let hex: zeroize::Zeroizing<String> = zeroize::Zeroizing::new(
        text.trim()
            .trim_start_matches("0x")
            .chars()
            .filter(|c| !c.is_whitespace() && *c != ':')
            .collect(),
    );
    if !hex.len().is_multiple_of(2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        // Never echo the content: it is a key.
        return Err(
            "the key file must hold the key and salt as hex digits (an even number of them)".into(),
        );
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex checked above"))
        .collect();
    Ok(zeroize::Zeroizing::new(bytes))
}

/// The EAL arguments used when `[eal]` is absent: no hugepages, no PCI scan.
pub fn default_eal_args() -> Vec<String> {
    [
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        "--no-shconf",
        "--no-telemetry",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The DPDK device name of a device string: `net_pcap0` of `net_pcap0,rx_pcap=…`.
pub fn device_name(device: &str) -> &str {
    device.split(',').next().unwrap_or(device).trim()
}

/// True when `device` is a PCI address (`0000:01:00.0` or `01:00.0`), not a vdev.
pub fn is_pci_address(device: &str) -> bool {
    let name = device_name(device);
    let parts: Vec<&str> = name.split(':').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    let bdf = |bus: &str, devfn: &str| {
        let mut it = devfn.split('.');
        hex(bus, 2)
            && it.next().is_some_and(|d| hex(d, 2))
            && it
                .next()
                .is_some_and(|f| f.len() == 1 && f.chars().all(|c| c.is_digit(8)))
            && it.next().is_none()
    };
    match parts.as_slice() {
        [dom, bus, devfn] => hex(dom, 4) && bdf(bus, devfn),
        [bus, devfn] => bdf(bus, devfn),
        _ => false,
    }
}

fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of(text, s.start));
    // The toml crate puts the key path in the message for unknown/missing keys;
    // for values it points at the value, whose key we recover from the line.
    let field = e.span().and_then(|s| {
        let start = text[..s.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |p| p + 1);
        let end = text[s.start.min(text.len())..]
            .find('\n')
            .map_or(text.len(), |p| s.start + p);
        let line_text = &text[start..end];
        let key = line_text.split('=').next()?.trim();
        let in_value = line_text.find('=').is_some_and(|eq| start + eq < s.start);
        (in_value && !key.is_empty() && !key.starts_with('[')).then(|| {
            match table_path_at(text, start) {
                Some(t) => format!("{t}.{key}"),
                None => key.to_string(),
            }
        })
    });
    ConfigError {
        file: path.to_path_buf(),
        line,
        field,
        message: e.message().trim().to_string(),
    }
}

/// The table header in force at byte `pos`, with array-of-table indices: `policy[3]`.
fn table_path_at(text: &str, pos: usize) -> Option<String> {
    let mut current: Option<String> = None;
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > pos {
            break;
        }
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            current = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            current = Some(name.trim().to_string());
        }
        offset += line.len();
    }
    current
}

/// Parses an address as written in the config (used by tools and tests).
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[eal]
args = ["--no-huge"]

[dataplane]
workers = 1
burst = 32
default_action = "discard"

[ports.inside]
device = "net_null0"
[ports.outside]
device = "net_null1"

[[policy]]
name = "web"
direction = "out"
src = "10.0.0.0/24"
dst = "any"
proto = "tcp"
sport = "any"
dport = "1000-2000"
action = "bypass"

[[policy]]
name = "hq"
direction = "in"
src = "2001:db8::/32"
proto = 17
dport = 53
action = "protect"
sa = "to-hq"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    /// A key file (20 bytes: AES-128 key + salt), mode 0600, unique per test.
    fn key_file(tag: &str, mode: u32, hex: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("bitw-test-{}-{tag}.key", std::process::id()));
        std::fs::write(&p, hex).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    const KEY20: &str = "000102030405060708090a0b0c0d0e0f10111213\n";

    /// GOOD plus the SA its protect rule names (lines 33 on).
    fn with_sa(tag: &str, sa_extra: &str) -> String {
        let k = key_file(tag, 0o600, KEY20);
        format!(
            "{GOOD}\n[[sa]]\nname = \"to-hq\"\ndirection = \"in\"\nspi = \"0x00001001\"\nmode = \"tunnel\"\ntunnel_src = \"2001:db8::1\"\ntunnel_dst = \"2001:db8::2\"\naead = \"aes128gcm16\"\nkey_file = \"{}\"\n{sa_extra}",
            k.display()
        )
    }

    #[test]
    fn good_config_parses() {
        let c = parse(&with_sa("good", "")).unwrap();
        assert_eq!(c.sas.len(), 1);
        assert_eq!(c.sas[0].spi, 0x1001);
        assert_eq!(c.sas[0].replay_window, 1024);
        assert!(c.sas[0].esn);
        assert_eq!(
            &c.sas[0].key_material[..],
            &(0..20u8).collect::<Vec<_>>()[..]
        );
        assert_eq!(c.dataplane.default_action, DefaultAction::Discard);
        assert_eq!(c.policies.len(), 2);
        assert_eq!(c.policies[0].dport, PortRange { lo: 1000, hi: 2000 });
        assert_eq!(c.policies[1].proto, Protocol::Udp);
        assert_eq!(c.policies[1].dport, PortRange { lo: 53, hi: 53 });
        assert_eq!(c.policies[1].action, Action::Protect { sa: "to-hq".into() });
        assert!(c.dataplane.mbufs >= 4096);
    }

    fn expect_err(text: &str, line: usize, field: &str, needle: &str) {
        let e = parse(text).expect_err("config should be rejected");
        assert_eq!(e.line, Some(line), "{e}");
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(
            e.message.contains(needle),
            "message `{}` lacks `{needle}`",
            e.message
        );
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("test.toml:{line}: field `{field}`")),
            "{shown}"
        );
    }

    #[test]
    fn bad_prefix_names_line_and_field() {
        let t = GOOD.replace("src = \"10.0.0.0/24\"", "src = \"10.0.0.0/33\"");
        expect_err(&t, 18, "policy[0].src", "prefix length 33");
    }

    #[test]
    fn bad_port_range_names_line_and_field() {
        let t = GOOD.replace("\"1000-2000\"", "\"2000-1000\"");
        expect_err(&t, 22, "policy[0].dport", "2000-1000");
    }

    #[test]
    fn bad_proto_and_action() {
        let t = GOOD.replace("proto = \"tcp\"", "proto = \"tcpp\"");
        expect_err(&t, 20, "policy[0].proto", "tcpp");
        let t = GOOD.replace("action = \"bypass\"", "action = \"allow\"");
        expect_err(&t, 23, "policy[0].action", "allow");
    }

    #[test]
    fn protect_without_sa_and_sa_without_protect() {
        let t = GOOD.replace("sa = \"to-hq\"", "");
        expect_err(&t, 31, "policy[1].sa", "needs `sa");
        let t = GOOD.replace("action = \"bypass\"", "action = \"bypass\"\nsa = \"x\"");
        expect_err(&t, 24, "policy[0].sa", "only meaningful");
    }

    #[test]
    fn mixed_families_rejected() {
        let t = GOOD.replace("dst = \"any\"", "dst = \"::/0\"");
        expect_err(&t, 19, "policy[0].dst", "different address families");
    }

    #[test]
    fn unknown_key_and_workers_range() {
        let e = parse(&GOOD.replace("burst = 32", "brust = 32")).unwrap_err();
        assert_eq!(e.line, Some(7));
        assert!(e.message.contains("brust"), "{e}");
        expect_err(
            &GOOD.replace("workers = 1", "workers = 0"),
            6,
            "dataplane.workers",
            "expected 1 to 64",
        );
    }

    #[test]
    fn duplicate_rule_name() {
        let t = GOOD.replace("name = \"hq\"", "name = \"web\"");
        expect_err(&t, 26, "policy[1].name", "used twice");
    }

    #[test]
    fn ports_without_port_protocol() {
        // The rule sets only dport: the message points at it.
        let t = GOOD.replace("proto = \"tcp\"", "proto = \"any\"");
        expect_err(&t, 22, "policy[0].dport", "ports need proto");
        let t = GOOD
            .replace("proto = \"tcp\"", "proto = \"icmp\"")
            .replace("dport = \"1000-2000\"", "dport = 300");
        expect_err(&t, 22, "policy[0].dport", "ICMP code");
        let t = GOOD.replace("dport = 53", "dport = 5.5");
        expect_err(&t, 30, "policy[1].dport", "expected a port");
    }

    #[test]
    fn sa_errors_name_line_and_field() {
        // The protect rule's SA must exist: the error points at its `sa` line.
        let e = parse(GOOD).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(32), Some("policy[1].sa")),
            "{e}"
        );
        assert!(e.message.contains("no [[sa]] is named `to-hq`"), "{e}");
        // Key file readable by others.
        let loose = key_file("loose", 0o644, KEY20);
        let t = with_sa("x1", "").replace(
            &key_file("x1", 0o600, KEY20).display().to_string(),
            &loose.display().to_string(),
        );
        let e = parse(&t).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sa[0].key_file"), "{e}");
        assert!(e.message.contains("chmod 600"), "{e}");
        // Wrong key length for the algorithm.
        let t = with_sa("x2", "").replace("aes128gcm16", "aes256gcm16");
        let e = parse(&t).unwrap_err();
        assert!(
            e.message.contains("holds 20 bytes; aes256gcm16 needs 36"),
            "{e}"
        );
        assert!(
            !e.message.contains("0001020304"),
            "keys never appear in messages"
        );
        // Not hex: the content is not echoed.
        let bad = key_file("nothex", 0o600, "secretsecret");
        let t = with_sa("x3", "").replace(
            &key_file("x3", 0o600, KEY20).display().to_string(),
            &bad.display().to_string(),
        );
        let e = parse(&t).unwrap_err();
        assert!(
            e.message.contains("hex digits") && !e.message.contains("secret"),
            "{e}"
        );
        // Tunnel without addresses, replay window on an outbound SA, reserved SPI, duplicate SPI.
        let e =
            parse(&with_sa("x4", "").replace("tunnel_dst = \"2001:db8::2\"\n", "")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sa[0].tunnel_dst"), "{e}");
        let e = parse(&with_sa("x5", "").replace("spi = \"0x00001001\"", "spi = 17")).unwrap_err();
        assert!(e.message.contains("reserved"), "{e}");
        let dup = format!("{}\n[[sa]]\nname = \"b\"\ndirection = \"in\"\nspi = 4097\nmode = \"transport\"\naead = \"aes128gcm16\"\nkey_file = \"{}\"\n", with_sa("x6", ""), key_file("x6b", 0o600, KEY20).display());
        let e = parse(&dup).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sa[1].spi"), "{e}");
        assert!(e.message.contains("already used by SA `to-hq`"), "{e}");
        let out = with_sa("x7", "replay_window = 64\n")
            .replace("direction = \"in\"\nspi", "direction = \"out\"\nspi");
        let e = parse(&out).unwrap_err();
        // The rule is inbound, the SA outbound: one of the two is reported first.
        assert!(
            e.message.contains("replay_window is for inbound SAs")
                || e.message.contains("is an out SA"),
            "{e}"
        );
    }

    #[test]
    fn sa_policy_names() {
        // Two inbound SAs under one policy name; the inbound rule names the policy.
        let two = |tag: &str, rule_sa: &str| {
            format!(
                "{}\n[[sa]]\nname = \"to-hq-new\"\ndirection = \"in\"\nspi = 4098\nmode = \"transport\"\naead = \"aes128gcm16\"\nkey_file = \"{}\"\npolicy = \"hq-in\"\n",
                with_sa(tag, "policy = \"hq-in\"\n"),
                key_file(&format!("{tag}b"), 0o600, KEY20).display()
            )
            .replace("sa = \"to-hq\"", &format!("sa = \"{rule_sa}\""))
        };
        let c = parse(&two("pol1", "hq-in")).unwrap();
        assert_eq!(c.sas[0].policy.as_deref(), Some("hq-in"));
        assert_eq!(c.sas[1].policy_name(), "hq-in");
        // The SA's own name no longer answers once it has a policy name.
        let e = parse(&two("pol2", "to-hq")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("policy[1].sa"), "{e}");
        assert!(e.message.contains("has policy = \"hq-in\""), "{e}");
        let e = parse(&two("pol3", "nobody")).unwrap_err();
        assert!(e.message.contains("or has policy = \"nobody\""), "{e}");
        // Without policy the name is the policy name (the GOOD rule names `to-hq`).
        assert_eq!(parse(&with_sa("pol4", "")).unwrap().sas[0].policy, None);
        // Outbound SAs take none; an empty one is refused.
        let e = parse(
            &with_sa("pol5", "policy = \"p\"\n")
                .replace("direction = \"in\"\nspi", "direction = \"out\"\nspi"),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sa[0].policy"), "{e}");
        assert!(e.message.contains("policy is for inbound SAs"), "{e}");
        let e = parse(&with_sa("pol6", "policy = \" \"\n")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sa[0].policy"), "{e}");
    }

    #[test]
    fn pci_addresses_recognised() {
        assert!(is_pci_address("0000:01:00.0"));
        assert!(is_pci_address("01:00.1"));
        assert!(!is_pci_address("net_pcap0,rx_pcap=x"));
        assert_eq!(device_name("net_pcap0,rx_pcap=x"), "net_pcap0");
    }

    const NO_RULES: &str =
        "[ports.inside]\ndevice = \"net_null0\"\n[ports.outside]\ndevice = \"net_null1\"\n";

    #[test]
    fn control_defaults_and_values() {
        let c = parse(NO_RULES).unwrap();
        assert_eq!(c.control, ControlConfig::default());
        assert!(c.terminals.is_empty());
        let text = format!(
            "{NO_RULES}[control]\nsocket = \"/tmp/dp.sock\"\nsocket_mode = \"0660\"\nadmin_socket = \"/tmp/ctl.sock\"\nmetrics_listen = \"127.0.0.1:19469\"\nhold_packets = 16\nhold_timeout = \"250ms\"\nacquire_interval = 2\n\n[[terminal]]\nname = \"meter\"\naddress = \"10.99.0.1\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.control.socket, Endpoint::Unix("/tmp/dp.sock".into()));
        assert_eq!(c.control.socket_mode, 0o660);
        assert_eq!(c.control.admin_socket, PathBuf::from("/tmp/ctl.sock"));
        assert_eq!(
            c.control.metrics_listen,
            Some("127.0.0.1:19469".parse().unwrap())
        );
        assert_eq!(c.control.hold_packets, 16);
        assert_eq!(c.control.hold_timeout, Duration::from_millis(250));
        assert_eq!(c.control.acquire_interval, Duration::from_secs(2));
        assert_eq!(
            c.terminals[0].address,
            "10.99.0.1".parse::<IpAddr>().unwrap()
        );
        let off = parse(&format!("{NO_RULES}[control]\nmetrics_listen = \"off\"\n")).unwrap();
        assert_eq!(off.control.metrics_listen, None);
    }

    #[test]
    fn control_errors_name_line_and_field() {
        for (body, field, line) in [
            ("[control]\nsocket = \"tcp://1.2.3.4:5\"\n", "control.socket", 6),
            ("[control]\nsocket = \"tls://1.2.3.4:5\"\n", "control.socket", 6),
            ("[control]\nsocket_mode = \"0999\"\n", "control.socket_mode", 6),
            ("[control]\nmetrics_listen = \"localhost\"\n", "control.metrics_listen", 6),
            ("[control]\nhold_timeout = \"5 fortnights\"\n", "control.hold_timeout", 6),
            ("[control]\nhold_timeout = \"0s\"\n", "control.hold_timeout", 6),
            (
                "[[terminal]]\nname = \"a\"\naddress = \"10.0.0.1\"\n[[terminal]]\nname = \"b\"\naddress = \"10.0.0.1\"\n",
                "terminal[1].address",
                10,
            ),
            ("[[terminal]]\nname = \"a\"\naddress = \"10.0.0\"\n", "terminal[0].address", 7),
        ] {
            let e = parse(&format!("{NO_RULES}{body}")).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {e}");
            assert_eq!(e.line, Some(line), "{body}: {e}");
        }
        let e = parse(&format!("{NO_RULES}[control]\nsokcet = \"/x\"\n")).unwrap_err();
        assert!(
            e.message.contains("unknown field `sokcet`") && e.line == Some(6),
            "{e}"
        );
        let e = parse(&format!("{NO_RULES}[control]\ntls_cert = \"/c.pem\"\n")).unwrap_err();
        assert!(e.message.contains("all three"), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("s").is_err());
    }
}
