#!/usr/bin/python3
"""IKEv2 handshake time of charon <-> charon on this machine: the baseline that
bitw's handshake times are compared with.

    sudo /usr/bin/python3 perf/ike_handshake.py            # 20 handshakes, IPv4
    sudo /usr/bin/python3 perf/ike_handshake.py --runs 50 --family 6 --json

Two strongSwan charons (Debian 5.9.8, kernel-libipsec) in the "terminal" and
"counterpart" namespaces of tests/bitw_swan.py, joined by a Linux bridge; PSK,
IKE aes128gcm16-prfsha256-x25519, ESP aes128gcm16. The terminal initiates each
handshake (IKE_SA_INIT + IKE_AUTH with one child SA), then terminates the IKE
SA. Reported per run, medians and spread:

  wire     IKE_SA_INIT request -> IKE_AUTH response, kernel timestamps of a
           capture on the counterpart's veth (the number to compare: bitw's
           interop tests measure the same point the same way)
  log      the same from the initiator's log (millisecond resolution)
  swanctl  wall time of `swanctl --initiate` (includes swanctl's own start-up)

Needs root and the packages of scripts/setup-debian.sh. A benchmark, not a test:
it asserts nothing about speed.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import bitw_swan as sw  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--runs", type=int, default=20, help="handshakes (default 20)")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4, help="IP version (default 4)")
    ap.add_argument("--json", action="store_true", help="print the runs and medians as JSON")
    args = ap.parse_args()
    miss = sw.missing_prerequisites()
    if miss:
        print("ike_handshake: missing " + "; ".join(miss), file=sys.stderr)
        return 1
    runs = sw.handshake_times(args.runs, family=args.family)
    summary = {}
    for k in ("wire", "log", "swanctl"):
        xs = [r[k] for r in runs if r[k] is not None]
        summary[k] = {"median_ms": statistics.median(xs) * 1e3 if xs else None,
                      "min_ms": min(xs) * 1e3 if xs else None,
                      "max_ms": max(xs) * 1e3 if xs else None, "n": len(xs)}
    if args.json:
        print(json.dumps({"family": args.family, "runs": runs, "summary": summary}, indent=2))
    else:
        print(f"charon <-> charon IKEv2 handshake, IPv{args.family}, {args.runs} runs")
        for k, s in summary.items():
            if s["n"]:
                print(f"  {k:8} median {s['median_ms']:7.2f} ms  "
                      f"min {s['min_ms']:7.2f}  max {s['max_ms']:7.2f}  (n={s['n']})")
            else:
                print(f"  {k:8} no measurement")
    return 0 if summary["wire"]["n"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
