"""Smoke tests: several workers, other vdevs, DPDK failures, signals, the demo."""

import signal
import time

import pytest

import os
import shutil

from bitw_esp import SaSpec, decapsulated, ip_packet, outbound_problems, parse_esp_frame, scapy_decrypt, write_sa_configs
from bitw_testlib import (
    DROP_REASONS, EXIT_DPDK, EXIT_OK, REPO_ROOT, Background, drops, pcap_device, read_pcap, render_config,
    run_binary, run_config, unique_prefix, write_pcap,
)

NO_DROPS = drops()
NO_SA_EVENTS = {"soft_lifetime": 0, "hard_lifetime": 0, "sequence_exhausted": 0, "lost": 0}

# A few rules of both directions and families: net_null frames are all-zero
# (ethertype 0: not IP), so none of them matches, but the tables are built.
SOME_RULES = [
    dict(name="hq", direction="out", src="10.0.0.0/24", dst="10.1.0.0/16", action="protect", sa="hq"),
    dict(name="telnet", direction="out", proto="tcp", dport=23, action="discard"),
    dict(name="v6", direction="in", dst="2001:db8:a::/48", proto="udp", dport="5000-6000",
         action="bypass"),
]
SOME_SAS = [SaSpec("hq", "out", 0x1001, "tunnel", "172.16.0.1", "172.16.0.2")]


def some_sas(tmp_path):
    return write_sa_configs(SOME_SAS, tmp_path)


def _check_worker_forwarded_everything(w):
    """net_null frames are non-IP: everything received goes out of the other port."""
    assert w["rx_inside"]["packets"] > 0 and w["rx_outside"]["packets"] > 0, w
    assert w["tx_outside"]["packets"] > 0 and w["tx_inside"]["packets"] > 0, w
    assert w["drops"] == NO_DROPS, w
    # Per direction: tx = rx - drops (and drops are zero).
    assert w["tx_outside"] == w["rx_inside"], w
    assert w["tx_inside"] == w["rx_outside"], w
    assert w["non_ip"] == w["rx_inside"]["packets"] + w["rx_outside"]["packets"], w
    assert w["bypassed"] == 0, w
    assert (w["esp_encrypted"], w["esp_decrypted"], w["handed_off"], w["events_lost"]) == (0, 0, 0, 0), w
    assert w["busy_polls"] > 0, w


def _check_totals(s):
    ws = s["workers"]
    rx_in = sum(w["rx_inside"]["packets"] for w in ws)
    rx_out = sum(w["rx_outside"]["packets"] for w in ws)
    tx_in = sum(w["tx_inside"]["packets"] for w in ws)
    tx_out = sum(w["tx_outside"]["packets"] for w in ws)
    assert s["rx_packets"] == rx_in + rx_out
    assert s["tx_packets"] == tx_in + tx_out
    assert s["non_ip"] == sum(w["non_ip"] for w in ws)
    assert s["bypassed"] == sum(w["bypassed"] for w in ws)
    assert s["drops"] == {r: sum(w["drops"][r] for w in ws) for r in DROP_REASONS}
    for k in ("esp_encrypted", "esp_decrypted", "handed_off", "uninspected"):
        assert s[k] == sum(w[k] for w in ws), k
    assert s["sa_events"]["lost"] == sum(w["events_lost"] for w in ws)
    assert s["sa_count"] == len(s["sas"])
    # The ports' own counters see the same frames.
    assert s["ports"]["inside"]["rx_packets"] == rx_in
    assert s["ports"]["outside"]["rx_packets"] == rx_out
    assert s["ports"]["outside"]["tx_packets"] == tx_out
    assert s["ports"]["inside"]["tx_packets"] == tx_in


def test_two_workers_on_null_ports(dataplane, tmp_path, file_prefix):
    cfg = tmp_path / "null2.toml"
    cfg.write_text(render_config("net_null0", "net_null1", SOME_RULES, prefix=file_prefix,
                                 workers=2, default_action="discard", sas=some_sas(tmp_path)))
    run, s = run_config(dataplane, cfg, run_for=2)
    assert [w["worker"] for w in s["workers"]] == [0, 1], run.describe()
    for w in s["workers"]:
        _check_worker_forwarded_everything(w)
    _check_totals(s)
    assert s["tx_packets"] == s["rx_packets"] > 0
    assert s["drops"] == NO_DROPS
    assert "forwarding with 2 worker(s)" in run.stderr
    assert s["ports"]["inside"]["device"] == "net_null0"
    assert s["ports"]["outside"]["device"] == "net_null1"
    # The SA is there, untouched (no frame was IP).
    assert s["sa_count"] == 1 and s["sa_events"] == NO_SA_EVENTS
    assert s["sas"] == [{"name": "hq", "direction": "out", "spi": "0x00001001", "packets": 0, "bytes": 0,
                         "sequence": 0, "expired": False, "owner_worker": 0}]


def test_one_worker_on_ring_ports(dataplane, tmp_path, file_prefix):
    """net_ring as a vdev: DPDK 22.11 takes `net_ringN` with no arguments and gives
    the port its own internal rings (what it sends comes back to itself). Nothing
    outside the process can enqueue into them (no secondary process with
    --no-shconf), so no frame ever arrives: this checks that both ports are
    probed, configured, started and polled, and that the run stops cleanly."""
    cfg = tmp_path / "ring.toml"
    cfg.write_text(render_config("net_ring0", "net_ring1", SOME_RULES, prefix=file_prefix, workers=1,
                                 sas=some_sas(tmp_path)))
    run, s = run_config(dataplane, cfg, run_for=1)
    [w] = s["workers"]
    assert s["ports"]["inside"]["device"] == "net_ring0"
    assert s["ports"]["outside"]["device"] == "net_ring1"
    assert s["ports"]["inside"]["port_id"] != s["ports"]["outside"]["port_id"]
    assert w["idle_polls"] > 0, "the worker never polled"
    assert w["busy_polls"] == 0 and s["rx_packets"] == 0 and s["tx_packets"] == 0, run.describe()
    assert s["drops"] == NO_DROPS
    _check_totals(s)


def _assert_dpdk_failure(r, *needles):
    assert r.returncode == EXIT_DPDK, r.describe()
    assert r.stdout == "", "no summary after a failed start"
    for bad in ("panicked", "Traceback", "RUST_BACKTRACE", "Segmentation fault"):
        assert bad not in r.stderr, r.describe()
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, r.describe()
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"


def test_unknown_device_fails_cleanly(dataplane, tmp_path, file_prefix):
    cfg = tmp_path / "bogus.toml"
    cfg.write_text(render_config("net_bogus0", "net_null1", prefix=file_prefix))
    r = run_binary(dataplane, "--config", cfg, "--run-for", 1, timeout=60)
    _assert_dpdk_failure(r, "net_bogus0")


def test_vdev_that_fails_to_probe_fails_cleanly(dataplane, tmp_path, file_prefix):
    missing = tmp_path / "no-such-dir" / "in.pcap"
    cfg = tmp_path / "badpcap.toml"
    cfg.write_text(render_config(pcap_device(0, missing, tmp_path / "tx.pcap"), "net_null1",
                                 prefix=file_prefix))
    r = run_binary(dataplane, "--config", cfg, "--run-for", 1, timeout=60)
    _assert_dpdk_failure(r, "port inside", "net_pcap0")


def test_more_workers_than_device_queues_fails_cleanly(dataplane, tmp_path, file_prefix):
    rx = tmp_path / "empty.pcap"
    write_pcap(rx, [])
    cfg = tmp_path / "pcap2.toml"
    cfg.write_text(render_config(pcap_device(0, rx, tmp_path / "a.pcap"), pcap_device(1, rx, tmp_path / "b.pcap"),
                                 prefix=file_prefix, workers=2))
    r = run_binary(dataplane, "--config", cfg, "--run-for", 1, timeout=60)
    _assert_dpdk_failure(r, "port inside", "2 workers")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_summary(dataplane, tmp_path, file_prefix, sig):
    cfg = tmp_path / "null.toml"
    cfg.write_text(render_config("net_null0", "net_null1", SOME_RULES, prefix=file_prefix, workers=1,
                                 sas=some_sas(tmp_path)))
    bg = Background(dataplane, cfg)
    try:
        assert bg.wait_forwarding(timeout=30), "the dataplane never started forwarding:\n" + "".join(bg.stderr_lines)
        time.sleep(1.5)
        assert bg.proc.poll() is None, "stopped by itself without --run-for"
        bg.signal(sig)
        run = bg.finish(timeout=30)
    finally:
        bg.kill()
    assert run.returncode == EXIT_OK, run.describe()
    assert "panicked" not in run.stderr
    s = run.json()
    assert s["duration_seconds"] >= 1.0, s["duration_seconds"]
    [w] = s["workers"]
    _check_worker_forwarded_everything(w)
    _check_totals(s)
    assert s["rx_packets"] > 0 and s["tx_packets"] == s["rx_packets"]


# The demo's SAs, as configs/demo.toml defines them (keys read from the repository).
def demo_sa(name, direction, spi, src, dst):
    key = bytes.fromhex((REPO_ROOT / "configs" / "demo" / f"{name}.key").read_text().strip())
    return SaSpec(name, direction, spi, "tunnel", src, dst, aead="aes128gcm16", esn=False, key=key)


def test_demo_config(dataplane, tmp_path, demo_keys_private):
    """configs/demo.toml as shipped (relative capture and key paths, so run from
    the repo root), output captures moved to tmp_path. Expected, from
    configs/demo/make_pcaps.py: inside: ARP (non-IP), web (bypass), to HQ
    (protect: ESP of SA to-hq), DNS (bypass), telnet (discard), ICMPv6 echo, NS,
    VLAN web (bypass); outside: HQ's reply in ESP of SA from-hq (decrypted), web
    reply (bypass), RDP (discard), ping (discard), IPv6 DNS reply (bypass)."""
    text = (REPO_ROOT / "configs" / "demo.toml").read_text()
    tx_in, tx_out = tmp_path / "inside-tx.pcap", tmp_path / "outside-tx.pcap"
    prefix = unique_prefix("demo")
    for old, new in [("/tmp/bitw-inside-tx.pcap", str(tx_in)), ("/tmp/bitw-outside-tx.pcap", str(tx_out)),
                     ('"bitw-demo"', f'"{prefix}"')]:
        assert text.count(old) == 1, f"configs/demo.toml changed: {old!r} not found once"
        text = text.replace(old, new)
    cfg = tmp_path / "demo.toml"
    cfg.write_text(text)

    run, s = run_config(dataplane, cfg, run_for=2, cwd=REPO_ROOT)
    assert s["drops"] == drops(policy_discard=3), run.describe()
    assert s["non_ip"] == 1
    assert s["bypassed"] == 7
    assert s["esp_encrypted"] == 1
    assert s["esp_decrypted"] == 1
    assert s["rx_packets"] == 13
    assert s["tx_packets"] == 10
    assert s["sa_count"] == 2 and s["sa_events"] == NO_SA_EVENTS
    _check_totals(s)

    inside = read_pcap(REPO_ROOT / "configs" / "demo" / "inside.pcap")
    outside = read_pcap(REPO_ROOT / "configs" / "demo" / "outside.pcap")
    assert (len(inside), len(outside)) == (8, 5)
    # Forwarded, in order: ARP, web, to HQ (now ESP), DNS, ICMPv6 echo, NS, VLAN web.
    got_out = read_pcap(tx_out)
    assert len(got_out) == 7, run.describe()
    assert [got_out[i] for i in (0, 1, 3, 4, 5, 6)] == [inside[i] for i in (0, 1, 3, 5, 6, 7)]
    to_hq = demo_sa("to-hq", "out", 0x1001, "172.16.0.1", "172.16.0.2")
    assert outbound_problems(to_hq, got_out[2], inside[2], 1) == []
    # HQ's reply decrypted (Scapy's reading of the same ESP packet), web reply, v6 DNS.
    from_hq = demo_sa("from-hq", "in", 0x2001, "172.16.0.2", "172.16.0.1")
    l2, _ = ip_packet(outside[0])
    reply = decapsulated(l2, scapy_decrypt(from_hq, parse_esp_frame(outside[0])))
    assert read_pcap(tx_in) == [reply, outside[1], outside[4]]
    assert b"from hq" in reply


def test_demo_config_needs_private_keys(dataplane, tmp_path, demo_keys_private):
    """The demo's key files readable by others (as git checks them out): the
    config is refused, naming the file and what to do."""
    demo = tmp_path / "configs" / "demo"
    demo.mkdir(parents=True)
    for f in demo_keys_private.iterdir():
        shutil.copy(f, demo / f.name)
    os.chmod(demo / "to-hq.key", 0o644)
    shutil.copy(REPO_ROOT / "configs" / "demo.toml", tmp_path / "configs" / "demo.toml")
    r = run_binary(dataplane, "--config", "configs/demo.toml", "--check", timeout=20, cwd=tmp_path)
    assert r.returncode == 2, r.describe()
    assert "configs/demo/to-hq.key" in r.stderr and "chmod 600" in r.stderr, r.describe()
