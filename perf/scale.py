#!/usr/bin/env python3
"""bitw at scale: throughput against the number of SAs, the SA install rate while traffic flows,
and the dataplane's memory per SA.

Cases (one worker core, AES-128-GCM tunnel, 64-byte frames, net_pcap infinite_rx -> net_null):

- decrypt: N inbound SAs (one key, SPIs SPI_BASE .. SPI_BASE + N - 1, replay window off for the
  looping capture, all under one inbound protect rule by their policy name) and an ESP capture of
  --packets frames whose SPIs cycle over all N. One SA comes from the config file; the other N - 1
  are installed over the control channel (bitw-scale drive: Apply batches) before measuring.
- encrypt: N outbound protect rules (one /32 destination each) naming N outbound SAs, all from
  the config file, and a plaintext capture cycling over the N destinations. rte_acl builds the N
  rules at start-up; counts it cannot build in --encrypt-timeout seconds are reported, not faked.
- install: a dataplane decrypting one SA's traffic at full rate; its idle rate, then
  --install-count SAs installed over the control channel as fast as it takes them (Apply
  batches of --batch), the forwarding rate during the installs, and SAs per second.
- memory: the dataplane's VmRSS before and after the decrypt case's installs (same capture, same
  pool), as MB per 100 000 SAs.

Rates come from the dataplane's own counters (GetStats over the control channel, its uptime
clock): packets sent out of the worker per second over --seconds windows, --runs of them per
case (median). Every case's dataplane stops with SIGINT and its summary is checked (no
authentication / SPI / policy drops, nothing missed by the port).

Saves JSON and Markdown under perf/results/ (scale-<stamp>.{json,md}, scale-latest.md); --quick
(the CI smoke: 1 and 1000 SAs, 1 run of 1 s) saves nothing unless --save. Needs root, DPDK 22.11,
cargo (it builds bitw-dataplane and bitw-scale first; --no-build skips that). Standard library only.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forwarding as fw  # noqa: E402  (pcap writer, machine info, results)

ROOT = fw.ROOT
LAN, REMOTE = str(fw.SRC_NET), "198.18.0.0/24"
LOCAL_GW, PEER_GW = "172.16.0.1", "172.16.0.2"
SPI_BASE_IN = 0x10000
SPI_BASE_OUT = 0x40000000
POLICY = "from-peer"
FRAME = 60  # bytes without FCS: 64 on the wire
MBUF_BYTES = 4096  # EAL memory per mbuf of the pool (2048 data + headroom + header + mempool overhead), generously: 3072 was too little for 880 000
# net_pcap infinite_rx keeps every frame of the capture in an mbuf of the pool; DPDK 22.11 without
# hugepages could not create a pool of 1 000 000 mbufs here (900 000 worked: the pool's one memory
# zone stays under 2 GiB), so captures hold at most this many frames.
PACKETS_MAX = 860000
ACL_RULE_BYTES = 16384
TARGET_SCALE = 0.10  # 1M SAs cost at most 10 % of the 1-SA throughput
TARGET_INSTALL = 100000  # SAs per second ...
TARGET_FORWARD_SHARE = 0.90  # ... while forwarding stays at 90 % of idle


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def key_file(tmp, material):
    path = os.path.join(tmp, "sa.key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(material + "\n")
    return path


def config(path, a, prefix, packets, inside, outside, socket, policies, sas):
    """One worker; EAL memory and the pool sized for a looping capture of `packets` frames."""
    mbufs = fw.MBUFS + packets
    # rte_acl's compiled rules live in EAL memory too (~10 KB per /32 rule measured at 100 000).
    mem = 1024 + (mbufs * MBUF_BYTES + len(policies) * ACL_RULE_BYTES) // (1 << 20)
    eal = [x for x in fw.EAL_COMMON if x not in ("-m", "512")] + ["-m", str(mem)]
    lines = fw.config_head(prefix, a.core, inside, outside, mbufs, "discard", eal=eal, control_socket=socket)
    out = ["\n".join(lines) + "\n"]
    for table, entries in (("policy", policies), ("sa", sas)):
        for e in entries:
            out.append("\n[[%s]]\n" % table + "".join("%s = %s\n" % (k, fw.toml_value(v)) for k, v in e))
    with open(path, "w") as f:
        f.writelines(out)


def in_sa(i, key):
    return [("name", "sa-%d" % i), ("direction", "in"), ("spi", SPI_BASE_IN + i), ("mode", "tunnel"),
            ("tunnel_src", PEER_GW), ("tunnel_dst", LOCAL_GW), ("aead", "aes128gcm16"), ("key_file", key),
            ("esn", False), ("replay_window", 0), ("policy", POLICY)]


def out_rule_sa(i, key):
    d = 0x0A000000 + 1 + i
    dst = "%d.%d.%d.%d/32" % (d >> 24, d >> 16 & 255, d >> 8 & 255, d & 255)
    rule = [("name", "r%d" % i), ("direction", "out"), ("src", LAN), ("dst", dst), ("proto", "udp"),
            ("action", "protect"), ("sa", "o%d" % i)]
    sa = [("name", "o%d" % i), ("direction", "out"), ("spi", SPI_BASE_OUT + i), ("mode", "tunnel"),
          ("tunnel_src", LOCAL_GW), ("tunnel_dst", PEER_GW), ("aead", "aes128gcm16"), ("key_file", key),
          ("esn", False)]
    return rule, sa


class Dataplane:
    """One bitw-dataplane process: started, waited for, stopped with SIGINT, summary read."""

    def __init__(self, a, cfg, tmp, tag, timeout):
        self.err_path = os.path.join(tmp, "%s.stderr" % tag)
        self.out_path = os.path.join(tmp, "%s.stdout" % tag)
        self.err = open(self.err_path, "w")
        self.out = open(self.out_path, "w")
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([a.bitw, "--config", cfg], stdout=self.out, stderr=self.err)
        self.ready_seconds = None
        while time.monotonic() - self.t0 < timeout:
            if self.p.poll() is not None:
                raise RuntimeError("bitw-dataplane exited %d at start:\n%s" % (self.p.returncode, self.stderr()[-3000:]))
            if "forwarding with" in self.stderr():
                self.ready_seconds = time.monotonic() - self.t0
                break
            time.sleep(0.05)
        else:
            self.kill()
            raise RuntimeError("bitw-dataplane not ready after %d s (start-up: config, EAL, ports, rte_acl)" % timeout)
        time.sleep(0.2)  # the control thread accepts right after the message

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def rss_kb(self):
        return rss_kb(self.p.pid)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

    def stop(self):
        """SIGINT, then the JSON summary."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError("bitw-dataplane did not stop within 120 s of SIGINT")
        self.out.close()
        self.err.close()
        with open(self.out_path) as f:
            text = f.read()
        if self.p.returncode != 0:
            raise RuntimeError("bitw-dataplane exited %d:\n%s" % (self.p.returncode, self.stderr()[-3000:]))
        return json.loads(text)


def proc_cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_quiet(a):
    """Waits (up to --quiet-wait s) until other processes use less than --max-others CPU."""
    deadline = time.monotonic() + a.quiet_wait
    said = False
    while True:
        s0 = fw.cpu_snapshot()
        time.sleep(0.5)
        busy, _ = fw.others_cpu(s0, fw.cpu_snapshot())
        if busy <= a.max_others or time.monotonic() > deadline:
            return busy
        if not said:
            log("   waiting: other processes use %.2f CPU" % busy)
            said = True
        time.sleep(1.5)


def drive(a, dp, socket, extra, timeout):
    """bitw-scale drive against a running dataplane; with the CPU other processes used meanwhile
    (the dataplane's own time taken out)."""
    cmd = [a.scale_tool, "drive", "--socket", socket, "--seconds", "%g" % a.seconds] + [str(x) for x in extra]
    s0, c0 = fw.cpu_snapshot(), proc_cpu_seconds(dp.p.pid)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    s1, c1 = fw.cpu_snapshot(), proc_cpu_seconds(dp.p.pid)
    if p.returncode != 0:
        raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, p.stderr[-3000:]))
    r = json.loads(p.stdout)
    others, _ = fw.others_cpu(s0, s1)
    r["others_cpu"] = round(max(0.0, others - (c1 - c0) / max(s1["wall"] - s0["wall"], 1e-9)), 3)
    if r["others_cpu"] > a.max_others:
        log("   disturbed: other processes used %.2f CPU meanwhile" % r["others_cpu"])
    return r


def summary_problems(s, direction):
    """Drops that mean the traffic was not what the case intends (a wrong SPI, key, rule)."""
    problems = []
    bad = {k: v for k, v in s["drops"].items() if v}
    if direction == "decrypt":
        # Until the installs are done, ESP for SPIs not installed yet has no SA: it is
        # discarded (as plaintext that no rule allows, or as an unknown SPI). Expected.
        bad.pop("default_discard", None)
        bad.pop("no_sa", None)
    if bad:
        problems.append("drops %s" % bad)
    for name, port in s["ports"].items():
        if port.get("rx_missed") or port.get("rx_errors") or port.get("tx_errors"):
            problems.append("port %s: missed/errors %s" % (name, port))
    return problems


def rates(runs, key):
    v = [r[key] for r in runs]
    return fw.summarise(v) if v else None


# ---------------------------------------------------------------------------- cases


def case_decrypt(a, tmp, key_hex, key_path, n, esp_pcap):
    sock = os.path.join(tmp, "dec-%d.sock" % n)
    cfg = os.path.join(tmp, "dec-%d.toml" % n)
    rule = [("name", "remote-to-lan"), ("direction", "in"), ("src", REMOTE), ("dst", LAN), ("proto", "udp"),
            ("action", "protect"), ("sa", POLICY)]
    config(cfg, a, "scale-dec-%d-%d" % (os.getpid(), n), a.packets, "net_null0,no-rx=1",
           "net_pcap0,rx_pcap=%s,infinite_rx=1" % esp_pcap, sock, [rule], [in_sa(0, key_path)])
    wait_quiet(a)
    dp = Dataplane(a, cfg, tmp, "dec-%d" % n, a.start_timeout)
    try:
        rss0 = dp.rss_kb()
        extra = ["--runs", a.runs, "--spi-base", SPI_BASE_IN, "--key", key_hex, "--policy", POLICY,
                 "--tunnel-src", PEER_GW, "--tunnel-dst", LOCAL_GW, "--direction", "in", "--batch", a.batch]
        if n > 1:
            extra += ["--install", n - 1, "--start", 1]
        r = drive(a, dp, sock, extra, timeout=600 + n / 1000 + a.runs * a.seconds * 3)
        rss1 = dp.rss_kb()
    except BaseException:
        dp.kill()
        raise
    s = dp.stop()
    res = {"sas": n, "start_seconds": dp.ready_seconds, "rss_kb_before": rss0, "rss_kb_after": rss1,
           "sa_count": r["sa_count"], "install": r["install"] or None, "runs": r["runs"],
           "mpps": rates(r["runs"], "decrypted_mpps"), "others_cpu": r["others_cpu"],
           "problems": summary_problems(s, "decrypt")}
    if r["sa_count"] != n:
        res["problems"].append("%d SAs installed, expected %d" % (r["sa_count"], n))
    if s.get("esp_decrypted", 0) <= 0:
        res["problems"].append("nothing decrypted")
    return res


def case_encrypt(a, tmp, key_path, n, plain_pcap):
    sock = os.path.join(tmp, "enc-%d.sock" % n)
    cfg = os.path.join(tmp, "enc-%d.toml" % n)
    rules, sas = [], []
    for i in range(n):
        r, s = out_rule_sa(i, key_path)
        rules.append(r)
        sas.append(s)
    config(cfg, a, "scale-enc-%d-%d" % (os.getpid(), n), a.packets, "net_pcap0,rx_pcap=%s,infinite_rx=1" % plain_pcap,
           "net_null0,no-rx=1", sock, rules, sas)
    del rules, sas
    rss_limit = None
    wait_quiet(a)
    dp = Dataplane(a, cfg, tmp, "enc-%d" % n, a.encrypt_timeout)
    try:
        rss_limit = dp.rss_kb()
        r = drive(a, dp, sock, ["--runs", a.runs, "--spi-base", SPI_BASE_OUT, "--key", "00" * 20,
                            "--tunnel-src", LOCAL_GW, "--tunnel-dst", PEER_GW], timeout=600 + a.runs * a.seconds * 3)
    except BaseException:
        dp.kill()
        raise
    s = dp.stop()
    res = {"sas": n, "rules": n, "start_seconds": dp.ready_seconds, "rss_kb": rss_limit, "sa_count": r["sa_count"],
           "runs": r["runs"], "mpps": rates(r["runs"], "encrypted_mpps"), "others_cpu": r["others_cpu"],
           "problems": summary_problems(s, "encrypt")}
    if s.get("esp_encrypted", 0) <= 0:
        res["problems"].append("nothing encrypted")
    return res


def case_install(a, tmp, key_hex, key_path, esp1):
    sock = os.path.join(tmp, "inst.sock")
    cfg = os.path.join(tmp, "inst.toml")
    rule = [("name", "remote-to-lan"), ("direction", "in"), ("src", REMOTE), ("dst", LAN), ("proto", "udp"),
            ("action", "protect"), ("sa", POLICY)]
    config(cfg, a, "scale-inst-%d" % os.getpid(), 256, "net_null0,no-rx=1",
           "net_pcap0,rx_pcap=%s,infinite_rx=1" % esp1, sock, [rule], [in_sa(0, key_path)])
    wait_quiet(a)
    dp = Dataplane(a, cfg, tmp, "inst", a.start_timeout)
    try:
        r = drive(a, dp, sock, ["--idle-runs", a.runs, "--runs", a.runs, "--install", a.install_count, "--start", 1,
                            "--batch", a.batch, "--spi-base", SPI_BASE_IN, "--key", key_hex, "--policy", POLICY,
                            "--tunnel-src", PEER_GW, "--tunnel-dst", LOCAL_GW, "--direction", "in"],
                  timeout=900 + a.install_count / 1000 + a.runs * a.seconds * 6)
        # Then Applies the size of a Child SA rekey (2 SAs, one at a time) on top
        # of the full table: what an Apply costs that does not scale with its batch.
        small = drive(a, dp, sock, ["--install", a.small_applies * 2, "--start", a.install_count + 1,
                                    "--batch", 2, "--window", 1, "--spi-base", SPI_BASE_IN, "--key", key_hex,
                                    "--policy", POLICY, "--tunnel-src", PEER_GW, "--tunnel-dst", LOCAL_GW,
                                    "--direction", "in"], timeout=600)
    except BaseException:
        dp.kill()
        raise
    s = dp.stop()
    idle = rates(r["idle"], "decrypted_mpps")
    during = r["install"]["forwarding"]["decrypted_mpps"]
    res = {"sas": a.install_count, "batch": a.batch, "install": r["install"], "idle": r["idle"], "after": r["runs"],
           "idle_mpps": idle, "during_mpps": during, "after_mpps": rates(r["runs"], "decrypted_mpps"),
           "sas_per_second": r["install"]["sas_per_second"],
           "forwarding_share": during / idle["median"] if idle and idle["median"] else None,
           "others_cpu": r["others_cpu"],
           "small": {"applies": a.small_applies, "sas_per_second": small["install"]["sas_per_second"],
                     "apply_seconds_median": small["install"]["apply_seconds_median"],
                     "apply_seconds_max": small["install"]["apply_seconds_max"]},
           "problems": summary_problems(s, "decrypt")}
    want = a.install_count + 1 + 2 * a.small_applies
    if small["sa_count"] != want:
        res["problems"].append("%d SAs installed, expected %d" % (small["sa_count"], want))
    return res


# ---------------------------------------------------------------------------- report


def _n(n):
    return "{:,}".format(int(n)).replace(",", " ")


def fmt(s):
    if not s:
        return "–"
    return fw.fmt_mpps(s)


def render(res):
    a = res["args"]
    out = ["# bitw at scale (perf/scale.py)", ""]
    m = res["machine"]
    out.append("%s, %s; commit %s%s; one worker on CPU %d; AES-128-GCM tunnel, 64-byte frames (60 + FCS), "
               "net_pcap infinite_rx (%s frames) -> net_null; %d run(s) x %g s per case (median (min–max)). "
               "Rates from the dataplane's counters (GetStats). A shared, noisy 2-core machine: read ±10 %%."
               % (res["date"], m["cpu_model"], m["git_commit"], " (dirty)" if m["git_dirty_dataplane"] else "",
                  a["core"], _n(a["packets"]), a["runs"], a["seconds"]))
    out.append("")
    dec = {c["sas"]: c for c in res["decrypt"] if "failed" not in c}
    enc = {c["sas"]: c for c in res["encrypt"] if "failed" not in c}
    out += ["## Throughput against the number of SAs", "",
            "Decrypt: N inbound SAs, one rule; the capture's frames cycle over min(N, %s) SPIs. Encrypt: N "
            "protect rules naming N outbound SAs, frames cycling over min(N, %s) destinations. "
            "*others* = CPU other processes used while the case ran (decrypt / encrypt)."
            % (_n(a["packets"]), _n(a["packets"])), "",
            "| SAs | decrypt Mpps | vs 1 SA | encrypt Mpps (N rules, N SAs) | vs 1 SA | encrypt start-up s | others |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    base_d = dec.get(min(dec)) if dec else None
    base_e = enc.get(min(enc)) if enc else None
    for n in a["counts"]:
        d, e = dec.get(n), enc.get(n)
        rd = "%.0f %%" % (100 * d["mpps"]["median"] / base_d["mpps"]["median"]) if d and base_d and d["mpps"] else "–"
        re_ = "%.0f %%" % (100 * e["mpps"]["median"] / base_e["mpps"]["median"]) if e and base_e and e["mpps"] else "–"
        ef = [c for c in res["encrypt"] if c["sas"] == n and "failed" in c]
        etxt = fmt(e["mpps"]) if e else ("not run: %s" % ef[0]["failed"].splitlines()[0][:120] if ef else "–")
        oth = "%s / %s" % ("%.2f" % d["others_cpu"] if d else "–", "%.2f" % e["others_cpu"] if e else "–")
        out.append("| %s | %s | %s | %s | %s | %s | %s |" % (_n(n), fmt(d["mpps"]) if d else "failed" if any(
            c["sas"] == n for c in res["decrypt"]) else "–", rd, etxt, re_, "%.1f" % e["start_seconds"] if e else "–",
            oth))
    out.append("")
    if dec and base_d and max(dec) >= 1000000 and dec[max(dec)]["mpps"]:
        loss = 1 - dec[max(dec)]["mpps"]["median"] / base_d["mpps"]["median"]
        out.append("Target: 1 000 000 SAs cost <= %d %% of the 1-SA decrypt throughput: **%s** (%.1f %% lost)."
                   % (TARGET_SCALE * 100, "met" if loss <= TARGET_SCALE else "not met", loss * 100))
        out.append("")
    out += ["## Memory (decrypt cases: VmRSS before and after installing N - 1 SAs)", "",
            "| SAs | RSS before MB | RSS after MB | MB per 100 000 SAs | SA install s (control channel) |",
            "|---:|---:|---:|---:|---:|"]
    for n in sorted(dec):
        c = dec[n]
        per = (c["rss_kb_after"] - c["rss_kb_before"]) / 1024 / max(n - 1, 1) * 100000 if n > 1 else None
        inst = c["install"]["seconds"] if c.get("install") else None
        out.append("| %s | %.0f | %.0f | %s | %s |" % (_n(n), c["rss_kb_before"] / 1024, c["rss_kb_after"] / 1024,
                                                      "%.1f" % per if per is not None else "–",
                                                      "%.1f" % inst if inst is not None else "–"))
    out.append("")
    i = res.get("install")
    if i and "failed" not in i:
        out += ["## SA installs while forwarding", "",
                "%s inbound SAs in Apply batches of %s (%d in flight), over the control channel, while the "
                "worker decrypts one SA's traffic at full rate." % (_n(i["sas"]), _n(i["batch"]), i["install"]["window"]),
                "",
                "| SAs/s | install s | Apply s (median / max, dataplane) | idle Mpps | Mpps during installs | share of idle | others |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                "| %s | %.2f | %.3f / %.3f | %s | %.2f | %.0f %% | %.2f |" % (
                    _n(i["sas_per_second"]), i["install"]["seconds"], i["install"]["apply_seconds_median"],
                    i["install"]["apply_seconds_max"], fmt(i["idle_mpps"]), i["during_mpps"],
                    100 * (i["forwarding_share"] or 0), i["others_cpu"]),
                "",
                "Target: >= %s SA installs per second while forwarding stays >= %d %% of idle: **%s**."
                % (_n(TARGET_INSTALL), TARGET_FORWARD_SHARE * 100,
                   "met" if i["sas_per_second"] >= TARGET_INSTALL and (i["forwarding_share"] or 0) >= TARGET_FORWARD_SHARE
                   else "not met"), ""]
        if i.get("small"):
            sm = i["small"]
            out += ["Then %s Applies of 2 SAs each, one at a time, on top of the %s (a Child SA rekey's "
                    "size): Apply median %.3f ms, max %.3f ms (dataplane); %s SAs/s." % (
                        _n(sm["applies"]), _n(i["sas"] + 1), 1000 * sm["apply_seconds_median"],
                        1000 * sm["apply_seconds_max"], _n(sm["sas_per_second"])), ""]
    elif i:
        out += ["## SA installs while forwarding", "", "failed: %s" % i["failed"][:500], ""]
    if res["problems"]:
        out += ["## Problems", ""] + ["- %s" % p for p in res["problems"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,1000,100000,1000000", help="SA counts (default 1,1000,100000,1000000)")
    ap.add_argument("--encrypt-counts", default=None,
                    help="SA / rule counts of the encrypt case (default: --counts)")
    ap.add_argument("--runs", type=int, default=5, help="measured windows per case, median (default 5)")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per window (default 2)")
    ap.add_argument("--packets", type=int, default=None,
                    help="frames in the looping captures (default: the largest count, at most %d)" % PACKETS_MAX)
    ap.add_argument("--install-count", type=int, default=None,
                    help="SAs installed in the install case (default: the largest count - 1)")
    ap.add_argument("--batch", type=int, default=10000, help="SAs per Apply (default 10000)")
    ap.add_argument("--small-applies", type=int, default=500,
                    help="install case: then this many Applies of 2 SAs on the full table (default 500)")
    ap.add_argument("--cases", default="decrypt,encrypt,install", help="subset of decrypt,encrypt,install")
    ap.add_argument("--core", type=int, default=1, help="CPU of the worker (default 1)")
    ap.add_argument("--start-timeout", type=float, default=120, help="seconds for a dataplane to start (default 120)")
    ap.add_argument("--encrypt-timeout", type=float, default=300,
                    help="seconds for an encrypt dataplane to start, rte_acl build included (default 300)")
    ap.add_argument("--max-others", type=float, default=0.15,
                    help="other processes' CPU use above which a case counts as disturbed (default 0.15)")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait for other processes to calm down before each case (default 60)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 and 1000 SAs, 1 run of 1 s")
    ap.add_argument("--bitw", default=os.environ.get("BITW_DATAPLANE", os.path.join(ROOT, "target/release/bitw-dataplane")))
    ap.add_argument("--scale-tool", default=None, help="bitw-scale (default: next to --bitw)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release first")
    ap.add_argument("--json-out", help="also write the results JSON here")
    ap.add_argument("--save", dest="save", action="store_true", default=None)
    ap.add_argument("--no-save", dest="save", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    if a.quick:
        a.counts, a.runs, a.seconds = "1,1000", 1, 1.0
        a.small_applies = min(a.small_applies, 20)
        a.quiet_wait = min(a.quiet_wait, 5)
        if a.save is None:
            a.save = False
    elif a.save is None:
        a.save = True
    counts = sorted({int(x) for x in a.counts.split(",") if x.strip()})
    enc_counts = sorted({int(x) for x in (a.encrypt_counts or a.counts).split(",") if x.strip()})
    cases = {x.strip() for x in a.cases.split(",") if x.strip()}
    if not cases <= {"decrypt", "encrypt", "install"}:
        ap.error("--cases: some of decrypt, encrypt, install")
    if not counts or counts[0] < 1 or counts[-1] > 1 << 20:
        ap.error("--counts: 1 .. 1048576")
    a.packets = a.packets or min(max(counts + enc_counts), PACKETS_MAX)
    if a.packets > PACKETS_MAX:
        ap.error("--packets: at most %d (the mbuf pool's limit without hugepages)" % PACKETS_MAX)
    if a.install_count is None:
        a.install_count = max(counts[-1] - 1, 1)
    if a.runs < 1 or a.seconds <= 0 or a.batch < 1:
        ap.error("--runs, --seconds and --batch must be positive")
    a.counts_list = counts

    git_info = fw.git_state()
    tool = a.scale_tool or os.path.join(os.path.dirname(os.path.abspath(a.bitw)), "bitw-scale")
    fw.build(["bitw-dataplane", "bitw-scale-tool"], a.no_build, [a.bitw, tool])
    tmp = tempfile.mkdtemp(prefix="bitw-scale-")
    # One benchmark, one binary, even if someone rebuilds meanwhile.
    for attr, path in (("bitw", a.bitw), ("scale_tool", tool)):
        dst = os.path.join(tmp, os.path.basename(path))
        shutil.copy2(path, dst)
        setattr(a, attr, dst)
    problems = []
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "args": {"counts": counts, "encrypt_counts": enc_counts, "runs": a.runs, "seconds": a.seconds,
                    "packets": a.packets, "install_count": a.install_count, "batch": a.batch, "core": a.core,
                    "quick": a.quick, "cases": sorted(cases), "frame": FRAME + 4},
           "decrypt": [], "encrypt": [], "install": None, "problems": problems}
    try:
        key_hex = os.urandom(20).hex()
        key_path = key_file(tmp, key_hex)
        plain_rev = os.path.join(tmp, "plain-rev.pcap")
        fw.write_pcap(plain_rev, [(d, s, dp, sp) for s, d, sp, dp in fw.flows(256)], (FRAME,))

        def esp_pcap(spis, packets):
            path = os.path.join(tmp, "esp-%d-%d.pcap" % (spis, packets))
            subprocess.run([a.scale_tool, "esp-pcap", "--plain", plain_rev, "--out", path, "--spis", str(spis),
                            "--spi-base", str(SPI_BASE_IN), "--packets", str(packets), "--key", key_hex],
                           check=True, capture_output=True)
            return path

        if "decrypt" in cases:
            for n in counts:
                log("== decrypt, %s SAs (%s-frame capture)" % (_n(n), _n(a.packets)))
                pcap = esp_pcap(n, a.packets)
                try:
                    c = case_decrypt(a, tmp, key_hex, key_path, n, pcap)
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                    c = {"sas": n, "failed": str(e)}
                    problems.append("decrypt %d: %s" % (n, str(e)[:300]))
                os.unlink(pcap)
                res["decrypt"].append(c)
                if "failed" not in c:
                    problems += ["decrypt %d: %s" % (n, p) for p in c["problems"]]
                    log("   %s Mpps; start %.1f s; install %s; RSS %.0f -> %.0f MB" % (
                        fmt(c["mpps"]), c["start_seconds"],
                        "%.1f s (%s SAs/s)" % (c["install"]["seconds"], _n(c["install"]["sas_per_second"]))
                        if c["install"] else "–", c["rss_kb_before"] / 1024, c["rss_kb_after"] / 1024))
                else:
                    log("   failed: %s" % c["failed"][:500])
        if "encrypt" in cases:
            for n in enc_counts:
                log("== encrypt, %s rules and SAs (config file, %s-frame capture)" % (_n(n), _n(a.packets)))
                plain = os.path.join(tmp, "plain-%d.pcap" % n)
                subprocess.run([a.scale_tool, "udp-pcap", "--out", plain, "--flows", str(n), "--packets",
                                str(a.packets), "--length", str(FRAME)], check=True, capture_output=True)
                try:
                    c = case_encrypt(a, tmp, key_path, n, plain)
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                    c = {"sas": n, "failed": str(e)}
                    log("   failed: %s" % str(e)[:500])
                os.unlink(plain)
                res["encrypt"].append(c)
                if "failed" not in c:
                    problems += ["encrypt %d: %s" % (n, p) for p in c["problems"]]
                    log("   %s Mpps; start %.1f s (config + rte_acl); RSS %.0f MB" % (
                        fmt(c["mpps"]), c["start_seconds"], c["rss_kb"] / 1024))
        if "install" in cases:
            log("== install %s SAs in batches of %s while decrypting" % (_n(a.install_count), _n(a.batch)))
            esp1 = esp_pcap(1, 256)
            try:
                c = case_install(a, tmp, key_hex, key_path, esp1)
                problems += ["install: %s" % p for p in c["problems"]]
                log("   %s SAs/s; forwarding %.2f Mpps during, %s idle (%.0f %%)" % (
                    _n(c["sas_per_second"]), c["during_mpps"], fmt(c["idle_mpps"]), 100 * (c["forwarding_share"] or 0)))
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                c = {"failed": str(e)}
                problems.append("install: %s" % str(e)[:300])
                log("   failed: %s" % str(e)[:500])
            res["install"] = c
    finally:
        if a.keep:
            log("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    dpdk = None
    res["machine"] = fw.machine_info(dpdk, git_info)
    res["args"]["counts"] = counts
    md = render(res)
    fw.publish("scale", res, md, a)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
