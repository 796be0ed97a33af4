#!/usr/bin/env bash
# Cost of one routing-table lookup with 10, 1,000 and 100,000 path-prefix routes
# (proxy/examples/route_lookup.rs). CPU only, no sockets; takes well under a minute.
#
# Usage: bench/route-lookup.sh
# Env:   CARGO_TARGET_DIR (default /var/tmp/proxy-target)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}
cd "$ROOT"
exec cargo run --release --quiet -p proxy --example route_lookup
