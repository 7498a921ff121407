"""Shared helpers of the bitw system tests: configs, runs of the binary, pcaps.

Imported by the test modules (pytest puts tests/ on sys.path) and by conftest.py.
Nothing here knows the dataplane's internals: it writes TOML, runs the binary
as an operator would, and reads what comes out (exit code, stderr, JSON, pcaps).
"""

import itertools
import json
import os
import signal
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = REPO_ROOT / "target" / "release" / "bitw-dataplane"

# Exit codes documented by `bitw-dataplane --help`.
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DPDK = 3
EXIT_WORKER = 4

# Every drop reason of the JSON summary (`drops`), as documented.
DROP_REASONS = (
    "malformed", "policy_discard", "default_discard", "protect_no_sa", "tx_full", "no_sa",
    "replay", "icv", "expired", "policy_mismatch", "unprotected", "oversize", "handoff_full",
    "fragment", "dummy", "punt_full", "punt_no_control", "hold_overflow", "hold_timeout",
    "hold_failed", "inject_failed",
)
# The reasons the control thread counts (the summary's control.drops; Stats.control_drops).
CONTROL_DROP_REASONS = (
    "protect_no_sa", "punt_no_control", "hold_overflow", "hold_timeout", "hold_failed",
    "inject_failed",
)

# Control-channel sockets of test runs (one per run, named after its --file-prefix,
# so runs never meet on the default /run/bitw/dataplane.sock).
SOCKET_DIR = Path("/tmp/bitw-test-sockets")


def drops(**counts):
    """A complete `drops` dict: every reason 0 but those given."""
    unknown = set(counts) - set(DROP_REASONS)
    assert not unknown, f"test bug: unknown drop reasons {unknown}"
    return {r: counts.get(r, 0) for r in DROP_REASONS}


# Generous: a run of --run-for 2 takes ~2.5 s; these only catch hangs.
RUN_TIMEOUT = 60
CHECK_TIMEOUT = 20

_seq = itertools.count()
# Every --file-prefix of this test session starts with this.
TEST_PREFIX_STEM = f"bitw-test-{os.getpid()}-"


def unique_prefix(tag="t"):
    """A DPDK --file-prefix no other run (of this or another test session) uses."""
    return f"{TEST_PREFIX_STEM}{next(_seq)}-{tag}-{uuid.uuid4().hex[:6]}"


def eal_args(prefix):
    return [
        "--no-huge", "-m", "512", "--no-pci", "--no-shconf", "--no-telemetry",
        "--file-prefix", prefix,
    ]


def toml_str(s):
    """A TOML basic string (JSON's escaping is valid TOML for what we write)."""
    return json.dumps(str(s))


def toml_value(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return toml_str(v)


def control_socket(prefix):
    """The control-channel socket of the run with this --file-prefix."""
    path = SOCKET_DIR / f"{prefix}.sock"
    assert len(str(path)) < 104, f"test bug: socket path too long for AF_UNIX: {path}"
    return path


def render_config(inside, outside, policies=(), *, prefix, workers=1, burst=32,
                  default_action="bypass", extra_dataplane=None, sas=(), control=None):
    """The text of a config file. `policies` and `sas` are dicts of TOML keys, in
    order (a dict value becomes an inline table, e.g. lifetime_packets). A
    [control] section comes last, its socket `control_socket(prefix)` unless
    `control` (a dict of [control] keys) says otherwise."""
    lines = [
        "# written by the bitw system tests",
        "[eal]",
        f"args = {toml_value(eal_args(prefix))}",
        "",
        "[dataplane]",
        f"workers = {workers}",
        f"burst = {burst}",
        f"default_action = {toml_str(default_action)}",
    ]
    for k, v in (extra_dataplane or {}).items():
        lines.append(f"{k} = {toml_value(v)}")
    lines += [
        "",
        "[ports.inside]",
        f"device = {toml_str(inside)}",
        "[ports.outside]",
        f"device = {toml_str(outside)}",
    ]
    for table, entries in (("policy", policies), ("sa", sas)):
        for p in entries:
            lines += ["", f"[[{table}]]"]
            for k, v in p.items():
                lines.append(f"{k} = {toml_value(v)}")
    control = {"socket": str(control_socket(prefix)), **(control or {})}
    lines += ["", "[control]"] + [f"{k} = {toml_value(v)}" for k, v in control.items()]
    return "\n".join(lines) + "\n"


def write_key_file(path, key_material):
    """Writes an SA key file as bitw wants it: hex (key, then the 4-byte salt),
    mode 0600 from the start (bitw refuses key files readable by others)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(bytes(key_material).hex() + "\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file
    return path


def pcap_device(index, rx, tx):
    return f"net_pcap{index},rx_pcap={rx},tx_pcap={tx}"


def pcap_device_queues(index, rxs, txs):
    """A net_pcap port with one queue pair per (rx, tx) capture: queue i reads
    rxs[i] and writes txs[i] (one queue per worker)."""
    assert len(rxs) == len(txs), "test bug: one tx capture per rx capture"
    args = [f"rx_pcap={r}" for r in rxs] + [f"tx_pcap={t}" for t in txs]
    return f"net_pcap{index}," + ",".join(args)


class Run:
    """The outcome of one run of the binary."""

    def __init__(self, args, returncode, stdout, stderr):
        self.args = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def json(self):
        try:
            return json.loads(self.stdout)
        except ValueError as e:
            raise AssertionError(
                f"stdout is not a JSON summary ({e}):\n{self.stdout}\n--- stderr:\n{self.stderr}"
            ) from None

    def describe(self):
        return (f"command: {' '.join(map(str, self.args))}\nexit code: {self.returncode}\n"
                f"--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}")


def run_binary(binary, *args, timeout=RUN_TIMEOUT, cwd=None):
    cmd = [str(binary), *map(str, args)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout} s "
                             f"(stderr so far: {e.stderr!r})") from None
    return Run(cmd, p.returncode, p.stdout, p.stderr)


def run_config(binary, config_path, run_for=2, **kw):
    """A real run: --run-for seconds, expecting exit 0 and a JSON summary."""
    r = run_binary(binary, "--config", config_path, "--run-for", run_for, **kw)
    assert r.returncode == EXIT_OK, r.describe()
    assert "panicked" not in r.stderr, r.describe()
    return r, r.json()


class Background:
    """The binary running without --run-for, stderr watched line by line."""

    def __init__(self, binary, config_path, cwd=None):
        self.cmd = [str(binary), "--config", str(config_path)]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, cwd=cwd)
        self.stderr_lines = []
        self._stdout = []
        self._forwarding = threading.Event()
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err.start()
        self._t_out.start()

    def _read_err(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "forwarding with" in line:
                self._forwarding.set()

    def _read_out(self):
        self._stdout.append(self.proc.stdout.read())

    def wait_forwarding(self, timeout=30):
        """Waits for the binary's 'forwarding with …' line (workers about to start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._forwarding.wait(0.1):
                return True
            if self.proc.poll() is not None:
                return False
        return False

    def signal(self, sig):
        self.proc.send_signal(sig)

    def finish(self, timeout=30):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.cmd)} did not stop within {timeout} s") from None
        self._t_err.join(5)
        self._t_out.join(5)
        return Run(self.cmd, rc, "".join(self._stdout), "".join(self.stderr_lines))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def write_pcap(path, frames):
    """Writes raw Ethernet frames (bytes) to a pcap file, linktype Ethernet, in order."""
    from scapy.utils import PcapWriter

    frames = [bytes(f) for f in frames]
    if not frames:
        # Scapy writes the file header with the first packet; net_pcap needs a valid file.
        with open(path, "wb") as fh:
            fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        return
    w = PcapWriter(str(path), linktype=1, sync=True)
    try:
        w.write(frames)
    finally:
        w.close()


def read_pcap(path):
    """The raw frames of a pcap file, in order (classic pcap, µs or ns, either byte order)."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise AssertionError(f"{path}: not a pcap file ({len(data)} bytes)")
    for endian in "<>":
        magic = struct.unpack_from(endian + "I", data, 0)[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            break
    else:
        raise AssertionError(f"{path}: not a classic pcap file (magic {data[:4].hex()})")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    assert linktype == 1, f"{path}: linktype {linktype}, expected Ethernet"
    frames, off = [], 24
    while off < len(data):
        if off + 16 > len(data):
            raise AssertionError(f"{path}: truncated record header at byte {off}")
        _sec, _frac, caplen, wirelen = struct.unpack_from(endian + "IIII", data, off)
        off += 16
        if off + caplen > len(data):
            raise AssertionError(f"{path}: truncated record at byte {off}")
        assert caplen == wirelen, f"{path}: frame cut by snaplen ({caplen} of {wirelen} bytes)"
        frames.append(data[off:off + caplen])
        off += caplen
    return frames


def frames_diff(got, want, describe=None):
    """A readable account of how two frame lists differ (None if equal)."""
    if got == want:
        return None
    out = [f"got {len(got)} frames, expected {len(want)}"]
    for i in range(max(len(got), len(want))):
        g = got[i] if i < len(got) else None
        w = want[i] if i < len(want) else None
        if g != w:
            out.append(f"first difference at frame #{i}:")
            out.append(f"  got:      {g.hex() if g is not None else '(none)'}")
            out.append(f"  expected: {w.hex() if w is not None else '(none)'}")
            if describe and w is not None:
                out.append(f"  expected frame is: {describe(w)}")
            if describe and g is not None:
                out.append(f"  got frame is: {describe(g)}")
            break
    return "\n".join(out)
