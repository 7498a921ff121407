"""Live traffic for the system tests: veth pairs feeding net_af_packet ports,
and raw AF_PACKET sockets that send and capture frames on the test's ends.

    test ── veth ──▶ bitw inside (net_af_packet) ... bitw outside ── veth ──▶ test

The veths live in the root namespace but carry no addresses and have IPv6
turned off, so the kernel adds no traffic of its own; checksum offload is off
(DESIGN.md: otherwise forwarded frames may carry partial checksums). Nothing is
ever sent anywhere but these veths.
"""

import itertools
import os
import socket
import subprocess
import threading
import time

ETH_P_ALL = 0x0003
_seq = itertools.count()


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class VethPair:
    """`outer` is the test's end, `inner` the dataplane's (net_af_packet iface)."""

    def __init__(self, tag):
        n = next(_seq)
        stem = f"bw{os.getpid() % 10000}{tag}{n}"[:13]
        self.outer, self.inner = stem + "t", stem + "d"
        _ip("link", "del", self.outer, check=False)
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        for dev in (self.outer, self.inner):
            with open(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "w") as f:
                f.write("1\n")
            subprocess.run(["ethtool", "-K", dev, "tx", "off", "rx", "off"],
                           capture_output=True, check=False)
            _ip("link", "set", dev, "mtu", "9000")
            _ip("link", "set", dev, "up")

    def device(self, index):
        """The DPDK vdev string for the dataplane's end."""
        return f"net_af_packet{index},iface={self.inner},qpairs=1"

    def remove(self):
        _ip("link", "del", self.outer, check=False)


class RawPort:
    """Sends frames on an interface and captures what arrives on it."""

    def __init__(self, ifname):
        self.ifname = ifname
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.frames = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._capture, daemon=True)
        self._t.start()

    def _capture(self):
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # our own sends
            with self._lock:
                self.frames.append(data)

    def send(self, frame):
        self.sock.send(bytes(frame))

    def received(self):
        with self._lock:
            return list(self.frames)

    def clear(self):
        with self._lock:
            self.frames.clear()

    def wait_for(self, pred, count=1, timeout=10.0):
        """Waits until `count` captured frames satisfy `pred`; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            hits = [f for f in self.received() if pred(f)]
            if len(hits) >= count or time.monotonic() > deadline:
                return hits
            time.sleep(0.05)

    def close(self):
        self._stop.set()
        self._t.join(timeout=2)
        self.sock.close()


class Stream:
    """Sends frames from `make(i)` at `pps` in a thread until stopped."""

    def __init__(self, port, make, pps=500):
        self.port, self.make, self.interval = port, make, 1.0 / pps
        self.sent = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        nxt = time.monotonic()
        while not self._stop.is_set():
            self.port.send(self.make(self.sent))
            self.sent += 1
            nxt += self.interval
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join(timeout=5)
        return self.sent
