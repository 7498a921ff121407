"""Helpers of the control-process system tests: the `[control]` section,
`bitw-control` in the background, `bitwctl` runs, and a real Prometheus server.

Like bitw_testlib, nothing here knows the binaries' internals: it writes TOML,
runs the programs as an operator would and reads what they print.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from signal import SIGKILL, SIGTERM

from bitw_testlib import REPO_ROOT, Run, toml_str

CONTROL_BINARY = Path(os.environ.get("BITW_CONTROL", REPO_ROOT / "target/release/bitw-control"))
BITWCTL_BINARY = Path(os.environ.get("BITWCTL", REPO_ROOT / "target/release/bitwctl"))

# bitwctl's documented exit codes.
CTL_OK, CTL_REFUSED, CTL_USAGE, CTL_UNREACHABLE = 0, 1, 2, 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def control_keys(tmp_path, *, metrics_port=None, **extra):
    """`[control]` keys with the sockets under tmp_path (for render_config(control=...))."""
    tmp_path = Path(tmp_path)
    keys = {
        "socket": str(tmp_path / "dataplane.sock"),
        "admin_socket": str(tmp_path / "control.sock"),
        "metrics_listen": f"127.0.0.1:{metrics_port}" if metrics_port else "off",
        "ping_interval": "500ms",
        "reconnect_interval": "200ms",
    }
    keys.update(extra)
    return keys


def terminal_tables(terminals):
    """`[[terminal]]` tables for (name, address) pairs."""
    lines = []
    for name, addr in terminals:
        lines += ["", "[[terminal]]", f"name = {toml_str(name)}", f"address = {toml_str(addr)}"]
    return "\n".join(lines) + "\n"


def control_section(tmp_path, *, metrics_port=None, terminals=(), **extra):
    """`[control]` (sockets under tmp_path) and `[[terminal]]` tables, as text."""
    keys = control_keys(tmp_path, metrics_port=metrics_port, **extra)
    lines = ["", "[control]"] + [f"{k} = {v if isinstance(v, int) else toml_str(v)}"
                                 for k, v in keys.items()]
    return "\n".join(lines) + "\n" + terminal_tables(terminals)


class Proc:
    """A long-running program with its stderr collected line by line."""

    def __init__(self, cmd, cwd=None):
        self.cmd = [str(c) for c in cmd]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, cwd=cwd)
        self.lines = []
        self._cv = threading.Condition()
        self._out = []
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out = threading.Thread(target=lambda: self._out.append(self.proc.stdout.read()),
                                       daemon=True)
        self._t_err.start()
        self._t_out.start()

    def _read_err(self):
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    def log(self):
        with self._cv:
            return "".join(self.lines)

    def wait_line(self, pattern, timeout=20, start=0):
        """Waits for a stderr line matching `pattern` (a regex) at index >= start;
        returns the match. Fails with the log when it does not come."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._t_err.is_alive():
                    raise AssertionError(
                        f"no line matching {pattern!r} from {' '.join(self.cmd)} "
                        f"(exit code {self.proc.poll()}); stderr:\n{''.join(self.lines)}")
                self._cv.wait(min(left, 0.2))

    def mark(self):
        """The index of the next stderr line (for wait_line(start=...))."""
        with self._cv:
            return len(self.lines)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(SIGKILL)
            self.proc.wait(10)

    def finish(self, timeout=30, sig=SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.cmd)} did not stop within {timeout} s") from None
        self._t_err.join(5)
        self._t_out.join(5)
        return Run(self.cmd, rc, "".join(self._out), self.log())


def start_control(config_path):
    if not CONTROL_BINARY.is_file():
        raise AssertionError(f"{CONTROL_BINARY} not found: build with `cargo build --release`")
    return Proc([CONTROL_BINARY, "--config", config_path])


def bitwctl(*args, socket_path=None, config=None, as_json=True, timeout=30):
    """Runs bitwctl; returns (exit code, parsed JSON or stdout text, stderr)."""
    if not BITWCTL_BINARY.is_file():
        raise AssertionError(f"{BITWCTL_BINARY} not found: build with `cargo build --release`")
    cmd = [str(BITWCTL_BINARY)]
    if socket_path:
        cmd += ["--socket", str(socket_path)]
    if config:
        cmd += ["--config", str(config)]
    cmd += [str(a) for a in args]
    if as_json:
        cmd.append("--json")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    out = p.stdout
    if as_json and p.returncode == 0:
        try:
            out = json.loads(p.stdout)
        except ValueError:
            raise AssertionError(f"{' '.join(cmd)}: stdout is not JSON:\n{p.stdout}\n"
                                 f"stderr:\n{p.stderr}") from None
    return p.returncode, out, p.stderr


def ctl_ok(*args, **kw):
    """bitwctl that must succeed; returns its JSON."""
    rc, out, err = bitwctl(*args, **kw)
    assert rc == CTL_OK, f"bitwctl {' '.join(map(str, args))}: exit {rc}\n{out}\n{err}"
    return out


def wait_until(pred, timeout=15, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


class Prometheus:
    """A real Prometheus server (Debian's `prometheus`) scraping `targets` every
    second, its storage under `workdir`, on a free loopback port."""

    def __init__(self, workdir, targets, scrape_interval="1s"):
        binary = shutil.which("prometheus")
        if not binary:
            raise AssertionError("prometheus not installed: run scripts/setup-debian.sh")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "prometheus.yml"
        cfg.write_text(
            "global:\n"
            f"  scrape_interval: {scrape_interval}\n"
            f"  evaluation_interval: {scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: bitw\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(list(targets))}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc([binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"])
        wait_until(self._ready, timeout=30, what=f"Prometheus ready on {self.url}")

    def _ready(self):
        try:
            return http_get(self.url + "/-/ready")[0] == 200
        except OSError:
            return False

    def api(self, path, **params):
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            _, body = http_get(url, timeout=10)
        except urllib.error.HTTPError as e:
            body = e.read().decode()
        return json.loads(body)

    def query(self, expr):
        return self.api("query", query=expr)

    def targets_up(self):
        t = self.api("targets")["data"]["activeTargets"]
        return t and all(x["health"] == "up" for x in t)

    def stop(self):
        self.proc.finish(timeout=20)
