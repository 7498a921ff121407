"""strongSwan interop harness of the bitw system tests.

    netns terminal ── veth ── [box] ── veth ── netns counterpart (charon)

A real IKEv2 peer to test bitw against: Debian's strongSwan 5.9.8 charon with
kernel-libipsec (userspace ESP over a TUN device), one daemon per network
namespace. The box in the middle is pluggable:

  * box="bridge": a Linux bridge in a third namespace (the harness's own proof,
    charon <-> charon, tests/test_swan_harness.py);
  * box="veth": two veth ends left for bitw-dataplane's net_af_packet ports
    (`Topology.inside_if` faces the terminal, `outside_if` the counterpart;
    `Topology.vdevs()` gives the DPDK vdev strings).

What is here:
  Topology       namespaces, veths, addresses (IPv4 + IPv6, no DAD, checksum
                 offload off everywhere), reliable cleanup (context manager;
                 `sweep_stale()` removes what a killed session left behind)
  Charon         one charon in a namespace: generated strongswan.conf and
                 swanctl.conf (Conn/Child), start/load/initiate/terminate/rekey,
                 list_sas() over vici, wait_established(), restart, stop,
                 negotiated_keys() from its filelog
  Pki            a small openssl PKI (CA, RSA/ECDSA end entities, SANs, DNs)
  Capture        raw AF_PACKET capture inside a namespace, with kernel timestamps
  ike_esp_problems / decrypt_esp / decrypt_ike / handshake_durations
                 what a capture shows: only IKE and ESP for a flow, never its
                 plaintext; ESP decrypted with Scapy's SecurityAssociation and
                 the keys charon logged; IKE decrypted (AES-GCM) with the IKE
                 SA keys (fill_rekeyed_ike_spis() for IKE SAs made by a rekey);
                 IKE_SA_INIT request -> IKE_AUTH response times
  PingStream / UdpStream
                 traffic from a namespace with exact loss accounting
  psk_pair       two charons (terminal, counterpart) with mirrored PSK configs
  L2Forwarder    a Python stand-in for the box in box="veth" topologies
  handshake_times(n)
                 charon <-> charon handshake durations on this machine
                 (perf/ike_handshake.py prints the medians)

The recipe (DESIGN.md has the facts; the details that make it work):
  * `ip netns exec NS unshare --mount --propagation private sh -c
    'mount --bind RUNDIR /run && exec charon'`: charon's pid file
    (/var/run/charon.pid) is fixed at build time, so each daemon needs a private
    /run. The bind mount lives only in charon's own mount namespace and goes
    away with it: nothing to unmount, nothing left in the host's mount table.
    All processes exec (no fork), so the Popen pid is charon's pid.
  * STRONGSWAN_CONF selects the generated strongswan.conf (charon and swanctl);
    SWANCTL_DIR the swanctl directory; swanctl gets `--uri` of the vici socket.
  * plugins (explicit `load`, no load_modular): random nonce openssl kdf pem
    pkcs1 pkcs8 x509 pubkey constraints kernel-libipsec kernel-netlink
    socket-default vici. 5.9.8 needs `kdf` for prf+ ("KDF_PRF with
    PRF_HMAC_SHA2_256 not supported" without it); openssl (from
    libstrongswan-standard-plugins) gives AES-GCM, x25519, ECDSA and RSA.
  * host-to-host: kernel-libipsec { allow_peer_ts = yes }, kernel-netlink
    { fwmark = !0x42 }, socket-default { fwmark = 0x42 }.
  * kernel-libipsec cannot trap: start_action = none and `swanctl --initiate`.
  * kernel-libipsec requires UDP encapsulation, so charon sends a random
    NATD_SOURCE_IP hash: its peer concludes "remote host is behind NAT", IKE
    moves to 4500 after IKE_SA_INIT and ESP is always in UDP 4500 (both ways).
  * kernel-libipsec does not do ESN ("IPsec SA: ESN not supported": a
    proposal with -esn ends in NO_PROPOSAL_CHOSEN for the child); its TUN
    device ipsec0 has MTU 1400 (larger inner packets are fragmented first).
  * after a child rekey the old inbound SA stays (REKEYED/DELETED) for
    charon's delete_rekeyed_delay, 5 s: wait_rekeyed() waits for the new one.
  * veths between fresh namespaces: the two ends get different ifindexes
    (10/11, 20/21). With equal ones (likely: every new namespace counts from
    1) the kernel's linkwatch handles the carrier change up to a second late
    and the path drops frames meanwhile; Topology also waits for IFF_RUNNING.
  * the filelog prefix is "<conn|ike-id>", but only "<ike-id>" on a responder
    until it knows the connection; child keys are "encryption initiator/
    responder key" of the exchange that made the SA (parse_keys()).

Everything is sent only on the veths created here. Nothing depends on a global
charon (Debian's strongswan-starter service), nor disturbs one.
"""

import contextlib
import ctypes
import ipaddress
import itertools
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHARON = Path("/usr/lib/ipsec/charon")
SWANCTL = Path(shutil.which("swanctl") or "/usr/sbin/swanctl")
# Debian packages that give what the harness needs (scripts/setup-debian.sh installs them).
PACKAGES = ("strongswan-charon", "strongswan-swanctl", "libcharon-extra-plugins",
            "libstrongswan-standard-plugins", "openssl", "iproute2", "ethtool", "procps")
PLUGINS = ("random nonce openssl kdf pem pkcs1 pkcs8 x509 pubkey constraints "
           "kernel-libipsec kernel-netlink socket-default vici")
SWANCTL_PLUGINS = "random nonce openssl pem pkcs1 pkcs8 x509 pubkey"
SWANCTL_SUBDIRS = ("x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey",
                   "private", "rsa", "ecdsa", "bliss", "pkcs8", "pkcs12", "conf.d")
FWMARK = "0x42"
IKE_PORT, NAT_T_PORT = 500, 4500
# Bytes that the traffic helpers put into every payload: a capture that contains
# them carries plaintext.
MARKER = b"BITW-SWAN-PLAINTEXT:"

# Everything a session creates is named bs<pid hex>-<n hex><role>: sweep_stale()
# knows which names belong to a session that is gone.
STEM = f"bs{os.getpid():x}-"
_NAME_RE = re.compile(r"^bs([0-9a-f]+)-[0-9a-f]+[a-z]{1,2}$")
_seq = itertools.count()


class HarnessError(AssertionError):
    """Something in the harness failed (a command, charon, a timeout): the
    message says what and carries the relevant output."""


# ---------------------------------------------------------------------------
# Commands, namespaces

def missing_prerequisites():
    """A list of what this machine lacks to run the harness (empty when ready)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (network namespaces, charon)")
    for p in (CHARON, SWANCTL):
        if not os.access(p, os.X_OK):
            out.append(f"{p} (apt-get install {' '.join(PACKAGES)}; scripts/setup-debian.sh does)")
    for plugin in ("kernel-libipsec", "openssl", "kdf", "vici"):
        f = Path(f"/usr/lib/ipsec/plugins/libstrongswan-{plugin}.so")
        if not f.exists():
            out.append(f"{f} (strongSwan plugin {plugin})")
    for tool in ("ip", "ethtool", "unshare", "openssl", "sysctl"):
        if not shutil.which(tool):
            out.append(f"the `{tool}` command")
    if not os.path.exists("/dev/net/tun"):
        out.append("/dev/net/tun (kernel-libipsec's TUN device)")
    return out


def require_strongswan():
    """Fails the calling test loudly (never skips) when the harness cannot run."""
    miss = missing_prerequisites()
    if miss:
        import pytest
        pytest.fail("the strongSwan harness needs: " + "; ".join(miss))


def run(cmd, check=True, timeout=30, env=None, input=None):
    cmd = [str(c) for c in cmd]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"{' '.join(cmd)}: no answer within {timeout} s "
                           f"(stdout {e.stdout!r}, stderr {e.stderr!r})") from None
    if check and p.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed with exit code {p.returncode}\n"
                           f"--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}")
    return p


def ns_exec(ns):
    """The command prefix that runs a program in network namespace `ns` (None: root)."""
    return ["ip", "netns", "exec", ns] if ns else []


def ns_sh(ns, script, check=True):
    """Runs a shell script (set -e) in a namespace: one process for many commands."""
    return run([*ns_exec(ns), "sh", "-ec", script], check=check)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(ns, fn):
    """Calls fn() on a thread that has entered network namespace `ns` and
    returns its result. setns(CLONE_NEWNET) changes only the calling thread, so
    a socket made by fn() belongs to `ns` and can then be used from any thread:
    captures and traffic run in this process, no helper process needed."""
    box = {}

    def body():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns}): {os.strerror(e)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{ns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def netns_socket(ns, family, type_, proto=0):
    return in_netns(ns, lambda: socket.socket(family, type_, proto))


SIOCGIFFLAGS, IFF_RUNNING = 0x8913, 0x40


def _if_flags(sock, ifname):
    """The interface flags (SIOCGIFFLAGS) of `ifname` in the socket's namespace."""
    import fcntl
    req = struct.pack("16sH14x", ifname.encode(), 0)
    return struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, req))[1]


def ns_pids(ns):
    p = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def kill_pids(pids, timeout=5.0):
    """SIGTERM, then SIGKILL after `timeout`, to exactly these pids."""
    pids = [p for p in pids if _alive(p)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.02)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _alive(pid):
    """Whether pid runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _pid_exists(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def harness_namespaces(stem=None):
    """Network namespaces named like the harness's (of this session, or of `stem`)."""
    p = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    if stem is None:
        return [n for n in names if _NAME_RE.match(n)]
    return [n for n in names if n.startswith(stem)]


def sweep_stale():
    """Removes namespaces (and the processes in them) and root-namespace links
    that a harness session left behind when it was killed: names of the form
    bs<pid>-…, where <pid> no longer runs. Returns what it removed."""
    removed = []
    for ns in harness_namespaces():
        pid = int(_NAME_RE.match(ns).group(1), 16)
        if pid != os.getpid() and not _pid_exists(pid):
            kill_pids(ns_pids(ns))
            run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    p = run(["ip", "-o", "link", "show"], check=False)
    for line in p.stdout.splitlines():
        m = re.match(r"^\d+: ([^:@]+)[@:]", line)
        if m and _NAME_RE.match(m.group(1)):
            pid = int(_NAME_RE.match(m.group(1)).group(1), 16)
            if pid != os.getpid() and not _pid_exists(pid):
                run(["ip", "link", "del", m.group(1)], check=False)
                removed.append(m.group(1))
    return removed


# ---------------------------------------------------------------------------
# Topology

@dataclass
class Endpoint:
    """One end host: its namespace, interface (inside the namespace) and addresses."""
    role: str
    ns: str
    ifname: str
    mac: str
    v4: str
    v6: str
    prefix_v4: int = 24
    prefix_v6: int = 64

    def addr(self, family=4):
        return self.v4 if family == 4 else self.v6

    def exec(self):
        return ns_exec(self.ns)

    def sh(self, script, check=True):
        return ns_sh(self.ns, script, check)


class Topology:
    """terminal ── veth ── box ── veth ── counterpart, in fresh namespaces.

    box="bridge": a Linux bridge in namespace `box_ns`.
    box="veth":   `inside_if` (the terminal's peer) and `outside_if` (the
                  counterpart's peer) are left for bitw-dataplane's
                  net_af_packet ports, in the root namespace (or in `box_ns`
                  with box_netns=True: run the dataplane under `box_exec()`).
                  They carry no addresses and have IPv6 off: the kernel sends
                  nothing on them.

    MTUs: `mtu` on the hosts' interfaces, `box_mtu` on the box-side ends.
    A box that adds ESP to the terminal's full-size packets needs the
    counterpart's `mtu` raised to receive them (a veth drops frames above its
    MTU).

    Use it as a context manager: close() kills whatever still runs in the
    namespaces (by pid), deletes them and the box-side links, also after a
    failure."""

    def __init__(self, box="bridge", *, box_netns=False,
                 terminal_v4="10.99.0.1", counterpart_v4="10.99.0.2", prefix_v4=24,
                 terminal_v6="fd00:99::1", counterpart_v6="fd00:99::2", prefix_v6=64,
                 terminal_mac="02:99:00:00:00:01", counterpart_mac="02:99:00:00:00:02",
                 mtu=1500, box_mtu=9000):
        assert box in ("bridge", "veth"), f"test bug: box={box!r}"
        sweep_stale()
        n = next(_seq)
        self.stem = f"{STEM}{n:x}"
        self.box = box
        self.terminal = Endpoint("terminal", self.stem + "t", self.stem + "t", terminal_mac,
                                 terminal_v4, terminal_v6, prefix_v4, prefix_v6)
        self.counterpart = Endpoint("counterpart", self.stem + "c", self.stem + "c",
                                    counterpart_mac, counterpart_v4, counterpart_v6,
                                    prefix_v4, prefix_v6)
        self.box_ns = self.stem + "b" if (box == "bridge" or box_netns) else None
        self.inside_if, self.outside_if = self.stem + "bi", self.stem + "bo"
        self.bridge = self.stem + "br" if box == "bridge" else None
        self.mtu, self.box_mtu = mtu, box_mtu
        self._namespaces = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        for ns in (self.terminal.ns, self.counterpart.ns, self.box_ns):
            if ns:
                run(["ip", "netns", "add", ns])
                self._namespaces.append(ns)
        host_v6 = ("sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 "
                   "net.ipv6.conf.all.router_solicitations=0 "
                   "net.ipv6.conf.default.router_solicitations=0 "
                   "net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0")
        for ep in (self.terminal, self.counterpart):
            ns_sh(ep.ns, f"ip link set lo up\n{host_v6}")
        if self.box_ns:
            ns_sh(self.box_ns, "ip link set lo up\n"
                  "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                  "net.ipv6.conf.default.disable_ipv6=1")
        # Distinct ifindexes on the two ends of each veth: the kernel's linkwatch
        # handles a veth's carrier change at once only when its ifindex differs
        # from its peer's (iflink); with equal indexes (likely across fresh
        # namespaces) the qdisc stays noop for up to a second and drops frames.
        box_netns = ["netns", self.box_ns] if self.box_ns else []
        for ep, box_end, idx in ((self.terminal, self.inside_if, 10),
                                 (self.counterpart, self.outside_if, 20)):
            box_idx = ["index", idx + 1] if self.box_ns else []
            run(["ip", "link", "add", ep.ifname, "netns", ep.ns, "index", idx, "address", ep.mac,
                 "mtu", self.mtu, "type", "veth", "peer", "name", box_end, *box_netns, *box_idx,
                 "mtu", self.box_mtu])
        for ep in (self.terminal, self.counterpart):
            ep.sh(f"sysctl -qw net.ipv6.conf.{ep.ifname}.accept_dad=0\n"
                  f"ethtool -K {ep.ifname} tx off rx off >/dev/null 2>&1 || true\n"
                  f"ip addr add {ep.v4}/{ep.prefix_v4} dev {ep.ifname}\n"
                  f"ip -6 addr add {ep.v6}/{ep.prefix_v6} dev {ep.ifname} nodad\n"
                  f"ip link set {ep.ifname} up")
        script = []
        for dev in (self.inside_if, self.outside_if):
            if not self.box_ns:
                script.append(f"echo 1 > /proc/sys/net/ipv6/conf/{dev}/disable_ipv6")
            script.append(f"ethtool -K {dev} tx off rx off >/dev/null 2>&1 || true")
        if self.bridge:
            script += [f"ip link add {self.bridge} type bridge stp_state 0 mcast_snooping 0",
                       f"ip link set {self.inside_if} master {self.bridge}",
                       f"ip link set {self.outside_if} master {self.bridge}",
                       f"ip link set {self.bridge} up"]
        script += [f"ip link set {self.inside_if} up", f"ip link set {self.outside_if} up"]
        ns_sh(self.box_ns, "\n".join(script))
        self._wait_up()

    def _wait_up(self, timeout=5.0):
        """Waits until every link of the path is operationally up (carrier
        handled by linkwatch: until then the kernel drops what is sent)."""
        links = [(ep.ns, ep.ifname) for ep in (self.terminal, self.counterpart)]
        links += [(self.box_ns, d) for d in (self.inside_if, self.outside_if, self.bridge) if d]
        deadline = time.monotonic() + timeout
        for ns, dev in links:
            sock = netns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM) if ns else \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                while True:
                    flags = _if_flags(sock, dev)
                    if flags & IFF_RUNNING:  # operstate up: linkwatch has run
                        break
                    if time.monotonic() > deadline:
                        raise HarnessError(f"{dev} in {ns or 'the root namespace'} not up "
                                           f"within {timeout} s (flags {flags:#x})")
                    time.sleep(0.005)
            finally:
                sock.close()

    def endpoint(self, role):
        return {"terminal": self.terminal, "counterpart": self.counterpart}[role]

    def vdevs(self, first_index=0):
        """DPDK vdev strings for bitw's ports on the box-side veth ends:
        (inside, outside), net_af_packet<first_index> and <first_index + 1>."""
        assert self.box == "veth", "vdevs() needs box='veth'"
        return (f"net_af_packet{first_index},iface={self.inside_if},qpairs=1",
                f"net_af_packet{first_index + 1},iface={self.outside_if},qpairs=1")

    def box_exec(self):
        """The command prefix that runs a program where the box-side ends are."""
        return ns_exec(self.box_ns)

    def wait_neighbours(self, family=4, timeout=5.0):
        """Pings terminal -> counterpart (in-process, see ping()) until a reply
        comes back: the box forwards and both neighbour caches are warm."""
        deadline = time.monotonic() + timeout
        while True:
            r = ping(self.terminal.ns, self.counterpart.addr(family), count=1, timeout=0.5)
            if r.received:
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"no IPv{family} path terminal -> counterpart "
                                   f"within {timeout} s")

    def close(self):
        for ns in self._namespaces:
            kill_pids(ns_pids(ns))
        for ns in self._namespaces:
            run(["ip", "netns", "del", ns], check=False)
        self._namespaces = []
        if not self.box_ns:
            for dev in (self.inside_if, self.outside_if):
                if os.path.exists(f"/sys/class/net/{dev}"):
                    run(["ip", "link", "del", dev], check=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# vici: a minimal client of charon's control socket (list-sas and friends)

_VICI_CMD_REQUEST, _VICI_CMD_RESPONSE, _VICI_CMD_UNKNOWN = 0, 1, 2
_VICI_EVENT_REGISTER, _VICI_EVENT_UNREGISTER, _VICI_EVENT_CONFIRM = 3, 4, 5
_VICI_EVENT_UNKNOWN, _VICI_EVENT = 6, 7
_SEC_START, _SEC_END, _KV, _LIST_START, _LIST_ITEM, _LIST_END = 1, 2, 3, 4, 5, 6


def _vici_encode(msg):
    out = bytearray()
    for k, v in (msg or {}).items():
        k = k.encode()
        if isinstance(v, dict):
            out += bytes([_SEC_START, len(k)]) + k + _vici_encode(v) + bytes([_SEC_END])
        elif isinstance(v, (list, tuple)):
            out += bytes([_LIST_START, len(k)]) + k
            for item in v:
                item = str(item).encode()
                out += bytes([_LIST_ITEM]) + struct.pack("!H", len(item)) + item
            out += bytes([_LIST_END])
        else:
            v = str(v).encode()
            out += bytes([_KV, len(k)]) + k + struct.pack("!H", len(v)) + v
    return bytes(out)


def _vici_decode(data):
    root = {}
    stack, cur, lst, i = [], root, None, 0
    while i < len(data):
        t = data[i]
        i += 1
        if t in (_SEC_START, _KV, _LIST_START):
            n = data[i]
            name = data[i + 1:i + 1 + n].decode()
            i += 1 + n
        if t == _SEC_START:
            new = {}
            cur[name] = new
            stack.append(cur)
            cur = new
        elif t == _SEC_END:
            cur = stack.pop()
        elif t == _KV:
            n = struct.unpack_from("!H", data, i)[0]
            cur[name] = data[i + 2:i + 2 + n].decode(errors="replace")
            i += 2 + n
        elif t == _LIST_START:
            lst = cur[name] = []
        elif t == _LIST_ITEM:
            n = struct.unpack_from("!H", data, i)[0]
            lst.append(data[i + 2:i + 2 + n].decode(errors="replace"))
            i += 2 + n
        elif t == _LIST_END:
            lst = None
        else:
            raise HarnessError(f"vici: unknown element type {t}")
    return root


class Vici:
    """A vici session over charon's Unix socket."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def close(self):
        self.sock.close()

    def _send(self, ptype, name=None, msg=b""):
        body = bytes([ptype])
        if name is not None:
            body += bytes([len(name)]) + name.encode()
        body += msg
        self.sock.sendall(struct.pack("!I", len(body)) + body)

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise HarnessError("vici: connection closed")
            buf += chunk
        return buf

    def _recv(self):
        n = struct.unpack("!I", self._recv_exact(4))[0]
        body = self._recv_exact(n)
        ptype, rest = body[0], body[1:]
        name = None
        if ptype in (_VICI_EVENT,):
            ln = rest[0]
            name, rest = rest[1:1 + ln].decode(), rest[1 + ln:]
        return ptype, name, rest

    def request(self, cmd, msg=None):
        self._send(_VICI_CMD_REQUEST, cmd, _vici_encode(msg))
        ptype, _, body = self._recv()
        if ptype == _VICI_CMD_UNKNOWN:
            raise HarnessError(f"vici: unknown command {cmd}")
        return _vici_decode(body)

    def streamed(self, cmd, event, msg=None):
        """A command that answers with events (list-sas, list-conns): their messages."""
        self._send(_VICI_EVENT_REGISTER, event)
        ptype, _, _ = self._recv()
        if ptype != _VICI_EVENT_CONFIRM:
            raise HarnessError(f"vici: cannot register for {event}")
        self._send(_VICI_CMD_REQUEST, cmd, _vici_encode(msg))
        events = []
        while True:
            ptype, name, body = self._recv()
            if ptype == _VICI_EVENT and name == event:
                events.append(_vici_decode(body))
            elif ptype == _VICI_CMD_RESPONSE:
                break
            elif ptype == _VICI_CMD_UNKNOWN:
                raise HarnessError(f"vici: unknown command {cmd}")
        self._send(_VICI_EVENT_UNREGISTER, event)
        self._recv()
        return events


# ---------------------------------------------------------------------------
# Configuration of a charon

@dataclass
class Child:
    """A children.<name> section of swanctl.conf. None leaves strongSwan's default.
    local_ts/remote_ts default to the IKE addresses (host to host)."""
    name: str = "c1"
    local_ts: str = None
    remote_ts: str = None
    esp_proposals: str = "aes128gcm16"
    mode: str = "tunnel"
    start_action: str = "none"
    rekey_time: str = None
    life_time: str = None
    rand_time: str = None
    rekey_bytes: str = None
    rekey_packets: str = None
    dpd_action: str = None
    close_action: str = None
    replay_window: int = None
    extra: dict = field(default_factory=dict)


@dataclass
class Conn:
    """A connections.<name> section of swanctl.conf (and its secret).
    auth "psk" (psk: bytes or str) or "pubkey" (cert: a Cert from Pki.issue,
    installed with its key when the config is written). remote_auth defaults
    to auth. Ids: strongSwan syntax (an address, an FQDN, user@fqdn, a DN
    "C=CH, O=…, CN=…"); None leaves strongSwan's default (address / cert subject)."""
    name: str
    local_addrs: str
    remote_addrs: str
    local_id: str = None
    remote_id: str = None
    auth: str = "psk"
    remote_auth: str = None
    psk: object = None
    cert: object = None
    proposals: str = "aes128gcm16-prfsha256-x25519"
    children: list = field(default_factory=lambda: [Child()])
    version: int = 2
    dpd_delay: str = None
    dpd_timeout: str = None
    rekey_time: str = None
    reauth_time: str = None
    over_time: str = None
    rand_time: str = None
    unique: str = None
    mobike: str = None
    fragmentation: str = None
    send_certreq: str = None
    send_cert: str = None
    local_port: int = None
    remote_port: int = None
    keyingtries: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.auth == "psk" and self.psk is None:
            self.psk = b"bitw strongSwan harness PSK 0123456789"


def _line(indent, k, v):
    if isinstance(v, bool):
        v = "yes" if v else "no"
    return f"{'  ' * indent}{k} = {v}"


def render_swanctl(conns):
    """swanctl.conf text: one key = value per line (what swanctl wants)."""
    out = ["# written by tests/bitw_swan.py", "connections {"]
    secrets = []
    for c in conns:
        out.append(f"  {c.name} {{")
        opts = {"version": c.version, "local_addrs": c.local_addrs,
                "remote_addrs": c.remote_addrs, "proposals": c.proposals}
        for k in ("dpd_delay", "dpd_timeout", "rekey_time", "reauth_time", "over_time",
                  "rand_time", "unique", "mobike", "fragmentation", "send_certreq", "send_cert",
                  "local_port", "remote_port", "keyingtries"):
            if getattr(c, k) is not None:
                opts[k] = getattr(c, k)
        opts.update(c.extra)
        out += [_line(2, k, v) for k, v in opts.items()]
        local = {"auth": c.auth}
        if c.local_id is not None:
            local["id"] = f'"{c.local_id}"'
        if c.auth == "pubkey":
            assert c.cert is not None, f"test bug: connection {c.name}: pubkey needs a cert"
            local["certs"] = Path(c.cert.cert).name
        remote = {"auth": c.remote_auth or c.auth}
        if c.remote_id is not None:
            remote["id"] = f'"{c.remote_id}"'
        for sec, d in (("local", local), ("remote", remote)):
            out.append(f"    {sec} {{")
            out += [_line(3, k, v) for k, v in d.items()]
            out.append("    }")
        out.append("    children {")
        for ch in c.children:
            out.append(f"      {ch.name} {{")
            copts = {"mode": ch.mode, "esp_proposals": ch.esp_proposals,
                     "start_action": ch.start_action}
            for k in ("local_ts", "remote_ts", "rekey_time", "life_time", "rand_time",
                      "rekey_bytes", "rekey_packets", "dpd_action", "close_action",
                      "replay_window"):
                if getattr(ch, k) is not None:
                    copts[k] = getattr(ch, k)
            copts.update(ch.extra)
            out += [_line(4, k, v) for k, v in copts.items()]
            out.append("      }")
        out += ["    }", "  }"]
        if (c.auth == "psk" or c.remote_auth == "psk") and c.psk is not None:
            secrets.append(c)
    out.append("}")
    out.append("secrets {")
    for c in secrets:
        psk = c.psk.encode() if isinstance(c.psk, str) else bytes(c.psk)
        out.append(f"  ike-{c.name} {{")
        ids = [i for i in (c.local_id or _addr_id(c.local_addrs),
                           c.remote_id or _addr_id(c.remote_addrs)) if i]
        out += [_line(2, f"id-{n}", f'"{i}"') for n, i in enumerate(ids, 1)]
        out.append(_line(2, "secret", "0x" + psk.hex()))
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _addr_id(addrs):
    """The default IKE identity for local_addrs/remote_addrs (its address), if a single address."""
    try:
        return str(ipaddress.ip_address(addrs.strip()))
    except ValueError:
        return None


def render_strongswan_conf(vici_uri, log_path, log_levels=None, settings=""):
    """strongswan.conf text for one daemon (and the swanctl that talks to it)."""
    levels = {"default": 1, "ike": 4, "chd": 4, "knl": 1, "net": 1, "enc": 1, "cfg": 1, "lib": 1}
    levels.update(log_levels or {})
    lv = "\n".join(f"      {k} = {v}" for k, v in levels.items())
    return f"""# written by tests/bitw_swan.py
charon {{
  load_modular = no
  load = {PLUGINS}
  port = {IKE_PORT}
  port_nat_t = {NAT_T_PORT}
  retransmit_tries = 3
  retransmit_timeout = 1.0
  retransmit_base = 1.4
  plugins {{
    vici {{
      socket = {vici_uri}
    }}
    kernel-libipsec {{
      allow_peer_ts = yes
    }}
    kernel-netlink {{
      fwmark = !{FWMARK}
    }}
    socket-default {{
      fwmark = {FWMARK}
    }}
  }}
  filelog {{
    harness {{
      path = {log_path}
      time_format = %s
      time_add_ms = yes
      ike_name = yes
      append = yes
      flush_line = yes
{lv}
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
    auth {{
      default = -1
    }}
  }}
{settings}
}}
swanctl {{
  load = {SWANCTL_PLUGINS}
}}
"""


# ---------------------------------------------------------------------------
# Charon

class Charon:
    """One charon in network namespace `ns`, all its files in `workdir`:
    strongswan.conf, swanctl/ (swanctl.conf, x509/, x509ca/, private/),
    charon.log (the filelog: ike=4 chd=4, so it holds the keys), run/ (its
    private /run), charon.vici (its control socket), stdout.txt.

        with Charon(topo.counterpart.ns, tmp / "c") as c:
            c.add(Conn("h2h", "10.99.0.2", "10.99.0.1")).start().load()
            c.initiate("c1"); c.wait_established("c1")
    """

    def __init__(self, ns, workdir=None, *, log_levels=None, settings=""):
        self.ns = ns
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"{STEM}charon-")
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "strongswan.conf"
        self.swanctl_dir = self.dir / "swanctl"
        self.log_path = self.dir / "charon.log"
        self.run_dir = self.dir / "run"
        self.vici_path = self.dir / "charon.vici"
        if len(str(self.vici_path)) > 100:  # AF_UNIX limit is 108 bytes
            self.vici_path = Path(tempfile.mkdtemp(prefix=f"{STEM}v-")) / "charon.vici"
        self.log_levels, self.settings = log_levels, settings
        self.conns = []
        self.proc = None
        self._stdout = None
        for d in SWANCTL_SUBDIRS:
            (self.swanctl_dir / d).mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        self.write_strongswan_conf()

    # --- configuration
    @property
    def uri(self):
        return f"unix://{self.vici_path}"

    def env(self):
        return {**os.environ, "STRONGSWAN_CONF": str(self.conf),
                "SWANCTL_DIR": str(self.swanctl_dir)}

    def write_strongswan_conf(self):
        self.conf.write_text(render_strongswan_conf(self.uri, self.log_path, self.log_levels,
                                                    self.settings))

    def add(self, *conns):
        """Adds connections (written with write_config(); load() writes too)."""
        self.conns += conns
        return self

    def install_cert(self, cert, with_key=True):
        """Copies a Cert (and its private key) into swanctl/x509 and private/."""
        shutil.copy(cert.cert, self.swanctl_dir / "x509" / Path(cert.cert).name)
        if with_key and cert.key:
            dst = self.swanctl_dir / "private" / Path(cert.key).name
            shutil.copy(cert.key, dst)
            os.chmod(dst, 0o600)

    def install_ca(self, ca_cert_path):
        shutil.copy(ca_cert_path, self.swanctl_dir / "x509ca" / Path(ca_cert_path).name)

    def write_config(self):
        for c in self.conns:
            if c.auth == "pubkey" and c.cert is not None:
                self.install_cert(c.cert)
        (self.swanctl_dir / "swanctl.conf").write_text(render_swanctl(self.conns))

    # --- life cycle
    def start(self, timeout=10.0):
        """Starts charon (in its namespace, with its private /run) and waits
        until its vici socket answers."""
        assert self.proc is None or self.proc.poll() is not None, "charon already running"
        for stale in (self.vici_path, self.run_dir / "charon.pid"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stdout = open(self.dir / "stdout.txt", "ab")
        script = f'mount --bind "{self.run_dir}" /run && exec "{CHARON}"'
        self.proc = subprocess.Popen(
            [*ns_exec(self.ns), "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=subprocess.STDOUT,
            env={**self.env(), "BITW_SWAN": STEM})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"charon in {self.ns} exited with {self.proc.returncode}\n"
                                   f"{self.describe()}")
            if self.vici_path.exists():
                try:
                    v = Vici(self.vici_path, timeout=2)
                    v.request("version")
                    v.close()
                    return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"charon in {self.ns}: vici not up within {timeout} s\n"
                                   f"{self.describe()}")
            time.sleep(0.02)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=5.0, kill=False):
        """SIGTERM: charon deletes its SAs (sending DELETEs to its peers) and
        removes its TUN device, routes and pid file; SIGKILL after `timeout`.
        kill=True: SIGKILL at once (a crash: no DELETE, the peer keeps its SAs;
        the policy routing rule stays in the namespace, harmless on restart).
        Its private /run goes with its mount namespace either way."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._stdout:
            self._stdout.close()
            self._stdout = None
        return self.proc.returncode

    def restart(self, load=True):
        self.stop()
        self.start()
        if load:
            self.load()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- swanctl and vici
    def swanctl(self, *args, check=True, timeout=30):
        return run([SWANCTL, *args, "--uri", self.uri], check=check, timeout=timeout,
                   env=self.env())

    def vici(self):
        return Vici(self.vici_path)

    def load(self):
        """Writes swanctl.conf (and installs certificates) and loads it all."""
        self.write_config()
        try:
            return self.swanctl("--load-all")
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.describe()}") from None

    def initiate(self, child=None, ike=None, timeout=10, check=True):
        """`swanctl --initiate`: blocks until the SA is up (or fails)."""
        args = ["--initiate", "--timeout", str(int(timeout))]
        if child:
            args += ["--child", child]
        if ike:
            args += ["--ike", ike]
        p = self.swanctl(*args, check=False, timeout=timeout + 5)
        if check and p.returncode != 0:
            raise HarnessError(f"swanctl --initiate {child or ike} failed in {self.ns}:\n"
                               f"{p.stdout}{p.stderr}\n{self.describe()}")
        return p

    def terminate(self, child=None, ike=None, timeout=10, force=False, check=True):
        args = ["--terminate", "--timeout", str(int(timeout))]
        if child:
            args += ["--child", child]
        if ike:
            args += ["--ike", ike]
        if force:
            args.append("--force")
        return self.swanctl(*args, check=check, timeout=timeout + 5)

    def rekey(self, child=None, ike=None, reauth=False):
        args = ["--rekey"]
        if child:
            args += ["--child", child]
        if ike:
            args += ["--ike", ike]
        if reauth:
            args.append("--reauth")
        return self.swanctl(*args)

    def list_sas(self):
        """IKE SAs as vici reports them: a list of dicts, each with 'name' (the
        connection), 'state', 'initiator-spi', 'responder-spi', … and
        'child-sas': a list of dicts ('name', 'uniqueid', 'state', 'spi-in',
        'spi-out', 'encr-alg', 'local-ts', 'remote-ts', 'packets-in', …)."""
        v = self.vici()
        try:
            events = v.streamed("list-sas", "list-sa")
        finally:
            v.close()
        out = []
        for ev in events:
            for name, ike in ev.items():
                ike = dict(ike, name=name)
                ike["child-sas"] = [dict(c, key=k) for k, c in ike.get("child-sas", {}).items()]
                out.append(ike)
        return out

    def wait_rekeyed(self, child, old_uniqueid, timeout=10.0):
        """Waits until the only INSTALLED child SA `child` is a newer one than
        `old_uniqueid` (after a rekey the old SA lingers REKEYED/DELETED for
        charon's delete_rekeyed_delay, 5 s); returns the new child's dict."""
        deadline = time.monotonic() + timeout
        while True:
            kids = self.children(child)
            if len(kids) == 1 and int(kids[0]["uniqueid"]) > int(old_uniqueid):
                return kids[0]
            if time.monotonic() > deadline:
                raise HarnessError(f"charon in {self.ns}: child {child} not rekeyed within "
                                   f"{timeout} s: {self.children(child, state=None)}")
            time.sleep(0.02)

    def children(self, name=None, state="INSTALLED"):
        """Child SAs (optionally of one child config, in one state) of all IKE SAs."""
        return [c for ike in self.list_sas() for c in ike["child-sas"]
                if (name is None or c["name"] == name) and (state is None or c["state"] == state)]

    def wait_established(self, child=None, ike=None, timeout=10.0, count=1):
        """Waits until the IKE SA `ike` is ESTABLISHED (and `count` child SAs
        `child` are INSTALLED); returns list_sas() of that moment."""
        deadline = time.monotonic() + timeout
        while True:
            sas = self.list_sas()
            ikes = [s for s in sas if s.get("state") == "ESTABLISHED"
                    and (ike is None or s["name"] == ike)]
            kids = [c for s in ikes for c in s["child-sas"]
                    if c.get("state") == "INSTALLED" and (child is None or c["name"] == child)]
            if ikes and (child is None and ike is not None or len(kids) >= count):
                return sas
            if time.monotonic() > deadline:
                raise HarnessError(f"charon in {self.ns}: {ike or ''} {child or ''} "
                                   f"not established "
                                   f"within {timeout} s; SAs: {sas}\n{self.describe()}")
            time.sleep(0.05)

    # --- logs
    def log_text(self, since_start=False):
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_text(errors="replace")
        return data[getattr(self, "_log_offset", 0):] if since_start else data

    def describe(self, lines=40):
        """The tail of the filelog and stdout: for failure messages."""
        out = []
        for f in (self.log_path, self.dir / "stdout.txt"):
            if f.exists():
                tail = f.read_text(errors="replace").splitlines()
                tail = [t for t in tail if not _HEXDUMP_RE.match(t)][-lines:]
                out.append(f"--- {f} (last {len(tail)} lines without hex dumps):\n"
                           + "\n".join(tail))
        return "\n".join(out)

    def negotiated_keys(self):
        """The IKE and child SAs charon derived, with their keys, from its filelog."""
        return parse_keys(self.log_text())

    def handshakes(self):
        """IKE SA establishments charon initiated, from its log: a list of
        (ike_name, seconds from IKE_SA_INIT request to IKE_AUTH response), ms resolution."""
        return log_handshakes(self.log_text())


def _charon_tags():
    """{pid: value of BITW_SWAN (None if unset)} of every running charon."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.readlink(d / "exe") != str(CHARON) or not _alive(int(d.name)):
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        tag = [e[len(b"BITW_SWAN="):].decode() for e in env if e.startswith(b"BITW_SWAN=")]
        out[int(d.name)] = tag[0] if tag else None
    return out


def stray_charons(all_sessions=False):
    """Pids of running charons that the harness started (in this session, or
    in any with all_sessions=True): none should exist once they are stopped.
    Harness charons carry BITW_SWAN=<session stem> in their environment."""
    return [pid for pid, tag in _charon_tags().items()
            if tag is not None and (all_sessions or tag == STEM)]


def global_charons():
    """Pids of charons the harness did not start (e.g. Debian's
    strongswan-starter service). The harness neither needs nor touches them."""
    return [pid for pid, tag in _charon_tags().items() if tag is None]


def mounts_mentioning(text):
    """Mount entries (in any process's mount namespace) whose source or target
    mentions `text`: none should remain once the charons are stopped."""
    hits = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for line in (d / "mountinfo").read_text().splitlines():
                if text in line:
                    hits.add(line)
        except OSError:
            continue
    return sorted(hits)


# ---------------------------------------------------------------------------
# charon's filelog: keys, SPIs, timings

# "<ts> <thread>[<subsystem>] <conn|ike unique id> message"; before the
# responder knows the connection, the prefix is only "<id>"
_LOG_RE = re.compile(r"^(\d+\.\d+) (\d+)\[(\w+)\] (?:<(?:([^>|]*)\|)?(\d+)> )?(.*)$")
_HEXDUMP_RE = re.compile(r"^\d+\.\d+ \d+\[\w+\] (?:<[^>]*> )?\s+\d+: ((?:[0-9A-F]{2} )+)")
_DUMP_HEAD_RE = re.compile(r"^(.*?) => (\d+) bytes @ 0x[0-9a-f]+$")


def _log_records(text):
    """(ts, thread, subsystem, ike_name, ike_id, message, dump bytes or None),
    hex dumps joined to the line that announced them."""
    recs = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _LOG_RE.match(lines[i])
        i += 1
        if not m:
            continue
        ts, thread, subsys, iname, iid, msg = m.groups()
        dump = None
        h = _DUMP_HEAD_RE.match(msg)
        if h:
            want, buf = int(h.group(2)), bytearray()
            while len(buf) < want and i < len(lines):
                d = _HEXDUMP_RE.match(lines[i])
                if not d:
                    break
                buf += bytes.fromhex(d.group(1))
                i += 1
            msg, dump = h.group(1), bytes(buf[:want])
        recs.append((float(ts), thread, subsys, iname, int(iid) if iid else None, msg, dump))
    return recs


@dataclass
class EspSaKeys:
    """One direction of a child SA, as Scapy wants it. encr_key holds key‖salt
    for AEADs (AES-GCM: 16/32 + 4 bytes), as RFC 4106 and Scapy take it."""
    child: str
    unique_id: int
    direction: str  # "in" | "out" (for the charon whose log it is)
    spi: int
    src: str
    dst: str
    encr_alg: str  # charon's name: AES_GCM_16, AES_CBC, CHACHA20_POLY1305, …
    encr_key: bytes = field(repr=False)
    integ_alg: str = None
    integ_key: bytes = field(default=None, repr=False)
    esn: bool = False
    encap: bool = True  # kernel-libipsec: always UDP 4500

    @property
    def aead(self):
        """The AEAD name in bitw's config / bitw_esp.AEADS (None for non-AEAD SAs)."""
        if self.encr_alg == "AES_GCM_16":
            return f"aes{(len(self.encr_key) - 4) * 8}gcm16"
        if self.encr_alg == "CHACHA20_POLY1305":
            return "chacha20poly1305"
        return None

    def scapy_sa(self, esn_high=0, esn=None, tunnel_header=None):
        """Scapy's SecurityAssociation (tunnel mode, NAT-T header 4500/4500)."""
        from scapy.all import IP, UDP, IPv6
        from scapy.layers.ipsec import ESP, SecurityAssociation

        crypt = {"AES_GCM_16": "AES-GCM", "CHACHA20_POLY1305": "CHACHA20-POLY1305",
                 "AES_CBC": "AES-CBC", "AES_CTR": "AES-CTR"}.get(self.encr_alg)
        assert crypt, f"no Scapy name for {self.encr_alg}"
        auth = {None: None, "HMAC_SHA2_256_128": "SHA2-256-128",
                "HMAC_SHA2_384_192": "SHA2-384-192",
                "HMAC_SHA2_512_256": "SHA2-512-256", "HMAC_SHA1_96": "HMAC-SHA1-96",
                "AES_XCBC_96": "AES-XCBC-96"}[self.integ_alg]
        th = tunnel_header or (IPv6(src=self.src, dst=self.dst) if ":" in self.src
                               else IP(src=self.src, dst=self.dst))
        esn_on = self.esn if esn is None else esn
        kw = {"auth_algo": auth, "auth_key": self.integ_key} if auth else {}
        return SecurityAssociation(ESP, spi=self.spi, crypt_algo=crypt, crypt_key=self.encr_key,
                                   tunnel_header=th, nat_t_header=UDP(sport=NAT_T_PORT,
                                                                      dport=NAT_T_PORT),
                                   esn_en=esn_on, esn=esn_high if esn_on else 0, **kw)


@dataclass
class ChildKeys:
    name: str
    unique_id: int
    ike_name: str
    ike_id: int
    initiator: bool  # whether this charon initiated the exchange that made it
    inbound: EspSaKeys
    outbound: EspSaKeys
    local_ts: str = None
    remote_ts: str = None
    established_at: float = None


@dataclass
class IkeKeys:
    """An IKE SA's keys (RFC 7296 §2.14). spi_i/spi_r are known for SAs made
    by IKE_SA_INIT (from the NAT-D computation in the log), None for IKE SAs
    made by a rekey: take them from a capture then (ike_messages())."""
    ike_name: str
    ike_id: int
    initiator: bool
    proposal: str
    spi_i: int = None
    spi_r: int = None
    sk_d: bytes = field(default=None, repr=False)
    sk_ai: bytes = field(default=None, repr=False)
    sk_ar: bytes = field(default=None, repr=False)
    sk_ei: bytes = field(default=None, repr=False)
    sk_er: bytes = field(default=None, repr=False)
    sk_pi: bytes = field(default=None, repr=False)
    sk_pr: bytes = field(default=None, repr=False)

    def wireshark_line(self):
        """A line of Wireshark's ikev2_decryption_table (AES-GCM 16-octet ICV)."""
        enc = {16: "AES-GCM-128 with 16 octet ICV [RFC5282]",
               32: "AES-GCM-256 with 16 octet ICV [RFC5282]"}.get(len(self.sk_ei) - 4)
        return (f'{self.spi_i:016x},{self.spi_r:016x},{self.sk_ei.hex()},{self.sk_er.hex()},'
                f'"{enc}",,,"NONE [RFC4306]"')


@dataclass
class NegotiatedKeys:
    ike: list
    children: list

    def esp_sas(self):
        return [sa for c in self.children for sa in (c.inbound, c.outbound)]

    def by_spi(self, spi):
        for sa in self.esp_sas():
            if sa.spi == spi:
                return sa
        return None

    def child(self, name=None, last=True):
        kids = [c for c in self.children if name is None or c.name == name]
        assert kids, f"no child SA {name or ''} in the log"
        return kids[-1] if last else kids[0]


_SPI_LINE_RE = re.compile(r"^\s*SPI 0x([0-9a-f]+), src (\S+) dst (\S+)")
_ESTABLISHED_RE = re.compile(r"^(?:inbound |outbound )?CHILD_SA (\S+)\{(\d+)\} established with "
                             r"SPIs ([0-9a-f]+)_i ([0-9a-f]+)_o and TS (.*?) === (.*)$")


def parse_keys(text):
    """IKE and child SAs with keys from a charon filelog written with ike=4 chd=4.

    Child keys are logged in the thread that installs the SA, right after
    "CHILD_SA x{N} state change: CREATED => INSTALLING", as "encryption
    initiator key", "encryption responder key" (and integrity keys for non-AEAD
    proposals): initiator/responder of the exchange that created the SA, which
    this charon was when that thread last "parsed … response" (initiator) or
    "parsed … request" (responder). SPIs come from "CHILD_SA x{N} established
    with SPIs <in>_i <out>_o" (after a rekey the inbound and outbound halves
    may be logged by different threads)."""
    role = {}  # thread -> "initiator" | "responder" (last parsed message)
    cur_child = {}  # thread -> pending dict while installing
    cur_ike = {}  # thread -> pending IkeKeys
    pending = {}  # child unique id -> dict
    spi_addrs = {}
    natd_spis = {}  # IKE SA unique id -> (SPIi, SPIr) for the keys derived next
    ike_names = {}  # IKE SA unique id -> connection name
    children, ikes, done = [], [], set()
    proposal = {}
    for ts, th, sub, iname, iid, msg, dump in _log_records(text):
        m = re.match(r"^parsed (\S+) (request|response) (\d+)", msg)
        if m:
            role[th] = "responder" if m.group(2) == "request" else "initiator"
            continue
        m = re.match(r"^generating (\S+) (request|response) (\d+)", msg)
        if m and m.group(1) == "IKE_SA_INIT":
            role[th] = "initiator" if m.group(2) == "request" else "responder"
            continue
        m = re.match(r"^selected proposal: (IKE|ESP):(\S+)", msg)
        if m:
            proposal[(th, m.group(1))] = m.group(2)
            continue
        if dump is not None:
            m = re.match(r"^Sk_(d|ai|ar|ei|er|pi|pr) secret$", msg)
            if m:
                k = cur_ike.get(th)
                if k is None or m.group(1) == "d":
                    k = IkeKeys(iname, iid, role.get(th) == "initiator",
                                proposal.get((th, "IKE")))
                    if iid in natd_spis:
                        k.spi_i, k.spi_r = natd_spis.pop(iid)
                    cur_ike[th] = k
                    ikes.append(k)
                setattr(k, "sk_" + m.group(1), dump)
                continue
            if msg == "natd_chunk" and len(dump) >= 16:
                # NAT-D hashes are computed over SPIi | SPIr | address | port
                # in IKE_SA_INIT, before the keys of the new IKE SA are derived
                spi_i, spi_r = struct.unpack("!QQ", dump[:16])
                if spi_r and iid is not None:
                    natd_spis.setdefault(iid, (spi_i, spi_r))
                continue
            m = re.match(r"^(encryption|integrity) (initiator|responder) key$", msg)
            if m and th in cur_child:
                cur_child[th][(m.group(1), m.group(2))] = dump
                continue
            continue
        m = re.match(r"^CHILD_SA (\S+)\{(\d+)\} state change: CREATED => INSTALLING", msg)
        if m:
            d = {"name": m.group(1), "id": int(m.group(2)), "ike_name": iname, "ike_id": iid,
                 "initiator": role.get(th) == "initiator",
                 "esp": proposal.get((th, "ESP"), "")}
            cur_child[th] = pending[d["id"]] = d
            continue
        m = re.match(r"^\s*using (\S+) for (encryption|integrity)", msg)
        if m and th in cur_child:
            cur_child[th][m.group(2) + "_alg"] = m.group(1)
            continue
        m = _SPI_LINE_RE.match(msg)
        if m:
            spi_addrs[int(m.group(1), 16)] = (m.group(2), m.group(3))
            continue
        m = _ESTABLISHED_RE.match(msg)
        if m:
            cid = int(m.group(2))
            d = pending.get(cid)
            if d is None or cid in done:
                continue
            done.add(cid)
            cur_child.pop(th, None)
            spi_in, spi_out = int(m.group(3), 16), int(m.group(4), 16)
            mine, theirs = ("initiator", "responder") if d["initiator"] else ("responder",
                                                                               "initiator")
            esn = "/EXT_SEQ" in d["esp"] and "NO_EXT_SEQ" not in d["esp"]

            def sa(direction, spi, who):
                src, dst = spi_addrs.get(spi, (None, None))
                return EspSaKeys(d["name"], cid, direction, spi, src, dst, d.get("encryption_alg"),
                                 d.get(("encryption", who)), d.get("integrity_alg"),
                                 d.get(("integrity", who)), esn)

            children.append(ChildKeys(d["name"], cid, d["ike_name"], d["ike_id"], d["initiator"],
                                      sa("in", spi_in, theirs), sa("out", spi_out, mine),
                                      m.group(5), m.group(6), ts))
            continue
        m = re.match(r"^IKE_SA (\S+)\[(\d+)\] established", msg)
        if m:
            ike_names[int(m.group(2))] = m.group(1)
            cur_ike.pop(th, None)
    # names the responder learnt only after the keys; the outbound half of a
    # rekeyed SA may be logged before its SPI line: fill in
    for k in ikes:
        k.ike_name = k.ike_name or ike_names.get(k.ike_id)
    for c in children:
        c.ike_name = c.ike_name or ike_names.get(c.ike_id)
        for sa in (c.inbound, c.outbound):
            if sa.src is None and sa.spi in spi_addrs:
                sa.src, sa.dst = spi_addrs[sa.spi]
    return NegotiatedKeys(ikes, children)


def log_handshakes(text):
    """[(ike_name, seconds)] from 'generating IKE_SA_INIT request 0' to
    'parsed IKE_AUTH response' of each IKE SA this charon initiated."""
    starts, out = {}, []
    for ts, th, sub, iname, iid, msg, dump in _log_records(text):
        if msg.startswith("generating IKE_SA_INIT request 0"):
            starts[iid] = ts
        elif msg.startswith("parsed IKE_AUTH response") and iid in starts:
            out.append((iname, ts - starts.pop(iid)))
    return out


# ---------------------------------------------------------------------------
# PKI

def dn_to_openssl(dn):
    """'C=CH, O=bitw test, CN=x' -> '/C=CH/O=bitw test/CN=x'."""
    return "".join("/" + part.strip() for part in dn.split(","))


@dataclass
class Cert:
    name: str
    cert: Path  # PEM certificate
    key: Path  # PEM private key (PKCS#8)
    subject: str  # the DN in strongSwan's syntax
    san: tuple
    key_type: str

    def der(self):
        """The certificate in DER (what IKE's CERT payload carries)."""
        return subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                              capture_output=True, check=True).stdout


class Pki:
    """A CA and end-entity certificates made with openssl in `directory`.

        pki = Pki(tmp / "pki")
        t = pki.issue("terminal", san=["10.99.0.1", "terminal.bitw.test"], key="ecdsa")
        c = pki.issue("counterpart", key="rsa")
    """

    def __init__(self, directory, ca_subject="C=CH, O=bitw test, CN=bitw test CA", key="ecdsa",
                 days=30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.days = days
        self.ca_subject = ca_subject
        self.ca_key = self.dir / "ca.key.pem"
        self.ca_cert = self.dir / "ca.pem"
        self._genkey(self.ca_key, key)
        run(["openssl", "req", "-x509", "-new", "-key", self.ca_key, "-out", self.ca_cert,
             "-days", days, "-subj", dn_to_openssl(ca_subject), "-sha256",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash"])
        self._serial = itertools.count(0x1001)

    @staticmethod
    def _genkey(path, key):
        if key == "ecdsa":
            args = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        elif key == "ecdsa384":
            args = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]
        elif key in ("rsa", "rsa2048", "rsa3072"):
            bits = "3072" if key == "rsa3072" else "2048"
            args = ["-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"]
        else:
            raise ValueError(f"key type {key!r}: ecdsa, ecdsa384, rsa, rsa3072")
        run(["openssl", "genpkey", *args, "-out", path])
        os.chmod(path, 0o600)

    @staticmethod
    def san_entry(s):
        try:
            ipaddress.ip_address(s)
            return f"IP:{s}"
        except ValueError:
            return f"email:{s}" if "@" in s else f"DNS:{s}"

    def issue(self, name, subject=None, san=(), key="ecdsa"):
        """An end-entity certificate signed by the CA. subject defaults to
        'C=CH, O=bitw test, CN=<name>'; san entries: addresses (IP), user@host
        (email), anything else (DNS)."""
        subject = subject or f"C=CH, O=bitw test, CN={name}"
        key_path, csr = self.dir / f"{name}.key.pem", self.dir / f"{name}.csr"
        cert = self.dir / f"{name}.pem"
        self._genkey(key_path, key)
        run(["openssl", "req", "-new", "-key", key_path, "-out", csr,
             "-subj", dn_to_openssl(subject)])
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=critical,CA:FALSE",
                 "keyUsage=critical,digitalSignature",
                 "authorityKeyIdentifier=keyid"]
        if san:
            lines.append("subjectAltName=" + ",".join(self.san_entry(s) for s in san))
        ext.write_text("\n".join(lines) + "\n")
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
             "-set_serial", next(self._serial), "-days", self.days, "-sha256",
             "-extfile", ext, "-out", cert])
        return Cert(name, cert, key_path, subject, tuple(san), key)


def subject_der(cert_path):
    """The subject of a PEM certificate as DER: what an ID_DER_ASN1_DN naming
    its owner carries."""
    der = subprocess.run(["openssl", "x509", "-in", str(cert_path), "-outform", "DER"],
                         capture_output=True, check=True).stdout

    def end(i):  # the end of the TLV at i
        length, j = der[i + 1], i + 2
        if length & 0x80:
            n = length & 0x7F
            length, j = int.from_bytes(der[j:j + n], "big"), j + n
        return j + length

    def content(i):
        return i + 2 + (der[i + 1] & 0x7F if der[i + 1] & 0x80 else 0)

    i = content(content(0))  # Certificate, tbsCertificate
    if der[i] == 0xA0:  # [0] version
        i = end(i)
    for _ in range(4):  # serialNumber, signature, issuer, validity
        i = end(i)
    return der[i:end(i)]


# ---------------------------------------------------------------------------
# Capture and what it shows

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4


@dataclass
class Frame:
    ts: float
    data: bytes
    outgoing: bool  # sent by the namespace the capture runs in


class Capture:
    """Raw AF_PACKET capture of `ifname` inside namespace `ns` (both
    directions), kernel timestamps. A context manager; frames() any time."""

    def __init__(self, ns, ifname):
        self.ns, self.ifname = ns, ifname

        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.bind((ifname, 0))
            return s

        self.sock = in_netns(ns, make) if ns else make()
        self.sock.settimeout(0.1)
        self._frames = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, 64)
            except socket.timeout:
                continue
            except OSError:
                return
            ts = time.time()
            for level, typ, val in anc:
                if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(val) >= 16:
                    sec, nsec = struct.unpack("qq", val[:16])
                    ts = sec + nsec / 1e9
            with self._lock:
                self._frames.append(Frame(ts, data, addr[2] == PACKET_OUTGOING))

    def frames(self):
        with self._lock:
            return list(self._frames)

    def clear(self):
        with self._lock:
            self._frames.clear()

    def wait_for(self, pred, count=1, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            hits = [f for f in self.frames() if pred(f)]
            if len(hits) >= count or time.monotonic() > deadline:
                return hits
            time.sleep(0.02)

    def save_pcap(self, path):
        """Writes the frames (with their timestamps) as a classic pcap."""
        with open(path, "wb") as fh:
            fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
            for f in self.frames():
                sec = int(f.ts)
                fh.write(struct.pack("<IIII", sec, int((f.ts - sec) * 1e9), len(f.data),
                                     len(f.data)))
                fh.write(f.data)
        return path

    def stop(self):
        self._stop.set()
        self._t.join(timeout=2)
        self.sock.close()
        return self.frames()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _data(f):
    return f.data if isinstance(f, Frame) else bytes(f)


@dataclass
class Packet:
    """An IP frame taken apart (enough to classify it)."""
    src: str
    dst: str
    proto: int
    l4: bytes  # from the transport header on
    l3: bytes
    l2: bytes


def parse_ip(frame):
    """Packet of an Ethernet frame (after VLAN tags), or None for non-IP frames."""
    b = _data(frame)
    if len(b) < 14:
        return None
    et, off = struct.unpack_from("!H", b, 12)[0], 14
    while et in (0x8100, 0x88A8) and len(b) >= off + 4:
        et, off = struct.unpack_from("!H", b, off + 2)[0], off + 4
    l3 = b[off:]
    if et == 0x0800 and len(l3) >= 20:
        ihl = (l3[0] & 0x0F) * 4
        total = struct.unpack_from("!H", l3, 2)[0]
        l3 = l3[:total]
        return Packet(socket.inet_ntop(socket.AF_INET, l3[12:16]),
                      socket.inet_ntop(socket.AF_INET, l3[16:20]), l3[9], l3[ihl:], l3, b[:off])
    if et == 0x86DD and len(l3) >= 40:
        l3 = l3[:40 + struct.unpack_from("!H", l3, 4)[0]]
        nh, o = l3[6], 40
        while nh in (0, 43, 60) and len(l3) >= o + 2:
            nh, o = l3[o], o + (l3[o + 1] + 1) * 8
        return Packet(socket.inet_ntop(socket.AF_INET6, l3[8:24]),
                      socket.inet_ntop(socket.AF_INET6, l3[24:40]), nh, l3[o:], l3, b[:off])
    return None


def classify(frame):
    """What a frame is: 'ike' (UDP 500, or UDP 4500 with the non-ESP marker),
    'esp' (protocol 50 or UDP 4500 without the marker), 'keepalive' (NAT-T
    keepalive 0xff), 'nd' (ICMPv6 neighbour discovery / MLD), 'arp', 'non-ip',
    or 'other' (anything else: ICMP, TCP, other UDP, …)."""
    b = _data(frame)
    if len(b) >= 14 and struct.unpack_from("!H", b, 12)[0] == 0x0806:
        return "arp"
    p = parse_ip(b)
    if p is None:
        return "non-ip"
    if p.proto == 50:
        return "esp"
    if p.proto == 17 and len(p.l4) >= 8:
        sport, dport = struct.unpack_from("!HH", p.l4, 0)
        payload = p.l4[8:]
        if IKE_PORT in (sport, dport) and len(payload) >= 28:
            return "ike"
        if NAT_T_PORT in (sport, dport):
            if payload == b"\xff":
                return "keepalive"
            if payload[:4] == b"\0\0\0\0" and len(payload) >= 32:
                return "ike"
            if len(payload) >= 8:
                return "esp"
    if p.proto == 58 and p.l4 and p.l4[0] in (130, 131, 132, 133, 134, 135, 136, 137, 143):
        return "nd"
    return "other"


def _norm(a):
    return str(ipaddress.ip_address(a))


def ike_esp_problems(frames, hosts, markers=(MARKER,)):
    """Everything in a capture that is not IKE or ESP between `hosts` (pairs of
    addresses: a flow that must be protected), and every frame that contains
    one of `markers` (the plaintext of the traffic helpers). Empty when the
    capture is clean. ARP, ICMPv6 ND/MLD and frames between other addresses
    are ignored; counts of what was seen: see flow_summary()."""
    pairs = {frozenset((_norm(a), _norm(b))) for a, b in hosts}
    problems = []
    for i, f in enumerate(frames):
        b = _data(f)
        for m in markers:
            if m and m in b:
                problems.append(f"frame #{i} carries plaintext marker {m!r}: {b.hex()}")
        p = parse_ip(b)
        if p is None or frozenset((p.src, p.dst)) not in pairs:
            continue
        kind = classify(b)
        if kind not in ("ike", "esp", "keepalive", "nd"):
            problems.append(f"frame #{i} {p.src} -> {p.dst} protocol {p.proto} is neither IKE "
                            f"nor ESP ({kind}): {b[:96].hex()}")
    return problems


def flow_summary(frames):
    """Counts per kind (classify()) of the frames."""
    out = {}
    for f in frames:
        k = classify(f)
        out[k] = out.get(k, 0) + 1
    return out


@dataclass
class IkeMessage:
    ts: float
    src: str
    dst: str
    sport: int
    dport: int
    spi_i: int
    spi_r: int
    next_payload: int
    exchange: int  # 34 IKE_SA_INIT, 35 IKE_AUTH, 36 CREATE_CHILD_SA, 37 INFORMATIONAL
    flags: int  # 0x08 from the original initiator, 0x20 response
    msg_id: int
    data: bytes  # the IKE message (without the non-ESP marker)

    @property
    def response(self):
        return bool(self.flags & 0x20)

    @property
    def from_initiator(self):
        return bool(self.flags & 0x08)

    EXCHANGES = {34: "IKE_SA_INIT", 35: "IKE_AUTH", 36: "CREATE_CHILD_SA", 37: "INFORMATIONAL"}

    def __str__(self):
        return (f"{self.EXCHANGES.get(self.exchange, self.exchange)} "
                f"{'response' if self.response else 'request'} {self.msg_id} "
                f"{self.src}[{self.sport}] -> {self.dst}[{self.dport}]")


def ike_messages(frames):
    """The IKE messages of a capture, in order."""
    out = []
    for f in frames:
        if classify(f) != "ike":
            continue
        p = parse_ip(f)
        sport, dport = struct.unpack_from("!HH", p.l4, 0)
        msg = p.l4[8:]
        if NAT_T_PORT in (sport, dport) and msg[:4] == b"\0\0\0\0":
            msg = msg[4:]
        if len(msg) < 28:
            continue
        spi_i, spi_r, np_, ver, exch, flags, mid, length = struct.unpack_from("!QQBBBBII", msg, 0)
        out.append(IkeMessage(f.ts if isinstance(f, Frame) else 0.0, p.src, p.dst, sport, dport,
                              spi_i, spi_r, np_, exch, flags, mid, msg[:length]))
    return out


def handshake_durations(frames):
    """Seconds from each IKE_SA_INIT request (first transmission) to the
    IKE_AUTH response of the same IKE SA (by the initiator's SPI), as seen where
    the capture runs; µs-resolution kernel timestamps."""
    first, out = {}, []
    for m in ike_messages(frames):
        if m.exchange == 34 and not m.response and m.spi_i not in first:
            first[m.spi_i] = m.ts
        elif m.exchange == 35 and m.response and m.spi_i in first:
            out.append(m.ts - first.pop(m.spi_i))
    return out


def decrypt_ike(message, ike):
    """Decrypts the SK payload of an IKE message (IkeMessage or bytes) with an
    IkeKeys of an AES-GCM IKE SA (RFC 5282): (first inner payload type,
    inner payloads)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = message.data if isinstance(message, IkeMessage) else bytes(message)
    flags = data[19]
    np_ = data[16]
    off = 28
    while np_ != 46:  # walk unencrypted payloads to SK
        if off + 4 > len(data):
            raise ValueError("no SK payload")
        np_, plen = data[off], struct.unpack_from("!H", data, off + 2)[0]
        off += plen
    inner_np = data[off]
    plen = struct.unpack_from("!H", data, off + 2)[0]
    body = data[off + 4:off + plen]
    key = ike.sk_ei if flags & 0x08 else ike.sk_er
    k, salt = key[:-4], key[-4:]
    iv, ct = body[:8], body[8:]
    pt = AESGCM(k).decrypt(salt + iv, ct, data[:off + 4])
    pad = pt[-1]
    return inner_np, pt[:-(pad + 1)]


def ike_payloads(first, data):
    """[(type, body)] of a chain of IKE payloads (as decrypt_ike returns it)."""
    out, np_, off = [], first, 0
    while np_ and off + 4 <= len(data):
        nxt, plen = data[off], struct.unpack_from("!H", data, off + 2)[0]
        if plen < 4:
            break
        out.append((np_, data[off + 4:off + plen]))
        np_, off = nxt, off + plen
    return out


def fill_rekeyed_ike_spis(keys, frames):
    """IKE SAs made by a rekey (CREATE_CHILD_SA with an IKE proposal) have no
    SPIs in the log: take them from the capture, decrypting each exchange with
    the keys of the IKE SA it ran in (the request's proposal carries the new
    initiator SPI, the response's the new responder SPI). Fills `keys` (a
    NegotiatedKeys) in order; returns it."""
    by_spi = {(k.spi_i, k.spi_r): k for k in keys.ike if k.spi_i is not None}
    missing = [k for k in keys.ike if k.spi_i is None]
    requests = {}
    for m in ike_messages(frames):
        old = by_spi.get((m.spi_i, m.spi_r))
        if m.exchange != 36 or old is None or not missing:
            continue
        try:
            first, inner = decrypt_ike(m, old)
        except Exception:
            continue
        sa = [body for t, body in ike_payloads(first, inner) if t == 33]
        if not sa or len(sa[0]) < 8 or sa[0][5] != 1 or sa[0][6] != 8:  # protocol IKE, 8-byte SPI
            continue
        spi = struct.unpack_from("!Q", sa[0], 8)[0]
        if not m.response:
            requests[(m.spi_i, m.msg_id)] = spi
        elif (m.spi_i, m.msg_id) in requests:
            k = missing.pop(0)
            k.spi_i, k.spi_r = requests.pop((m.spi_i, m.msg_id)), spi
            by_spi[(k.spi_i, k.spi_r)] = k
    return keys


@dataclass
class DecryptedEsp:
    index: int  # of the frame in the capture
    spi: int
    seq: int
    inner: bytes  # the inner IP packet


def decrypt_esp(frames, keys):
    """Decrypts every ESP frame of a capture with the SAs in `keys` (a
    NegotiatedKeys or a list of EspSaKeys) through Scapy's
    SecurityAssociation. Returns (decrypted, problems): problems lists ESP
    frames with an unknown SPI or that fail to authenticate."""
    from bitw_esp import parse_esp_frame, scapy_decrypt

    sas = keys.esp_sas() if isinstance(keys, NegotiatedKeys) else list(keys)
    by_spi = {sa.spi: sa for sa in sas}
    out, problems = [], []
    for i, f in enumerate(frames):
        if classify(f) != "esp":
            continue
        view = parse_esp_frame(_data(f))
        sa = by_spi.get(view.spi)
        if sa is None:
            problems.append(f"frame #{i}: ESP with unknown SPI {view.spi:#010x}")
            continue
        try:
            inner = scapy_decrypt(sa, view)
        except Exception as e:  # IPSecIntegrityError and friends
            problems.append(f"frame #{i}: SPI {view.spi:#010x} seq {view.seq_lo}: {e!r}")
            continue
        out.append(DecryptedEsp(i, view.spi, view.seq_lo, inner))
    return out, problems


# ---------------------------------------------------------------------------
# Traffic

def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass
class StreamResult:
    sent: int
    received: int
    lost_seqs: list
    duplicates: int = 0
    rtts: list = field(default_factory=list, repr=False)

    @property
    def lost(self):
        return len(self.lost_seqs)

    def __str__(self):
        return (f"sent {self.sent}, received {self.received}, lost {self.lost} "
                f"{self.lost_seqs[:20]}{'…' if self.lost > 20 else ''}, dup {self.duplicates}")


class PingStream:
    """ICMP(v6) echo requests from namespace `ns` to `dst` every `interval`
    seconds, replies counted per sequence number (raw socket in the namespace,
    in this process). Payload: MARKER + sequence number + padding to `size`.

        with PingStream(topo.terminal.ns, "10.99.0.2") as p:
            time.sleep(2)
        assert p.result.lost == 0, p.result
    """

    def __init__(self, ns, dst, interval=0.01, size=64, count=None):
        self.ns, self.dst = ns, _norm(dst)
        self.v6 = ":" in self.dst
        self.interval, self.size, self.count = interval, max(size, len(MARKER) + 8), count
        fam = socket.AF_INET6 if self.v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if self.v6 else socket.IPPROTO_ICMP
        self.sock = netns_socket(ns, fam, socket.SOCK_RAW, proto)
        self.sock.settimeout(0.05)
        self.ident = random.randrange(1, 0xFFFF)
        self.sent_at = {}
        self.replies = {}
        self.duplicates = 0
        self.result = None
        self._stop = threading.Event()
        self._done_sending = threading.Event()
        self._tx = threading.Thread(target=self._send_loop, daemon=True)
        self._rx = threading.Thread(target=self._recv_loop, daemon=True)

    def _packet(self, seq):
        payload = MARKER + struct.pack("!Q", seq)
        payload += bytes((i & 0xFF for i in range(self.size - len(payload))))
        t = 128 if self.v6 else 8
        hdr = struct.pack("!BBHHH", t, 0, 0, self.ident, seq & 0xFFFF)
        if self.v6:
            return hdr + payload  # the kernel fills in the ICMPv6 checksum
        c = _csum(hdr + payload)
        return struct.pack("!BBHHH", t, 0, c, self.ident, seq & 0xFFFF) + payload

    def _send_loop(self):
        nxt, seq = time.monotonic(), 0
        while not self._stop.is_set() and (self.count is None or seq < self.count):
            self.sent_at[seq] = time.monotonic()
            try:
                self.sock.sendto(self._packet(seq), (self.dst, 0))
            except OSError:
                pass  # e.g. no route for a moment: counted as lost
            seq += 1
            nxt += self.interval
            d = nxt - time.monotonic()
            if d > 0:
                self._stop.wait(d)
        self._done_sending.set()

    def _recv_loop(self):
        while True:
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                if self._rx_stop:
                    return
                continue
            except OSError:
                return
            if not self.v6:
                data = data[(data[0] & 0x0F) * 4:]
            want = 129 if self.v6 else 0
            if len(data) < 8 + len(MARKER) + 8 or data[0] != want:
                continue
            ident, seq16 = struct.unpack_from("!HH", data, 4)
            if ident != self.ident or data[8:8 + len(MARKER)] != MARKER:
                continue
            seq = struct.unpack_from("!Q", data, 8 + len(MARKER))[0]
            if seq in self.replies:
                self.duplicates += 1
            else:
                self.replies[seq] = time.monotonic()

    _rx_stop = False

    def start(self):
        self._rx.start()
        self._tx.start()
        return self

    def stop(self, grace=1.0):
        """Stops sending, waits up to `grace` s for outstanding replies; the result."""
        self._stop.set()
        self._tx.join(5)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and len(self.replies) < len(self.sent_at):
            time.sleep(0.01)
        self._rx_stop = True
        self._rx.join(2)
        self.sock.close()
        lost = sorted(s for s in self.sent_at if s not in self.replies)
        rtts = [self.replies[s] - self.sent_at[s] for s in self.replies if s in self.sent_at]
        self.result = StreamResult(len(self.sent_at), len(self.replies), lost, self.duplicates,
                                   rtts)
        return self.result

    def wait_sent(self, timeout=None):
        """For count=N streams: waits until all N are sent."""
        return self._done_sending.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.result is None:
            self.stop()


def ping(ns, dst, count=10, interval=0.01, timeout=1.0, size=64):
    """count echo requests; the StreamResult once all replies are in or `timeout` passed."""
    p = PingStream(ns, dst, interval=interval, size=size, count=count).start()
    p.wait_sent(count * interval + 5)
    return p.stop(grace=timeout)


class UdpStream:
    """UDP datagrams from namespace `src_ns` to `dst`:`port`, received by a
    socket in `dst_ns` (both in this process); loss counted per sequence number.
    Payload: MARKER + sequence number + padding to `size`."""

    def __init__(self, src_ns, dst_ns, dst, port=40000, pps=200, size=100, sport=0):
        self.dst = _norm(dst)
        fam = socket.AF_INET6 if ":" in self.dst else socket.AF_INET
        self.tx = netns_socket(src_ns, fam, socket.SOCK_DGRAM)
        if sport:
            self.tx.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        self.rx = netns_socket(dst_ns, fam, socket.SOCK_DGRAM)
        self.rx.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
        self.rx.settimeout(0.05)
        self.port, self.interval = port, 1.0 / pps
        self.size = max(size, len(MARKER) + 8)
        self.sent, self.got, self.duplicates = 0, set(), 0
        self.result = None
        self._stop, self._rx_stop = threading.Event(), threading.Event()
        self._tx = threading.Thread(target=self._send_loop, daemon=True)
        self._rxt = threading.Thread(target=self._recv_loop, daemon=True)

    def _send_loop(self):
        nxt = time.monotonic()
        while not self._stop.is_set():
            payload = MARKER + struct.pack("!Q", self.sent)
            payload += bytes(self.size - len(payload))
            with contextlib.suppress(OSError):
                self.tx.sendto(payload, (self.dst, self.port))
            self.sent += 1
            nxt += self.interval
            d = nxt - time.monotonic()
            if d > 0:
                self._stop.wait(d)

    def _recv_loop(self):
        while True:
            try:
                data = self.rx.recv(65535)
            except socket.timeout:
                if self._rx_stop.is_set():
                    return
                continue
            except OSError:
                return
            if data.startswith(MARKER):
                seq = struct.unpack_from("!Q", data, len(MARKER))[0]
                if seq in self.got:
                    self.duplicates += 1
                self.got.add(seq)

    def start(self):
        self._rxt.start()
        self._tx.start()
        return self

    def stop(self, grace=1.0):
        self._stop.set()
        self._tx.join(5)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and len(self.got) < self.sent:
            time.sleep(0.01)
        self._rx_stop.set()
        self._rxt.join(2)
        self.tx.close()
        self.rx.close()
        lost = sorted(set(range(self.sent)) - self.got)
        self.result = StreamResult(self.sent, len(self.got), lost, self.duplicates)
        return self.result

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.result is None:
            self.stop()


class L2Forwarder:
    """A stand-in for the box in box="veth" topologies: copies every frame
    between two interfaces (raw AF_PACKET sockets, in namespace `ns` or the
    root namespace) unchanged, like bitw with everything bypassed. For the
    harness's own test of the veth wiring; slow (Python), fine for pings."""

    def __init__(self, if_a, if_b, ns=None):
        def make(ifname):
            def mk():
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.bind((ifname, 0))
                s.settimeout(0.05)
                return s
            return in_netns(ns, mk) if ns else mk()

        self.socks = (make(if_a), make(if_b))
        self.forwarded = [0, 0]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in (0, 1)]
        for t in self._threads:
            t.start()

    def _loop(self, i):
        rx, tx = self.socks[i], self.socks[1 - i]
        while not self._stop.is_set():
            try:
                data, addr = rx.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            with contextlib.suppress(OSError):
                tx.send(data)
                self.forwarded[i] += 1

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for s in self.socks:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------
# Ready-made pairs

def psk_pair(topo, workdir, family=4, proposals="aes128gcm16-prfsha256-x25519",
             esp_proposals="aes128gcm16", conn="h2h", child="c1", **conn_kw):
    """Two charons (terminal, counterpart) with mirrored host-to-host PSK
    connections `conn`/`child` between the topology's addresses, started and
    loaded. Returns (terminal, counterpart); stop both when done."""
    workdir = Path(workdir)
    t, c = topo.terminal, topo.counterpart
    charons = []
    try:
        for me, peer, sub in ((t, c, "terminal"), (c, t, "counterpart")):
            ch = Charon(me.ns, workdir / sub)
            ch.add(Conn(conn, me.addr(family), peer.addr(family), proposals=proposals,
                        children=[Child(child, esp_proposals=esp_proposals)], **conn_kw))
            charons.append(ch)
            ch.start().load()
    except BaseException:
        for ch in charons:
            ch.stop()
        raise
    return tuple(charons)


def handshake_times(n=20, workdir=None, family=4, proposals="aes128gcm16-prfsha256-x25519",
                    esp_proposals="aes128gcm16"):
    """n charon <-> charon handshakes (terminal initiates, PSK, through a Linux
    bridge) on this machine: a list of dicts with 'wire' (IKE_SA_INIT request
    to IKE_AUTH response as captured on the counterpart's veth, seconds),
    'log' (the same from the initiator's log, ms resolution) and 'swanctl'
    (wall time of `swanctl --initiate`, including its own start-up)."""
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{STEM}hs-"))
    out = []
    try:
        with Topology("bridge") as topo:
            term, cp = psk_pair(topo, workdir, family, proposals, esp_proposals)
            try:
                with Capture(topo.counterpart.ns, topo.counterpart.ifname) as cap:
                    for _ in range(n):
                        cap.clear()
                        n_logs = len(term.handshakes())
                        t0 = time.monotonic()
                        term.initiate("c1")
                        wall = time.monotonic() - t0
                        cap.wait_for(lambda f: classify(f) == "ike", count=4, timeout=2)
                        wire = handshake_durations(cap.frames())
                        logs = term.handshakes()[n_logs:]
                        term.terminate(ike="h2h")
                        deadline = time.monotonic() + 5
                        while cp.list_sas() and time.monotonic() < deadline:
                            time.sleep(0.01)
                        out.append({"wire": wire[0] if wire else None,
                                    "log": logs[0][1] if logs else None, "swanctl": wall})
            finally:
                term.stop()
                cp.stop()
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


__all__ = [
    "CHARON", "SWANCTL", "PACKAGES", "MARKER", "HarnessError", "missing_prerequisites",
    "require_strongswan", "run", "ns_exec", "ns_sh", "in_netns", "netns_socket", "ns_pids",
    "sweep_stale", "harness_namespaces", "Endpoint", "Topology", "Vici", "Child", "Conn",
    "render_swanctl", "render_strongswan_conf", "Charon", "stray_charons", "global_charons",
    "mounts_mentioning", "EspSaKeys", "ChildKeys", "IkeKeys", "NegotiatedKeys", "parse_keys",
    "log_handshakes", "Pki", "Cert", "dn_to_openssl", "Capture", "Frame", "Packet", "parse_ip",
    "classify", "ike_esp_problems", "flow_summary", "IkeMessage", "ike_messages",
    "handshake_durations", "decrypt_ike", "ike_payloads", "fill_rekeyed_ike_spis",
    "DecryptedEsp", "decrypt_esp", "StreamResult", "PingStream", "ping", "UdpStream",
    "L2Forwarder", "psk_pair", "handshake_times", "median",
]
