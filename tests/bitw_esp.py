"""ESP helpers of the bitw system tests: SA definitions, key files, and an
independent view of ESP built on Scapy and the `cryptography` package.

Nothing here is taken from the Rust code: SAs are written to the config as an
operator writes them, packets bitw sends are taken apart and decrypted with
Scapy's ESP implementation (RFC 4303/4106/7634) and, separately, with the AEAD
primitives directly (to see the ESP trailer, which Scapy does not check), and
packets bitw must receive are made with Scapy.
"""

import hashlib
import socket
import struct
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from scapy.all import IP, UDP, Ether, IPv6
from scapy.layers.ipsec import ESP, IPSecIntegrityError, SecurityAssociation

from bitw_testlib import write_key_file

T = "02:00:00:00:00:01"  # a terminal, inside
R = "02:00:00:00:00:fe"  # the router, outside

# bitw's AEAD names -> (Scapy's crypt_algo, key length without the salt, primitive)
AEADS = {
    "aes128gcm16": ("AES-GCM", 16, AESGCM),
    "aes256gcm16": ("AES-GCM", 32, AESGCM),
    "chacha20poly1305": ("CHACHA20-POLY1305", 32, ChaCha20Poly1305),
}
SALT_LEN = 4
IV_LEN = 8
ICV_LEN = 16
NAT_T_PORT = 4500
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD


def derive_key(name, aead):
    """Deterministic key material (key + salt) for an SA name: runs are reproducible."""
    n = AEADS[aead][1] + SALT_LEN
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"bitw-test-key/{name}/{aead}/{i}".encode()).digest()
        i += 1
    return out[:n]


@dataclass
class SaSpec:
    """One [[sa]] of a test config. Optional keys left at None are not written
    (bitw's defaults apply: esn true, udp ports 4500, replay_window 1024)."""
    name: str
    direction: str  # "out" | "in"
    spi: int
    mode: str = "tunnel"  # "tunnel" | "transport"
    tunnel_src: str = None
    tunnel_dst: str = None
    encap: str = "none"  # "none" | "udp"
    aead: str = "aes128gcm16"
    esn: bool = None
    udp_sport: int = None
    udp_dport: int = None
    replay_window: int = None
    lifetime_packets: dict = None
    lifetime_bytes: dict = None
    key: bytes = field(default=None, repr=False)
    spi_as_int: bool = False  # write the SPI as a TOML integer instead of "0x…"

    def __post_init__(self):
        if self.key is None:
            self.key = derive_key(self.name, self.aead)
        assert len(self.key) == AEADS[self.aead][1] + SALT_LEN

    @property
    def esn_on(self):
        return True if self.esn is None else self.esn

    @property
    def sport(self):
        return NAT_T_PORT if self.udp_sport is None else self.udp_sport

    @property
    def dport(self):
        return NAT_T_PORT if self.udp_dport is None else self.udp_dport

    @property
    def tunnel(self):
        return self.mode == "tunnel"

    @property
    def udp(self):
        return self.encap == "udp"

    @property
    def outer_v6(self):
        """Tunnel mode: whether the outer header is IPv6."""
        return ":" in self.tunnel_dst

    def toml(self, key_file):
        d = {"name": self.name, "direction": self.direction,
             "spi": self.spi if self.spi_as_int else f"0x{self.spi:08x}", "mode": self.mode}
        if self.tunnel_src is not None:
            d["tunnel_src"] = self.tunnel_src
        if self.tunnel_dst is not None:
            d["tunnel_dst"] = self.tunnel_dst
        if self.encap != "none":
            d["encap"] = self.encap
        for k in ("udp_sport", "udp_dport"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d["aead"] = self.aead
        d["key_file"] = str(key_file)
        for k in ("esn", "replay_window", "lifetime_packets", "lifetime_bytes"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    def scapy_sa(self, esn_high=0, esn=None, tunnel_header=None):
        """Scapy's SecurityAssociation for this SA (`esn` overrides the SA's setting)."""
        kw = {}
        if self.tunnel:
            kw["tunnel_header"] = tunnel_header or (
                IPv6(src=self.tunnel_src, dst=self.tunnel_dst) if self.outer_v6
                else IP(src=self.tunnel_src, dst=self.tunnel_dst))
        if self.udp:
            kw["nat_t_header"] = UDP(sport=self.sport, dport=self.dport)
        esn_on = self.esn_on if esn is None else esn
        return SecurityAssociation(ESP, spi=self.spi, crypt_algo=AEADS[self.aead][0],
                                   crypt_key=self.key, esn_en=esn_on, esn=esn_high if esn_on else 0,
                                   **kw)


def write_sa_configs(specs, directory):
    """Key files (mode 0600) in `directory` and the [[sa]] dicts for render_config."""
    out = []
    for s in specs:
        kf = write_key_file(directory / f"{s.name}.key", s.key)
        out.append(s.toml(kf))
    return out


# ---------------------------------------------------------------------------
# Frames and IP headers

def be16(b, at):
    return struct.unpack_from("!H", b, at)[0]


def l2_split(frame):
    """(offset of the L3 header, its ethertype) after up to two VLAN tags."""
    ethertype, off = be16(frame, 12), 14
    while ethertype in VLAN_TPIDS:
        ethertype, off = be16(frame, off + 2), off + 4
    return off, ethertype


def ip_packet(frame):
    """The IP packet of a frame without Ethernet padding: (l2 bytes, l3 bytes)."""
    off, ethertype = l2_split(frame)
    l3 = frame[off:]
    if ethertype == ETH_IPV4:
        total = be16(l3, 2)
    elif ethertype == ETH_IPV6:
        total = 40 + be16(l3, 4)
    else:
        raise AssertionError(f"not an IP frame: ethertype {ethertype:#06x}")
    return frame[:off], l3[:total]


def inet_checksum(data):
    """RFC 1071: the ones' complement of the ones' complement sum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_header_ok(l3):
    ihl = (l3[0] & 0x0F) * 4
    return inet_checksum(l3[:ihl]) == 0


def udp6_checksum(src16, dst16, udp):
    """UDP over IPv6 checksum (RFC 8200 §8.1) of a datagram whose checksum field is 0."""
    pseudo = src16 + dst16 + struct.pack("!IxxxB", len(udp), 17)
    c = inet_checksum(pseudo + udp)
    return c or 0xFFFF


def tos_of(l3):
    """DSCP+ECN byte of an IPv4 header / traffic class of an IPv6 header."""
    if l3[0] >> 4 == 4:
        return l3[1]
    return (be16(l3, 0) >> 4) & 0xFF


def v6_upper_offset(l3, stop_at=(50, 17)):
    """Offset and offset-of-next-header-byte of the first header in `stop_at`
    after IPv6's fixed header and hop-by-hop/routing/destination options."""
    nh, off, nh_at = l3[6], 40, 6
    while nh in (0, 43, 60) and nh not in stop_at:
        nh_at = off
        nh, off = l3[off], off + (l3[off + 1] + 1) * 8
    return off, nh_at, nh


@dataclass
class EspView:
    """An ESP packet as bitw sent it, taken apart."""
    l2: bytes
    l3: bytes  # the whole outer IP packet
    v6: bool
    proto: int  # 50, or 17 for UDP-encapsulated ESP
    udp: bytes  # the UDP header (empty without encapsulation)
    esp: bytes  # from the SPI to the end of the ICV
    spi: int
    seq_lo: int
    iv: bytes


def parse_esp_frame(frame):
    """Takes apart an ESP frame (ESP right after IPv4/IPv6 headers, or in UDP)."""
    l2, l3 = ip_packet(frame)
    assert len(frame) == len(l2) + len(l3), "bytes after the IP packet"
    if l3[0] >> 4 == 4:
        v6, off, proto = False, (l3[0] & 0x0F) * 4, l3[9]
    else:
        v6 = True
        off, _, proto = v6_upper_offset(l3)
    udp = b""
    if proto == 17:
        udp, off = l3[off:off + 8], off + 8
    else:
        assert proto == 50, f"neither ESP nor UDP: protocol {proto}"
    esp = l3[off:]
    spi, seq_lo = struct.unpack_from("!II", esp, 0)
    return EspView(l2, l3, v6, proto, udp, esp, spi, seq_lo, esp[8:16])


def esp_spi(frame, udp_ports=(NAT_T_PORT,)):
    """The SPI of an ESP frame (protocol 50, or UDP to one of `udp_ports` not
    starting with the non-ESP marker); None for any other frame."""
    try:
        _, l3 = ip_packet(frame)
    except (AssertionError, struct.error):
        return None
    if l3[0] >> 4 == 4:
        off, proto = (l3[0] & 0x0F) * 4, l3[9]
    else:
        off, _, proto = v6_upper_offset(l3)
    if proto == 17 and len(l3) >= off + 16 and be16(l3, off + 2) in udp_ports and l3[off + 8:off + 12] != bytes(4):
        off += 8
    elif proto != 50 or len(l3) < off + 8:
        return None
    return struct.unpack_from("!I", l3, off)[0]


def esp_open(spec, esp, esn_high=0):
    """Authenticates and decrypts an ESP packet (SPI .. ICV) with the AEAD directly
    (RFC 4106 §4-5 / RFC 7634 §2-3); returns the plaintext with its ESP trailer."""
    _, klen, prim = AEADS[spec.aead]
    key, salt = spec.key[:klen], spec.key[klen:]
    spi, seq_lo = struct.unpack_from("!II", esp, 0)
    aad = struct.pack("!III", spi, esn_high, seq_lo) if spec.esn_on else struct.pack("!II", spi, seq_lo)
    return prim(key).decrypt(salt + esp[8:16], esp[16:], aad)


def esp_seal(spec, seq, plaintext, esn_high=0, iv=None):
    """An ESP packet (SPI .. ICV) of `plaintext` (which must end with its trailer,
    see with_trailer), made with the AEAD directly: for what Scapy cannot make."""
    _, klen, prim = AEADS[spec.aead]
    key, salt = spec.key[:klen], spec.key[klen:]
    iv = struct.pack("!Q", (esn_high << 32) | seq) if iv is None else iv
    aad = struct.pack("!III", spec.spi, esn_high, seq) if spec.esn_on else struct.pack("!II", spec.spi, seq)
    return struct.pack("!II", spec.spi, seq) + iv + prim(key).encrypt(salt + iv, plaintext, aad)


def with_trailer(data, next_header):
    """`data` + RFC 4303 padding (1, 2, 3, …) to a 4-byte boundary + pad length + next header."""
    pad = -(len(data) + 2) % 4
    return data + bytes(range(1, pad + 1)) + bytes([pad, next_header])


def trailer_problems(plaintext, want_next_header):
    """RFC 4303 §2.4-2.6: padding 1, 2, 3, …, pad length, next header; the
    ciphertext ends on a 4-byte boundary (8 bytes of header and IV before it)."""
    p = []
    if len(plaintext) < 2:
        return ["plaintext shorter than its trailer"]
    padlen, nh = plaintext[-2], plaintext[-1]
    if padlen + 2 > len(plaintext):
        return [f"pad length {padlen} runs past the plaintext"]
    pad = plaintext[-2 - padlen:-2]
    if pad != bytes(range(1, padlen + 1)):
        p.append(f"padding bytes {pad.hex()} are not 1, 2, 3, …")
    if (IV_LEN + len(plaintext)) % 4:
        p.append(f"ciphertext of {len(plaintext)} bytes not aligned to 4 bytes")
    if nh != want_next_header:
        p.append(f"next header {nh}, expected {want_next_header}")
    return p


def _strip_udp(view):
    """The same ESP packet without its UDP header, as Scapy decrypts it best
    (the AAD does not cover IP or UDP headers)."""
    l3 = bytearray(view.l3)
    if not view.udp:
        return bytes(l3)
    if view.v6:
        off, nh_at, _ = v6_upper_offset(bytes(l3))
        l3[nh_at] = 50
        del l3[off:off + 8]
        struct.pack_into("!H", l3, 4, len(l3) - 40)
    else:
        ihl = (l3[0] & 0x0F) * 4
        l3[9] = 50
        del l3[ihl:ihl + 8]
        struct.pack_into("!H", l3, 2, len(l3))
        struct.pack_into("!H", l3, 10, 0)
        struct.pack_into("!H", l3, 10, inet_checksum(bytes(l3[:ihl])))
    return bytes(l3)


def scapy_decrypt(spec, view, esn_high=0, esn=None):
    """Scapy's decryption of an ESP packet: the inner IP packet (tunnel) or the
    restored original packet (transport), as bytes. Raises IPSecIntegrityError."""
    l3 = _strip_udp(view)
    pkt = IPv6(l3) if view.v6 else IP(l3)
    return bytes(spec.scapy_sa(esn_high=esn_high, esn=esn).decrypt(pkt))


def outbound_problems(spec, got, orig, seq):
    """Everything wrong with `got`, the frame bitw sent for the original frame
    `orig` protected by outbound SA `spec` with sequence number `seq`. Empty
    when the frame is right. Checks the L2 header, the outer header (tunnel:
    addresses, TTL/hop limit 64, DSCP/ECN copied from the inner packet; transport:
    the original header but for protocol and length), UDP encapsulation, SPI,
    sequence number, IV = the 64-bit sequence number, the ESP trailer (through
    a decryption with the AEAD itself), Scapy's decryption against the original
    packet, and that the other ESN setting does not authenticate."""
    p = []
    o_l2, o_l3 = ip_packet(orig)
    try:
        v = parse_esp_frame(got)
    except (AssertionError, IndexError, struct.error) as e:
        return [f"not an ESP frame: {e}"]
    # L2: MACs and VLAN tags kept; the last ethertype names the outer family.
    if len(v.l2) != len(o_l2) or v.l2[:-2] != o_l2[:-2]:
        p.append(f"L2 header {v.l2.hex()} does not keep the original {o_l2.hex()}")
    outer_v6 = spec.outer_v6 if spec.tunnel else (o_l3[0] >> 4 == 6)
    if be16(v.l2, len(v.l2) - 2) != (ETH_IPV6 if outer_v6 else ETH_IPV4) or v.v6 != outer_v6:
        p.append(f"outer family IPv{6 if v.v6 else 4}, expected IPv{6 if outer_v6 else 4}")
        return p
    want_proto = 17 if spec.udp else 50
    if v.proto != want_proto:
        p.append(f"outer protocol {v.proto}, expected {want_proto}")
    l3 = v.l3
    if v.v6:
        src, dst, hlim, tc = l3[8:24], l3[24:40], l3[7], tos_of(l3)
        if be16(l3, 4) != len(l3) - 40:
            p.append("IPv6 payload length wrong")
    else:
        src, dst, hlim, tc = l3[12:16], l3[16:20], l3[8], tos_of(l3)
        if be16(l3, 2) != len(l3):
            p.append("IPv4 total length wrong")
        if not ipv4_header_ok(l3):
            p.append("IPv4 header checksum invalid")
    if spec.tunnel:
        fam = socket.AF_INET6 if outer_v6 else socket.AF_INET
        if (src, dst) != (socket.inet_pton(fam, spec.tunnel_src), socket.inet_pton(fam, spec.tunnel_dst)):
            p.append(f"outer addresses {src.hex()} -> {dst.hex()}, expected the tunnel's")
        if hlim != 64:
            p.append(f"outer TTL/hop limit {hlim}, expected 64")
        if tc != tos_of(o_l3):
            p.append(f"outer DSCP/ECN {tc:#04x}, inner has {tos_of(o_l3):#04x}")
        if not v.v6 and l3[0] != 0x45:
            p.append(f"outer IPv4 version/IHL {l3[0]:#04x}")
    else:
        if v.v6:
            if l3[:4] != o_l3[:4] or l3[7:40] != o_l3[7:40]:
                p.append("transport mode changed the IPv6 header (beyond length and next header)")
        else:
            ihl = (o_l3[0] & 0x0F) * 4
            same = (l3[0:2] == o_l3[0:2] and l3[4:9] == o_l3[4:9] and l3[12:ihl] == o_l3[12:ihl])
            if not same:
                p.append("transport mode changed the IPv4 header (beyond protocol, length, checksum)")
    if spec.udp:
        sport, dport, ulen, csum = struct.unpack("!HHHH", v.udp)
        if (sport, dport) != (spec.sport, spec.dport):
            p.append(f"UDP ports {sport}->{dport}, expected {spec.sport}->{spec.dport}")
        if ulen != 8 + len(v.esp):
            p.append(f"UDP length {ulen}, expected {8 + len(v.esp)}")
        if v.v6:
            off, _, _ = v6_upper_offset(l3)
            zeroed = l3[off:off + 6] + b"\0\0" + l3[off + 8:]
            want = udp6_checksum(l3[8:24], l3[24:40], zeroed)
            if csum != want:
                p.append(f"UDP/IPv6 checksum {csum:#06x}, expected {want:#06x}")
        elif csum != 0:
            p.append(f"UDP/IPv4 checksum {csum:#06x}, expected 0 (RFC 3948)")
    if v.spi != spec.spi:
        p.append(f"SPI {v.spi:#010x}, expected {spec.spi:#010x}")
    if v.seq_lo != seq & 0xFFFFFFFF:
        p.append(f"sequence number {v.seq_lo}, expected {seq}")
    if v.iv != struct.pack("!Q", seq):
        p.append(f"IV {v.iv.hex()}, expected the 64-bit sequence number {seq}")
    esn_high = seq >> 32
    try:
        pt = esp_open(spec, v.esp, esn_high)
    except Exception as e:  # noqa: BLE001 - InvalidTag and friends
        p.append(f"does not authenticate with the SA's key ({type(e).__name__})")
        return p
    if spec.tunnel:
        want_nh = 41 if o_l3[0] >> 4 == 6 else 4
    elif o_l3[0] >> 4 == 4:
        want_nh = o_l3[9]
    else:
        want_nh = v6_upper_offset(o_l3, stop_at=())[2]
    p += trailer_problems(pt, want_nh)
    try:
        inner = scapy_decrypt(spec, v, esn_high)
    except IPSecIntegrityError:
        p.append("Scapy cannot decrypt it")
        return p
    if inner != o_l3:
        p.append(f"decrypted packet differs from the original:\n  got      {inner.hex()}\n"
                 f"  original {o_l3.hex()}")
    try:
        scapy_decrypt(spec, v, esn_high, esn=not spec.esn_on)
        p.append(f"also authenticates with esn={not spec.esn_on}: the AAD ignores the ESN setting")
    except IPSecIntegrityError:
        pass
    return p


def encrypt_inbound(spec, inner, seq, *, esn_high=0, iv=None, outer_tos=0, l2=None):
    """A frame carrying `inner` (a Scapy IP/IPv6 packet) protected with `spec`
    as its peer sends it: Scapy's encryption, outer header from the SA's tunnel
    addresses (tunnel) or the packet's own (transport), UDP encapsulation with a
    proper checksum over IPv6. `l2`: the Ethernet (+VLAN) header to put in front,
    as bytes (its last ethertype is set to the outer family); default R -> T."""
    if iv is None:
        # Not the sequence number: bitw must not assume anything about the IV.
        iv = hashlib.sha256(f"iv/{spec.name}/{esn_high}/{seq}".encode()).digest()[:IV_LEN]
    th = None
    if spec.tunnel:
        th = (IPv6(src=spec.tunnel_src, dst=spec.tunnel_dst, tc=outer_tos) if spec.outer_v6
              else IP(src=spec.tunnel_src, dst=spec.tunnel_dst, tos=outer_tos))
    sa = spec.scapy_sa(esn_high=esn_high, tunnel_header=th)
    pkt = inner.__class__(bytes(inner))
    enc = bytearray(bytes(sa.encrypt(pkt, seq_num=seq, iv=iv)))
    if spec.udp and enc[0] >> 4 == 6:
        # Scapy leaves the next header of an extension header in front of the
        # UDP header at 50 (ESP): it is UDP.
        off, nh_at, _ = v6_upper_offset(bytes(enc))
        enc[nh_at] = 17
        enc[off + 6:off + 8] = b"\0\0"
        struct.pack_into("!H", enc, off + 6, udp6_checksum(bytes(enc[8:24]), bytes(enc[24:40]), bytes(enc[off:])))
    l2 = bytes(Ether(src=R, dst=T)) if l2 is None else bytes(l2)
    return with_ethertype(l2, ETH_IPV6 if enc[0] >> 4 == 6 else ETH_IPV4) + bytes(enc)


def with_ethertype(l2, ethertype):
    """An L2 header (bytes) with its last ethertype replaced."""
    return l2[:-2] + struct.pack("!H", ethertype)


def decapsulated(frame_l2, inner):
    """What bitw must send for an inbound ESP frame whose L2 header was
    `frame_l2` (bytes, ending with an ethertype) and whose plaintext packet is
    `inner` (bytes or a Scapy packet)."""
    inner = bytes(inner)
    return with_ethertype(frame_l2, ETH_IPV6 if inner[0] >> 4 == 6 else ETH_IPV4) + inner


__all__ = [
    "AEADS", "T", "R", "SaSpec", "EspView", "IPSecIntegrityError", "derive_key", "write_sa_configs",
    "l2_split", "ip_packet", "inet_checksum", "ipv4_header_ok", "udp6_checksum", "tos_of",
    "parse_esp_frame", "esp_spi", "esp_open", "esp_seal", "with_trailer", "trailer_problems", "scapy_decrypt", "outbound_problems",
    "encrypt_inbound", "with_ethertype", "decapsulated", "replace",
]
