#!/usr/bin/env bash
# Installs everything bitw needs on Debian 12 (run as root). Idempotent: skips
# apt when every package is already there.
set -euo pipefail

PACKAGES=(
  # DPDK 22.11: runtime, PMDs, headers, dpdk-testpmd, ipsec-secgw sources (perf)
  dpdk dpdk-dev libdpdk-dev dpdk-doc
  # intel-ipsec-mb: the AES-GCM backend of the packet path (dpdk-sys links it)
  libipsec-mb-dev
  # perf/secgw.py builds dpdk-doc's examples/ipsec-secgw with its Makefile (make and
  # pkg-config libdpdk, below) and runs it with crypto_aesni_gcm (intel-ipsec-mb)
  librte-crypto-ipsec-mb23
  # dpdk-sys: bindgen needs libclang; cc builds the shim
  clang libclang-dev pkg-config build-essential libpcap-dev
  # tests: an ESP/packet implementation we did not write, and a test runner
  python3 python3-scapy python3-pytest tshark tcpdump
  # network namespaces and veth for the af_packet/IKE tests
  iproute2 ethtool procps
  # metrics: a real Prometheus server scrapes the exporter in the tests; promtool
  # checks the exposition; openssl makes the control channel's test certificates
  prometheus openssl curl
  # IKEv2 interop tests (tests/bitw_swan.py): a real strongSwan 5.9.8 charon per
  # network namespace with kernel-libipsec (in libcharon-extra-plugins), swanctl,
  # and the openssl plugin (libstrongswan-standard-plugins: AES-GCM, x25519,
  # ECDSA). The harness never uses the package's own ipsec/strongswan service.
  strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  # Debian 12's own rustc (1.63) is too old for the crates bitw uses.
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
  else
    echo "setup: installing Rust with rustup (needs access to static.rust-lang.org)" >&2
    apt-get install -y -qq curl ca-certificates >/dev/null
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
  fi
fi
