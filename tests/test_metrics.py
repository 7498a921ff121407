"""The exporter, scraped by a real Prometheus, and the Grafana dashboard's queries.

The dataplane replays a capture forever (net_pcap infinite_rx) through the
demo's policy and SAs, so every counter moves; bitw-control exports; Debian's
`prometheus` scrapes it every second. Then every PromQL expression of
configs/grafana/bitw.json (Grafana's variables replaced as Grafana would) must
return data through Prometheus's HTTP API, and `promtool check metrics` must
accept the exposition.
"""

import json
import re
import shutil
import subprocess
import time

import pytest

from bitw_control_lib import (Prometheus, control_section, free_port, http_get, start_control,
                              wait_until)
from bitw_testlib import REPO_ROOT, Background, render_config

DASHBOARD = REPO_ROOT / "configs" / "grafana" / "bitw.json"


def dashboard_exprs():
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def grafana_substitute(expr, rate_interval="15s"):
    """What Grafana sends for the dashboard's variables: all instances, and a
    rate interval covering several scrapes."""
    expr = expr.replace("$__rate_interval", rate_interval)
    expr = expr.replace('"$instance"', '".*"')
    assert "$" not in expr, f"unhandled Grafana variable in {expr}"
    return expr


@pytest.fixture
def exporting(tmp_path, dataplane, file_prefix, demo_keys_private):
    """Dataplane on an endless replay of the demo captures + control exporting."""
    demo = REPO_ROOT / "configs" / "demo"
    port = free_port()
    base = (REPO_ROOT / "configs" / "demo.toml").read_text()
    # The demo's devices and EAL prefix, made endless and unique to this test.
    text = base.replace(
        'device = "net_pcap0,rx_pcap=configs/demo/inside.pcap,tx_pcap=/tmp/bitw-inside-tx.pcap"',
        f'device = "net_pcap0,rx_pcap={demo}/inside.pcap,infinite_rx=1"'
    ).replace(
        'device = "net_pcap1,rx_pcap=configs/demo/outside.pcap,tx_pcap=/tmp/bitw-outside-tx.pcap"',
        'device = "net_null1,no-rx=1"'
    ).replace('"--file-prefix", "bitw-demo"', f'"--file-prefix", "{file_prefix}"')
    text = text.replace('key_file = "configs/demo/', f'key_file = "{demo}/')
    assert "infinite_rx" in text and file_prefix in text, "demo.toml changed: update this test"
    cfg = tmp_path / "bitw.toml"
    cfg.write_text(text + control_section(tmp_path, metrics_port=port,
                                          terminals=[("meter", "10.0.0.7")]))
    dp = Background(dataplane, cfg)
    assert dp.wait_forwarding(), dp.finish().describe()
    ctl = start_control(cfg)
    try:
        ctl.wait_line(r"reconciled")
        yield f"127.0.0.1:{port}", ctl, dp
    finally:
        ctl.finish()
        dp.signal(2)
        dp.finish()


def test_exposition_passes_promtool(exporting):
    target, _, _ = exporting
    status, body = http_get(f"http://{target}/metrics")
    assert status == 200
    for name in ("bitw_build_info", "bitw_dataplane_up 1", "bitw_port_packets_total",
                 "bitw_drops_total", "bitw_sas", "bitw_worker_busy_cycles_total",
                 "bitw_control_channel_rtt_seconds_bucket", "bitw_sa_install_seconds_bucket",
                 # IKE: present (at 0) without any [[connection]]
                 'bitw_ike_sas{state="established"} 0', "bitw_ike_connections 0",
                 'bitw_ike_handshakes_total{result="ok"} 0',
                 "bitw_ike_handshake_duration_seconds_bucket"):
        assert name in body, f"{name} missing from the exposition:\n{body[:3000]}"
    assert not re.search(r"key", body.replace("keepalive", "")), "a key-like word in the metrics"
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/setup-debian.sh (Debian package prometheus)"
    p = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, f"promtool check metrics:\n{p.stdout}\n{p.stderr}"


def test_every_dashboard_query_returns_data_through_prometheus(exporting, tmp_path):
    target, _, _ = exporting
    prom = Prometheus(tmp_path / "prom", [target])
    try:
        wait_until(prom.targets_up, timeout=30, what="Prometheus scraping bitw")
        # Enough samples for every rate() over the substituted interval.
        time.sleep(12)
        exprs = dashboard_exprs()
        assert len(exprs) >= 20, "the dashboard lost its panels"
        empty = []
        for title, expr in exprs:
            q = grafana_substitute(expr)
            r = prom.query(q)
            assert r.get("status") == "success", f"{title}: {q}: {r}"
            if not r["data"]["result"]:
                empty.append(f"{title}: {q}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        # And the numbers mean something: traffic flows and gets encrypted.
        r = prom.query('sum(rate(bitw_esp_packets_total{operation="encrypt"}[15s]))')
        assert float(r["data"]["result"][0]["value"][1]) > 0, r
        r = prom.query('bitw_dataplane_up')
        assert r["data"]["result"][0]["value"][1] == "1", r
    finally:
        prom.stop()
