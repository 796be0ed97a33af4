#!/usr/bin/env bash
# Management API benchmark: change throughput (changes/s through CreateRoute) and
# propagation latency (call returned -> first request routed by the new rule), at 10 and
# at 100,000 existing routes, against a real proxyd with its SQLite store on disk.
#
#   bench/api-bench.sh [--existing 10,100000] [--changes 1000] [--probes 200] [--budget-secs 20]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/proxy-target}"
exec cargo run --quiet --release --manifest-path bench/api-bench/Cargo.toml -- "$@"
