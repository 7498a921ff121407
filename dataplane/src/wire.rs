//! Frame parsing: Ethernet (with up to two VLAN tags), IPv4, IPv6 (with
//! extension headers) and the first bytes of the transport header, into the
//! classification key. Every length is checked before it is read; no input
//! makes this panic (fuzzed by the property tests below).

use crate::dpdk::{KeyV4, KeyV6};
use crate::filter::{proto_has_ports, PROTO_ICMP, PROTO_ICMPV6};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const ETHERTYPE_QINQ_OLD: u16 = 0x9100;
const ETH_HEADER: usize = 14;
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Why a frame was judged malformed (all are counted under one drop reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than an Ethernet header, or VLAN tags cut off / too many.
    Ethernet,
    /// IPv4 header short, IHL or total length inconsistent, wrong version.
    Ipv4,
    /// IPv6 header short, payload length beyond the frame, bad extension chain.
    Ipv6,
    /// Transport header cut off where ports (or ICMP type/code) should be.
    Transport,
}

/// What a frame is, for classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP (ARP, LLDP, …): forwarded unchanged.
    NonIp,
    Malformed(Malformed),
    V4 {
        key: KeyV4,
        fragment: bool,
    },
    V6 {
        key: KeyV6,
        fragment: bool,
    },
}

#[inline]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Writes the transport selectors at `l4` of `ip` into the key's port fields
/// (ports, or ICMP type and code as 16-bit values; zeros for other protocols).
#[inline]
fn transport(
    ip: &[u8],
    l4: usize,
    proto: u8,
    sport: &mut [u8; 2],
    dport: &mut [u8; 2],
) -> Result<(), Malformed> {
    if proto_has_ports(proto) {
        let p = ip.get(l4..l4 + 4).ok_or(Malformed::Transport)?;
        sport.copy_from_slice(&p[..2]);
        dport.copy_from_slice(&p[2..]);
    } else if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        let p = ip.get(l4..l4 + 2).ok_or(Malformed::Transport)?;
        *sport = [0, p[0]];
        *dport = [0, p[1]];
    } else {
        *sport = [0; 2];
        *dport = [0; 2];
    }
    Ok(())
}

/// Offset of the L3 header and its ethertype, after any VLAN tags.
#[inline]
pub fn l3_offset(frame: &[u8]) -> Result<(usize, u16), Malformed> {
    let mut ethertype = be16(frame, 12).ok_or(Malformed::Ethernet)?;
    let mut off = ETH_HEADER;
    let mut tags = 0;
    while matches!(
        ethertype,
        ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD
    ) {
        tags += 1;
        if tags > MAX_VLAN_TAGS {
            return Err(Malformed::Ethernet);
        }
        ethertype = be16(frame, off + 2).ok_or(Malformed::Ethernet)?;
        off += 4;
    }
    if frame.len() < off {
        return Err(Malformed::Ethernet);
    }
    Ok((off, ethertype))
}

/// What a frame is. For IP frames the key has been written to the slot passed
/// to [`parse_into`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    NonIp,
    /// An ARP frame (not IP: forwarded unchanged, snooped for neighbours).
    Arp {
        l3: u16,
    },
    Malformed(Malformed),
    /// `l3`: offset of the IP header (after Ethernet and VLAN tags).
    V4 {
        fragment: bool,
        l3: u16,
    },
    V6 {
        fragment: bool,
        l3: u16,
    },
}

/// Parses one Ethernet frame held in one buffer (tests and slow paths).
pub fn parse_frame(frame: &[u8]) -> Parsed {
    let (mut v4, mut v6) = (KeyV4::default(), KeyV6::default());
    match parse_into(frame, frame.len(), &mut v4, &mut v6) {
        FrameKind::NonIp | FrameKind::Arp { .. } => Parsed::NonIp,
        FrameKind::Malformed(m) => Parsed::Malformed(m),
        FrameKind::V4 { fragment, .. } => Parsed::V4 { key: v4, fragment },
        FrameKind::V6 { fragment, .. } => Parsed::V6 { key: v6, fragment },
    }
}

/// Parses a frame of `total_len` bytes whose first segment is `first` (jumbo
/// frames arrive as chained mbufs), writing an IPv4 key to `v4` or an IPv6 key
/// to `v6`. Lengths are checked against the whole frame; headers must lie in the
/// first segment, as every PMD delivers them. The keys are written in place (the
/// worker passes its batch slots) so no key is copied on the packet path.
#[inline]
pub fn parse_into(first: &[u8], total_len: usize, v4: &mut KeyV4, v6: &mut KeyV6) -> FrameKind {
    let (off, ethertype) = match l3_offset(first) {
        Ok(x) => x,
        Err(m) => return FrameKind::Malformed(m),
    };
    let ip = &first[off..];
    let ip_len = total_len.max(first.len()) - off;
    match ethertype {
        ETHERTYPE_IPV4 => match parse_ipv4(ip, ip_len, v4) {
            Ok(fragment) => FrameKind::V4 {
                fragment,
                l3: off as u16,
            },
            Err(m) => FrameKind::Malformed(m),
        },
        ETHERTYPE_IPV6 => match parse_ipv6(ip, ip_len, v6) {
            Ok(fragment) => FrameKind::V6 {
                fragment,
                l3: off as u16,
            },
            Err(m) => FrameKind::Malformed(m),
        },
        ETHERTYPE_ARP => FrameKind::Arp { l3: off as u16 },
        _ => FrameKind::NonIp,
    }
}

/// `ip`: the bytes at hand (first segment); `ip_len`: the packet's bytes in all
/// segments. Returns whether it is a non-initial fragment.
#[inline]
fn parse_ipv4(ip: &[u8], ip_len: usize, key: &mut KeyV4) -> Result<bool, Malformed> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(Malformed::Ipv4);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    // Ethernet may pad short packets: the frame can be longer than total length.
    if ihl < 20 || total < ihl || total > ip_len || ihl > ip.len() {
        return Err(Malformed::Ipv4);
    }
    let ip = &ip[..total.min(ip.len())];
    let non_initial = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    let proto = ip[9];
    key.proto = proto;
    key.src.copy_from_slice(&ip[12..16]);
    key.dst.copy_from_slice(&ip[16..20]);
    if non_initial {
        key.sport = [0; 2];
        key.dport = [0; 2];
    } else {
        transport(ip, ihl, proto, &mut key.sport, &mut key.dport)?;
    }
    Ok(non_initial)
}

#[inline]
fn parse_ipv6(ip: &[u8], ip_len: usize, key: &mut KeyV6) -> Result<bool, Malformed> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return Err(Malformed::Ipv6);
    }
    let payload = be16(ip, 4).ok_or(Malformed::Ipv6)? as usize;
    if 40 + payload > ip_len {
        return Err(Malformed::Ipv6);
    }
    let ip = &ip[..(40 + payload).min(ip.len())];
    let mut next = ip[6];
    let mut off = 40;
    let mut non_initial = false;
    // Walk the extension headers to the upper-layer protocol (RFC 8200 §4).
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let nh = *ip.get(off).ok_or(Malformed::Ipv6)?;
                let len = (*ip.get(off + 1).ok_or(Malformed::Ipv6)? as usize + 1) * 8;
                if off + len > ip.len() {
                    return Err(Malformed::Ipv6);
                }
                next = nh;
                off += len;
            }
            // Fragment header: 8 bytes; a non-zero offset means no transport header here.
            44 => {
                let nh = *ip.get(off).ok_or(Malformed::Ipv6)?;
                let fo = be16(ip, off + 2).ok_or(Malformed::Ipv6)?;
                if off + 8 > ip.len() {
                    return Err(Malformed::Ipv6);
                }
                non_initial = fo & 0xfff8 != 0;
                next = nh;
                off += 8;
                if non_initial {
                    break;
                }
            }
            // AH: (len + 2) * 4 bytes.
            51 => {
                let nh = *ip.get(off).ok_or(Malformed::Ipv6)?;
                let len = (*ip.get(off + 1).ok_or(Malformed::Ipv6)? as usize + 2) * 4;
                if off + len > ip.len() {
                    return Err(Malformed::Ipv6);
                }
                next = nh;
                off += len;
            }
            _ => break,
        }
    }
    // A non-initial fragment's next header may be another extension header
    // (RFC 8200 §4.5): its ports are unknown either way, so classify it as it is.
    if !non_initial && matches!(next, 0 | 43 | 44 | 60 | 51) {
        // Longer chain than we walk: refuse rather than guess the protocol.
        return Err(Malformed::Ipv6);
    }
    key.proto = next;
    key.src.copy_from_slice(&ip[8..24]);
    key.dst.copy_from_slice(&ip[24..40]);
    if non_initial {
        key.sport = [0; 2];
        key.dport = [0; 2];
    } else {
        transport(ip, off, next, &mut key.sport, &mut key.dport)?;
    }
    Ok(non_initial)
}

// ---------------------------------------------------------------------------
// What the workers look for on behalf of the control channel: IKE to punt,
// ARP and NDP to learn neighbours from, and (on the control thread) the parts
// of a punted datagram.

/// The IKE ports (RFC 7296 §2; 4500 is also ESP-in-UDP, RFC 3948).
pub const IKE_PORT: u16 = 500;
pub const NAT_T_PORT: u16 = 4500;
const PROTO_UDP: u8 = 17;
const NON_ESP_MARKER: [u8; 4] = [0; 4];

/// The offset (from `l3`) of the transport header of the IP packet at `l3`,
/// the end of the IP packet (from `l3`) and the transport protocol, for
/// whole datagrams only (no fragment of any kind: a part of an IKE message
/// cannot be handed to control). Extension headers are walked as
/// [`parse_into`] does.
fn l4_span(frame: &[u8], l3: usize) -> Option<(usize, usize, u8)> {
    let ip = frame.get(l3..)?;
    match ip.first()? >> 4 {
        4 => {
            if ip.len() < 20 {
                return None;
            }
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let total = be16(ip, 2)? as usize;
            if ihl < 20 || total < ihl || total > ip.len() || be16(ip, 6)? & 0x3fff != 0 {
                return None;
            }
            Some((ihl, total, ip[9]))
        }
        6 => {
            if ip.len() < 40 {
                return None;
            }
            let total = 40 + be16(ip, 4)? as usize;
            if total > ip.len() {
                return None;
            }
            let ip = &ip[..total];
            let (mut next, mut off) = (ip[6], 40usize);
            for _ in 0..=MAX_IPV6_EXT_HEADERS {
                let len = match next {
                    0 | 43 | 60 => (*ip.get(off + 1)? as usize + 1) * 8,
                    44 => return None,
                    51 => (*ip.get(off + 1)? as usize + 2) * 4,
                    _ => return Some((off, total, next)),
                };
                next = *ip.get(off)?;
                off += len;
                if off > total {
                    return None;
                }
            }
            None
        }
        _ => None,
    }
}

/// Whether a UDP datagram (ports already parsed, IP header at `l3` of
/// `frame`) is IKE: port 500 either way, or port 4500 either way with the
/// non-ESP marker (RFC 3948 §2.2). ESP-in-UDP and NAT keepalives on 4500 are
/// not IKE. The payload is only looked at for port 4500.
/// Fragments are not IKE here (see `l4_span`).
#[inline]
pub fn is_ike(frame: &[u8], l3: usize, sport: u16, dport: u16) -> bool {
    let ike = sport == IKE_PORT || dport == IKE_PORT;
    if !ike && sport != NAT_T_PORT && dport != NAT_T_PORT {
        return false;
    }
    match l4_span(frame, l3) {
        Some((l4, end, PROTO_UDP)) => {
            ike || frame
                .get(l3 + l4 + 8..l3 + end)
                .is_some_and(|p| p.len() >= 4 && p[..4] == NON_ESP_MARKER)
        }
        _ => false,
    }
}

/// A UDP datagram taken apart (the control thread's view of a punted frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpView {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// VLAN ids, outermost first.
    pub vlans: Vec<u16>,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// The UDP payload's place in the frame.
    pub payload: std::ops::Range<usize>,
}

/// Takes apart an Ethernet frame carrying a (non-fragment) UDP datagram.
pub fn udp_view(frame: &[u8]) -> Option<UdpView> {
    let (l3, ethertype) = l3_offset(frame).ok()?;
    let mut vlans = Vec::new();
    let mut at = ETH_HEADER;
    while at < l3 {
        vlans.push(be16(frame, at)? & 0x0fff);
        at += 4;
    }
    let ip = frame.get(l3..)?;
    let (src, dst) = match ethertype {
        ETHERTYPE_IPV4 if ip.len() >= 20 => {
            let a = |o: usize| std::net::IpAddr::from(<[u8; 4]>::try_from(&ip[o..o + 4]).unwrap());
            (a(12), a(16))
        }
        ETHERTYPE_IPV6 if ip.len() >= 40 => {
            let a =
                |o: usize| std::net::IpAddr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
            (a(8), a(24))
        }
        _ => return None,
    };
    let (l4, end, proto) = l4_span(frame, l3)?;
    if proto != PROTO_UDP {
        return None;
    }
    let udp = frame.get(l3 + l4..l3 + end)?;
    if udp.len() < 8 {
        return None;
    }
    let udp_len = be16(udp, 4)? as usize;
    // IPv6 jumbograms aside, the UDP length bounds the payload; take the
    // smaller of it and the IP packet, never more than is there.
    let len = if (8..=udp.len()).contains(&udp_len) {
        udp_len
    } else {
        udp.len()
    };
    let start = l3 + l4 + 8;
    Some(UdpView {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        vlans,
        src,
        dst,
        sport: be16(udp, 0)?,
        dport: be16(udp, 2)?,
        payload: start..l3 + l4 + len,
    })
}

/// Whether a MAC is one a host can own (not multicast/broadcast, not zero).
#[inline]
fn unicast_mac(m: &[u8; 6]) -> bool {
    m[0] & 1 == 0 && *m != [0; 6]
}

/// The sender of an ARP packet at `l3`: its IPv4 address and MAC (requests,
/// replies and gratuitous ARP; probes from 0.0.0.0 teach nothing).
pub fn arp_sender(frame: &[u8], l3: usize) -> Option<(std::net::Ipv4Addr, [u8; 6])> {
    let a = frame.get(l3..l3 + 28)?;
    // Ethernet hardware, IPv4 protocol, 6- and 4-byte addresses.
    if a[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    let mac: [u8; 6] = a[8..14].try_into().ok()?;
    let ip = std::net::Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    (unicast_mac(&mac) && !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast())
        .then_some((ip, mac))
}

/// ICMPv6 neighbour solicitation and advertisement (RFC 4861 §4.3, §4.4).
pub const ICMPV6_NS: u8 = 135;
pub const ICMPV6_NA: u8 = 136;

/// What an NDP message at `l3` says about a neighbour: a solicitation its
/// source address and source link-layer address, an advertisement its target
/// address and target link-layer address. Without the option, the frame's
/// source MAC. Messages whose hop limit is not 255 (RFC 4861: not from the
/// link) and solicitations from the unspecified address (DAD) teach nothing.
pub fn ndp_neighbor(frame: &[u8], l3: usize) -> Option<(std::net::Ipv6Addr, [u8; 6])> {
    let ip = frame.get(l3..l3 + 40)?;
    if ip[0] >> 4 != 6 || ip[6] != PROTO_ICMPV6 || ip[7] != 255 {
        return None;
    }
    let end = (l3 + 40 + be16(ip, 4)? as usize).min(frame.len());
    let icmp = frame.get(l3 + 40..end)?;
    let kind = *icmp.first()?;
    let (ip, want_opt) = match kind {
        ICMPV6_NS => (<[u8; 16]>::try_from(&frame[l3 + 8..l3 + 24]).ok()?, 1u8),
        ICMPV6_NA => (<[u8; 16]>::try_from(icmp.get(8..24)?).ok()?, 2u8),
        _ => return None,
    };
    let ip = std::net::Ipv6Addr::from(ip);
    if ip.is_unspecified() || ip.is_multicast() || icmp.len() < 24 {
        return None;
    }
    let mut mac: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let mut opts = &icmp[24..];
    while opts.len() >= 2 {
        let len = opts[1] as usize * 8;
        if len == 0 || len > opts.len() {
            break; // malformed options: RFC 4861 says drop, we just stop reading
        }
        if opts[0] == want_opt && len >= 8 {
            mac = opts[2..8].try_into().ok()?;
            break;
        }
        opts = &opts[len..];
    }
    unicast_mac(&mac).then_some((ip, mac))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend([2, 0, 0, 0, 0, 1]);
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    fn ipv4(proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut h = vec![
            0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 1, 0, 2,
        ];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h.extend(l4);
        h
    }

    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend((rest.len() as u16).to_be_bytes());
        h.extend([next, 64]);
        h.extend(
            [0x20, 0x01, 0x0d, 0xb8]
                .iter()
                .chain([0u8; 11].iter())
                .chain([1u8].iter()),
        );
        h.extend(
            [0x20, 0x01, 0x0d, 0xb8]
                .iter()
                .chain([0u8; 11].iter())
                .chain([2u8].iter()),
        );
        h.extend(rest);
        h
    }

    #[test]
    fn ipv4_udp_ports() {
        let f = eth(
            ETHERTYPE_IPV4,
            &ipv4(17, 0, &[0x04, 0xd2, 0x00, 0x35, 0, 8, 0, 0]),
        );
        match parse_frame(&f) {
            Parsed::V4 {
                key,
                fragment: false,
            } => {
                assert_eq!(key, KeyV4::new(17, [10, 0, 0, 1], [10, 1, 0, 2], 1234, 53));
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn vlan_tags_are_skipped_and_limited() {
        let ip = ipv4(6, 0, &[0, 1, 0, 2, 0, 0, 0, 0]);
        let mut one = eth(ETHERTYPE_VLAN, &[0, 5]);
        one.extend(ETHERTYPE_IPV4.to_be_bytes());
        one.extend(&ip);
        assert!(matches!(parse_frame(&one), Parsed::V4 { .. }));
        let mut three = eth(
            ETHERTYPE_QINQ,
            &[0, 5, 0x81, 0x00, 0, 6, 0x81, 0x00, 0, 7, 0x08, 0x00],
        );
        three.extend(&ip);
        assert_eq!(parse_frame(&three), Parsed::Malformed(Malformed::Ethernet));
    }

    #[test]
    fn icmp_type_code_and_fragments() {
        let f = eth(ETHERTYPE_IPV4, &ipv4(1, 0, &[8, 0, 0, 0]));
        assert!(
            matches!(parse_frame(&f), Parsed::V4 { key, .. } if key.sport == [0, 8] && key.dport == [0, 0])
        );
        // Non-initial fragment: no ports read, even if bytes are there.
        let f = eth(ETHERTYPE_IPV4, &ipv4(6, 0x0010, &[9, 9, 9, 9]));
        assert!(
            matches!(parse_frame(&f), Parsed::V4 { key, fragment: true } if key.sport == [0, 0])
        );
        // First fragment with MF set: ports read.
        let f = eth(ETHERTYPE_IPV4, &ipv4(6, 0x2000, &[0, 80, 0, 81]));
        assert!(
            matches!(parse_frame(&f), Parsed::V4 { key, fragment: false } if key.dport == [0, 81])
        );
    }

    #[test]
    fn malformed_ipv4() {
        let mut ip = ipv4(6, 0, &[0, 1, 0, 2]);
        ip[0] = 0x44; // IHL 4
        assert_eq!(
            parse_frame(&eth(ETHERTYPE_IPV4, &ip)),
            Parsed::Malformed(Malformed::Ipv4)
        );
        let mut ip = ipv4(6, 0, &[0, 1, 0, 2]);
        ip[3] = 200; // total length beyond frame
        assert_eq!(
            parse_frame(&eth(ETHERTYPE_IPV4, &ip)),
            Parsed::Malformed(Malformed::Ipv4)
        );
        let ip = ipv4(6, 0, &[0, 1]); // ports cut off
        assert_eq!(
            parse_frame(&eth(ETHERTYPE_IPV4, &ip)),
            Parsed::Malformed(Malformed::Transport)
        );
        assert_eq!(
            parse_frame(&[0u8; 10]),
            Parsed::Malformed(Malformed::Ethernet)
        );
        assert_eq!(parse_frame(&eth(ETHERTYPE_ARP, &[0; 28])), Parsed::NonIp);
    }

    #[test]
    fn chained_segments_checked_against_the_whole_frame() {
        let mut ip = ipv4(17, 0, &[0, 1, 0, 2, 0, 8, 0, 0]);
        ip[2..4].copy_from_slice(&3000u16.to_be_bytes());
        let f = eth(ETHERTYPE_IPV4, &ip);
        // The first segment holds the headers; the rest of the 3014 bytes is chained.
        assert!(matches!(
            parse_into(&f, 14 + 3000, &mut KeyV4::default(), &mut KeyV6::default()),
            FrameKind::V4 { .. }
        ));
        assert_eq!(
            parse_into(&f, 14 + 2999, &mut KeyV4::default(), &mut KeyV6::default()),
            FrameKind::Malformed(Malformed::Ipv4)
        );
        assert_eq!(parse_frame(&f), Parsed::Malformed(Malformed::Ipv4));
    }

    #[test]
    fn ipv6_extension_headers() {
        // Hop-by-hop (8 bytes) then UDP.
        let mut rest = vec![17, 0, 0, 0, 0, 0, 0, 0];
        rest.extend([0x01, 0xf4, 0x11, 0x94, 0, 8, 0, 0]);
        match parse_frame(&eth(ETHERTYPE_IPV6, &ipv6(0, &rest))) {
            Parsed::V6 {
                key,
                fragment: false,
            } => {
                assert_eq!(
                    (key.proto, key.sport, key.dport),
                    (17, 500u16.to_be_bytes(), 4500u16.to_be_bytes())
                )
            }
            p => panic!("{p:?}"),
        }
        // Non-initial fragment of TCP.
        let rest = [6, 0, 0x00, 0x08, 0, 0, 0, 1, 0xaa, 0xbb];
        assert!(
            matches!(parse_frame(&eth(ETHERTYPE_IPV6, &ipv6(44, &rest))), Parsed::V6 { key, fragment: true } if key.proto == 6)
        );
        // Extension header running past the packet.
        let rest = [17, 5, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_frame(&eth(ETHERTYPE_IPV6, &ipv6(60, &rest))),
            Parsed::Malformed(Malformed::Ipv6)
        );
        // ICMPv6 echo.
        assert!(
            matches!(parse_frame(&eth(ETHERTYPE_IPV6, &ipv6(58, &[128, 0, 0, 0]))), Parsed::V6 { key, .. } if key.sport == [0, 128])
        );
    }

    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = sport.to_be_bytes().to_vec();
        u.extend(dport.to_be_bytes());
        u.extend(((8 + payload.len()) as u16).to_be_bytes());
        u.extend([0, 0]);
        u.extend(payload);
        u
    }

    fn ike_check(frame: &[u8]) -> bool {
        let (l3, _) = l3_offset(frame).unwrap();
        let (sport, dport) = match parse_frame(frame) {
            Parsed::V4 { key, .. } => (key.sport, key.dport),
            Parsed::V6 { key, .. } => (key.sport, key.dport),
            p => panic!("{p:?}"),
        };
        is_ike(
            frame,
            l3,
            u16::from_be_bytes(sport),
            u16::from_be_bytes(dport),
        )
    }

    #[test]
    fn ike_is_port_500_or_4500_with_the_non_esp_marker() {
        let ike = [0x11u8; 28];
        let f = |sport, dport, payload: &[u8]| {
            eth(ETHERTYPE_IPV4, &ipv4(17, 0, &udp(sport, dport, payload)))
        };
        assert!(ike_check(&f(500, 500, &ike)));
        assert!(ike_check(&f(500, 40000, &ike)), "either port");
        assert!(ike_check(&f(40000, 500, &ike)));
        let mut marked = vec![0, 0, 0, 0];
        marked.extend(ike);
        assert!(ike_check(&f(4500, 4500, &marked)));
        assert!(
            ike_check(&f(31000, 4500, &marked)),
            "NAT-mapped source port"
        );
        // ESP in UDP: an SPI (never 0) where the marker would be.
        let mut esp = vec![0, 0, 0x10, 0x01, 0, 0, 0, 1];
        esp.extend([0xab; 24]);
        assert!(!ike_check(&f(4500, 4500, &esp)));
        assert!(!ike_check(&f(4500, 4500, &[0xff])), "NAT keepalive");
        assert!(
            !ike_check(&f(4500, 4500, &[0, 0, 0])),
            "too short for a marker"
        );
        assert!(!ike_check(&f(53, 53, &marked)));
        // The marker must be inside the datagram, not in Ethernet padding.
        let mut padded = f(4500, 4500, &[]);
        padded.extend([0u8; 10]);
        assert!(!ike_check(&padded));
        // A fragment of IKE is not IKE here (it cannot be handed over whole).
        let frag = eth(ETHERTYPE_IPV4, &ipv4(17, 0x2000, &udp(500, 500, &ike)));
        assert!(!ike_check(&frag));
        // IPv6, also behind a destination options header.
        assert!(ike_check(&eth(
            ETHERTYPE_IPV6,
            &ipv6(17, &udp(4500, 4500, &marked))
        )));
        let mut dst_opts = vec![17, 0, 1, 4, 0, 0, 0, 0];
        dst_opts.extend(udp(4500, 4500, &marked));
        assert!(ike_check(&eth(ETHERTYPE_IPV6, &ipv6(60, &dst_opts))));
        let mut dst_opts = vec![17, 0, 1, 4, 0, 0, 0, 0];
        dst_opts.extend(udp(4500, 4500, &esp));
        assert!(!ike_check(&eth(ETHERTYPE_IPV6, &ipv6(60, &dst_opts))));
    }

    #[test]
    fn udp_view_takes_a_punted_frame_apart() {
        let mut marked = vec![0, 0, 0, 0];
        marked.extend(b"IKE!");
        let ip = ipv4(17, 0, &udp(4500, 4501, &marked));
        let mut f = eth(ETHERTYPE_VLAN, &[0x20, 0x05]);
        f.extend(ETHERTYPE_IPV4.to_be_bytes());
        f.extend(&ip);
        f.extend([0u8; 6]); // Ethernet padding
        let v = udp_view(&f).unwrap();
        assert_eq!(v.vlans, vec![5]);
        assert_eq!((v.sport, v.dport), (4500, 4501));
        assert_eq!(v.src, "10.0.0.1".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(v.dst, "10.1.0.2".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(v.src_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[v.payload.clone()], &marked[..]);
        assert!(udp_view(&eth(ETHERTYPE_IPV4, &ipv4(6, 0, &[0; 20]))).is_none());
        assert!(udp_view(&f[..f.len() - 20]).is_none(), "cut short");
    }

    fn arp(op: u16, sender_mac: [u8; 6], sender_ip: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4];
        a.extend(op.to_be_bytes());
        a.extend(sender_mac);
        a.extend(sender_ip);
        a.extend([0; 6]);
        a.extend([10, 0, 0, 254]);
        eth(ETHERTYPE_ARP, &a)
    }

    #[test]
    fn arp_teaches_the_sender() {
        let m = [2, 0, 0, 0, 0, 7];
        let f = arp(1, m, [10, 0, 0, 7]);
        let FrameKind::Arp { l3 } =
            parse_into(&f, f.len(), &mut KeyV4::default(), &mut KeyV6::default())
        else {
            panic!("ARP not recognised")
        };
        assert_eq!(arp_sender(&f, l3 as usize), Some(([10, 0, 0, 7].into(), m)));
        assert_eq!(
            arp_sender(&arp(2, m, [10, 0, 0, 7]), 14),
            Some(([10, 0, 0, 7].into(), m))
        );
        assert_eq!(arp_sender(&arp(1, m, [0, 0, 0, 0]), 14), None, "probe");
        assert_eq!(arp_sender(&arp(1, [0xff; 6], [10, 0, 0, 7]), 14), None);
        assert_eq!(
            arp_sender(&arp(1, m, [10, 0, 0, 7])[..40], 14),
            None,
            "cut short"
        );
        // VLAN-tagged ARP.
        let mut tagged = eth(ETHERTYPE_VLAN, &[0, 9, 0x08, 0x06]);
        tagged.extend(&arp(1, m, [10, 0, 0, 8])[14..]);
        let FrameKind::Arp { l3 } = parse_into(
            &tagged,
            tagged.len(),
            &mut KeyV4::default(),
            &mut KeyV6::default(),
        ) else {
            panic!("tagged ARP not recognised")
        };
        assert_eq!(
            arp_sender(&tagged, l3 as usize),
            Some(([10, 0, 0, 8].into(), m))
        );
    }

    fn ndp(kind: u8, src_last: u8, target_last: u8, opt: Option<(u8, [u8; 6])>) -> Vec<u8> {
        let mut icmp = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend([
            0x20,
            0x01,
            0x0d,
            0xb8,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            target_last,
        ]);
        if let Some((t, m)) = opt {
            icmp.extend([t, 1]);
            icmp.extend(m);
        }
        let mut ip = ipv6(58, &icmp);
        ip[7] = 255;
        ip[23] = src_last;
        if src_last == 0 {
            ip[8..24].fill(0);
        }
        eth(ETHERTYPE_IPV6, &ip)
    }

    #[test]
    fn ndp_teaches_solicitors_and_advertised_targets() {
        let m = [2, 0, 0, 0, 0, 0x33];
        let addr = |last: u8| -> std::net::Ipv6Addr {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            o[15] = last;
            o.into()
        };
        // NS: the source address and its source link-layer option.
        assert_eq!(
            ndp_neighbor(&ndp(135, 5, 9, Some((1, m))), 14),
            Some((addr(5), m))
        );
        // NA: the target and the target link-layer option.
        assert_eq!(
            ndp_neighbor(&ndp(136, 5, 9, Some((2, m))), 14),
            Some((addr(9), m))
        );
        // Without the option: the frame's source MAC.
        assert_eq!(
            ndp_neighbor(&ndp(136, 5, 9, None), 14),
            Some((addr(9), [2, 0, 0, 0, 0, 1]))
        );
        // DAD (unspecified source) teaches nothing; nor does a hop limit below 255.
        assert_eq!(ndp_neighbor(&ndp(135, 0, 9, Some((1, m))), 14), None);
        let mut f = ndp(135, 5, 9, Some((1, m)));
        f[14 + 7] = 64;
        assert_eq!(ndp_neighbor(&f, 14), None);
        // A zero-length option stops the walk without panicking.
        let mut f = ndp(135, 5, 9, Some((1, m)));
        let n = f.len();
        f[n - 7] = 0;
        assert_eq!(ndp_neighbor(&f, 14), Some((addr(5), [2, 0, 0, 0, 0, 1])));
        assert_eq!(
            ndp_neighbor(&ndp(128, 5, 9, None), 14),
            None,
            "echo request"
        );
        // The worker sees NDP as ICMPv6 with the type in the sport field.
        assert!(
            matches!(parse_frame(&ndp(135, 5, 9, None)), Parsed::V6 { key, .. } if key.proto == 58 && key.sport == [0, 135])
        );
    }

    proptest! {
        #[test]
        fn control_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), l3 in 0usize..40, sp in prop_oneof![Just(500u16), Just(4500u16), any::<u16>()], dp in any::<u16>()) {
            let _ = is_ike(&bytes, l3, sp, dp);
            let _ = udp_view(&bytes);
            let _ = arp_sender(&bytes, l3);
            let _ = ndp_neighbor(&bytes, l3);
        }

        #[test]
        fn never_panics_on_random_frames(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_frame(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_ip(ethertype in prop_oneof![Just(ETHERTYPE_IPV4), Just(ETHERTYPE_IPV6)],
                                      body in proptest::collection::vec(any::<u8>(), 0..120),
                                      first in any::<u8>()) {
            let mut b = body;
            if !b.is_empty() { b[0] = (first & 0x0f) | if ethertype == ETHERTYPE_IPV4 { 0x40 } else { 0x60 }; }
            let _ = parse_frame(&eth(ethertype, &b));
        }
    }
}
