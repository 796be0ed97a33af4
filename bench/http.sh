#!/usr/bin/env bash
# HTTP throughput and latency of proxyd against nginx, HAProxy and Caddy as reverse proxies.
#
# One static upstream (nginx serving a 1 KiB file) on 127.0.0.1; each proxy in turn in
# front of it on 127.0.0.1, alone, with keep-alive to the upstream; wrk against each proxy
# and against the upstream directly, once with keep-alive and once with a new connection
# per request. Prints req/s, p50/p99 latency, peak RSS and the ratios proxyd/peer.
#
# Usage: bench/http.sh            (about 2.5 minutes; loopback only; stops by itself)
# Env:   BENCH_DURATION=10s  BENCH_THREADS=2  BENCH_CONNECTIONS=64
#        PROXYD=/path/to/proxyd  (skip the build and use this binary)
#        CARGO_TARGET_DIR        (default /var/tmp/proxy-target)
set -euo pipefail

DURATION=${BENCH_DURATION:-10s}
THREADS=${BENCH_THREADS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}

# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

need_tools wrk:wrk nginx:nginx-light haproxy:haproxy caddy:caddy curl:curl
build_proxyd
make_workdir proxy-bench

# Waits (at most 15 s) until URL answers 200.
wait_ready() {
    local url=$1 name=$2 pid=$3 i
    for i in $(seq 150); do
        if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || { say "$name exited during start-up:"; cat "$WORK/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    say "$name did not answer 200 on $url within 15 s:"
    cat "$WORK/$name.log" >&2
    exit 1
}

# Peak RSS in MiB of a process and its children (nginx: master + workers).
peak_rss_mib() {
    local pid=$1 total=0 p kb
    for p in $pid $(pgrep -P "$pid" || true); do
        kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    awk -v kb="$total" 'BEGIN { printf "%.1f", kb / 1024 }'
}

start() { # name, command...
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
}

stop() { # pid
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# --- the upstream: nginx serving a 1 KiB file ---------------------------------------------
UP=$(free_port)
mkdir -p "$WORK/www" "$WORK/nginx-up"
head -c 1024 /dev/zero | tr '\0' x >"$WORK/www/1k"
chmod 755 "$WORK/www"
chmod 644 "$WORK/www/1k"

nginx_common() { # prefix dir
    cat <<EOF
worker_processes auto;
daemon off;
master_process on;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
EOF
}
nginx_temp_paths() {
    cat <<EOF
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}

{
    nginx_common "$WORK/nginx-up"
    cat <<EOF
http {
    access_log off;
$(nginx_temp_paths "$WORK/nginx-up")
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UP reuseport backlog=4096;
        location / { root $WORK/www; }
    }
}
EOF
} >"$WORK/nginx-up/nginx.conf"
start upstream nginx -p "$WORK/nginx-up" -c "$WORK/nginx-up/nginx.conf" -e "$WORK/nginx-up/error.log"
UP_PID=$LAST_PID
wait_ready "http://127.0.0.1:$UP/1k" upstream "$UP_PID"

# --- the proxies under test ---------------------------------------------------------------
write_proxyd() { # port
    mkdir -p "$WORK/proxyd"
    cat >"$WORK/proxyd/proxyd.toml" <<EOF
[server]
state_dir = "$WORK/proxyd/state"
mgmt_socket = "$WORK/proxyd/state/mgmt.sock"
admin_listen = ""
log_level = "warn"

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:$1"

[[pools]]
name = "static"
upstreams = ["127.0.0.1:$UP"]

[[routes]]
name = "all"
listener = "web"
pool = "static"
EOF
}

write_nginx() { # port
    mkdir -p "$WORK/nginx"
    {
        nginx_common "$WORK/nginx"
        cat <<EOF
http {
    access_log off;
$(nginx_temp_paths "$WORK/nginx")
    keepalive_requests 1000000;
    upstream static {
        server 127.0.0.1:$UP;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$1 backlog=4096;
        location / {
            proxy_pass http://static;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$WORK/nginx/nginx.conf"
}

write_haproxy() { # port
    mkdir -p "$WORK/haproxy"
    cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend web
    bind 127.0.0.1:$1
    default_backend static

backend static
    server up 127.0.0.1:$UP
EOF
}

write_caddy() { # port
    mkdir -p "$WORK/caddy"
    cat >"$WORK/caddy/Caddyfile" <<EOF
{
    admin off
    auto_https off
    storage file_system $WORK/caddy/data
}

http://:$1 {
    bind 127.0.0.1
    reverse_proxy 127.0.0.1:$UP {
        transport http {
            keepalive 60s
            keepalive_idle_conns_per_host 64
        }
    }
}
EOF
}

start_proxy() { # name port
    case $1 in
    proxyd)
        write_proxyd "$2"
        start proxyd "$PROXYD" --config "$WORK/proxyd/proxyd.toml"
        ;;
    nginx)
        write_nginx "$2"
        start nginx nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"
        ;;
    haproxy)
        write_haproxy "$2"
        start haproxy haproxy -db -f "$WORK/haproxy/haproxy.cfg"
        ;;
    caddy)
        write_caddy "$2"
        start caddy env HOME="$WORK/caddy" XDG_DATA_HOME="$WORK/caddy/data" \
            XDG_CONFIG_HOME="$WORK/caddy/config" caddy run --adapter caddyfile --config "$WORK/caddy/Caddyfile"
        ;;
    esac
}

# --- wrk ----------------------------------------------------------------------------------
# Prints "req/s p50_ms p99_ms errors" for one wrk run.
run_wrk() { # url mode(keepalive|close) label
    local url=$1 mode=$2 out="$WORK/wrk-$3-$2.txt"
    local header=()
    [ "$mode" = close ] && header=(-H 'Connection: close')
    # A short warm-up (connections, pools, caches), then the measured run.
    wrk -t"$THREADS" -c"$CONNECTIONS" -d1s "${header[@]}" "$url" >/dev/null 2>&1 || true
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "$url" >"$out" 2>&1 || true
    awk '
        function ms(v) {
            if (v ~ /us$/) return v / 1000
            if (v ~ /ms$/) return v + 0
            if (v ~ /m$/)  return v * 60000
            if (v ~ /s$/)  return v * 1000
            return v
        }
        /^ +50%/ { p50 = ms($2) }
        /^ +99%/ { p99 = ms($2) }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx or 3xx responses:/ { err += $NF }
        /Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
        END { printf "%.0f %.2f %.2f %d\n", rps, p50, p99, err }
    ' "$out"
}

declare -A RPS P50 P99 ERR RSS
MODES=(keepalive close)
TARGETS=(upstream proxyd nginx haproxy caddy)

for mode in "${MODES[@]}"; do
    say "upstream direct, $mode"
    read -r RPS[upstream,$mode] P50[upstream,$mode] P99[upstream,$mode] ERR[upstream,$mode] \
        < <(run_wrk "http://127.0.0.1:$UP/1k" "$mode" upstream)
done
RSS[upstream]=$(peak_rss_mib "$UP_PID")

for name in proxyd nginx haproxy caddy; do
    port=$(free_port)
    start_proxy "$name" "$port"
    pid=$LAST_PID
    wait_ready "http://127.0.0.1:$port/1k" "$name" "$pid"
    for mode in "${MODES[@]}"; do
        say "$name, $mode"
        read -r RPS[$name,$mode] P50[$name,$mode] P99[$name,$mode] ERR[$name,$mode] \
            < <(run_wrk "http://127.0.0.1:$port/1k" "$mode" "$name")
    done
    RSS[$name]=$(peak_rss_mib "$pid")
    stop "$pid"
done

# --- report -------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, 1 KiB body from an nginx upstream, all on 127.0.0.1, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)"
for mode in "${MODES[@]}"; do
    echo
    if [ "$mode" = keepalive ]; then echo "client keep-alive:"; else echo "new connection per request (Connection: close):"; fi
    printf '  %-16s %10s %9s %9s %13s %7s\n' target "req/s" "p50 ms" "p99 ms" "peak RSS MiB" errors
    for t in "${TARGETS[@]}"; do
        label=$t
        [ "$t" = upstream ] && label="upstream direct"
        printf '  %-16s %10s %9s %9s %13s %7s\n' "$label" "${RPS[$t,$mode]}" "${P50[$t,$mode]}" \
            "${P99[$t,$mode]}" "${RSS[$t]}" "${ERR[$t,$mode]}"
    done
    for peer in nginx haproxy caddy; do
        printf '  proxyd/%-9s req/s %s  p99 %s  RSS %s\n' "$peer" \
            "$(ratio "${RPS[proxyd,$mode]}" "${RPS[$peer,$mode]}")" \
            "$(ratio "${P99[proxyd,$mode]}" "${P99[$peer,$mode]}")" \
            "$(ratio "${RSS[proxyd]}" "${RSS[$peer]}")"
    done
done
echo
echo "peak RSS: VmHWM over the whole run of that target (nginx: master + workers summed)."
