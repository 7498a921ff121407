#!/usr/bin/python3
"""Part 3 of the demo: bitw speaks IKEv2 as a terminal, against strongSwan.

    terminal (plain Linux) ── veth ── bitw-dataplane ── veth ── counterpart (charon)
                                          bitw-control: IKE as the terminal

The terminal has no IPsec at all. Its first ping to the counterpart hits the
protect rule of a [[connection]]; bitw holds it, negotiates IKEv2 as the
terminal (from the terminal's address, with its identity) and lets the pings
out in ESP. Shown: bitw-control's log, `bitwctl ike list`, charon's view of
its peer (the terminal, not the box), the pings, and what crossed the
counterpart's wire (IKE and ESP only).

Runs in namespaces of its own and removes them; needs root and the packages
scripts/setup-debian.sh installs (scripts/demo.sh runs it).
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import bitw_swan as sw  # noqa: E402
from bitw_testlib import DEFAULT_BINARY  # noqa: E402
from test_ike_proxy import Rig  # noqa: E402


def main():
    with tempfile.TemporaryDirectory(prefix="bitw-demo-ike-") as tmp:
        rig = Rig(Path(tmp) / "rig", DEFAULT_BINARY, start_action="trap")
        try:
            print(f"== bitw's config ({rig.cfg}), the IKE part:")
            text = rig.cfg.read_text()
            print(text[text.index("[[terminal]]"):].rstrip())
            print("== the terminal pings the counterpart: its first packet triggers IKE")
            r = rig.ping(seconds=2.0, interval=0.02)
            print(f"   pings: {r}")
            print("== bitw-control's log")
            for line in rig.ctl.log().splitlines():
                if not re.search(r"debug: (punted|neighbour)", line):
                    print("   " + line)
            print("== bitwctl ike list")
            out = subprocess.run([str(ROOT / "target/release/bitwctl"), "--socket",
                                  str(rig.admin), "ike", "list"],
                                 capture_output=True, text=True)
            print(out.stdout.rstrip())
            sa = rig.cp.list_sas()[0]
            print(f"== charon (counterpart) sees IKE SA `{sa['name']}` {sa['state']} with "
                  f"{sa['remote-host']} [{sa['remote-id']}]: the terminal, not the box")
            frames = rig.capture.frames()
            print(f"== on the counterpart's wire: {sw.flow_summary(frames)}; problems: "
                  f"{sw.ike_esp_problems(frames, [(rig.topo.terminal.v4, rig.topo.counterpart.v4)]) or 'none (no plaintext)'}")
            decrypted, problems = sw.decrypt_esp(frames, rig.cp.negotiated_keys())
            print(f"== {len(decrypted)} ESP frames decrypted with charon's keys"
                  f"{'' if not problems else f', {len(problems)} problems'}")
            return 0 if r.received > 0 and not problems else 1
        finally:
            rig.close()


if __name__ == "__main__":
    sys.exit(main())
