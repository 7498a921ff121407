"""End-to-end forwarding through net_pcap ports, checked against an independent model.

Scapy writes one capture per port: ARP/LLDP, IPv4 and IPv6 with TCP, UDP, SCTP,
ESP, ICMP and ICMPv6 (NDP included), VLAN and QinQ frames, IPv4/IPv6
fragments, IPv6 extension headers, Ethernet padding and malformed frames. Each
frame carries the outcome the test author intended (the rule it must hit,
"default", "non_ip" or "malformed"). A small model written here from the
documented semantics (not from the Rust code) parses each frame and picks the
first matching rule of its direction; the test first checks that the model
agrees with every intent (so the traffic really exercises what it claims),
then runs bitw-dataplane and compares each output capture, byte for byte and
in order, with what the model says must come out, and every JSON counter with
the model's counts.

Protect rules name SAs (tunnel mode here; tests/test_esp.py covers ESP in
depth): what an outbound protect rule selects must come out as ESP of its SA,
which the test decrypts with Scapy and compares with the original packet;
inbound, valid ESP is decrypted and must fall inside its SA's selectors, and
plaintext that a protect rule selects is dropped (`unprotected`).
"""

import ipaddress
import struct
from collections import Counter

import pytest
from scapy.all import (
    ARP, ESP, ICMP, IP, SCTP, TCP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6EchoReply,
    ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_Redirect,
    ICMPv6ND_RS, ICMPv6Unknown, IPOption_RR, IPv6, IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, Raw,
)

from bitw_esp import (
    SaSpec, decapsulated, encrypt_inbound, esp_spi, ip_packet, outbound_problems, parse_esp_frame,
    scapy_decrypt, write_sa_configs,
)
from bitw_testlib import (
    drops, pcap_device, read_pcap, render_config, run_config, write_pcap, frames_diff,
)

T = "02:00:00:00:00:01"  # a terminal, inside
R = "02:00:00:00:00:fe"  # the router, outside

# ---------------------------------------------------------------------------
# The filter table under test. Keys are written to the TOML file as they are;
# the model below reads the same dicts with its own parser.

POLICIES = [
    # --- out: inside -> outside
    dict(name="out-hq-protect", direction="out", src="10.0.0.0/24", dst="10.1.0.0/16",
         proto="any", action="protect", sa="to-hq"),
    dict(name="out-telnet-discard", direction="out", proto="tcp", dport=23, action="discard"),
    dict(name="out-web-bypass", direction="out", src="10.0.0.0/24", proto="tcp",
         dport="8000-8080", action="bypass"),
    # Overlaps out-web-bypass: first match wins.
    dict(name="out-web-wide-discard", direction="out", src="10.0.0.0/16", proto="tcp",
         dport="7000-9000", action="discard"),
    # --- in rules interleaved in the file: order only matters within a direction.
    dict(name="in-rdp-discard", direction="in", dst="10.0.0.0/24", proto="tcp",
         dport="3389", action="discard"),
    dict(name="in-hq-protect", direction="in", src="10.1.0.0/16", dst="10.0.0.0/24",
         action="protect", sa="from-hq"),
    dict(name="out-udp-sport-bypass", direction="out", dst="198.51.100.0/24", proto="udp",
         sport="1000-2000", action="bypass"),
    dict(name="out-udp-dport-discard", direction="out", proto="udp", dport="5000-5010",
         action="discard"),
    dict(name="out-sctp-discard", direction="out", proto=132, dport=2905, action="discard"),
    dict(name="out-ping-discard", direction="out", src="10.0.0.0/24", proto="icmp",
         sport=8, dport=0, action="discard"),
    dict(name="out-v6-hq-protect", direction="out", src="2001:db8:a::/48",
         dst="2001:db8:f::/48", proto="tcp", dport=443, action="protect", sa="v6-hq"),
    dict(name="out-v6-ping-discard", direction="out", proto="icmpv6", sport=128, dport=0,
         action="discard"),
    dict(name="out-ndp-bypass", direction="out", proto="icmpv6", sport="133-137",
         action="bypass"),
    dict(name="out-v6-lan-bypass", direction="out", src="2001:db8:a::/48", action="bypass"),
    dict(name="out-lan-bypass", direction="out", src="10.0.0.0/24", action="bypass"),
    # --- in: outside -> inside
    dict(name="in-dns-bypass", direction="in", proto="udp", sport=53, action="bypass"),
    dict(name="in-esp-bypass", direction="in", proto=50, action="bypass"),
    dict(name="in-ping-discard", direction="in", proto="icmp", sport=8, action="discard"),
    dict(name="in-blocked-host", direction="in", src="192.0.2.66", action="discard"),
    dict(name="in-upper-half-discard", direction="in", dst="10.0.0.128/25", proto="tcp",
         action="discard"),
    dict(name="in-web-replies-bypass", direction="in", dst="10.0.0.0/24", proto="tcp",
         sport="443-444", action="bypass"),
    dict(name="in-v6-web-bypass", direction="in", src="2001:db8:f::/48",
         dst="2001:db8:a::/64", proto="tcp", sport="440-450", action="bypass"),
    # Overlaps in-v6-web-bypass: first match wins.
    dict(name="in-v6-tcp-discard", direction="in", dst="2001:db8:a::/64", proto="tcp",
         action="discard"),
    dict(name="in-v6-ping-discard", direction="in", proto="ipv6-icmp", sport=128,
         action="discard"),
    dict(name="in-ndp-bypass", direction="in", proto=58, sport="133-137", action="bypass"),
    dict(name="in-v6-udp-protect", direction="in", src="2001:db8:f::/48", proto=17,
         dport="5000-5999", action="protect", sa="v6-in"),
    # A /0 prefix covers every address of its own family only.
    dict(name="in-v4-all-7777-discard", direction="in", src="0.0.0.0/0", proto="udp", dport=7777,
         action="discard"),
    dict(name="out-v6-all-7777-discard", direction="out", dst="::/0", proto="udp", dport=7777,
         action="discard"),
]

# The SAs the protect rules name (keys derived from the names, files 0600 in tmp).
SAS = [
    SaSpec("to-hq", "out", 0x1001, "tunnel", "172.16.0.1", "172.16.0.2", aead="aes128gcm16", esn=False),
    SaSpec("v6-hq", "out", 0x1002, "tunnel", "2001:db8:ffff::1", "2001:db8:ffff::2", aead="chacha20poly1305"),
    SaSpec("from-hq", "in", 0x3001, "tunnel", "172.16.0.2", "172.16.0.1", aead="aes128gcm16", esn=False),
    SaSpec("v6-in", "in", 0x3002, "transport", aead="aes256gcm16"),
]
SA_BY_NAME = {s.name: s for s in SAS}

# ---------------------------------------------------------------------------
# The model: documented semantics, written independently of the Rust code.

PROTO_NAMES = {"any": None, "tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58}
PORT_PROTOS = {6, 17, 33, 132, 136}  # TCP, UDP, DCCP, SCTP, UDP-Lite: ports first
VLAN_TPIDS = {0x8100, 0x88A8, 0x9100}


class ModelRule:
    def __init__(self, d):
        self.name = d["name"]
        self.direction = d["direction"]
        self.action = d["action"]
        self.sa = d.get("sa")
        self.src = self._prefix(d.get("src", "any"))
        self.dst = self._prefix(d.get("dst", "any"))
        p = d.get("proto", "any")
        self.proto = p if isinstance(p, int) else PROTO_NAMES[p]
        self.sport = self._range(d.get("sport", "any"))
        self.dport = self._range(d.get("dport", "any"))

    @staticmethod
    def _prefix(s):
        return None if s == "any" else ipaddress.ip_network(s, strict=True)

    @staticmethod
    def _range(v):
        if isinstance(v, int):
            return (v, v)
        if v == "any":
            return (0, 65535)
        lo, _, hi = v.partition("-")
        return (int(lo), int(hi or lo))

    def matches(self, k):
        family = (self.src or self.dst)
        if family is not None and family.version != k["version"]:
            return False
        if self.src is not None and k["src"] not in self.src:
            return False
        if self.dst is not None and k["dst"] not in self.dst:
            return False
        if self.proto is not None and self.proto != k["proto"]:
            return False
        if k["fragment"]:
            return True  # non-initial fragment: no ports, the rule's ports are ignored
        return (self.sport[0] <= k["sport"] <= self.sport[1]
                and self.dport[0] <= k["dport"] <= self.dport[1])


def _be16(b, at):
    return struct.unpack_from("!H", b, at)[0]


MALFORMED = {"kind": "malformed"}
NON_IP = {"kind": "non_ip"}


def _transport(l4, proto, is_v6):
    icmp = (proto == 58) if is_v6 else (proto == 1)
    if proto in PORT_PROTOS:
        if len(l4) < 4:
            return None
        return _be16(l4, 0), _be16(l4, 2)
    if icmp:
        if len(l4) < 2:
            return None
        return l4[0], l4[1]  # ICMP type and code
    return 0, 0


def _parse_v4(l3):
    if len(l3) < 20 or l3[0] >> 4 != 4:
        return MALFORMED
    ihl = (l3[0] & 0x0F) * 4
    total = _be16(l3, 2)
    if ihl < 20 or total < ihl or total > len(l3):
        return MALFORMED
    ip = IP(l3[:total])  # Scapy's reading of the header fields
    assert (ip.ihl * 4, ip.len) == (ihl, total)
    key = dict(kind="ip", version=4, src=ipaddress.ip_address(ip.src),
               dst=ipaddress.ip_address(ip.dst), proto=ip.proto, sport=0, dport=0,
               fragment=ip.frag != 0)
    if not key["fragment"]:
        ports = _transport(l3[ihl:total], ip.proto, False)
        if ports is None:
            return MALFORMED
        key["sport"], key["dport"] = ports
    return key


def _parse_v6(l3):
    if len(l3) < 40 or l3[0] >> 4 != 6:
        return MALFORMED
    plen = _be16(l3, 4)
    if 40 + plen > len(l3):
        return MALFORMED
    pkt = l3[:40 + plen]
    ip6 = IPv6(pkt)
    nh, off, fragment = pkt[6], 40, False
    while True:
        if nh in (0, 43, 60):  # hop-by-hop, routing, destination options
            if off + 2 > len(pkt):
                return MALFORMED
            hl = (pkt[off + 1] + 1) * 8
            if off + hl > len(pkt):
                return MALFORMED
            nh, off = pkt[off], off + hl
        elif nh == 44:  # fragment header
            if off + 8 > len(pkt):
                return MALFORMED
            offset = _be16(pkt, off + 2) >> 3
            nh, off = pkt[off], off + 8
            if offset != 0:
                fragment = True
                break
        elif nh == 51:  # AH
            if off + 2 > len(pkt):
                return MALFORMED
            hl = (pkt[off + 1] + 2) * 4
            if off + hl > len(pkt):
                return MALFORMED
            nh, off = pkt[off], off + hl
        else:
            break
    key = dict(kind="ip", version=6, src=ipaddress.ip_address(ip6.src),
               dst=ipaddress.ip_address(ip6.dst), proto=nh, sport=0, dport=0,
               fragment=fragment)
    if not fragment:
        ports = _transport(pkt[off:], nh, True)
        if ports is None:
            return MALFORMED
        key["sport"], key["dport"] = ports
    return key


def model_parse(frame):
    if len(frame) < 14:
        return MALFORMED
    ethertype, off, tags = _be16(frame, 12), 14, 0
    while ethertype in VLAN_TPIDS:
        tags += 1
        if tags > 2 or len(frame) < off + 4:
            return MALFORMED
        ethertype, off = _be16(frame, off + 2), off + 4
    if ethertype == 0x0800:
        return _parse_v4(frame[off:])
    if ethertype == 0x86DD:
        return _parse_v6(frame[off:])
    return NON_IP


def model_classify(frame, direction, rules):
    """('non_ip'|'malformed'|'default'|rule name, the rule or None)."""
    k = model_parse(frame)
    if k["kind"] != "ip":
        return k["kind"], None
    for r in rules:
        if r.direction == direction and r.matches(k):
            return r.name, r
    return "default", None


def describe(frame):
    try:
        return Ether(frame).summary()
    except Exception:  # noqa: BLE001 - only for messages
        return frame.hex()


# ---------------------------------------------------------------------------
# The traffic. Each entry: (frame bytes, intended outcome, note).

def _e(pkt, src=T, dst=R):
    return bytes(Ether(src=src, dst=dst) / pkt)


def _eth_raw(ethertype, payload, src=T, dst=R):
    return bytes(Ether(src=src, dst=dst, type=ethertype)) + bytes(payload)


def _v6last(prefix48):
    return prefix48 + ":ffff:ffff:ffff:ffff:ffff"


def inside_traffic():
    """Frames received on port inside (direction out)."""
    f = []

    def add(frame, intent, note):
        f.append((bytes(frame), intent, note))

    def tcp(src, dst, sport, dport, **kw):
        return _e(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, **kw) / Raw(b"tcp"))

    def udp(src, dst, sport, dport):
        return _e(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"udp"))

    def tcp6(src, dst, sport, dport):
        return _e(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport) / Raw(b"tcp6"))

    # Non-IP
    add(_e(ARP(psrc="10.0.0.1", pdst="10.0.0.254"), dst="ff:ff:ff:ff:ff:ff"), "non_ip", "ARP request")
    add(_eth_raw(0x88CC, b"\x02\x07\x04" + bytes(6) + b"\x04\x02\x07\x31\x06\x02\x00\x78\x00\x00",
                 dst="01:80:c2:00:00:0e"), "non_ip", "LLDP")
    # out-hq-protect and its prefix boundaries (src /24, dst /16)
    add(tcp("10.0.0.1", "10.1.2.3", 40001, 22), "out-hq-protect", "to HQ")
    add(udp("10.0.0.0", "10.1.0.0", 40000, 9999), "out-hq-protect", "first src, first dst")
    add(udp("10.0.0.255", "10.1.255.255", 40000, 9999), "out-hq-protect", "last src, last dst")
    add(udp("10.0.1.0", "10.1.0.1", 40000, 9999), "default", "src just above the /24")
    add(udp("9.255.255.255", "10.1.0.1", 40000, 9999), "default", "src just below the /24")
    add(udp("10.0.0.1", "10.2.0.0", 40000, 9999), "out-lan-bypass", "dst just above the /16")
    add(udp("10.0.0.1", "10.0.255.255", 40000, 9999), "out-lan-bypass", "dst just below the /16")
    # telnet discard: any address, both families; before out-lan-bypass
    add(tcp("10.0.5.5", "203.0.113.5", 5001, 23), "out-telnet-discard", "telnet")
    add(tcp("10.0.0.7", "203.0.113.5", 5002, 23), "out-telnet-discard", "telnet from LAN (first match)")
    add(tcp6("2001:db8:a::1", "2001:db8:f::1", 5003, 23), "out-telnet-discard", "telnet over IPv6")
    add(_e(IP(src="10.0.5.5", dst="203.0.113.5", options=[IPOption_RR(routers=["1.2.3.4"])])
           / TCP(sport=5004, dport=23)), "out-telnet-discard", "IPv4 options (IHL 7)")
    # overlapping web rules, port edges of both
    for dport, intent in [(7999, "out-web-wide-discard"), (8000, "out-web-bypass"),
                          (8080, "out-web-bypass"), (8081, "out-web-wide-discard")]:
        add(tcp("10.0.0.9", "198.51.100.10", 40000, dport), intent, f"dport {dport} from /24")
    for dport, intent in [(6999, "default"), (7000, "out-web-wide-discard"),
                          (9000, "out-web-wide-discard"), (9001, "default")]:
        add(tcp("10.0.1.9", "198.51.100.10", 40000, dport), intent, f"dport {dport} from /16")
    add(tcp("10.1.0.9", "198.51.100.10", 40000, 8000), "default", "outside both source prefixes")
    # UDP source-port range and destination prefix edges
    for sport, intent in [(999, "default"), (1000, "out-udp-sport-bypass"),
                          (2000, "out-udp-sport-bypass"), (2001, "default")]:
        add(udp("10.0.7.7", "198.51.100.20", sport, 9999), intent, f"sport {sport}")
    for dst, intent in [("198.51.100.0", "out-udp-sport-bypass"),
                        ("198.51.100.255", "out-udp-sport-bypass"),
                        ("198.51.99.255", "default"), ("198.51.101.0", "default")]:
        add(udp("10.0.7.7", dst, 1500, 9999), intent, f"dst {dst}")
    # UDP destination-port range edges
    for dport, intent in [(4999, "default"), (5000, "out-udp-dport-discard"),
                          (5010, "out-udp-dport-discard"), (5011, "default")]:
        add(udp("10.0.7.7", "203.0.113.5", 40000, dport), intent, f"dport {dport}")
    # Ethernet padding: classified on the IP packet, forwarded with the padding
    add(udp("10.0.7.7", "203.0.113.5", 40000, 5005) + bytes(12), "out-udp-dport-discard",
        "padded frame, discarded")
    add(_e(IP(src="10.0.0.3", dst="203.0.113.5") / UDP(sport=40000, dport=53)) + b"\xaa" * 18,
        "out-lan-bypass", "padded frame, forwarded with its padding")
    # SCTP has ports
    add(_e(IP(src="10.0.7.7", dst="203.0.113.5") / SCTP(sport=2905, dport=2905)),
        "out-sctp-discard", "SCTP dport 2905")
    add(_e(IP(src="10.0.7.7", dst="203.0.113.5") / SCTP(sport=2905, dport=2906)),
        "default", "SCTP dport 2906")
    # ICMP: sport = type, dport = code
    add(_e(IP(src="10.0.0.1", dst="198.51.100.1") / ICMP(type=8, code=0)), "out-ping-discard", "echo")
    add(_e(IP(src="10.0.0.1", dst="198.51.100.1") / ICMP(type=8, code=1)), "out-lan-bypass", "type 8 code 1")
    add(_e(IP(src="10.0.0.1", dst="198.51.100.1") / ICMP(type=0, code=0)), "out-lan-bypass", "echo reply")
    add(_e(IP(src="10.0.0.1", dst="198.51.100.1") / ICMP(type=9, code=0)), "out-lan-bypass", "type 9")
    add(_e(IP(src="10.0.1.1", dst="198.51.100.1") / ICMP(type=8, code=0)), "default", "echo, src off the /24")
    # ESP (no ports)
    add(_e(IP(src="10.0.0.1", dst="203.0.113.1") / ESP(spi=0x1001, seq=1) / Raw(b"\x00" * 16)),
        "out-lan-bypass", "ESP from LAN")
    add(_e(IP(src="10.9.9.9", dst="203.0.113.1") / ESP(spi=0x1002, seq=1) / Raw(b"\x00" * 16)),
        "default", "ESP from elsewhere")
    # IPv6 HQ protect, port and prefix edges (src /48, dst /48)
    add(tcp6("2001:db8:a::1", "2001:db8:f::1", 40000, 443), "out-v6-hq-protect", "v6 to HQ")
    add(tcp6("2001:db8:a::1", "2001:db8:f::1", 40000, 442), "out-v6-lan-bypass", "dport 442")
    add(tcp6("2001:db8:a::1", "2001:db8:f::1", 40000, 444), "out-v6-lan-bypass", "dport 444")
    for src, intent in [("2001:db8:a::", "out-v6-hq-protect"),
                        (_v6last("2001:db8:a"), "out-v6-hq-protect"),
                        (_v6last("2001:db8:9"), "default"), ("2001:db8:b::", "default")]:
        add(tcp6(src, "2001:db8:f::1", 40000, 443), intent, f"src {src}")
    for dst, intent in [("2001:db8:f::", "out-v6-hq-protect"),
                        (_v6last("2001:db8:f"), "out-v6-hq-protect"),
                        (_v6last("2001:db8:e"), "out-v6-lan-bypass"),
                        ("2001:db8:10::", "out-v6-lan-bypass")]:
        add(tcp6("2001:db8:a::1", dst, 40000, 443), intent, f"dst {dst}")
    # IPv6 extension headers before TCP
    add(_e(IPv6(src="2001:db8:a::2", dst="2001:db8:f::2") / IPv6ExtHdrDestOpt()
           / TCP(sport=40000, dport=443)), "out-v6-hq-protect", "dest options + TCP 443")
    add(_e(IPv6(src="2001:db8:a::2", dst="2001:db8:f::2") / IPv6ExtHdrHopByHop()
           / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=443)), "out-v6-hq-protect",
        "hop-by-hop + dest options + TCP 443")
    add(_e(IPv6(src="2001:db8:a::1", dst="2001:db8:f::1") / UDP(sport=5353, dport=5353)),
        "out-v6-lan-bypass", "v6 UDP from LAN")
    add(tcp6("2001:db8:c::1", "2001:db8:f::1", 40000, 80), "default", "v6 from elsewhere")
    add(_e(IPv6(src="2001:db8:c::1", dst="2001:db8:f::1") / UDP(sport=1, dport=7777)),
        "out-v6-all-7777-discard", "::/0 rule, IPv6")
    add(udp("10.0.7.7", "203.0.113.5", 1, 7777), "default", "::/0 rule does not cover IPv4")
    # ICMPv6: echo and NDP (types 133-137), type edges
    add(_e(IPv6(src="2001:db8:a::1", dst="2001:db8:f::9") / ICMPv6EchoRequest()),
        "out-v6-ping-discard", "echo request")
    add(_e(IPv6(src="2001:db8:a::1", dst="2001:db8:f::9") / ICMPv6EchoRequest(code=1)),
        "out-v6-lan-bypass", "echo request code 1")
    add(_e(IPv6(src="2001:db8:a::1", dst="2001:db8:f::9") / ICMPv6EchoReply()),
        "out-v6-lan-bypass", "echo reply from LAN")
    add(_e(IPv6(src="2001:db8:c::1", dst="2001:db8:f::9") / ICMPv6EchoReply()),
        "default", "echo reply from elsewhere")
    add(_e(IPv6(src="fe80::1", dst="ff02::2") / ICMPv6ND_RS()), "out-ndp-bypass", "RS (133)")
    add(_e(IPv6(src="fe80::1", dst="ff02::1:ff00:9") / ICMPv6ND_NS(tgt="2001:db8:a::9")),
        "out-ndp-bypass", "NS (135)")
    add(_e(IPv6(src="2001:db8:a::9", dst="fe80::1") / ICMPv6ND_NA(tgt="2001:db8:a::9")),
        "out-ndp-bypass", "NA (136), before the LAN rule")
    add(_e(IPv6(src="fe80::1", dst="fe80::2") / ICMPv6ND_Redirect(tgt="fe80::3", dst="2001:db8:f::1")),
        "out-ndp-bypass", "redirect (137)")
    add(_e(IPv6(src="fe80::1", dst="ff02::2") / ICMPv6Unknown(type=132)), "default", "type 132")
    add(_e(IPv6(src="fe80::1", dst="ff02::2") / ICMPv6Unknown(type=138)), "default", "type 138")
    # Fragments
    add(_e(IP(src="10.0.0.5", dst="10.1.2.3", proto=6, frag=100) / Raw(struct.pack("!HH", 40000, 80) + b"f" * 20)),
        "out-hq-protect", "non-initial TCP fragment to HQ")
    add(_e(IP(src="10.0.5.5", dst="203.0.113.5", proto=6, flags="MF", frag=185)
           / Raw(struct.pack("!HH", 40000, 8000) + b"f" * 20)),
        "out-telnet-discard", "non-initial TCP fragment: first TCP rule, ports ignored")
    add(_e(IP(src="10.0.7.7", dst="198.51.100.7", proto=17, frag=50) / Raw(struct.pack("!HH", 9999, 9999) + b"f" * 8)),
        "out-udp-sport-bypass", "non-initial UDP fragment: sport range ignored")
    add(_e(IP(src="10.0.7.7", dst="203.0.113.5", proto=17, frag=50) / Raw(struct.pack("!HH", 40000, 9999) + b"f" * 8)),
        "out-udp-dport-discard", "non-initial UDP fragment: dport range ignored")
    add(_e(IP(src="10.0.7.7", dst="203.0.113.5", flags="MF") / UDP(sport=40000, dport=5005) / Raw(b"i" * 32)),
        "out-udp-dport-discard", "initial fragment, ports read")
    add(_e(IP(src="10.0.7.7", dst="203.0.113.5", flags="MF") / UDP(sport=40000, dport=9999) / Raw(b"i" * 32)),
        "default", "initial fragment, ports read, no rule")
    add(_e(IPv6(src="2001:db8:a::5", dst="2001:db8:f::1") / IPv6ExtHdrFragment(nh=6, offset=100, m=0, id=7)
           / Raw(struct.pack("!HH", 40000, 80) + b"f" * 20)),
        "out-telnet-discard", "v6 non-initial TCP fragment: first TCP rule (any address), dport ignored")
    add(_e(IPv6(src="2001:db8:c::1", dst="2001:db8:f::1") / IPv6ExtHdrFragment(nh=17, offset=10, m=1, id=8)
           / Raw(b"f" * 16)), "out-udp-dport-discard", "v6 non-initial UDP fragment: first UDP rule, ports ignored")
    add(_e(IPv6(src="2001:db8:a::5", dst="2001:db8:f::1") / IPv6ExtHdrFragment(nh=6, offset=0, m=1, id=9)
           / TCP(sport=40000, dport=443)), "out-v6-hq-protect", "v6 initial fragment, dport 443")
    add(_e(IPv6(src="2001:db8:a::5", dst="2001:db8:f::1") / IPv6ExtHdrFragment(nh=6, offset=0, m=1, id=10)
           / TCP(sport=40000, dport=80)), "out-v6-lan-bypass", "v6 initial fragment, dport 80")
    # VLAN-tagged and QinQ
    add(Ether(src=T, dst=R) / Dot1Q(vlan=10) / IP(src="10.0.0.2", dst="198.51.100.10") / TCP(sport=40002, dport=8080),
        "out-web-bypass", "802.1Q")
    add(Ether(src=T, dst=R) / Dot1Q(vlan=11, prio=5) / IP(src="10.0.0.2", dst="203.0.113.5") / TCP(sport=40003, dport=23),
        "out-telnet-discard", "802.1Q telnet")
    add(Ether(src=T, dst=R) / Dot1AD(vlan=100) / Dot1Q(vlan=10) / IPv6(src="2001:db8:a::7", dst="2001:db8:f::1")
        / TCP(sport=40004, dport=443), "out-v6-hq-protect", "QinQ IPv6")
    add(Ether(src=T, dst=R) / Dot1AD(vlan=100) / Dot1Q(vlan=10) / IP(src="10.0.7.3", dst="198.51.100.20")
        / UDP(sport=1500, dport=9999), "out-udp-sport-bypass", "QinQ 0x88a8")
    add(Ether(src=T, dst=R, type=0x9100) / Dot1Q(vlan=5) / Dot1Q(vlan=6) / IP(src="10.0.0.2", dst="203.0.113.5")
        / UDP(sport=40000, dport=9999), "out-lan-bypass", "QinQ 0x9100")
    add(Ether(src=T, dst=R) / Dot1Q(vlan=12) / IP(src="10.3.3.3", dst="203.0.113.5") / UDP(sport=1, dport=2),
        "default", "802.1Q, no rule")
    add(Ether(src=T, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=10) / ARP(psrc="10.0.0.2", pdst="10.0.0.254"),
        "non_ip", "802.1Q ARP")
    # Malformed
    add(b"", "malformed", "empty frame")
    add(bytes(range(10)), "malformed", "10-byte frame")
    add(bytes(Ether(src=T, dst=R))[:13], "malformed", "13-byte frame")
    add(_eth_raw(0x0800, bytes(IP(src="10.0.0.1", dst="203.0.113.5"))[:12]), "malformed", "IPv4 header cut at 12 bytes")
    ihl4 = bytearray(bytes(IP(src="10.0.0.1", dst="203.0.113.5") / TCP(sport=1, dport=2)))
    ihl4[0] = 0x44
    add(_eth_raw(0x0800, ihl4), "malformed", "IHL 4")
    add(_eth_raw(0x0800, bytes(IP(src="10.0.0.1", dst="203.0.113.5", len=200) / UDP(sport=1, dport=2))),
        "malformed", "total length beyond the frame")
    ihl15 = bytearray(bytes(IP(src="10.0.0.1", dst="203.0.113.5") / Raw(bytes(60))))
    ihl15[0] = 0x4F  # 60-byte header, but total length says 80: fine; then total 40 < IHL
    ihl15[2:4] = struct.pack("!H", 40)
    add(_eth_raw(0x0800, ihl15), "malformed", "total length below IHL")
    add(_eth_raw(0x0800, bytes(IP(src="10.0.0.1", dst="203.0.113.5", proto=6, len=22) / Raw(b"\x9c\x40")) + bytes(30)),
        "malformed", "TCP ports cut off by total length (frame padded)")
    add(_eth_raw(0x0800, bytes(IP(src="10.0.0.1", dst="198.51.100.1", proto=1) / Raw(b"\x08"))),
        "malformed", "ICMP code cut off")
    v6in4 = bytearray(bytes(IP(src="10.0.0.1", dst="203.0.113.5") / UDP(sport=1, dport=2)))
    v6in4[0] = 0x65
    add(_eth_raw(0x0800, v6in4), "malformed", "version 6 under ethertype IPv4")
    add(Ether(src=T, dst=R, type=0x88A8) / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3)
        / IP(src="10.0.0.1", dst="203.0.113.5") / UDP(sport=1, dport=2), "malformed", "three VLAN tags")
    return f


def outside_traffic():
    """Frames received on port outside (direction in)."""
    f = []

    def add(frame, intent, note):
        f.append((bytes(frame), intent, note))

    def e(pkt):
        return _e(pkt, src=R, dst=T)

    def tcp(src, dst, sport, dport):
        return e(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="SA") / Raw(b"reply"))

    def udp(src, dst, sport, dport):
        return e(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"udp"))

    def tcp6(src, dst, sport, dport):
        return e(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport) / Raw(b"tcp6"))

    def udp6(src, dst, sport, dport):
        return e(IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"udp6"))

    # Non-IP
    add(e(ARP(op=2, psrc="10.0.0.254", pdst="10.0.0.1")), "non_ip", "ARP reply")
    add(_eth_raw(0x88B5, b"local experimental ethertype", src=R, dst=T), "non_ip", "ethertype 0x88b5")
    add(Ether(src=R, dst=T) / Dot1AD(vlan=7) / Dot1Q(vlan=8) / ARP(op=2), "non_ip", "QinQ ARP")
    # RDP discard, first match before the HQ protect rule
    add(tcp("192.0.2.10", "10.0.0.1", 1234, 3389), "in-rdp-discard", "RDP")
    add(tcp("10.1.0.5", "10.0.0.1", 1234, 3389), "in-rdp-discard", "RDP from HQ (first match)")
    add(tcp("192.0.2.10", "10.0.1.1", 1234, 3389), "default", "RDP off the /24")
    # HQ protect and prefix edges
    add(udp("10.1.2.3", "10.0.0.1", 22, 40001), "in-hq-protect", "from HQ")
    add(udp("10.1.0.0", "10.0.0.0", 9999, 9999), "in-hq-protect", "first src, first dst")
    add(udp("10.1.255.255", "10.0.0.255", 9999, 9999), "in-hq-protect", "last src, last dst")
    add(udp("10.2.0.0", "10.0.0.1", 9999, 9999), "default", "src just above the /16")
    add(udp("10.0.255.255", "10.0.0.1", 9999, 9999), "default", "src just below the /16")
    add(udp("10.1.0.1", "10.0.1.0", 9999, 9999), "default", "dst just above the /24")
    # DNS (UDP sport 53, either family), ESP (both families)
    add(udp("203.0.113.5", "10.0.0.1", 53, 5000), "in-dns-bypass", "DNS reply")
    add(udp("203.0.113.5", "10.0.0.1", 54, 5000), "default", "sport 54")
    add(udp("203.0.113.5", "10.0.0.1", 52, 5000), "default", "sport 52")
    add(udp6("2001:db8:f::9", "2001:db8:a::1", 53, 5353), "in-dns-bypass", "DNS reply over IPv6")
    add(e(IP(src="203.0.113.5", dst="10.0.0.1") / UDP(sport=53, dport=5001)) + b"\x00" * 18,
        "in-dns-bypass", "padded DNS reply, forwarded with its padding")
    add(e(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
          / UDP(sport=53, dport=5353)), "in-dns-bypass", "hop-by-hop + dest options + UDP 53")
    add(e(IP(src="203.0.113.1", dst="10.0.0.1") / ESP(spi=0x2001, seq=1) / Raw(b"\x00" * 16)),
        "in-esp-bypass", "ESP")
    add(e(IPv6(src="2001:db8:f::1", dst="2001:db8:a::1") / ESP(spi=0x2002, seq=1) / Raw(b"\x00" * 16)),
        "in-esp-bypass", "ESP over IPv6")
    # Genuine ESP of the inbound SAs (their outer headers hit in-esp-bypass; the
    # model decrypts them and checks the inner packet against the SA's rule).
    from_hq, v6_in = SA_BY_NAME["from-hq"], SA_BY_NAME["v6-in"]
    hq_reply = IP(src="10.1.2.3", dst="10.0.0.1") / UDP(sport=22, dport=40001) / Raw(b"from hq")
    add(encrypt_inbound(from_hq, hq_reply, 1), "in-esp-bypass", "ESP from HQ (tunnel)")
    add(encrypt_inbound(from_hq, hq_reply, 1), "in-esp-bypass", "ESP from HQ, replayed")
    add(encrypt_inbound(from_hq, IP(src="10.1.2.3", dst="10.0.1.1") / UDP(sport=22, dport=40001), 2),
        "in-esp-bypass", "ESP from HQ, inner packet outside the SA's selectors")
    bad = bytearray(encrypt_inbound(from_hq, hq_reply, 3))
    bad[-1] ^= 0x80
    add(bytes(bad), "in-esp-bypass", "ESP from HQ, ICV corrupted")
    add(encrypt_inbound(v6_in, IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / UDP(sport=40000, dport=5500)
                        / Raw(b"v6 transport"), 1), "in-esp-bypass", "ESP from HQ (IPv6 transport)")
    # ICMP ping discard (type 8, any code)
    add(e(IP(src="198.51.100.10", dst="10.0.0.1") / ICMP(type=8)), "in-ping-discard", "echo")
    add(e(IP(src="198.51.100.10", dst="10.0.0.1") / ICMP(type=8, code=3)), "in-ping-discard", "echo code 3")
    add(e(IP(src="198.51.100.10", dst="10.0.0.1") / ICMP(type=0)), "default", "echo reply")
    add(e(IP(src="198.51.100.10", dst="10.0.0.1") / ICMP(type=3, code=3) / IP(src="10.0.0.1", dst="198.51.100.10")
          / UDP(sport=1, dport=2)), "default", "port unreachable")
    # A single host (prefix without /len) and its neighbours
    add(udp("192.0.2.66", "10.0.0.1", 1, 2), "in-blocked-host", "blocked host")
    add(udp("192.0.2.65", "10.0.0.1", 1, 2), "default", "host below")
    add(udp("192.0.2.67", "10.0.0.1", 1, 2), "default", "host above")
    add(tcp("192.0.2.66", "10.0.0.1", 1, 3389), "in-rdp-discard", "blocked host's RDP: earlier rule")
    # dst prefix 10.0.0.128/25 edges (TCP replies from 443 elsewhere bypass)
    for dst, intent in [("10.0.0.127", "in-web-replies-bypass"), ("10.0.0.128", "in-upper-half-discard"),
                        ("10.0.0.255", "in-upper-half-discard"), ("10.0.1.0", "default")]:
        add(tcp("198.51.100.10", dst, 443, 40000), intent, f"dst {dst}")
    # sport 443-444 edges
    for sport, intent in [(442, "default"), (443, "in-web-replies-bypass"),
                          (444, "in-web-replies-bypass"), (445, "default")]:
        add(tcp("198.51.100.10", "10.0.0.10", sport, 40000), intent, f"sport {sport}")
    add(tcp("203.0.113.9", "10.0.0.1", 80, 40000), "default", "web reply from port 80")
    # IPv6: overlapping rules, port edges and /64, /48 boundaries
    for sport, intent in [(439, "in-v6-tcp-discard"), (440, "in-v6-web-bypass"),
                          (450, "in-v6-web-bypass"), (451, "in-v6-tcp-discard")]:
        add(tcp6("2001:db8:f::9", "2001:db8:a::1", sport, 40000), intent, f"v6 sport {sport}")
    for dst, intent in [("2001:db8:a::", "in-v6-web-bypass"),
                        ("2001:db8:a::ffff:ffff:ffff:ffff", "in-v6-web-bypass"),
                        ("2001:db8:a:1::", "default"), (_v6last("2001:db8:9"), "default")]:
        add(tcp6("2001:db8:f::9", dst, 443, 40000), intent, f"v6 dst {dst}")
    for src, intent in [("2001:db8:f::", "in-v6-web-bypass"), (_v6last("2001:db8:f"), "in-v6-web-bypass"),
                        ("2001:db8:10::", "in-v6-tcp-discard"), (_v6last("2001:db8:e"), "in-v6-tcp-discard")]:
        add(tcp6(src, "2001:db8:a::1", 443, 40000), intent, f"v6 src {src}")
    add(Ether(src=R, dst=T) / Dot1Q(vlan=20) / IPv6(src="2001:db8:f::9", dst="2001:db8:a::1")
        / TCP(sport=443, dport=40000), "in-v6-web-bypass", "802.1Q IPv6")
    add(Ether(src=R, dst=T) / Dot1Q(vlan=20) / IP(src="203.0.113.5", dst="10.0.0.1") / UDP(sport=53, dport=5000),
        "in-dns-bypass", "802.1Q DNS")
    add(Ether(src=R, dst=T) / Dot1AD(vlan=200) / Dot1Q(vlan=20) / IP(src="198.51.100.10", dst="10.0.0.200")
        / TCP(sport=443, dport=40000), "in-upper-half-discard", "QinQ, discarded")
    # ICMPv6
    add(e(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / ICMPv6EchoRequest()), "in-v6-ping-discard", "v6 echo")
    add(e(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / ICMPv6EchoReply()), "default", "v6 echo reply")
    add(e(IPv6(src="fe80::fe", dst="ff02::1") / ICMPv6ND_RA()), "in-ndp-bypass", "RA (134)")
    add(e(IPv6(src="fe80::fe", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="2001:db8:a::1")), "in-ndp-bypass", "NS (135)")
    add(e(IPv6(src="fe80::fe", dst="fe80::1") / ICMPv6ND_NA(tgt="fe80::fe")), "in-ndp-bypass", "NA (136)")
    add(e(IPv6(src="fe80::fe", dst="ff02::1") / ICMPv6Unknown(type=132)), "default", "type 132")
    add(e(IPv6(src="fe80::fe", dst="ff02::1") / ICMPv6Unknown(type=138)), "default", "type 138")
    # IPv6 UDP protect, dport edges
    for dport, intent in [(4999, "default"), (5000, "in-v6-udp-protect"),
                          (5999, "in-v6-udp-protect"), (6000, "default")]:
        add(udp6("2001:db8:f::9", "2001:db8:a::1", 40000, dport), intent, f"v6 UDP dport {dport}")
    add(udp6("2001:db8:10::1", "2001:db8:a::1", 40000, 5500), "default", "v6 UDP src off the /48")
    add(udp("203.0.113.5", "10.0.0.1", 1, 7777), "in-v4-all-7777-discard", "0.0.0.0/0 rule, IPv4")
    add(udp6("2001:db8:10::1", "2001:db8:a::1", 1, 7777), "default", "0.0.0.0/0 rule does not cover IPv6")
    add(e(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / IPv6ExtHdrRouting(addresses=[])
          / UDP(sport=40000, dport=5500)), "in-v6-udp-protect", "routing header + UDP 5500")
    # Fragments
    add(e(IP(src="198.51.100.10", dst="10.0.0.10", proto=6, frag=20) / Raw(struct.pack("!HH", 443, 40000) + b"f" * 20)),
        "in-rdp-discard", "non-initial TCP fragment: first TCP rule for the dst, ports ignored")
    add(e(IP(src="203.0.113.5", dst="10.0.0.10", proto=17, frag=20) / Raw(struct.pack("!HH", 9999, 9999) + b"f" * 8)),
        "in-dns-bypass", "non-initial UDP fragment: sport ignored")
    add(e(IP(src="198.51.100.10", dst="10.0.0.1", proto=1, frag=3) / Raw(b"\x00\x00" + b"f" * 22)),
        "in-ping-discard", "non-initial ICMP fragment: type ignored")
    add(e(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / IPv6ExtHdrFragment(nh=6, offset=50, id=11)
          / Raw(struct.pack("!HH", 22, 40000) + b"f" * 20)), "in-v6-web-bypass",
        "v6 non-initial TCP fragment: sport ignored")
    add(e(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / IPv6ExtHdrFragment(nh=17, offset=50, id=12)
          / Raw(struct.pack("!HH", 40000, 5500) + b"f" * 8)), "in-dns-bypass",
        "v6 non-initial UDP fragment: the first UDP rule, ports ignored")
    # Malformed
    add(b"\x01", "malformed", "1-byte frame")
    add(_eth_raw(0x8100, b"\x00", src=R, dst=T), "malformed", "VLAN tag cut off")
    add(_eth_raw(0x86DD, bytes(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1"))[:30], src=R, dst=T),
        "malformed", "IPv6 header cut at 30 bytes")
    add(_eth_raw(0x86DD, bytes(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1", plen=100)
                               / UDP(sport=53, dport=1)), src=R, dst=T),
        "malformed", "IPv6 payload length beyond the frame")
    add(_eth_raw(0x86DD, bytes(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1", nh=17, plen=2) / Raw(b"\x00\x35"))
                 + bytes(20), src=R, dst=T), "malformed", "UDP ports cut off by payload length (frame padded)")
    add(_eth_raw(0x86DD, bytes(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1", nh=60)
                               / Raw(b"\x11\x05" + bytes(6))), src=R, dst=T),
        "malformed", "destination options header running past the packet")
    add(_eth_raw(0x86DD, bytes(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1", nh=58) / Raw(b"\x80")), src=R, dst=T),
        "malformed", "ICMPv6 code cut off")
    add(_eth_raw(0x0800, bytes(IP(src="203.0.113.5", dst="10.0.0.1") / UDP(sport=53, dport=1))[:19], src=R, dst=T),
        "malformed", "IPv4 header cut at 19 bytes")
    add(Ether(src=R, dst=T) / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3)
        / IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / UDP(sport=53, dport=1), "malformed", "three 802.1Q tags")
    return f


# ---------------------------------------------------------------------------

def _check_traffic_matches_intents(traffic, direction, rules):
    """The model must agree with the author's intent for every frame."""
    bad = []
    for i, (frame, intent, note) in enumerate(traffic):
        got, _ = model_classify(frame, direction, rules)
        if got != intent:
            bad.append(f"#{i} {note}: intended {intent}, model says {got}: {describe(frame)}")
    assert not bad, "test data and model disagree:\n" + "\n".join(bad)


def _model_inbound_esp(frame, rules, sas=SAS):
    """The documented inbound ESP processing, for a frame that is ESP to a known
    inbound SA: (counter, frame that goes out or None). None if the frame is not
    ESP of a known SA (unknown SPIs: see _expectation)."""
    spi = esp_spi(frame)
    if spi is None:
        return None
    k = model_parse(frame)
    if k["kind"] != "ip" or k["fragment"]:
        return None
    spec = next((s for s in sas if s.direction == "in" and s.spi == spi), None)
    if spec is None:
        return "unknown_spi", None
    try:
        inner = scapy_decrypt(spec, parse_esp_frame(frame))
    except Exception:  # noqa: BLE001 - IPSecIntegrityError: the ICV does not verify
        return "icv", None
    out = decapsulated(ip_packet(frame)[0], inner)
    _, rule = model_classify(out, "in", rules)
    if rule is not None and rule.action == "protect" and rule.sa == spec.name:
        return "esp_decrypted", out
    return "policy_mismatch", None


def _expectation(traffic, direction, rules, default_action, unknown_spi="drop", sas=SAS):
    """Frames that must come out (in order) and the counters the run must show.
    An outbound protect hit comes out as ("esp", SA, original frame)."""
    out, c = [], Counter()
    authenticated = set()  # the model's replay window: (SPI, sequence number) seen
    for frame, _intent, _note in traffic:
        esp = _model_inbound_esp(frame, rules, sas) if direction == "in" else None
        if esp is not None:
            kind, out_frame = esp
            if kind == "unknown_spi" and unknown_spi == "drop":
                c["no_sa"] += 1
                continue
            if kind != "unknown_spi":
                key = (esp_spi(frame), parse_esp_frame(frame).seq_lo)
                if key in authenticated:
                    c["replay"] += 1  # checked before decryption
                    continue
                if kind != "icv":
                    authenticated.add(key)
                c[kind] += 1
                if out_frame is not None:
                    out.append(out_frame)
                continue
        outcome, rule = model_classify(frame, direction, rules)
        if outcome == "non_ip":
            c["non_ip"] += 1
            out.append(frame)
        elif outcome == "malformed":
            c["malformed"] += 1
        elif rule is None:
            if default_action == "bypass":
                c["bypassed"] += 1
                out.append(frame)
            else:
                c["default_discard"] += 1
        elif rule.action == "bypass":
            c["bypassed"] += 1
            out.append(frame)
        elif rule.action == "discard":
            c["policy_discard"] += 1
        elif rule.action == "protect" and direction == "out":
            c["esp_encrypted"] += 1
            out.append(("esp", next(s for s in sas if s.name == rule.sa and s.direction == "out"), frame))
        elif rule.action == "protect":
            c["unprotected"] += 1
        else:
            raise AssertionError(rule.action)
    return out, c


def _output_problems(got, want):
    """Compares what a port sent with the model's list: plain frames byte for
    byte, ESP frames by taking them apart and decrypting them (each SA's
    sequence numbers must be 1..N). Returns a list of problems."""
    if len(got) != len(want):
        return [f"got {len(got)} frames, expected {len(want)}"] + (
            [frames_diff(got, [w if isinstance(w, bytes) else w[2] for w in want], describe),
             "(for ESP the original frame is shown)"])
    problems, seqs, counts = [], Counter(), Counter()
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, bytes):
            if g != w:
                problems.append(f"#{i}: got {describe(g)} ({g.hex()}), expected {describe(w)} ({w.hex()})")
            continue
        _, spec, orig = w
        try:
            seq = parse_esp_frame(g).seq_lo
        except Exception as e:  # noqa: BLE001 - reported
            problems.append(f"#{i}: expected ESP of {spec.name} for {describe(orig)}, got {describe(g)}: {e}")
            continue
        p = outbound_problems(spec, g, orig, seq)
        if p:
            problems.append(f"#{i} ({spec.name}, {describe(orig)}): " + "; ".join(p))
        seqs[spec.name] += seq
        counts[spec.name] += 1
    for name, n in counts.items():
        if seqs[name] != n * (n + 1) // 2:
            problems.append(f"{name}: sequence numbers are not 1..{n}")
    return problems


def test_traffic_covers_every_rule_action_and_case():
    """Guards the test data: every rule, action, direction and special case is exercised."""
    rules = [ModelRule(p) for p in POLICIES]
    hits = Counter()
    for traffic, direction in [(inside_traffic(), "out"), (outside_traffic(), "in")]:
        _check_traffic_matches_intents(traffic, direction, rules)
        kinds = Counter()
        for frame, intent, _ in traffic:
            hits[intent] += 1
            kinds[intent if intent in ("default", "non_ip", "malformed") else "rule"] += 1
            k = model_parse(frame)
            if k["kind"] == "ip":
                kinds[f"v{k['version']}"] += 1
                kinds["fragment"] += k["fragment"]
                kinds[f"proto{k['proto']}"] += 1
        for kind in ["default", "non_ip", "rule", "v4", "v6", "fragment", "proto6", "proto17", "proto1",
                     "proto58", "proto50"]:
            assert kinds[kind] >= 1, f"direction {direction}: no {kind} frame"
        assert kinds["malformed"] >= 8, f"direction {direction}: too few malformed frames"
        actions = {r.action for r in rules if r.direction == direction and hits[r.name]}
        assert actions == {"bypass", "discard", "protect"}, (direction, actions)
    unhit = [r.name for r in rules if not hits[r.name]]
    assert not unhit, f"rules no frame hits: {unhit}"
    # Inbound ESP: decrypted for each inbound SA, and every way of failing.
    esp = Counter(r[0] for f, _, _ in outside_traffic() if (r := _model_inbound_esp(f, rules)))
    assert {"esp_decrypted", "icv", "policy_mismatch", "unknown_spi"} <= set(esp), esp
    decrypted = {esp_spi(f) for f, _, _ in outside_traffic() if (_model_inbound_esp(f, rules) or ("",))[0] == "esp_decrypted"}
    assert decrypted == {s.spi for s in SAS if s.direction == "in"}


@pytest.mark.parametrize("default_action,unknown_spi", [("bypass", "drop"), ("discard", "classify")])
def test_pcap_forwarding_matches_model(dataplane, tmp_path, file_prefix, default_action, unknown_spi):
    """`unknown_spi`: [dataplane] unknown_spi, what inbound ESP of no SA gets (the
    default, "drop", counts it `no_sa`; "classify" runs it through the rules)."""
    rules = [ModelRule(p) for p in POLICIES]
    inside, outside = inside_traffic(), outside_traffic()
    _check_traffic_matches_intents(inside, "out", rules)
    _check_traffic_matches_intents(outside, "in", rules)

    paths = {n: tmp_path / f"{n}.pcap" for n in ["inside-rx", "outside-rx", "inside-tx", "outside-tx"]}
    write_pcap(paths["inside-rx"], [f for f, _, _ in inside])
    write_pcap(paths["outside-rx"], [f for f, _, _ in outside])
    # What we wrote is what net_pcap will read (Scapy wrote nothing else).
    assert read_pcap(paths["inside-rx"]) == [f for f, _, _ in inside]
    assert read_pcap(paths["outside-rx"]) == [f for f, _, _ in outside]

    cfg = tmp_path / "bitw.toml"
    cfg.write_text(render_config(
        pcap_device(0, paths["inside-rx"], paths["inside-tx"]),
        pcap_device(1, paths["outside-rx"], paths["outside-tx"]),
        POLICIES, prefix=file_prefix, workers=1, burst=16, default_action=default_action,
        extra_dataplane=None if unknown_spi == "drop" else {"unknown_spi": unknown_spi},
        sas=write_sa_configs(SAS, tmp_path)))

    want_out, c_out = _expectation(inside, "out", rules, default_action)
    want_in, c_in = _expectation(outside, "in", rules, default_action, unknown_spi)
    # Both outcomes really occur in this run (nothing passes vacuously).
    assert want_out and want_in and len(want_out) < len(inside) and len(want_in) < len(outside)

    run, summary = run_config(dataplane, cfg, run_for=2)

    # 1. The frames: same order, nothing else; raw bytes, or ESP that decrypts
    # to the original.
    got_outside_tx = read_pcap(paths["outside-tx"])
    got_inside_tx = read_pcap(paths["inside-tx"])
    problems = _output_problems(got_outside_tx, want_out)
    assert not problems, "port outside sent the wrong frames (direction out):\n" + "\n".join(problems[:10])
    diff = frames_diff(got_inside_tx, want_in, describe)
    assert diff is None, f"port inside sent the wrong frames (direction in):\n{diff}"

    # 2. The counters, exactly.
    total = c_out + c_in
    want_drops = drops(**{r: total[r] for r in ("malformed", "policy_discard", "default_discard", "no_sa",
                                                 "replay", "icv", "policy_mismatch", "unprotected")})
    assert summary["drops"] == want_drops, run.describe()
    assert summary["non_ip"] == total["non_ip"]
    assert summary["bypassed"] == total["bypassed"]
    assert summary["esp_encrypted"] == total["esp_encrypted"] > 0
    assert summary["esp_decrypted"] == total["esp_decrypted"] > 0
    assert want_drops["unprotected"] > 0 and want_drops["policy_mismatch"] > 0
    assert (want_drops["no_sa"] > 0) == (unknown_spi == "drop")
    assert summary["rx_packets"] == len(inside) + len(outside)
    assert summary["tx_packets"] == len(want_out) + len(want_in)
    # Every frame received is forwarded or dropped for a counted reason.
    assert summary["rx_packets"] == summary["tx_packets"] + sum(want_drops.values())
    if default_action == "bypass":
        assert want_drops["default_discard"] == 0
    else:
        assert want_drops["default_discard"] > 0

    [w] = summary["workers"]
    size = lambda frames: sum(len(f) for f in frames)  # noqa: E731
    assert w["rx_inside"] == {"packets": len(inside), "bytes": size([f for f, _, _ in inside])}
    assert w["rx_outside"] == {"packets": len(outside), "bytes": size([f for f, _, _ in outside])}
    # (ESP frames were checked above: their sizes are what was sent.)
    assert w["tx_outside"] == {"packets": len(want_out), "bytes": size(got_outside_tx)}
    assert w["tx_inside"] == {"packets": len(want_in), "bytes": size(want_in)}
    assert w["drops"] == want_drops
    assert w["non_ip"] == total["non_ip"] and w["bypassed"] == total["bypassed"]
    assert w["busy_polls"] >= 1

    # 3. The ports' own counters agree.
    ports = summary["ports"]
    assert ports["inside"]["rx_packets"] == len(inside)
    assert ports["outside"]["rx_packets"] == len(outside)
    assert ports["outside"]["tx_packets"] == len(want_out)
    assert ports["inside"]["tx_packets"] == len(want_in)
    assert ports["outside"]["tx_bytes"] == size(got_outside_tx)
    assert ports["inside"]["tx_bytes"] == size(want_in)
    assert ports["inside"]["device"].startswith("net_pcap0,")
    assert ports["outside"]["device"].startswith("net_pcap1,")


def test_frames_larger_than_one_mbuf_are_forwarded(dataplane, tmp_path, file_prefix):
    """Well-formed frames longer than an mbuf's data room (2048 bytes here) reach
    the worker as chained segments; they are valid IP and must be forwarded
    unchanged like any other, not counted malformed. A rule makes the direction
    inspected (with none, frames would pass unparsed); the default discards, so
    only frames that were parsed and matched come out."""
    def udp(total_frame_len, dport):
        hdr = len(Ether() / IP() / UDP())
        return bytes(Ether(src=T, dst=R) / IP(src="10.0.0.1", dst="198.51.100.1")
                     / UDP(sport=4000, dport=dport) / Raw(b"j" * (total_frame_len - hdr)))

    frames = [udp(1514, 1), udp(2048, 2), udp(2049, 3), udp(3000, 4), udp(9014, 5)]
    assert [len(f) for f in frames] == [1514, 2048, 2049, 3000, 9014]
    rx_in, rx_out = tmp_path / "in.pcap", tmp_path / "out.pcap"
    tx_in, tx_out = tmp_path / "in-tx.pcap", tmp_path / "out-tx.pcap"
    write_pcap(rx_in, frames)
    write_pcap(rx_out, [])
    cfg = tmp_path / "bitw.toml"
    udp_out = dict(name="udp-out", direction="out", src="10.0.0.0/24", proto="udp",
                   dport="1-5", action="bypass")
    cfg.write_text(render_config(pcap_device(0, rx_in, tx_in), pcap_device(1, rx_out, tx_out),
                                 [udp_out], prefix=file_prefix, default_action="discard"))
    run, s = run_config(dataplane, cfg, run_for=2)
    assert s["rx_packets"] == len(frames), run.describe()
    got = read_pcap(tx_out)
    assert s["drops"]["malformed"] == 0, (
        f"{s['drops']['malformed']} well-formed frames counted malformed; forwarded only "
        f"{[len(f) for f in got]} of {[len(f) for f in frames]}")
    assert frames_diff(got, frames) is None
    assert s["bypassed"] == len(frames)


def test_first_match_in_a_large_table(dataplane, tmp_path, file_prefix):
    """1000 host rules per direction, each with its own port, then a catch-all for
    their whole prefix: a packet takes its host's rule when the port matches and
    the catch-all when it does not, whatever the rule's position in the table."""
    n = 1000
    actions = ["discard", "bypass", "protect"]
    policies = []
    for i in range(n):
        a = actions[i % 3]
        policies.append(dict(name=f"out-host-{i}", direction="out", src=f"10.50.{i // 256}.{i % 256}",
                             proto="udp", dport=1000 + i, action=a, **({"sa": "s-out"} if a == "protect" else {})))
        policies.append(dict(name=f"in-host-{i}", direction="in", dst=f"2001:db8:50::{i:x}/128",
                             proto="tcp", sport=2000 + i, action=a, **({"sa": "s-in"} if a == "protect" else {})))
    policies.append(dict(name="out-catch-all", direction="out", src="10.50.0.0/16", action="discard"))
    policies.append(dict(name="in-catch-all", direction="in", dst="2001:db8:50::/112", action="discard"))
    rules = [ModelRule(p) for p in policies]

    sample = sorted(set(range(0, n, 7)) | {0, 1, 2, n - 2, n - 1})
    inside, outside = [], []
    for i in sample:
        src = f"10.50.{i // 256}.{i % 256}"
        inside.append(bytes(Ether(src=T, dst=R) / IP(src=src, dst="203.0.113.1") / UDP(sport=9, dport=1000 + i)))
        inside.append(bytes(Ether(src=T, dst=R) / IP(src=src, dst="203.0.113.1") / UDP(sport=9, dport=1001 + i)))
        dst = f"2001:db8:50::{i:x}"
        outside.append(bytes(Ether(src=R, dst=T) / IPv6(src="2001:db8:f::1", dst=dst) / TCP(sport=2000 + i, dport=9)))
        outside.append(bytes(Ether(src=R, dst=T) / IPv6(src="2001:db8:f::1", dst=dst) / TCP(sport=1999 + i, dport=9)))
    inside.append(bytes(Ether(src=T, dst=R) / IP(src="10.51.0.0", dst="203.0.113.1") / UDP(sport=9, dport=1000)))
    outside.append(bytes(Ether(src=R, dst=T) / IPv6(src="2001:db8:f::1", dst="2001:db8:50::1:0") / TCP(sport=2000, dport=9)))

    # The traffic hits rules from all over the table, and the catch-alls.
    hit = {model_classify(f, "out", rules)[0] for f in inside} | {model_classify(f, "in", rules)[0] for f in outside}
    assert {"out-host-0", f"out-host-{n - 1}", "in-host-0", f"in-host-{n - 1}", "out-catch-all",
            "in-catch-all", "default"} <= hit
    assert len(hit) > len(sample)

    paths = {k: tmp_path / f"{k}.pcap" for k in ["in-rx", "out-rx", "in-tx", "out-tx"]}
    write_pcap(paths["in-rx"], inside)
    write_pcap(paths["out-rx"], outside)
    cfg = tmp_path / "big.toml"
    sas = [SaSpec("s-out", "out", 0x5001, "tunnel", "172.16.50.1", "172.16.50.2"),
           SaSpec("s-in", "in", 0x5002, "tunnel", "2001:db8:ffff:50::2", "2001:db8:ffff:50::1")]
    cfg.write_text(render_config(pcap_device(0, paths["in-rx"], paths["in-tx"]),
                                 pcap_device(1, paths["out-rx"], paths["out-tx"]),
                                 policies, prefix=file_prefix, default_action="bypass",
                                 sas=write_sa_configs(sas, tmp_path)))
    traffic_in = [(f, None, "") for f in inside]
    traffic_out = [(f, None, "") for f in outside]
    want_out, c_out = _expectation(traffic_in, "out", rules, "bypass", sas=sas)
    want_in, c_in = _expectation(traffic_out, "in", rules, "bypass", sas=sas)

    run, s = run_config(dataplane, cfg, run_for=2)
    problems = _output_problems(read_pcap(paths["out-tx"]), want_out)
    assert not problems, "\n".join(problems[:10])
    assert frames_diff(read_pcap(paths["in-tx"]), want_in, describe) is None
    total = c_out + c_in
    # Outbound protect hits leave encrypted; inbound plaintext ones are `unprotected`.
    assert total["esp_encrypted"] > 0 and total["unprotected"] > 0
    assert s["drops"] == drops(policy_discard=total["policy_discard"], unprotected=total["unprotected"]), \
        run.describe()
    assert s["esp_encrypted"] == total["esp_encrypted"]
    assert s["bypassed"] == total["bypassed"]
    assert s["rx_packets"] == len(inside) + len(outside)
    assert s["tx_packets"] == len(want_out) + len(want_in)
    assert "2002 rules" in run.stderr


def test_direction_without_rules_is_a_plain_wire(dataplane, tmp_path, file_prefix):
    """With no rule in a direction and default bypass nothing can change a frame's
    fate, so the worker forwards that direction's frames unparsed (counted as
    `uninspected`), malformed ones included; the other direction, which has a
    rule, is still inspected."""
    good = bytes(Ether(src=T, dst=R) / IP(src="10.0.0.1", dst="198.51.100.1") / UDP(sport=1, dport=2))
    truncated = good[:14 + 10]
    arp = bytes(Ether(src=T, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2"))
    out_frames = [good, truncated, arp]
    in_frames = [bytes(Ether(src=R, dst=T) / IP(src="198.51.100.1", dst="10.0.0.1") / UDP(sport=2, dport=1)),
                 truncated]
    rx_in, rx_out = tmp_path / "in.pcap", tmp_path / "out.pcap"
    tx_in, tx_out = tmp_path / "in-tx.pcap", tmp_path / "out-tx.pcap"
    write_pcap(rx_in, out_frames)
    write_pcap(rx_out, in_frames)
    rule_in = dict(name="in-any", direction="in", proto="udp", action="bypass")
    cfg = tmp_path / "bitw.toml"
    cfg.write_text(render_config(pcap_device(0, rx_in, tx_in), pcap_device(1, rx_out, tx_out),
                                 [rule_in], prefix=file_prefix, default_action="bypass"))
    run, s = run_config(dataplane, cfg, run_for=2)
    assert frames_diff(read_pcap(tx_out), out_frames) is None, run.describe()
    assert frames_diff(read_pcap(tx_in), in_frames[:1]) is None, run.describe()
    assert s["uninspected"] == len(out_frames)
    assert s["drops"]["malformed"] == 1  # the truncated frame of the inspected direction
    assert s["bypassed"] == 1
