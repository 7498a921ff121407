# Sourced by the scripts: puts cargo on PATH and sets common paths.
export PATH="$HOME/.cargo/bin:$PATH"
BITW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BITW_ROOT
export BITW_DATAPLANE="${BITW_DATAPLANE:-$BITW_ROOT/target/release/bitw-dataplane}"
