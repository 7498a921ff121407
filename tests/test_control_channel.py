"""The dataplane end of the control channel, driven by an independent client.

The client here is written from the protocol's description alone (a 4-byte
big-endian length, then a JSON document; common/src/proto.rs names the
fields): nothing is shared with bitw-control. It runs against the real
`bitw-dataplane` binary.

Live traffic: net_pcap replays its capture once at start, too early to see
what an Apply changes, so these tests give the dataplane `net_af_packet`
ports on veth pairs inside a network namespace the module creates:

    test socket ── tei ══ dpi ── bitw inside   bitw outside ── dpo ══ teo ── test socket

The dataplane runs in the namespace (`ip netns exec`); the test sends and
captures raw frames on tei/teo through AF_PACKET sockets opened in the
namespace. The namespace has no addresses and IPv6 off, so the kernel adds no
frames of its own; checksum offload is off on every veth (DESIGN.md). Nothing
leaves the namespace. The control socket is a file in the test's tmp_path.

Covered: the handshake (version negotiation, wrong magic, one session at a
time, reconnect; a frame sent the moment the welcome arrives is already
inspected), Apply (SAs and rules installed while traffic flows, the ESP
checked with Scapy; a frame sent once "applied" arrives meets what was
applied, never plaintext; errors name the field and change nothing), inbound SAs
sharing a policy name (make-before-break rekeying), SA slots reused across
2000 fresh inbound names with traffic flowing (and freed while idle), held packets of a name no longer
used dropped at once, punted IKE (port
500, NAT-T with the non-ESP marker, not ESP-in-UDP), Inject with learned MACs,
acquire and the hold store (release in order, AcquireFailed, timeout,
overflow), neighbours learnt from ARP and NDP, Expire events, GetStats and
GetState, the silence limit, a control process killed mid-session, and a
socket that cannot be bound.
"""

import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest
from scapy.all import ARP, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr
from scapy.all import IP, UDP, Dot1Q, Ether, IPv6, Raw

from bitw_esp import (
    R, T, SaSpec, decapsulated, encrypt_inbound, esp_spi, outbound_problems, parse_esp_frame,
    scapy_decrypt,
)
from bitw_testlib import (
    CONTROL_DROP_REASONS, DROP_REASONS, EXIT_DPDK, EXIT_OK, render_config, run_binary,
    unique_prefix,
)

T_MAC = "02:00:00:00:00:01"  # terminal, inside
R_MAC = "02:00:00:00:00:fe"  # router, outside
T_IP = "10.0.0.1"
PEER_IP = "192.0.2.9"
HQ_NET = "10.1.0.0/16"
MAGIC = "bitw-control-channel"
HQ = SaSpec("to-hq", "out", 0x1001, "tunnel", "172.16.0.1", "172.16.0.2")
PROBE_TYPE = 0x88B5  # IEEE local experimental ethertype: the readiness probe
PACKET_OUTGOING = 4
CLONE_NEWNET = 0x40000000


# ---------------------------------------------------------------------------
# The namespace, its veths and the test's sockets

def _run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Wire:
    """Raw sockets on the test's ends (tei inside, teo outside), each with a
    thread collecting what arrives."""

    def __init__(self, ns):
        self.socks = {}
        self.got = {"tei": [], "teo": []}
        self.lock = threading.Lock()
        self.running = True
        err = []

        def open_in_ns():
            try:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                for name in ("tei", "teo"):
                    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
                    s.bind((name, 0))
                    s.settimeout(0.1)
                    self.socks[name] = s
            except Exception as e:  # noqa: BLE001 - reported below
                err.append(e)

        t = threading.Thread(target=open_in_ns)  # setns changes only this thread
        t.start()
        t.join()
        if err:
            raise err[0]
        self.threads = [threading.Thread(target=self._rx, args=(n,), daemon=True) for n in self.socks]
        for th in self.threads:
            th.start()

    def _rx(self, name):
        s = self.socks[name]
        while self.running:
            try:
                data, addr = s.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue  # what the test itself sent
            with self.lock:
                self.got[name].append(data)

    def send(self, name, frame):
        self.socks[name].send(bytes(frame))

    def clear(self):
        with self.lock:
            for v in self.got.values():
                v.clear()

    def frames(self, name, pred=None):
        with self.lock:
            return [f for f in self.got[name] if pred is None or pred(f)]

    def wait(self, name, count, pred=None, timeout=5.0):
        """The first `count` frames matching `pred` that arrived on `name`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.frames(name, pred)
            if len(got) >= count:
                return got[:count]
            time.sleep(0.02)
        got = self.frames(name, pred)
        raise AssertionError(f"{name}: {len(got)} of {count} frames within {timeout} s: "
                             f"{[Ether(f).summary() for f in got]}")

    def close(self):
        self.running = False
        for th in self.threads:
            th.join(2)
        for s in self.socks.values():
            s.close()


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, DPDK)")
    ns = f"bitwcc{os.getpid()}"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        for a, b in (("dpi", "tei"), ("dpo", "teo")):
            _run("ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
        for dev in ("dpi", "tei", "dpo", "teo"):
            # Checksum offload off: forwarded frames must carry full checksums.
            _run("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def wire(netns):
    w = Wire(netns)
    yield w
    w.close()


# ---------------------------------------------------------------------------
# The dataplane in the namespace

class Dataplane:
    def __init__(self, binary, ns, config_path, socket_path):
        self.socket = str(socket_path)
        self.cmd = ["ip", "netns", "exec", ns, str(binary), "--config", str(config_path)]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.stderr = []
        self.stdout = []
        self._t_err = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._t_out = threading.Thread(target=lambda: self.stdout.append(self.proc.stdout.read()),
                                       daemon=True)
        self._t_err.start()
        self._t_out.start()

    def log(self):
        return "".join(self.stderr)

    def wait_up(self, wire, timeout=30):
        """Until the socket exists and a probe frame crosses inside → outside."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket) or "forwarding with" not in self.log():
            assert self.proc.poll() is None, f"dataplane exited {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"dataplane did not come up:\n{self.log()}"
            time.sleep(0.05)
        tag = uuid.uuid4().bytes
        probe = bytes(Ether(src=T_MAC, dst=R_MAC, type=PROBE_TYPE) / Raw(tag))
        while time.monotonic() < deadline:
            wire.send("tei", probe)
            time.sleep(0.1)
            if wire.frames("teo", lambda f: tag in f):
                wire.clear()
                return
        raise AssertionError(f"a probe frame never crossed the dataplane:\n{self.log()}")

    def stop(self):
        """SIGTERM, then the exit summary (JSON)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"dataplane did not stop:\n{self.log()}") from None
        self._t_out.join(5)
        self._t_err.join(5)
        assert rc == EXIT_OK, f"exit {rc}:\n{self.log()}"
        assert "panicked" not in self.log(), self.log()
        return json.loads("".join(self.stdout))


@pytest.fixture
def start(dataplane, netns, wire, tmp_path):
    """start(policies=(), sas=(), control={}, default_action=...) → a running Dataplane."""
    running = []

    def go(policies=(), sas=(), control=None, default_action="bypass"):
        from bitw_esp import write_sa_configs
        sock = tmp_path / "dp.sock"
        cfg = tmp_path / "bitw.toml"
        cfg.write_text(render_config(
            "net_af_packet0,iface=dpi", "net_af_packet1,iface=dpo", policies,
            prefix=unique_prefix("ctl"), default_action=default_action,
            sas=write_sa_configs(sas, tmp_path),
            control={"socket": str(sock), **(control or {})}))
        wire.clear()
        dp = Dataplane(dataplane, netns, cfg, sock)
        running.append(dp)
        dp.wait_up(wire)
        return dp

    yield go
    for dp in running:
        if dp.proc.poll() is None:
            dp.proc.kill()
            dp.proc.wait(10)


# ---------------------------------------------------------------------------
# An independent client of the protocol

class Closed(Exception):
    pass


class Client:
    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.timeout = timeout
        self.buf = b""
        self.events = []
        self.next_id = 1

    def send(self, obj):
        body = json.dumps(obj).encode()
        self.sock.sendall(struct.pack("!I", len(body)) + body)

    def recv(self, timeout=None):
        """One message, or None when nothing came within the timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack("!I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return json.loads(body)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                raise Closed() from None
            if not chunk:
                raise Closed()
            self.buf += chunk

    def hello(self, **over):
        h = {"magic": MAGIC, "min_version": 1, "max_version": 1, "software": "pytest-client"}
        h.update(over)
        self.send(h)
        r = self.recv()
        assert r is not None, "no answer to hello"
        return r

    def welcome(self):
        r = self.hello()
        assert r["result"] == "welcome", r
        return r

    def request(self, type_, **fields):
        """Sends a request and returns its reply (events that come first are kept)."""
        rid = self.next_id
        self.next_id += 1
        self.send({"id": rid, "type": type_, **fields})
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = self.recv(deadline - time.monotonic())
            if m is None:
                break
            if m["kind"] == "event":
                self.events.append(m)
                continue
            assert m["kind"] == "reply" and m["id"] == rid, f"reply out of order: {m}"
            return m
        raise AssertionError(f"no reply to {type_} within {self.timeout} s")

    def ok(self, type_, want, **fields):
        r = self.request(type_, **fields)
        assert r["type"] == want, r
        return r

    def pump(self, seconds):
        """Collects events for a while."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            m = self.recv(left)
            if m is not None:
                assert m["kind"] == "event", f"unexpected {m}"
                self.events.append(m)

    def wait_event(self, type_, pred=lambda e: True, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["type"] == type_ and pred(e):
                    self.events.remove(e)
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {type_} event within {timeout} s; have {self.events}")
            self.pump(min(left, 0.1))

    def take_events(self, type_):
        got = [e for e in self.events if e["type"] == type_]
        self.events = [e for e in self.events if e["type"] != type_]
        return got

    def close(self):
        self.sock.close()


def sa_json(spec, origin="admin", **over):
    d = {"op": "install", "name": spec.name, "direction": spec.direction, "spi": spec.spi,
         "mode": spec.mode, "encap": spec.encap, "aead": spec.aead, "key": spec.key.hex(),
         "esn": spec.esn_on, "origin": origin}
    if spec.tunnel:
        d.update(tunnel_src=spec.tunnel_src, tunnel_dst=spec.tunnel_dst)
    for k in ("lifetime_packets", "lifetime_bytes"):
        if getattr(spec, k) is not None:
            d[k] = getattr(spec, k)
    d.update(over)
    return d


def rule_json(name, action, sa=None, direction="out", src="10.0.0.0/24", dst=HQ_NET, proto="any",
              sport="any", dport="any", origin="admin"):
    d = {"name": name, "direction": direction, "src": src, "dst": dst, "proto": proto,
         "sport": sport, "dport": dport, "action": action, "origin": origin}
    if sa is not None:
        d["sa"] = sa
    return d


def policy(*rules, default="bypass"):
    return {"rules": list(rules), "default_action": default}


def udp_frame(src=T_IP, dst="10.1.0.5", sport=40000, dport=9999, n=0, smac=T_MAC, dmac=R_MAC):
    return bytes(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport)
                 / Raw(b"payload-%04d" % n))


def is_esp(f):
    return esp_spi(f) is not None


def decrypted_payloads(spec, frames):
    return [bytes(IP(scapy_decrypt(spec, parse_esp_frame(f)))[Raw].load) for f in frames]


# ---------------------------------------------------------------------------
# The tests

def welcomed_after_close(path, timeout=5.0):
    """A new session once the dataplane has seen the last one close (until
    then it refuses: one session at a time). Returns the client and welcome."""
    deadline = time.monotonic() + timeout
    while True:
        c = Client(path)
        r = c.hello()
        if r["result"] == "welcome":
            return c, r
        c.close()
        assert time.monotonic() < deadline, r
        time.sleep(0.05)


def test_handshake_one_session_at_a_time_and_reconnect(start):
    dp = start()
    bad = Client(dp.socket)
    r = bad.hello(magic="GET / HTTP/1.1")
    assert r["result"] == "refused" and "magic" in r["reason"], r
    with pytest.raises(Closed):
        bad.recv(2)
    old = Client(dp.socket)
    r = old.hello(min_version=2, max_version=5)
    assert r["result"] == "refused" and "no common protocol version" in r["reason"], r

    first = Client(dp.socket)
    w = first.welcome()
    assert w["version"] == 1 and w["software"].startswith("bitw-dataplane ")
    assert str(dp.proc.pid) in w["instance"] or "@" in w["instance"], w
    second = Client(dp.socket)
    r = second.hello()
    assert r["result"] == "refused" and "another control session" in r["reason"], r
    with pytest.raises(Closed):
        second.recv(3)
    first.ok("ping", "pong")

    first.close()
    again, r = welcomed_after_close(dp.socket)
    assert r["instance"] == w["instance"], "same dataplane, same instance"
    stats = again.ok("get_stats", "stats", sa_limit=10)
    assert stats["control_sessions"] == 2, stats
    # A request the dataplane does not know gets an error with its id, and the
    # session goes on.
    r = again.request("frobnicate")
    assert r["type"] == "error" and "cannot decode the request" in r["message"], r
    again.ok("ping", "pong")
    again.close()
    s = dp.stop()
    assert s["control"]["sessions"] == 2
    assert not os.path.exists(dp.socket), "the socket goes with the dataplane"
    assert "control session" in dp.log() and "ended (closed by control)" in dp.log()


def test_apply_installs_while_traffic_flows_and_state_reports_it(start, wire):
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    # Before: plaintext passes (wire mode, default bypass).
    wire.send("tei", udp_frame(n=0))
    assert wire.wait("teo", 1)[0] == udp_frame(n=0)
    wire.clear()

    r = c.ok("apply", "applied", sas=[sa_json(HQ)],
             policy=policy(rule_json("hq", "protect", sa="to-hq")))
    assert (r["sas_installed"], r["sas_replaced"], r["sas_unchanged"], r["sas_removed"]) == (1, 0, 0, 0)
    assert r["rules"] == 1 and r["released"] == 0 and r["policy_generation"] > 0, r
    assert 0 < r["apply_seconds"] < 5, r
    gen = r["policy_generation"]
    sent = [udp_frame(n=i) for i in range(1, 4)]
    for f in sent:
        wire.send("tei", f)
    wire.send("tei", udp_frame(dst="8.8.8.8", n=9))  # no rule: bypassed
    got = wire.wait("teo", 4)
    esp = [f for f in got if is_esp(f)]
    assert len(esp) == 3, [Ether(f).summary() for f in got]
    for seq, (g, orig) in enumerate(zip(esp, sent), start=1):
        assert outbound_problems(HQ, g, orig, seq) == [], outbound_problems(HQ, g, orig, seq)
    assert udp_frame(dst="8.8.8.8", n=9) in got

    st = c.ok("get_state", "state")
    [sa] = st["sas"]
    assert (sa["name"], sa["direction"], sa["spi"], sa["origin"]) == ("to-hq", "out", 0x1001, "admin")
    assert (sa["packets"], sa["sequence"], sa["owner_worker"], sa["expired"]) == (3, 3, 0, False)
    assert len(sa["fingerprint"]) == 32 and "key" not in sa
    assert st["policy"]["rules"][0]["name"] == "hq" and st["policy"]["rules"][0]["origin"] == "admin"
    assert st["policy"]["default_action"] == "bypass"

    # The same SA again: unchanged, its sequence number carries on.
    r = c.ok("apply", "applied", sas=[sa_json(HQ)])
    assert (r["sas_installed"], r["sas_unchanged"], r["policy_generation"]) == (0, 1, gen), r
    wire.clear()
    wire.send("tei", udp_frame(n=4))
    [g] = wire.wait("teo", 1)
    assert outbound_problems(HQ, g, udp_frame(n=4), 4) == []
    st2 = c.ok("get_state", "state")
    assert st2["sas"][0]["fingerprint"] == sa["fingerprint"]

    # Remove SA and rules: plaintext passes again, and the table's generation moved on.
    r = c.ok("apply", "applied", sas=[{"op": "remove", "name": "to-hq", "direction": "out"}],
             policy=policy())
    assert r["sas_removed"] == 1 and r["rules"] == 0 and r["policy_generation"] > gen, r
    wire.clear()
    wire.send("tei", udp_frame(n=5))
    assert wire.wait("teo", 1)[0] == udp_frame(n=5)
    c.close()
    dp.stop()


def test_a_frame_sent_once_applied_meets_what_was_applied(start, wire):
    # "applied" is a promise for every frame that arrives after it: once a
    # protect rule is acknowledged, its traffic never leaves in plaintext.
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", sas=[sa_json(HQ)])
    for i in range(20):
        c.ok("apply", "applied", policy=policy(rule_json("hq", "protect", sa="to-hq")))
        wire.clear()
        wire.send("tei", udp_frame(n=2 * i))
        [g] = wire.wait("teo", 1)
        assert is_esp(g), (i, Ether(g).summary())
        c.ok("apply", "applied", policy=policy())
        wire.clear()
        wire.send("tei", udp_frame(n=2 * i + 1))
        [g] = wire.wait("teo", 1)
        assert g == udp_frame(n=2 * i + 1), (i, Ether(g).summary())
    c.close()
    s = dp.stop()
    assert s["esp_encrypted"] == 20 and s["bypassed"] + s["uninspected"] >= 20, s


def test_apply_errors_name_the_field_and_change_nothing(start, wire):
    dp = start(policies=[dict(name="web", direction="out", dst="10.9.0.0/16", action="discard")])
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", sas=[sa_json(SaSpec("from-hq", "in", 0x2001, "tunnel", "172.16.0.2",
                                                  "172.16.0.1"))])
    before = c.ok("get_state", "state")
    bad_rule = rule_json("bad", "bypass", dst="10.1.0.1/16")
    cases = [
        (dict(sas=[sa_json(HQ, key="0011")]), "SA `to-hq`: key"),
        (dict(sas=[sa_json(HQ, aead="des")]), "SA `to-hq`: aead"),
        (dict(sas=[sa_json(HQ), sa_json(HQ)]), "sas[1]: SA `to-hq` (out): name: installed twice"),
        (dict(sas=[sa_json(SaSpec("other", "in", 0x2001, "tunnel", "172.16.0.2", "172.16.0.1"))]),
         "SA `other` (in): spi: 0x00002001 is already the SPI of in SA `from-hq`"),
        (dict(sas=[{"op": "remove", "name": "ghost", "direction": "out"}]),
         "remove SA `ghost` (out): name: no such SA"),
        # A valid SA with a bad rule: neither goes in.
        (dict(sas=[sa_json(HQ)], policy=policy(bad_rule)), "policy.rules[0]: rule `bad`: dst"),
        (dict(policy=policy(rule_json("a", "discard"), rule_json("a", "bypass"))),
         "policy.rules[1]: rule `a`: name: used by an earlier rule"),
        (dict(policy=policy(rule_json("p", "protect"))), "rule `p`: sa"),
        (dict(policy=policy(rule_json("u", "bypass", proto="gre"))), "rule `u`: proto"),
        # A policy name is for inbound SAs only.
        (dict(sas=[sa_json(HQ, policy="p")]), "SA `to-hq`: policy: only inbound SAs"),
    ]
    for fields, want in cases:
        r = c.request("apply", **fields)
        assert r["type"] == "error" and want in r["message"], (want, r)
        assert "0011" not in r["message"], "keys never appear in errors"
    after = c.ok("get_state", "state")
    assert after["sas"] == before["sas"] and after["policy"] == before["policy"]
    # The config's discard rule is still the one in force.
    wire.send("tei", udp_frame(dst="10.9.0.1", n=1))
    wire.send("tei", udp_frame(dst="10.8.0.1", n=2))
    got = wire.wait("teo", 1)
    time.sleep(0.3)
    assert wire.frames("teo") == [udp_frame(dst="10.8.0.1", n=2)] == got
    c.close()
    s = dp.stop()
    assert s["drops"]["policy_discard"] == 1


def test_inbound_sas_sharing_a_policy_name_pass_its_rules(start, wire):
    """Make-before-break rekeying of a Child SA: the old and the new inbound SA
    (other SPIs, other keys) share `policy = "p"`, and one inbound protect rule
    `sa = "p"` accepts what either decrypts to. Removing the old SA leaves its
    SPI unknown (`no_sa`) and the rule working for the new one; an inbound SA
    under another policy name decrypts but fails the rule (`policy_mismatch`)."""
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    old = SaSpec("child-1", "in", 0x3001, "tunnel", "172.16.0.2", "172.16.0.1")
    new = SaSpec("child-1-rekeyed", "in", 0x3002, "tunnel", "172.16.0.2", "172.16.0.1")
    other = SaSpec("child-2", "in", 0x3003, "tunnel", "172.16.0.2", "172.16.0.1")
    assert old.key != new.key != other.key
    rule = rule_json("hq-in", "protect", sa="p", direction="in", src=HQ_NET, dst="10.0.0.0/24")
    r = c.ok("apply", "applied", sas=[sa_json(old, policy="p"), sa_json(new, policy="p"),
                                      sa_json(other)], policy=policy(rule))
    assert (r["sas_installed"], r["rules"]) == (3, 1), r
    st = {s["name"]: s for s in c.ok("get_state", "state")["sas"]}
    assert st["child-1"]["policy"] == st["child-1-rekeyed"]["policy"] == "p", st
    assert "policy" not in st["child-2"], "no policy name: the SA's own name, not reported"

    l2 = bytes(Ether(src=R, dst=T))

    def inner(n):
        return IP(src="10.1.0.5", dst=T_IP) / UDP(sport=9999, dport=40000) / Raw(b"inbound-%04d" % n)

    def send(spec, seq, n):
        wire.send("teo", encrypt_inbound(spec, inner(n), seq, l2=l2))

    # Both SPIs of the Child SA decrypt and pass the one rule; the other SA's
    # packet decrypts but is not what the rule's SAs may carry.
    send(old, 1, 1)
    send(new, 1, 2)
    send(other, 1, 3)
    got = wire.wait("tei", 2)
    time.sleep(0.3)
    assert wire.frames("tei") == got == [decapsulated(l2, inner(1)), decapsulated(l2, inner(2))], \
        [Ether(f).summary() for f in wire.frames("tei")]

    # The old SA goes; the rule stays and keeps working for the new one.
    r = c.ok("apply", "applied", sas=[{"op": "remove", "name": "child-1", "direction": "in"}])
    assert r["sas_removed"] == 1, r
    wire.clear()
    send(old, 2, 4)
    send(new, 2, 5)
    got = wire.wait("tei", 1)
    time.sleep(0.3)
    assert wire.frames("tei") == got == [decapsulated(l2, inner(5))], \
        [Ether(f).summary() for f in wire.frames("tei")]
    st = c.ok("get_state", "state")
    assert sorted(s["name"] for s in st["sas"]) == ["child-1-rekeyed", "child-2"], st["sas"]
    c.close()
    s = dp.stop()
    assert s["esp_decrypted"] == 3, s
    assert (s["drops"]["no_sa"], s["drops"]["policy_mismatch"]) == (1, 1), s["drops"]
    assert sum(s["drops"].values()) == 2, s["drops"]


def test_sa_slots_of_rekeyed_inbound_names_are_reused(start, wire):
    """bitw-control installs every rekeyed inbound SA under a fresh name
    (`connection/child/<spi hex>`, one shared policy name) and removes the old
    one. 2000 fresh names, 10 per Apply (each Apply installs 10 and removes the
    10 before), with a protected flow each way between the Applies: every packet
    is delivered, encrypted or decrypted correctly, and the SA tables stay small
    (the slots of unbound names are reused) where they used to grow by a slot
    per name."""
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    batch, rounds = 10, 200
    l2 = bytes(Ether(src=R, dst=T))

    def child(i):
        spi = 0x10000 + i
        return SaSpec(f"connection/child/{spi:08x}", "in", spi, "tunnel", "172.16.0.2", "172.16.0.1")

    def slots():
        return c.ok("get_stats", "stats", sa_limit=0)["sa_slots"]

    live = [child(i) for i in range(batch)]
    rules = policy(rule_json("hq", "protect", sa="to-hq"),
                   rule_json("hq-in", "protect", sa="connection", direction="in", src=HQ_NET,
                             dst="10.0.0.0/24"))
    r = c.ok("apply", "applied", sas=[sa_json(HQ)] + [sa_json(s, policy="connection") for s in live],
             policy=rules)
    assert r["sas_installed"] == batch + 1, r
    first = slots()
    assert first["bound"] == 1 + 1 + batch, first
    table_max = first["table"]
    for rnd in range(1, rounds + 1):
        new = [child(rnd * batch + k) for k in range(batch)]
        r = c.ok("apply", "applied",
                 sas=[sa_json(s, policy="connection") for s in new]
                 + [{"op": "remove", "name": s.name, "direction": "in"} for s in live])
        assert (r["sas_installed"], r["sas_removed"]) == (batch, batch), r
        live = new
        # The flow, both ways: outbound with the SA that keeps its name,
        # inbound with one of the SAs just installed.
        wire.clear()
        out = udp_frame(n=rnd)
        inner = IP(src="10.1.0.5", dst=T_IP) / UDP(sport=9999, dport=40000) / Raw(b"in-%05d" % rnd)
        wire.send("tei", out)
        wire.send("teo", encrypt_inbound(live[rnd % batch], inner, 1, l2=l2))
        [g] = wire.wait("teo", 1)
        assert outbound_problems(HQ, g, out, rnd) == [], (rnd, outbound_problems(HQ, g, out, rnd))
        assert wire.wait("tei", 1) == [decapsulated(l2, inner)], rnd
        if rnd % 10 == 0:
            table_max = max(table_max, slots()["table"])
    time.sleep(0.3)
    last = slots()
    st = c.ok("get_state", "state")
    assert sorted(s["name"] for s in st["sas"]) == sorted([HQ.name] + [s.name for s in live])
    # 2010 inbound names were used; what is bound now is what is in use.
    assert last["bound"] == 1 + 1 + batch, last
    assert last["waiting"] == 0 and last["free"] == last["table"] - last["bound"], last
    print(f"SA slots: first {first}, largest table {table_max}, last {last}")
    assert table_max <= 64, (table_max, last)
    # With no traffic at all, too: idle workers let go of replaced tables, so
    # the slots freed with them leave quarantine.
    new = [child((rounds + 1) * batch + k) for k in range(batch)]
    c.ok("apply", "applied", policy=rules,
         sas=[sa_json(s, policy="connection") for s in new]
         + [{"op": "remove", "name": s.name, "direction": "in"} for s in live])
    time.sleep(0.3)
    idle = slots()
    assert idle["waiting"] == 0 and idle["bound"] == last["bound"], idle
    c.close()
    s = dp.stop()
    assert (s["esp_encrypted"], s["esp_decrypted"]) == (rounds, rounds), s
    assert sum(s["drops"].values()) == 0, s["drops"]


def test_held_packets_of_a_name_no_longer_used_are_dropped(start, wire):
    """A rule that named an SA goes before the SA ever came: the name is
    unbound (its slot will serve another name), and what was held for it is
    dropped as hold_failed rather than left to time out. The name used again
    later is a new id: its packets are encrypted from sequence number 1."""
    dp = start(control=HOLD)
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", policy=policy(rule_json("hq", "protect", sa="to-hq")))
    for i in range(3):
        wire.send("tei", udp_frame(n=i))
    c.wait_event("acquire")
    deadline = time.monotonic() + 5
    while c.ok("get_state", "state")["held_packets"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert c.ok("get_stats", "stats", sa_limit=0)["sa_slots"]["bound"] == 1
    c.ok("apply", "applied", policy=policy())
    e = c.wait_event("hold_dropped")
    assert (e["sa"], e["packets"], e["reason"]) == ("to-hq", 3, "hold_failed"), e
    st = c.ok("get_stats", "stats", sa_limit=0)
    assert st["held_packets"] == 0 and st["control_drops"]["hold_failed"] == 3, st
    assert st["sa_slots"]["bound"] == 0, st["sa_slots"]
    time.sleep(0.3)
    assert wire.frames("teo") == []
    # The name again, with its SA: nothing is released, new packets go out encrypted.
    r = c.ok("apply", "applied", sas=[sa_json(HQ)],
             policy=policy(rule_json("hq", "protect", sa="to-hq")))
    assert r["released"] == 0, r
    wire.send("tei", udp_frame(n=9))
    [g] = wire.wait("teo", 1)
    assert outbound_problems(HQ, g, udp_frame(n=9), 1) == []
    c.close()
    s = dp.stop()
    assert s["drops"]["hold_failed"] == 3 and s["esp_encrypted"] == 1, s


def ike_frame(src=PEER_IP, dst=T_IP, sport=500, dport=500, payload=b"IKE_SA_INIT", smac=R_MAC,
              dmac=T_MAC, vlan=None, marker=False):
    l2 = Ether(src=smac, dst=dmac)
    if vlan is not None:
        l2 = l2 / Dot1Q(vlan=vlan)
    data = (b"\0\0\0\0" if marker else b"") + payload
    return bytes(l2 / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(data))


def test_ike_for_registered_addresses_is_punted_not_forwarded(start, wire):
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", punt_addrs=[T_IP, "2001:db8::1"])
    esp_in_udp = ike_frame(sport=4500, dport=4500, payload=b"\x00\x00\x10\x01" + b"\x00\x00\x00\x01" + b"x" * 24)
    frames = [
        ("teo", ike_frame(payload=b"init-from-peer")),                                # 500, in
        ("teo", ike_frame(sport=4500, dport=4500, payload=b"auth", marker=True)),     # NAT-T
        ("teo", ike_frame(payload=b"tagged", vlan=5)),
        ("tei", ike_frame(src=T_IP, dst=PEER_IP, smac=T_MAC, dmac=R_MAC, payload=b"from-terminal")),
        ("teo", esp_in_udp),                                                          # not IKE
        ("teo", ike_frame(dst="10.0.0.2", payload=b"not-ours")),                      # other host
    ]
    for port, f in frames:
        wire.send(port, f)
    punts = [c.wait_event("punt", lambda e, p=p: bytes.fromhex(e["payload"]) == p)
             for p in (b"init-from-peer", b"auth", b"tagged", b"from-terminal")]
    p0, p1, p2, p3 = punts
    assert (p0["port"], p0["src"], p0["dst"], p0["sport"], p0["dport"], p0["nat_t"]) == \
        ("outside", PEER_IP, T_IP, 500, 500, False), p0
    assert (p0["src_mac"], p0["dst_mac"], p0["vlans"]) == (R_MAC, T_MAC, []), p0
    assert (p1["sport"], p1["dport"], p1["nat_t"]) == (4500, 4500, True), p1
    assert p2["vlans"] == [5], p2
    assert (p3["port"], p3["src"], p3["src_mac"]) == ("inside", T_IP, T_MAC), p3
    # What was not IKE for a registered address crossed the dataplane.
    got_in = wire.wait("tei", 2)
    assert sorted(got_in) == sorted([esp_in_udp, ike_frame(dst="10.0.0.2", payload=b"not-ours")])
    time.sleep(0.3)
    assert len(wire.frames("tei")) == 2 and wire.frames("teo") == []
    st = c.ok("get_stats", "stats", sa_limit=0)
    assert st["punted"] == 4 and st["workers"][0]["punted"] == 4, st

    # Without a session punts are dropped (counted).
    c.close()
    time.sleep(0.3)
    wire.send("teo", ike_frame(payload=b"nobody-listens"))
    time.sleep(0.3)
    c = Client(dp.socket)
    c.welcome()
    st = c.ok("get_stats", "stats", sa_limit=0)
    assert st["control_drops"]["punt_no_control"] == 1, st["control_drops"]
    assert set(CONTROL_DROP_REASONS) <= set(st["control_drops"])
    c.close()
    s = dp.stop()
    assert s["punted"] == 5 and s["drops"]["punt_no_control"] == 1


def test_inject_uses_learned_macs(start, wire):
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", punt_addrs=[T_IP])
    # The terminal announces itself (ARP); the peer's IKE arrives from the router.
    wire.send("tei", bytes(Ether(src=T_MAC, dst="ff:ff:ff:ff:ff:ff")
                           / ARP(op=1, hwsrc=T_MAC, psrc=T_IP, pdst="10.0.0.254")))
    learned = c.wait_event("learned", lambda e: e["ip"] == T_IP)
    assert (learned["port"], learned["mac"]) == ("inside", T_MAC), learned
    wire.send("teo", ike_frame(payload=b"init"))
    c.wait_event("punt")

    reply = bytes(IP(src=T_IP, dst=PEER_IP, id=7) / UDP(sport=500, dport=500) / Raw(b"IKE_SA_INIT reply"))
    wire.clear()
    c.ok("inject", "injected", port="outside", packet=reply.hex())
    [f] = wire.wait("teo", 1)
    assert f == bytes(Ether(src=T_MAC, dst=R_MAC, type=0x0800)) + reply, Ether(f).summary()
    # Toward inside: the peer's datagram as the router would deliver it.
    back = bytes(IP(src=PEER_IP, dst=T_IP) / UDP(sport=500, dport=500) / Raw(b"to terminal"))
    c.ok("inject", "injected", port="inside", packet=back.hex())
    [f] = wire.wait("tei", 1)
    assert f == bytes(Ether(src=R_MAC, dst=T_MAC, type=0x0800)) + back

    # IPv6, MACs from NDP on both ports.
    t6, p6 = "2001:db8::1", "2001:db8:f::9"
    wire.send("tei", bytes(Ether(src=T_MAC, dst="33:33:ff:00:00:fe") / IPv6(src=t6, dst="ff02::1:ff00:fe", hlim=255)
                           / ICMPv6ND_NS(tgt="2001:db8::fe") / ICMPv6NDOptSrcLLAddr(lladdr=T_MAC)))
    wire.send("teo", bytes(Ether(src=R_MAC, dst=T_MAC) / IPv6(src="fe80::fe", dst=t6, hlim=255)
                           / ICMPv6ND_NA(tgt=p6, R=1, S=1) / ICMPv6NDOptDstLLAddr(lladdr=R_MAC)))
    c.wait_event("learned", lambda e: e["ip"] == t6 and e["port"] == "inside" and e["mac"] == T_MAC)
    c.wait_event("learned", lambda e: e["ip"] == p6 and e["port"] == "outside" and e["mac"] == R_MAC)
    v6 = bytes(IPv6(src=t6, dst=p6) / UDP(sport=500, dport=500) / Raw(b"v6"))
    wire.clear()
    c.ok("inject", "injected", port="outside", packet=v6.hex())
    [f] = wire.wait("teo", 1)
    assert f == bytes(Ether(src=T_MAC, dst=R_MAC, type=0x86DD)) + v6

    # Unknown hosts and broken datagrams are refused, counted, never sent.
    r = c.request("inject", port="outside",
                  packet=bytes(IP(src="10.0.0.77", dst="192.0.2.77") / UDP()).hex())
    assert r["type"] == "error" and "no MAC known for 192.0.2.77" in r["message"], r
    r = c.request("inject", port="outside", packet=(reply + b"x").hex())
    assert r["type"] == "error" and "total length" in r["message"], r
    st = c.ok("get_stats", "stats", sa_limit=0)
    assert (st["injected"], st["inject_failed"], st["control_drops"]["inject_failed"]) == (3, 2, 2)
    time.sleep(0.2)
    assert wire.frames("teo", lambda f: b"192.0.2.77" in f or f.endswith(b"x")) == []
    c.close()
    dp.stop()


def test_neighbours_from_arp(start, wire):
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    arp = lambda mac, ip, vlan=None: bytes(  # noqa: E731
        (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=vlan) if vlan else
         Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")) / ARP(op=2, hwsrc=mac, psrc=ip, pdst=ip))
    wire.send("teo", arp(R_MAC, "192.0.2.1"))
    e = c.wait_event("learned")
    assert (e["port"], e["ip"], e["mac"]) == ("outside", "192.0.2.1", R_MAC), e
    wire.send("teo", arp(R_MAC, "192.0.2.1"))  # nothing new
    wire.send("teo", arp("02:00:00:00:00:fd", "192.0.2.1"))  # moved
    e = c.wait_event("learned")
    assert e["mac"] == "02:00:00:00:00:fd", e
    wire.send("tei", arp(T_MAC, T_IP, vlan=7))
    e = c.wait_event("learned")
    assert (e["port"], e["ip"]) == ("inside", T_IP)
    wire.send("tei", arp(T_MAC, "0.0.0.0"))  # a probe teaches nothing
    c.pump(0.3)
    assert c.take_events("learned") == []
    # ARP itself still crosses the box.
    assert len(wire.wait("tei", 2)) == 2 and len(wire.wait("teo", 2)) == 2
    st = c.ok("get_state", "state")
    assert {(n["port"], n["ip"], n["mac"]) for n in st["neighbors"]} == {
        ("outside", "192.0.2.1", "02:00:00:00:00:fd"), ("inside", T_IP, T_MAC)}
    c.close()
    dp.stop()


def test_a_frame_sent_the_moment_the_session_is_welcomed_is_learnt(start, wire):
    # Without a session the workers forward uninspected; the welcome must not
    # leave before they know a session is up (this lost one ARP in ~20 runs).
    dp = start()
    for i in range(1, 41):
        c, _ = welcomed_after_close(dp.socket)
        ip = f"192.0.2.{i}"
        wire.send("teo", bytes(Ether(src=R_MAC, dst="ff:ff:ff:ff:ff:ff") /
                               ARP(op=2, hwsrc=R_MAC, psrc=ip, pdst=ip)))
        e = c.wait_event("learned")
        assert (e["port"], e["ip"]) == ("outside", ip), (i, e)
        c.close()
    dp.stop()


HOLD = {"hold_packets": 64, "hold_timeout": "10s", "acquire_interval": "60s"}


def test_acquire_holds_then_releases_in_order_encrypted(start, wire):
    dp = start(control=HOLD)
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", policy=policy(rule_json("hq", "protect", sa="to-hq")))
    order = [40000, 40001, 40000, 40000, 40001, 40000, 40001, 40000]
    sent = [udp_frame(sport=sp, n=i) for i, sp in enumerate(order)]
    for f in sent:
        wire.send("tei", f)
    acq = [c.wait_event("acquire"), c.wait_event("acquire")]
    c.pump(0.5)
    assert c.take_events("acquire") == [], "one acquire per flow"
    assert sorted(a["sport"] for a in acq) == [40000, 40001]
    a = acq[0]
    assert (a["sa"], a["rule"], a["direction"], a["src"], a["dst"], a["proto"], a["dport"]) == \
        ("to-hq", "hq", "out", T_IP, "10.1.0.5", 17, 9999), a
    assert wire.frames("teo") == [], "held packets never leave in plaintext"
    st = c.ok("get_state", "state")
    assert st["held_packets"] == 8
    stats = c.ok("get_stats", "stats", sa_limit=0)
    assert stats["workers"][0]["held"] == 8 and stats["held_packets"] == 8 and stats["acquires"] == 2

    r = c.ok("apply", "applied", sas=[sa_json(HQ, origin="ike")])
    assert r["released"] == 8, r
    got = wire.wait("teo", 8)
    for seq, (g, orig) in enumerate(zip(got, sent), start=1):
        assert outbound_problems(HQ, g, orig, seq) == [], (seq, outbound_problems(HQ, g, orig, seq))
    assert decrypted_payloads(HQ, got) == [b"payload-%04d" % i for i in range(8)]
    # New packets of the flow go straight through.
    wire.send("tei", udp_frame(n=8))
    g = wire.wait("teo", 9)[8]
    assert outbound_problems(HQ, g, udp_frame(n=8), 9) == []
    assert c.ok("get_state", "state")["held_packets"] == 0
    c.close()
    s = dp.stop()
    assert s["held"] == 8 and s["esp_encrypted"] == 9 and s["control"]["released"] == 8
    assert s["drops"] == {r: 0 for r in DROP_REASONS}, s["drops"]


def test_acquire_failed_drops_the_held_packets(start, wire):
    dp = start(control=HOLD)
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", policy=policy(rule_json("hq", "protect", sa="to-hq")))
    for i in range(4):
        wire.send("tei", udp_frame(n=i))
    c.wait_event("acquire")
    deadline = time.monotonic() + 5
    while c.ok("get_state", "state")["held_packets"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.ok("acquire_failed", "done", sa="to-hq")
    e = c.wait_event("hold_dropped")
    assert (e["sa"], e["packets"], e["reason"]) == ("to-hq", 4, "hold_failed"), e
    st = c.ok("get_stats", "stats", sa_limit=0)
    assert st["control_drops"]["hold_failed"] == 4 and st["held_packets"] == 0
    # Installing the SA now releases nothing.
    assert c.ok("apply", "applied", sas=[sa_json(HQ)])["released"] == 0
    time.sleep(0.2)
    assert wire.frames("teo") == []
    c.close()
    s = dp.stop()
    assert s["drops"]["hold_failed"] == 4 and s["control"]["drops"]["hold_failed"] == 4


def test_held_packets_time_out_and_the_oldest_make_room(start, wire):
    dp = start(control={"hold_packets": 4, "hold_timeout": "700ms", "acquire_interval": "60s"})
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", policy=policy(rule_json("hq", "protect", sa="to-hq")))
    # Six packets into a store of four: the two oldest go.
    for i in range(6):
        wire.send("tei", udp_frame(n=i))
    e = c.wait_event("hold_dropped", lambda e: e["reason"] == "hold_overflow")
    c.pump(0.1)
    more = sum(x["packets"] for x in c.take_events("hold_dropped") if x["reason"] == "hold_overflow")
    assert e["packets"] + more == 2
    r = c.ok("apply", "applied", sas=[sa_json(HQ)])
    assert r["released"] == 4
    got = wire.wait("teo", 4)
    assert decrypted_payloads(HQ, got) == [b"payload-%04d" % i for i in range(2, 6)]
    # With another SA missing, packets time out.
    c.ok("apply", "applied", policy=policy(rule_json("hq", "protect", sa="to-hq"),
                                           rule_json("lab", "protect", sa="to-lab", dst="10.2.0.0/16")))
    for i in range(3):
        wire.send("tei", udp_frame(dst="10.2.0.1", n=i))
    e = c.wait_event("hold_dropped", lambda e: e["reason"] == "hold_timeout", timeout=5)
    c.pump(0.3)
    n = e["packets"] + sum(x["packets"] for x in c.take_events("hold_dropped"))
    assert (e["sa"], n) == ("to-lab", 3), e
    st = c.ok("get_stats", "stats", sa_limit=0)
    assert st["control_drops"]["hold_timeout"] == 3 and st["control_drops"]["hold_overflow"] == 2
    c.close()
    s = dp.stop()
    assert (s["drops"]["hold_timeout"], s["drops"]["hold_overflow"]) == (3, 2)


def test_without_a_session_unprotected_packets_are_dropped_not_held(start, wire):
    dp = start(control=HOLD)
    c = Client(dp.socket)
    c.welcome()
    c.ok("apply", "applied", policy=policy(rule_json("hq", "protect", sa="to-hq")))
    c.close()
    time.sleep(0.3)
    for i in range(3):
        wire.send("tei", udp_frame(n=i))
    time.sleep(0.5)
    assert wire.frames("teo") == []
    s = dp.stop()
    assert s["drops"]["protect_no_sa"] == 3 and s["held"] == 0


def test_expire_events(start, wire):
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    short = SaSpec("short", "out", 0x3001, "tunnel", "172.16.0.1", "172.16.0.2",
                   lifetime_packets={"soft": 2, "hard": 4})
    c.ok("apply", "applied", sas=[sa_json(short)],
         policy=policy(rule_json("hq", "protect", sa="short")))
    for i in range(5):
        wire.send("tei", udp_frame(n=i))
    soft = c.wait_event("expire", lambda e: e["reason"] == "soft_lifetime")
    hard = c.wait_event("expire", lambda e: e["reason"] == "hard_lifetime")
    assert (soft["sa"], soft["direction"], soft["spi"]) == ("short", "out", 0x3001)
    assert hard["sa"] == "short"
    st = c.ok("get_stats", "stats", sa_limit=5)
    assert st["expires"] == {"soft_lifetime": 1, "hard_lifetime": 1, "sequence_exhausted": 0}
    assert st["sas"][0]["expired"] is True
    c.close()
    s = dp.stop()
    assert s["sa_events"]["soft_lifetime"] == 1 and s["sa_events"]["hard_lifetime"] == 1


def test_stats_and_state_of_a_configured_dataplane(start, wire):
    spec = SaSpec("cfg-sa", "out", 0x4001, "tunnel", "172.16.0.1", "172.16.0.2")
    dp = start(policies=[dict(name="cfg-rule", direction="out", src="10.0.0.0/24", dst=HQ_NET,
                              action="protect", sa="cfg-sa")], sas=[spec], default_action="discard")
    c = Client(dp.socket)
    c.welcome()
    wire.send("tei", udp_frame(n=1))
    wire.wait("teo", 1)
    st = c.ok("get_state", "state")
    [sa] = st["sas"]
    assert (sa["name"], sa["origin"], sa["mode"], sa["tunnel_dst"], sa["aead"]) == \
        ("cfg-sa", "config", "tunnel", "172.16.0.2", "aes128gcm16"), sa
    assert st["policy"] == {"rules": [rule_json("cfg-rule", "protect", sa="cfg-sa", origin="config")],
                            "default_action": "discard"}
    assert st["punt_addrs"] == [] and st["held_packets"] == 0 and st["instance"]

    stats = c.ok("get_stats", "stats", sa_limit=0)
    assert stats["sa_count"] == 1 and stats["sas"] == []
    assert stats["burst_size"] == 32 and stats["tsc_hz"] > 0 and stats["uptime_seconds"] > 0
    assert stats["software"].startswith("bitw-dataplane")
    assert [p["name"] for p in stats["ports"]] == ["inside", "outside"]
    assert "iface=dpi" in stats["ports"][0]["device"]
    assert stats["ports"][0]["rx"]["packets"] >= 2 and stats["ports"][1]["tx"]["packets"] >= 2
    for p in stats["ports"]:
        assert {"rx_missed", "rx_errors", "tx_errors"} <= set(p)
    [w] = stats["workers"]
    assert set(w["drops"]) == set(DROP_REASONS)
    assert w["esp_encrypted"] == 1 and w["rx_bursts"] >= 2 and w["rx_burst_packets"] >= w["rx_bursts"]
    assert 0 < w["busy_cycles"] <= w["total_cycles"] and isinstance(w["lcore"], int)
    assert set(stats["control_drops"]) >= set(CONTROL_DROP_REASONS)
    assert stats["expires"] == {"soft_lifetime": 0, "hard_lifetime": 0, "sequence_exhausted": 0}
    assert c.ok("get_stats", "stats", sa_limit=9)["sas"][0]["name"] == "cfg-sa"
    c.close()
    s = dp.stop()
    [w] = s["workers"]
    for k in ("punted", "held", "busy_cycles", "total_cycles", "rx_bursts", "rx_burst_packets", "lcore"):
        assert k in w, k
    assert set(s["drops"]) == set(DROP_REASONS)
    assert s["control"]["sessions"] == 1


CLIENT_THEN_SIGKILL = r"""
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
def send(o):
    b = json.dumps(o).encode(); s.sendall(struct.pack("!I", len(b)) + b)
def recv():
    n = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))[0]
    return json.loads(s.recv(n, socket.MSG_WAITALL))
send({"magic": "bitw-control-channel", "min_version": 1, "max_version": 1, "software": "doomed"})
assert recv()["result"] == "welcome"
send(json.loads(sys.argv[2]))
assert recv()["type"] == "applied"
s.sendall(struct.pack("!I", 1000) + b'{"id": 2, "ty')  # half a frame
os.kill(os.getpid(), 9)
"""


def test_dataplane_forwards_on_after_control_is_killed(start, wire):
    dp = start()
    apply = {"id": 1, "type": "apply", "sas": [sa_json(HQ)],
             "policy": policy(rule_json("hq", "protect", sa="to-hq"))}
    p = subprocess.run([sys.executable, "-c", CLIENT_THEN_SIGKILL, dp.socket, json.dumps(apply)],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == -signal.SIGKILL, p.stderr
    deadline = time.monotonic() + 5
    while "ended (closed by control)" not in dp.log():
        assert time.monotonic() < deadline, dp.log()
        time.sleep(0.05)
    assert dp.log().count("control session unix:") == 2, dp.log()  # started, ended: one line each
    for i in range(3):
        wire.send("tei", udp_frame(n=i))
    got = wire.wait("teo", 3)
    for seq, g in enumerate(got, start=1):
        assert outbound_problems(HQ, g, udp_frame(n=seq - 1), seq) == []
    c = Client(dp.socket)
    c.welcome()
    st = c.ok("get_state", "state")
    assert st["sas"][0]["origin"] == "admin" and st["sas"][0]["packets"] == 3
    c.close()
    dp.stop()


def test_a_silent_session_is_dropped(start):
    dp = start()
    c = Client(dp.socket)
    c.welcome()
    t0 = time.monotonic()
    with pytest.raises(Closed):
        while time.monotonic() - t0 < 25:
            assert c.recv(1) is None
    took = time.monotonic() - t0
    assert 14 < took < 20, took
    assert "silent for more than 15 s" in dp.log()
    c2 = Client(dp.socket)
    c2.welcome()
    c2.close()
    dp.stop()


def test_a_socket_that_cannot_be_bound_is_a_startup_error(dataplane, tmp_path):
    busy = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(busy))
    holder.listen(1)
    try:
        prefix = unique_prefix("bind")
        cfg = tmp_path / "bitw.toml"
        cfg.write_text(render_config("net_null0", "net_null1", prefix=prefix,
                                     control={"socket": str(busy)}))
        r = run_binary(dataplane, "--config", cfg, "--run-for", 1)
        assert r.returncode == EXIT_DPDK, r.describe()
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "control channel: cannot listen on" in errors[0] \
            and "another process is listening there" in errors[0], r.describe()
    finally:
        holder.close()
    # A stale socket file (nobody listening) is replaced, and removed at the end.
    assert busy.exists()
    r = run_binary(dataplane, "--config", cfg, "--run-for", 0.5)
    assert r.returncode == EXIT_OK, r.describe()
    assert not busy.exists()
