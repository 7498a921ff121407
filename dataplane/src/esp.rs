//! ESP (RFC 4303) encapsulation and decapsulation in place, on an Ethernet
//! frame held in a [`PacketBuf`] (an mbuf on the packet path, a `Vec` in tests).
//!
//! In place means: the payload is never copied. Outbound, the headers in front
//! of it move toward the buffer's headroom to make room for the ESP header (and
//! outer IP / UDP headers in tunnel mode), the trailer goes into the tailroom,
//! and the payload is encrypted where it lies. Inbound does the reverse.
//!
//! Supported: transport and tunnel mode, IPv4 and IPv6 (tunnel: any inner with
//! any outer), UDP encapsulation (RFC 3948), AEAD only (RFC 4106 AES-GCM,
//! RFC 7634 ChaCha20-Poly1305; IV = the 64-bit sequence number), 32-bit and
//! extended sequence numbers (RFC 4304), and the replay window checked before
//! decryption and advanced only after the ICV verifies.
//!
//! Choices where the RFCs leave room, for a bump in the wire that does not route:
//! - outer TTL / hop limit 64; the inner TTL is not decremented;
//! - DSCP copied inner → outer on encapsulation, never outer → inner;
//! - ECN per RFC 6040 normal mode (copied on encapsulation; on decapsulation CE
//!   is propagated to an ECN-capable inner packet, and a CE outer with a
//!   Not-ECT inner packet is dropped);
//! - tunnel IPv4 outer header: DF copied from an IPv4 inner packet, set for
//!   IPv6 inner; the identification is the low 16 bits of the sequence number;
//! - IPv6 transport: ESP is inserted after hop-by-hop, routing and fragment
//!   headers (RFC 4303 §3.1.1);
//! - UDP encapsulation: checksum 0 over IPv4 (RFC 3948 §2.1), computed over IPv6.

use std::net::IpAddr;

use crate::sa::{Encap, Mode, ReplayError, Sa, SaEvent, ICV_LEN, IV_LEN};

pub const PROTO_ESP: u8 = 50;
pub const PROTO_UDP: u8 = 17;
const PROTO_IPIP: u8 = 4;
const PROTO_IPV6: u8 = 41;
/// "No next header": an ESP dummy packet (RFC 4303 §2.6).
const PROTO_NONE: u8 = 59;
const ESP_HEADER: usize = 8;
const UDP_HEADER: usize = 8;
/// Default port of ESP-in-UDP (RFC 3948).
pub const NAT_T_PORT: u16 = 4500;

/// A packet buffer with room in front and behind (an mbuf's headroom and
/// tailroom). The data is one contiguous segment.
pub trait PacketBuf {
    fn data(&self) -> &[u8];
    fn data_mut(&mut self) -> &mut [u8];
    /// Free bytes in front of the data.
    fn headroom(&self) -> usize;
    /// Free bytes behind the data.
    fn tailroom(&self) -> usize;
    /// Grows the data at the front by `n` bytes; false (and no change) without room.
    fn prepend(&mut self, n: usize) -> bool;
    /// Grows the data at the end by `n` bytes; false (and no change) without room.
    fn append(&mut self, n: usize) -> bool;
    /// Removes `n` bytes from the front.
    fn adj(&mut self, n: usize) -> bool;
    /// Removes `n` bytes from the end.
    fn trim(&mut self, n: usize) -> bool;
}

/// A `Vec`-backed [`PacketBuf`] with headroom, for tests and tools.
#[derive(Debug, Clone)]
pub struct VecBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl VecBuf {
    pub fn new(frame: &[u8], headroom: usize, tailroom: usize) -> VecBuf {
        let mut buf = vec![0u8; headroom + frame.len() + tailroom];
        buf[headroom..headroom + frame.len()].copy_from_slice(frame);
        VecBuf {
            buf,
            start: headroom,
            end: headroom + frame.len(),
        }
    }
}

impl PacketBuf for VecBuf {
    fn headroom(&self) -> usize {
        self.start
    }
    fn tailroom(&self) -> usize {
        self.buf.len() - self.end
    }
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }
    fn prepend(&mut self, n: usize) -> bool {
        if n > self.start {
            return false;
        }
        self.start -= n;
        true
    }
    fn append(&mut self, n: usize) -> bool {
        if self.end + n > self.buf.len() {
            return false;
        }
        self.end += n;
        true
    }
    fn adj(&mut self, n: usize) -> bool {
        if self.start + n > self.end {
            return false;
        }
        self.start += n;
        true
    }
    fn trim(&mut self, n: usize) -> bool {
        if self.end < self.start + n {
            return false;
        }
        self.end -= n;
        true
    }
}

/// Why a packet could not be protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncapError {
    /// Not enough headroom or tailroom in the buffer (or a chained buffer).
    NoRoom,
    /// The packet is not a well-formed IPv4/IPv6 packet.
    Malformed,
    /// The SA is expired or its sequence space is used up.
    Expired,
    /// The result would exceed 65535 bytes of IP.
    TooBig,
    /// A fragment, which transport mode cannot protect (it protects whole datagrams).
    Fragment,
}

/// Why a received ESP packet was dropped. The checks run in this order, all
/// but the last two before any cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecapError {
    /// Lengths inconsistent (too short, ciphertext not a multiple of 4, …).
    Malformed,
    /// The SA is expired.
    Expired,
    /// The sequence number is a duplicate or older than the window.
    Replay(ReplayError),
    /// The ICV did not verify.
    Icv,
    /// Padding bytes, pad length or next header invalid after decryption.
    BadTrailer,
    /// A dummy packet (next header 59, RFC 4303 §2.6), to be discarded.
    Dummy,
    /// ESP in UDP for an SA without UDP encapsulation, or the reverse.
    WrongEncap,
}

/// Where the ESP packet of a frame starts, as found by [`locate_esp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EspLocation {
    pub l2_len: usize,
    /// Offset of the first byte after the IP packet (Ethernet padding excluded).
    pub ip_end: usize,
    /// Offset of the IP header.
    pub ip_start: usize,
    pub ipv6: bool,
    /// Offset of the ESP header (after the UDP header if UDP-encapsulated).
    pub esp_start: usize,
    pub udp: bool,
    pub spi: u32,
    /// For IPv6 transport: offset of the next-header byte that names ESP/UDP.
    next_header_at: usize,
}

/// What a UDP datagram to an ESP-in-UDP port carries (RFC 3948 §2.2, §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpEncapKind {
    Esp,
    /// Starts with the 4-byte non-ESP marker: IKE.
    Ike,
    /// A one-byte 0xFF NAT-keepalive.
    Keepalive,
}

/// Classifies the payload of a UDP datagram sent to an ESP-in-UDP port.
pub fn udp_encap_kind(udp_payload: &[u8]) -> Option<UdpEncapKind> {
    match udp_payload {
        [0xff] => Some(UdpEncapKind::Keepalive),
        [0, 0, 0, 0, ..] => Some(UdpEncapKind::Ike),
        p if p.len() >= ESP_HEADER => Some(UdpEncapKind::Esp),
        _ => None,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum of `data` (RFC 1071), folded, not complemented.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

fn ipv4_checksum(hdr: &mut [u8]) {
    put16(hdr, 10, 0);
    let c = !(sum16(hdr, 0) as u16);
    put16(hdr, 10, c);
}

/// UDP checksum over IPv6 (RFC 8200 §8.1); `udp` is the whole datagram with a zero checksum field.
fn udp6_checksum(src: &[u8], dst: &[u8], udp: &[u8]) -> u16 {
    let mut acc = sum16(src, 0);
    acc = sum16(dst, acc);
    acc = sum16(&(udp.len() as u32).to_be_bytes(), acc);
    acc = sum16(&[0, 0, 0, PROTO_UDP], acc);
    let c = !(sum16(udp, acc) as u16);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// Finds the ESP packet in a frame whose L3 header starts at `l2_len`:
/// IP protocol 50, or UDP to one of `udp_ports` carrying ESP. `None` when the
/// frame is not ESP (including IKE and keepalives on the NAT-T port).
pub fn locate_esp(frame: &[u8], l2_len: usize, udp_ports: &[u16]) -> Option<EspLocation> {
    let ip = frame.get(l2_len..)?;
    let version = ip.first()? >> 4;
    let (ipv6, total, mut proto, mut off, mut nh_at) = match version {
        4 => {
            if ip.len() < 20 {
                return None;
            }
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let total = be16(ip, 2) as usize;
            // Fragments are not decrypted here (no reassembly): they are classified.
            if ihl < 20 || total < ihl || total > ip.len() || be16(ip, 6) & 0x3fff != 0 {
                return None;
            }
            (false, total, ip[9], ihl, 9)
        }
        6 => {
            if ip.len() < 40 {
                return None;
            }
            let total = 40 + be16(ip, 4) as usize;
            if total > ip.len() {
                return None;
            }
            (true, total, ip[6], 40, 6)
        }
        _ => return None,
    };
    if ipv6 {
        // Skip hop-by-hop, routing and destination options in front of ESP.
        for _ in 0..8 {
            if !matches!(proto, 0 | 43 | 60) {
                break;
            }
            let len = (*ip.get(off + 1)? as usize + 1) * 8;
            nh_at = off;
            proto = *ip.get(off)?;
            off += len;
            if off > total {
                return None;
            }
        }
    }
    let ip = &ip[..total];
    let (udp, esp) = match proto {
        PROTO_ESP => (false, off),
        PROTO_UDP => {
            let dport = be16(ip.get(off..off + UDP_HEADER)?, 2);
            if !udp_ports.contains(&dport) {
                return None;
            }
            if udp_encap_kind(&ip[off + UDP_HEADER..]) != Some(UdpEncapKind::Esp) {
                return None;
            }
            (true, off + UDP_HEADER)
        }
        _ => return None,
    };
    let spi = u32::from_be_bytes(ip.get(esp..esp + 4)?.try_into().ok()?);
    Some(EspLocation {
        l2_len,
        ip_end: l2_len + total,
        ip_start: l2_len,
        ipv6,
        esp_start: l2_len + esp,
        udp,
        spi,
        next_header_at: l2_len + nh_at,
    })
}

/// ECN bits.
const NOT_ECT: u8 = 0;
const CE: u8 = 3;

/// Protects the IP packet of `buf` (L3 header at `l2_len`) with `sa`, in place.
/// The sequence number is taken from the SA (its owner worker calls this).
/// Lifetime events (soft, hard, sequence exhausted) go to `on_event`.
pub fn encapsulate<B: PacketBuf>(
    sa: &Sa,
    buf: &mut B,
    l2_len: usize,
    on_event: &mut dyn FnMut(SaEvent),
) -> Result<(), EncapError> {
    let protected_bytes = encapsulate_inner(sa, buf, l2_len, on_event)?;
    if let Some(ev) = sa.account(protected_bytes) {
        on_event(ev);
    }
    Ok(())
}

/// Returns the bytes protected (for the lifetime counters).
fn encapsulate_inner<B: PacketBuf>(
    sa: &Sa,
    buf: &mut B,
    l2_len: usize,
    on_event: &mut dyn FnMut(SaEvent),
) -> Result<u64, EncapError> {
    if sa.is_expired() {
        return Err(EncapError::Expired);
    }
    // Read what we need of the original packet.
    let (ipv6, total, inner_tos) = {
        let ip = buf.data().get(l2_len..).ok_or(EncapError::Malformed)?;
        match ip.first().map(|b| b >> 4) {
            Some(4) if ip.len() >= 20 => {
                let total = be16(ip, 2) as usize;
                let ihl = (ip[0] & 0x0f) as usize * 4;
                if ihl < 20 || total < ihl || total > ip.len() {
                    return Err(EncapError::Malformed);
                }
                (false, total, ip[1])
            }
            Some(6) if ip.len() >= 40 => {
                let total = 40 + be16(ip, 4) as usize;
                if total > ip.len() {
                    return Err(EncapError::Malformed);
                }
                let tc = (be16(ip, 0) >> 4) as u8;
                (true, total, tc)
            }
            _ => return Err(EncapError::Malformed),
        }
    };
    // Ethernet padding after the IP packet is not part of it.
    let pad_after = buf.data().len() - l2_len - total;
    if pad_after > 0 && !buf.trim(pad_after) {
        return Err(EncapError::Malformed);
    }
    let udp_len = if matches!(sa.params.encap, Encap::Udp { .. }) {
        UDP_HEADER
    } else {
        0
    };
    match sa.params.mode {
        Mode::Transport => encap_transport(sa, buf, l2_len, ipv6, total, udp_len, on_event),
        Mode::Tunnel { src, dst } => {
            let inner_df = !ipv6 && buf.data()[l2_len + 6] & 0x40 != 0;
            encap_tunnel(
                sa,
                buf,
                l2_len,
                ipv6,
                total,
                udp_len,
                on_event,
                (src, dst),
                inner_tos,
                inner_df,
            )
        }
    }
}

/// The next outbound sequence number; at the end of the sequence space the SA
/// expires (it never wraps). Taken only once the packet is sure to go out, so a
/// dropped packet leaves no gap.
fn take_seq(sa: &Sa, on_event: &mut dyn FnMut(SaEvent)) -> Result<u64, EncapError> {
    match sa.next_seq() {
        Some(seq) => Ok(seq),
        None => {
            if let Some(ev) = sa.exhaust() {
                on_event(ev);
            }
            Err(EncapError::Expired)
        }
    }
}

/// Makes room for ESP around the `payload_len` bytes that end the IP packet
/// (`ip_len` bytes, ESP's payload in tunnel mode being all of it): moves the
/// `front` bytes before the payload (L2, and in transport mode the IP header)
/// `added` bytes into the headroom, appends the trailer and room for the ICV,
/// and takes the sequence number once nothing can fail any more. Returns it
/// and the new IP length (counting `added` as new IP bytes).
#[allow(clippy::too_many_arguments)]
fn make_room<B: PacketBuf>(
    sa: &Sa,
    buf: &mut B,
    front: usize,
    added: usize,
    ip_len: usize,
    payload_len: usize,
    next_header: u8,
    on_event: &mut dyn FnMut(SaEvent),
) -> Result<(u64, usize), EncapError> {
    let new_total = ip_len + added + trailer_len(payload_len);
    if new_total > 65535 {
        return Err(EncapError::TooBig);
    }
    if buf.headroom() < added || buf.tailroom() < trailer_len(payload_len) {
        return Err(EncapError::NoRoom);
    }
    let seq = take_seq(sa, on_event)?;
    let grown = buf.prepend(added) && {
        buf.data_mut().copy_within(added..added + front, 0);
        add_trailer(buf, payload_len, next_header).is_ok()
    };
    // The room was checked above, so this cannot fail with a sound buffer; if
    // one refuses anyway the frame (now half-moved) is dropped, never sent.
    if !grown {
        return Err(EncapError::NoRoom);
    }
    Ok((seq, new_total))
}

/// Bytes the trailer (padding, pad length, next header) and ICV add after `payload_len`.
fn trailer_len(payload_len: usize) -> usize {
    (4 - (payload_len + 2) % 4) % 4 + 2 + ICV_LEN
}

/// Appends the ESP trailer (padding, pad length, next header) and room for the
/// ICV after `payload_len` bytes; returns the trailer's length without the ICV.
fn add_trailer<B: PacketBuf>(
    buf: &mut B,
    payload_len: usize,
    next_header: u8,
) -> Result<usize, EncapError> {
    // Pad so that payload + pad + 2 is a multiple of 4 (AEAD block size 1).
    let pad = (4 - (payload_len + 2) % 4) % 4;
    let trailer = pad + 2;
    if !buf.append(trailer + ICV_LEN) {
        return Err(EncapError::NoRoom);
    }
    let d = buf.data_mut();
    let at = d.len() - ICV_LEN - trailer;
    for i in 0..pad {
        d[at + i] = i as u8 + 1; // RFC 4303 §2.4: 1, 2, 3, …
    }
    d[at + pad] = pad as u8;
    d[at + pad + 1] = next_header;
    Ok(trailer)
}

/// Writes SPI, sequence number and IV at `esp`, encrypts everything between
/// the IV and the ICV, and writes the ICV.
fn seal_at(sa: &Sa, d: &mut [u8], esp: usize, seq: u64) {
    d[esp..esp + 4].copy_from_slice(&sa.params.spi.to_be_bytes());
    d[esp + 4..esp + 8].copy_from_slice(&(seq as u32).to_be_bytes());
    let iv = seq.to_be_bytes();
    d[esp + 8..esp + 8 + IV_LEN].copy_from_slice(&iv);
    let end = d.len();
    let icv = sa.seal(seq, &iv, &mut d[esp + 8 + IV_LEN..end - ICV_LEN]);
    d[end - ICV_LEN..].copy_from_slice(&icv);
}

fn write_udp(d: &mut [u8], at: usize, encap: Encap, len: usize) {
    let (sport, dport) = match encap {
        Encap::Udp { sport, dport } => (sport, dport),
        Encap::None => (NAT_T_PORT, NAT_T_PORT),
    };
    put16(d, at, sport);
    put16(d, at + 2, dport);
    put16(d, at + 4, len as u16);
    put16(d, at + 6, 0);
}

#[allow(clippy::too_many_arguments)]
fn encap_transport<B: PacketBuf>(
    sa: &Sa,
    buf: &mut B,
    l2_len: usize,
    ipv6: bool,
    total: usize,
    udp_len: usize,
    on_event: &mut dyn FnMut(SaEvent),
) -> Result<u64, EncapError> {
    // Where ESP goes: after the IPv4 header, or after IPv6's fixed header and any
    // hop-by-hop and routing headers. Fragments are refused: transport mode
    // protects whole datagrams (RFC 4303 §3.1.1) and bitw does not reassemble.
    let (hdr_len, nh_at, next_header) = {
        let ip = &buf.data()[l2_len..l2_len + total];
        if ipv6 {
            let (mut off, mut nh_at, mut nh) = (40usize, 6usize, ip[6]);
            while matches!(nh, 0 | 43 | 44) {
                if nh == 44 {
                    return Err(EncapError::Fragment);
                }
                let len = (*ip.get(off + 1).ok_or(EncapError::Malformed)? as usize + 1) * 8;
                if off + len > total {
                    return Err(EncapError::Malformed);
                }
                nh_at = off;
                nh = ip[off];
                off += len;
            }
            (off, nh_at, nh)
        } else {
            if be16(ip, 6) & 0x3fff != 0 {
                return Err(EncapError::Fragment);
            }
            ((ip[0] & 0x0f) as usize * 4, 9, ip[9])
        }
    };
    let payload_len = total - hdr_len;
    let added_front = udp_len + ESP_HEADER + IV_LEN;
    let (seq, new_total) = make_room(
        sa,
        buf,
        l2_len + hdr_len,
        added_front,
        total,
        payload_len,
        next_header,
        on_event,
    )?;
    let d = buf.data_mut();
    let ip = l2_len;
    let esp = ip + hdr_len + udp_len;
    if udp_len > 0 {
        write_udp(d, ip + hdr_len, sa.params.encap, new_total - hdr_len);
    }
    let proto = if udp_len > 0 { PROTO_UDP } else { PROTO_ESP };
    if ipv6 {
        d[ip + nh_at] = proto;
        put16(d, ip + 4, (new_total - 40) as u16);
    } else {
        d[ip + 9] = proto;
        put16(d, ip + 2, new_total as u16);
        ipv4_checksum(&mut d[ip..ip + hdr_len]);
    }
    seal_at(sa, d, esp, seq);
    if udp_len > 0 && ipv6 {
        fix_udp6_checksum(d, ip, ip + hdr_len);
    }
    Ok(payload_len as u64)
}

fn fix_udp6_checksum(d: &mut [u8], ip: usize, udp: usize) {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&d[ip + 8..ip + 24]);
    dst.copy_from_slice(&d[ip + 24..ip + 40]);
    let c = udp6_checksum(&src, &dst, &d[udp..]);
    put16(d, udp + 6, c);
}

#[allow(clippy::too_many_arguments)]
fn encap_tunnel<B: PacketBuf>(
    sa: &Sa,
    buf: &mut B,
    l2_len: usize,
    inner_v6: bool,
    total: usize,
    udp_len: usize,
    on_event: &mut dyn FnMut(SaEvent),
    (src, dst): (IpAddr, IpAddr),
    inner_tos: u8,
    inner_df: bool,
) -> Result<u64, EncapError> {
    let outer_v6 = dst.is_ipv6();
    let outer_len = if outer_v6 { 40 } else { 20 };
    let added_front = outer_len + udp_len + ESP_HEADER + IV_LEN;
    let next_header = if inner_v6 { PROTO_IPV6 } else { PROTO_IPIP };
    let (seq, new_total) = make_room(
        sa,
        buf,
        l2_len,
        added_front,
        total,
        total,
        next_header,
        on_event,
    )?;
    let d = buf.data_mut();
    // The L2 header's last ethertype (after any VLAN tags) names the outer family.
    put16(d, l2_len - 2, if outer_v6 { 0x86dd } else { 0x0800 });
    let ip = l2_len;
    let proto = if udp_len > 0 { PROTO_UDP } else { PROTO_ESP };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(t)) => {
            let h = &mut d[ip..ip + 20];
            h[0] = 0x45;
            h[1] = inner_tos; // DSCP and ECN copied (RFC 4301 §5.1.2.1, RFC 6040 normal mode)
            put16(h, 2, new_total as u16);
            put16(h, 4, seq as u16);
            put16(h, 6, if inner_df || inner_v6 { 0x4000 } else { 0 });
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&t.octets());
            ipv4_checksum(h);
        }
        (IpAddr::V6(s), IpAddr::V6(t)) => {
            let h = &mut d[ip..ip + 40];
            let first = 6u32 << 28 | (inner_tos as u32) << 20;
            h[0..4].copy_from_slice(&first.to_be_bytes());
            put16(h, 4, (new_total - 40) as u16);
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&t.octets());
        }
        _ => return Err(EncapError::Malformed), // rejected when the SA is configured
    }
    if udp_len > 0 {
        write_udp(d, ip + outer_len, sa.params.encap, new_total - outer_len);
    }
    seal_at(sa, d, ip + outer_len + udp_len, seq);
    if udp_len > 0 && outer_v6 {
        fix_udp6_checksum(d, ip, ip + outer_len);
    }
    Ok(total as u64)
}

/// What decapsulation produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decapsulated {
    /// The full (64-bit) sequence number of the packet.
    pub seq: u64,
    /// The next header of the ESP trailer (4/41 in tunnel mode).
    pub next_header: u8,
    /// A lifetime limit this packet crossed.
    pub event: Option<SaEvent>,
}

/// Checks, decrypts and strips the ESP packet at `loc` in place with `sa`
/// (found by `loc.spi`), leaving the inner IP packet behind the L2 header.
/// Runs on the SA's owner worker: it advances the replay window.
pub fn decapsulate<B: PacketBuf>(
    sa: &Sa,
    buf: &mut B,
    loc: &EspLocation,
) -> Result<Decapsulated, DecapError> {
    if matches!(sa.params.encap, Encap::Udp { .. }) != loc.udp {
        return Err(DecapError::WrongEncap);
    }
    if sa.is_expired() {
        return Err(DecapError::Expired);
    }
    // Ethernet padding after the IP packet is not part of it.
    let pad_after = buf
        .data()
        .len()
        .checked_sub(loc.ip_end)
        .ok_or(DecapError::Malformed)?;
    if pad_after > 0 && !buf.trim(pad_after) {
        return Err(DecapError::Malformed);
    }
    let esp = loc.esp_start;
    let esp_len = loc.ip_end.checked_sub(esp).ok_or(DecapError::Malformed)?;
    // Header, IV, at least pad length + next header, ICV; ciphertext a multiple of 4.
    let min = ESP_HEADER + IV_LEN + 2 + ICV_LEN;
    if esp_len < min || !(esp_len - ESP_HEADER - IV_LEN - ICV_LEN).is_multiple_of(4) {
        return Err(DecapError::Malformed);
    }
    let d = buf.data_mut();
    let seq_lo = u32::from_be_bytes(d[esp + 4..esp + 8].try_into().unwrap());
    let seq = if sa.params.esn {
        let (top, window) = match &sa.replay {
            Some(w) => (w.top(), w.size()),
            None => (
                sa.top_seen.load(std::sync::atomic::Ordering::Relaxed),
                1 << 31,
            ),
        };
        crate::sa::infer_esn(top, window, seq_lo)
    } else {
        seq_lo as u64
    };
    if let Some(w) = &sa.replay {
        w.check(seq).map_err(DecapError::Replay)?;
    }
    let iv: [u8; IV_LEN] = d[esp + 8..esp + 8 + IV_LEN].try_into().unwrap();
    let ct_start = esp + ESP_HEADER + IV_LEN;
    let pt_len = sa
        .open(seq, &iv, &mut d[ct_start..loc.ip_end])
        .map_err(|_| DecapError::Icv)?;
    // Authentic: only now does the window move.
    if let Some(w) = &sa.replay {
        w.accept(seq);
    }
    if seq > sa.top_seen.load(std::sync::atomic::Ordering::Relaxed) {
        sa.top_seen.store(seq, std::sync::atomic::Ordering::Relaxed);
    }
    let pt = &d[ct_start..ct_start + pt_len];
    let next_header = pt[pt_len - 1];
    let pad = pt[pt_len - 2] as usize;
    if pad + 2 > pt_len
        || pt[pt_len - 2 - pad..pt_len - 2]
            .iter()
            .enumerate()
            .any(|(i, &b)| b != i as u8 + 1)
    {
        return Err(DecapError::BadTrailer);
    }
    let inner_len = pt_len - 2 - pad;
    if next_header == PROTO_NONE {
        // Traffic-flow-confidentiality dummy: authentic, counted, never delivered.
        return Err(DecapError::Dummy);
    }
    let tunnel = matches!(sa.params.mode, Mode::Tunnel { .. });
    if tunnel && next_header != PROTO_IPIP && next_header != PROTO_IPV6 {
        return Err(DecapError::BadTrailer);
    }
    let event = sa.account(inner_len as u64);
    let trailer = pad + 2 + ICV_LEN;
    if tunnel {
        let outer_tos = if loc.ipv6 {
            (be16(d, loc.ip_start) >> 4) as u8
        } else {
            d[loc.ip_start + 1]
        };
        // Move L2 next to the inner packet, then drop the outer headers.
        let drop_front = ct_start - loc.l2_len;
        d.copy_within(0..loc.l2_len, drop_front);
        let inner = ct_start;
        let inner_v6 = next_header == PROTO_IPV6;
        if inner_len < if inner_v6 { 40 } else { 20 } {
            return Err(DecapError::BadTrailer);
        }
        // The inner packet's own length; anything after it is TFC padding (RFC 4303 §2.4).
        let ip_len = if inner_v6 {
            40 + be16(d, inner + 4) as usize
        } else {
            be16(d, inner + 2) as usize
        };
        if ip_len > inner_len || (!inner_v6 && ip_len < 20) {
            return Err(DecapError::BadTrailer);
        }
        let trailer = trailer + (inner_len - ip_len);
        put16(
            d,
            drop_front + loc.l2_len - 2,
            if inner_v6 { 0x86dd } else { 0x0800 },
        );
        if !ecn_decapsulate(d, inner, inner_v6, outer_tos & 3) {
            return Err(DecapError::BadTrailer);
        }
        buf.trim(trailer);
        buf.adj(drop_front);
    } else {
        // End of the IP header (and of the extension headers in front of ESP).
        let hdr_end = loc.esp_start - if loc.udp { UDP_HEADER } else { 0 };
        let gap = ct_start - hdr_end;
        let new_total = (loc.ip_end - loc.ip_start) - gap - trailer;
        if loc.ipv6 {
            d[loc.next_header_at] = next_header;
            put16(d, loc.ip_start + 4, (new_total - 40) as u16);
        } else {
            d[loc.ip_start + 9] = next_header;
            put16(d, loc.ip_start + 2, new_total as u16);
            let ihl = (d[loc.ip_start] & 0x0f) as usize * 4;
            ipv4_checksum(&mut d[loc.ip_start..loc.ip_start + ihl]);
        }
        // Move L2 + IP headers up against the payload, then drop the gap in front.
        d.copy_within(0..hdr_end, gap);
        buf.trim(trailer);
        buf.adj(gap);
    }
    Ok(Decapsulated {
        seq,
        next_header,
        event,
    })
}

/// RFC 6040 §4.2 (normal mode): combines the outer ECN into the inner header.
/// Returns false when the packet must be dropped (CE outer, Not-ECT inner).
fn ecn_decapsulate(d: &mut [u8], inner: usize, inner_v6: bool, outer_ecn: u8) -> bool {
    let inner_ecn = if inner_v6 {
        ((be16(d, inner) >> 4) & 3) as u8
    } else {
        d[inner + 1] & 3
    };
    if outer_ecn != CE {
        return true;
    }
    if inner_ecn == NOT_ECT {
        return false;
    }
    if inner_ecn != CE {
        if inner_v6 {
            let v = be16(d, inner) | (3 << 4);
            put16(d, inner, v);
        } else {
            d[inner + 1] |= 3;
            let ihl = (d[inner] & 0x0f) as usize * 4;
            ipv4_checksum(&mut d[inner..inner + ihl]);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Direction;
    use crate::sa::{AeadAlg, Limits, SaParams};
    use zeroize::Zeroizing;

    fn sa(direction: Direction, mode: Mode, encap: Encap, alg: AeadAlg, esn: bool) -> Sa {
        Sa::new(
            SaParams {
                name: "t".into(),
                direction,
                spi: 0x0000_1001,
                mode,
                encap,
                alg,
                key_material: Zeroizing::new((1..=alg.key_len() as u8 + 4).collect()),
                esn,
                replay_window: if direction == Direction::In { 64 } else { 0 },
                lifetime_packets: Limits::default(),
                lifetime_bytes: Limits::default(),
                policy: None,
            },
            0,
        )
        .unwrap()
    }

    fn eth(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend(ethertype.to_be_bytes());
        f.extend(ip);
        f
    }

    fn ipv4_udp(payload: &[u8], tos: u8) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut h = vec![
            0x45, tos, 0, 0, 0, 7, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 1, 0, 2,
        ];
        put16(&mut h, 2, total as u16);
        ipv4_checksum(&mut h);
        let mut u = vec![0x13, 0x88, 0x00, 0x35, 0, 0, 0, 0];
        put16(&mut u, 4, (8 + payload.len()) as u16);
        h.extend(u);
        h.extend(payload);
        h
    }

    fn ipv6_udp(payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
        put16(&mut h, 4, (8 + payload.len()) as u16);
        h.extend([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        h.extend([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let mut u = vec![0x13, 0x88, 0x00, 0x35, 0, 0, 0, 0];
        put16(&mut u, 4, (8 + payload.len()) as u16);
        h.extend(u);
        h.extend(payload);
        h
    }

    fn round_trip(mode: Mode, encap: Encap, alg: AeadAlg, esn: bool, frame: &[u8]) {
        let out = sa(Direction::Out, mode, encap, alg, esn);
        let inb = sa(Direction::In, mode, encap, alg, esn);
        let mut b = VecBuf::new(frame, 128, 64);
        encapsulate(&out, &mut b, 14, &mut |_| {}).unwrap();
        let wire = b.data().to_vec();
        assert_ne!(wire, frame);
        let loc = locate_esp(&wire, 14, &[NAT_T_PORT]).expect("ESP found");
        assert_eq!(loc.spi, 0x1001);
        assert_eq!(loc.udp, encap != Encap::None);
        let d = decapsulate(&inb, &mut b, &loc).unwrap();
        assert_eq!(d.seq, 1);
        assert_eq!(b.data(), frame, "{mode:?} {encap:?} {alg:?} esn={esn}");
        // The same packet again is a replay.
        let mut again = VecBuf::new(&wire, 128, 64);
        assert_eq!(
            decapsulate(&inb, &mut again, &loc),
            Err(DecapError::Replay(ReplayError::Duplicate))
        );
    }

    #[test]
    fn round_trips_every_mode_family_encap_and_alg() {
        let v4 = eth(0x0800, &ipv4_udp(b"hello esp", 0xb8));
        let v6 = eth(0x86dd, &ipv6_udp(b"hello esp over six"));
        let t4 = Mode::Tunnel {
            src: "172.16.0.1".parse().unwrap(),
            dst: "172.16.0.2".parse().unwrap(),
        };
        let t6 = Mode::Tunnel {
            src: "2001:db8:f::1".parse().unwrap(),
            dst: "2001:db8:f::2".parse().unwrap(),
        };
        for alg in [
            AeadAlg::Aes128Gcm16,
            AeadAlg::Aes256Gcm16,
            AeadAlg::ChaCha20Poly1305,
        ] {
            for esn in [false, true] {
                for encap in [
                    Encap::None,
                    Encap::Udp {
                        sport: 4500,
                        dport: 4500,
                    },
                ] {
                    for frame in [&v4, &v6] {
                        for mode in [Mode::Transport, t4, t6] {
                            round_trip(mode, encap, alg, esn, frame);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transport_v4_layout() {
        let frame = eth(0x0800, &ipv4_udp(b"x", 0));
        let out = sa(
            Direction::Out,
            Mode::Transport,
            Encap::None,
            AeadAlg::Aes128Gcm16,
            false,
        );
        let mut b = VecBuf::new(&frame, 64, 64);
        encapsulate(&out, &mut b, 14, &mut |_| {}).unwrap();
        let d = b.data();
        // Source and destination unchanged, protocol ESP, lengths and checksum right.
        assert_eq!(&d[14 + 12..14 + 20], &frame[14 + 12..14 + 20]);
        assert_eq!(d[14 + 9], PROTO_ESP);
        assert_eq!(be16(d, 16) as usize, d.len() - 14);
        assert_eq!(sum16(&d[14..34], 0), 0xffff);
        // SPI, sequence number 1, IV = sequence number.
        assert_eq!(&d[34..42], &[0, 0, 0x10, 0x01, 0, 0, 0, 1]);
        assert_eq!(&d[42..50], &1u64.to_be_bytes());
        // 9 bytes of UDP: + 1 pad + 2 = 12.
        assert_eq!(d.len(), 14 + 20 + 16 + 12 + 16);
    }

    #[test]
    fn checks_before_crypto_and_after() {
        let frame = eth(0x0800, &ipv4_udp(b"payload!", 0));
        let out = sa(
            Direction::Out,
            Mode::Transport,
            Encap::None,
            AeadAlg::Aes128Gcm16,
            false,
        );
        let inb = sa(
            Direction::In,
            Mode::Transport,
            Encap::None,
            AeadAlg::Aes128Gcm16,
            false,
        );
        let mut b = VecBuf::new(&frame, 64, 64);
        encapsulate(&out, &mut b, 14, &mut |_| {}).unwrap();
        let wire = b.data().to_vec();
        let loc = locate_esp(&wire, 14, &[]).unwrap();
        // Corrupt ICV: dropped, and the window did not move.
        let mut bad = wire.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            decapsulate(&inb, &mut VecBuf::new(&bad, 0, 0), &loc),
            Err(DecapError::Icv)
        );
        assert_eq!(inb.replay.as_ref().unwrap().top(), 0);
        // Truncated: malformed before any crypto.
        let mut short = wire.clone();
        short.truncate(wire.len() - 3);
        let mut l = loc;
        l.ip_end -= 3;
        assert_eq!(
            decapsulate(&inb, &mut VecBuf::new(&short, 0, 0), &l),
            Err(DecapError::Malformed)
        );
        // The genuine packet still passes.
        assert!(decapsulate(&inb, &mut VecBuf::new(&wire, 0, 0), &loc).is_ok());
    }

    #[test]
    fn ecn_rfc6040() {
        // CE on the outer header reaches an ECT inner packet; Not-ECT inner with CE is dropped.
        for (inner_ecn, expect) in [(2u8, Some(3u8)), (0, None)] {
            let frame = eth(0x0800, &ipv4_udp(b"ecn", 0x20 | inner_ecn));
            let t4 = Mode::Tunnel {
                src: "172.16.0.1".parse().unwrap(),
                dst: "172.16.0.2".parse().unwrap(),
            };
            let out = sa(Direction::Out, t4, Encap::None, AeadAlg::Aes128Gcm16, false);
            let inb = sa(Direction::In, t4, Encap::None, AeadAlg::Aes128Gcm16, false);
            let mut b = VecBuf::new(&frame, 128, 64);
            encapsulate(&out, &mut b, 14, &mut |_| {}).unwrap();
            assert_eq!(
                b.data()[15],
                0x20 | inner_ecn,
                "DSCP and ECN copied to the outer header"
            );
            let mut d = b.data().to_vec();
            d[15] |= 3; // a router marks CE
            ipv4_checksum(&mut d[14..34]);
            let loc = locate_esp(&d, 14, &[]).unwrap();
            let mut b = VecBuf::new(&d, 0, 0);
            match expect {
                Some(ecn) => {
                    decapsulate(&inb, &mut b, &loc).unwrap();
                    assert_eq!(b.data()[15] & 3, ecn);
                    assert_eq!(sum16(&b.data()[14..34], 0), 0xffff);
                }
                None => assert_eq!(decapsulate(&inb, &mut b, &loc), Err(DecapError::BadTrailer)),
            }
        }
    }

    #[test]
    fn transport_refuses_fragments_and_no_room_leaves_no_sequence_gap() {
        let out = sa(
            Direction::Out,
            Mode::Transport,
            Encap::None,
            AeadAlg::Aes128Gcm16,
            false,
        );
        let mut frag = ipv4_udp(b"fragment", 0);
        frag[6] = 0x20; // MF
        ipv4_checksum(&mut frag[..20]);
        let mut b = VecBuf::new(&eth(0x0800, &frag), 64, 64);
        assert_eq!(
            encapsulate(&out, &mut b, 14, &mut |_| {}),
            Err(EncapError::Fragment)
        );
        // No tailroom: refused before a sequence number is used.
        let frame = eth(0x0800, &ipv4_udp(b"x", 0));
        let mut tight = VecBuf::new(&frame, 64, 4);
        assert_eq!(
            encapsulate(&out, &mut tight, 14, &mut |_| {}),
            Err(EncapError::NoRoom)
        );
        assert_eq!(tight.data(), &frame[..], "the refused frame is intact");
        let mut ok = VecBuf::new(&frame, 64, 64);
        encapsulate(&out, &mut ok, 14, &mut |_| {}).unwrap();
        assert_eq!(
            &ok.data()[38..42],
            &1u32.to_be_bytes(),
            "sequence number 1: no gap"
        );
    }

    #[test]
    fn dummy_packets_tfc_padding_and_encap_mismatch() {
        let t4 = Mode::Tunnel {
            src: "172.16.0.1".parse().unwrap(),
            dst: "172.16.0.2".parse().unwrap(),
        };
        let out = sa(Direction::Out, t4, Encap::None, AeadAlg::Aes128Gcm16, false);
        let inb = sa(Direction::In, t4, Encap::None, AeadAlg::Aes128Gcm16, false);
        // TFC padding (RFC 4303 §2.4): 8 bytes after the inner packet inside the
        // ciphertext. Built with the tunnel encapsulator told the payload is longer
        // than the inner IP header says.
        let inner = eth(0x0800, &ipv4_udp(b"tfc", 0));
        let mut padded = inner.clone();
        padded.extend([0u8; 8]);
        let mut b = VecBuf::new(&padded, 128, 64);
        let (src, dst) = ("172.16.0.1".parse().unwrap(), "172.16.0.2".parse().unwrap());
        encap_tunnel(
            &out,
            &mut b,
            14,
            false,
            padded.len() - 14,
            0,
            &mut |_| {},
            (src, dst),
            0,
            false,
        )
        .unwrap();
        let loc = locate_esp(b.data(), 14, &[]).unwrap();
        decapsulate(&inb, &mut b, &loc).unwrap();
        assert_eq!(
            b.data(),
            &inner[..],
            "TFC padding trimmed after the inner packet"
        );
        // A dummy packet (next header 59) is authentic but never delivered.
        let mut dummy = VecBuf::new(&eth(0x0800, &ipv4_udp(b"d", 0)), 128, 64);
        let tr = sa(
            Direction::Out,
            Mode::Transport,
            Encap::None,
            AeadAlg::Aes128Gcm16,
            false,
        );
        let rx = sa(
            Direction::In,
            Mode::Transport,
            Encap::None,
            AeadAlg::Aes128Gcm16,
            false,
        );
        {
            let d = dummy.data_mut();
            d[14 + 9] = PROTO_NONE;
            ipv4_checksum(&mut d[14..34]);
        }
        encapsulate(&tr, &mut dummy, 14, &mut |_| {}).unwrap();
        let loc = locate_esp(dummy.data(), 14, &[]).unwrap();
        assert_eq!(decapsulate(&rx, &mut dummy, &loc), Err(DecapError::Dummy));
        // ESP in UDP for an SA without UDP encapsulation is refused before crypto.
        let u = sa(
            Direction::Out,
            Mode::Transport,
            Encap::Udp {
                sport: 4500,
                dport: 4500,
            },
            AeadAlg::Aes128Gcm16,
            false,
        );
        let mut w = VecBuf::new(&eth(0x0800, &ipv4_udp(b"u", 0)), 128, 64);
        encapsulate(&u, &mut w, 14, &mut |_| {}).unwrap();
        let loc = locate_esp(w.data(), 14, &[NAT_T_PORT]).unwrap();
        assert_eq!(decapsulate(&rx, &mut w, &loc), Err(DecapError::WrongEncap));
    }

    #[test]
    fn udp_encap_markers() {
        assert_eq!(udp_encap_kind(&[0xff]), Some(UdpEncapKind::Keepalive));
        assert_eq!(
            udp_encap_kind(&[0, 0, 0, 0, 1, 2, 3, 4]),
            Some(UdpEncapKind::Ike)
        );
        assert_eq!(
            udp_encap_kind(&[0, 0, 0x10, 1, 0, 0, 0, 1]),
            Some(UdpEncapKind::Esp)
        );
        assert_eq!(udp_encap_kind(&[1, 2]), None);
    }
}
