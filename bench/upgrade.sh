#!/usr/bin/env bash
# Requests lost and latency during zero-downtime upgrades.
#
# proxyd (release) in front of a static nginx upstream on 127.0.0.1. wrk runs the same load
# twice for BENCH_SECONDS each: once undisturbed, once while `proxyctl upgrade --wait`
# hands the sockets to a new process every BENCH_EVERY seconds. Prints requests, errors
# (wrk socket errors and non-2xx) and latency percentiles for both runs.
#
# Usage: bench/upgrade.sh     (about 2 minutes with the defaults; loopback only)
# Env:   BENCH_SECONDS=60  BENCH_EVERY=5  BENCH_CONNECTIONS=64
#        PROXYD=/path/proxyd PROXYCTL=/path/proxyctl (skip the build)
set -euo pipefail

SECONDS_PER_RUN=${BENCH_SECONDS:-60}
EVERY=${BENCH_EVERY:-5}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}
export PATH="$PATH:/usr/sbin:/sbin"

for tool in wrk nginx curl; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install wrk nginx-light curl)" >&2; exit 1; }
done
if [ -z "${PROXYD:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet -p proxy -p proxyctl)
    PROXYD="$CARGO_TARGET_DIR/release/proxyd"
    PROXYCTL="$CARGO_TARGET_DIR/release/proxyctl"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/proxy-upgrade-bench.XXXXXX")
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local pid
    # proxyd re-executes itself: stop whichever process serves now.
    if [ -S "$WORK/mgmt.sock" ]; then
        pid=$("$PROXYCTL" --socket "$WORK/mgmt.sock" --output json status 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -1)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port)
WEB=$(port)
head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/index.html"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
    access_log off;
    server { listen 127.0.0.1:$UP; root $WORK; keepalive_requests 100000; }
}
CONF
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

cat > "$WORK/proxy.toml" <<CONF
[server]
state_dir = "$WORK/state"
mgmt_socket = "$WORK/mgmt.sock"
admin_listen = ""
executable = "$PROXYD"
drain_timeout = "10s"
log_level = "warn"

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:$WEB"

[[pools]]
name = "static"
upstreams = ["127.0.0.1:$UP"]

[[routes]]
name = "all"
listener = "web"
pool = "static"
CONF
"$PROXYD" --config "$WORK/proxy.toml" &
PIDS+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$WEB/index.html" >/dev/null && break; sleep 0.1; done

run() {
    wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" --latency "http://127.0.0.1:$WEB/index.html" > "$WORK/$1.wrk"
}
summary() {
    local f=$WORK/$1.wrk
    local reqs errs non2xx p50 p99
    reqs=$(awk '/requests in/ {print $1}' "$f")
    errs=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' "$f")
    non2xx=$(awk '/Non-2xx/ {print $5}' "$f")
    p50=$(awk '$1=="50%" {print $2}' "$f")
    p99=$(awk '$1=="99%" {print $2}' "$f")
    printf '%-18s %10s %8s %8s %10s %10s\n' "$1" "$reqs" "${errs:-0}" "${non2xx:-0}" "$p50" "$p99"
}

echo "run 1: ${SECONDS_PER_RUN}s of load, no upgrades" >&2
run steady
echo "run 2: ${SECONDS_PER_RUN}s of load, an upgrade every ${EVERY}s" >&2
run upgrading &
WRK=$!
upgrades=0
failed_upgrades=0
end=$((SECONDS + SECONDS_PER_RUN - 1))
while [ $SECONDS -lt $end ]; do
    sleep "$EVERY"
    if "$PROXYCTL" --socket "$WORK/mgmt.sock" upgrade --wait >/dev/null 2>>"$WORK/upgrade.err"; then
        upgrades=$((upgrades + 1))
    else
        failed_upgrades=$((failed_upgrades + 1))
    fi
done
wait "$WRK"

printf '\n%-18s %10s %8s %8s %10s %10s\n' run requests errors non-2xx p50 p99
summary steady
summary upgrading
echo "upgrades: $upgrades done, $failed_upgrades failed"
