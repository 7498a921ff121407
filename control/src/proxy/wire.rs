//! IP and UDP headers around the IKE messages bitw sends as a terminal: the
//! dataplane injects whole IP datagrams (it adds only the Ethernet header).

use std::net::{IpAddr, SocketAddr};

/// The non-ESP marker that precedes IKE on port 4500 (RFC 3948 §2.2).
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];
/// The IKE port and the NAT-T port.
pub const IKE_PORT: u16 = 500;
pub const NAT_T_PORT: u16 = 4500;
/// A NAT-T keepalive's whole UDP payload (RFC 3948 §2.3).
pub const KEEPALIVE: [u8; 1] = [0xff];

const TTL: u8 = 64;
const PROTO_UDP: u8 = 17;

/// The UDP payload of an IKE message sent from `src` to `dst`: on the NAT-T
/// port it carries the non-ESP marker, except a keepalive.
pub fn udp_payload(src: SocketAddr, dst: SocketAddr, ike: &[u8]) -> Vec<u8> {
    let nat_t = src.port() == NAT_T_PORT || dst.port() == NAT_T_PORT;
    if nat_t && ike != KEEPALIVE {
        let mut v = Vec::with_capacity(4 + ike.len());
        v.extend_from_slice(&NON_ESP_MARKER);
        v.extend_from_slice(ike);
        v
    } else {
        ike.to_vec()
    }
}

/// An IPv4 or IPv6 datagram carrying `payload` in UDP from `src` to `dst`,
/// with a valid UDP checksum. `None` when the families differ or the
/// payload cannot fit in one datagram.
pub fn udp_datagram(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    ip_id: u16,
) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(8 + payload.len()).ok()?;
    let mut udp = Vec::with_capacity(udp_len as usize);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + udp.len()).ok()?;
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, PROTO_UDP]);
            pseudo.extend_from_slice(&udp_len.to_be_bytes());
            let c = checksum(&[&pseudo, &udp]);
            // 0 means "no checksum" in UDP over IPv4: send all ones instead.
            let c = if c == 0 { 0xffff } else { c };
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            let mut ip = Vec::with_capacity(total as usize);
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&ip_id.to_be_bytes());
            // Don't fragment: IKE over the limit is the IKE layer's problem
            // (RFC 7383), not something to split here.
            ip.extend_from_slice(&[0x40, 0]);
            ip.extend_from_slice(&[TTL, PROTO_UDP, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let hc = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&hc.to_be_bytes());
            ip.extend_from_slice(&udp);
            Some(ip)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
            let c = checksum(&[&pseudo, &udp]);
            let c = if c == 0 { 0xffff } else { c };
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            let mut ip = Vec::with_capacity(40 + udp.len());
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&udp_len.to_be_bytes());
            ip.extend_from_slice(&[PROTO_UDP, TTL]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&udp);
            Some(ip)
        }
        _ => None,
    }
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_udp_checksums_verify() {
        let src: SocketAddr = "10.99.0.1:500".parse().unwrap();
        let dst: SocketAddr = "10.99.0.2:500".parse().unwrap();
        let p = udp_datagram(src, dst, b"hello ike", 7).unwrap();
        assert_eq!(p.len(), 20 + 8 + 9);
        // A header with its checksum sums to zero.
        assert_eq!(checksum(&[&p[..20]]), 0);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 17, 0, 17]);
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
        assert_eq!(&p[4..6], &7u16.to_be_bytes());
        assert_eq!(p[6] & 0x40, 0x40, "DF set");
    }

    #[test]
    fn ipv6_udp_checksum_verifies() {
        let src: SocketAddr = "[fd00::1]:4500".parse().unwrap();
        let dst: SocketAddr = "[fd00::2]:4500".parse().unwrap();
        let payload = udp_payload(src, dst, b"ike!");
        assert_eq!(&payload[..4], &NON_ESP_MARKER);
        let p = udp_datagram(src, dst, &payload, 0).unwrap();
        assert_eq!(p.len(), 40 + 8 + 8);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[8..40]);
        pseudo.extend_from_slice(&16u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(checksum(&[&pseudo, &p[40..]]), 0);
    }

    #[test]
    fn keepalive_and_port_500_carry_no_marker() {
        let a: SocketAddr = "10.0.0.1:4500".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:4500".parse().unwrap();
        assert_eq!(udp_payload(a, b, &KEEPALIVE), vec![0xff]);
        let a: SocketAddr = "10.0.0.1:500".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:500".parse().unwrap();
        assert_eq!(udp_payload(a, b, b"x"), b"x".to_vec());
        let v4: SocketAddr = "10.0.0.1:500".parse().unwrap();
        let v6: SocketAddr = "[::1]:500".parse().unwrap();
        assert!(udp_datagram(v4, v6, b"x", 0).is_none());
    }
}
