"""bitw-control and bitwctl with the real dataplane, traffic flowing.

    test (RawPort) ── veth ──▶ inside [bitw-dataplane] outside ── veth ──▶ test (RawPort)
                                          ▲ control channel (Unix socket / mutual TLS)
                                     bitw-control ◀── bitwctl (admin socket)

The dataplane's ports are net_af_packet on veth pairs, so frames can be sent
while SAs and rules change. What leaves `outside` is captured and checked with
Scapy: every frame of a flow is accounted for (plaintext or ESP that Scapy
decrypts with the SA's key), in order, with ESP sequence numbers that show
whether an SA was kept or re-installed.
"""

import os
import re
import signal
import struct
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bitw_control_lib import (CTL_REFUSED, CTL_UNREACHABLE, CTL_USAGE, Proc, bitwctl,
                              control_keys, ctl_ok, start_control, wait_until)
from bitw_esp import R, T, SaSpec, esp_spi, parse_esp_frame, scapy_decrypt
from bitw_netlib import RawPort, Stream, VethPair
from bitw_testlib import render_config, unique_prefix, write_key_file

TO_HQ = SaSpec("to-hq", "out", 0x1001, tunnel_src="172.16.0.1", tunnel_dst="172.16.0.2")
DYN = SaSpec("dyn", "out", 0x3001, tunnel_src="172.16.0.1", tunnel_dst="172.16.0.3",
             aead="aes256gcm16")
LATER = SaSpec("later", "out", 0x5001, tunnel_src="172.16.0.1", tunnel_dst="172.16.0.5")
ADM_IN = SaSpec("adm-in", "in", 0x4001, tunnel_src="172.16.0.4", tunnel_dst="172.16.0.1")

PROTECTED = ("10.0.0.5", "10.1.0.9", 5001, 6001)   # lan-to-hq: protected by to-hq
UNRELATED = ("10.0.0.5", "192.0.2.9", 5000, 6000)  # bypassed throughout
DYNAMIC = ("10.0.0.6", "198.51.100.7", 7000, 7001)  # protected by dyn while its rule exists
HELD = ("10.0.0.8", "203.0.113.8", 8000, 8001)     # protected by `later`, not installed yet


def frame(flow, tag, i):
    src, dst, sport, dport = flow
    return bytes(Ether(src=T, dst=R) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport)
                 / Raw(b"%s %08d" % (tag, i)))


def tag_of(payload):
    """(tag, index) from a frame's UDP payload."""
    m = re.fullmatch(rb"([a-z]+) (\d{8})", payload)
    return (m.group(1).decode(), int(m.group(2))) if m else None


def open_frame(f, specs):
    """What a captured frame carries: ("plain", tag, i) | ("esp", spi, seq, tag, i) | None."""
    spi = esp_spi(f)
    if spi is not None:
        spec = specs.get(spi)
        assert spec is not None, f"ESP with unknown SPI {spi:#x}"
        view = parse_esp_frame(f)
        inner = IP(scapy_decrypt(spec, view))
        t = tag_of(bytes(inner[UDP].payload)) if UDP in inner else None
        return ("esp", spi, view.seq_lo, *t) if t else None
    try:
        p = Ether(f)
    except Exception:
        return None
    if UDP in p and IP in p:
        t = tag_of(bytes(p[UDP].payload))
        return ("plain", *t) if t else None
    return None


def policy(name, flow, sa, dst_prefix):
    src, _, _, _ = flow
    return {"name": name, "direction": "out", "src": f"{src}/32", "dst": dst_prefix,
            "proto": "udp", "action": "protect", "sa": sa}


class Appliance:
    """Dataplane on veths + control, sockets and keys under tmp_path."""

    def __init__(self, tmp_path, dataplane, sas=(TO_HQ,), policies=None, control_extra=None):
        self.tmp = tmp_path
        self.binary = dataplane
        self.vin, self.vout = VethPair("i"), VethPair("o")
        self.sas = list(sas)
        self.policies = policies if policies is not None else [
            {"name": "lan-to-hq", "direction": "out", "src": "10.0.0.0/24",
             "dst": "10.1.0.0/16", "action": "protect", "sa": "to-hq"}]
        self.control_extra = control_extra or {}
        self.cfg = tmp_path / "bitw.toml"
        self.write_config()
        self.admin = tmp_path / "control.sock"
        self.inside = RawPort(self.vin.outer)
        self.outside = RawPort(self.vout.outer)
        self.dp = self.ctl = None

    def key_file(self, spec):
        return write_key_file(self.tmp / f"{spec.name}.key", spec.key)

    def write_config(self, sas=None, policies=None, extra_text=""):
        sas = self.sas if sas is None else sas
        policies = self.policies if policies is None else policies
        text = render_config(self.vin.device(0), self.vout.device(1), policies,
                             prefix=unique_prefix("ctl"),
                             sas=[s.toml(self.key_file(s)) for s in sas],
                             control=control_keys(self.tmp, **self.control_extra))
        text += extra_text
        self.cfg.write_text(text)
        return text

    def start_dataplane(self):
        self.dp = Proc([self.binary, "--config", self.cfg])
        self.dp.wait_line(r"forwarding with")
        return self.dp

    def start_control(self):
        self.ctl = start_control(self.cfg)
        self.ctl.wait_line(r"reconciled")
        return self.ctl

    def ctl_ok(self, *args):
        return ctl_ok(*args, socket_path=self.admin)

    def captured(self, specs):
        return [x for x in (open_frame(f, specs) for f in self.outside.received()) if x]

    def stop(self):
        for p in (self.ctl, self.dp):
            if p and p.proc.poll() is None:
                p.finish(sig=signal.SIGTERM)
        self.inside.close()
        self.outside.close()
        self.vin.remove()
        self.vout.remove()


@pytest.fixture
def appliance(tmp_path, dataplane):
    a = Appliance(tmp_path, dataplane)
    a.start_dataplane()
    a.start_control()
    try:
        yield a
    finally:
        a.stop()


def add_sa_args(app, spec):
    args = ["sa", "add", "--name", spec.name, "--direction", spec.direction,
            "--spi", f"0x{spec.spi:08x}", "--mode", spec.mode, "--aead", spec.aead,
            "--key-file", app.key_file(spec)]
    if spec.tunnel_src:
        args += ["--tunnel-src", spec.tunnel_src, "--tunnel-dst", spec.tunnel_dst]
    return args


def add_rule_args(rule):
    args = ["policy", "add"]
    for k in ("name", "direction", "src", "dst", "proto", "action", "sa"):
        if k in rule:
            args += [f"--{k}", rule[k]]
    return args


def sa_entry(app, name, direction="out"):
    for s in app.ctl_ok("sa", "list"):
        if s["name"] == name and s["direction"] == direction:
            return s
    return None


def test_reconcile_at_start_changes_nothing(appliance):
    log = appliance.ctl.log()
    assert re.search(r"reconciled: 0 installed, 1 unchanged, 0 removed", log), log
    st = appliance.ctl_ok("status")
    assert st["dataplane"]["state"] == "up", st
    sas = appliance.ctl_ok("sa", "list")
    assert [(s["name"], s["origin"]) for s in sas] == [("to-hq", "config")], sas
    rules = appliance.ctl_ok("policy", "list")
    assert [r["name"] for r in rules] == ["lan-to-hq"], rules


def test_sa_and_rule_changes_while_traffic_flows_lose_nothing(appliance):
    """An SA and a protect rule are added and later removed through bitwctl while
    two flows run: the unrelated flow loses nothing, the changed flow has every
    packet exactly once (plaintext before and after, ESP of `dyn` in between)."""
    a = appliance
    flip = [0]

    def make(i):
        flip[0] ^= 1
        return frame(UNRELATED, b"u", i // 2) if flip[0] else frame(DYNAMIC, b"d", i // 2)

    s = Stream(a.inside, make, pps=600).start()
    time.sleep(1.0)
    a.ctl_ok(*add_sa_args(a, DYN))
    out = a.ctl_ok(*add_rule_args(policy("dyn-flow", DYNAMIC, "dyn", "198.51.100.0/24")))
    wait_until(lambda: any(x[0] == "esp" and x[1] == DYN.spi for x in a.captured({DYN.spi: DYN})),
               what="the dynamic flow encrypted with dyn")
    time.sleep(1.0)
    a.ctl_ok("policy", "del", "dyn-flow")
    a.ctl_ok("sa", "del", "dyn", "--direction", "out")
    time.sleep(1.0)
    sent = s.stop()
    time.sleep(1.0)
    got = a.captured({DYN.spi: DYN})
    u = [x[2] for x in got if x[0] == "plain" and x[1] == "u"]
    d_plain = [x[2] for x in got if x[0] == "plain" and x[1] == "d"]
    d_esp = [(x[2], x[4]) for x in got if x[0] == "esp" and x[3] == "d"]
    n_u, n_d = (sent + 1) // 2, sent // 2
    assert u == list(range(n_u)), f"unrelated flow: {len(u)} of {n_u} in order"
    d_all = sorted(d_plain + [i for _, i in d_esp])
    assert d_all == list(range(n_d)), f"dynamic flow: {len(d_all)} of {n_d}, each once"
    assert d_esp, "the dynamic flow was never encrypted"
    seqs = [q for q, _ in d_esp]
    assert seqs == list(range(1, len(seqs) + 1)), "ESP sequence numbers of dyn"
    first, last = d_esp[0][1], d_esp[-1][1]
    assert [i for _, i in d_esp] == list(range(first, last + 1)), "ESP in one stretch"
    assert d_plain == [i for i in range(n_d) if not first <= i <= last]
    assert sa_entry(a, "dyn") is None
    c = a.ctl_ok("counters")
    assert not {r: n for r, n in c["drops"].items() if n}, c["drops"]


def test_control_killed_traffic_continues_and_restart_resynchronises(appliance):
    a = appliance
    # State only control's admin knows about: it must be adopted, not lost.
    a.ctl_ok(*add_sa_args(a, ADM_IN))
    rule = {"name": "adm-in", "direction": "in", "src": "10.2.0.0/16", "dst": "10.0.0.0/24",
            "action": "protect", "sa": "adm-in"}
    a.ctl_ok(*add_rule_args(rule))
    s = Stream(a.inside, lambda i: frame(PROTECTED, b"p", i), pps=300).start()
    time.sleep(1.0)
    a.ctl.kill()  # SIGKILL: no goodbye on the channel
    n_at_kill = len(a.captured({TO_HQ.spi: TO_HQ}))
    time.sleep(1.5)
    assert len(a.captured({TO_HQ.spi: TO_HQ})) > n_at_kill + 100, \
        "traffic on the existing SA stopped when control died"
    a.ctl = start_control(a.cfg)
    m = a.ctl.wait_line(r"reconciled: (\d+) installed, (\d+) unchanged, (\d+) removed, (\d+) adopted")
    assert m.groups() == ("0", "1", "0", "1"), a.ctl.log()
    time.sleep(1.0)
    sent = s.stop()
    time.sleep(1.0)
    got = a.captured({TO_HQ.spi: TO_HQ})
    assert [x[4] for x in got] == list(range(sent)), "every protected packet, in order"
    assert [x[2] for x in got] == list(range(1, sent + 1)), \
        "sequence numbers never restarted: the SA was never re-installed"
    adm = sa_entry(a, "adm-in", "in")
    assert adm and adm["origin"] == "admin" and adm.get("adopted"), adm
    assert [r["name"] for r in a.ctl_ok("policy", "list")] == ["lan-to-hq", "adm-in"]


def test_dataplane_restart_gets_everything_back(appliance):
    a = appliance
    a.ctl_ok(*add_sa_args(a, DYN))
    a.ctl_ok(*add_rule_args(policy("dyn-flow", DYNAMIC, "dyn", "198.51.100.0/24")))
    mark = a.ctl.mark()
    a.dp.kill()
    a.ctl.wait_line(r"dataplane link (down|lost)", start=mark)
    a.write_config()  # a fresh EAL file prefix; same tables
    a.start_dataplane()
    m = a.ctl.wait_line(r"reconciled: (\d+) installed, (\d+) unchanged", start=mark)
    assert m.group(1) == "1" and m.group(2) == "1", a.ctl.log()
    a.inside.send(frame(DYNAMIC, b"d", 0))
    a.inside.send(frame(PROTECTED, b"p", 0))
    got = wait_until(lambda: len(a.captured({DYN.spi: DYN, TO_HQ.spi: TO_HQ})) >= 2 and
                     a.captured({DYN.spi: DYN, TO_HQ.spi: TO_HQ}), what="both flows encrypted")
    assert sorted((x[1], x[3]) for x in got) == [(TO_HQ.spi, "p"), (DYN.spi, "d")]


def test_reload_applies_only_the_difference(appliance):
    a = appliance
    for i in range(50):
        a.inside.send(frame(PROTECTED, b"p", i))
    wait_until(lambda: (sa_entry(a, "to-hq") or {}).get("packets") == 50, what="50 on to-hq")
    # Add an SA and a rule; keep to-hq as it is.
    a.sas = [TO_HQ, DYN]
    a.policies = a.policies + [policy("dyn-flow", DYNAMIC, "dyn", "198.51.100.0/24")]
    a.write_config()
    out = a.ctl_ok("reload")
    assert (out["sas_installed"], out["sas_unchanged"], out["sas_removed"]) == (1, 1, 0), out
    hq = sa_entry(a, "to-hq")
    assert hq["packets"] == 50 and hq["sequence"] == 50, f"to-hq was touched: {hq}"
    a.inside.send(frame(PROTECTED, b"p", 50))
    got = wait_until(lambda: [x for x in a.captured({TO_HQ.spi: TO_HQ}) if x[4] == 50],
                     what="packet 50")
    assert got[0][2] == 51, "to-hq's sequence numbers go on after the reload"
    # SIGHUP does the same; a broken file is refused and nothing changes.
    good = a.cfg.read_text()
    a.cfg.write_text(good.replace('spi = "0x00003001"', 'spi = "0x00000003"'))
    rc, out, err = bitwctl("reload", socket_path=a.admin)
    assert rc == CTL_USAGE, (rc, out, err)
    line = next(i + 1 for i, l in enumerate(a.cfg.read_text().splitlines())
                if '0x00000003' in l)
    assert f"bitw.toml:{line}" in err and "spi" in err, err
    assert sa_entry(a, "dyn")["spi"] in (0x3001, "0x00003001")
    a.cfg.write_text(good.replace('dst = "198.51.100.0/24"', 'dst = "198.51.100.0/25"'))
    mark = a.ctl.mark()
    a.ctl.signal(signal.SIGHUP)
    a.ctl.wait_line(r"reload of .*: \d+ installed|reload failed", start=mark)
    rules = {r["name"]: r for r in a.ctl_ok("policy", "list")}
    assert rules["dyn-flow"]["dst"] == "198.51.100.0/25", rules


def test_acquire_holds_packets_and_releases_them_on_install(appliance):
    a = appliance
    out = a.ctl_ok(*add_rule_args(policy("held", HELD, "later", "203.0.113.0/24")))
    for i in range(5):
        a.inside.send(frame(HELD, b"h", i))
    time.sleep(0.5)
    assert not [x for x in a.captured({}) if x[0] == "plain" and x[1] == "h"], \
        "a packet of a protect rule left in plaintext"
    st = wait_until(lambda: (lambda s: s if s["held_packets"] == 5 else None)(a.ctl_ok("status")),
                    what="5 held packets")
    assert st["acquires"] >= 1, st
    a.ctl_ok(*add_sa_args(a, LATER))
    got = wait_until(lambda: len(a.captured({LATER.spi: LATER})) >= 5 and
                     a.captured({LATER.spi: LATER}), what="released packets")
    assert [(x[1], x[2], x[4]) for x in got] == [(LATER.spi, i + 1, i) for i in range(5)], got
    assert a.ctl_ok("status")["held_packets"] == 0


def test_held_packets_time_out_and_are_counted(tmp_path, dataplane):
    a = Appliance(tmp_path, dataplane, control_extra={"hold_timeout": "500ms"})
    try:
        a.start_dataplane()
        a.start_control()
        a.ctl_ok(*add_rule_args(policy("held", HELD, "later", "203.0.113.0/24")))
        for i in range(3):
            a.inside.send(frame(HELD, b"h", i))
        wait_until(lambda: a.ctl_ok("counters")["drops"].get("hold_timeout") == 3,
                   what="3 hold_timeout drops")
        a.ctl_ok(*add_sa_args(a, LATER))
        time.sleep(0.5)
        assert a.captured({LATER.spi: LATER}) == [], "timed-out packets came out"
    finally:
        a.stop()


def test_bitwctl_errors(appliance, tmp_path):
    a = appliance
    rc, out, err = bitwctl("status", socket_path=tmp_path / "nobody.sock")
    assert rc == CTL_UNREACHABLE and "nobody.sock" in err, (rc, err)
    loose = tmp_path / "loose.key"
    loose.write_text(DYN.key.hex() + "\n")
    os.chmod(loose, 0o644)
    args = add_sa_args(a, DYN)
    args[args.index("--key-file") + 1] = loose
    rc, out, err = bitwctl(*args, socket_path=a.admin)
    assert rc == CTL_USAGE and "loose.key" in err, (rc, err)
    args = add_sa_args(a, DYN)
    args[args.index("--spi") + 1] = "3"
    rc, out, err = bitwctl(*args, socket_path=a.admin)
    assert rc in (CTL_REFUSED, CTL_USAGE) and "spi" in err.lower(), (rc, err)
    rc, out, err = bitwctl(*add_rule_args({"name": "x", "direction": "out", "src": "10.0.0.1/8",
                                           "action": "bypass"}), socket_path=a.admin)
    assert rc in (CTL_REFUSED, CTL_USAGE) and "src" in err, (rc, err)
    assert [s["name"] for s in a.ctl_ok("sa", "list")] == ["to-hq"]


def openssl(*args):
    import subprocess
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_cert(d, name, ca, ca_key, san):
    key, csr, crt, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", csr)
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "2", "-extfile", ext, "-out", crt)
    os.chmod(key, 0o600)
    return crt, key


def make_ca(d, name):
    key, crt = d / f"{name}.key", d / f"{name}.pem"
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    openssl("req", "-x509", "-new", "-key", key, "-subj", f"/CN={name}", "-days", "2",
            "-out", crt)
    return crt, key


def test_control_channel_over_mutual_tls(tmp_path, dataplane):
    from bitw_control_lib import free_port
    d = tmp_path / "pki"
    d.mkdir()
    ca, ca_key = make_ca(d, "bitw-ca")
    rogue_ca, rogue_key = make_ca(d, "rogue-ca")
    dp_crt, dp_key = make_cert(d, "dataplane", ca, ca_key, "IP:127.0.0.1")
    ctl_crt, ctl_key = make_cert(d, "control", ca, ca_key, "DNS:control.test")
    bad_crt, bad_key = make_cert(d, "intruder", rogue_ca, rogue_key, "DNS:intruder.test")
    port = free_port()
    tls = {"socket": f"tls://127.0.0.1:{port}", "tls_ca": str(ca)}
    a = Appliance(tmp_path, dataplane,
                  control_extra={**tls, "tls_cert": str(dp_crt), "tls_key": str(dp_key)})
    try:
        a.start_dataplane()
        # Control on "another host": its own file, its own certificate.
        ctl_cfg = tmp_path / "control.toml"
        ctl_cfg.write_text(a.cfg.read_text().replace(str(dp_crt), str(ctl_crt))
                           .replace(str(dp_key), str(ctl_key)))
        bad_cfg = tmp_path / "intruder.toml"
        bad_cfg.write_text(a.cfg.read_text().replace(str(dp_crt), str(bad_crt))
                           .replace(str(dp_key), str(bad_key))
                           .replace(str(tmp_path / "control.sock"), str(tmp_path / "bad.sock")))
        bad = start_control(bad_cfg)
        try:
            bad.wait_line(r"(?i)(tls|certificate)")
            st = ctl_ok("status", socket_path=tmp_path / "bad.sock")
            assert st["dataplane"]["state"] != "up", st
        finally:
            bad.finish()
        a.ctl = start_control(ctl_cfg)
        a.ctl.wait_line(r"reconciled")
        st = a.ctl_ok("status")
        assert st["dataplane"]["state"] == "up" and "tls" in st["dataplane"]["endpoint"], st
        a.inside.send(frame(PROTECTED, b"p", 0))
        assert wait_until(lambda: a.captured({TO_HQ.spi: TO_HQ}), what="ESP")
    finally:
        a.stop()
