"""The key exchange proxy against a real strongSwan: bitw speaks IKEv2 as the terminal.

    netns terminal ── veth ── inside [bitw-dataplane] outside ── veth ── netns counterpart
    (plain Linux, no IPsec)          │ punt / inject / acquire        (charon, kernel-libipsec)
                                bitw-control (IKE as the terminal)

The dataplane runs net_af_packet on the box-side veth ends; bitw-control has a
[[connection]] for the terminal. The terminal runs nothing but ping; the
counterpart runs Debian's charon. Cases:

  * the counterpart initiates to the terminal's address: bitw answers as the
    terminal, installs the Child SA; the terminal's pings get their replies;
    `bitwctl ike list` shows what charon shows, `ike terminate` deletes it;
  * the terminal's first packet triggers IKE (acquire): the held packets go
    out once the SA is installed; a refused negotiation drops them (counted);
  * IPv4 and IPv6, AES-GCM-128 and -256, PSK and certificates (ECDSA with a
    DN identity, RSA with an e-mail identity), either side initiating;
  * Child SA rekeys under 100 pings/s with zero loss: started by charon, by
    bitw's rekey_time, or by the dataplane's packet count; IKE SA rekeys
    (charon's and bitw's) under the same stream, then a Child SA rekey
    through the new IKE SA;
  * charon killed: bitw's liveness checks notice, the SAs leave the
    dataplane, and the terminal's next packets negotiate anew with the
    restarted charon;
  * two terminals, one counterpart: an IKE SA each, from each terminal's
    address;

and in every case with traffic a capture on the counterpart's veth shows
only IKE and ESP between the two addresses (never a ping in plaintext), and
every ESP frame decrypts (Scapy) with the keys from charon's log to exactly
the pings and their replies.

Needs root, DPDK and strongSwan (scripts/setup-debian.sh); fails loudly without.
"""

import re
import time
from pathlib import Path

import pytest
from scapy.all import ICMP, IP, IPv6
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest

import bitw_swan as sw
from bitw_control_lib import CONTROL_BINARY, Proc, control_keys, ctl_ok, wait_until
from bitw_swan import MARKER, Capture, Charon, Child, Conn, PingStream, Pki, Topology
from bitw_testlib import render_config, toml_str, toml_value, unique_prefix

PSK = b"bitw proxy interop PSK 0123456789abcdef"
PROPOSALS = "aes128gcm16-prfsha256-x25519"


@pytest.fixture(scope="module", autouse=True)
def _prerequisites():
    sw.require_strongswan()
    yield
    assert sw.harness_namespaces(sw.STEM) == []
    assert sw.stray_charons() == []


def connection_tables(topo, family, *, psk_file, esp="aes128gcm16", start_action="trap",
                      proposals=PROPOSALS, extra=None, child_extra=None):
    t, c = topo.terminal.addr(family), topo.counterpart.addr(family)
    plen = 32 if family == 4 else 128
    conn = {"name": "meter-hq", "terminal": "meter", "remote_addrs": [c],
            "proposals": [proposals], "local_id": t, "remote_id": c, "auth": "psk",
            "psk_file": str(psk_file), "start_action": start_action, **(extra or {})}
    child = {"name": "data", "mode": "tunnel", "esp_proposals": [esp],
             "local_ts": [f"{t}/{plen}"], "remote_ts": [f"{c}/{plen}"], **(child_extra or {})}
    lines = ["", "[[terminal]]", 'name = "meter"', f"address = {toml_str(t)}", "",
             "[[connection]]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in conn.items()]
    lines += ["", "[[connection.children]]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in child.items()]
    return "\n".join(lines) + "\n"


class Rig:
    """Topology + bitw-dataplane + bitw-control as the terminal + charon as the counterpart."""

    def __init__(self, tmp_path, dataplane, family=4, esp="aes128gcm16", start_action="trap",
                 charon_child=None, conn_extra=None, child_extra=None, charon_conn=None,
                 ca=None, charon_psk=PSK, extra_config="", extra_charon=()):
        self.tmp, self.family = Path(tmp_path), family
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.topo = Topology("veth")
        self.dp = self.ctl = self.cp = None
        try:
            psk_file = self.tmp / "meter-hq.psk"
            psk_file.write_bytes(PSK)
            psk_file.chmod(0o600)
            inside, outside = self.topo.vdevs()
            self.cfg = self.tmp / "bitw.toml"
            text = render_config(inside, outside, prefix=unique_prefix("ikp"),
                                 control=control_keys(self.tmp))
            text += connection_tables(self.topo, family, psk_file=psk_file, esp=esp,
                                      start_action=start_action, extra=conn_extra,
                                      child_extra=child_extra)
            self.cfg.write_text(text + extra_config)
            self.admin = self.tmp / "control.sock"
            self.dp = Proc([dataplane, "--config", self.cfg])
            self.dp.wait_line(r"forwarding with")
            # --verbose: every punted and rejected IKE datagram is in the log
            self.ctl = Proc([CONTROL_BINARY, "--config", self.cfg, "--verbose"])
            self.ctl.wait_line(r"reconciled")
            t, c = self.topo.terminal, self.topo.counterpart
            self.cp = Charon(c.ns, self.tmp / "counterpart")
            self.cp.add(Conn("hq", c.addr(family), t.addr(family), psk=charon_psk,
                             proposals=PROPOSALS,
                             children=[charon_child or Child("data", esp_proposals=esp)],
                             **(charon_conn or {})), *extra_charon)
            if ca:
                self.cp.install_ca(ca)
            self.cp.start().load()
            self.capture = Capture(c.ns, c.ifname)
        except BaseException:
            self.close()
            raise

    def ctl_ok(self, *args):
        return ctl_ok(*args, socket_path=self.admin)

    def ping(self, seconds=1.0, interval=0.01, during=None):
        with PingStream(self.topo.terminal.ns, self.topo.counterpart.addr(self.family),
                        interval=interval) as p:
            time.sleep(seconds / 2)
            if during:
                during()
            time.sleep(seconds / 2)
            return p.stop()

    def describe(self):
        return (f"--- bitw-control log:\n{self.ctl.log() if self.ctl else ''}\n"
                f"--- bitw-dataplane log:\n{self.dp.log()[-3000:] if self.dp else ''}\n"
                f"--- charon:\n{self.cp.describe(20) if self.cp else ''}")

    def close(self):
        for p in (self.ctl, self.dp):
            if p and p.proc.poll() is None:
                p.finish()
        if self.cp:
            self.cp.stop()
        if getattr(self, "capture", None):
            self.capture.stop()
        self.topo.close()


@pytest.fixture
def rig_factory(tmp_path, dataplane):
    rigs = []

    def make(**kw):
        r = Rig(tmp_path / f"rig{len(rigs)}", dataplane, **kw)
        rigs.append(r)
        return r

    make.tmp = tmp_path
    yield make
    for r in rigs:
        r.close()


def seq_of(payload):
    i = payload.index(MARKER) + len(MARKER)
    return int.from_bytes(payload[i:i + 8], "big")


def check_capture(rig, pings, aead, since_start=False):
    """Only IKE and ESP cross the counterpart's veth for the terminal's flow,
    and the ESP decrypts with charon's keys to exactly the pings sent and
    their replies."""
    fam = rig.family
    t_addr, c_addr = rig.topo.terminal.addr(fam), rig.topo.counterpart.addr(fam)
    frames = rig.capture.frames()
    problems = sw.ike_esp_problems(frames, [(t_addr, c_addr)])
    assert problems == [], "\n".join(problems[:10])
    # a restarted charon numbers its IKE SAs from 1 again: its log since then
    keys = sw.parse_keys(rig.cp.log_text(since_start=since_start))
    assert keys.children, rig.describe()
    for child in keys.children:
        assert child.outbound.aead == aead, child
    decrypted, problems = sw.decrypt_esp(frames, keys)
    assert problems == [], "\n".join(problems[:10])
    requests, replies = set(), set()
    for d in decrypted:
        pkt = (IPv6 if fam == 6 else IP)(d.inner)
        if fam == 4:
            kind = {8: "request", 0: "reply"}.get(pkt[ICMP].type) if ICMP in pkt else None
            payload = bytes(pkt[ICMP].payload) if ICMP in pkt else b""
        elif ICMPv6EchoRequest in pkt:
            kind, payload = "request", bytes(pkt[ICMPv6EchoRequest].data)
        elif ICMPv6EchoReply in pkt:
            kind, payload = "reply", bytes(pkt[ICMPv6EchoReply].data)
        else:
            continue
        if kind is None or MARKER not in payload:
            continue
        src, dst = (t_addr, c_addr) if kind == "request" else (c_addr, t_addr)
        assert (pkt.src, pkt.dst) == (src, dst), pkt.summary()
        (requests if kind == "request" else replies).add(seq_of(payload))
    received = set(range(pings.sent)) - set(pings.lost_seqs)
    assert requests >= received, f"decrypted requests {len(requests)}, answered {len(received)}"
    assert replies == received, f"decrypted replies {len(replies)}, answered {len(received)}"
    return decrypted


@pytest.mark.parametrize("family,esp", [(4, "aes128gcm16"), (6, "aes256gcm16")])
def test_counterpart_initiates_bitw_answers_as_the_terminal(rig_factory, family, esp):
    rig = rig_factory(family=family, esp=esp, start_action="none")
    try:
        rig.cp.initiate(child="data")
        rig.cp.wait_established(child="data")
    except sw.HarnessError as e:
        raise AssertionError(f"{e}\n{rig.describe()}") from None
    wait_until(lambda: re.search(r"Child SA `meter-hq/data` up", rig.ctl.log()),
               what="bitw installs the Child SA")
    sas = rig.cp.list_sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    # charon talked to the terminal's address and identity
    assert sas[0]["remote-host"] == rig.topo.terminal.addr(family), sas
    assert sas[0]["remote-id"] == rig.topo.terminal.addr(family), sas
    wait_until(lambda: "reconciled" in rig.ctl.log() and
               re.search(r"Child SA `meter-hq/data` of IKE SA #\d+ .*: 2 installed",
                         rig.ctl.log()), what="the Child SA in the dataplane")
    r = rig.ping(seconds=1.0)
    assert r.lost == 0 and r.sent > 20, f"{r}\n{rig.describe()}"
    check_capture(rig, r, esp)
    # bitwctl shows the IKE SA as charon does, and terminates it
    ikes = rig.ctl_ok("ike", "list")
    assert len(ikes) == 1 and ikes[0]["state"] == "established", ikes
    assert (ikes[0]["spi_i"], ikes[0]["spi_r"]) == \
        (sas[0]["initiator-spi"], sas[0]["responder-spi"]), (ikes, sas)
    assert ikes[0]["initiator"] is False and ikes[0]["nat"] is True, ikes
    kids = ikes[0]["children"]
    assert [(k["name"], k["aead"], k["installed"]) for k in kids] == \
        [("meter-hq/data", esp, True)], kids
    rig.ctl_ok("ike", "terminate", "meter-hq")
    wait_until(lambda: rig.cp.list_sas() == [], what="charon's IKE SA deleted by bitw")
    wait_until(lambda: rig.ctl_ok("ike", "list") == [], what="bitw's IKE SA gone")
    wait_until(lambda: not ike_sas(rig), what="the Child SA's SAs out of the dataplane")


@pytest.mark.parametrize("family", [4, 6])
def test_terminal_traffic_triggers_initiation(rig_factory, family):
    rig = rig_factory(family=family, start_action="trap")
    # the first pings are held while bitw negotiates as the terminal
    r = rig.ping(seconds=1.5, interval=0.02)
    log = rig.ctl.log()
    assert re.search(r"acquire for `meter-hq/data`.*initiating connection `meter-hq`", log), log
    assert re.search(r"IKE SA #\d+ of connection `meter-hq` established as initiator", log), log
    sas = rig.cp.list_sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    assert sas[0].get("initiator") != "yes", sas  # charon is the responder
    assert r.lost == 0, f"{r}\n{rig.describe()}"
    check_capture(rig, r, "aes128gcm16")


@pytest.mark.parametrize("who", ["counterpart", "terminal"])
def test_certificates(rig_factory, tmp_path, who):
    """bitw authenticates as the terminal with the terminal's certificate
    (ECDSA, identity its DN; or RSA, its e-mail address) and checks charon's
    (RSA, identity its FQDN) against the CA; either side initiates."""
    pki = Pki(tmp_path / "pki")
    t4, c4 = "10.99.0.1", "10.99.0.2"
    if who == "counterpart":
        tcert = pki.issue("meter", subject="C=CH, O=bitw test, CN=meter", san=[t4], key="ecdsa")
        t_id = t_id_charon = tcert.subject
    else:
        tcert = pki.issue("meter", san=["meter@bitw.test"], key="rsa")
        t_id = t_id_charon = "meter@bitw.test"
    ccert = pki.issue("hq", san=["hq.bitw.test", c4], key="rsa")
    rig = rig_factory(
        start_action="none" if who == "counterpart" else "trap",
        conn_extra={"auth": "pubkey", "local_cert": str(tcert.cert), "local_key": str(tcert.key),
                    "ca_certs": [str(pki.ca_cert)], "local_id": t_id,
                    "remote_id": "hq.bitw.test"},
        charon_conn={"auth": "pubkey", "cert": ccert, "local_id": "hq.bitw.test",
                     "remote_id": t_id_charon},
        ca=pki.ca_cert)
    if who == "counterpart":
        try:
            rig.cp.initiate(child="data")
            rig.cp.wait_established(child="data")
        except sw.HarnessError as e:
            raise AssertionError(f"{e}\n{rig.describe()}") from None
        wait_until(lambda: re.search(r"Child SA `meter-hq/data` of IKE SA #\d+ .*: 2 installed",
                                     rig.ctl.log()), what="the Child SA in the dataplane")
    r = rig.ping(seconds=1.5, interval=0.02)
    assert r.lost == 0, f"{r}\n{rig.describe()}"
    log = rig.cp.log_text()
    sig = "ECDSA_WITH_SHA256_DER" if who == "counterpart" else "RSA_EMSA_PKCS1_SHA2_256"
    assert re.search(rf"authentication of '[^']*' with {sig} successful", log), log[-3000:]
    sas = rig.cp.list_sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    check_capture(rig, r, "aes128gcm16")



def up_by_traffic(rig):
    """The terminal's first pings trigger IKE; returns once the Child SA is in
    the dataplane and a ping gets through."""
    r = rig.ping(seconds=1.0, interval=0.02)
    assert r.received > 0, f"{r}\n{rig.describe()}"
    rig.cp.wait_established(child="data")
    return r


def ike_sas(rig):
    """(name, direction) of the connection's SAs in the dataplane (bitwctl)."""
    return sorted((s["name"], s["direction"]) for s in rig.ctl_ok("sa", "list")
                  if s["name"].startswith("meter-hq/"))


def child_uniqueid(rig):
    kids = rig.cp.children("data")
    assert len(kids) == 1, kids
    return kids[0]["uniqueid"]


@pytest.mark.parametrize("who", ["counterpart", "bitw", "packets"])
def test_child_rekey_under_traffic_loses_nothing(rig_factory, who):
    """A Child SA rekey while the terminal pings every 10 ms: not one ping
    lost, every ESP frame (old and new SA) decrypts with charon's keys.
    Started by charon, by bitw's rekey_time, or by the dataplane counting
    rekey_packets (its soft-lifetime event makes bitw rekey)."""
    child_extra = {"bitw": {"rekey_time": "2s", "life_time": "30s"},
                   "packets": {"rekey_packets": 150, "life_packets": 100000}}.get(who)
    rig = rig_factory(start_action="trap", child_extra=child_extra)
    up_by_traffic(rig)
    old = child_uniqueid(rig)
    rig.capture.clear()

    def rekey():
        if who == "counterpart":
            rig.cp.rekey(child="data")
    r = rig.ping(seconds=5.0, interval=0.01, during=rekey)
    new = rig.cp.wait_rekeyed("data", old, timeout=10)
    assert int(new["uniqueid"]) > int(old)
    assert r.lost == 0 and r.sent > 300, f"{r}\n{rig.describe()}"
    started = "the peer" if who == "counterpart" else "we"
    assert re.search(rf"Child SA `meter-hq/data` up: .*rekeying [0-9a-f]{{8}}_i \({started} started it\)",
                     rig.ctl.log()), rig.describe()
    check_capture(rig, r, "aes128gcm16")
    if who == "packets":
        assert re.search(r"reached its soft lifetime: rekeying its Child SA", rig.ctl.log()), \
            rig.describe()
    # the old SAs leave the dataplane: one inbound and one outbound SA remain
    wait_until(lambda: len(ike_sas(rig)) == 2, what=f"old SAs removed ({ike_sas(rig)})")


@pytest.mark.parametrize("who", ["counterpart", "bitw"])
def test_ike_rekey_under_traffic_loses_nothing(rig_factory, who):
    """The IKE SA is rekeyed (by charon, or by bitw's rekey_time) while the
    terminal pings: no ping lost, the Child SA is untouched, and a liveness
    check / Child SA rekey under the new IKE SA still works."""
    conn_extra = {"rekey_time": "2s"} if who == "bitw" else None
    rig = rig_factory(start_action="trap", conn_extra=conn_extra)
    up_by_traffic(rig)
    before = rig.cp.list_sas()[0]
    rig.capture.clear()

    def rekey():
        if who == "counterpart":
            rig.cp.rekey(ike="hq")
    r = rig.ping(seconds=4.0, interval=0.01, during=rekey)
    assert r.lost == 0 and r.sent > 250, f"{r}\n{rig.describe()}"
    wait_until(lambda: re.search(r"IKE SA #\d+ of connection `meter-hq` rekeyed", rig.ctl.log()),
               what="bitw's IKE SA rekeyed")
    sas = rig.cp.list_sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    assert (sas[0]["initiator-spi"], sas[0]["responder-spi"]) != \
        (before["initiator-spi"], before["responder-spi"]), (before, sas)
    check_capture(rig, r, "aes128gcm16")
    # the new IKE SA works: charon rekeys the Child SA through it
    old = child_uniqueid(rig)
    rig.cp.rekey(child="data")
    rig.cp.wait_rekeyed("data", old, timeout=10)
    r = rig.ping(seconds=0.5)
    assert r.lost == 0, r


def test_counterpart_restart_is_noticed_and_traffic_reestablishes(rig_factory):
    """charon dies and comes back empty: bitw's liveness checks go
    unanswered, the IKE SA and its Child SA leave the dataplane, and the
    terminal's next packets negotiate a new one."""
    rig = rig_factory(start_action="trap",
                      conn_extra={"dpd_delay": "1s", "retransmit_timeout": "300ms",
                                  "retransmit_tries": 3, "retransmit_base": 1.5})
    up_by_traffic(rig)
    rig.cp.stop(kill=True)  # a crash: no Delete reaches bitw
    try:
        wait_until(lambda: re.search(r"IKE SA #1 of connection `meter-hq` failed \(timeout\)",
                                     rig.ctl.log()), timeout=15, what="the dead peer noticed")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{rig.describe()}") from None
    wait_until(lambda: not ike_sas(rig), what="the dead peer's SAs removed from the dataplane")
    rig.cp.start().load()
    rig.capture.clear()
    r = rig.ping(seconds=2.0, interval=0.02)
    assert r.lost == 0, f"{r}\n{rig.describe()}"
    assert re.search(r"IKE SA #2 of connection `meter-hq` established as initiator",
                     rig.ctl.log()), rig.describe()
    check_capture(rig, r, "aes128gcm16", since_start=True)


def test_failed_negotiation_drops_the_held_packets(rig_factory):
    """The counterpart refuses bitw's PSK: the pings that triggered IKE were
    held, are dropped and counted (hold_failed), and never left in clear."""
    rig = rig_factory(start_action="trap", charon_psk=b"not the key bitw has, 0123456789")
    r = rig.ping(seconds=1.5, interval=0.05)
    assert r.received == 0, r
    wait_until(lambda: re.search(r"IKE SA #\d+ of connection `meter-hq` failed \(auth_failed\)",
                                 rig.ctl.log()), what="the failed negotiation")
    counters = rig.ctl_ok("counters")
    assert counters["drops"].get("hold_failed", 0) >= 1, counters["drops"]
    assert rig.cp.list_sas() == []
    frames = rig.capture.frames()
    problems = sw.ike_esp_problems(frames, [(rig.topo.terminal.v4, rig.topo.counterpart.v4)])
    assert problems == [], problems[:5]


def test_two_terminals_one_counterpart_each_their_own_ike_sa(rig_factory):
    """Two terminals behind the box talk to one counterpart: each has its
    own IKE SA, from its own address and with its own identity, as if each
    ran IKE itself."""
    t2 = "10.99.0.3"
    psk2 = PSK  # charon picks a PSK by the peers' ids only when the harness names them
    extra = ("\n[[terminal]]\nname = \"meter2\"\naddress = \"%s\"\n"
             "\n[[connection]]\nname = \"meter2-hq\"\nterminal = \"meter2\"\n"
             "remote_addrs = [\"10.99.0.2\"]\nproposals = [\"%s\"]\nauth = \"psk\"\n"
             "psk_file = \"{psk2}\"\nstart_action = \"none\"\n"
             "\n[[connection.children]]\nname = \"data\"\nesp_proposals = [\"aes256gcm16\"]\n"
             % (t2, PROPOSALS))
    psk2_file = Path(rig_factory.tmp) / "meter2.psk"
    psk2_file.write_bytes(psk2)
    psk2_file.chmod(0o600)
    c4 = "10.99.0.2"
    rig = rig_factory(start_action="none", extra_config=extra.replace("{psk2}", str(psk2_file)),
                      extra_charon=[Conn("hq2", c4, t2, psk=psk2, proposals=PROPOSALS,
                                         children=[Child("data2", esp_proposals="aes256gcm16")])])
    rig.topo.terminal.sh(f"ip addr add {t2}/24 dev {rig.topo.terminal.ifname}")
    for child in ("data", "data2"):
        try:
            rig.cp.initiate(child=child)
        except sw.HarnessError as e:
            raise AssertionError(f"{e}\n{rig.describe()}") from None
    sas = rig.cp.wait_established(child=None, ike="hq2")
    by_conn = {s["name"]: s for s in rig.cp.list_sas()}
    assert set(by_conn) == {"hq", "hq2"}, by_conn
    assert by_conn["hq"]["remote-host"] == "10.99.0.1" and by_conn["hq2"]["remote-host"] == t2
    assert by_conn["hq2"]["remote-id"] == t2, by_conn["hq2"]
    ikes = {k["connection"]: k for k in rig.ctl_ok("ike", "list")}
    assert set(ikes) == {"meter-hq", "meter2-hq"}, ikes
    assert ikes["meter-hq"]["local"].startswith("10.99.0.1:") and \
        ikes["meter2-hq"]["local"].startswith(t2 + ":"), ikes
    assert ikes["meter2-hq"]["children"][0]["aead"] == "aes256gcm16", ikes
    wait_until(lambda: len(ike_sas(rig)) == 2 and len([
        s for s in rig.ctl_ok("sa", "list") if s["name"].startswith("meter2-hq/")]) == 2,
        what="both terminals' Child SAs in the dataplane")
    r = rig.ping(seconds=0.5)
    assert r.lost == 0, r
