"""bitw's IKEv2 engine (control/src/ike/sa.rs) against a real strongSwan charon.

The terminal namespace runs `target/release/examples/ike_peer` (the engine
over UDP 500/4500 sockets; one JSON line per event on stdout, keys included:
a test tool); the counterpart namespace runs charon (PSK,
aes128gcm16-prfsha256-x25519, ESP aes128gcm16 without ESN, tunnel,
host-to-host selectors), through the harness's bridge topology
(tests/bitw_swan.py).

  * charon initiates, the engine responds (IPv4 and IPv6);
  * the engine initiates, charon responds;
  * both with the same SPIs and ESP keys on both sides (one side's outbound SA
    is the other's inbound), and UDP encapsulation on 4500 (charon with
    kernel-libipsec fakes NAT-D, so both see a NAT);
  * a wrong PSK fails on both sides, whoever initiates, and nothing is
    established;
  * certificates instead of the PSK (the harness's Pki: RSA, ECDSA P-256 and
    P-384), both directions, with FQDN, e-mail and DN identities: the engine
    signs with RFC 7427 and checks charon's certificate, ID and signature;
    a certificate from a CA the engine does not trust fails cleanly, whoever
    initiates.
  * the IKE SA is rekeyed by charon (`swanctl --rekey --ike`) and by the
    engine: both end on the same new SPIs with one IKE SA, and a Child SA
    rekey and a liveness check under the new IKE SA work afterwards.

The handshake time on the wire (IKE_SA_INIT request to IKE_AUTH response, on
the counterpart's veth) is printed, not asserted.

Needs root and strongSwan (scripts/setup-debian.sh); fails loudly without.
"""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

import bitw_swan as sw
from bitw_swan import Capture, Charon, Child, Conn, Pki, Topology, subject_der

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "target" / "release" / "examples" / "ike_peer"
PROPOSALS = "aes128gcm16-prfsha256-x25519"
ESP_PROPOSALS = "aes128gcm16"
PSK = b"bitw ike engine interop PSK 0123456789"


@pytest.fixture(scope="module", autouse=True)
def _prerequisites():
    sw.require_strongswan()
    p = subprocess.run(["cargo", "build", "--release", "-p", "bitw-control", "--example",
                        "ike_peer"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and PEER.exists(), \
        f"cannot build the ike_peer example (cargo build --release --example ike_peer):\n" \
        f"{p.stdout}{p.stderr}"
    yield
    assert sw.harness_namespaces(sw.STEM) == []
    assert sw.stray_charons() == []


@pytest.fixture
def topo():
    with Topology("bridge") as t:
        yield t


class Peer:
    """ike_peer running in the terminal namespace."""

    def __init__(self, topo, workdir, role, family=4, psk=PSK, linger=0.5, timeout=8,
                 cert=None, cas=(), local_id=None, remote_id=None, extra=()):
        """cert (a bitw_swan Cert) and cas (CA certificate paths): certificates
        instead of the PSK. Ids in ike_peer's syntax; default: the addresses.
        extra: more ike_peer arguments."""
        t, c = topo.terminal, topo.counterpart
        self.local, self.remote = t.addr(family), c.addr(family)
        plen = 32 if family == 4 else 128
        if cert is None:
            psk_file = Path(workdir) / f"ike_peer-{role}.psk"
            psk_file.write_bytes(psk)
            auth = ["--psk-file", str(psk_file)]
        else:
            auth = ["--cert", str(cert.cert), "--key", str(cert.key),
                    "--ca", ",".join(str(p) for p in cas)]
        self.cmd = [*t.exec(), str(PEER), "--role", role,
                    "--local", self.local, "--remote", self.remote,
                    "--local-id", local_id or self.local, "--remote-id", remote_id or self.remote,
                    *auth,
                    "--ike-proposals", PROPOSALS, "--esp-proposals", ESP_PROPOSALS,
                    "--local-ts", f"{self.local}/{plen}", "--remote-ts", f"{self.remote}/{plen}",
                    "--timeout", str(timeout), "--linger", str(linger), *extra]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        first = self.proc.stdout.readline()
        assert first, f"ike_peer did not start: {self.proc.stderr.read()}"
        assert json.loads(first)["event"] == "started", first
        self.events = [json.loads(first)]
        self.stderr = ""

    def wait(self, timeout=15):
        try:
            out, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, self.stderr = self.proc.communicate()
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        return self.proc.returncode

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def of(self, kind):
        return [e for e in self.events if e["event"] == kind]

    def describe(self):
        return "ike_peer events:\n" + "\n".join(json.dumps(e) for e in self.events) + \
            f"\nstderr: {self.stderr}"


def counterpart_charon(topo, tmp_path, family=4, psk=PSK, ca=None, **conn):
    """charon with the PSK, or with conn's auth="pubkey" and cert= and the CA
    certificate `ca` installed."""
    t, c = topo.terminal, topo.counterpart
    ch = Charon(c.ns, tmp_path / "counterpart")
    if ca is not None:
        ch.install_ca(ca)
    ch.add(Conn("h2h", c.addr(family), t.addr(family), psk=psk, proposals=PROPOSALS,
                children=[Child("c1", esp_proposals=ESP_PROPOSALS)], **conn))
    ch.start().load()
    return ch


def check_established(peer, cp, topo, family, we_initiated, local_id=None, remote_id=None):
    t_addr, c_addr = topo.terminal.addr(family), topo.counterpart.addr(family)
    ikes, kids = peer.of("ike_sa_established"), peer.of("child_sa_established")
    assert len(ikes) == 1 and len(kids) == 1, peer.describe()
    ike, kid = ikes[0], kids[0]
    assert ike["initiator"] is we_initiated
    assert ike["suite"] == "aes128gcm16-prfsha256-x25519", ike
    assert (ike["local_id"], ike["remote_id"]) == (local_id or t_addr, remote_id or c_addr), ike
    # kernel-libipsec fakes NAT-D: NAT detected, IKE and ESP move to 4500
    assert ike["nat_detected"] is True, ike
    assert kid["udp_encap"] == {"local_port": 4500, "remote_port": 4500}, kid
    assert kid["local"].endswith(":4500") and kid["remote"].endswith(":4500"), kid
    assert (kid["aead"], kid["esn"], kid["mode"]) == ("aes128gcm16", False, "tunnel"), kid
    for side, addr in (("local_ts", t_addr), ("remote_ts", c_addr)):
        assert [(s["start"], s["end"]) for s in kid[side]] == [(addr, addr)], kid

    # charon's view
    sas = cp.list_sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    assert (sas[0]["initiator-spi"], sas[0]["responder-spi"]) == (ike["spi_i"], ike["spi_r"])
    assert sas[0]["encr-alg"] == "AES_GCM_16" and sas[0]["dh-group"] == "CURVE_25519", sas
    child = sas[0]["child-sas"][0]
    assert (child["mode"], child["encap"], child["encr-alg"]) == \
        ("TUNNEL", "yes", "AES_GCM_16"), child
    assert (child["spi-in"], child["spi-out"]) == (kid["outbound_spi"], kid["inbound_spi"]), \
        (child, kid)

    # the keys: charon's log (ike=4 chd=4) against the engine's, crossed
    keys = cp.negotiated_keys()
    ck = keys.child("c1")
    assert ck.initiator is not we_initiated
    assert ck.inbound.spi == int(kid["outbound_spi"], 16)
    assert ck.outbound.spi == int(kid["inbound_spi"], 16)
    assert ck.inbound.encr_key.hex() == kid["outbound_key"], "engine's outbound key differs"
    assert ck.outbound.encr_key.hex() == kid["inbound_key"], "engine's inbound key differs"
    assert len(ck.inbound.encr_key) == 20 and kid["inbound_key"] != kid["outbound_key"]
    assert (ck.outbound.src, ck.outbound.dst) == (c_addr, t_addr)
    ik = keys.ike[-1]
    assert (f"{ik.spi_i:016x}", f"{ik.spi_r:016x}") == (ike["spi_i"], ike["spi_r"])


def wire_time(frames):
    d = sw.handshake_durations(frames)
    assert len(d) == 1, [str(m) for m in sw.ike_messages(frames)]
    return d[0]


@pytest.mark.parametrize("family", [4, 6])
def test_charon_initiates_engine_responds(topo, tmp_path, family):
    cp = counterpart_charon(topo, tmp_path, family)
    peer = Peer(topo, tmp_path, "responder", family)
    try:
        with Capture(topo.counterpart.ns, topo.counterpart.ifname) as cap:
            p = cp.initiate("c1", timeout=5, check=False)
            assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{cp.describe()}\n{peer.describe()}"
            cp.wait_established("c1", timeout=3)
            rc = peer.wait()
            time.sleep(0.05)
            frames = cap.frames()
        assert rc == 0, f"ike_peer exited {rc}\n{peer.describe()}\n{cp.describe()}"
        check_established(peer, cp, topo, family, we_initiated=False)
        assert sw.ike_esp_problems(frames, [(topo.terminal.addr(family),
                                             topo.counterpart.addr(family))]) == []
        w = wire_time(frames)
        logged = cp.handshakes()
        print(f"IPv{family} charon -> bitw engine handshake: {w * 1e3:.2f} ms on the wire, "
              f"{logged[-1][1] * 1e3:.0f} ms in charon's log")
    finally:
        peer.stop()
        cp.stop()


def test_engine_initiates_charon_responds(topo, tmp_path):
    cp = counterpart_charon(topo, tmp_path, 4)
    peer = None
    try:
        with Capture(topo.counterpart.ns, topo.counterpart.ifname) as cap:
            peer = Peer(topo, tmp_path, "initiator", 4, linger=0.3)
            rc = peer.wait()
            time.sleep(0.05)
            frames = cap.frames()
        assert rc == 0, f"ike_peer exited {rc}\n{peer.describe()}\n{cp.describe()}"
        cp.wait_established("c1", timeout=2)
        check_established(peer, cp, topo, 4, we_initiated=True)
        w = wire_time(frames)
        ev = {e["event"]: e["ms"] for e in peer.events if "ms" in e}
        print(f"IPv4 bitw engine -> charon handshake: {w * 1e3:.2f} ms on the wire, "
              f"{ev['child_sa_established']:.2f} ms from ike_peer's start to its child SA")
    finally:
        if peer:
            peer.stop()
        cp.stop()


def test_wrong_psk_charon_initiates(topo, tmp_path):
    cp = counterpart_charon(topo, tmp_path, 4)
    peer = Peer(topo, tmp_path, "responder", 4, psk=b"not the PSK charon has", timeout=4)
    try:
        p = cp.initiate("c1", timeout=3, check=False)
        rc = peer.wait()
        assert p.returncode != 0, p.stdout
        assert rc == 1, peer.describe()
        failed = peer.of("failed")
        assert [f["reason"] for f in failed] == ["auth_failed"], peer.describe()
        assert peer.of("ike_sa_established") == [] and peer.of("child_sa_established") == []
        log = cp.log_text()
        assert "received AUTHENTICATION_FAILED notify error" in log, cp.describe()
        assert cp.list_sas() == []
    finally:
        peer.stop()
        cp.stop()


def test_wrong_psk_engine_initiates(topo, tmp_path):
    cp = counterpart_charon(topo, tmp_path, 4)
    peer = None
    try:
        peer = Peer(topo, tmp_path, "initiator", 4, psk=b"not the PSK charon has", timeout=4)
        rc = peer.wait()
        assert rc == 1, peer.describe()
        failed = peer.of("failed")
        assert [f["reason"] for f in failed] == ["auth_failed"], peer.describe()
        assert peer.of("ike_sa_established") == [] and peer.of("child_sa_established") == []
        log = cp.log_text()
        assert "but MAC mismatched" in log, cp.describe()
        assert "generating IKE_AUTH response 1 [ N(AUTH_FAILED) ]" in log, cp.describe()
        assert cp.list_sas() == []
    finally:
        if peer:
            peer.stop()
        cp.stop()


def test_charon_deletes_the_ike_sa_engine_answers(topo, tmp_path):
    """After the engine initiated: charon's Delete (INFORMATIONAL on 4500) is
    answered, the engine reports its Child SA and the IKE SA deleted."""
    cp = counterpart_charon(topo, tmp_path, 4)
    peer = None
    try:
        peer = Peer(topo, tmp_path, "initiator", 4, linger=5)
        cp.wait_established("c1", timeout=3)
        t = cp.terminate(ike="h2h", timeout=3, check=False)
        assert t.returncode == 0, f"{t.stdout}{t.stderr}\n{cp.describe()}\n{peer.describe()}"
        rc = peer.wait(timeout=5)
        assert rc == 0, peer.describe()
        kinds = [e["event"] for e in peer.events]
        assert kinds[-1] == "deleted", peer.describe()
        assert "child_sa_established" in kinds
        assert cp.list_sas() == []
        assert "parsed INFORMATIONAL response 0 [ ]" in cp.log_text(), cp.describe()
    finally:
        if peer:
            peer.stop()
        cp.stop()


# ---------------------------------------------------------------------------
# certificates

class CertCase:
    """A Pki with the terminal's and the counterpart's certificates, and the
    ids each side uses in `kind` ("fqdn", "email" or "dn"): charon's
    (strongSwan syntax; None = its certificate's subject), ike_peer's, and
    ike_peer's JSON."""

    def __init__(self, topo, tmp_path, key, kind):
        t_addr, c_addr = topo.terminal.addr(4), topo.counterpart.addr(4)
        ca_key = "rsa" if key.startswith("rsa") else key
        self.pki = Pki(tmp_path / "pki", key=ca_key)
        self.t = self.pki.issue("terminal", key=key,
                                san=["terminal.bitw.test", "terminal@bitw.test", t_addr])
        self.c = self.pki.issue("counterpart", key=key,
                                san=["counterpart.bitw.test", "counterpart@bitw.test", c_addr])
        if kind == "dn":
            t_id = "dn:" + subject_der(self.t.cert).hex()
            c_id = "dn:" + subject_der(self.c.cert).hex()
            # charon gets both DNs as text, which it encodes with
            # PrintableString, while openssl's certificates (and ike_peer's
            # ids) have UTF8String: the engine compares DNs by meaning, so
            # charon's IDi/IDr match its configured ids and its certificate
            self.charon_ids = {"local_id": self.c.subject, "remote_id": self.t.subject}
            # charon as initiator sends its IDi (and our IDr) as it encodes
            # the text: with PrintableString; as responder, its
            # certificate's subject
            self.peer_seen = "dn:" + printable_dn(subject_der(self.c.cert)).hex()
        else:
            t_id, c_id = ("terminal.bitw.test", "counterpart.bitw.test") if kind == "fqdn" \
                else ("terminal@bitw.test", "counterpart@bitw.test")
            self.charon_ids = {"local_id": c_id, "remote_id": t_id}
            self.peer_seen = c_id
        self.peer_ids = {"local_id": t_id, "remote_id": c_id}
        # what ike_peer reports as responder: its own id, and charon's IDi as
        # charon sent it
        self.peer_reports = {"local_id": t_id, "remote_id": self.peer_seen}

    def charon(self, topo, tmp_path):
        return counterpart_charon(topo, tmp_path, 4, ca=self.pki.ca_cert, auth="pubkey",
                                  cert=self.c, **self.charon_ids)

    def peer(self, topo, tmp_path, role, cas=None, **kw):
        return Peer(topo, tmp_path, role, 4, cert=self.t, cas=cas or [self.pki.ca_cert],
                    **self.peer_ids, **kw)


def printable_dn(der):
    """A DER Name of single-attribute RDNs (short lengths) with its
    UTF8String values as PrintableString: how charon encodes a DN it was
    given as text (`C=CH, O=bitw test, CN=…`)."""
    out = bytearray(der)
    assert out[0] == 0x30 and out[1] < 0x80
    rdn = 2
    while rdn < len(out):
        oid = rdn + 4  # SET { SEQUENCE { OID, value } }
        value = oid + 2 + out[oid + 1]
        if out[value] == 0x0C:
            out[value] = 0x13
        rdn += 2 + out[rdn + 1]
    return bytes(out)


SCHEMES = {"rsa": "RSA_EMSA_PKCS1_SHA2_256", "ecdsa": "ECDSA_WITH_SHA256_DER",
           "ecdsa384": "ECDSA_WITH_SHA384_DER"}


def check_charon_saw(cp, case, key, kind):
    """charon got our certificate, chained it to its CA and verified our
    RFC 7427 signature; it sent its own certificate (we asked with CERTREQ)."""
    log = cp.log_text()
    ours = {"fqdn": "terminal.bitw.test", "email": "terminal@bitw.test",
            "dn": case.t.subject}[kind]
    for line in (f'received end entity cert "{case.t.subject}"',
                 f'using trusted ca certificate "{case.pki.ca_subject}"',
                 f"authentication of '{ours}' with {SCHEMES[key]} successful",
                 f'sending end entity cert "{case.c.subject}"'):
        assert line in log, f"{line!r} not in charon's log\n{cp.describe()}"


CERT_CASES = [("rsa", "fqdn"), ("rsa", "dn"), ("ecdsa", "email"), ("ecdsa", "fqdn"),
              ("ecdsa384", "dn")]


@pytest.mark.parametrize("key,kind", CERT_CASES)
def test_certificates_charon_initiates_engine_responds(topo, tmp_path, key, kind):
    case = CertCase(topo, tmp_path, key, kind)
    cp = case.charon(topo, tmp_path)
    peer = case.peer(topo, tmp_path, "responder")
    try:
        p = cp.initiate("c1", timeout=5, check=False)
        assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{cp.describe()}\n{peer.describe()}"
        cp.wait_established("c1", timeout=3)
        rc = peer.wait()
        assert rc == 0, f"ike_peer exited {rc}\n{peer.describe()}\n{cp.describe()}"
        check_established(peer, cp, topo, 4, we_initiated=False, **case.peer_reports)
        check_charon_saw(cp, case, key, kind)
    finally:
        peer.stop()
        cp.stop()


@pytest.mark.parametrize("key,kind", CERT_CASES)
def test_certificates_engine_initiates_charon_responds(topo, tmp_path, key, kind):
    case = CertCase(topo, tmp_path, key, kind)
    cp = case.charon(topo, tmp_path)
    peer = None
    try:
        peer = case.peer(topo, tmp_path, "initiator", linger=0.3)
        rc = peer.wait()
        assert rc == 0, f"ike_peer exited {rc}\n{peer.describe()}\n{cp.describe()}"
        cp.wait_established("c1", timeout=2)
        check_established(peer, cp, topo, 4, we_initiated=True, **case.peer_ids)
        check_charon_saw(cp, case, key, kind)
    finally:
        if peer:
            peer.stop()
        cp.stop()


def other_ca(tmp_path):
    return Pki(tmp_path / "other-pki", ca_subject="C=CH, O=bitw test, CN=another CA").ca_cert


def test_certificates_untrusted_ca_engine_initiates(topo, tmp_path):
    case = CertCase(topo, tmp_path, "ecdsa", "fqdn")
    cp = case.charon(topo, tmp_path)
    peer = None
    try:
        peer = case.peer(topo, tmp_path, "initiator", cas=[other_ca(tmp_path)], timeout=4)
        rc = peer.wait()
        assert rc == 1, peer.describe()
        assert [f["reason"] for f in peer.of("failed")] == ["cert_untrusted"], peer.describe()
        assert peer.of("child_sa_established") == []
        # the engine told charon, which then drops the SA it had established
        deadline = time.monotonic() + 3
        while cp.list_sas() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "parsed INFORMATIONAL request 2 [ N(AUTH_FAILED) ]" in cp.log_text(), \
            cp.describe()
        assert cp.list_sas() == []
    finally:
        if peer:
            peer.stop()
        cp.stop()


def check_rekeyed(peer, cp):
    """One IKE rekey on both sides, the old IKE SA gone, and the Child SA
    rekeyed under the new IKE SA with the keys charon derived."""
    assert not peer.of("failed") and not peer.of("rejected"), peer.describe()
    ikes, rekeys = peer.of("ike_sa_established"), peer.of("ike_sa_rekeyed")
    assert len(ikes) == 1 and len(rekeys) == 1, peer.describe()
    old, new = rekeys[0], (rekeys[0]["spi_i"], rekeys[0]["spi_r"])
    assert (old["old_spi_i"], old["old_spi_r"]) == (ikes[0]["spi_i"], ikes[0]["spi_r"])
    actions = peer.of("action")
    assert len(actions) >= 2 and all(a["ok"] for a in actions), peer.describe()
    sas = cp.list_sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    assert (sas[0]["initiator-spi"], sas[0]["responder-spi"]) == new, (sas, rekeys)
    # the Child SA rekeyed under the new IKE SA: charon's installed one is ours
    kids = peer.of("child_sa_established")
    assert len(kids) == 2, peer.describe()
    installed = [c for c in sas[0]["child-sas"] if c["state"] == "INSTALLED"]
    assert len(installed) == 1, sas
    assert (installed[0]["spi-in"], installed[0]["spi-out"]) == \
        (kids[1]["outbound_spi"], kids[1]["inbound_spi"]), (installed, kids)
    ck = cp.negotiated_keys().child("c1")
    assert ck.inbound.encr_key.hex() == kids[1]["outbound_key"], "new child: keys differ"
    assert ck.outbound.encr_key.hex() == kids[1]["inbound_key"], "new child: keys differ"
    # the old Child SA went with the engine's Delete after its rekey
    deleted = peer.of("child_sa_deleted")
    assert [d["inbound_spi"] for d in deleted] == [kids[0]["inbound_spi"]], peer.describe()


@pytest.mark.parametrize("engine_role", ["initiator", "responder"])
def test_charon_rekeys_the_ike_sa(topo, tmp_path, engine_role):
    """`swanctl --rekey --ike` against the engine; then the engine rekeys the
    Child SA and checks liveness under the new IKE SA."""
    cp = counterpart_charon(topo, tmp_path, 4)
    peer = None
    try:
        peer = Peer(topo, tmp_path, engine_role, 4, linger=3.5,
                    extra=["--rekey-child-at", "1.5", "--liveness-at", "2.5"])
        if engine_role == "responder":
            cp.initiate("c1", timeout=5)
        cp.wait_established("c1", timeout=3)
        cp.rekey(ike="h2h")
        rc = peer.wait(timeout=10)
        assert rc == 0, f"ike_peer exited {rc}\n{peer.describe()}\n{cp.describe()}"
        check_rekeyed(peer, cp)
        # the liveness check under the new IKE SA was answered
        assert re.search(r"parsed INFORMATIONAL request \d+ \[ \]", cp.log_text()), \
            cp.describe()
    finally:
        if peer:
            peer.stop()
        cp.stop()


def test_certificates_untrusted_ca_charon_initiates(topo, tmp_path):
    case = CertCase(topo, tmp_path, "rsa", "fqdn")
    cp = case.charon(topo, tmp_path)
    peer = case.peer(topo, tmp_path, "responder", cas=[other_ca(tmp_path)], timeout=4)
    try:
        p = cp.initiate("c1", timeout=3, check=False)
        rc = peer.wait()
        assert p.returncode != 0, p.stdout
        assert rc == 1, peer.describe()
        assert [f["reason"] for f in peer.of("failed")] == ["cert_untrusted"], peer.describe()
        assert peer.of("ike_sa_established") == [] and peer.of("child_sa_established") == []
        assert "received AUTHENTICATION_FAILED notify error" in cp.log_text(), cp.describe()
        assert cp.list_sas() == []
    finally:
        peer.stop()
        cp.stop()


@pytest.mark.parametrize("engine_role", ["initiator", "responder"])
def test_engine_rekeys_the_ike_sa(topo, tmp_path, engine_role):
    """The engine's IKE rekey (CREATE_CHILD_SA, then Delete of the old SA)
    accepted by charon; then a Child SA rekey and a liveness check under the
    new IKE SA."""
    cp = counterpart_charon(topo, tmp_path, 4)
    peer = None
    try:
        peer = Peer(topo, tmp_path, engine_role, 4, linger=3.5,
                    extra=["--rekey-ike-at", "0.5", "--rekey-child-at", "1.5",
                           "--liveness-at", "2.5"])
        if engine_role == "responder":
            cp.initiate("c1", timeout=5)
        rc = peer.wait(timeout=10)
        assert rc == 0, f"ike_peer exited {rc}\n{peer.describe()}\n{cp.describe()}"
        check_rekeyed(peer, cp)
        assert re.search(r"parsed INFORMATIONAL request \d+ \[ \]", cp.log_text()), \
            cp.describe()
    finally:
        if peer:
            peer.stop()
        cp.stop()
