#!/usr/bin/env bash
# Instructions and simulated cache misses per proxied request (valgrind's callgrind with
# --cache-sim=yes) of proxyd with 10 and with 100,000 path routes, requests spread over
# every route as bench/scenarios.sh's `routes` scenario spreads them (`/r<i>/1k`, route
# r<i> has path prefix `/r<i>/`, strip_prefix, one pool: an nginx upstream serving 1 KiB).
#
# Two phases per table size, each in a fresh proxyd under callgrind (`workers = 1`,
# instrumentation off while the table loads):
#
#   first   each request goes to a route that has not served a request yet (h2load walking
#           a shuffled list of every route, one connection): what the first pass over a
#           large table costs (per-route metric series are created on first use)
#   spread  after every route has served one request (the same walk, not counted), wrk
#           picks a route at random per request, as in bench/scenarios.sh: the steady state
#
# The counts do not depend on the machine's load (see bench/instructions.sh), so two builds
# can be compared on a busy machine. Cache misses are callgrind's model (D1: first-level
# data cache, LL: last-level cache, both read and write misses), not the machine's counters.
# Loopback only; stops by itself; about 5 minutes.
#
# Usage: bench/route-instructions.sh
# Env:   BENCH_ROUTES=100000  BENCH_FIRST=20000 (requests in `first`)
#        BENCH_SPREAD_SECONDS=20  PROXYD=/path/to/proxyd (skip the build)
#        CARGO_TARGET_DIR (default /var/tmp/proxy-target)
#        BENCH_PROFILE_DIR=/dir  keep each phase's callgrind dump there as proxyd.PHASE-ROUTES
set -euo pipefail

MANY_ROUTES=${BENCH_ROUTES:-100000}
FIRST=${BENCH_FIRST:-20000}
SPREAD_SECONDS=${BENCH_SPREAD_SECONDS:-20}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

need_tools valgrind:valgrind h2load:nghttp2-client wrk:wrk nginx:nginx-light curl:curl
build_proxyd
make_workdir proxy-route-instructions

mkdir -p "$WORK/www"
head -c 1024 /dev/zero | tr '\0' x >"$WORK/www/1k"
chmod -R 755 "$WORK/www"

# --- upstream (not measured) ------------------------------------------------------------------
UP=$(free_port)
mkdir -p "$WORK/up"
cat >"$WORK/up/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $WORK/up/nginx.pid; error_log $WORK/up/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK/up/b; proxy_temp_path $WORK/up/p; fastcgi_temp_path $WORK/up/f;
  uwsgi_temp_path $WORK/up/u; scgi_temp_path $WORK/up/s;
  server { listen 127.0.0.1:$UP backlog=4096; location / { root $WORK/www; } } }
EOF
start upstream nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log"
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$UP/1k" && break; sleep 0.1; done

# Starts proxyd with N routes under callgrind, instrumentation off; sets PORT and PID.
start_proxyd() { # routes
    local n=$1
    PORT=$(free_port)
    rm -rf "$WORK/proxyd"
    mkdir -p "$WORK/proxyd"
    {
        cat <<EOF
[server]
state_dir = "$WORK/proxyd/state"
mgmt_socket = "$WORK/proxyd/state/mgmt.sock"
admin_listen = ""
log_level = "warn"
workers = 1

[telemetry]
access_log = "off"

[[pools]]
name = "static"
upstreams = ["127.0.0.1:$UP"]

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:$PORT"
EOF
        awk -v n="$n" 'BEGIN {
            for (i = 0; i < n; i++)
                printf "\n[[routes]]\nname = \"r%d\"\nlistener = \"web\"\npath_prefix = \"/r%d/\"\nstrip_prefix = true\npool = \"static\"\n", i, i
        }'
    } >"$WORK/proxyd/proxyd.toml"
    start proxyd valgrind --tool=callgrind --cache-sim=yes --instr-atstart=no \
        --callgrind-out-file="$WORK/proxyd/callgrind.%p" "$PROXYD" --config "$WORK/proxyd/proxyd.toml"
    PID=$LAST_PID
    for _ in $(seq 1800); do
        curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$PORT/r0/1k" && return 0
        kill -0 "$PID" 2>/dev/null || { say "proxyd exited:"; cat "$WORK/proxyd.log" >&2; exit 1; }
        sleep 0.2
    done
    say "proxyd did not answer within 6 minutes"
    exit 1
}

# Every route's URL once, shuffled (the same order for every run).
uris() { # routes
    awk -v n="$1" -v port="$PORT" 'BEGIN { srand(7); for (i = 0; i < n; i++) printf "%f http://127.0.0.1:%d/r%d/1k\n", rand(), port, i }' |
        sort -n | cut -d' ' -f2
}

# Zeroes the counters, runs COMMAND..., dumps, and prints "Ir D1mr DLmr" per request for
# the request count that `count` reads from the command's output.
measure() { # label count-command command...
    local label=$1 count=$2 out ok dump summary
    shift 2
    callgrind_control --zero "$PID" >/dev/null 2>&1
    out=$("$@" 2>&1 || true)
    ok=$($count <<<"$out")
    callgrind_control --dump="$label" "$PID" >/dev/null 2>&1
    dump=""
    for _ in $(seq 100); do
        dump=$(grep -l "^desc: Trigger: dump $label\$" "$WORK/proxyd"/callgrind.* 2>/dev/null | head -1 || true)
        [ -n "$dump" ] && break
        sleep 0.2
    done
    if [ -n "${BENCH_PROFILE_DIR:-}" ] && [ -n "$dump" ]; then
        mkdir -p "$BENCH_PROFILE_DIR"
        cp "$dump" "$BENCH_PROFILE_DIR/proxyd.$label"
    fi
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
    summary=$(awk '/^summary:/ {print $2, $6 + $7, $9 + $10; exit}' "$dump" 2>/dev/null || true)
    if [ -z "$summary" ] || [ "${ok:-0}" -eq 0 ]; then
        say "  $label: no count (requests: ${ok:-none})"
        echo "? ? ? 0"
        return
    fi
    read -r ir d1 ll <<<"$summary"
    awk -v ir="$ir" -v d1="$d1" -v ll="$ll" -v n="$ok" 'BEGIN { printf "%d %.1f %.1f %d\n", ir / n, d1 / n, ll / n, n }'
}
h2load_done() { awk '/^requests:/ {print $8; exit}'; }
wrk_done() { awk '/ requests in / {print $1; exit}'; }

declare -A R
for n in 10 "$MANY_ROUTES"; do
    cat >"$WORK/spread.lua" <<EOF
math.randomseed(7)
request = function()
    return wrk.format("GET", "/r" .. math.random(0, $((n - 1))) .. "/1k")
end
EOF
    for phase in first spread; do
        start_proxyd "$n"
        uris "$n" >"$WORK/uris"
        callgrind_control --instr=on "$PID" >/dev/null 2>&1
        # The same warm-up for both phases: connections to the upstream, the 10-route case's
        # series (each of its routes served once).
        h2load --h1 -n 500 -c8 -t1 "http://127.0.0.1:$PORT/r0/1k" >/dev/null 2>&1 || true
        if [ "$n" -le 10 ]; then
            h2load --h1 -n "$n" -c1 -t1 -i "$WORK/uris" >/dev/null 2>&1 || true
        fi
        if [ "$phase" = first ]; then
            # The first BENCH_FIRST routes of the shuffled list (r0 is already warm).
            count=$FIRST
            [ "$n" -gt 10 ] || count=2000
            say "routes: $n, first requests on each route ($count)"
            R[$n,$phase]=$(measure "$phase-$n" h2load_done h2load --h1 -n "$count" -c1 -t1 -i "$WORK/uris")
        else
            if [ "$n" -gt 10 ]; then
                say "routes: $n, serving every route once (not counted)"
                callgrind_control --instr=off "$PID" >/dev/null 2>&1
                h2load --h1 -n "$n" -c1 -t1 -i "$WORK/uris" >/dev/null 2>&1 || true
                callgrind_control --instr=on "$PID" >/dev/null 2>&1
            fi
            wrk -t1 -c8 -d2s -s "$WORK/spread.lua" "http://127.0.0.1:$PORT/" >/dev/null 2>&1 || true
            say "routes: $n, random spread for ${SPREAD_SECONDS}s"
            R[$n,$phase]=$(measure "$phase-$n" wrk_done wrk -t1 -c8 "-d${SPREAD_SECONDS}s" -s "$WORK/spread.lua" "http://127.0.0.1:$PORT/")
        fi
        say "  ${R[$n,$phase]}"
        stop "$PID"
    done
done

printf '%-7s %8s %10s %10s %10s %10s\n' phase routes "Ir/req" "D1 miss" "LL miss" requests
for phase in first spread; do
    for n in 10 "$MANY_ROUTES"; do
        read -r ir d1 ll ok <<<"${R[$n,$phase]}"
        printf '%-7s %8s %10s %10s %10s %10s\n' "$phase" "$n" "$ir" "$d1" "$ll" "$ok"
    done
done
