#!/usr/bin/env bash
# Sets up the machine and runs the whole test suite: formatting, clippy, unit
# tests, and the system tests that drive the real binaries through DPDK vdevs.
# Needs root (DPDK, network namespaces). Exit status is non-zero on any failure.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$BITW_ROOT"

bash scripts/setup-debian.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build (release)"
cargo build --workspace --release
echo "== unit tests"
cargo test --workspace --release
echo "== system tests"
/usr/bin/python3 -m pytest -v tests/ "$@"
