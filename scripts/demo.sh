#!/usr/bin/env bash
# Sets up the machine, builds bitw and runs the demo on virtual ports:
#  1. the demo captures once through the dataplane alone: counters as JSON and
#     what came out of each port;
#  2. IKE as the terminal: in network namespaces, a terminal without IPsec
#     pings a strongSwan counterpart through bitw, which negotiates IKEv2 as the
#     terminal and sends the pings in ESP (scripts/demo_ike.py);
#  3. the appliance live: bitw-dataplane with traffic flowing for ever
#     (configs/demo-live.toml), bitw-control pushing the tables and exporting
#     metrics, bitwctl reading its state, the exporter scraped.
# BITW_DEMO_SECONDS (default 10) is how long part 3 runs; 0 = until Ctrl-C
# (then point Prometheus at it: prometheus --config.file=configs/prometheus.yml).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$BITW_ROOT"

bash scripts/setup-debian.sh
cargo build --release
# Key files must not be readable by others (git does not keep that mode).
chmod 600 configs/demo/*.key

echo "== 1. the demo captures through the dataplane"
"$BITW_DATAPLANE" --config configs/demo.toml --check
"$BITW_DATAPLANE" --config configs/demo.toml --run-for 3 | tee /tmp/bitw-demo-summary.json
for side in inside outside; do
  echo "== frames sent out of port $side (/tmp/bitw-$side-tx.pcap)"
  tshark -r "/tmp/bitw-$side-tx.pcap" 2>/dev/null || true
done

echo "== 2. IKE as the terminal, against strongSwan"
/usr/bin/python3 scripts/demo_ike.py

echo "== 3. the appliance live: dataplane + control, traffic flowing"
LIVE=configs/demo-live.toml
BITWCTL=(target/release/bitwctl --config "$LIVE")
pids=()
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
"$BITW_DATAPLANE" --config "$LIVE" >/tmp/bitw-demo-live-summary.json 2>/tmp/bitw-demo-dataplane.log &
pids+=($!)
target/release/bitw-control --config "$LIVE" 2>/tmp/bitw-demo-control.log &
pids+=($!)
for _ in $(seq 100); do
  grep -q "reconciled" /tmp/bitw-demo-control.log 2>/dev/null && break
  sleep 0.1
done
if ! grep -q "reconciled" /tmp/bitw-demo-control.log; then
  echo "demo: control did not reach the dataplane; logs:" >&2
  cat /tmp/bitw-demo-dataplane.log /tmp/bitw-demo-control.log >&2
  exit 1
fi
sleep 2
echo "== bitwctl status"
"${BITWCTL[@]}" status
echo "== bitwctl sa list"
"${BITWCTL[@]}" sa list
echo "== bitwctl counters"
"${BITWCTL[@]}" counters
echo "== metrics (http://127.0.0.1:9469/metrics), a few of them"
curl -sf http://127.0.0.1:9469/metrics |
  grep -E '^bitw_(dataplane_up|port_packets_total|esp_packets_total|sas|drops_total\{reason="policy_discard"\})' || true
seconds="${BITW_DEMO_SECONDS:-10}"
if [ "$seconds" = 0 ]; then
  echo "== running until Ctrl-C; scrape with: prometheus --config.file=configs/prometheus.yml"
  wait
else
  sleep "$seconds"
fi
