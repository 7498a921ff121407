"""The strongSwan interop harness's own proof (tests/bitw_swan.py).

These tests do NOT test bitw. They show that the harness the bitw IKEv2
interop tests build on does what it claims, with two real charons (one in the
"terminal" namespace, one in the "counterpart" namespace) talking through a
Linux bridge in a "box" namespace, or through two veth ends in the root
namespace joined by a Python stand-in (where bitw-dataplane's net_af_packet
ports go):

  * the topology, charon configs (PSK, certificates), swanctl and vici work;
  * traffic passes with zero loss once the child SA is up, also across a
    child rekey;
  * a capture on the counterpart's side shows only IKE and ESP for the flow,
    never its plaintext, and that ESP decrypts (Scapy) with the keys parsed
    from charon's log to exactly the terminal's packets; IKE decrypts with the
    IKE SA keys;
  * nothing is left behind: namespaces, charon processes, mounts.

They need root and Debian's strongSwan packages (scripts/setup-debian.sh); on
a machine without them they fail loudly instead of being skipped.
"""

import os
import struct
import subprocess
import time

import pytest
from scapy.all import ICMP, IP, IPv6
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest

import bitw_swan as sw
from bitw_swan import MARKER, Capture, Charon, Child, Conn, PingStream, Pki, Topology

PROPOSALS = "aes128gcm16-prfsha256-x25519"
ESP_PROPOSALS = "aes128gcm16"


@pytest.fixture(scope="module", autouse=True)
def _prerequisites():
    sw.require_strongswan()
    yield
    # the module as a whole leaves nothing of this session behind
    assert sw.harness_namespaces(sw.STEM) == []
    assert sw.stray_charons() == []


@pytest.fixture
def topo():
    """A bridge topology, closed (namespaces deleted) whatever the test did."""
    with Topology("bridge") as t:
        yield t


def up_pair(topo, tmp_path, family=4, **kw):
    """PSK charons in terminal and counterpart, loaded; the terminal initiates."""
    term, cp = sw.psk_pair(topo, tmp_path, family, PROPOSALS, ESP_PROPOSALS, **kw)
    return term, cp


def seq_of(payload):
    """The sequence number the ping helper put after MARKER."""
    i = payload.index(MARKER) + len(MARKER)
    return struct.unpack_from("!Q", payload, i)[0]


def check_capture(frames, term, cp, topo, family, pings):
    """The capture on the counterpart's veth: only IKE/ESP between the two
    hosts, no plaintext; every ESP frame decrypts with the keys from the
    terminal's log to the terminal's echo requests / the counterpart's
    replies, one per ping. Returns the decrypted packets."""
    t_addr, c_addr = topo.terminal.addr(family), topo.counterpart.addr(family)
    problems = sw.ike_esp_problems(frames, [(t_addr, c_addr)])
    assert problems == [], "\n".join(problems[:10])
    summary = sw.flow_summary(frames)
    assert summary.get("ike", 0) >= 4, summary  # IKE_SA_INIT + IKE_AUTH, both ways
    assert summary.get("esp", 0) >= 2 * pings.sent, summary

    keys = term.negotiated_keys()
    ckeys = cp.negotiated_keys()
    # the two logs agree: one side's outbound SA is the other's inbound
    for mine in keys.children:
        theirs = [c for c in ckeys.children if c.inbound.spi == mine.outbound.spi]
        assert theirs, f"no child SA in the counterpart's log for {mine}"
        assert theirs[0].inbound.encr_key == mine.outbound.encr_key
        assert theirs[0].outbound.spi == mine.inbound.spi
        assert theirs[0].outbound.encr_key == mine.inbound.encr_key
        assert mine.outbound.aead == "aes128gcm16" and len(mine.outbound.encr_key) == 20
        assert (mine.outbound.src, mine.outbound.dst) == (t_addr, c_addr)

    decrypted, problems = sw.decrypt_esp(frames, keys)
    assert problems == [], "\n".join(problems[:10])
    requests, replies = set(), set()
    inner_cls = IPv6 if family == 6 else IP
    for d in decrypted:
        pkt = inner_cls(d.inner)
        payload = bytes(pkt.payload.payload)
        if family == 4:
            assert ICMP in pkt, pkt.summary()
            kind = {8: "request", 0: "reply"}[pkt[ICMP].type]
        else:
            assert ICMPv6EchoRequest in pkt or ICMPv6EchoReply in pkt, pkt.summary()
            kind = "request" if ICMPv6EchoRequest in pkt else "reply"
            payload = bytes(pkt[ICMPv6EchoRequest if kind == "request" else ICMPv6EchoReply].data)
        src, dst = (t_addr, c_addr) if kind == "request" else (c_addr, t_addr)
        assert (pkt.src, pkt.dst) == (src, dst), pkt.summary()
        (requests if kind == "request" else replies).add(seq_of(payload))
    assert requests == set(range(pings.sent)), f"decrypted requests {len(requests)} of {pings.sent}"
    assert replies == set(range(pings.sent)), f"decrypted replies {len(replies)} of {pings.sent}"
    return decrypted


def run_ping(topo, family, seconds=1.0, during=None):
    with PingStream(topo.terminal.ns, topo.counterpart.addr(family), interval=0.01) as p:
        time.sleep(seconds / 2)
        if during:
            during()
        time.sleep(seconds / 2)
        r = p.stop()
    return r


@pytest.mark.parametrize("family", [4, 6])
def test_harness_psk_pair_passes_traffic_and_capture_decrypts(topo, tmp_path, family):
    term, cp = up_pair(topo, tmp_path, family)
    try:
        with Capture(topo.counterpart.ns, topo.counterpart.ifname) as cap:
            term.initiate("c1")
            sas = term.wait_established("c1")
            cp.wait_established("c1")
            ike = sas[0]
            assert (ike["encr-alg"], ike["encr-keysize"], ike["prf-alg"], ike["dh-group"]) == \
                ("AES_GCM_16", "128", "PRF_HMAC_SHA2_256", "CURVE_25519"), ike
            child = ike["child-sas"][0]
            assert (child["mode"], child["encap"], child["encr-alg"]) == \
                ("TUNNEL", "yes", "AES_GCM_16"), child
            r = run_ping(topo, family)
            assert r.sent >= 50 and r.lost == 0, r
            time.sleep(0.1)
            frames = cap.frames()
        check_capture(frames, term, cp, topo, family, r)

        # IKE: the log's IKE SA SPIs are the wire's, and its keys decrypt IKE_AUTH
        msgs = sw.ike_messages(frames)
        assert [(m.exchange, m.response) for m in msgs[:4]] == \
            [(34, False), (34, True), (35, False), (35, True)], [str(m) for m in msgs]
        ike_keys = term.negotiated_keys().ike[-1]
        assert (ike_keys.spi_i, ike_keys.spi_r) == (msgs[0].spi_i, msgs[1].spi_r)
        assert ike_keys.initiator and not cp.negotiated_keys().ike[-1].initiator
        first, _ = sw.decrypt_ike(msgs[2], ike_keys)
        assert first == 35  # IDi
        first, _ = sw.decrypt_ike(msgs[3], cp.negotiated_keys().ike[-1])
        assert first == 36  # IDr
        assert ike_keys.wireshark_line().startswith(f"{msgs[0].spi_i:016x},")

        wire = sw.handshake_durations(frames)
        logged = term.handshakes()
        assert len(wire) == 1 and len(logged) == 1
        print(f"IPv{family} handshake: {wire[0] * 1e3:.2f} ms on the wire, "
              f"{logged[0][1] * 1e3:.0f} ms in charon's log; ping {r}")
    finally:
        term.stop()
        cp.stop()


def test_harness_certificates_ecdsa_and_rsa(topo, tmp_path):
    """Terminal with an ECDSA certificate (id: its FQDN from the SAN),
    counterpart with an RSA certificate (id: its DN), one CA."""
    pki = Pki(tmp_path / "pki")
    tcert = pki.issue("terminal", san=[topo.terminal.v4, "terminal.bitw.test",
                                       "terminal@bitw.test"], key="ecdsa")
    ccert = pki.issue("counterpart", subject="C=CH, O=bitw test, OU=interop, CN=counterpart",
                      san=[topo.counterpart.v4, "counterpart.bitw.test"], key="rsa")
    for c in (tcert, ccert):
        v = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca_cert), str(c.cert)],
                           capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
    t, c = topo.terminal, topo.counterpart
    term = Charon(t.ns, tmp_path / "terminal")
    cp = Charon(c.ns, tmp_path / "counterpart")
    term.add(Conn("h2h", t.v4, c.v4, auth="pubkey", cert=tcert, local_id="terminal.bitw.test",
                  remote_id=ccert.subject, proposals=PROPOSALS,
                  children=[Child("c1", esp_proposals=ESP_PROPOSALS)]))
    cp.add(Conn("h2h", c.v4, t.v4, auth="pubkey", cert=ccert, local_id=ccert.subject,
                remote_id="terminal.bitw.test", proposals=PROPOSALS,
                children=[Child("c1", esp_proposals=ESP_PROPOSALS)]))
    try:
        for ch in (term, cp):
            ch.install_ca(pki.ca_cert)
            ch.start().load()
        with Capture(c.ns, c.ifname) as cap:
            term.initiate("c1")
            sas = term.wait_established("c1")
            cp.wait_established("c1")
            assert sas[0]["local-id"] == "terminal.bitw.test"
            assert sas[0]["remote-id"] == ccert.subject
            r = run_ping(topo, 4)
            assert r.sent >= 50 and r.lost == 0, r
            time.sleep(0.1)
            frames = cap.frames()
        check_capture(frames, term, cp, topo, 4, r)
        # each side verified the other's signature with the other's key type
        assert "authentication of 'terminal.bitw.test' with ECDSA_WITH_SHA256_DER successful" \
            in cp.log_text()
        assert f"authentication of '{ccert.subject}' with RSA_EMSA_PKCS1_SHA2_256 successful" \
            in term.log_text()
    finally:
        term.stop()
        cp.stop()


def test_harness_child_rekey_during_ping_loses_nothing(topo, tmp_path):
    term, cp = up_pair(topo, tmp_path, 4)
    try:
        with Capture(topo.counterpart.ns, topo.counterpart.ifname) as cap:
            term.initiate("c1")
            before = term.wait_established("c1")[0]["child-sas"][0]

            def rekey():
                term.rekey(child="c1")
                term.wait_rekeyed("c1", before["uniqueid"], timeout=5)

            r = run_ping(topo, 4, seconds=2.0, during=rekey)
            # and an IKE SA rekey: its SPIs are not in the log, the capture has them
            term.rekey(ike="h2h")
            deadline = time.monotonic() + 5
            while [s["uniqueid"] for s in term.list_sas()] != ["2"]:
                assert time.monotonic() < deadline, term.list_sas()
                time.sleep(0.02)
            time.sleep(0.1)
            frames = cap.frames()
        assert r.sent >= 100 and r.lost == 0, r
        after = term.children("c1")[0]
        assert after["spi-in"] != before["spi-in"] and after["spi-out"] != before["spi-out"]
        keys = term.negotiated_keys()
        assert [c.unique_id for c in keys.children] == [1, 2]
        assert keys.children[1].inbound.spi == int(after["spi-in"], 16)
        decrypted = check_capture(frames, term, cp, topo, 4, r)
        used = {d.spi for d in decrypted}
        for c in keys.children:
            assert {c.inbound.spi, c.outbound.spi} <= used, "an SA carried no traffic"
        exchanges = [(m.exchange, m.response) for m in sw.ike_messages(frames)]
        assert exchanges.count((36, False)) == 2 and exchanges.count((36, True)) == 2
        keys = sw.fill_rekeyed_ike_spis(term.negotiated_keys(), frames)
        assert len(keys.ike) == 2 and keys.ike[1].initiator
        now = term.list_sas()[0]
        assert (f"{keys.ike[1].spi_i:016x}", f"{keys.ike[1].spi_r:016x}") == \
            (now["initiator-spi"], now["responder-spi"])
    finally:
        term.stop()
        cp.stop()


def test_harness_veth_box_restart_and_terminate(tmp_path):
    """box="veth": the two box-side ends (where bitw's net_af_packet ports go)
    joined by a Python forwarder; charon restart and terminate."""
    with Topology("veth") as topo:
        inside, outside = topo.vdevs()
        assert inside == f"net_af_packet0,iface={topo.inside_if},qpairs=1"
        assert outside == f"net_af_packet1,iface={topo.outside_if},qpairs=1"
        for dev in (topo.inside_if, topo.outside_if):
            assert len(dev) <= 15 and os.path.exists(f"/sys/class/net/{dev}")
            with open(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6") as f:
                assert f.read().strip() == "1"
            k = subprocess.run(["ethtool", "-k", dev], capture_output=True, text=True).stdout
            assert "tx-checksumming: off" in k and "rx-checksumming: off" in k, k
        with sw.L2Forwarder(topo.inside_if, topo.outside_if):
            topo.wait_neighbours(4)
            topo.wait_neighbours(6)
            term, cp = up_pair(topo, tmp_path, 4)
            try:
                term.initiate("c1")
                term.wait_established("c1")
                r = sw.ping(topo.terminal.ns, topo.counterpart.v4, count=20)
                assert r.lost == 0, r
                with sw.UdpStream(topo.terminal.ns, topo.counterpart.ns, topo.counterpart.v4,
                                  pps=200) as u:
                    time.sleep(0.3)
                    u.stop()
                assert u.result.sent >= 40 and u.result.lost == 0, u.result
                old_pid = cp.pid
                cp.restart()  # stopping, it deletes its SAs (and tells the terminal)
                assert cp.pid != old_pid and cp.list_sas() == []
                term.terminate(ike="h2h", force=True, timeout=2, check=False)
                assert term.list_sas() == []
                term.initiate("c1")
                term.wait_established("c1")
                cp.wait_established("c1")
                r = sw.ping(topo.terminal.ns, topo.counterpart.v4, count=20)
                assert r.lost == 0, r
                term.terminate(ike="h2h")
                assert term.list_sas() == [] and cp.list_sas() == []
            finally:
                term.stop()
                cp.stop()
        assert sw.mounts_mentioning(str(tmp_path)) == []
    assert not os.path.exists(f"/sys/class/net/{topo.inside_if}")


def test_harness_handshake_times():
    times = sw.handshake_times(3)
    assert len(times) == 3
    for t in times:
        assert t["wire"] is not None and 0 < t["wire"] < 1.0, times
        assert t["log"] is not None and t["swanctl"] > 0, times
    med = sw.median([t["wire"] for t in times])
    print(f"charon<->charon handshake, median of 3: {med * 1e3:.2f} ms")


def test_harness_cleans_up_after_failure_and_stale_sessions(tmp_path):
    """Nothing stays: not after an exception inside the topology, not from a
    session that was killed (sweep_stale removes its namespaces and links)."""
    names = None
    with pytest.raises(RuntimeError):
        with Topology("bridge") as topo:
            names = [topo.terminal.ns, topo.counterpart.ns, topo.box_ns]
            ch = Charon(topo.counterpart.ns, tmp_path / "c").start()
            pid = ch.pid
            raise RuntimeError("a test failing in the middle")
    ch.stop()
    existing = sw.harness_namespaces(sw.STEM)
    assert not set(names) & set(existing), existing
    assert not sw._alive(pid)
    assert sw.stray_charons() == []
    assert sw.mounts_mentioning(str(tmp_path)) == []

    # a dead session's leftovers: a namespace with a process in it and a root link
    p = subprocess.Popen(["true"])
    p.wait()
    dead = f"bs{p.pid:x}-0"
    subprocess.run(["ip", "netns", "add", dead + "t"], check=True)
    subprocess.run(["ip", "link", "add", dead + "bi", "type", "veth", "peer", "name", dead + "bo"],
                   check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", dead + "t", "sleep", "60"])
    try:
        time.sleep(0.1)
        removed = sw.sweep_stale()
        assert dead + "t" in removed and dead + "bi" in removed, removed
        assert sleeper.wait(5) is not None
        assert dead + "t" not in sw.harness_namespaces()
        assert not os.path.exists(f"/sys/class/net/{dead}bi")
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        subprocess.run(["ip", "netns", "del", dead + "t"], capture_output=True)
        subprocess.run(["ip", "link", "del", dead + "bi"], capture_output=True)
