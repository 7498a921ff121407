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
        FrameKind::NonIp => Parsed::NonIp,
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

    proptest! {
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
