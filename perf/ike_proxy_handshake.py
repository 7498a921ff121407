#!/usr/bin/python3
"""IKEv2 handshake time of bitw as the terminal, next to charon <-> charon.

    sudo /usr/bin/python3 perf/ike_proxy_handshake.py            # 20 runs of each
    sudo /usr/bin/python3 perf/ike_proxy_handshake.py --runs 50 --json

Three series, one after the other on this machine, IPv4, PSK, IKE
aes128gcm16-prfsha256-x25519, ESP aes128gcm16, one Child SA:

  bitw responder   charon (counterpart) initiates to the terminal's address;
                   bitw-control answers through bitw-dataplane (net_af_packet
                   on veths), the topology of tests/test_ike_proxy.py
  bitw initiator   `bitwctl ike initiate` starts IKE as the terminal
  charon-charon    two charons through a Linux bridge (tests/bitw_swan.py's
                   handshake_times), the baseline of perf/ike_handshake.py

Each run is timed on the wire: IKE_SA_INIT request to IKE_AUTH response,
kernel timestamps of a capture on the counterpart's veth; then the IKE SA is
deleted and the next run starts. Medians, spread, and bitw / charon ratios.

Needs root, the release build and the packages of scripts/setup-debian.sh.
A benchmark, not a test: it asserts nothing about speed.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import bitw_swan as sw  # noqa: E402
from bitw_control_lib import wait_until  # noqa: E402
from bitw_testlib import DEFAULT_BINARY  # noqa: E402
from test_ike_proxy import Rig  # noqa: E402


def one(rig, start, stop):
    """One handshake: start() it, wait for both sides, time it, stop() it."""
    rig.capture.clear()
    start()
    rig.cp.wait_established(child="data", timeout=10)
    wait_until(lambda: [k for k in rig.ctl_ok("ike", "list")
                        if k["state"] == "established" and k["children"]
                        and all(c["installed"] for c in k["children"])],
               what="bitw's IKE SA and Child SA")
    time.sleep(0.05)
    took = sw.handshake_durations(rig.capture.frames())
    stop()
    wait_until(lambda: rig.cp.list_sas() == [] and rig.ctl_ok("ike", "list") == [],
               what="the IKE SA deleted on both sides")
    if len(took) != 1:
        raise RuntimeError(f"expected one handshake on the wire, saw {len(took)}")
    return took[0]


def summary(xs):
    return {"median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3,
            "max_ms": max(xs) * 1e3, "n": len(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--runs", type=int, default=20, help="handshakes per series (default 20)")
    ap.add_argument("--json", action="store_true", help="print the runs and medians as JSON")
    args = ap.parse_args()
    miss = sw.missing_prerequisites()
    if miss:
        print("ike_proxy_handshake: missing " + "; ".join(miss), file=sys.stderr)
        return 1
    series = {}
    with tempfile.TemporaryDirectory(prefix="bitw-ike-perf-") as tmp:
        rig = Rig(Path(tmp) / "rig", DEFAULT_BINARY, start_action="none")
        try:
            series["bitw responder"] = [
                one(rig, lambda: rig.cp.initiate(child="data"),
                    lambda: rig.cp.terminate(ike="hq"))
                for _ in range(args.runs)]
            series["bitw initiator"] = [
                one(rig, lambda: rig.ctl_ok("ike", "initiate", "meter-hq"),
                    lambda: rig.ctl_ok("ike", "terminate", "meter-hq"))
                for _ in range(args.runs)]
        finally:
            rig.close()
    series["charon-charon"] = [r["wire"] for r in sw.handshake_times(args.runs)
                               if r["wire"] is not None]
    stats = {k: summary(v) for k, v in series.items()}
    base = stats["charon-charon"]["median_ms"]
    for k in ("bitw responder", "bitw initiator"):
        stats[k]["ratio_to_charon"] = stats[k]["median_ms"] / base
    if args.json:
        print(json.dumps({"runs": series, "summary": stats}, indent=2))
    else:
        print(f"IKEv2 handshake on the wire (IKE_SA_INIT request -> IKE_AUTH response), "
              f"IPv4, {args.runs} runs each")
        for k, s in stats.items():
            ratio = f"  {s['ratio_to_charon']:.2f} x charon" if "ratio_to_charon" in s else ""
            print(f"  {k:15} median {s['median_ms']:6.2f} ms  min {s['min_ms']:6.2f}  "
                  f"max {s['max_ms']:6.2f}  (n={s['n']}){ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
