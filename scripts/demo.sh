#!/usr/bin/env bash
# Sets up the machine, builds bitw and runs the dataplane on virtual ports with
# the demo config: the demo captures go through the filter table, the counters
# are printed as JSON, and what came out of each port is listed.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$BITW_ROOT"

bash scripts/setup-debian.sh
cargo build --release -p bitw-dataplane
# Key files must not be readable by others (git does not keep that mode).
chmod 600 configs/demo/*.key
"$BITW_DATAPLANE" --config configs/demo.toml --check
"$BITW_DATAPLANE" --config configs/demo.toml --run-for "${BITW_DEMO_SECONDS:-3}" | tee /tmp/bitw-demo-summary.json
for side in inside outside; do
  echo "== frames sent out of port $side (/tmp/bitw-$side-tx.pcap)"
  tshark -r "/tmp/bitw-$side-tx.pcap" 2>/dev/null || true
done
