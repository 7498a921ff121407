"""Smoke test of the ESP benchmark (perf/esp.py --quick): bitw-dataplane, DPDK's ipsec-secgw
(built from Debian's dpdk-doc) and bitw-aead-bench each run once per case and give plausible
numbers. It asserts that the benchmark ran and what it measured is sane, never a speed: the
comparison itself is perf/esp.py's job (see perf/README.md).

Needs root, the release build (bitw-dataplane and bitw-aead-bench; `cargo build --release`),
dpdk-doc, libdpdk-dev, pkg-config and make (scripts/setup-debian.sh installs them all).
"""

import json
import subprocess
import sys

from bitw_testlib import REPO_ROOT


def run_quick(script, args, tmp_path):
    """perf/<script> --quick --no-build ARGS; asserts it exited 0 and returns the process and its
    JSON results."""
    out = tmp_path / (script + ".json")
    cmd = [sys.executable, str(REPO_ROOT / "perf" / script), "--quick", "--no-build", *args,
           "--json-out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"perf/{script} --quick exited {p.returncode}:\n{p.stderr[-4000:]}"
    return p, json.loads(out.read_text())


def test_esp_quick_runs_bitw_secgw_and_aead_bench(dataplane, tmp_path):
    aead_bench = dataplane.parent / "bitw-aead-bench"
    assert aead_bench.is_file(), f"{aead_bench} missing: cargo build --release -p bitw-aead-bench"
    p, res = run_quick("esp.py", ["--bitw", str(dataplane), "--aead-bench", str(aead_bench)], tmp_path)
    assert res["args"]["secgw"] and res["args"]["secgw_crypto"], res["args"]
    assert not res["problems"], res["problems"]

    main = [c for c in res["cases"] if c["aead"] == "aes128gcm16" and c["direction"] in ("encrypt", "decrypt")]
    # --quick: 64 and 1420 bytes, encrypt and decrypt.
    assert sorted((c["direction"], c["size"]) for c in main) == [
        ("decrypt", "1420"), ("decrypt", "64"), ("encrypt", "1420"), ("encrypt", "64")]
    for c in main:
        case = f'{c["direction"]} {c["size"]}'
        assert "failed" not in c and "secgw_failed" not in c, case
        bitw, sg = c["mpps"]["median"], c["secgw_mpps"]["median"]
        # Sane, not fast: between 50 kpps and 200 Mpps, each from one run with counters that add up.
        assert 0.05 < bitw < 200 and 0.05 < sg < 200, (case, bitw, sg)
        assert abs(c["bitw_vs_secgw"] - bitw / sg) < 1e-9, case
        assert 0.01 < c["pct_of_limit"] < 1.3, (case, c["pct_of_limit"])
        # The worker's latency histogram recorded every packet sent (check_summary) and gives
        # ordered quantiles.
        lat = c["latency_us"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"], (case, lat)
        # dataplane.crypto = "auto" picks intel-ipsec-mb here, and the limit is that library's.
        assert c["crypto"].startswith("intel-ipsec-mb") and c["aead_library"] == "intel-ipsec-mb", case
        (run,) = c["secgw_raw"]
        assert run["window_seconds"] > 0.5 and run["tx_packets_window"] > 0, (case, run)
        assert not run["problems"], (case, run["problems"])
    # The raw AEAD limit beside them.
    for lib in ("ring", "intel-ipsec-mb"):
        assert any(k.startswith(f"aes128gcm16/{lib}/") for k in res["aead"]), sorted(res["aead"])
    assert "ipsec-secgw Mpps" in p.stdout and "bitw / secgw" in p.stdout, p.stdout[-2000:]


def test_scale_quick_installs_sas_and_measures_every_case(dataplane, tmp_path):
    """perf/scale.py --quick: 1 and 1000 SAs, decrypt (SAs installed over the control channel),
    encrypt (rules and SAs from the config file) and SA installs while forwarding. Asserts that
    every case ran, installed what it should and measured something, never how fast."""
    tool = dataplane.parent / "bitw-scale"
    assert tool.is_file(), f"{tool} missing: cargo build --release -p bitw-scale-tool"
    p, res = run_quick("scale.py", ["--bitw", str(dataplane), "--scale-tool", str(tool)], tmp_path)
    assert not res["problems"], res["problems"]
    for direction in ("decrypt", "encrypt"):
        cases = res[direction]
        assert [c["sas"] for c in cases] == [1, 1000], (direction, cases)
        for c in cases:
            assert "failed" not in c, (direction, c)
            assert c["sa_count"] == c["sas"], (direction, c["sas"], c["sa_count"])
            assert c["mpps"]["median"] > 0 and c["runs"][0]["tx_packets"] > 0, (direction, c)
    dec = {c["sas"]: c for c in res["decrypt"]}
    # 999 SAs went in over the control channel; the dataplane's memory was read around it.
    assert dec[1000]["install"]["installed"] == 999, dec[1000]["install"]
    assert dec[1000]["rss_kb_after"] >= dec[1000]["rss_kb_before"] > 0
    inst = res["install"]
    assert "failed" not in inst, inst
    assert inst["install"]["installed"] == inst["sas"] == 999, inst["install"]
    assert inst["sas_per_second"] > 0 and inst["idle_mpps"]["median"] > 0 and inst["during_mpps"] > 0, inst
    assert inst["forwarding_share"] > 0, inst
    # Then rekey-sized Applies on the full table (their SA count is checked by scale.py).
    assert inst["small"]["applies"] == 20 and inst["small"]["sas_per_second"] > 0, inst["small"]
    assert "SA installs while forwarding" in p.stdout and "MB per 100 000 SAs" in p.stdout, p.stdout[-2000:]
