#!/usr/bin/python3
"""Forwarding benchmark: bitw-dataplane against dpdk-testpmd (io mode) on the same vdevs.

    python3 perf/forwarding.py                  # 5 runs x 5 s per system and scenario
    python3 perf/forwarding.py --runs 7 --seconds 10
    python3 perf/forwarding.py --quick          # CI smoke: 1 run x 1 s, checks numbers are sane

Scenarios (one worker core, CPU 1; testpmd: -l 0,1 --nb-cores=1, its forwarding lcore is CPU 1):
  a  net_null <-> net_null, both directions busy (testpmd io: 2 streams on one core)
  b  net_pcap rx_pcap=<64-byte IPv4/UDP>,infinite_rx=1 -> net_null0,no-rx=1
  c  bitw alone on b's traffic with 1, 100 and 10 000 rules in direction out; only the
     last rule (a bypass) matches, the others differ in prefix, protocol or port range;
     beside it, rte_acl alone (dpdk-test-acl) on the same rules and flows

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


# ---------------------------------------------------------------------------- traffic


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def udp_frame(i):
    """Flow i: Ethernet/IPv4/UDP, FRAME_LEN bytes, correct IP and UDP checksums."""
    src = ipaddress.ip_address("192.168.100.%d" % (i % 250 + 1)).packed
    dst = ipaddress.ip_address("198.18.0.%d" % (i % 16 + 1)).packed
    sport, dport = SPORTS[0] + i, DPORTS[0] + i % 4
    payload = bytes(FRAME_LEN - 14 - 20 - 8)
    udp_len = 8 + len(payload)
    ip_len = 20 + udp_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, i, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    c = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    eth = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", 0x0800)
    frame = eth + ip + udp
    assert len(frame) == FRAME_LEN
    return frame


def write_pcap(path):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(FLOWS):
            fr = udp_frame(i)
            f.write(struct.pack("<IIII", 0, i, len(fr), len(fr)))
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


def check_rules(rules):
    """Proves, with a plain linear matcher, that only the last rule matches the traffic."""
    flows = [
        (
            int(ipaddress.ip_address("192.168.100.%d" % (i % 250 + 1))),
            int(ipaddress.ip_address("198.18.0.%d" % (i % 16 + 1))),
            SPORTS[0] + i,
            DPORTS[0] + i % 4,
        )
        for i in range(FLOWS)
    ]

    def hits(c):
        (sn, sm), (dn, dm), udp, (slo, shi), (dlo, dhi) = c
        if not udp:
            return 0
        return sum(
            1
            for s, d, sp, dp in flows
            if s & sm == sn and d & dm == dn and slo <= sp <= shi and dlo <= dp <= dhi
        )

    for r in rules[:-1]:
        if hits(_compile(r)):
            raise SystemExit("internal error: rule %s matches the benchmark traffic" % r)
    if hits(_compile(rules[-1])) != FLOWS:
        raise SystemExit("internal error: the last rule does not match every flow")


# ---------------------------------------------------------------------------- running


def toml_str(v):
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def bitw_config(path, inside, outside, prefix, core, rules=(), default_action="bypass"):
    lines = [
        "[eal]",
        "args = [%s]" % ", ".join(toml_str(a) for a in EAL_COMMON + ["--file-prefix", prefix]),
        "",
        "[dataplane]",
        "workers = 1",
        "burst = %d" % BURST,
        "cores = [%d]" % core,
        "rx_descriptors = %d" % DESCRIPTORS,
        "tx_descriptors = %d" % DESCRIPTORS,
        "mbufs = %d" % MBUFS,
        "default_action = %s" % toml_str(default_action),
        "",
        "[ports.inside]",
        "device = %s" % toml_str(inside),
        "[ports.outside]",
        "device = %s" % toml_str(outside),
    ]
    for r in rules:
        lines += ["", "[[policy]]", "direction = \"out\""]
        lines += ["%s = %s" % (k, toml_str(v)) for k, v in r.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


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

    def run_bitw(self, inside, outside, rules=(), default_action="bypass", expect_rx=None):
        a = self.args
        cfg = os.path.join(self.tmp, "bitw-%d.toml" % (self.n + 1))
        bitw_config(cfg, inside, outside, self.prefix("bitw"), a.core, rules, default_action)
        cmd = [a.bitw, "--config", cfg, "--run-for", str(a.seconds)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds + 120)
        if p.returncode != 0:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, p.stderr[-3000:]))
        s = json.loads(p.stdout)
        ports = s["ports"]
        tx = sum(ports[k]["tx_packets"] for k in ("inside", "outside"))
        rx = sum(ports[k]["rx_packets"] for k in ("inside", "outside"))
        dur = s["duration_seconds"]
        workers = len(s["workers"])
        drops = {k: v for k, v in s["drops"].items() if v}
        problems = []
        if tx != s["tx_packets"]:
            problems.append("port tx %d != worker tx %d" % (tx, s["tx_packets"]))
        if drops:
            problems.append("drops %s" % drops)
        if expect_rx == "bypassed" and s["bypassed"] != rx:
            problems.append("bypassed %d != rx %d" % (s["bypassed"], rx))
        return {
            "mpps_per_worker": tx / dur / workers / 1e6,
            "tx_packets": tx,
            "rx_packets": rx,
            "duration_seconds": dur,
            "workers": workers,
            "bypassed": s["bypassed"],
            "non_ip": s["non_ip"],
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

    def run_test_acl(self, rules_file, trace_file, nrules):
        """rte_acl alone: dpdk-test-acl classifies the same flows against the same rules."""
        a = self.args
        iters = max(1000, int(a.seconds * 1e7 / FLOWS))  # ~seconds at 100 ns per lookup
        cmd = (
            [a.test_acl, "-l", str(a.core)]
            + EAL_COMMON
            + ["--file-prefix", self.prefix("testacl"), "--"]
            + ["--rulesf=" + rules_file, "--tracef=" + trace_file, "--rulenum=%d" % max(1, nrules),
               "--tracenum=%d" % FLOWS, "--tracestep=%d" % BURST, "--bldcat=1", "--iter=%d" % iters,
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


def classbench_trace(path):
    with open(path, "w") as f:
        for i in range(FLOWS):
            src = int(ipaddress.ip_address("192.168.100.%d" % (i % 250 + 1)))
            dst = int(ipaddress.ip_address("198.18.0.%d" % (i % 16 + 1)))
            f.write("%d %d %d %d 17\n" % (src, dst, SPORTS[0] + i, DPORTS[0] + i % 4))


# ---------------------------------------------------------------------------- report


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


def machine_info(bitw_dpdk):
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

    def git(*a):
        try:
            return subprocess.run(["git", "-C", ROOT] + list(a), capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    dirty = git("status", "--porcelain", "--", "dataplane", "dpdk-sys", "Cargo.lock", "Cargo.toml")
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
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_dataplane": bool(dirty),
        "hostname": platform.node(),
    }


def _n(n):
    return "{:,}".format(int(n)).replace(",", " ")


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
        out.append(
            "(c) Classification cost: bitw alone on scenario b's traffic (%d IPv4/UDP flows), "
            "`default_action = \"discard\"`, N rules in direction `out` (mix `%s`): the first N−1 miss "
            "the traffic (other prefixes, protocols or port ranges), the last one bypasses it. "
            "\"rte_acl alone\": dpdk-test-acl classifying the same flows against the same rules "
            "(bursts of %d, median), and the number of tries rte_acl split the rules into."
            % (FLOWS, c["rule_mix"], BURST)
        )
        out.append("")
        out.append("| Rules | bitw Mpps | bitw ns/pkt | Mpps vs 1 rule | ns/pkt vs 1 rule | "
                   "target: Mpps ≥ 0.5 × 1 rule | rte_acl alone ns/lookup (tries) |")
        out.append("|---:|---:|---:|---:|---:|---|---:|")
        if c.get("reference_0_rules"):
            s = c["reference_0_rules"]
            out.append("| 0 (= b) | %s | %.1f | %s | %s | | |" % (
                fmt_mpps(s), 1e3 / s["median"],
                "%.2f" % (s["median"] / c["base_mpps"]) if c.get("base_mpps") else "–",
                "%.2f" % (c["base_mpps"] / s["median"]) if c.get("base_mpps") else "–"))
        for n, r in c["by_rules"].items():
            acl = r.get("acl") or {}
            acl_txt = "%.1f (%s)" % (acl["ns_median"], acl.get("tries")) if acl.get("ns_median") else acl.get("failed", "–")
            if "failed" in r:
                out.append("| %s | failed: %s | | | | **missed** | %s |" % (_n(n), r["failed"], acl_txt))
                continue
            s = r["bitw"]
            if int(n) == 1 or r["ratio_to_1"] is None:
                tgt = ""
            else:
                tgt = "met" if r["ratio_to_1"] >= 0.5 else "**missed**"
            out.append(
                "| %s | %s | %.1f | %s | %s | %s | %s |"
                % (
                    _n(n),
                    fmt_mpps(s),
                    1e3 / s["median"],
                    "%.2f" % r["ratio_to_1"] if r["ratio_to_1"] is not None else "–",
                    "%.2f" % r["cost_ratio_to_1"] if r["cost_ratio_to_1"] is not None else "–",
                    tgt,
                    acl_txt,
                )
            )
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
           m["git_commit"], " (dataplane modified)" if m["git_dirty_dataplane"] else "",
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
        method += (
            " rte_acl alone: `dpdk-test-acl --tracestep=%d --bldcat=1`, its cycles/pkt and pkt/sec over "
            "repeated passes of the %d flows, on the same core." % (BURST, FLOWS)
        )
    method += (
        " A run during which other processes used more than %.2f CPU is repeated (up to %d times). "
        "Command: `%s`." % (a["max_others"], a["retries"], res["command"])
    )
    out.append(method)
    out.append("")
    return "\n".join(out)


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
    if rule_counts[0] < 1:
        ap.error("--rules: counts from 1 (scenario b is the 0-rule case)")
    if os.geteuid() != 0:
        print("warning: not root; DPDK usually needs root", file=sys.stderr)
    for attr, needed in (("testpmd", "a" in scenarios or "b" in scenarios), ("test_acl", "c" in scenarios)):
        path = shutil.which(getattr(args, attr))
        if needed and not path:
            raise SystemExit("%s not found (apt-get install dpdk)" % getattr(args, attr))
        setattr(args, attr, path)

    if not args.no_build:
        cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
        print("== cargo build --release -p bitw-dataplane", file=sys.stderr)
        subprocess.run([cargo, "build", "--release", "-p", "bitw-dataplane"], cwd=ROOT, check=True)
    if not os.path.exists(args.bitw):
        raise SystemExit("%s not found: cargo build --release -p bitw-dataplane" % args.bitw)

    command = " ".join(["python3 perf/forwarding.py"] + sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="bitw-perf-")
    problems = []
    try:
        # One binary for the whole benchmark, even if someone rebuilds meanwhile.
        snap = os.path.join(tmp, "bitw-dataplane")
        shutil.copy2(args.bitw, snap)
        args.bitw = snap
        pcap = os.path.join(tmp, "udp64.pcap")
        write_pcap(pcap)
        bench = Bench(args, tmp)
        null_a = ["net_null0", "net_null1"]
        pcap_b = ["net_pcap0,rx_pcap=%s,infinite_rx=1" % pcap, "net_null0,no-rx=1"]
        res = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "args": {"runs": args.runs, "seconds": args.seconds, "warmup": args.warmup, "core": args.core,
                     "quick": args.quick, "burst": BURST, "descriptors": DESCRIPTORS, "mbufs": MBUFS,
                     "frame_bytes_without_fcs": FRAME_LEN, "flows": FLOWS, "max_others": args.max_others,
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
            "a": ("(a) net_null ↔ net_null, both directions", null_a),
            "b": ("(b) net_pcap IPv4/UDP (infinite_rx) → net_null", pcap_b),
        }
        for key in [x for x in scenarios if x in titles]:
            title, vdevs = titles[key]
            runs = {"bitw": [], "testpmd": []}
            for i in range(args.runs):
                tag = "%s run %d/%d bitw" % (key, i + 1, args.runs)
                r = bench.measure(tag, bench.run_bitw, *vdevs, expect_rx="bypassed" if key == "b" else None)
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
            trace = os.path.join(tmp, "flows.trace")
            classbench_trace(trace)
            rulesets, cb_files = {}, {}
            for n in rule_counts:
                rules = make_rules(n, args.rule_mix)
                check_rules(rules)
                rulesets[n] = rules
                cb_files[n] = os.path.join(tmp, "rules-%d.classbench" % n)
                classbench_rules(rules, cb_files[n])
            runs = {n: [] for n in rule_counts}
            acl_runs = {n: [] for n in rule_counts}
            failed, acl_failed = {}, {}
            for i in range(args.runs):
                for n in rule_counts:  # interleaved over rule counts too
                    tag = "c run %d/%d %d rules" % (i + 1, args.runs, n)
                    if n not in failed:
                        try:
                            r = bench.measure(tag, bench.run_bitw, *pcap_b, rules=rulesets[n],
                                              default_action="discard", expect_rx="bypassed")
                            dpdk_version = r["dpdk"]
                            note(tag, r)
                            progress(tag, r)
                            runs[n].append(r)
                        except RuntimeError as e:
                            # e.g. rte_acl cannot build the rule set: report it, measure the others.
                            lines = [x for x in str(e).splitlines() if x.startswith(("error:", "ACL:"))]
                            failed[n] = "; ".join(lines) or str(e).splitlines()[0]
                            problems.append("c %d rules: bitw failed: %s" % (n, failed[n]))
                            print("  %s FAILED: %s" % (tag, failed[n]), file=sys.stderr)
                    if n not in acl_failed:
                        tag = "c run %d/%d %d rules rte_acl" % (i + 1, args.runs, n)
                        try:
                            r = bench.measure(tag, bench.run_test_acl, cb_files[n], trace, n)
                            note(tag, r)
                            progress(tag, r, "ns/lookup")
                            acl_runs[n].append(r)
                        except RuntimeError as e:
                            lines = [x for x in str(e).splitlines() if "ACL" in x or "rror" in x]
                            acl_failed[n] = "failed: " + ("; ".join(lines[-2:]) or "see JSON")
                            problems.append("c %d rules: dpdk-test-acl %s" % (n, acl_failed[n]))
            base = statistics.median([r["mpps_per_worker"] for r in runs[1]]) if runs.get(1) else None
            by = {}
            for n in rule_counts:
                acl = {"raw": acl_runs[n]}
                if n in acl_failed:
                    acl["failed"] = acl_failed[n]
                elif acl_runs[n]:
                    acl["ns_median"] = statistics.median([r["ns_per_lookup"] for r in acl_runs[n]])
                    acl["tries"] = acl_runs[n][0]["tries"]
                    acl["alg"] = acl_runs[n][0]["alg"]
                if n in failed:
                    by[str(n)] = {"failed": failed[n], "raw": runs[n], "acl": acl}
                    continue
                s = summarise([r["mpps_per_worker"] for r in runs[n]])
                by[str(n)] = {
                    "bitw": s,
                    "ns_per_packet": 1e3 / s["median"],
                    "ratio_to_1": s["median"] / base if base else None,
                    "cost_ratio_to_1": base / s["median"] if base else None,
                    "acl": acl,
                    "raw": runs[n],
                }
            res["classification"] = {
                "traffic": "%d flows IPv4/UDP %s -> %s, sport %d-%d, dport %d-%d"
                % (FLOWS, SRC_NET, DST_NET, SPORTS[0], SPORTS[1], DPORTS[0], DPORTS[1]),
                "rule_mix": args.rule_mix,
                "default_action": "discard",
                "target": "Mpps(10000) >= 0.5 * Mpps(1)",
                "base_mpps": base,
                "reference_0_rules": res["forwarding"].get("b", {}).get("bitw"),
                "by_rules": by,
            }

        res["loadavg_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
        res["machine"] = machine_info(dpdk_version)
        res["problems"] = problems
        res["repeated_runs"] = attempts
        res["disturbed_runs"] = bench.disturbed

        # Sanity (every mode): each median must be a plausible non-zero rate.
        insane = []
        for key, sc in res["forwarding"].items():
            for tool in ("bitw", "testpmd"):
                if not 0.1 < sc[tool]["median"] < 1000:
                    insane.append("%s %s: %.3f Mpps" % (key, tool, sc[tool]["median"]))
        for n, r in res.get("classification", {}).get("by_rules", {}).items():
            if "failed" in r:
                insane.append("c %s rules: %s" % (n, r["failed"]))
            elif not 0.1 < r["bitw"]["median"] < 1000:
                insane.append("c %s rules: %.3f Mpps" % (n, r["bitw"]["median"]))

        md = render(res)
        print(md)
        if args.save:
            os.makedirs(RESULTS, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            base_name = os.path.join(RESULTS, "forwarding-%s" % stamp)
            with open(base_name + ".json", "w") as f:
                json.dump(res, f, indent=1)
                f.write("\n")
            for path in (base_name + ".md", os.path.join(RESULTS, "forwarding-latest.md")):
                with open(path, "w") as f:
                    f.write(md)
            print("saved %s.json, .md and perf/results/forwarding-latest.md" % os.path.relpath(base_name, ROOT),
                  file=sys.stderr)
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
