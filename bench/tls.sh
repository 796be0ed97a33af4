#!/usr/bin/env bash
# TLS termination: handshakes/s (full and resumed) and HTTPS req/s of proxyd, nginx and
# Caddy, each terminating TLS with the same certificate (ECDSA P-256) in front of the same
# upstream (nginx serving a 1 KiB file over plain HTTP on 127.0.0.1).
#
# Handshakes: `openssl s_time` without SNI (every server presents its only certificate);
# -new: a full handshake per connection; -reuse: session resumption, with the default
# TLS 1.3 and with TLS 1.2. TLS 1.3 tickets arrive after the handshake (rustls and Go send
# them once the client's Finished is in), and s_time only reads them with -www, so the
# TLS 1.3 resumption run fetches /1k on every connection; without it no server resumes.
# nginx is given TLSv1.3 explicitly (Debian's 1.22 only enables up to TLS 1.2 by default).
# Requests: wrk over HTTPS with keep-alive. Every access log is off (proxyd's, on by
# default, was left on here before 2026-11-30, while nginx's and Caddy's were off).
# Loopback only; stops by itself.
#
# Usage: bench/tls.sh           (about 2 minutes)
# Env:   BENCH_SECONDS=10  BENCH_THREADS=2  BENCH_CONNECTIONS=64
#        PROXYD=/path/to/proxyd  (skip the build)   CARGO_TARGET_DIR (default /var/tmp/proxy-target)
set -euo pipefail

SECONDS_EACH=${BENCH_SECONDS:-10}
THREADS=${BENCH_THREADS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

need_tools wrk:wrk openssl:openssl nginx:nginx-light caddy:caddy curl:curl
build_proxyd
make_workdir proxy-tls-bench

# --- one certificate for everyone ---------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=bench.example.test" -addext "subjectAltName=DNS:bench.example.test,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 644 "$WORK/key.pem" "$WORK/cert.pem"

# --- upstream: nginx, 1 KiB file ----------------------------------------------------------
UP=$(free_port)
mkdir -p "$WORK/www" "$WORK/up"
head -c 1024 /dev/zero | tr '\0' x >"$WORK/www/1k"
chmod -R 755 "$WORK/www"
nginx_head() { printf 'worker_processes auto;\ndaemon off;\npid %s/nginx.pid;\nerror_log %s/error.log warn;\nevents { worker_connections 8192; }\n' "$1" "$1"; }
temp_paths() { printf 'client_body_temp_path %s/b; proxy_temp_path %s/p; fastcgi_temp_path %s/f; uwsgi_temp_path %s/u; scgi_temp_path %s/s;\n' "$1" "$1" "$1" "$1" "$1"; }
{
    nginx_head "$WORK/up"
    echo "http { access_log off; $(temp_paths "$WORK/up") keepalive_requests 1000000;"
    echo "  server { listen 127.0.0.1:$UP reuseport backlog=4096; location / { root $WORK/www; } } }"
} >"$WORK/up/nginx.conf"
start upstream nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log"
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$UP/1k" && break; sleep 0.1; done

# --- the TLS terminators ------------------------------------------------------------------
start_proxyd() { # port
    mkdir -p "$WORK/proxyd"
    cat >"$WORK/proxyd/proxyd.toml" <<EOF
[server]
state_dir = "$WORK/proxyd/state"
mgmt_socket = "$WORK/proxyd/state/mgmt.sock"
admin_listen = ""
log_level = "warn"

# Like nginx's access_log off below: proxyd's access log is on (JSON) by default.
[telemetry]
access_log = "off"

[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:$1"

[[pools]]
name = "static"
upstreams = ["127.0.0.1:$UP"]

[[routes]]
name = "all"
listener = "secure"
pool = "static"

[[tls.certificates]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
EOF
    start proxyd "$PROXYD" --config "$WORK/proxyd/proxyd.toml"
}
start_nginx() { # port
    mkdir -p "$WORK/nginx"
    {
        nginx_head "$WORK/nginx"
        cat <<EOF
http {
    access_log off;
    $(temp_paths "$WORK/nginx")
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    upstream static { server 127.0.0.1:$UP; keepalive 64; }
    server {
        listen 127.0.0.1:$1 ssl http2 backlog=4096;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        location / { proxy_pass http://static; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
EOF
    } >"$WORK/nginx/nginx.conf"
    start nginx nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"
}
start_caddy() { # port
    mkdir -p "$WORK/caddy"
    cat >"$WORK/caddy/Caddyfile" <<EOF
{
    admin off
    auto_https disable_redirects
    storage file_system $WORK/caddy/data
    log {
        level ERROR
    }
}
https://bench.example.test:$1, https://127.0.0.1:$1 {
    bind 127.0.0.1
    tls $WORK/cert.pem $WORK/key.pem
    reverse_proxy 127.0.0.1:$UP
}
EOF
    HOME="$WORK/caddy" start caddy caddy run --adapter caddyfile --config "$WORK/caddy/Caddyfile"
}

printf '%-8s %14s %18s %18s %10s %10s %10s\n' proxy "handshakes/s" "resumed+GET/s 1.3" "resumed/s TLS1.2" "req/s" p50 p99
for name in proxyd nginx caddy; do
    port=$(free_port)
    "start_$name" "$port"
    pid=$LAST_PID
    wait_ready "https://bench.example.test:$port/1k" "$name" "$pid" -k \
        --resolve "bench.example.test:$port:127.0.0.1"
    new_real=$(openssl s_time -connect "127.0.0.1:$port" -new -time "$SECONDS_EACH" 2>/dev/null |
        awk '/connections in [0-9]+ real seconds/ {printf "%.0f", $1 / $4; exit}')
    reuse_real=$(openssl s_time -connect "127.0.0.1:$port" -reuse -tls1_3 -www /1k -time "$SECONDS_EACH" 2>/dev/null |
        awk '/connections in [0-9]+ real seconds/ {printf "%.0f", $1 / $4; exit}')
    reuse12=$(openssl s_time -connect "127.0.0.1:$port" -reuse -tls1_2 -time "$SECONDS_EACH" 2>/dev/null |
        awk '/connections in [0-9]+ real seconds/ {printf "%.0f", $1 / $4; exit}')
    wrk_out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${SECONDS_EACH}s" --latency "https://127.0.0.1:$port/1k")
    rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$wrk_out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$wrk_out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$wrk_out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$wrk_out")
    printf '%-8s %14s %18s %18s %10s %10s %10s\n' "$name" "${new_real:-?}" "${reuse_real:-?}" "${reuse12:-?}" "${rps:-?}" "${p50:-?}" "${p99:-?}"
    [ -z "$errors" ] || say "  $name: $errors"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
