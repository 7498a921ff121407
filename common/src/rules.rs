//! Filter rules as configured: directions, prefixes, protocols, port ranges
//! and actions, with a plain linear matcher ([`Rule::matches`]) that is the
//! reference semantics for the dataplane's compiled tables.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// `out`: inside -> outside (terminals to the Internet); `in`: the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Out,
    In,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// An IPv4 or IPv6 prefix, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        match (self.addr, a) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("`{s}` is not an IPv4/IPv6 prefix such as 10.0.0.0/24 or 2001:db8::/32")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length {l} is not in 0..={max}"))?,
        };
        let p = Prefix { addr, len };
        let canonical = Prefix {
            addr: match addr {
                IpAddr::V4(a) => {
                    let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
                }
                IpAddr::V6(a) => {
                    let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
                }
            },
            len,
        };
        if canonical != p {
            return Err(format!(
                "`{s}` has host bits set; did you mean {canonical}?"
            ));
        }
        Ok(p)
    }
}

/// IP protocol selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Number(u8),
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

impl Protocol {
    /// The protocol number, `None` for any.
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Any => None,
            Protocol::Tcp => Some(PROTO_TCP),
            Protocol::Udp => Some(PROTO_UDP),
            Protocol::Icmp => Some(PROTO_ICMP),
            Protocol::Icmpv6 => Some(PROTO_ICMPV6),
            Protocol::Number(n) => Some(n),
        }
    }

    /// Protocols whose first four bytes are source and destination ports.
    pub fn has_ports(self) -> bool {
        self.number().is_some_and(proto_has_ports)
    }
}

/// TCP, UDP, DCCP, SCTP and UDP-Lite start with 16-bit source and destination ports.
pub fn proto_has_ports(p: u8) -> bool {
    matches!(p, 6 | 17 | 33 | 132 | 136)
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Any => write!(f, "any"),
            Protocol::Tcp => write!(f, "tcp"),
            Protocol::Udp => write!(f, "udp"),
            Protocol::Icmp => write!(f, "icmp"),
            Protocol::Icmpv6 => write!(f, "icmpv6"),
            Protocol::Number(PROTO_SCTP) => write!(f, "sctp"),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "any" => Protocol::Any,
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            "icmpv6" | "ipv6-icmp" => Protocol::Icmpv6,
            "sctp" => Protocol::Number(PROTO_SCTP),
            other => match other.parse::<u8>() {
                Ok(6) => Protocol::Tcp,
                Ok(17) => Protocol::Udp,
                Ok(1) => Protocol::Icmp,
                Ok(58) => Protocol::Icmpv6,
                Ok(n) => Protocol::Number(n),
                Err(_) => {
                    return Err(format!(
                        "unknown protocol `{s}`: expected any, tcp, udp, sctp, icmp, icmpv6 or a number 0-255"
                    ))
                }
            },
        })
    }
}

/// An inclusive port range; `any` is 0-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange::ANY
    }
}

impl PortRange {
    pub const ANY: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };

    pub fn is_any(&self) -> bool {
        *self == PortRange::ANY
    }

    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            write!(f, "any")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "any" {
            return Ok(PortRange::ANY);
        }
        let bad = || {
            format!("`{s}` is not a port range: expected any, 443 or 1000-2000 (ports 0-65535, low-high)")
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (s, s),
        };
        let lo: u16 = lo.parse().map_err(|_| bad())?;
        let hi: u16 = hi.parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
        Ok(PortRange { lo, hi })
    }
}

/// What a rule does with the packets it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Bypass,
    Discard,
    /// Apply ESP with the named SA.
    Protect {
        sa: String,
    },
}

/// One filter rule, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub direction: Direction,
    /// `None` = any address of either family.
    pub src: Option<Prefix>,
    pub dst: Option<Prefix>,
    pub proto: Protocol,
    /// For icmp/icmpv6: the ICMP type.
    pub sport: PortRange,
    /// For icmp/icmpv6: the ICMP code.
    pub dport: PortRange,
    pub action: Action,
}

/// The fields a packet is classified on, in plain form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// A non-initial fragment: its ports are unknown.
    pub fragment: bool,
}

impl Rule {
    /// Whether this rule applies to an address family.
    pub fn covers_family(&self, v4: bool) -> bool {
        self.src.or(self.dst).is_none_or(|p| p.is_ipv4() == v4)
    }

    /// Linear reference semantics of one rule (the tries must agree).
    pub fn matches(&self, k: &FlowKey) -> bool {
        self.covers_family(k.src.is_ipv4())
            && self.src.is_none_or(|p| p.contains(k.src))
            && self.dst.is_none_or(|p| p.contains(k.dst))
            && self.proto.number().is_none_or(|n| n == k.proto)
            && (k.fragment || (self.sport.contains(k.sport) && self.dport.contains(k.dport)))
    }
}
