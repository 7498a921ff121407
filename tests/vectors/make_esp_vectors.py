#!/usr/bin/python3
"""Writes tests/vectors/esp_kat.json: known-answer vectors for bitw's ESP.

Run once (as root, with the release build), when the vectors must change on
purpose:  /usr/bin/python3 tests/vectors/make_esp_vectors.py

It runs bitw-dataplane on the frames below, keeps what bitw sends, and writes
the vectors only if every one passes an independent check: outbound ESP packets
are taken apart and decrypted with Scapy and with the AEAD directly (outer
header, SPI, sequence number, IV, trailer, plaintext = input); inbound, the
input is Scapy's encryption and the output must be its plaintext. The test
(tests/test_esp.py::test_known_answer_vectors) then requires bitw to produce
the same bytes again; bitw's output is deterministic (IV = sequence number).
"""

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scapy.all import ICMP, IP, TCP, UDP, Dot1Q, Ether, IPv6, Raw  # noqa: E402

from bitw_esp import (  # noqa: E402
    R, T, SaSpec, decapsulated, encrypt_inbound, outbound_problems, parse_esp_frame, write_sa_configs,
)
from bitw_testlib import (  # noqa: E402
    DEFAULT_BINARY, pcap_device, read_pcap, render_config, run_config, unique_prefix, write_pcap,
)

OUT = [
    SaSpec("kat-tr4", "out", 0x7001, "transport", aead="aes128gcm16", esn=False),
    SaSpec("kat-t6in4", "out", 0x7002, "tunnel", "172.16.7.1", "172.16.7.2", aead="aes256gcm16", esn=True),
    SaSpec("kat-t4in6-udp", "out", 0x7003, "tunnel", "2001:db8:ffff:7::1", "2001:db8:ffff:7::2", encap="udp",
           aead="chacha20poly1305", esn=True),
    SaSpec("kat-tr6-udp", "out", 0x7004, "transport", encap="udp", udp_sport=4501, udp_dport=4502,
           aead="aes128gcm16", esn=True),
    SaSpec("kat-t6in6", "out", 0x7005, "tunnel", "2001:db8:ffff:7::1", "2001:db8:ffff:7::2",
           aead="chacha20poly1305", esn=False),
    SaSpec("kat-t4in4-udp", "out", 0x7006, "tunnel", "172.16.7.1", "172.16.7.2", encap="udp",
           aead="aes256gcm16", esn=False),
]
IN = [
    SaSpec("kat-in-t4", "in", 0x8001, "tunnel", "172.16.7.2", "172.16.7.1", aead="aes128gcm16", esn=True),
    SaSpec("kat-in-tr6-udp", "in", 0x8002, "transport", encap="udp", aead="chacha20poly1305", esn=False),
    SaSpec("kat-in-t6-udp", "in", 0x8003, "tunnel", "2001:db8:ffff:7::2", "2001:db8:ffff:7::1", encap="udp",
           aead="aes256gcm16", esn=True),
    SaSpec("kat-in-tr4", "in", 0x8004, "transport", aead="aes256gcm16", esn=False),
]


def sel(k):
    """Selectors of SA k: terminals 10.0.0.0/24, 2001:db8:a::/48; far side per SA."""
    return (f"10.{70 + k}.0.0/16", f"2001:db8:{0x700 + k:x}::/48")


def far(k, v6):
    return f"2001:db8:{0x700 + k:x}::1" if v6 else f"10.{70 + k}.0.1"


def data(n, salt):
    return Raw(bytes((i * 13 + salt) & 0xFF for i in range(n)))


def policies():
    p = []
    for k, s in enumerate(OUT + IN):
        v4, v6 = sel(k)
        near4, near6 = "10.0.0.0/24", "2001:db8:a::/48"
        pairs = [(near4, v4), (near6, v6)] if s.direction == "out" else [(v4, near4), (v6, near6)]
        for fam, (a, b) in zip(("v4", "v6"), pairs):
            p.append(dict(name=f"{s.name}-{fam}", direction=s.direction, src=a, dst=b, action="protect", sa=s.name))
    return p


def outbound_frames():
    """Per outbound SA, frames of one family (their numbering then follows their order)."""
    e = Ether(src=T, dst=R)
    per = [
        [e / IP(src="10.0.0.1", dst=far(0, False)) / UDP(sport=5000, dport=53) / data(1, 0),
         e / IP(src="10.0.0.1", dst=far(0, False), id=7) / TCP(sport=40000, dport=443, flags="PA") / data(100, 0)],
        [e / IPv6(src="2001:db8:a::1", dst=far(1, True), tc=0x2A) / UDP(sport=5000, dport=53) / data(2, 1),
         e / IPv6(src="2001:db8:a::1", dst=far(1, True)) / TCP(sport=40000, dport=443) / data(1400 - 60, 1)],
        [e / IP(src="10.0.0.1", dst=far(2, False), tos=0xB8, flags="DF") / UDP(sport=5000, dport=53) / data(3, 2),
         e / IP(src="10.0.0.1", dst=far(2, False)) / TCP(sport=40000, dport=443) / data(1400 - 40, 2)],
        [e / IPv6(src="2001:db8:a::1", dst=far(3, True)) / UDP(sport=5000, dport=53) / data(4, 3)],
        [Ether(src=T, dst=R) / Dot1Q(vlan=70) / IPv6(src="2001:db8:a::1", dst=far(4, True), hlim=3)
         / UDP(sport=5000, dport=53) / data(5, 4)],
        [e / IP(src="10.0.0.1", dst=far(5, False)) / ICMP(id=5, seq=1) / data(6, 5)],
    ]
    out = []
    for r in range(max(len(x) for x in per)):
        for k, frames in enumerate(per):
            if r < len(frames):
                out.append((OUT[k], r + 1, bytes(frames[r])))
    return out


def inbound_frames():
    l2 = bytes(Ether(src=R, dst=T))
    base = len(OUT)
    items = [
        (IN[0], 1, IP(src=far(base, False), dst="10.0.0.1") / UDP(sport=53, dport=5000) / data(7, 6)),
        (IN[0], 2, IPv6(src=far(base, True), dst="2001:db8:a::1") / UDP(sport=53, dport=5000) / data(8, 6)),
        (IN[1], 1, IPv6(src=far(base + 1, True), dst="2001:db8:a::1") / TCP(sport=443, dport=40000) / data(9, 7)),
        (IN[2], 1, IP(src=far(base + 2, False), dst="10.0.0.1") / TCP(sport=443, dport=40000) / data(1400 - 40, 8)),
        (IN[3], 1, IP(src=far(base + 3, False), dst="10.0.0.1") / UDP(sport=53, dport=5000) / data(10, 9)),
    ]
    return [(spec, seq, encrypt_inbound(spec, inner, seq), decapsulated(l2, inner)) for spec, seq, inner in items]


def sa_json(s):
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "key"}
    d = {k: v for k, v in d.items() if v is not None and not (k == "spi_as_int" and not v)}
    d["key"] = s.key.hex()
    return d


def main():
    binary = Path(os.environ.get("BITW_DATAPLANE", DEFAULT_BINARY))
    outs, ins = outbound_frames(), inbound_frames()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for n, frames in (("in-rx", [f for _, _, f in outs]), ("out-rx", [f for _, _, f, _ in ins])):
            write_pcap(d / f"{n}.pcap", frames)
        cfg = d / "kat.toml"
        cfg.write_text(render_config(pcap_device(0, d / "in-rx.pcap", d / "in-tx.pcap"),
                                     pcap_device(1, d / "out-rx.pcap", d / "out-tx.pcap"),
                                     policies(), prefix=unique_prefix("kat-gen"), sas=write_sa_configs(OUT + IN, d)))
        run, s = run_config(binary, cfg, run_for=1.5)
        got_out, got_in = read_pcap(d / "out-tx.pcap"), read_pcap(d / "in-tx.pcap")
    assert len(got_out) == len(outs) and len(got_in) == len(ins), run.describe()
    vectors = []
    for (spec, seq, frame), got in zip(outs, got_out):
        problems = outbound_problems(spec, got, frame, seq)
        assert not problems, (spec.name, problems)
        assert parse_esp_frame(got).seq_lo == seq
        vectors.append(dict(note=f"{spec.name} seq {seq}: {Ether(frame).summary()}", sa=spec.name, direction="out",
                            seq=seq, input=frame.hex(), output=got.hex()))
    for (spec, seq, frame, want), got in zip(ins, got_in):
        assert got == want, spec.name
        vectors.append(dict(note=f"{spec.name} seq {seq}: {Ether(want).summary()}", sa=spec.name, direction="in",
                            seq=seq, input=frame.hex(), output=got.hex()))
    doc = {
        "about": "Known-answer vectors for bitw ESP, made by tests/vectors/make_esp_vectors.py from bitw's "
                 "output and checked with Scapy. Keys are test keys.",
        "sas": [sa_json(s) for s in OUT + IN],
        "policies": policies(),
        "vectors": vectors,
    }
    (HERE / "esp_kat.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(vectors)} vectors to {HERE / 'esp_kat.json'}")


if __name__ == "__main__":
    main()
