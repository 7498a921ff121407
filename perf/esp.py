#!/usr/bin/python3
"""ESP benchmark: bitw-dataplane's encrypt and decrypt rate on one worker, side by side with DPDK's
ipsec-secgw (same core, pcaps and SA; AES-128-GCM) and next to the raw AEAD rate of bitw's own
crypto library on the same core (the per-core limit; intel-ipsec-mb and ring are both measured).

    python3 perf/esp.py                  # 5 rounds x 5 s per case (~13 min)
    python3 perf/esp.py --quick          # smoke: 1 run x 1 s, 64 and 1420 bytes (~35 s), not saved
    python3 perf/esp.py --profile        # also perf-record a few cases and list the hot spots
    python3 perf/esp.py --sizes 64,imix --aeads aes128gcm16 --runs 7

Cases (one worker, cores = [1], tunnel mode IPv4, esn = false):
  encrypt   net_pcap rx_pcap=<IPv4/UDP plaintext>,infinite_rx=1 (inside) -> net_null0,no-rx=1
            (outside); one protect rule out -> SA out 172.16.0.1 -> 172.16.0.2. Rate: esp_encrypted/s
  decrypt   net_pcap rx_pcap=<ESP made by bitw itself>,infinite_rx=1 (outside) -> net_null (inside);
            SA in with replay_window = 0 (the looping capture repeats its sequence numbers) and a
            protect rule in matching the inner packets. Rate: esp_decrypted/s
  replay    decrypt's setup with replay_window = 1024: after the capture's first pass every packet
            is a replay, dropped before any cryptography: the cost of the replay-check path.
            Rate: packets received and checked per second
Frame sizes 64/128/512/1420 bytes incl. FCS (60/124/508/1416 in the pcaps) and IMIX 7:4:1 of
64/594/1518. The raw AEAD rate comes from bitw-aead-bench, run once per round on the same core.
ipsec-secgw (perf/secgw.py: built from Debian's dpdk-doc into target/perf/, crypto_aesni_gcm) runs
every aes128gcm16 encrypt and decrypt case right after bitw in each round (--no-secgw skips it); its
rate is its output port's packets over a --seconds window after --warmup, from EAL telemetry.

Prints a Markdown table; saves JSON and Markdown under perf/results/ (see perf/README.md).
Needs root, DPDK 22.11, cargo, and Scapy (/usr/bin/python3 has it: the script re-runs itself
there if the current interpreter lacks it). Reuses perf/forwarding.py's run machinery.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forwarding as fw  # noqa: E402  (the quiet-machine runner, pcap writer, machine info)
import secgw  # noqa: E402  (DPDK's ipsec-secgw: build, config, run)

ROOT = fw.ROOT
RESULTS = fw.RESULTS

# Frame lengths without the 4-byte FCS (RFC 2544 sizes count it).
SIZES = {
    "64": [60],
    "128": [124],
    "512": [508],
    "1420": [1416],
    # IMIX 7:4:1 of 64/594/1518-byte frames, spread over one 12-frame pattern.
    "imix": [60, 590, 60, 60, 590, 60, 1514, 60, 590, 60, 60, 590],
}
SIZE_ORDER = ["64", "128", "512", "1420", "imix"]
# The libraries bitw can seal with (bitw-aead-bench's names); `dataplane.crypto` picks one.
AEAD_LIBRARIES = ["intel-ipsec-mb", "ring"]
# Frames per pcap: 256 flows (as perf/forwarding.py), or 21 IMIX patterns.
PCAP_FRAMES = {"imix": 252}
DEFAULT_PCAP_FRAMES = 256

AEADS = {
    # bitw name: (key bytes without the 4-byte salt, Scapy's crypt_algo, RustCrypto crate in aead-bench)
    "aes128gcm16": (16, "AES-GCM", "aes-gcm"),
    "aes256gcm16": (32, "AES-GCM", "aes-gcm"),
    "chacha20poly1305": (32, "CHACHA20-POLY1305", "chacha20poly1305"),
}
MAIN_AEAD = "aes128gcm16"

# Addresses. Encrypt: bitw protects LAN -> remote traffic into a tunnel 172.16.0.1 -> .2.
# Decrypt: the peer (bitw itself, in a capture run) protects remote -> LAN traffic into a tunnel
# 172.16.0.2 -> .1; the benchmarked bitw opens it with the matching inbound SA.
LAN, REMOTE = str(fw.SRC_NET), "198.18.0.0/24"
LOCAL_GW, PEER_GW = "172.16.0.1", "172.16.0.2"
SPI_OUT, SPI_IN = 0x1001, 0x2001
REPLAY_WINDOW = 1024

ESP_HDR, IV_LEN, ICV_LEN, OUTER_V4 = 8, 8, 16, 20
COMPARE_SIZES = [64, 128, 256, 512, 1024, 1420, 1500]
DIRECTIONS = ("encrypt", "decrypt", "replay")


def esp_plaintext(frame):
    """ESP plaintext of a frame (without FCS) in tunnel mode: inner IP packet + pad + 2
    (padded to a multiple of 4, no TFC padding), i.e. what the AEAD encrypts."""
    inner = frame - 14
    return inner + 2 + (4 - (inner + 2) % 4) % 4


def esp_frame(frame):
    """The ESP frame on the wire (without FCS): Ethernet, outer IPv4, ESP header, IV, plaintext, ICV."""
    return 14 + OUTER_V4 + ESP_HDR + IV_LEN + esp_plaintext(frame) + ICV_LEN


def size_label(size):
    return "IMIX" if size == "imix" else size


def cyclic_sum(values, n):
    """Sum of the first n items of values repeated forever (net_pcap infinite_rx replays in order)."""
    full, part = divmod(n, len(values))
    return full * sum(values) + sum(values[:part])


# ---------------------------------------------------------------------------- traffic


class Traffic:
    """The pcaps of one frame size: plaintext LAN -> remote (encrypt input), plaintext remote ->
    LAN (what the peer encrypts; decrypt's expected output) and, per AEAD, the ESP capture."""

    def __init__(self, size, tmp):
        self.size = size
        self.pattern = SIZES[size]
        self.count = PCAP_FRAMES.get(size, DEFAULT_PCAP_FRAMES)
        self.frames = [self.pattern[i % len(self.pattern)] for i in range(self.count)]
        fl = fw.flows(self.count)
        self.plain = os.path.join(tmp, "plain-%s.pcap" % size)
        fw.write_pcap(self.plain, fl, self.pattern)
        # The reverse direction: remote -> LAN, ports swapped.
        self.plain_rev = os.path.join(tmp, "plain-rev-%s.pcap" % size)
        fw.write_pcap(self.plain_rev, [(d, s, dp, sp) for s, d, sp, dp in fl], self.pattern)
        self.esp = {}  # aead -> ESP pcap path
        self.inner = [f - 14 for f in self.frames]  # inner IP packet lengths (SA byte counters)

    @property
    def frame_fcs_avg(self):
        return statistics.mean(f + 4 for f in self.pattern)

    @property
    def plaintexts(self):
        return sorted({esp_plaintext(f) for f in self.pattern})

    def describe(self):
        if self.size == "imix":
            return "IMIX 7:4:1 of 64/594/1518 (avg %.1f)" % self.frame_fcs_avg
        return self.size


def read_pcap(path):
    """The frames of a classic pcap file (stdlib only)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack_from("<I", data, 0)[0]
    end = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off, frames = 24, []
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from(end + "IIII", data, off)
        off += 16
        frames.append(data[off:off + incl])
        off += incl
    return frames


def key_file(tmp, name, aead):
    """Random key + salt for one SA, hex, mode 0600 (bitw refuses keys others may read)."""
    material = os.urandom(AEADS[aead][0] + 4)
    path = os.path.join(tmp, "%s-%s.key" % (name, aead))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(material.hex() + "\n")
    return path, material


# ---------------------------------------------------------------------------- configs


def esp_config(path, prefix, core, inside, outside, policy, sa, crypto="auto"):
    """One worker, one protect rule, one SA; everything else as perf/forwarding.py's runs."""
    lines = fw.config_head(prefix, core, inside, outside, default_action="discard",
                           dataplane=[("crypto", crypto)])
    lines += ["", "[[policy]]"] + ["%s = %s" % (k, fw.toml_value(v)) for k, v in policy.items()]
    lines += ["", "[[sa]]"] + ["%s = %s" % (k, fw.toml_value(v)) for k, v in sa.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def out_policy_sa(aead, key):
    """bitw's own outbound direction: LAN -> remote into the tunnel 172.16.0.1 -> .2."""
    policy = {"name": "lan-to-remote", "direction": "out", "src": LAN, "dst": REMOTE, "proto": "udp",
              "action": "protect", "sa": "to-peer"}
    sa = {"name": "to-peer", "direction": "out", "spi": "0x%08x" % SPI_OUT, "mode": "tunnel",
          "tunnel_src": LOCAL_GW, "tunnel_dst": PEER_GW, "aead": aead, "key_file": key, "esn": False}
    return policy, sa


def peer_policy_sa(aead, key):
    """The peer's outbound direction (bitw playing the peer in a capture run): remote -> LAN into
    the tunnel 172.16.0.2 -> .1, SPI SPI_IN."""
    policy = {"name": "remote-to-lan", "direction": "out", "src": REMOTE, "dst": LAN, "proto": "udp",
              "action": "protect", "sa": "peer-out"}
    sa = {"name": "peer-out", "direction": "out", "spi": "0x%08x" % SPI_IN, "mode": "tunnel",
          "tunnel_src": PEER_GW, "tunnel_dst": LOCAL_GW, "aead": aead, "key_file": key, "esn": False}
    return policy, sa


def in_policy_sa(aead, key, window):
    """bitw's inbound direction: ESP from the peer, inner remote -> LAN must match the rule."""
    policy = {"name": "remote-to-lan", "direction": "in", "src": REMOTE, "dst": LAN, "proto": "udp",
              "action": "protect", "sa": "from-peer"}
    sa = {"name": "from-peer", "direction": "in", "spi": "0x%08x" % SPI_IN, "mode": "tunnel",
          "tunnel_src": PEER_GW, "tunnel_dst": LOCAL_GW, "aead": aead, "key_file": key, "esn": False,
          "replay_window": window}
    return policy, sa


# ---------------------------------------------------------------------------- runs


class EspBench(fw.Bench):
    """forwarding.py's Bench (quiet-machine wait, disturbed-run repeats) with ESP runs."""

    def bitw(self, inside, outside, policy, sa, seconds, perf_data=None):
        """Runs bitw once; returns its JSON summary (RuntimeError if it fails)."""
        a = self.args
        cfg = os.path.join(self.tmp, "bitw-%d.toml" % (self.n + 1))
        esp_config(cfg, self.prefix("esp"), a.core, inside, outside, policy, sa, a.crypto)
        cmd = [a.bitw, "--config", cfg, "--run-for", "%g" % seconds]
        if perf_data:
            # -D: start sampling after EAL init and port setup (~0.3 s), so that the profile is
            # the packet loop's.
            cmd = ["perf", "record", "-q", "-F", "1999", "-D", "700", "-o", perf_data, "--"] + cmd
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 180)
        if p.returncode != 0:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, p.stderr[-3000:]))
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise RuntimeError("%s: no JSON summary:\n%s" % (" ".join(cmd), p.stdout[-2000:]))

    def run_case(self, case, tr, keys):
        """One measured run of a case: (direction, aead, size)."""
        direction, aead, _ = case
        a = self.args
        if direction == "encrypt":
            policy, sa = out_policy_sa(aead, keys[aead]["out"])
            inside = "net_pcap0,rx_pcap=%s,infinite_rx=1" % tr.plain
            outside = "net_null0,no-rx=1"
        else:
            window = 0 if direction == "decrypt" else REPLAY_WINDOW
            policy, sa = in_policy_sa(aead, keys[aead]["in"], window)
            inside = "net_null0,no-rx=1"
            outside = "net_pcap0,rx_pcap=%s,infinite_rx=1" % tr.esp[aead]
        s = self.bitw(inside, outside, policy, sa, a.seconds)
        r = check_summary(direction, s, tr, a.seconds)
        r["dpdk"] = s.get("dpdk")
        r["crypto"] = s.get("crypto", "ring")
        return r

    def run_secgw(self, case, tr, keys):
        """One measured ipsec-secgw run of an encrypt or decrypt case of MAIN_AEAD: the same pcaps
        and SA as bitw's (port 0 = LAN side, port 1 = ESP side)."""
        direction, aead, _ = case
        a = self.args
        if direction == "encrypt":
            port0 = "net_pcap0,rx_pcap=%s,infinite_rx=1" % tr.plain
            port1 = "net_null0,no-rx=1"
            in_port, out_port = 0, 1
        else:
            port0 = "net_null0,no-rx=1"
            port1 = "net_pcap0,rx_pcap=%s,infinite_rx=1" % tr.esp[aead]
            in_port, out_port = 1, 0
        r = secgw.run(a.secgw_bin, a.core, fw.EAL_COMMON, self.prefix("secgw"), port0, port1, a.secgw_crypto,
                      self.secgw_cfg, in_port, out_port, a.warmup, a.seconds)
        return r

    def run_aead(self, sizes, runs, millis):
        """bitw-aead-bench once: every run's Mops per (aead, library, bytes), on the same core."""
        a = self.args
        cmd = [a.aead_bench, "--core", str(a.core), "--runs", str(runs), "--millis", str(millis),
               "--sizes", ",".join(str(x) for x in sizes)]
        p = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=len(sizes) * 6 * runs * millis / 1000 * 3 + 60)
        if p.returncode != 0:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, p.stderr[-2000:]))
        rates, problems = {}, []
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                rates["%s/%s/%d" % (d["aead"], d["library"], d["bytes"])] = d["runs"]
        # Per size: ring and RustCrypto for each of the 3 AEADs, intel-ipsec-mb for the 2 AES-GCMs.
        want = len(sizes) * 8
        if len(rates) != want:
            problems.append("aead-bench: %d results, expected %d" % (len(rates), want))
        for k, v in rates.items():
            if len(v) != runs or not all(0.01 < x < 1000 for x in v):
                problems.append("aead-bench %s: %s Mops" % (k, v))
        return {"rates": rates, "problems": problems}


def check_summary(direction, s, tr, seconds):
    """Rates and sanity checks of one measured run from bitw's JSON summary."""
    ports = s["ports"]
    pin, pout = ports["inside"], ports["outside"]
    dur = s["duration_seconds"]
    drops = {k: v for k, v in s["drops"].items() if v}
    enc, dec = s["esp_encrypted"], s["esp_decrypted"]
    hits = sum(w.get("flow_cache_hits", 0) for w in s["workers"])
    misses = sum(w.get("flow_cache_misses", 0) for w in s["workers"])
    sas = s.get("sas", [])
    problems = []

    def want(cond, text):
        if not cond:
            problems.append(text)

    want(len(s["workers"]) == 1, "%d workers" % len(s["workers"]))
    want(dur >= 0.9 * seconds, "duration %.3f s < %.3f s" % (dur, 0.9 * seconds))
    for side, p in (("inside", pin), ("outside", pout)):
        for k in ("rx_missed", "rx_errors", "tx_errors", "rx_nombuf"):
            want(not p.get(k), "%s %s = %s" % (side, k, p.get(k)))
    want(s["tx_packets"] == pin["tx_packets"] + pout["tx_packets"],
         "worker tx %d != port tx %d" % (s["tx_packets"], pin["tx_packets"] + pout["tx_packets"]))
    want(not s.get("bypassed") and not s.get("uninspected") and not s.get("non_ip"),
         "bypassed %s, uninspected %s, non_ip %s" % (s.get("bypassed"), s.get("uninspected"), s.get("non_ip")))
    want(len(sas) == 1, "%d SAs in the summary" % len(sas))
    sa = sas[0] if sas else {}
    lat = s["workers"][0].get("latency", {}) if s["workers"] else {}
    want(lat.get("packets") == s["tx_packets"],
         "latency histogram holds %s packets, %d sent" % (lat.get("packets"), s["tx_packets"]))
    r = {"duration_seconds": dur, "drops": drops, "esp_encrypted": enc, "esp_decrypted": dec,
         "flow_cache_hits": hits, "flow_cache_misses": misses, "sa": sa,
         "latency_ns": {k: lat.get(k + "_ns", 0) for k in ("p50", "p99", "p999", "max")}}
    if direction == "encrypt":
        rx = pin["rx_packets"]
        want(not drops, "drops %s" % drops)
        want(dec == 0 and pout["rx_packets"] == 0 and pin["tx_packets"] == 0,
             "unexpected traffic: decrypted %d, outside rx %d, inside tx %d"
             % (dec, pout["rx_packets"], pin["tx_packets"]))
        want(enc == pout["tx_packets"] == rx,
             "esp_encrypted %d, outside tx %d, inside rx %d: should all be equal" % (enc, pout["tx_packets"], rx))
        want(pin["rx_bytes"] == cyclic_sum(tr.frames, rx),
             "inside rx_bytes %d != %d (the pcap's first %d frames)" % (pin["rx_bytes"], cyclic_sum(tr.frames, rx), rx))
        want(sa.get("direction") == "out" and sa.get("packets") == enc and sa.get("sequence") == enc,
             "SA: %s, esp_encrypted %d" % (sa, enc))
        want(sa.get("bytes") == cyclic_sum(tr.inner, enc),
             "SA bytes %s != %d (inner packets of the first %d frames)" % (sa.get("bytes"), cyclic_sum(tr.inner, enc), enc))
        want(hits + misses == rx, "flow cache hits %d + misses %d != rx %d" % (hits, misses, rx))
        count = enc
    elif direction == "decrypt":
        rx = pout["rx_packets"]
        want(not drops, "drops %s" % drops)
        want(enc == 0 and pin["rx_packets"] == 0 and pout["tx_packets"] == 0,
             "unexpected traffic: encrypted %d, inside rx %d, outside tx %d"
             % (enc, pin["rx_packets"], pout["tx_packets"]))
        want(dec == pin["tx_packets"] == rx,
             "esp_decrypted %d, inside tx %d, outside rx %d: should all be equal" % (dec, pin["tx_packets"], rx))
        want(sa.get("direction") == "in" and sa.get("packets") == dec, "SA: %s, esp_decrypted %d" % (sa, dec))
        want(sa.get("bytes") == cyclic_sum(tr.inner, dec),
             "SA bytes %s != %d (inner packets of the first %d frames)" % (sa.get("bytes"), cyclic_sum(tr.inner, dec), dec))
        want(hits + misses == rx, "flow cache hits %d + misses %d (inner packets) != rx %d" % (hits, misses, rx))
        count = dec
    else:  # replay: the first pass decrypts, every later packet is a replay
        rx = pout["rx_packets"]
        first = min(rx, tr.count)
        other = {k: v for k, v in drops.items() if k != "replay"}
        want(not other, "drops other than replay: %s" % other)
        want(dec == first == pin["tx_packets"] and rx > tr.count,
             "esp_decrypted %d, inside tx %d: expected the capture's %d packets once (rx %d)"
             % (dec, pin["tx_packets"], tr.count, rx))
        want(drops.get("replay", 0) == rx - first,
             "replay drops %d != rx %d - %d" % (drops.get("replay", 0), rx, first))
        want(sa.get("direction") == "in" and sa.get("packets") == dec, "SA: %s, esp_decrypted %d" % (sa, dec))
        count = rx
        r["replay_drops"] = drops.get("replay", 0)
    mpps = count / dur / 1e6
    r.update(mpps_per_worker=mpps, rx_packets=rx, packets=count, problems=problems)
    return r


# ---------------------------------------------------------------------------- preparation


def prepare(bench, traffics, aead_sizes, keys, problems):
    """Per AEAD and size: the ESP capture made by bitw (as the peer), checked with Scapy, and one
    decrypt pass through the benchmarked configuration whose output must equal the plaintext."""
    from scapy.all import IP, Ether
    from scapy.layers.ipsec import ESP, SecurityAssociation

    tmp = bench.tmp
    for aead, sizes in aead_sizes.items():
        for size in sizes:
            tr = traffics[size]
            tag = "%s %s" % (aead, size_label(size))
            esp_pcap = os.path.join(tmp, "esp-%s-%s.pcap" % (aead, size))
            # 1. bitw as the peer encrypts the remote -> LAN plaintext once, captured with tx_pcap.
            policy, sa = peer_policy_sa(aead, keys[aead]["peer"])
            s = bench.bitw("net_pcap0,rx_pcap=%s" % tr.plain_rev, "net_pcap1,tx_pcap=%s" % esp_pcap,
                           policy, sa, 0.5)
            if s["esp_encrypted"] != tr.count or s["ports"]["outside"]["tx_packets"] != tr.count:
                raise SystemExit("%s: capture run encrypted %d of %d frames (summary drops %s)"
                                 % (tag, s["esp_encrypted"], tr.count, {k: v for k, v in s["drops"].items() if v}))
            # 2. Scapy opens every ESP packet: outer header, SPI, sequence, ICV, inner packet.
            plain = read_pcap(tr.plain_rev)
            esp = read_pcap(esp_pcap)
            if len(esp) != tr.count:
                raise SystemExit("%s: capture holds %d packets, expected %d" % (tag, len(esp), tr.count))
            ssa = SecurityAssociation(ESP, spi=SPI_IN, crypt_algo=AEADS[aead][1],
                                      crypt_key=keys[aead]["peer_key"],
                                      tunnel_header=IP(src=PEER_GW, dst=LOCAL_GW))
            for i, (raw, pt) in enumerate(zip(esp, plain)):
                pkt = Ether(raw)
                ip = pkt[IP]
                bad = []
                if len(raw) != esp_frame(len(pt)):
                    bad.append("frame %d bytes, expected %d" % (len(raw), esp_frame(len(pt))))
                if (ip.src, ip.dst, ip.proto, ip.ttl) != (PEER_GW, LOCAL_GW, 50, 64):
                    bad.append("outer header %s" % ip.summary())
                if fw._csum(raw[14:14 + OUTER_V4]) != 0:
                    bad.append("outer IPv4 header checksum")
                if ip[ESP].spi != SPI_IN or ip[ESP].seq != i + 1:
                    bad.append("spi %#x seq %d" % (ip[ESP].spi, ip[ESP].seq))
                try:
                    inner = ssa.decrypt(ip)
                except Exception as e:  # IPSecIntegrityError and anything Scapy raises
                    bad.append("Scapy cannot decrypt it: %s" % e)
                    inner = None
                if inner is not None and bytes(inner) != pt[14:]:
                    bad.append("the inner packet differs from the plaintext")
                if bytes(pkt)[:12] != pt[:12]:
                    bad.append("MAC addresses changed")
                if bad:
                    raise SystemExit("%s: ESP packet %d of bitw's capture: %s" % (tag, i + 1, "; ".join(bad)))
            tr.esp[aead] = esp_pcap
            # 3. The benchmarked inbound configuration decrypts the capture once; its output
            # must be the plaintext, byte for byte.
            out_pcap = os.path.join(tmp, "dec-%s-%s.pcap" % (aead, size))
            policy, sa = in_policy_sa(aead, keys[aead]["in"], 0)
            s = bench.bitw("net_pcap1,tx_pcap=%s" % out_pcap, "net_pcap0,rx_pcap=%s" % esp_pcap,
                           policy, sa, 0.5)
            dec = read_pcap(out_pcap)
            if s["esp_decrypted"] != tr.count or dec != plain:
                raise SystemExit("%s: decrypt check: %d decrypted, %d frames out, %d equal to the plaintext; "
                                 "drops %s" % (tag, s["esp_decrypted"], len(dec),
                                               sum(1 for x, y in zip(dec, plain) if x == y),
                                               {k: v for k, v in s["drops"].items() if v}))
            print("  %-28s capture of %d ESP packets verified with Scapy; decrypts to the plaintext"
                  % (tag, tr.count), file=sys.stderr)


def routed(ip):
    """An IPv4 packet as a router forwards it: TTL - 1, header checksum updated (ipsec-secgw routes;
    bitw is a bump in the wire and keeps the TTL)."""
    hl = (ip[0] & 15) * 4
    h = bytearray(ip[:hl])
    h[8] -= 1
    h[10:12] = b"\0\0"
    c = fw._csum(bytes(h))
    h[10:12] = bytes([c >> 8, c & 255])
    return bytes(h) + ip[hl:]


def prepare_secgw(bench, traffics, sizes, keys):
    """ipsec-secgw gets the same SA: per size, it encrypts the plaintext once (captured with
    tx_pcap), and Scapy must open every packet with bitw's outbound SA (SPI, tunnel, key); and it
    decrypts bitw's ESP capture once, which must give back the inner packets of the plaintext.
    ipsec-secgw is a router: it decrements the inner TTL (and sets its own MACs); bitw does not."""
    from scapy.all import IP, Ether
    from scapy.layers.ipsec import ESP, SecurityAssociation

    a = bench.args
    for size in sizes:
        tr = traffics[size]
        tag = "ipsec-secgw %s" % size_label(size)
        # Encrypt.
        out = os.path.join(bench.tmp, "secgw-enc-%s.pcap" % size)
        secgw.run(a.secgw_bin, a.core, fw.EAL_COMMON, bench.prefix("secgw"), "net_pcap0,rx_pcap=%s" % tr.plain,
                  "net_pcap1,tx_pcap=%s" % out, a.secgw_crypto, bench.secgw_cfg, 0, 1, 0, 1.0, measure=False)
        plain, esp = read_pcap(tr.plain), read_pcap(out)
        ssa = SecurityAssociation(ESP, spi=SPI_OUT, crypt_algo=AEADS[MAIN_AEAD][1],
                                  crypt_key=keys[MAIN_AEAD]["out_key"],
                                  tunnel_header=IP(src=LOCAL_GW, dst=PEER_GW))
        if len(esp) != tr.count:
            raise SystemExit("%s: encrypted %d of %d frames" % (tag, len(esp), tr.count))
        for i, (raw, pt) in enumerate(zip(esp, plain)):
            ip = Ether(raw)[IP]
            bad = []
            if (ip.src, ip.dst, ip.proto) != (LOCAL_GW, PEER_GW, 50) or ip[ESP].spi != SPI_OUT:
                bad.append("outer header %s" % ip.summary())
            try:
                inner = bytes(ssa.decrypt(ip))
            except Exception as e:  # IPSecIntegrityError and anything Scapy raises
                bad.append("Scapy cannot decrypt it with bitw's SA: %s" % e)
                inner = None
            if inner is not None and inner != routed(pt[14:]):
                bad.append("the inner packet differs from the plaintext (with TTL - 1)")
            if bad:
                raise SystemExit("%s: ESP packet %d: %s" % (tag, i + 1, "; ".join(bad)))
        # Decrypt bitw's ESP capture.
        out = os.path.join(bench.tmp, "secgw-dec-%s.pcap" % size)
        secgw.run(a.secgw_bin, a.core, fw.EAL_COMMON, bench.prefix("secgw"), "net_pcap1,tx_pcap=%s" % out,
                  "net_pcap0,rx_pcap=%s" % tr.esp[MAIN_AEAD], a.secgw_crypto, bench.secgw_cfg, 1, 0, 0, 1.0,
                  measure=False)
        dec, plain = read_pcap(out), read_pcap(tr.plain_rev)
        same = sum(1 for x, y in zip(dec, plain) if x[14:] == routed(y[14:]))
        if len(dec) != tr.count or same != tr.count:
            raise SystemExit("%s: decrypted %d of %d ESP packets of bitw's, %d equal to the plaintext's IP packets (TTL - 1)"
                             % (tag, len(dec), tr.count, same))
        print("  %-28s encrypts into ESP that Scapy opens with bitw's SA; decrypts bitw's ESP to the plaintext"
              % tag, file=sys.stderr)


# ---------------------------------------------------------------------------- profile


def _category(dso, kind, sym):
    if kind == "k":
        return "kernel"
    if "ring" in sym and ("ring::" in sym or sym.startswith("ring_core")):
        return "AEAD (ring)"
    if "IPSec_MB" in dso:
        return "AEAD (intel-ipsec-mb)"
    if "net_pcap" in dso:
        return "PMD net_pcap (RX: copy from the capture)"
    if "net_null" in dso:
        return "PMD net_null"
    if dso.startswith("librte"):
        return "DPDK other (mbuf, mempool)"
    if "::esp::" in sym:
        return "bitw esp (headers, trailer, moves)"
    if "::wire::" in sym or "::filter::" in sym:
        return "bitw parse + classify"
    if "bitw" in sym or "bitw" in dso:
        return "bitw other (worker loop, burst, SA)"
    if dso.startswith("libc"):
        return "libc (memmove, memcpy)"
    return "other"


def profile(bench, cases, traffics, keys, seconds):
    """perf record of one bitw run per case; the hottest symbols and a breakdown by category."""
    out = {}
    for case in cases:
        direction, aead, size = case
        tr = traffics[size]
        data = os.path.join(bench.tmp, "perf-%s-%s-%s.data" % case)
        if direction == "encrypt":
            policy, sa = out_policy_sa(aead, keys[aead]["out"])
            vdevs = ("net_pcap0,rx_pcap=%s,infinite_rx=1" % tr.plain, "net_null0,no-rx=1")
        else:
            policy, sa = in_policy_sa(aead, keys[aead]["in"], 0 if direction == "decrypt" else REPLAY_WINDOW)
            vdevs = ("net_null0,no-rx=1", "net_pcap0,rx_pcap=%s,infinite_rx=1" % tr.esp[aead])
        bench.wait_quiet()
        s = bench.bitw(vdevs[0], vdevs[1], policy, sa, seconds, perf_data=data)
        rate = (s["esp_encrypted"] if direction == "encrypt" else s["esp_decrypted"]) / s["duration_seconds"] / 1e6
        p = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym",
                            "--percent-limit", "0"], capture_output=True, text=True)
        rows = []
        for line in p.stdout.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*\S)", line)
            if m:
                rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4)))
        cats = {}
        for pct, dso, kind, sym in rows:
            c = _category(dso, kind, sym)
            cats[c] = cats.get(c, 0) + pct
        key = "%s %s %s" % (direction, aead, size_label(size))
        out[key] = {"mpps_under_perf": rate, "top": [{"percent": pct, "dso": dso, "symbol": sym}
                                                    for pct, dso, _, sym in rows[:14]],
                    "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]))}
        print("  profiled %s (%.2f Mpps under perf)" % (key, rate), file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- report


def bitw_library(aead, crypto):
    """The aead-bench library name of what bitw used for this AEAD: its summary's `crypto`
    ("intel-ipsec-mb 1.3.0 (avx512, VAES)" or "ring"); ChaCha20-Poly1305 is always ring."""
    if aead != "chacha20poly1305" and crypto.startswith("intel-ipsec-mb"):
        return "intel-ipsec-mb"
    return "ring"


def aead_limit(rates, aead, tr, lib):
    """The Mops of `lib` (bitw's own backend) for this traffic: per frame of the pattern, the rate
    at its ESP plaintext size; for a mix, frames per second if every frame cost 1/rate (the
    harmonic mean)."""
    per = [rates.get("%s/%s/%d" % (aead, lib, esp_plaintext(f))) for f in tr.pattern]
    if any(x is None for x in per):
        return None
    return len(per) / sum(1 / x for x in per)


def fmt_limit(c):
    if not c.get("aead_mops"):
        return "–"
    lo, hi = c["aead_mops_min_max"]
    if lo == hi:
        return "%.2f" % c["aead_mops"]
    return "%.2f (%.2f–%.2f)" % (c["aead_mops"], lo, hi)


def fmt(s, digits=2):
    if len(s["runs"]) == 1:
        return "%.*f" % (digits, s["median"])
    return "%.*f (%.*f–%.*f)" % (digits, s["median"], digits, s["min"], digits, s["max"])


def render(res):
    a = res["args"]
    m = res["machine"]
    out = ["# bitw ESP benchmark — %s" % res["date"], ""]
    out.append(
        "One worker (CPU %d), tunnel mode IPv4 (%s → %s), `esn = false`, one protect rule and one SA. "
        "Median of %d run(s) of %g s per case (min–max in brackets), cases interleaved round by round. "
        "**Mpps** = ESP packets encrypted (`esp_encrypted`) or decrypted (`esp_decrypted`) per second "
        "of `duration_seconds`; **Gbps** = the plaintext frames' bits per second, frames counted with "
        "their 4-byte FCS (RFC 2544); **ESP plaintext** = inner IP packet + padding + 2 bytes, what the "
        "AEAD encrypts; **AEAD limit** = bitw's own AEAD library (column *lib*: intel-ipsec-mb for AES-GCM "
        "with `dataplane.crypto = \"auto\"`, ring for ChaCha20-Poly1305) sealing that many bytes on the same core "
        "(bitw-aead-bench, median (min–max) of all its runs in all rounds; for IMIX the mix's harmonic "
        "rate); **%% of limit** = bitw Mpps / AEAD Mops (medians); **latency** = per-packet time through "
        "bitw's worker from the RX burst that received a packet to the TX burst that sent it (the worker's "
        "HdrHistogram over the whole run, median over runs), at the saturated rate of the row."
        % (a["core"], LOCAL_GW, PEER_GW, a["runs"], a["seconds"])
    )
    out.append("")
    sg_on = a.get("secgw")
    if sg_on:
        out.append(
            "**ipsec-secgw** = %s's `examples/ipsec-secgw` (Debian's dpdk-doc, built against the installed "
            "libdpdk) with crypto %s, run right after bitw in every round on the same core, the same pcaps "
            "and the same SA (SPIs, tunnel, key and salt; its replay window off, as bitw's in decrypt): "
            "packets sent on the output port per second, from its port counters (EAL telemetry "
            "`/ethdev/stats`) over a %g-s window after %g s of traffic; **bitw / secgw** = ratio of the "
            "medians." % (res["machine"]["dpdk"], a["secgw_crypto"], a["seconds"], a["warmup"]))
        out.append("")
    sg_head = " ipsec-secgw Mpps | bitw / secgw |" if sg_on else ""
    out.append("| AEAD | Direction | Frame bytes (incl. FCS) | ESP plaintext bytes | ESP frame bytes (incl. FCS) | bitw Mpps |"
               + sg_head + " Gbps (plaintext) | ns/pkt | lib | AEAD limit Mops | % of limit | latency µs p50 / p99 / p99.9 |")
    out.append("|---|---|---|---:|---:|---:|" + ("---:|---:|" if sg_on else "") + "---:|---:|---|---:|---:|---:|")

    def sg_cols(c):
        if not sg_on:
            return ""
        if "secgw_mpps" in c:
            return " %s | **%.2f** |" % (fmt(c["secgw_mpps"]), c["bitw_vs_secgw"])
        if "secgw_failed" in c:
            return " failed: %s | |" % c["secgw_failed"]
        return " – | – |"
    def order(c):
        return list(AEADS).index(c["aead"]), SIZE_ORDER.index(c["size"]), DIRECTIONS.index(c["direction"])

    for c in sorted(res["cases"], key=order):
        if c["direction"] == "replay":
            continue
        tr_desc = c["frame_desc"]
        if "failed" in c:
            out.append("| %s | %s | %s | | | failed: %s |%s | | | | | |" % (c["aead"], c["direction"], tr_desc, c["failed"],
                                                                        " | |" if sg_on else ""))
            continue
        lat = c.get("latency_us")
        lat = "%.1f / %.1f / %.1f" % (lat["p50"], lat["p99"], lat["p999"]) if lat else "–"
        out.append("| %s | %s | %s | %s | %s | %s |%s %.2f | %.1f | %s | %s | **%s** | %s |" % (
            c["aead"], c["direction"], tr_desc, c["esp_plaintext"], c["esp_frame"], fmt(c["mpps"]),
            sg_cols(c), c["gbps"], c["ns_per_packet"], c.get("aead_library", "?"),
            fmt_limit(c),
            "%.0f %%" % (100 * c["pct_of_limit"]) if c.get("pct_of_limit") else "–", lat))
    out.append("")
    replay = [c for c in res["cases"] if c["direction"] == "replay"]
    if replay:
        out.append(
            "**Replay window on** (`replay_window = %d`, otherwise the decrypt setup). The capture "
            "loops, so after its first pass (%s packets, decrypted and delivered) every packet "
            "repeats a sequence number the window has seen and is dropped as `replay` **before any "
            "cryptography**: these rates measure the path up to the replay check (RX, parse, SPI "
            "lookup, window check, free), not decryption. Mpps = ESP packets received and checked "
            "per second." % (REPLAY_WINDOW, "/".join(sorted({str(c["capture_packets"]) for c in replay})))
        )
        out.append("")
        out.append("| AEAD | Frame bytes (incl. FCS) | packets checked Mpps | ns/pkt | decrypted (first pass) | "
                   "dropped as replay (median run) | vs decrypt (window off) |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for c in replay:
            if "failed" in c:
                out.append("| %s | %s | failed: %s | | | | |" % (c["aead"], c["frame_desc"], c["failed"]))
                continue
            dec = next((d for d in res["cases"] if d["direction"] == "decrypt" and d["aead"] == c["aead"]
                        and d["size"] == c["size"] and "mpps" in d), None)
            out.append("| %s | %s | %s | %.1f | %s | %s | %s |" % (
                c["aead"], c["frame_desc"], fmt(c["mpps"]), c["ns_per_packet"], fw._n(c["decrypted_first_pass"]),
                fw._n(c["replay_drops_median"]),
                "%.2f×" % (c["mpps"]["median"] / dec["mpps"]["median"]) if dec else "–"))
        out.append("")
    cmp_ = res.get("aead_compare") or []
    if cmp_:
        out.append(
            "Raw AEAD seal on CPU %d (bitw-aead-bench: 8-byte AAD, in place, a new nonce per call; "
            "median of %d run(s) of %d ms per case: %d per round), Mops (Gbit/s of plaintext): the two "
            "backends bitw can use (`dataplane.crypto`: intel-ipsec-mb through bitw's own wrapper, "
            "AES-GCM only; ring) and, for reference, the RustCrypto crates (`aes-gcm` 0.10, "
            "`chacha20poly1305` 0.10)."
            % (a["core"], a["runs"] * a["aead_runs"], a["aead_millis"], a["aead_runs"])
        )
        out.append("")
        libs = AEAD_LIBRARIES + ["rustcrypto"]
        out.append("| AEAD | bytes | " + " | ".join(libs) + " | intel-ipsec-mb / ring |")
        out.append("|---|---:|" + "---:|" * (len(libs) + 1))
        for r in cmp_:
            cells = ["%.2f (%.1f)" % (r[l], r[l] * r["bytes"] * 8 / 1e3) if l in r else "–" for l in libs]
            ratio = "%.2f×" % (r["intel-ipsec-mb"] / r["ring"]) if "intel-ipsec-mb" in r and "ring" in r else "–"
            out.append("| %s | %d | %s | %s |" % (r["aead"], r["bytes"], " | ".join(cells), ratio))
        out.append("")
    prof = res.get("profile") or {}
    if prof:
        out.append("Profile (`perf record -F 1999 -D 700` of one %g-s bitw run per case, sampling from 0.7 s "
                   "on, after start-up; self time by symbol; these runs are not counted above):"
                   % a["profile_seconds"])
        out.append("")
        cats = []
        for p in prof.values():
            for c in p["categories"]:
                if c not in cats:
                    cats.append(c)
        out.append("| Case | Mpps under perf | " + " | ".join(cats) + " |")
        out.append("|---|---:|" + "---:|" * len(cats))
        for k, p in prof.items():
            out.append("| %s | %.2f | %s |" % (k, p["mpps_under_perf"], " | ".join(
                "%.1f %%" % p["categories"].get(c, 0) for c in cats)))
        out.append("")
        for k, p in prof.items():
            out.append("- %s: %s" % (k, "; ".join("%s %.1f %%" % (t["symbol"], t["percent"])
                                                  for t in p["top"][:10])))
        out.append("")
    if res.get("problems"):
        out.append("Problems seen (those runs are still counted):")
        out.append("")
        for p in res["problems"]:
            out.append("- " + p)
        out.append("")
    out.append(
        "Machine: %s, %s CPUs, %s MHz, kernel %s; %s (Debian package %s); bitw commit %s%s. "
        "Load average before / after: %s / %s. Runs repeated because other processes were busy: %d; "
        "runs kept although disturbed: %d."
        % (m["cpu_model"], m["cpus"], m["cpu_mhz"], m["kernel"], m["dpdk"], m["dpdk_package"],
           m["git_commit"], fw._dirty_note(m), res["loadavg_before"], res["loadavg_after"],
           res["repeated_runs"], res["disturbed_runs"])
    )
    out.append("")
    out.append(
        "Method: bitw-dataplane `--run-for %g`, `workers = 1`, `cores = [%d]`, burst %d, %d rx/tx descriptors, "
        "%d mbufs, EAL `%s`. Encrypt: `net_pcap0,rx_pcap=<plaintext>,infinite_rx=1` inside, `net_null0,no-rx=1` "
        "outside. Decrypt: the ESP capture replayed outside, `net_null0,no-rx=1` inside; the capture is made "
        "by bitw itself (as the peer, SPI %#x, tunnel %s → %s) from the reverse plaintext, every packet "
        "opened with Scapy, and decrypted once by the benchmarked configuration into exactly the plaintext. "
        "Plaintext: IPv4/UDP, %d frames per pcap (%d flows), IMIX %d (21 × the 12-frame pattern). Each run "
        "checks its counters: no drops (replay runs: only `replay`, after one clean pass), "
        "esp_encrypted = tx = rx (decrypt: esp_decrypted = tx = rx), the SA's packet and byte counters, "
        "and flow-cache hits + misses = rx. A run during which other processes used more than %.2f CPU is "
        "repeated (up to %d times). Command: `%s`."
        % (a["seconds"], a["core"], fw.BURST, fw.DESCRIPTORS, fw.MBUFS, " ".join(fw.EAL_COMMON), SPI_IN,
           PEER_GW, LOCAL_GW, DEFAULT_PCAP_FRAMES, DEFAULT_PCAP_FRAMES, PCAP_FRAMES["imix"],
           a["max_others"], a["retries"], res["command"])
    )
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def ensure_scapy():
    """Scapy lives in Debian's python3 (/usr/bin/python3); re-run there if this one lacks it."""
    try:
        import scapy.layers.ipsec  # noqa: F401
        return
    except ImportError:
        pass
    sysp = "/usr/bin/python3"
    if os.path.exists(sysp) and os.path.realpath(sys.executable) != os.path.realpath(sysp) \
            and not os.environ.get("BITW_ESP_REEXEC"):
        os.environ["BITW_ESP_REEXEC"] = "1"
        print("(Scapy not in %s: running under %s)" % (sys.executable, sysp), file=sys.stderr)
        os.execv(sysp, [sysp, os.path.abspath(__file__)] + sys.argv[1:])
    raise SystemExit("Scapy not found (apt-get install python3-scapy; run with /usr/bin/python3)")


def parse_sizes(text, ap):
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        if not x:
            continue
        if x not in SIZES:
            ap.error("sizes: some of %s" % ", ".join(SIZE_ORDER))
        if x not in out:
            out.append(x)
    return [x for x in SIZE_ORDER if x in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="rounds: runs per case (default 5)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke: 1 run x 1 s, sizes 64,1420 (other AEADs: 64), short AEAD runs; not saved")
    ap.add_argument("--sizes", default=None, help="frame sizes of %s: some of %s (default all)"
                    % (MAIN_AEAD, ",".join(SIZE_ORDER)))
    ap.add_argument("--aeads", default=",".join(AEADS), help="default: all three")
    ap.add_argument("--other-sizes", default=None,
                    help="frame sizes of the other AEADs (default 64,1420; --quick: 64)")
    ap.add_argument("--no-replay", action="store_true", help="skip the replay-window-on runs")
    ap.add_argument("--crypto", default="auto", choices=["auto", "intel-ipsec-mb", "ring"],
                    help="bitw's dataplane.crypto (default auto: intel-ipsec-mb where it runs)")
    ap.add_argument("--no-secgw", dest="secgw", action="store_false",
                    help="skip DPDK's ipsec-secgw (by default it runs every %s encrypt and decrypt case "
                         "beside bitw)" % MAIN_AEAD)
    ap.add_argument("--secgw-crypto", default=None,
                    help="ipsec-secgw's crypto vdev (default: crypto_aesni_gcm0 from intel-ipsec-mb if DPDK "
                         "has it, else crypto_openssl0)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="ipsec-secgw: seconds of traffic before its counting window (default 1; --quick: 0.5)")
    ap.add_argument("--aead-runs", type=int, default=None,
                    help="bitw-aead-bench runs per case and round (default 3; --quick: 1)")
    ap.add_argument("--aead-millis", type=int, default=None,
                    help="bitw-aead-bench milliseconds per run (default 100)")
    ap.add_argument("--profile", action="store_true",
                    help="after the measurements, perf-record encrypt and decrypt of %s at --profile-sizes"
                         % MAIN_AEAD)
    ap.add_argument("--profile-sizes", default="64,1420")
    ap.add_argument("--profile-seconds", type=float, default=3.0)
    ap.add_argument("--core", type=int, default=1, help="CPU of the worker (default 1)")
    ap.add_argument("--max-others", type=float, default=0.15,
                    help="repeat a run if other processes used more CPUs than this meanwhile (default 0.15)")
    ap.add_argument("--retries", type=int, default=2, help="repeats of a disturbed run (default 2)")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait for other processes to calm down before each run (default 60)")
    ap.add_argument("--bitw", default=os.environ.get("BITW_DATAPLANE", os.path.join(ROOT, "target/release/bitw-dataplane")))
    ap.add_argument("--aead-bench", default=os.environ.get("BITW_AEAD_BENCH",
                                                           os.path.join(ROOT, "target/release/bitw-aead-bench")))
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (pcaps, configs, keys, perf data) and print its path")
    ap.add_argument("--no-build", action="store_true",
                    help="do not run cargo build --release -p bitw-dataplane -p bitw-aead-bench first")
    ap.add_argument("--save", dest="save", action="store_true", default=None,
                    help="save results under perf/results/ (default unless --quick)")
    ap.add_argument("--no-save", dest="save", action="store_false")
    ap.add_argument("--json-out", default=None, metavar="PATH",
                    help="also write the results (the JSON that --save keeps) to PATH (for tests)")
    args = ap.parse_args()
    ensure_scapy()
    if args.quick:
        args.runs, args.seconds = 1, 1.0
        args.quiet_wait, args.retries = min(args.quiet_wait, 5), 0
        args.sizes = args.sizes or "64,1420"
        args.other_sizes = args.other_sizes or "64"
        args.aead_millis = args.aead_millis or 100
        args.aead_runs = args.aead_runs or 1
        args.warmup = 0.5 if args.warmup is None else args.warmup
        if args.save is None:
            args.save = False
    elif args.save is None:
        args.save = True
    args.aead_millis = args.aead_millis or 100
    args.aead_runs = args.aead_runs or 3
    args.warmup = 1.0 if args.warmup is None else args.warmup
    if args.runs < 1 or args.seconds <= 0:
        ap.error("--runs and --seconds must be positive")
    sizes = parse_sizes(args.sizes or ",".join(SIZE_ORDER), ap)
    other_sizes = parse_sizes(args.other_sizes or "64,1420", ap)
    aeads = [x.strip() for x in args.aeads.split(",") if x.strip()]
    if not aeads or not set(aeads) <= set(AEADS):
        ap.error("--aeads: some of %s" % ", ".join(AEADS))
    aeads = [x for x in AEADS if x in aeads]
    prof_sizes = parse_sizes(args.profile_sizes, ap) if args.profile else []
    if os.geteuid() != 0:
        print("warning: not root; DPDK usually needs root", file=sys.stderr)
    if args.profile and not shutil.which("perf"):
        raise SystemExit("--profile needs perf (apt-get install linux-perf)")

    # The cases, in the order of one round: per size, every direction and AEAD (interleaved).
    cases = []
    for size in SIZE_ORDER:
        for aead in aeads:
            if size not in (sizes if aead == MAIN_AEAD else other_sizes):
                continue
            cases.append(("encrypt", aead, size))
            cases.append(("decrypt", aead, size))
            if aead == MAIN_AEAD and not args.no_replay:
                cases.append(("replay", aead, size))
    if not cases:
        ap.error("no case to run (check --aeads and --sizes)")
    aead_sizes = {}
    for _, aead, size in cases:
        aead_sizes.setdefault(aead, [])
        if size not in aead_sizes[aead]:
            aead_sizes[aead].append(size)

    git_info = fw.git_state()
    fw.build(["bitw-dataplane", "bitw-aead-bench"], args.no_build, [args.bitw, args.aead_bench])
    secgw_desc = None
    if args.secgw:
        if MAIN_AEAD not in aeads:
            ap.error("ipsec-secgw runs %s only: add it to --aeads or give --no-secgw" % MAIN_AEAD)
        try:
            args.secgw_bin = secgw.build(os.path.join(ROOT, "target", "perf"),
                                         log=lambda m: print(m, file=sys.stderr))
            if args.secgw_crypto:
                secgw_desc = args.secgw_crypto
            else:
                args.secgw_crypto, secgw_desc = secgw.crypto_vdev()
        except RuntimeError as e:
            raise SystemExit("ipsec-secgw: %s" % e)
        print("== ipsec-secgw: %s, crypto %s" % (args.secgw_bin, secgw_desc), file=sys.stderr)

    command = " ".join(["python3 perf/esp.py"] + sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="bitw-esp-")
    problems = []
    try:
        # One pair of binaries for the whole benchmark, even if someone rebuilds meanwhile.
        for attr, name in (("bitw", "bitw-dataplane"), ("aead_bench", "bitw-aead-bench")):
            snap = os.path.join(tmp, name)
            shutil.copy2(getattr(args, attr), snap)
            setattr(args, attr, snap)
        bench = EspBench(args, tmp)
        traffics = {size: Traffic(size, tmp) for size in SIZE_ORDER if any(size in v for v in aead_sizes.values())}
        keys = {}
        for aead in aeads:
            out_key, out_material = key_file(tmp, "to-peer", aead)
            peer_key, material = key_file(tmp, "peer", aead)
            # The inbound SA uses the peer's key: same file, same material.
            keys[aead] = {"out": out_key, "peer": peer_key, "in": peer_key, "peer_key": material,
                          "out_key": out_material}
        if args.secgw:
            # ipsec-secgw gets bitw's SAs: same SPIs, tunnel endpoints, keys and salts.
            bench.secgw_cfg = os.path.join(tmp, "secgw.cfg")
            secgw.write_config(bench.secgw_cfg, LAN, REMOTE, LOCAL_GW, PEER_GW, SPI_OUT, SPI_IN,
                               keys[MAIN_AEAD]["out_key"], keys[MAIN_AEAD]["peer_key"])

        print("== preparing: ESP captures made by bitw, checked with Scapy", file=sys.stderr)
        prepare(bench, traffics, aead_sizes, keys, problems)
        if args.secgw:
            try:
                prepare_secgw(bench, traffics, aead_sizes[MAIN_AEAD], keys)
            except RuntimeError as e:
                raise SystemExit("ipsec-secgw check run failed: %s" % e)

        plaintexts = sorted({esp_plaintext(f) for t in traffics.values() for f in t.pattern})
        compare = [64, 1500] if args.quick else COMPARE_SIZES
        aead_sizes_all = sorted(set(plaintexts) | set(compare))

        res = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "args": {"runs": args.runs, "seconds": args.seconds, "core": args.core, "quick": args.quick,
                     "sizes": sizes, "other_sizes": other_sizes, "aeads": aeads, "replay": not args.no_replay,
                     "aead_runs": args.aead_runs, "aead_millis": args.aead_millis, "aead_sizes": aead_sizes_all,
                     "profile_seconds": args.profile_seconds, "burst": fw.BURST,
                     "descriptors": fw.DESCRIPTORS, "mbufs": fw.MBUFS, "max_others": args.max_others,
                     "retries": args.retries, "eal": fw.EAL_COMMON,
                     "replay_window": REPLAY_WINDOW, "tunnel": [LOCAL_GW, PEER_GW],
                     "secgw": args.secgw, "secgw_crypto": secgw_desc, "warmup": args.warmup},
            "loadavg_before": " ".join(open("/proc/loadavg").read().split()[:3]),
        }
        attempts = 0
        runs = {c: [] for c in cases}
        # One round: per size, bitw's cases, then ipsec-secgw's encrypt and decrypt of that size.
        schedule = []
        for case in cases:
            schedule.append(("bitw", case))
            if args.secgw and case[0] == "decrypt" and case[1] == MAIN_AEAD:
                schedule += [("secgw", ("encrypt", MAIN_AEAD, case[2])), ("secgw", case)]
        sg_runs = {c: [] for s_, c in schedule if s_ == "secgw"}
        sg_failed = {}
        aead_runs = []
        failed = {}
        dpdk_version = None

        def note(tag, r):
            nonlocal attempts
            attempts += r.get("attempt", 1) - 1
            for p in r["problems"]:
                problems.append("%s: %s" % (tag, p))

        for i in range(args.runs):
            tag = "round %d/%d aead-bench" % (i + 1, args.runs)
            try:
                r = bench.measure(tag, bench.run_aead, aead_sizes_all, args.aead_runs, args.aead_millis)
                note(tag, r)
                aead_runs.append(r)
                print("  %-40s %d results, ring %s at %d bytes: %.2f Mops" % (
                    tag, len(r["rates"]), MAIN_AEAD, plaintexts[0],
                    statistics.median(r["rates"].get("%s/ring/%d" % (MAIN_AEAD, plaintexts[0]), [0]))),
                    file=sys.stderr)
            except RuntimeError as e:
                problems.append("%s failed: %s" % (tag, str(e).splitlines()[0]))
                print("  %s FAILED: %s" % (tag, e), file=sys.stderr)
            for system, case in schedule:
                direction, aead, size = case
                if system == "secgw":
                    if case in sg_failed:
                        continue
                    tag = "round %d/%d ipsec-secgw %s %s" % (i + 1, args.runs, direction, size_label(size))
                    try:
                        r = bench.measure(tag, bench.run_secgw, case, traffics[size], keys)
                    except RuntimeError as e:
                        sg_failed[case] = str(e).splitlines()[0]
                        problems.append("%s failed: %s" % (tag, sg_failed[case]))
                        print("  %s FAILED: %s" % (tag, e), file=sys.stderr)
                        continue
                    note(tag, r)
                    extra = " (others %.2f CPU)" % r["others_cpu"] if r.get("others_cpu", 0) > 0.05 else ""
                    flag = "  PROBLEM: " + "; ".join(r["problems"]) if r["problems"] else ""
                    print("  %-40s %8.3f Mpps%s%s" % (tag, r["mpps_per_worker"], extra, flag), file=sys.stderr)
                    sg_runs[case].append(r)
                    continue
                if case in failed:
                    continue
                tag = "round %d/%d %s %s %s" % (i + 1, args.runs, direction, aead, size_label(size))
                try:
                    r = bench.measure(tag, bench.run_case, case, traffics[size], keys)
                except RuntimeError as e:
                    lines = [x for x in str(e).splitlines() if x.startswith(("error", "bitw-dataplane:"))]
                    failed[case] = "; ".join(lines[-3:]) or str(e).splitlines()[0]
                    problems.append("%s: bitw failed: %s" % (tag, failed[case]))
                    print("  %s FAILED: %s" % (tag, e), file=sys.stderr)
                    continue
                dpdk_version = dpdk_version or r.get("dpdk")
                note(tag, r)
                extra = " (others %.2f CPU)" % r["others_cpu"] if r.get("others_cpu", 0) > 0.05 else ""
                flag = "  PROBLEM: " + "; ".join(r["problems"]) if r["problems"] else ""
                print("  %-40s %8.3f Mpps%s%s" % (tag, r["mpps_per_worker"], extra, flag), file=sys.stderr)
                runs[case].append(r)

        # AEAD: the median of every run of every round (a short disturbance spoils one run, not a round).
        keys_all = sorted({k for r in aead_runs for k in r["rates"]})
        res["aead"] = {k: fw.summarise([x for r in aead_runs for x in r["rates"].get(k, [])]) for k in keys_all}
        aead_med = {k: v["median"] for k, v in res["aead"].items()}
        res["aead_compare"] = []
        for aead in AEADS:
            for b in compare:
                row = {"aead": aead, "bytes": b}
                for lib in AEAD_LIBRARIES + [AEADS[aead][2]]:
                    m = aead_med.get("%s/%s/%d" % (aead, lib, b))
                    if m:
                        row["rustcrypto" if lib == AEADS[aead][2] else lib] = m
                if len(row) > 2:
                    res["aead_compare"].append(row)

        insane = []
        out_cases = []
        for case in cases:
            direction, aead, size = case
            tr = traffics[size]
            c = {"direction": direction, "aead": aead, "size": size, "frame_desc": tr.describe(),
                 "frames_without_fcs": tr.pattern, "capture_packets": tr.count,
                 "esp_plaintext": "/".join(str(x) for x in tr.plaintexts) if size != "imix"
                 else "%s (mix)" % "/".join(str(esp_plaintext(f)) for f in (60, 590, 1514)),
                 "esp_frame": str(esp_frame(tr.pattern[0]) + 4) if size != "imix"
                 else "%s" % "/".join(str(esp_frame(f) + 4) for f in (60, 590, 1514)),
                 "raw": runs[case]}
            if case in failed or not runs[case]:
                c["failed"] = failed.get(case, "no run")
                insane.append("%s %s %s: %s" % (direction, aead, size_label(size), c["failed"]))
                out_cases.append(c)
                continue
            sm = fw.summarise([r["mpps_per_worker"] for r in runs[case]])
            c["mpps"] = sm
            c["ns_per_packet"] = 1e3 / sm["median"]
            # Latency quantiles: the median over runs of each run's whole-run quantile.
            c["latency_us"] = {q: statistics.median(r["latency_ns"][q] for r in runs[case]) / 1e3
                               for q in ("p50", "p99", "p999", "max")}
            c["gbps"] = sm["median"] * tr.frame_fcs_avg * 8 / 1e3
            c["esp_gbps"] = sm["median"] * statistics.mean(esp_frame(f) + 4 for f in tr.pattern) * 8 / 1e3
            if direction == "replay":
                c["decrypted_first_pass"] = statistics.median(r["esp_decrypted"] for r in runs[case])
                c["replay_drops_median"] = statistics.median(r["replay_drops"] for r in runs[case])
            else:
                lib = bitw_library(aead, runs[case][0].get("crypto", "ring"))
                c["crypto"] = runs[case][0].get("crypto", "ring")
                c["aead_library"] = lib
                lim = aead_limit(aead_med, aead, tr, lib)
                c["aead_mops"] = lim
                c["aead_mops_min_max"] = [aead_limit({k: v["min"] for k, v in res["aead"].items()}, aead, tr, lib),
                                          aead_limit({k: v["max"] for k, v in res["aead"].items()}, aead, tr, lib)]
                c["pct_of_limit"] = sm["median"] / lim if lim else None
                if lim is None:
                    insane.append("%s %s %s: no AEAD figure" % (direction, aead, size_label(size)))
                elif not 0.01 < c["pct_of_limit"] < 1.3:
                    insane.append("%s %s %s: %.0f %% of the AEAD limit"
                                  % (direction, aead, size_label(size), 100 * c["pct_of_limit"]))
            if not 0.05 < sm["median"] < 200:
                insane.append("%s %s %s: %.3f Mpps" % (direction, aead, size_label(size), sm["median"]))
            if case in sg_runs:
                c["secgw_raw"] = sg_runs[case]
                if case in sg_failed or not sg_runs[case]:
                    c["secgw_failed"] = sg_failed.get(case, "no run")
                    insane.append("ipsec-secgw %s %s: %s" % (direction, size_label(size), c["secgw_failed"]))
                else:
                    sg = fw.summarise([r["mpps_per_worker"] for r in sg_runs[case]])
                    c["secgw_mpps"] = sg
                    c["bitw_vs_secgw"] = sm["median"] / sg["median"]
                    if not 0.05 < sg["median"] < 200:
                        insane.append("ipsec-secgw %s %s: %.3f Mpps" % (direction, size_label(size), sg["median"]))
            out_cases.append(c)
        res["cases"] = out_cases
        if not aead_runs:
            insane.append("no bitw-aead-bench result")

        if args.profile:
            print("== profiling", file=sys.stderr)
            pcases = [(d, MAIN_AEAD, s) for s in prof_sizes for d in ("encrypt", "decrypt")
                      if s in aead_sizes.get(MAIN_AEAD, [])]
            res["profile"] = profile(bench, pcases, traffics, keys, args.profile_seconds)

        res["loadavg_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
        res["machine"] = fw.machine_info(dpdk_version, git_info)
        res["problems"] = problems
        res["repeated_runs"] = attempts
        res["disturbed_runs"] = bench.disturbed

        md = render(res)
        fw.publish("esp", res, md, args)
        if insane:
            print("FAIL: implausible or failed results: " + "; ".join(insane), file=sys.stderr)
            return 1
        if problems:
            print("FAIL: %d run(s) with counters that do not add up (listed under the table)" % len(problems),
                  file=sys.stderr)
            return 1
        return 0
    finally:
        if args.keep:
            print("kept %s" % tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
