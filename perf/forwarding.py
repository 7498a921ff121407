#!/usr/bin/python3
"""Forwarding benchmark: bitw-dataplane against dpdk-testpmd (io mode) on the same vdevs.

    python3 perf/forwarding.py                  # 5 runs x 5 s per system and scenario
    python3 perf/forwarding.py --runs 7 --seconds 10
    python3 perf/forwarding.py --quick          # CI smoke: 1 run x 1 s, checks numbers are sane

Scenarios (one worker core, CPU 1; testpmd: -l 0,1 --nb-cores=1, its forwarding lcore is CPU 1):
  a  net_null <-> net_null, both directions busy (testpmd io: 2 streams on one core)
  b  net_pcap rx_pcap=<64-byte IPv4/UDP>,infinite_rx=1 -> net_null0,no-rx=1
     In a and b bitw has no rule and default bypass: wire mode, frames forwarded unparsed.
  c  the inspected path: bitw alone with 1, 100 and 10 000 rules in direction out; only the
     last rule (a bypass) matches, the others differ in prefix, protocol or port range.
     Variants: cached (256 flows, flow cache on), uncached (65 536 distinct flows, cache on:
     nearly every packet misses), off (256 flows, flow_cache = 0), off-many (65 536 flows,
     flow_cache = 0); a wire-mode run of each traffic; rte_acl alone (dpdk-test-acl) on the
     same rules and flows

Prints a Markdown table; saves JSON and Markdown under perf/results/ (see perf/README.md).
Standard library only. Needs root and DPDK 22.11 (dpdk-testpmd, dpdk-test-acl).
"""

import argparse
import datetime
import ipaddress
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "perf", "results")

# Same EAL memory arguments for both tools; each run adds its own --file-prefix.
EAL_COMMON = ["--no-huge", "-m", "512", "--no-pci", "--no-shconf", "--no-telemetry"]
BURST = 32
DESCRIPTORS = 1024
# bitw sizes its pool from the queues: (2 ports x (1024 rx + 1024 tx + 2 x 32) + 4096)
# rounded up to 2^k - 1 = 16383, with a per-lcore cache of 256. testpmd gets the same.
MBUFS = 16383
MBUF_CACHE = 256

# Traffic of scenarios b and c: 256 flows of 64-byte frames (60 bytes without FCS).
FRAME_LEN = 60
FLOWS = 256
SRC_NET = ipaddress.ip_network("192.168.100.0/24")  # hosts .1 .. .250
DST_NET = ipaddress.ip_network("198.18.0.0/27")  # hosts .1 .. .16 (RFC 2544 range)
SPORTS = (1024, 1024 + FLOWS - 1)
DPORTS = (5001, 5004)
# Scenario c "uncached": as many distinct flows inside the same ranges (so the same last rule
# matches them all), 16x the flow cache's 4096 entries: replayed in a loop, a flow comes back
# only after its cache entry is long gone.
MANY_FLOWS = 65536
# net_pcap infinite_rx keeps every frame of the pcap in an mbuf of the port's pool: the
# many-flow runs get MBUFS + MANY_FLOWS mbufs.
DEFAULT_FLOW_CACHE = 4096  # bitw's default [dataplane] flow_cache (entries per direction and family)


def flows(count):
    """The flows of the benchmark traffic: (src, dst, sport, dport) integers, all UDP.

    256 (the default): src .1-.250, dst .1-.16, one source port each (1024-1279), dport 5001-5004.
    More (up to 256 x 4 x 250): every source port 1024-1279 x dport 5001-5004 x source address
    .1-.250; destination .1-.16. Every flow stays inside SRC_NET, DST_NET, SPORTS and DPORTS.
    """
    src0, dst0 = int(SRC_NET.network_address), int(DST_NET.network_address)
    if count <= FLOWS:
        return [(src0 + i % 250 + 1, dst0 + i % 16 + 1, SPORTS[0] + i, DPORTS[0] + i % 4) for i in range(count)]
    if count > FLOWS * 4 * 250:
        raise SystemExit("at most %d distinct flows" % (FLOWS * 4 * 250))
    return [
        (src0 + i // (FLOWS * 4) + 1, dst0 + i % 16 + 1, SPORTS[0] + i % FLOWS, DPORTS[0] + (i // FLOWS) % 4)
        for i in range(count)
    ]


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def udp_frame(flow, ident, length=FRAME_LEN):
    """One flow's frame: Ethernet/IPv4/UDP, `length` bytes (without FCS), correct IP and UDP
    checksums."""
    src, dst, sport, dport = flow
    src, dst = struct.pack("!I", src), struct.pack("!I", dst)
    payload = bytes(length - 14 - 20 - 8)
    udp_len = 8 + len(payload)
    ip_len = 20 + udp_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, ident & 0xFFFF, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    c = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    eth = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", 0x0800)
    frame = eth + ip + udp
    assert len(frame) == length
    return frame


def write_pcap(path, flow_list, lengths=(FRAME_LEN,)):
    """One frame per flow; frame i is lengths[i % len(lengths)] bytes long (without FCS)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, fl in enumerate(flow_list):
            fr = udp_frame(fl, i, lengths[i % len(lengths)])
            f.write(struct.pack("<IIII", i // 1000000, i % 1000000, len(fr), len(fr)))
            f.write(fr)


# ---------------------------------------------------------------------------- rules


def _disjoint_prefix(rng, avoid):
    while True:
        length = rng.randint(8, 32)
        addr = rng.getrandbits(32)
        net = ipaddress.ip_network((addr, length), strict=False)
        if not net.overlaps(avoid) and not net.is_multicast:
            return str(net)


def _covering_prefix(rng, net, nested=False):
    """A prefix that overlaps the traffic's net: any, a supernet, the net itself, or a part of it.

    The default mix has few nesting levels, as a real SPD (any, site /16 or /8, subnet,
    hosts). nested=True draws supernets of every length /8../24: thousands of rules with
    17 nesting levels crossed with unrelated prefixes on the other address (a stress case).
    """
    r = rng.random()
    if r < 0.25:
        return "any"
    if r < 0.5:
        if nested:
            return str(net.supernet(new_prefix=rng.randint(8, net.prefixlen)))
        return str(net.supernet(new_prefix=16 if net.prefixlen > 16 else 8))
    if r < 0.75:
        return str(net)
    host = rng.randint(1, net.num_addresses - 2)
    length = rng.randint(net.prefixlen + 1, 32)
    return str(ipaddress.ip_network((int(net.network_address) + host, length), strict=False))


def _port_range(rng, lo=0, hi=65535):
    r = rng.random()
    if r < 0.3:
        return "any"
    a = rng.randint(lo, hi)
    if r < 0.6:
        return str(a)
    b = min(hi, a + rng.choice([1, 7, 63, 255, 1000, 4095, 20000]))
    return "%d-%d" % (a, b)


def _port_outside(rng, lo, hi):
    """A port or range that does not meet lo..hi."""
    if rng.random() < 0.5 and lo > 0:
        a = rng.randint(0, lo - 1)
        b = rng.randint(a, lo - 1)
    else:
        a = rng.randint(hi + 1, 65535)
        b = rng.randint(a, 65535)
    return str(a) if a == b else "%d-%d" % (a, b)


def _proto_ports(rng):
    proto = rng.choice(["any", "tcp", "udp", "icmp", "47", "50", "132"])
    rule = {"proto": proto}
    if proto in ("tcp", "udp", "132"):
        rule["sport"] = _port_range(rng)
        rule["dport"] = _port_range(rng)
    elif proto == "icmp" and rng.random() < 0.5:
        rule["sport"] = str(rng.randint(0, 255))
    return rule


def make_rules(count, mix="spd", seed=2544):
    """count rules in direction out; only the last one (a bypass) matches the traffic."""
    rng = random.Random(seed)
    nested = mix == "nested"
    rules = []
    for i in range(count - 1):
        kind = rng.choices(["src", "dst", "proto", "dport", "sport"], [30, 30, 15, 15, 10])[0]
        if kind == "src":  # source prefix misses; anything else goes
            r = {"src": _disjoint_prefix(rng, SRC_NET), "dst": _covering_prefix(rng, DST_NET, nested)}
            r.update(_proto_ports(rng))
        elif kind == "dst":
            r = {"src": _covering_prefix(rng, SRC_NET, nested), "dst": _disjoint_prefix(rng, DST_NET)}
            r.update(_proto_ports(rng))
        elif kind == "proto":  # addresses cover the traffic, protocol differs
            r = {"src": _covering_prefix(rng, SRC_NET, nested), "dst": _covering_prefix(rng, DST_NET, nested)}
            r["proto"] = rng.choice(["tcp", "icmp", "47", "50", "132"])  # 132: SCTP
            if r["proto"] in ("tcp", "132"):
                r["sport"], r["dport"] = _port_range(rng), _port_range(rng)
        elif kind == "dport":  # UDP, addresses cover the traffic, destination port misses
            r = {"src": _covering_prefix(rng, SRC_NET, nested), "dst": _covering_prefix(rng, DST_NET, nested)}
            r.update(proto="udp", sport=_port_range(rng), dport=_port_outside(rng, *DPORTS))
        else:  # UDP, source port misses
            r = {"src": _covering_prefix(rng, SRC_NET, nested), "dst": _covering_prefix(rng, DST_NET, nested)}
            r.update(proto="udp", sport=_port_outside(rng, *SPORTS), dport=_port_range(rng))
        a = rng.choice(["discard", "protect", "bypass"])
        r["action"] = a
        if a == "protect":
            r["sa"] = "sa-%d" % rng.randint(1, 64)
        r["name"] = "miss-%05d" % i
        rules.append(r)
    rules.append(
        {
            "name": "bench-flows",
            "src": str(SRC_NET),
            "dst": "198.18.0.0/24",
            "proto": "udp",
            "sport": "%d-%d" % SPORTS,
            "dport": "%d-%d" % DPORTS,
            "action": "bypass",
        }
    )
    return rules


def _compile(rule):
    """A rule as integers: (src, src mask, dst, dst mask, protos, sport range, dport range)."""

    def pfx(v):
        if v == "any":
            return 0, 0
        n = ipaddress.ip_network(v)
        return int(n.network_address), int(n.netmask)

    def ports(v):
        if v == "any":
            return 0, 65535
        lo, _, hi = v.partition("-")
        return int(lo), int(hi or lo)

    return (
        pfx(rule.get("src", "any")),
        pfx(rule.get("dst", "any")),
        rule.get("proto", "any") in ("any", "udp", "17"),
        ports(rule.get("sport", "any")),
        ports(rule.get("dport", "any")),
    )


def _linear_hits(c, flow_list):
    """How many flows rule c matches: the rule's fields against every flow, one by one."""
    (sn, sm), (dn, dm), udp, (slo, shi), (dlo, dhi) = c
    if not udp:
        return 0
    return sum(
        1 for s, d, sp, dp in flow_list if s & sm == sn and d & dm == dn and slo <= sp <= shi and dlo <= dp <= dhi
    )


def check_rules(rules, flow_list):
    """Proves that only the last rule matches the traffic, and that it matches every flow.

    A rule matches a flow when every field matches. Field by field first (the traffic's distinct
    sources, destinations, source and destination ports, sorted): a rule none of whose values
    matches in some field matches no flow; the last rule, whose every field matches every value,
    matches every flow. Any other rule is checked flow by flow. Exact, and fast for 65 536 flows.
    """
    import bisect

    cols = [sorted(set(col)) for col in zip(*flow_list)]  # src, dst, sport, dport

    def intervals(c):
        (sn, sm), (dn, dm), _, sp, dp = c
        return [(sn, sn | (~sm & 0xFFFFFFFF)), (dn, dn | (~dm & 0xFFFFFFFF)), sp, dp]

    def some(col, lo, hi):
        j = bisect.bisect_left(col, lo)
        return j < len(col) and col[j] <= hi

    for r in rules[:-1]:
        c = _compile(r)
        if not c[2] or not all(some(col, lo, hi) for col, (lo, hi) in zip(cols, intervals(c))):
            continue
        if _linear_hits(c, flow_list):
            raise SystemExit("internal error: rule %s matches the benchmark traffic" % r)
    c = _compile(rules[-1])
    every = c[2] and all(lo <= col[0] and col[-1] <= hi for col, (lo, hi) in zip(cols, intervals(c)))
    if not every or _linear_hits(c, flow_list) != len(flow_list):
        raise SystemExit("internal error: the last rule does not match every flow")


# ---------------------------------------------------------------------------- running


def toml_str(v):
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def toml_value(v):
    """A TOML value of a bool, an int or a string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return toml_str(v)


def config_head(prefix, core, inside, outside, mbufs=MBUFS, default_action="bypass", eal=None,
                dataplane=(), control_socket=None):
    """The [eal], [dataplane], [control] and [ports.*] lines every runner's one-worker config
    starts with: `eal` replaces EAL_COMMON, `dataplane` adds (key, value) pairs."""
    eal = (EAL_COMMON if eal is None else eal) + ["--file-prefix", prefix]
    lines = [
        "[eal]",
        "args = [%s]" % ", ".join(toml_str(a) for a in eal),
        "",
        "[dataplane]",
        "workers = 1",
        "burst = %d" % BURST,
        "cores = [%d]" % core,
        "rx_descriptors = %d" % DESCRIPTORS,
        "tx_descriptors = %d" % DESCRIPTORS,
        "mbufs = %d" % mbufs,
        "default_action = %s" % toml_str(default_action),
    ]
    lines += ["%s = %s" % (k, toml_value(v)) for k, v in dataplane]
    if control_socket is not None:
        lines += ["", "[control]", "socket = %s" % toml_str(control_socket)]
    return lines + [
        "",
        "[ports.inside]",
        "device = %s" % toml_str(inside),
        "[ports.outside]",
        "device = %s" % toml_str(outside),
    ]


def build(packages, skip, binaries):
    """cargo build --release of `packages` (unless `skip`), then every binary must exist."""
    if not skip:
        cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
        print("== cargo build --release -p %s" % " -p ".join(packages), file=sys.stderr)
        subprocess.run([cargo, "build", "--release", "-q"] + [a for p in packages for a in ("-p", p)],
                       cwd=ROOT, check=True)
    for path in binaries:
        if not os.path.isfile(path):
            raise SystemExit("%s not found: cargo build --release -p %s" % (path, " -p ".join(packages)))


def bitw_config(path, inside, outside, prefix, core, rules=(), default_action="bypass", mbufs=MBUFS,
                flow_cache=None, sa_key=None):
    """flow_cache None: bitw's default (DEFAULT_FLOW_CACHE); 0 turns the cache off.

    sa_key: a key file; then every SA a protect rule names gets an [[sa]] table (bitw versions
    with SAs insist on them; older ones know no [[sa]]: see probe_sa_tables)."""
    lines = config_head(prefix, core, inside, outside, mbufs, default_action,
                        dataplane=[] if flow_cache is None else [("flow_cache", flow_cache)])
    for r in rules:
        lines += ["", "[[policy]]", "direction = \"out\""]
        lines += ["%s = %s" % (k, toml_str(v)) for k, v in r.items()]
    if sa_key:
        # Outbound tunnel SAs for the protect rules; none of them matches the traffic.
        for name in sorted({r["sa"] for r in rules if "sa" in r}, key=lambda x: (len(x), x)):
            lines += ["", "[[sa]]", "name = %s" % toml_str(name), "direction = \"out\"",
                      "spi = %d" % (0x1000 + len(lines)), "mode = \"tunnel\"",
                      "tunnel_src = \"203.0.113.1\"", "tunnel_dst = \"203.0.113.2\"",
                      "aead = \"aes128gcm16\"", "key_file = %s" % toml_str(sa_key)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def sa_key_file(tmp):
    """A throw-away AES-128-GCM key + salt (20 bytes, hex), readable by its owner only."""
    path = os.path.join(tmp, "bench-sa.key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(20).hex() + "\n")
    return path


def probe_sa_tables(bitw, tmp):
    """Whether this bitw wants [[sa]] tables for protect rules (newer) or knows none (older)."""
    rule = {"name": "probe", "dst": "203.0.113.0/24", "proto": "udp", "action": "protect", "sa": "sa-1"}
    cfg = os.path.join(tmp, "probe.toml")
    key = sa_key_file(tmp)
    bitw_config(cfg, "net_null0", "net_null1", "probe", 1, [rule], sa_key=key)
    p = subprocess.run([bitw, "--config", cfg, "--check"], capture_output=True, text=True, timeout=60)
    if p.returncode == 0:
        return key
    bitw_config(cfg, "net_null0", "net_null1", "probe", 1, [rule])
    q = subprocess.run([bitw, "--config", cfg, "--check"], capture_output=True, text=True, timeout=60)
    if q.returncode == 0:
        return None
    raise SystemExit("bitw rejects a protect rule with and without an [[sa]] table:\n%s\n%s"
                     % (p.stderr.strip(), q.stderr.strip()))


HZ = os.sysconf("SC_CLK_TCK")


def cpu_snapshot():
    """Machine-wide busy and steal CPU-seconds, ours and our children's (waited-for) CPU-seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    t = os.times()
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall": time.monotonic(),
        "busy": (user + nice + system + irq + softirq) / HZ,
        "steal": steal / HZ,
        "self": t.user + t.system,
        "children": ch.ru_utime + ch.ru_stime,
    }


def others_cpu(a, b):
    """CPUs' worth of work done by other processes between two snapshots (0.0 = quiet)."""
    wall = b["wall"] - a["wall"]
    mine = (b["self"] - a["self"]) + (b["children"] - a["children"])
    return max(0.0, (b["busy"] - a["busy"] - mine) / wall), (b["steal"] - a["steal"]) / wall


class Bench:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.n = 0
        self.disturbed = 0
        self.sa_key = None  # set by main: see probe_sa_tables

    def wait_quiet(self):
        """Waits (up to --quiet-wait s) until other processes use less than --max-others CPU."""
        deadline = time.monotonic() + self.args.quiet_wait
        said = False
        while True:
            a = cpu_snapshot()
            time.sleep(0.5)
            busy, _ = others_cpu(a, cpu_snapshot())
            if busy <= self.args.max_others or time.monotonic() > deadline:
                return busy
            if not said:
                print("  waiting: other processes use %.2f CPU" % busy, file=sys.stderr)
                said = True
            time.sleep(1.5)

    def measure(self, label, fn, *a, **kw):
        """Runs fn; repeats it (up to --retries times) if other processes disturbed it."""
        for attempt in range(1 + self.args.retries):
            self.wait_quiet()
            s0 = cpu_snapshot()
            r = fn(*a, **kw)
            others, steal = others_cpu(s0, cpu_snapshot())
            r.update(others_cpu=round(others, 3), steal_cpu=round(steal, 3), attempt=attempt + 1)
            if others <= self.args.max_others:
                return r
            print("  %s: disturbed (other processes used %.2f CPU), %s"
                  % (label, others, "again" if attempt < self.args.retries else "kept"), file=sys.stderr)
        self.disturbed += 1  # kept, and counted in the report
        r["disturbed"] = True
        return r

    def prefix(self, tool):
        self.n += 1
        return "perf-%s-%d-%d" % (tool, os.getpid(), self.n)

    def run_bitw(self, inside, outside, rules=(), default_action="bypass", expect=None, mbufs=MBUFS,
                 flow_cache=None):
        """One bitw run. expect: "wire" (every frame forwarded uninspected), "bypassed" (every frame
        classified and bypassed by a rule) or None (no check)."""
        a = self.args
        cfg = os.path.join(self.tmp, "bitw-%d.toml" % (self.n + 1))
        bitw_config(cfg, inside, outside, self.prefix("bitw"), a.core, rules, default_action, mbufs, flow_cache,
                    self.sa_key)
        cmd = [a.bitw, "--config", cfg, "--run-for", str(a.seconds)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds + 180)
        if p.returncode != 0:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, p.stderr[-3000:]))
        s = json.loads(p.stdout)
        ports = s["ports"]
        tx = sum(ports[k]["tx_packets"] for k in ("inside", "outside"))
        rx = sum(ports[k]["rx_packets"] for k in ("inside", "outside"))
        dur = s["duration_seconds"]
        workers = len(s["workers"])
        hits = sum(w.get("flow_cache_hits", 0) for w in s["workers"])
        misses = sum(w.get("flow_cache_misses", 0) for w in s["workers"])
        uninspected = s.get("uninspected", 0)
        drops = {k: v for k, v in s["drops"].items() if v}
        problems = []
        if tx != s["tx_packets"]:
            problems.append("port tx %d != worker tx %d" % (tx, s["tx_packets"]))
        if drops:
            problems.append("drops %s" % drops)
        if expect == "wire" and (uninspected != rx or s["bypassed"] or hits or misses):
            problems.append("wire mode expected: uninspected %d, bypassed %d, cache %d/%d, rx %d"
                            % (uninspected, s["bypassed"], hits, misses, rx))
        if expect == "bypassed":
            if s["bypassed"] != rx or uninspected:
                problems.append("bypassed %d, uninspected %d, rx %d" % (s["bypassed"], uninspected, rx))
            if flow_cache == 0 and (hits or misses):
                problems.append("flow cache off but %d hits, %d misses" % (hits, misses))
            if flow_cache != 0 and hits + misses != rx:
                problems.append("flow cache hits %d + misses %d != rx %d" % (hits, misses, rx))
        # rte_acl logs each build it gives up on; bitw then splits the rule set (see filter.rs).
        acl_splits = p.stderr.count("Exceeded max number of tries")
        return {
            "mpps_per_worker": tx / dur / workers / 1e6,
            "tx_packets": tx,
            "rx_packets": rx,
            "duration_seconds": dur,
            "workers": workers,
            "bypassed": s["bypassed"],
            "uninspected": uninspected,
            "non_ip": s["non_ip"],
            "flow_cache_hits": hits,
            "flow_cache_misses": misses,
            "hit_ratio": hits / (hits + misses) if hits + misses else None,
            "acl_failed_builds": acl_splits,
            "drops": drops,
            "dpdk": s.get("dpdk"),
            "problems": problems,
        }

    def run_testpmd(self, vdevs):
        """testpmd -i driven through stdin: start, warm up, show stats, wait, show stats, stop."""
        a = self.args
        cmd = (
            [a.testpmd, "-l", "0,%d" % a.core]
            + EAL_COMMON
            + ["--file-prefix", self.prefix("testpmd")]
            + ["--vdev=%s" % v for v in vdevs]
            + [
                "--",
                "-i",
                "--forward-mode=io",
                "--nb-cores=1",
                "--burst=%d" % BURST,
                "--rxd=%d" % DESCRIPTORS,
                "--txd=%d" % DESCRIPTORS,
                "--total-num-mbufs=%d" % MBUFS,
                "--mbcache=%d" % MBUF_CACHE,
            ]
        )
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = bytearray()
        cond = threading.Condition()

        def reader():
            while True:
                b = os.read(p.stdout.fileno(), 65536)
                with cond:
                    if not b:
                        out.extend(b"\n<EOF>")
                        cond.notify_all()
                        return
                    out.extend(b)
                    cond.notify_all()

        t = threading.Thread(target=reader, daemon=True)
        t.start()

        def wait_prompts(n, timeout=60):
            # The prompt is written unbuffered; printf output (the stats) arrives at exit.
            deadline = time.monotonic() + timeout
            with cond:
                while out.count(b"testpmd> ") < n:
                    if b"<EOF>" in out or time.monotonic() > deadline:
                        raise RuntimeError(
                            "testpmd: no prompt #%d; output:\n%s" % (n, out.decode(errors="replace")[-3000:])
                        )
                    cond.wait(0.1)

        def send(line, prompts):
            p.stdin.write((line + "\n").encode())
            p.stdin.flush()
            wait_prompts(prompts)
            return time.monotonic()

        try:
            wait_prompts(1)
            t_start = send("start", 2)
            time.sleep(a.warmup)
            t0 = send("show port stats all", 3)
            time.sleep(a.seconds)
            t1 = send("show port stats all", 4)
            t_stop = send("stop", 5)
            p.stdin.write(b"quit\n")
            p.stdin.close()
            p.wait(timeout=60)
            t.join(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        text = out.decode(errors="replace")
        if p.returncode != 0:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, text[-3000:]))
        blocks = re.findall(
            r"NIC statistics for port (\d+)\s+#+\s+RX-packets:\s+(\d+).*?TX-packets:\s+(\d+).*?"
            r"Rx-pps:\s+(\d+).*?Tx-pps:\s+(\d+)",
            text,
            re.S,
        )
        nports = len(vdevs)
        if len(blocks) != 2 * nports:
            raise RuntimeError("testpmd: expected %d port stats blocks, got %d:\n%s" % (2 * nports, len(blocks), text[-3000:]))
        first, second = blocks[:nports], blocks[nports:]
        tx_pps = sum(int(b[4]) for b in second)  # testpmd's own TSC-timed rate between the shows
        tx_window = sum(int(b[2]) for b in second) - sum(int(b[2]) for b in first)
        acc = re.search(r"Accumulated forward statistics.*?TX-packets:\s+(\d+)", text, re.S)
        acc_tx = int(acc.group(1)) if acc else 0
        problems = []
        wall = tx_window / (t1 - t0)
        if tx_pps <= 0 or abs(wall - tx_pps) > 0.05 * tx_pps:
            problems.append("Tx-pps %d vs counters/wall-clock %.0f" % (tx_pps, wall))
        return {
            "mpps_per_worker": tx_pps / 1e6,  # one forwarding core
            "tx_packets_window": tx_window,
            "window_seconds": t1 - t0,
            "mpps_counters_wallclock": wall / 1e6,
            "mpps_whole_run": acc_tx / (t_stop - t_start) / 1e6,
            "tx_packets_total": acc_tx,
            "problems": problems,
        }

    def run_test_acl(self, rules_file, trace_file, nrules, nflows):
        """rte_acl alone: dpdk-test-acl classifies the same flows against the same rules."""
        a = self.args
        iters = max(4, int(a.seconds * 1e7 / nflows))  # ~seconds at 100 ns per lookup
        cmd = (
            [a.test_acl, "-l", str(a.core)]
            + EAL_COMMON
            + ["--file-prefix", self.prefix("testacl"), "--"]
            + ["--rulesf=" + rules_file, "--tracef=" + trace_file, "--rulenum=%d" % max(1, nrules),
               "--tracenum=%d" % nflows, "--tracestep=%d" % BURST, "--bldcat=1", "--iter=%d" % iters,
               "--verbose=0"]
        )
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds * 20 + 120)
        text = p.stdout + p.stderr
        m = re.search(r"([\d.]+) cycles/pkt, ([\d.]+) pkt/sec", text)
        if p.returncode != 0 or not m:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, text[-2000:]))
        tries = re.search(r"num_tries=(\d+)", text)
        alg = re.search(r"\balg=(\d+)", text)
        return {
            "ns_per_lookup": 1e9 / float(m.group(2)),
            "cycles_per_lookup": float(m.group(1)),
            "tries": int(tries.group(1)) if tries else None,
            "alg": int(alg.group(1)) if alg else None,
            "problems": [],
        }


def classbench_rules(rules, path):
    """The rules in dpdk-test-acl's (ClassBench) format; first line = highest priority."""
    protos = {"any": "0/0", "tcp": "6/255", "udp": "17/255", "icmp": "1/255"}

    def net(v):
        return "0.0.0.0/0" if v == "any" else v

    def ports(v):
        if v == "any":
            return "0 : 65535"
        lo, _, hi = v.partition("-")
        return "%s : %s" % (lo, hi or lo)

    with open(path, "w") as f:
        for r in rules:
            p = r.get("proto", "any")
            f.write("@%s %s %s %s %s\n" % (net(r.get("src", "any")), net(r.get("dst", "any")),
                                           ports(r.get("sport", "any")), ports(r.get("dport", "any")),
                                           protos.get(p, "%s/255" % p)))


def classbench_trace(path, flow_list):
    with open(path, "w") as f:
        for src, dst, sport, dport in flow_list:
            f.write("%d %d %d %d 17\n" % (src, dst, sport, dport))


# ---------------------------------------------------------------------------- report


def publish(name, res, md, args):
    """Prints the Markdown; saves both under perf/results/ with --save; writes the JSON to
    --json-out if given (the runners' common ending)."""
    print(md)
    if args.save:
        save_results(name, res, md)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)


def save_results(name, res, md):
    """Writes perf/results/<name>-<stamp>.json and .md, and <name>-latest.md."""
    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base_name = os.path.join(RESULTS, "%s-%s" % (name, stamp))
    with open(base_name + ".json", "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    for path in (base_name + ".md", os.path.join(RESULTS, "%s-latest.md" % name)):
        with open(path, "w") as f:
            f.write(md)
    print("saved %s.json, .md and perf/results/%s-latest.md" % (os.path.relpath(base_name, ROOT), name),
          file=sys.stderr)


def summarise(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def fmt_mpps(s):
    if len(s["runs"]) == 1:
        return "%.2f" % s["median"]
    return "%.2f (%.2f–%.2f)" % (s["median"], s["min"], s["max"])


def git_state():
    """The commit and whether the dataplane's sources differ from it: taken before the build, as
    that is what the binary is built from (others may commit while a long benchmark runs)."""

    def git(*a):
        try:
            return subprocess.run(["git", "-C", ROOT] + list(a), capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    dirty = git("status", "--porcelain", "--", "dataplane", "dpdk-sys", "Cargo.lock", "Cargo.toml")
    return {"git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty_dataplane": bool(dirty),
            "git_dirty_files": dirty.splitlines()}


def machine_info(bitw_dpdk, git_info):
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mhz = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    try:
        pkg = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "dpdk"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pkg = ""

    l2 = ""
    try:
        l2 = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_mhz": mhz,
        "cpus": os.cpu_count(),
        "l2_cache_bytes": l2,
        "kernel": platform.release(),
        "dpdk": bitw_dpdk,
        "dpdk_package": pkg,
        "hostname": platform.node(),
        **git_info,
    }


def _n(n):
    return "{:,}".format(int(n)).replace(",", " ")


def _pct(ratio, cache_off):
    if ratio is None:
        return "off" if cache_off else "–"
    return "%.4f %%" % (100 * ratio)


def render_c(c):
    """Scenario c: the wire references, then per variant and rule count."""
    out = []
    few = _n(c["wire"]["few"]["flows"]) if "few" in c["wire"] else str(FLOWS)
    many = _n(c["wire"]["many"]["flows"]) if "many" in c["wire"] else _n(MANY_FLOWS)
    desc = {
        "cached": "**cached** — scenario b's %s flows, flow cache on (bitw's default, %d entries per "
                  "direction and family): after the first pass every lookup hits the cache"
                  % (few, c["flow_cache_default"]),
        "uncached": "**uncached** — %s distinct flows (every source port × destination port × source "
                    "address of the last rule's ranges), cache on: a flow comes back only after its "
                    "entry was evicted, so nearly every packet misses, goes to rte_acl and is inserted" % many,
        "off": "**cache off** — %s flows, `flow_cache = 0`: every packet goes to rte_acl" % few,
        "off-many": "**cache off, %s flows** — the uncached traffic with `flow_cache = 0`: compared with "
                    "*uncached* it shows what a miss costs on top of the lookup" % many,
    }
    out.append(
        "(c) The inspected path: bitw alone, `default_action = \"discard\"`, N rules in direction `out` "
        "(mix `%s`): the first N−1 miss the traffic (other prefixes, protocols or port ranges), the "
        "last one bypasses every flow, so every packet is parsed and classified. Variants: %s. "
        "\"cache hits\": flow-cache hits / (hits + misses) over the runs (summary `workers[]`). "
        "\"wire\": the same traffic with no rule (wire mode, frames unparsed); \"inspection ns/pkt\" "
        "= ns/pkt − wire ns/pkt of the same traffic: parsing, classification and cache, net of the "
        "PMDs' cost (replaying %s distinct frames makes net_pcap's copy dearer too, and evicts more). "
        "\"rte_acl alone\": dpdk-test-acl classifying the same flows against the same rules (bursts "
        "of %d, median) and the number of tries rte_acl split the rules into. Target, per variant: "
        "**Mpps(10 000) ≥ 0.5 × Mpps(1)**."
        % (c["rule_mix"], "; ".join(desc[v] for v in c["variants"]), many, BURST)
    )
    out.append("")
    out.append("| Variant | Rules | bitw Mpps | ns/pkt | inspection ns/pkt | cache hits | Mpps vs 1 rule | "
               "ns/pkt vs 1 rule | target: Mpps ≥ 0.5 × 1 rule | rte_acl alone ns/lookup (tries) |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for t, w in c["wire"].items():
        out.append("| wire, %s flows | 0 | %s | %.1f | (0) | – | | | | |"
                   % (_n(w["flows"]), fmt_mpps(w["bitw"]), w["ns_per_packet"]))
    short = {"cached": "cached", "uncached": "uncached", "off": "cache off", "off-many": "cache off"}
    for v, var in c["variants"].items():
        label = "%s, %s flows" % (short.get(v, v), _n(var["flows"]))
        for n, r in var["by_rules"].items():
            acl = c["acl"].get(var["traffic"], {}).get(n) or {}
            if acl.get("ns_median"):
                acl_txt = "%.1f (%s)" % (acl["ns_median"], acl.get("tries"))
            else:
                acl_txt = acl.get("failed", "–")
            if "failed" in r:
                out.append("| %s | %s | failed: %s | | | | | | **missed** | %s |" % (label, _n(n), r["failed"], acl_txt))
                continue
            if r.get("acl_refused_builds"):
                acl_txt += "; bitw split the set (%d builds refused)" % r["acl_refused_builds"]
            if int(n) == 1 or r["ratio_to_1"] is None:
                tgt = ""
            else:
                tgt = "met" if r["ratio_to_1"] >= 0.5 else "**missed**"
            out.append(
                "| %s | %s | %s | %.1f | %.1f | %s | %s | %s | %s | %s |"
                % (
                    label,
                    _n(n),
                    fmt_mpps(r["bitw"]),
                    r["ns_per_packet"],
                    r["inspection_ns_per_packet"],
                    _pct(r["hit_ratio"], var["flow_cache"] == 0),
                    "%.2f" % r["ratio_to_1"] if r["ratio_to_1"] is not None else "–",
                    "%.2f" % r["cost_ratio_to_1"] if r["cost_ratio_to_1"] is not None else "–",
                    tgt,
                    acl_txt,
                )
            )
    out.append("")
    # The cache's effect, side by side: inspection ns/pkt (net of the wire run of the same traffic).
    var = c["variants"]

    def insp(v, n):
        r = var.get(v, {}).get("by_rules", {}).get(n)
        return r["inspection_ns_per_packet"] if r and "bitw" in r else None

    pairs = [(v, w) for v, w in (("cached", "off"), ("uncached", "off-many")) if v in var and w in var]
    if pairs:
        head, rule = ["Rules"], ["---:"]
        for v, w in pairs:
            head += ["%s (%s flows)" % (v, _n(var[v]["flows"])), "cache off (%s flows)" % _n(var[w]["flows"]),
                     "cache − off"]
            rule += ["---:"] * 3
        out.append("Flow cache effect, inspection ns/pkt (ns/pkt − wire ns/pkt of the same traffic); "
                   "\"cache − off\" < 0: the cache saves time, > 0: it costs time:")
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(rule) + "|")
        for n in next(iter(var.values()))["by_rules"]:
            row = [_n(n)]
            for v, w in pairs:
                a, b = insp(v, n), insp(w, n)
                row += ["%.1f" % a if a is not None else "–", "%.1f" % b if b is not None else "–",
                        "%+.1f" % (a - b) if a is not None and b is not None else "–"]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _dirty_note(m):
    if not m.get("git_dirty_dataplane"):
        return ""
    files = [x[3:] for x in m.get("git_dirty_files", [])]
    return " (uncommitted changes: %s)" % (", ".join(files) if files else "dataplane")


def render(res):
    a = res["args"]
    m = res["machine"]
    out = []
    out.append("# bitw forwarding benchmark — %s" % res["date"])
    out.append("")
    out.append(
        "One worker core (CPU %d), %d-byte frames (%d without FCS), burst %d, %d rx/tx descriptors, "
        "%d mbufs. Median of %d run(s) of %g s per system (min–max in brackets), runs interleaved. "
        "Mpps = forwarded (transmitted) packets per second per worker core; ns/pkt = 1000 / Mpps."
        % (a["core"], FRAME_LEN + 4, FRAME_LEN, BURST, DESCRIPTORS, MBUFS, a["runs"], a["seconds"])
    )
    out.append("")
    if res.get("forwarding"):
        out.append(
            "(a), (b): forwarding alone. bitw has no rule and `default_action = \"bypass\"`, so it runs in "
            "**wire mode**: frames are forwarded without being parsed (all counted as `uninspected`), "
            "which is what testpmd io does too. The inspected path (parse + classify) is (c)."
        )
        out.append("")
        out.append("| Scenario | bitw Mpps | testpmd io Mpps | bitw / testpmd | bitw ns/pkt | testpmd ns/pkt |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for sc in res["forwarding"].values():
            b, t = sc["bitw"], sc["testpmd"]
            out.append(
                "| %s | %s | %s | **%.2f** | %.1f | %.1f |"
                % (sc["title"], fmt_mpps(b), fmt_mpps(t), sc["ratio"], 1e3 / b["median"], 1e3 / t["median"])
            )
        out.append("")
    c = res.get("classification")
    if c:
        out.append(render_c(c))
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
           m["git_commit"], _dirty_note(m),
           res["loadavg_before"], res["loadavg_after"], res["repeated_runs"], res["disturbed_runs"])
    )
    out.append("")
    method = (
        "Method: bitw-dataplane `--run-for %g`: (tx packets of both ports) / `duration_seconds` of its "
        "JSON summary (the clock starts when the worker is launched, after EAL, port setup and the "
        "ACL build)." % a["seconds"]
    )
    if res.get("forwarding"):
        method += (
            " dpdk-testpmd `-i --forward-mode=io --nb-cores=1`, driven through stdin: `start`, %g s "
            "warm-up, `show port stats all`, %g s, `show port stats all`; the sum over ports of the "
            "second `Tx-pps` (testpmd's TSC-timed rate between the two shows). Same vdevs, same EAL "
            "memory arguments (`%s`), same burst, descriptors and pool."
            % (a["warmup"], a["seconds"], " ".join(EAL_COMMON))
        )
    if res.get("classification"):
        if "many" in res["classification"]["wire"]:
            method += (
                " (c) with %s flows: bitw gets `mbufs = %d` (%d + %d: net_pcap keeps every frame of the pcap "
                "in the port's pool), with %d flows %d."
                % (_n(a["uncached_flows"]), MBUFS + a["uncached_flows"], MBUFS, a["uncached_flows"], FLOWS, MBUFS)
            )
        method += (
            " rte_acl alone: `dpdk-test-acl --tracestep=%d --bldcat=1`, its cycles/pkt and pkt/sec over "
            "repeated passes of the same flows, on the same core. The rules are proved (field by field, "
            "then flow by flow) to miss every flow but for the last one." % BURST
        )
    method += (
        " A run during which other processes used more than %.2f CPU is repeated (up to %d times). "
        "Command: `%s`." % (a["max_others"], a["retries"], res["command"])
    )
    out.append(method)
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- scenario c

# Scenario c's variants: which traffic, and the flow cache setting (None: bitw's default).
VARIANTS = {
    "cached": {"traffic": "few", "flow_cache": None,
               "title": "cached: %d flows, flow cache on (default %d entries)" % (FLOWS, DEFAULT_FLOW_CACHE)},
    "uncached": {"traffic": "many", "flow_cache": None,
                 "title": "uncached: %s distinct flows, flow cache on (default)"},
    "off": {"traffic": "few", "flow_cache": 0, "title": "cache off: %d flows, `flow_cache = 0`" % FLOWS},
    "off-many": {"traffic": "many", "flow_cache": 0, "title": "cache off: %s distinct flows, `flow_cache = 0`"},
}


# --quick: fewer variants (a 10 000-rule bitw run costs ~5 s of ACL build), and rte_acl alone
# on the 256-flow trace only.
QUICK_VARIANTS = ("cached", "uncached", "off")


def scenario_c(args, bench, tmp, rule_counts, variants, note, progress, problems):
    """bitw alone with N rules, per variant; a wire-mode reference per traffic; rte_acl alone."""
    traffics = {}
    for t in sorted({VARIANTS[v]["traffic"] for v in variants}):
        fl = flows(FLOWS if t == "few" else args.uncached_flows)
        pcap = os.path.join(tmp, "udp64-%d.pcap" % len(fl))
        write_pcap(pcap, fl)
        trace = os.path.join(tmp, "flows-%d.trace" % len(fl))
        classbench_trace(trace, fl)
        traffics[t] = {"flows": fl, "n": len(fl), "trace": trace,
                       "vdevs": ["net_pcap0,rx_pcap=%s,infinite_rx=1" % pcap, "net_null0,no-rx=1"],
                       "mbufs": MBUFS if t == "few" else MBUFS + len(fl)}
    rulesets, cb_files = {}, {}
    for n in rule_counts:
        rules = make_rules(n, args.rule_mix)
        for t in traffics.values():
            check_rules(rules, t["flows"])
        rulesets[n] = rules
        cb_files[n] = os.path.join(tmp, "rules-%d.classbench" % n)
        classbench_rules(rules, cb_files[n])

    dpdk_version = None
    wire_runs = {t: [] for t in traffics}
    runs = {(v, n): [] for v in variants for n in rule_counts}
    acl_runs = {(t, n): [] for t in traffics for n in rule_counts}
    failed, acl_failed = {}, {}
    for i in range(args.runs):
        # Interleaved: the wire references, then per rule count every variant and rte_acl alone.
        for t, tr in traffics.items():
            tag = "c run %d/%d wire, %d flows" % (i + 1, args.runs, tr["n"])
            r = bench.measure(tag, bench.run_bitw, *tr["vdevs"], expect="wire", mbufs=tr["mbufs"])
            dpdk_version = r["dpdk"]
            note(tag, r)
            progress(tag, r)
            wire_runs[t].append(r)
        for n in rule_counts:
            for v in variants:
                tr = traffics[VARIANTS[v]["traffic"]]
                tag = "c run %d/%d %s %d rules" % (i + 1, args.runs, v, n)
                if (v, n) in failed:
                    continue
                try:
                    r = bench.measure(tag, bench.run_bitw, *tr["vdevs"], rules=rulesets[n],
                                      default_action="discard", expect="bypassed", mbufs=tr["mbufs"],
                                      flow_cache=VARIANTS[v]["flow_cache"])
                except RuntimeError as e:
                    # e.g. bitw cannot build the rule set: report it, measure the others.
                    lines = [x for x in str(e).splitlines() if x.startswith(("error:", "ACL:", "bitw-dataplane:"))]
                    failed[(v, n)] = "; ".join(lines[-3:]) or str(e).splitlines()[0]
                    problems.append("c %s %d rules: bitw failed: %s" % (v, n, failed[(v, n)]))
                    print("  %s FAILED: %s" % (tag, failed[(v, n)]), file=sys.stderr)
                    continue
                note(tag, r)
                progress(tag, r)
                runs[(v, n)].append(r)
            for t, tr in traffics.items():
                if (t, n) in acl_failed or (args.quick and t != "few" and "few" in traffics):
                    continue
                tag = "c run %d/%d %d rules rte_acl, %d flows" % (i + 1, args.runs, n, tr["n"])
                try:
                    r = bench.measure(tag, bench.run_test_acl, cb_files[n], tr["trace"], n, tr["n"])
                except RuntimeError as e:
                    text = str(e)
                    if "Exceeded max number of tries" in text:
                        # rte_acl's own limit (bitw splits such a set into several contexts).
                        acl_failed[(t, n)] = "cannot build (rte_acl: more than 8 tries needed)"
                    else:
                        lines = [x for x in text.splitlines() if "ACL" in x or "rror" in x]
                        acl_failed[(t, n)] = "failed: " + ("; ".join(lines[-2:]) or "see JSON")
                        problems.append("c %d rules, %d flows: dpdk-test-acl %s" % (n, tr["n"], acl_failed[(t, n)]))
                    print("  %s: %s" % (tag, acl_failed[(t, n)]), file=sys.stderr)
                    continue
                note(tag, r)
                progress(tag, r, "ns/lookup")
                acl_runs[(t, n)].append(r)

    def hit_ratio(rs):
        hits = sum(r["flow_cache_hits"] for r in rs)
        total = hits + sum(r["flow_cache_misses"] for r in rs)
        return hits / total if total else None

    wire = {}
    for t, tr in traffics.items():
        sm = summarise([r["mpps_per_worker"] for r in wire_runs[t]])
        wire[t] = {"flows": tr["n"], "mbufs": tr["mbufs"], "bitw": sm, "ns_per_packet": 1e3 / sm["median"],
                   "raw": wire_runs[t]}
    acl = {}
    for t, tr in traffics.items():
        acl[t] = {}
        for n in rule_counts:
            d = {"raw": acl_runs[(t, n)]}
            if not acl_runs[(t, n)] and (t, n) not in acl_failed:
                d["failed"] = "not run (--quick)"
            if (t, n) in acl_failed:
                d["failed"] = acl_failed[(t, n)]
            elif acl_runs[(t, n)]:
                d["ns_median"] = statistics.median([r["ns_per_lookup"] for r in acl_runs[(t, n)]])
                d["tries"] = acl_runs[(t, n)][0]["tries"]
                d["alg"] = acl_runs[(t, n)][0]["alg"]
            acl[t][str(n)] = d
    out_variants = {}
    for v in variants:
        t = VARIANTS[v]["traffic"]
        tr = traffics[t]
        base = statistics.median([r["mpps_per_worker"] for r in runs[(v, 1)]]) if runs.get((v, 1)) else None
        by = {}
        for n in rule_counts:
            if (v, n) in failed:
                by[str(n)] = {"failed": failed[(v, n)], "raw": runs[(v, n)]}
                continue
            sm = summarise([r["mpps_per_worker"] for r in runs[(v, n)]])
            ns = 1e3 / sm["median"]
            by[str(n)] = {
                "bitw": sm,
                "ns_per_packet": ns,
                "inspection_ns_per_packet": ns - wire[t]["ns_per_packet"],
                "hit_ratio": hit_ratio(runs[(v, n)]),
                "acl_refused_builds": max(r["acl_failed_builds"] for r in runs[(v, n)]),
                "ratio_to_1": sm["median"] / base if base else None,
                "cost_ratio_to_1": base / sm["median"] if base else None,
                "raw": runs[(v, n)],
            }
        title = VARIANTS[v]["title"]
        out_variants[v] = {
            "title": title % _n(tr["n"]) if "%s" in title else title,
            "traffic": t,
            "flows": tr["n"],
            "flow_cache": VARIANTS[v]["flow_cache"],
            "mbufs": tr["mbufs"],
            "base_mpps": base,
            "by_rules": by,
        }
    return {
        "traffic": {t: "%d flows IPv4/UDP in %s -> %s, sport %d-%d, dport %d-%d"
                       % (tr["n"], SRC_NET, DST_NET, SPORTS[0], SPORTS[1], DPORTS[0], DPORTS[1])
                    for t, tr in traffics.items()},
        "rule_mix": args.rule_mix,
        "default_action": "discard",
        "flow_cache_default": DEFAULT_FLOW_CACHE,
        "target": "Mpps(10000) >= 0.5 * Mpps(1), per variant",
        "wire": wire,
        "variants": out_variants,
        "acl": acl,
        "dpdk": dpdk_version,
    }


# ---------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per system and scenario (default 5)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="testpmd: seconds of forwarding before the measured window (default 1)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 run of 1 s each; checks numbers are sane")
    ap.add_argument("--scenarios", default="a,b,c", help="subset of a,b,c (default all)")
    ap.add_argument("--rules", default="1,100,10000", help="rule counts of scenario c (default 1,100,10000)")
    ap.add_argument("--rule-mix", choices=["spd", "nested"], default="spd",
                    help="scenario c rules: spd (default) or nested (supernets of every length: a stress case)")
    ap.add_argument("--variants", default=None,
                    help="scenario c variants: cached (%d flows, flow cache on), uncached (--uncached-flows "
                         "distinct flows, cache on), off (%d flows, flow_cache = 0), off-many (--uncached-flows "
                         "distinct flows, flow_cache = 0); default all (--quick: %s)"
                         % (FLOWS, FLOWS, ",".join(QUICK_VARIANTS)))
    ap.add_argument("--uncached-flows", type=int, default=MANY_FLOWS,
                    help="distinct flows of the uncached variant (default %d)" % MANY_FLOWS)
    ap.add_argument("--core", type=int, default=1, help="CPU of the worker / forwarding lcore (default 1)")
    ap.add_argument("--max-others", type=float, default=0.15,
                    help="repeat a run if other processes used more CPUs than this meanwhile (default 0.15)")
    ap.add_argument("--retries", type=int, default=2, help="repeats of a disturbed run (default 2)")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait for other processes to calm down before each run (default 60)")
    ap.add_argument("--bitw", default=os.environ.get("BITW_DATAPLANE", os.path.join(ROOT, "target/release/bitw-dataplane")))
    ap.add_argument("--testpmd", default="dpdk-testpmd")
    ap.add_argument("--test-acl", default="dpdk-test-acl")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release -p bitw-dataplane first")
    ap.add_argument("--save", dest="save", action="store_true", default=None,
                    help="save results under perf/results/ (default unless --quick)")
    ap.add_argument("--no-save", dest="save", action="store_false")
    args = ap.parse_args()
    if args.variants is None:
        args.variants = ",".join(QUICK_VARIANTS if args.quick else VARIANTS)
    if args.quick:
        args.runs, args.seconds, args.warmup = 1, 1.0, 0.5
        args.quiet_wait, args.retries = min(args.quiet_wait, 5), 0
        if args.save is None:
            args.save = False
    elif args.save is None:
        args.save = True
    if args.core == 0:
        ap.error("--core must not be 0: testpmd's main lcore is CPU 0")
    if args.runs < 1 or args.seconds <= 0:
        ap.error("--runs and --seconds must be positive")
    scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    if not set(scenarios) <= set("abc"):
        ap.error("--scenarios: a, b and/or c")
    rule_counts = sorted(set(int(x) for x in args.rules.split(",")))
    variants = [v for v in VARIANTS if v in {x.strip() for x in args.variants.split(",")}]
    if not variants or len(variants) != len({x.strip() for x in args.variants.split(",") if x.strip()}):
        ap.error("--variants: some of %s" % ", ".join(VARIANTS))
    if not FLOWS < args.uncached_flows <= FLOWS * 4 * 250:
        ap.error("--uncached-flows: %d..%d" % (FLOWS + 1, FLOWS * 4 * 250))
    if rule_counts[0] < 1:
        ap.error("--rules: counts from 1 (scenario b is the 0-rule case)")
    if os.geteuid() != 0:
        print("warning: not root; DPDK usually needs root", file=sys.stderr)
    for attr, needed in (("testpmd", "a" in scenarios or "b" in scenarios), ("test_acl", "c" in scenarios)):
        path = shutil.which(getattr(args, attr))
        if needed and not path:
            raise SystemExit("%s not found (apt-get install dpdk)" % getattr(args, attr))
        setattr(args, attr, path)

    git_info = git_state()
    build(["bitw-dataplane"], args.no_build, [args.bitw])

    command = " ".join(["python3 perf/forwarding.py"] + sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="bitw-perf-")
    problems = []
    try:
        # One binary for the whole benchmark, even if someone rebuilds meanwhile.
        snap = os.path.join(tmp, "bitw-dataplane")
        shutil.copy2(args.bitw, snap)
        args.bitw = snap
        pcap = os.path.join(tmp, "udp64.pcap")
        write_pcap(pcap, flows(FLOWS))
        bench = Bench(args, tmp)
        bench.sa_key = probe_sa_tables(args.bitw, tmp)
        null_a = ["net_null0", "net_null1"]
        pcap_b = ["net_pcap0,rx_pcap=%s,infinite_rx=1" % pcap, "net_null0,no-rx=1"]
        res = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "args": {"runs": args.runs, "seconds": args.seconds, "warmup": args.warmup, "core": args.core,
                     "quick": args.quick, "burst": BURST, "descriptors": DESCRIPTORS, "mbufs": MBUFS,
                     "frame_bytes_without_fcs": FRAME_LEN, "flows": FLOWS, "uncached_flows": args.uncached_flows,
                     "rule_mix": args.rule_mix, "rules": rule_counts, "variants": variants,
                     "sa_tables_for_protect_rules": bench.sa_key is not None,
                     "max_others": args.max_others,
                     "retries": args.retries, "eal": EAL_COMMON},
            "loadavg_before": " ".join(open("/proc/loadavg").read().split()[:3]),
            "forwarding": {},
            "classification": {},
        }
        dpdk_version = None
        attempts = 0

        def note(tag, r):
            nonlocal attempts
            attempts += r.get("attempt", 1) - 1
            for p in r["problems"]:
                problems.append("%s: %s" % (tag, p))

        def progress(tag, r, what="Mpps"):
            extra = " (others %.2f CPU)" % r["others_cpu"] if r.get("others_cpu", 0) > 0.05 else ""
            print("  %-30s %8.2f %s%s" % (tag, r["mpps_per_worker"] if what == "Mpps" else r["ns_per_lookup"],
                                          what, extra), file=sys.stderr)

        titles = {
            "a": ("(a) net_null ↔ net_null, both directions (bitw: wire mode)", null_a),
            "b": ("(b) net_pcap IPv4/UDP (infinite_rx) → net_null (bitw: wire mode)", pcap_b),
        }
        for key in [x for x in scenarios if x in titles]:
            title, vdevs = titles[key]
            runs = {"bitw": [], "testpmd": []}
            for i in range(args.runs):
                tag = "%s run %d/%d bitw" % (key, i + 1, args.runs)
                # No rules, default bypass: bitw forwards in wire mode (frames unparsed).
                r = bench.measure(tag, bench.run_bitw, *vdevs, expect="wire")
                dpdk_version = r["dpdk"]
                note(tag, r)
                progress(tag, r)
                runs["bitw"].append(r)
                tag = "%s run %d/%d testpmd" % (key, i + 1, args.runs)
                r = bench.measure(tag, bench.run_testpmd, vdevs)
                note(tag, r)
                progress(tag, r)
                runs["testpmd"].append(r)
            b = summarise([r["mpps_per_worker"] for r in runs["bitw"]])
            t = summarise([r["mpps_per_worker"] for r in runs["testpmd"]])
            res["forwarding"][key] = {"title": title, "vdevs": vdevs, "bitw": b, "testpmd": t,
                                      "ratio": b["median"] / t["median"], "raw": runs}

        if "c" in scenarios:
            res["classification"] = scenario_c(args, bench, tmp, rule_counts, variants, note, progress, problems)
            dpdk_version = dpdk_version or res["classification"].pop("dpdk", None)

        res["loadavg_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
        res["machine"] = machine_info(dpdk_version, git_info)
        res["problems"] = problems
        res["repeated_runs"] = attempts
        res["disturbed_runs"] = bench.disturbed

        # Sanity (every mode): each median must be a plausible non-zero rate.
        insane = []
        for key, sc in res["forwarding"].items():
            for tool in ("bitw", "testpmd"):
                if not 0.1 < sc[tool]["median"] < 1000:
                    insane.append("%s %s: %.3f Mpps" % (key, tool, sc[tool]["median"]))
        c = res.get("classification") or {}
        for key, w in c.get("wire", {}).items():
            if not 0.1 < w["bitw"]["median"] < 1000:
                insane.append("c wire %d flows: %.3f Mpps" % (w["flows"], w["bitw"]["median"]))
        for v, var in c.get("variants", {}).items():
            for n, r in var["by_rules"].items():
                if "failed" in r:
                    insane.append("c %s %s rules: %s" % (v, n, r["failed"]))
                elif not 0.1 < r["bitw"]["median"] < 1000:
                    insane.append("c %s %s rules: %.3f Mpps" % (v, n, r["bitw"]["median"]))

        md = render(res)
        print(md)
        if args.save:
            save_results("forwarding", res, md)
        if insane:
            print("FAIL: implausible or failed results: " + "; ".join(insane), file=sys.stderr)
            return 1
        if problems:
            print("warning: %d problem(s), listed under the table" % len(problems), file=sys.stderr)
            return 1 if args.quick else 0
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
