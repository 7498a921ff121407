#!/usr/bin/python3
"""memif benchmark: dpdk-testpmd as traffic source and sink around bitw-dataplane, over net_memif.

    python3 perf/memif.py                  # 5 runs x 5 s per frame size
    python3 perf/memif.py --quick          # smoke: 1 run x 1 s, 64 and 1420 bytes, not saved
    python3 perf/memif.py --sizes 64,1420 --runs 3 --seconds 3

Topology (three DPDK processes, each with its own --file-prefix):

    testpmd "source" (txonly)  --net_memif-->  bitw inside   [protect: ESP tunnel, AES-128-GCM]
    bitw outside               --net_memif-->  testpmd "sink" (rxonly, counts)

bitw is the memif server on both ports (it listens, as an appliance would); the testpmds are
clients. testpmd txonly sends UDP 198.18.0.1:9 -> 198.18.0.2:9 (its defaults); bitw has one
outbound protect rule for exactly that flow and one outbound tunnel SA 172.16.0.1 -> 172.16.0.2.

Per frame size, first a check run (the sink in io mode writes every packet it receives to a pcap
through net_pcap; a fixed number of bursts from the source, `start tx_first`): every captured
packet must be ESP of bitw's SA, with consecutive sequence numbers and the expected length, and
their count must equal what the source sent and what bitw encrypted. Then the measured runs:
source and sink rates from testpmd's port counters over a window, bitw's counters from its JSON
summary, and the loss (source TX - sink RX).

The machine has 2 cores: bitw's worker runs on CPU 1, both testpmds' forwarding lcores share
CPU 0 (their main lcores, which only read stdin, sit on CPU 1). The rates are those of this
shared setup, not bitw's limit; perf/esp.py measures that (and ipsec-secgw beside it).

Prints a Markdown table; saves JSON and Markdown under perf/results/ (see perf/README.md).
Standard library only. Needs root and DPDK 22.11 (dpdk-testpmd, net_memif, net_pcap).
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forwarding as fw  # noqa: E402  (quiet-machine runner, medians, saving, machine info)

ROOT = fw.ROOT

# RFC 2544 frame sizes count the 4-byte FCS; testpmd's --txpkts and the pcaps do not.
SIZES = [64, 128, 512, 1420]
QUICK_SIZES = [64, 1420]

# testpmd txonly's default flow (app/test-pmd/txonly.c, DPDK 22.11).
FLOW_SRC, FLOW_DST, FLOW_PORT = "198.18.0.1", "198.18.0.2", 9
TUNNEL_SRC, TUNNEL_DST = "172.16.0.1", "172.16.0.2"
SPI = 0x1001
# The source's memif MAC (fixed, so its frames are known byte for byte); testpmd sends to its
# default peer address 02:00:00:00:00:<port id>.
SOURCE_MAC = "02:00:00:00:00:01"
SINK_MAC = "02:00:00:00:00:02"
# memif rings of 2^14 slots (memif's maximum): a check run's bursts fit without the source dropping
# any, and the sink's ring absorbs ~15 ms of ESP at 1 Mpps while the sink waits for CPU 0.
MEMIF_RSIZE = 14
CHECK_BURSTS = 64  # per size in the check run: 64 x 32 = 2048 packets

TESTPMD_MBUFS = fw.MBUFS  # testpmd's default pool does not fit in 512 MB without hugepages


def esp_frame_len(frame):
    """Length of bitw's ESP frame (tunnel mode, without FCS) for a plaintext frame of `frame` bytes
    without FCS: Ethernet + outer IPv4 + ESP header + IV + (inner IP + pad to 4 incl. 2-byte trailer)
    + ICV."""
    inner = frame - 14
    padded = inner + 2 + (4 - (inner + 2) % 4) % 4
    return 14 + 20 + 8 + 8 + padded + 16


def memif_vdev(index, role, sock, mac=None):
    v = "net_memif%d,role=%s,socket=%s,socket-abstract=no,rsize=%d" % (index, role, sock, MEMIF_RSIZE)
    return v + (",mac=%s" % mac if mac else "")


def bitw_config(path, prefix, core, inside, outside, key_file, control_socket):
    """One worker, default discard, one protect rule for testpmd's flow, one outbound tunnel SA."""
    q = fw.toml_str
    lines = fw.config_head(prefix, core, inside, outside, default_action="discard",
                           control_socket=control_socket)
    lines += [
        "",
        "[[policy]]",
        'name = "testpmd-flow"',
        'direction = "out"',
        "src = %s" % q(FLOW_SRC + "/32"),
        "dst = %s" % q(FLOW_DST + "/32"),
        'proto = "udp"',
        'action = "protect"',
        'sa = "to-peer"',
        "",
        "[[sa]]",
        'name = "to-peer"',
        'direction = "out"',
        'spi = "0x%08x"' % SPI,
        'mode = "tunnel"',
        "tunnel_src = %s" % q(TUNNEL_SRC),
        "tunnel_dst = %s" % q(TUNNEL_DST),
        'aead = "aes128gcm16"',
        "key_file = %s" % q(key_file),
        "esn = false",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- processes


class Testpmd:
    """dpdk-testpmd -i driven through stdin (as perf/forwarding.py does: without a terminal, the
    non-interactive mode stops as soon as stdin is at EOF)."""

    def __init__(self, binary, name, prefix, vdevs, forward_mode, extra=(), log_dir=None):
        # Main lcore on CPU 1 (it only reads stdin), forwarding lcore on CPU 0: bitw's worker has
        # CPU 1 to itself, the source and the sink share CPU 0.
        # stdbuf: testpmd printf()s its statistics; into a pipe they would arrive only at exit.
        self.name = name
        self.cmd = (["stdbuf", "-oL", binary, "-l", "0,1", "--main-lcore", "1"] + fw.EAL_COMMON + ["--file-prefix", prefix]
                    + ["--vdev=%s" % v for v in vdevs]
                    + ["--", "-i", "--forward-mode=%s" % forward_mode, "--nb-cores=1",
                       "--burst=%d" % fw.BURST, "--total-num-mbufs=%d" % TESTPMD_MBUFS,
                       "--mbcache=%d" % fw.MBUF_CACHE] + list(extra))
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.out = bytearray()
        self.cond = threading.Condition()
        self.prompts = 0
        self.t = threading.Thread(target=self._reader, daemon=True)
        self.t.start()
        try:
            self.wait_prompt()
        except RuntimeError:
            self.kill()
            raise

    def _reader(self):
        while True:
            b = os.read(self.p.stdout.fileno(), 65536)
            with self.cond:
                if not b:
                    self.out.extend(b"\n<EOF>")
                    self.cond.notify_all()
                    return
                self.out.extend(b)
                self.cond.notify_all()

    def text(self):
        with self.cond:
            return self.out.decode(errors="replace")

    def wait_prompt(self, timeout=60):
        self.prompts += 1
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.out.count(b"testpmd> ") < self.prompts:
                if b"<EOF>" in self.out or time.monotonic() > deadline:
                    raise RuntimeError("testpmd %s: no prompt #%d; output:\n%s"
                                       % (self.name, self.prompts, self.out.decode(errors="replace")[-3000:]))
                self.cond.wait(0.1)

    def cmd_out(self, line, timeout=60):
        """Sends one command, waits for the next prompt; returns the output in between and the time."""
        with self.cond:
            start = len(self.out)
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()
        self.wait_prompt(timeout)
        t = time.monotonic()
        with self.cond:
            return self.out[start:].decode(errors="replace"), t

    def port_stats(self, port=0):
        text, t = self.cmd_out("show port stats %d" % port)
        m = re.search(r"RX-packets:\s+(\d+)\s+RX-missed:\s+(\d+).*?TX-packets:\s+(\d+)\s+TX-errors:\s+(\d+)",
                      text, re.S)
        if not m:
            raise RuntimeError("testpmd %s: no port stats in:\n%s" % (self.name, text[-2000:]))
        rx, missed, tx, errors = (int(x) for x in m.groups())
        return {"rx": rx, "rx_missed": missed, "tx": tx, "tx_errors": errors, "t": t}

    def stop_fwd(self):
        """`stop`: the forwarding statistics per port, {port: {rx, rx_dropped, tx, tx_dropped}}
        (TX-dropped = packets a full TX ring refused)."""
        text, _ = self.cmd_out("stop")
        ports = {}
        for m in re.finditer(r"Forward statistics for port (\d+).*?RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+).*?"
                             r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)", text, re.S):
            port, rx, rx_dropped, tx, tx_dropped = (int(x) for x in m.groups())
            ports[port] = {"rx": rx, "rx_dropped": rx_dropped, "tx": tx, "tx_dropped": tx_dropped}
        if 0 not in ports:
            raise RuntimeError("testpmd %s: no forward statistics in:\n%s" % (self.name, text[-2000:]))
        return ports

    def quit(self):
        try:
            if self.p.poll() is None:
                self.p.stdin.write(b"quit\n")
                self.p.stdin.close()
                self.p.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
        self.t.join(timeout=5)
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Bitw:
    """bitw-dataplane until SIGINT; its JSON summary on stop."""

    def __init__(self, binary, config):
        self.cmd = [binary, "--config", config]
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.err = []
        self.out = []
        self.ready = threading.Event()
        # stderr and stdout each have their own reader (stop() must not read a pipe a thread reads).
        self.t = threading.Thread(target=self._read_err, daemon=True)
        self.t.start()
        self.t_out = threading.Thread(target=lambda: self.out.append(self.p.stdout.read()), daemon=True)
        self.t_out.start()
        deadline = time.monotonic() + 60
        while not self.ready.wait(0.1):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("%s did not start forwarding:\n%s" % (" ".join(self.cmd), "".join(self.err)[-3000:]))

    def _read_err(self):
        for line in self.p.stderr:
            self.err.append(line)
            if "forwarding with" in line:
                self.ready.set()

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("%s did not stop on SIGINT" % " ".join(self.cmd))
        self.t.join(timeout=5)
        self.t_out.join(timeout=5)
        out = "".join(self.out)
        if self.p.returncode != 0:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(self.cmd), self.p.returncode, "".join(self.err)[-3000:]))
        try:
            return json.loads(out)
        except ValueError:
            raise RuntimeError("%s: no JSON summary:\n%s" % (" ".join(self.cmd), out[-2000:]))

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Path3:
    """bitw with a testpmd source on inside and a testpmd sink on outside, all over net_memif.

    sink_pcap: the sink forwards (io) everything it receives into a net_pcap tx_pcap file instead
    of only counting (rxonly). source_mode "io": the source sends only on `start tx_first N`.
    stem: the start of the three --file-prefix values."""

    def __init__(self, args, tmp, tag, frame, key, sink_pcap=None, source_mode="txonly", stem=None):
        self.procs = []
        run_dir = tempfile.mkdtemp(prefix="%s-" % tag, dir=tmp)
        inside_sock = os.path.join(run_dir, "inside.sock")
        outside_sock = os.path.join(run_dir, "outside.sock")
        cfg = os.path.join(run_dir, "bitw.toml")
        stem = stem or "perf-memif-%d-%s" % (os.getpid(), tag)
        bitw_config(cfg, stem + "-bitw", args.core, memif_vdev(0, "server", inside_sock),
                    memif_vdev(1, "server", outside_sock), key, os.path.join(run_dir, "control.sock"))
        try:
            self.bitw = Bitw(args.bitw, cfg)
            self.procs.append(self.bitw)
            sink_vdevs = [memif_vdev(0, "client", outside_sock, SINK_MAC)]
            if sink_pcap:
                # Port 0 -> port 1 (chained): every received packet goes into the capture.
                sink_vdevs.append("net_pcap0,tx_pcap=%s" % sink_pcap)
                self.sink = Testpmd(args.testpmd, "sink", stem + "-sink", sink_vdevs, "io",
                                    ["--port-topology=chained"])
            else:
                self.sink = Testpmd(args.testpmd, "sink", stem + "-sink", sink_vdevs, "rxonly")
            self.procs.append(self.sink)
            extra = ["--port-topology=loop"]
            if source_mode == "txonly":
                extra.append("--txpkts=%d" % frame)
            self.source = Testpmd(args.testpmd, "source", stem + "-source",
                                  [memif_vdev(0, "client", inside_sock, SOURCE_MAC)], source_mode, extra)
            self.procs.append(self.source)
            self.wait_link()
        except BaseException:
            self.kill()
            raise

    def wait_link(self, timeout=10):
        """Both memif links up (the clients connect to bitw's sockets after their start)."""
        deadline = time.monotonic() + timeout
        for tp in (self.source, self.sink):
            while True:
                text, _ = tp.cmd_out("show port info 0")
                if re.search(r"Link status:\s+up", text):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("testpmd %s: memif link to bitw not up:\n%s" % (tp.name, text[-1500:]))
                time.sleep(0.1)

    def finish(self):
        """bitw's summary, then the testpmds quit. Call after the source's and the sink's `stop`:
        nothing is in flight then. bitw stops first, while its memif peers are still connected
        (peers leaving under traffic are tested in tests/test_memif.py, not measured here)."""
        summary = self.bitw.stop()
        self.source.quit()
        self.sink.quit()
        return summary

    def kill(self):
        for p in self.procs:
            p.kill()


# ---------------------------------------------------------------------------- checks


def bitw_counts(s):
    """What the checks need from bitw's JSON summary (the worker counters; the port statistics
    agree with them, tests/test_memif.py checks that)."""
    w = s["workers"]
    drops = {k: v for k, v in s["drops"].items() if v}
    return {
        "rx_inside": sum(x["rx_inside"]["packets"] for x in w),
        "rx_outside": sum(x["rx_outside"]["packets"] for x in w),
        "tx_inside": sum(x["tx_inside"]["packets"] for x in w),
        "tx_outside": sum(x["tx_outside"]["packets"] for x in w),
        "esp_encrypted": s["esp_encrypted"],
        "esp_decrypted": s["esp_decrypted"],
        "bypassed": s["bypassed"],
        "uninspected": s["uninspected"],
        "non_ip": s["non_ip"],
        "drops": drops,
        "sa_packets": sum(x["packets"] for x in s.get("sas", [])),
        "duration_seconds": s["duration_seconds"],
    }


def path_problems(sent, b, sink_rx, allow_tx_full=False):
    """Every packet the source sent was encrypted by bitw, and every ESP packet bitw transmitted
    reached the sink; nothing else left bitw. allow_tx_full: packets bitw encrypted but could not
    transmit because the sink's ring was full are counted (drops.tx_full), not a failure: on two
    cores the sink does not always get the CPU in time (see render)."""
    problems = []
    tx_full = b["drops"].get("tx_full", 0)
    if b["rx_inside"] != sent:
        problems.append("bitw received %d on inside, the source sent %d" % (b["rx_inside"], sent))
    if not b["esp_encrypted"] == b["rx_inside"] == b["sa_packets"]:
        problems.append("esp_encrypted %d, inside rx %d, SA packets %d: should all be equal"
                        % (b["esp_encrypted"], b["rx_inside"], b["sa_packets"]))
    if b["tx_outside"] != sink_rx:
        problems.append("bitw sent %d ESP packets on outside, the sink received %d" % (b["tx_outside"], sink_rx))
    if b["esp_encrypted"] != b["tx_outside"] + tx_full:
        problems.append("esp_encrypted %d != outside tx %d + tx_full drops %d"
                        % (b["esp_encrypted"], b["tx_outside"], tx_full))
    leaked = {k: b[k] for k in ("bypassed", "uninspected", "non_ip", "rx_outside", "tx_inside", "esp_decrypted")
              if b[k]}
    if leaked:
        problems.append("bitw passed or saw traffic other than ESP out: %s" % leaked)
    other = {k: v for k, v in b["drops"].items() if k != "tx_full" or not allow_tx_full}
    if other:
        problems.append("bitw drops %s" % other)
    return problems


def esp_capture_problems(frames, frame, count, seq0=1):
    """Every frame is bitw's ESP (outer IPv4 172.16.0.1 -> .2, proto 50, SPI, consecutive sequence
    numbers from seq0) of the expected length, the MACs of the source's frame kept. Stdlib only: the
    ESP payload is not opened here (tests/test_memif.py decrypts it with Scapy)."""
    problems = []
    want_len = esp_frame_len(frame)
    src = bytes(int(x) for x in TUNNEL_SRC.split("."))
    dst = bytes(int(x) for x in TUNNEL_DST.split("."))
    macs = bytes.fromhex("020000000000") + bytes.fromhex(SOURCE_MAC.replace(":", ""))
    if len(frames) != count:
        problems.append("capture holds %d frames, expected %d" % (len(frames), count))
    for i, f in enumerate(frames):
        bad = []
        if len(f) != want_len:
            bad.append("%d bytes, expected %d" % (len(f), want_len))
        if len(f) < 14 + 20 + 8:
            problems.append("frame %d: too short (%d bytes)" % (i, len(f)))
            break
        if f[:12] != macs:
            bad.append("MACs %s" % f[:12].hex())
        if f[12:14] != b"\x08\x00" or f[14] != 0x45 or f[23] != 50 or f[26:30] != src or f[30:34] != dst:
            bad.append("not ESP from %s to %s: %s" % (TUNNEL_SRC, TUNNEL_DST, f[12:34].hex()))
        if fw._csum(f[14:34]) != 0:
            bad.append("outer IPv4 header checksum")
        spi, seq = struct.unpack_from("!II", f, 34)
        if spi != SPI or seq != seq0 + i:
            bad.append("SPI %#x seq %d, expected %#x seq %d" % (spi, seq, SPI, seq0 + i))
        if bad:
            problems.append("frame %d: %s" % (i, "; ".join(bad)))
            if len(problems) >= 5:
                break
    return problems


def read_pcap(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return []
    end = "<" if struct.unpack_from("<I", data, 0)[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off, frames = 24, []
    while off + 16 <= len(data):
        incl = struct.unpack_from(end + "IIII", data, off)[2]
        off += 16
        frames.append(data[off:off + incl])
        off += incl
    return frames


# ---------------------------------------------------------------------------- runs


def check_run(args, tmp, size, key):
    """A fixed number of bursts through the whole path into a capture; every packet checked."""
    frame = size - 4
    pcap = os.path.join(tmp, "sink-%d.pcap" % size)
    # Source in io mode: `start tx_first N` sends N bursts of txonly's packets, then forwards
    # nothing (nothing comes back): an exact count.
    path = Path3(args, tmp, "check%d" % size, frame, key, sink_pcap=pcap, source_mode="io")
    try:
        path.source.cmd_out("set txpkts %d" % frame)
        path.sink.cmd_out("start")
        path.source.cmd_out("start tx_first %d" % CHECK_BURSTS)
        time.sleep(0.5)
        src = path.source.stop_fwd()[0]
        time.sleep(0.2)  # let bitw and the sink drain the rings
        sink_ports = path.sink.stop_fwd()
        s = path.finish()
    except BaseException:
        path.kill()
        raise
    b = bitw_counts(s)
    frames = read_pcap(pcap)
    problems = []
    if src["tx_dropped"]:
        problems.append("source: %d packets refused by the memif ring" % src["tx_dropped"])
    sink, captured = sink_ports[0], sink_ports.get(1, {}).get("tx", 0)
    problems += path_problems(src["tx"], b, sink["rx"])
    if captured != sink["rx"]:
        problems.append("sink wrote %d of %d received packets to the capture" % (captured, sink["rx"]))
    problems += esp_capture_problems(frames, frame, src["tx"])
    return {"size": size, "sent": src["tx"], "captured": len(frames), "bitw": b, "problems": problems}


def measured_run(args, tmp, size, key, n):
    """Source txonly at full speed; rates over a window of --seconds after --warmup."""
    frame = size - 4
    path = Path3(args, tmp, "run%d-%d" % (size, n), frame, key)
    try:
        path.sink.cmd_out("start")
        path.source.cmd_out("start")
        time.sleep(args.warmup)
        s0, k0 = path.source.port_stats(), path.sink.port_stats()
        time.sleep(args.seconds)
        s1, k1 = path.source.port_stats(), path.sink.port_stats()
        src = path.source.stop_fwd()[0]
        time.sleep(0.2)  # let bitw and the sink drain the rings
        sink = path.sink.stop_fwd()[0]
        summary = path.finish()
    except BaseException:
        path.kill()
        raise
    b = bitw_counts(summary)
    # Each show's time is when its prompt came back; both tools' windows are the same length.
    tx_pps = (s1["tx"] - s0["tx"]) / (s1["t"] - s0["t"])
    rx_pps = (k1["rx"] - k0["rx"]) / (k1["t"] - k0["t"])
    problems = path_problems(src["tx"], b, sink["rx"], allow_tx_full=True)
    if k1["rx_missed"] or s1["tx_errors"]:
        problems.append("sink rx_missed %d, source tx_errors %d" % (k1["rx_missed"], s1["tx_errors"]))
    return {
        "source_mpps": tx_pps / 1e6,
        "sink_mpps": rx_pps / 1e6,
        "window_seconds": s1["t"] - s0["t"],
        "source_tx": src["tx"],
        # Packets the source offered but the memif ring to bitw had no room for: back-pressure
        # (bitw slower than the source), not loss inside the path.
        "source_refused": src["tx_dropped"],
        "sink_rx": sink["rx"],
        "lost": src["tx"] - sink["rx"],
        "bitw": b,
        "dpdk": summary.get("dpdk"),
        "problems": problems,
    }


# ---------------------------------------------------------------------------- report


def render(res):
    out = ["## memif: testpmd txonly -> bitw (ESP, AES-128-GCM tunnel) -> testpmd rxonly", ""]
    out.append("%s; %d run(s) x %g s per size (+ %g s warm-up), medians (min–max). Source and sink are "
               "dpdk-testpmd over net_memif; bitw's worker on CPU %d, both testpmds' forwarding lcores share "
               "CPU 0 (2-core machine: the rates are this shared setup's, not bitw's limit — see esp.py)."
               % (res["date"], res["args"]["runs"], res["args"]["seconds"], res["args"]["warmup"],
                  res["args"]["core"]))
    out.append("")
    out.append("| Frame (incl. FCS) | ESP frame | source Mpps | sink Mpps | sink Gbps (plaintext) | "
               "bitw encrypted | bitw outside TX | lost (= bitw tx_full) | refused by ring | check run |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in res["cases"]:
        chk = c["check"]
        chk_txt = ("%d/%d ESP ok" % (chk["captured"], chk["sent"]) if not chk["problems"]
                   else "FAILED") if chk else "—"
        if "failed" in c:
            out.append("| %d | %d | failed | | | | | | | %s |" % (c["size"], c["esp_frame"], chk_txt))
            continue
        out.append("| %d | %d | %s | %s | %.2f | %d | %d | %d | %d | %s |" % (
            c["size"], c["esp_frame"], fw.fmt_mpps(c["source_mpps"]), fw.fmt_mpps(c["sink_mpps"]),
            c["sink_mpps"]["median"] * c["size"] * 8 / 1e3, sum(r["bitw"]["esp_encrypted"] for r in c["raw"]),
            sum(r["bitw"]["tx_outside"] for r in c["raw"]), c["lost_total"], c["refused_total"], chk_txt))
    out.append("")
    out.append("- *source Mpps*: packets the source's memif port accepted per second (testpmd's port counters "
               "over the window); *sink Mpps*: ESP packets the sink received per second; *sink Gbps*: sink Mpps × the "
               "plaintext frame size. Counts are totals over all runs (whole runs, not the window): *lost* = "
               "source TX − sink RX; each lost packet must be one bitw encrypted but found no room for in the "
               "sink's ring (`drops.tx_full`: the sink shares CPU 0 with the source and is not always scheduled "
               "in time). *refused by ring*: packets the source offered while the memif ring to bitw was full "
               "(testpmd's TX-dropped: back-pressure, bitw or the CPU was busy; txonly retries at once).")
    out.append("- Every run checks bitw's counters: inside RX = source TX = esp_encrypted = SA packets, "
               "outside TX = sink RX, esp_encrypted = outside TX + tx_full drops; nothing bypassed, "
               "uninspected, non-IP or decrypted, no other drop. The check run per size captures every packet "
               "at the sink (io → net_pcap) and checks each is bitw's ESP (outer header, SPI, consecutive "
               "sequence numbers, length); no loss allowed there.")
    if res.get("disturbed_runs"):
        out.append("- %d run(s) kept although other processes used more than %.2f CPU during them "
                   "(after %d repeat(s) each); their rates are low." % (res["disturbed_runs"], res["args"]["max_others"],
                                                                     res["args"]["retries"]))
    if res["problems"]:
        out += ["", "Problems:", ""] + ["- %s" % p for p in res["problems"]]
    m = res["machine"]
    out += ["", "Machine: %s, %d CPUs, kernel %s, %s; commit %s%s." % (m.get("cpu_model"), m.get("cpus"),
                                                                          m.get("kernel"), m.get("dpdk"),
                                                       m.get("git_commit"),
                                                       " (dataplane sources modified)" if m.get("git_dirty_dataplane") else "")]
    return "\n".join(out) + "\n"


def parse_sizes(text, ap):
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error("--sizes: comma-separated frame sizes in bytes incl. FCS, e.g. 64,1420")
    if not sizes or any(not 64 <= s <= 1518 for s in sizes):
        ap.error("--sizes: frame sizes 64..1518 (incl. FCS)")
    return sizes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="measured runs per size (default 5)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured window per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic before the window (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke: 1 run x 1 s (0.5 s warm-up), sizes 64,1420; not saved unless --save")
    ap.add_argument("--sizes", default=None,
                    help="frame sizes incl. FCS (default %s)" % ",".join(str(s) for s in SIZES))
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the capture check run per size")
    ap.add_argument("--core", type=int, default=1, help="CPU of bitw's worker (default 1)")
    ap.add_argument("--testpmd", default="dpdk-testpmd")
    ap.add_argument("--bitw", default=os.environ.get("BITW_DATAPLANE", os.path.join(ROOT, "target/release/bitw-dataplane")))
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release -p bitw-dataplane first")
    ap.add_argument("--max-others", type=float, default=0.15,
                    help="before each run, wait until other processes use less CPU than this (default 0.15)")
    ap.add_argument("--retries", type=int, default=2,
                    help="repeat a run during which other processes used more than --max-others CPU, up to "
                         "this many times (default 2; --quick 0). Our own three processes do not count.")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait at most for a quiet machine before each run (default 60)")
    ap.add_argument("--save", dest="save", action="store_true", default=None,
                    help="save results under perf/results/ (default unless --quick)")
    ap.add_argument("--no-save", dest="save", action="store_false")
    ap.add_argument("--json-out", default=None, metavar="PATH", help="also write the results JSON to PATH")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.seconds, args.warmup = 1, 1.0, 0.5
        args.quiet_wait, args.retries = min(args.quiet_wait, 5), 0
        args.sizes = args.sizes or ",".join(str(s) for s in QUICK_SIZES)
        if args.save is None:
            args.save = False
    elif args.save is None:
        args.save = True
    if args.runs < 1 or args.seconds <= 0 or args.warmup < 0:
        ap.error("--runs and --seconds must be positive")
    if args.core == 0:
        ap.error("--core must not be 0: the testpmds forward on CPU 0")
    sizes = parse_sizes(args.sizes or ",".join(str(s) for s in SIZES), ap)
    if os.geteuid() != 0:
        print("warning: not root; DPDK usually needs root", file=sys.stderr)
    tp = shutil.which(args.testpmd)
    if not tp:
        raise SystemExit("%s not found (Debian package dpdk)" % args.testpmd)
    args.testpmd = tp

    git_info = fw.git_state()
    fw.build(["bitw-dataplane"], args.no_build, [args.bitw])

    tmp = tempfile.mkdtemp(prefix="bitw-memif-")
    problems, failed = [], []
    try:
        snap = os.path.join(tmp, "bitw-dataplane")  # one binary for the whole benchmark
        shutil.copy2(args.bitw, snap)
        args.bitw = snap
        key = fw.sa_key_file(tmp)
        bench = fw.Bench(args, tmp)
        res = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python3 perf/memif.py"] + sys.argv[1:]),
            "args": {"runs": args.runs, "seconds": args.seconds, "warmup": args.warmup, "core": args.core,
                     "quick": args.quick, "sizes": sizes, "check": args.check, "check_bursts": CHECK_BURSTS,
                     "burst": fw.BURST, "memif_rsize": MEMIF_RSIZE, "eal": fw.EAL_COMMON,
                     "flow": [FLOW_SRC, FLOW_DST, FLOW_PORT], "tunnel": [TUNNEL_SRC, TUNNEL_DST],
                     "aead": "aes128gcm16", "max_others": args.max_others, "retries": args.retries},
            "loadavg_before": " ".join(open("/proc/loadavg").read().split()[:3]),
        }
        cases = []
        for size in sizes:
            c = {"size": size, "frame_without_fcs": size - 4, "esp_frame": esp_frame_len(size - 4) + 4,
                 "check": None, "raw": []}
            cases.append(c)
            if args.check:
                tag = "%d B check" % size
                try:
                    r = check_run(args, tmp, size, key)
                except RuntimeError as e:
                    r = {"size": size, "sent": 0, "captured": 0, "problems": ["failed: %s" % str(e).splitlines()[0]]}
                    print("  %s FAILED: %s" % (tag, e), file=sys.stderr)
                c["check"] = r
                problems += ["%s: %s" % (tag, p) for p in r["problems"]]
                print("  %-18s %d sent, %d captured as ESP%s" % (
                    tag, r["sent"], r["captured"], "" if not r["problems"] else "  PROBLEM: " + "; ".join(r["problems"])),
                    file=sys.stderr)
            for i in range(args.runs):
                tag = "%d B run %d/%d" % (size, i + 1, args.runs)
                try:
                    r = bench.measure(tag, measured_run, args, tmp, size, key, i)
                except RuntimeError as e:
                    c["failed"] = str(e).splitlines()[0]
                    failed.append("%s: %s" % (tag, c["failed"]))
                    print("  %s FAILED: %s" % (tag, e), file=sys.stderr)
                    break
                c["raw"].append(r)
                problems += ["%s: %s" % (tag, p) for p in r["problems"]]
                print("  %-18s source %.3f Mpps, sink %.3f Mpps, lost %d, refused %d%s" % (
                    tag, r["source_mpps"], r["sink_mpps"], r["lost"], r["source_refused"],
                    "" if not r["problems"] else "  PROBLEM: " + "; ".join(r["problems"])), file=sys.stderr)
            if c["raw"] and "failed" not in c:
                c["source_mpps"] = fw.summarise([r["source_mpps"] for r in c["raw"]])
                c["sink_mpps"] = fw.summarise([r["sink_mpps"] for r in c["raw"]])
                c["lost_total"] = sum(r["lost"] for r in c["raw"])
                c["refused_total"] = sum(r["source_refused"] for r in c["raw"])
                c["bitw_esp_encrypted"] = [r["bitw"]["esp_encrypted"] for r in c["raw"]]
        res["cases"] = cases
        res["loadavg_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
        dpdk = next((r["dpdk"] for c in cases for r in c["raw"] if r.get("dpdk")), None)
        res["machine"] = fw.machine_info(dpdk, git_info)
        insane = list(failed)
        for c in cases:
            if "failed" in c:
                continue
            for k in ("source_mpps", "sink_mpps"):
                if not 0.01 < c[k]["median"] < 200:
                    insane.append("%d B: %s %.4f" % (c["size"], k, c[k]["median"]))
        res["problems"] = problems
        res["failed"] = insane
        res["disturbed_runs"] = bench.disturbed
        res["repeated_runs"] = sum(r.get("attempt", 1) - 1 for c in cases for r in c["raw"])
        md = render(res)
        fw.publish("memif", res, md, args)
        if insane:
            print("FAIL: failed or implausible runs: " + "; ".join(insane), file=sys.stderr)
            return 1
        if problems:
            print("FAIL: %d check(s) failed (listed under the table)" % len(problems), file=sys.stderr)
            return 1
        return 0
    finally:
        if args.keep:
            print("kept %s" % tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        # EAL leaves an empty /var/run/dpdk/<file-prefix>/ per process: remove ours.
        for d in glob.glob("/var/run/dpdk/perf-memif-%d-*" % os.getpid()):
            try:
                os.rmdir(d)  # only if empty
            except OSError:
                pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
