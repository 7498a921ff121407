#!/usr/bin/env python3
"""Captures a real IKEv2 session between two strongSwan charons and writes it
as the test vectors of control/src/ike/message_tests.rs:

    sudo python3 control/tests/ike_vectors/capture_strongswan.py \
        > control/tests/ike_vectors/strongswan-5.9.8-psk.txt

It uses the interop harness (tests/bitw_swan.py): two charons (Debian's
strongSwan 5.9.8) in network namespaces joined by a Linux bridge, PSK,
IKE aes128gcm16-prfsha256-x25519 and ESP aes128gcm16-x25519. The terminal
initiates (IKE_SA_INIT, IKE_AUTH), rekeys the Child SA (CREATE_CHILD_SA with
PFS) and deletes the IKE SA (INFORMATIONAL), while a capture on the
counterpart's veth records every IKE message. The IKE SA's encryption keys,
which charon logs, go with them so that the tests can open the SK payloads.
These keys belonged to a throwaway session between two test namespaces.
Needs root and the strongSwan packages of scripts/setup-debian.sh.
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import bitw_swan as sw  # noqa: E402

EXCHANGES = {34: "IKE_SA_INIT", 35: "IKE_AUTH", 36: "CREATE_CHILD_SA", 37: "INFORMATIONAL"}


def main():
    sw.require_strongswan()
    work = tempfile.mkdtemp(prefix="bitw-ike-vectors-")
    with sw.Topology("bridge") as topo:
        term, cp = sw.psk_pair(topo, work, 4, "aes128gcm16-prfsha256-x25519",
                               "aes128gcm16-x25519")
        try:
            with sw.Capture(topo.counterpart.ns, topo.counterpart.ifname) as cap:
                term.initiate(child="c1")
                term.wait_established(child="c1")
                time.sleep(0.3)
                term.rekey(child="c1")
                time.sleep(1.0)
                term.terminate(ike="h2h")
                time.sleep(0.5)
                frames = cap.frames()
            messages = sw.ike_messages(frames)
            ike = term.negotiated_keys().ike[0]
        finally:
            term.stop()
            cp.stop()
    print("# A real IKEv2 session: strongSwan 5.9.8 (Debian 12) charon <-> charon, PSK,")
    print("# IKE aes128gcm16-prfsha256-x25519, ESP aes128gcm16-x25519 (PFS when rekeying).")
    print("# Written by capture_strongswan.py (see there); messages without the non-ESP marker.")
    print(f"# IKE SA {ike.proposal}, SPIs {ike.spi_i:016x} {ike.spi_r:016x}")
    print(f"initiator {topo.terminal.addr(4)}")
    print(f"responder {topo.counterpart.addr(4)}")
    print(f"sk_ei {ike.sk_ei.hex()}")
    print(f"sk_er {ike.sk_er.hex()}")
    print("# msg EXCHANGE request|response MESSAGE_ID SOURCE DESTINATION HEX")
    for m in messages:
        kind = "response" if m.response else "request"
        print(f"msg {EXCHANGES.get(m.exchange, m.exchange)} {kind} {m.msg_id} "
              f"{m.src}:{m.sport} {m.dst}:{m.dport} {m.data.hex()}")


if __name__ == "__main__":
    main()
