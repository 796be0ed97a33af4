#!/usr/bin/env bash
# Fleet-mode benchmark with real processes: a 3-member etcd and 3 proxyd nodes (a route
# created on A: time until B and C route it, p50/p99), then a fleet of 10 nodes sharing
# 100,000 routes (time to load them, one more change at that size, a fresh node joining,
# resident memory per node). Numbers are printed, never asserted; the load average is
# printed with them (the machine may be shared).
#
#   bench/fleet.sh [--probes 300] [--scale-nodes 10] [--scale-routes 100000] [--batch 2000]
#
# Needs `etcd` (Debian etcd-server). PROXYD may name a proxyd binary; otherwise a release
# build is made.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/proxy-target}"
. "$ROOT/bench/common.sh"
need_tools etcd:etcd-server
build_proxyd
export PROXYD
say "building the fleet bench (release)"
cargo build --quiet --release --manifest-path "$ROOT/bench/fleet-bench/Cargo.toml"
exec "$CARGO_TARGET_DIR/release/fleet-bench" "$@"
