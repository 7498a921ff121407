#!/usr/bin/python3
"""Writes the demo captures configs/demo/inside.pcap and outside.pcap.

Terminals 10.0.0.0/24 and 2001:db8:a::/64 sit on the inside; the Internet
(198.51.100.0/24, 203.0.113.0/24, 2001:db8:f::/48) on the outside. The mix hits
every rule of configs/demo.toml plus ARP, NDP and a VLAN-tagged frame.
Run: /usr/bin/python3 configs/demo/make_pcaps.py
"""
import os
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.all import DNS, DNSQR, ARP, Dot1Q, Ether, ICMP, ICMPv6EchoRequest, ICMPv6ND_NS, IP, IPv6, TCP, UDP, Raw, wrpcap

HERE = os.path.dirname(os.path.abspath(__file__))
T = "02:00:00:00:00:01"  # a terminal
R = "02:00:00:00:00:fe"  # the outside router


def out(p):
    return Ether(src=T, dst=R) / p


def inb(p):
    return Ether(src=R, dst=T) / p


inside = [
    Ether(src=T, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.254"),
    out(IP(src="10.0.0.1", dst="198.51.100.10") / TCP(sport=40000, dport=443) / Raw(b"web")),
    out(IP(src="10.0.0.1", dst="10.1.2.3") / TCP(sport=40001, dport=22) / Raw(b"to hq")),
    out(IP(src="10.0.0.1", dst="203.0.113.5") / UDP(sport=5000, dport=53) / DNS(rd=1, qd=DNSQR(qname="example.com"))),
    out(IP(src="10.0.0.1", dst="203.0.113.5") / TCP(sport=5001, dport=23) / Raw(b"telnet")),
    out(IPv6(src="2001:db8:a::1", dst="2001:db8:f::9") / ICMPv6EchoRequest()),
    out(IPv6(src="2001:db8:a::1", dst="ff02::1:ff00:9") / ICMPv6ND_NS(tgt="2001:db8:a::9")),
    Ether(src=T, dst=R) / Dot1Q(vlan=10) / IP(src="10.0.0.2", dst="198.51.100.10") / TCP(sport=40002, dport=443),
]
# Headquarters' reply, encrypted with the inbound SA from-hq (configs/demo.toml).
with open(os.path.join(HERE, "from-hq.key")) as f:
    from_hq_key = bytes.fromhex(f.read().strip())
from_hq = SecurityAssociation(ESP, spi=0x2001, crypt_algo="AES-GCM", crypt_key=from_hq_key,
                              tunnel_header=IP(src="172.16.0.2", dst="172.16.0.1"))
hq_reply = from_hq.encrypt(IP(src="10.1.2.3", dst="10.0.0.1") / TCP(sport=22, dport=40001) / Raw(b"from hq"))

outside = [
    inb(hq_reply),
    inb(IP(src="198.51.100.10", dst="10.0.0.1") / TCP(sport=443, dport=40000) / Raw(b"reply")),
    inb(IP(src="192.0.2.66", dst="10.0.0.1") / TCP(sport=1234, dport=3389) / Raw(b"scan")),
    inb(IP(src="198.51.100.10", dst="10.0.0.1") / ICMP(type=8)),
    inb(IPv6(src="2001:db8:f::9", dst="2001:db8:a::1") / UDP(sport=53, dport=5353)),
]
wrpcap(os.path.join(HERE, "inside.pcap"), inside)
wrpcap(os.path.join(HERE, "outside.pcap"), outside)
print(f"wrote {len(inside)} inside and {len(outside)} outside frames to {HERE}")
