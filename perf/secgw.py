"""DPDK's ipsec-secgw as the peer of perf/esp.py: build it from Debian's dpdk-doc, write its
configuration, run it on one core and read its port counters over a fixed window.

    build(cache_root)            -> path of the built binary (cached per DPDK version and patch)
    crypto_vdev()                -> ("crypto_aesni_gcm0", "intel-ipsec-mb") or the OpenSSL PMD
    write_config(path, ...)      -> the SP / SA / RT lines (its documented config syntax)
    run(binary, vdevs, cfg, ...) -> {"mpps": ..., counters, problems}

The example is built with its own Makefile (pkg-config libdpdk, shared linking) from a copy of
/usr/share/dpdk/examples/ipsec-secgw. One change is applied to the copy: port_init() requests RX
checksum offload, which net_pcap / net_null do not offer, and exits; the copy drops that request
when the port lacks it (the application never reads the checksum flags). Nothing else changes.

Counting: EAL telemetry (the /var/run/dpdk/<prefix>/dpdk_telemetry.v2 socket, `/ethdev/stats,N`)
read twice, `seconds` apart, after `warmup` seconds of traffic: the rate is the difference of the
output port's `opackets` over the monotonic time between the two reads. ipsec-secgw is then
stopped with SIGINT.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time

EXAMPLE_DIR = "/usr/share/dpdk/examples/ipsec-secgw"
PMD_GLOB = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-*/librte_crypto_%s.so*"

_ANCHOR = "\tlocal_port_conf.txmode.offloads |= req_tx_offloads;\n"
_PATCH = (
    "\t/* bitw perf/secgw.py: drop the RX checksum offload a virtual port lacks */\n"
    "\tlocal_port_conf.rxmode.offloads &= dev_info.rx_offload_capa |\n"
    "\t\t~(uint64_t)RTE_ETH_RX_OFFLOAD_CHECKSUM;\n"
)


def dpdk_version():
    p = subprocess.run(["pkg-config", "--modversion", "libdpdk"], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError("pkg-config cannot find libdpdk (apt-get install libdpdk-dev pkg-config)")
    return p.stdout.strip()


def build(cache_root, log=None):
    """Builds ipsec-secgw once per DPDK version and patch under cache_root; returns the binary."""
    if not os.path.isfile(os.path.join(EXAMPLE_DIR, "ipsec-secgw.c")):
        raise RuntimeError("%s not found (apt-get install dpdk-doc)" % EXAMPLE_DIR)
    tag = hashlib.sha256((dpdk_version() + _PATCH).encode()).hexdigest()[:10]
    out = os.path.join(cache_root, "ipsec-secgw-%s-%s" % (dpdk_version(), tag))
    binary = os.path.join(out, "ipsec-secgw", "build", "ipsec-secgw-shared")
    if os.access(binary, os.X_OK):
        return binary
    tmp = out + ".tmp-%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    src = os.path.join(tmp, "ipsec-secgw")
    shutil.copytree(EXAMPLE_DIR, src)
    common = os.path.join(os.path.dirname(EXAMPLE_DIR), "common")  # its Makefile adds -I../common
    if os.path.isdir(common):
        shutil.copytree(common, os.path.join(tmp, "common"))
    c = os.path.join(src, "ipsec-secgw.c")
    text = open(c).read()
    if text.count(_ANCHOR) != 1:
        raise RuntimeError("%s: port_init() is not as expected; cannot drop the RX checksum request" % c)
    with open(c, "w") as f:
        f.write(text.replace(_ANCHOR, _ANCHOR + _PATCH))
    if log:
        log("== building ipsec-secgw (DPDK %s) in %s" % (dpdk_version(), out))
    p = subprocess.run(["make", "-j%d" % (os.cpu_count() or 1), "shared"], cwd=src, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError("make ipsec-secgw failed:\n%s" % (p.stdout + p.stderr)[-3000:])
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return binary


def crypto_vdev():
    """intel-ipsec-mb's AES-GCM PMD if Debian's DPDK has it, else the OpenSSL PMD."""
    if glob.glob(PMD_GLOB % "ipsec_mb"):
        return "crypto_aesni_gcm0", "crypto_aesni_gcm (intel-ipsec-mb)"
    if glob.glob(PMD_GLOB % "openssl"):
        return "crypto_openssl0", "crypto_openssl (OpenSSL)"
    raise RuntimeError("no software crypto PMD for AES-GCM (librte_crypto_ipsec_mb or librte_crypto_openssl)")


def _key(material):
    return ":".join("%02x" % b for b in material)


def write_config(path, lan, remote, local_gw, peer_gw, spi_out, spi_in, key_out, key_in):
    """Port 0 protected (LAN side), port 1 unprotected (ESP side). SA out: lan -> remote into the
    tunnel local_gw -> peer_gw; SA in: ESP from peer_gw, inner remote -> lan. Keys are the 16-byte
    AES key followed by the 4-byte salt (RFC 4106), as bitw's key files hold them. ipsec-secgw's
    replay window is off (its default), so a looping capture is not dropped as replays."""
    lines = [
        "sp ipv4 out esp protect %d pri 1 src %s dst %s sport 0:65535 dport 0:65535" % (spi_out, lan, remote),
        "sp ipv4 in esp protect %d pri 1 src %s dst %s sport 0:65535 dport 0:65535" % (spi_in, remote, lan),
        "sa out %d aead_algo aes-128-gcm aead_key %s mode ipv4-tunnel src %s dst %s"
        % (spi_out, _key(key_out), local_gw, peer_gw),
        "sa in %d aead_algo aes-128-gcm aead_key %s mode ipv4-tunnel src %s dst %s"
        % (spi_in, _key(key_in), peer_gw, local_gw),
        "rt ipv4 dst %s/32 port 1" % peer_gw,
        "rt ipv4 dst %s port 0" % lan,
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


class Telemetry:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.s.settimeout(5)
        self.s.connect(path)
        json.loads(self.s.recv(16384))  # the greeting: version, pid, max_output_len

    def port_stats(self, port):
        self.s.send(b"/ethdev/stats,%d" % port)
        return json.loads(self.s.recv(65536))["/ethdev/stats"]

    def close(self):
        self.s.close()


COUNTERS = ("ipackets", "opackets", "imissed", "ierrors", "oerrors", "rx_nombuf")


def run(binary, core, eal, prefix, port0, port1, crypto, cfg, in_port, out_port, warmup, seconds, mtu=1600,
        measure=True):
    """One run: port0 / port1 are the two ethdev vdevs (port ids in command-line order), traffic
    enters on in_port and leaves on out_port. Returns the rate and the window's counters.
    measure=False: just run `seconds` once started and stop (a capture run); returns None."""
    eal = [a for a in eal if a != "--no-telemetry"]  # the counters come through telemetry
    cmd = ([binary, "-l", str(core)] + eal + ["--file-prefix", prefix,
           "--vdev", port0, "--vdev", port1, "--vdev", crypto, "--",
           "-p", "0x3", "-P", "-u", "0x2", "--config", "(0,0,%d),(1,0,%d)" % (core, core),
           "-f", cfg, "--mtu", str(mtu)])
    rundir = "/var/run/dpdk/%s" % prefix
    sock = os.path.join(rundir, "dpdk_telemetry.v2")
    logf = open(cfg + ".log", "w+")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    tel = None
    try:
        deadline = time.monotonic() + 60
        while True:
            logf.flush()
            with open(cfg + ".log") as f:
                started = "entering main loop" in f.read()
            if started and os.path.exists(sock):
                break
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ipsec-secgw did not start (exit %s): %s\n%s"
                                   % (p.poll(), " ".join(cmd), open(cfg + ".log").read()[-3000:]))
            time.sleep(0.05)
        if not measure:
            time.sleep(seconds)
        else:
            tel = Telemetry(sock)
            time.sleep(warmup)
            ta = time.monotonic()
            a = {port: tel.port_stats(port) for port in (0, 1)}
            tb = time.monotonic()
            time.sleep(seconds)
            tc = time.monotonic()
            b = {port: tel.port_stats(port) for port in (0, 1)}
            td = time.monotonic()
    finally:
        if tel:
            tel.close()
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        logf.close()
        shutil.rmtree(rundir, ignore_errors=True)  # this run's own runtime directory
    if p.returncode != 0:
        raise RuntimeError("ipsec-secgw exited %d: %s\n%s" % (p.returncode, " ".join(cmd),
                                                               open(cfg + ".log").read()[-3000:]))
    if not measure:
        return None
    window = (tc + td) / 2 - (ta + tb) / 2
    d = {port: {k: b[port].get(k, 0) - a[port].get(k, 0) for k in COUNTERS} for port in (0, 1)}
    tx = d[out_port]["opackets"]
    rx = d[in_port]["ipackets"]
    problems = []
    # A burst or two may be in flight at either read; anything more is a drop.
    if abs(rx - tx) > max(1024, rx // 1000):
        problems.append("ipsec-secgw: %d received on port %d but %d sent on port %d in the window"
                        % (rx, in_port, tx, out_port))
    errs = {"port%d.%s" % (port, k): d[port][k] for port in (0, 1) for k in COUNTERS[2:] if d[port][k]}
    if errs:
        problems.append("ipsec-secgw: %s" % errs)
    if tx <= 0:
        problems.append("ipsec-secgw forwarded nothing")
    return {
        "mpps_per_worker": tx / window / 1e6,
        "window_seconds": window,
        "tx_packets_window": tx,
        "rx_packets_window": rx,
        "counters_window": d,
        "problems": problems,
    }
