#!/usr/bin/env bash
# TLS termination: handshakes/s (full and resumed) and HTTPS req/s of proxyd, nginx and
# Caddy, each terminating TLS with the same certificate (ECDSA P-256) in front of the same
# upstream (nginx serving a 1 KiB file over plain HTTP on 127.0.0.1).
#
# Handshakes: `openssl s_time` without SNI (every server presents its only certificate),
# one connection at a time; -new -www /1k: a full TLS 1.3 handshake and one GET per
# connection (until 2026-12-03 the handshake alone, without the GET); -reuse: session
# resumption, with the default TLS 1.3 and with TLS 1.2. One client at a time waits on
# its own crypto as much as on the server's, so full handshakes are also measured with
# BENCH_TLS_CLIENTS s_time clients at once (default 4, the server's CPU the limit), and the
# server's CPU time per full handshake + GET over that run (user + system of its
# processes / connections made) is reported: the figure least moved by the client and the
# machine's noise. TLS 1.3 tickets arrive after the handshake (rustls and Go send
# them once the client's Finished is in), and s_time only reads them with -www, so the
# TLS 1.3 resumption run fetches /1k on every connection; without it no server resumes.
# nginx is given TLSv1.3 explicitly (Debian's 1.22 only enables up to TLS 1.2 by default).
# Requests: wrk over HTTPS with keep-alive. Every access log is off (proxyd's, on by
# default, was left on here before 2026-11-30, while nginx's and Caddy's were off).
#
# The whole set runs BENCH_ROUNDS times (until 2026-12-03 once), the servers taking turns
# within each round (proxyd first in round 1, nginx in round 2, Caddy in round 3, ...:
# `in_turn` in common.sh); each ratio to nginx is taken within a round and the median of
# the rounds' ratios is reported with their range, as bench/http.sh does. Writes
# results-tls.md to BENCH_OUT. Loopback only; stops by itself.
#
# Usage: bench/tls.sh           (about 8 minutes with 3 rounds)
# Env:   BENCH_SECONDS=10  BENCH_THREADS=2  BENCH_CONNECTIONS=64  BENCH_ROUNDS=3
#        BENCH_TLS_CLIENTS=4     (s_time clients at once for the parallel full handshakes)
#        BENCH_OUT=bench/results (where results-tls.md goes)
#        PROXYD=/path/to/proxyd  (skip the build)   CARGO_TARGET_DIR (default /var/tmp/proxy-target)
#        PROXYD_LABEL=...        (what to call that binary in the results; default: HEAD)
set -euo pipefail

SECONDS_EACH=${BENCH_SECONDS:-10}
THREADS=${BENCH_THREADS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ROUNDS=${BENCH_ROUNDS:-3}
CLIENTS=${BENCH_TLS_CLIENTS:-4}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/bench/results}
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
        location / {
            proxy_pass http://static;
$(nginx_forwarding)
        }
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
    reverse_proxy 127.0.0.1:$UP {
$(caddy_forwarding)
    }
}
EOF
    HOME="$WORK/caddy" start caddy caddy run --adapter caddyfile --config "$WORK/caddy/Caddyfile"
}

# s_time_run CLIENTS PID ARGS...  "connections/s cpu_us_per_connection" of CLIENTS
# `openssl s_time ARGS` at once against the server PID: their rates summed (0 when none
# made a connection), and the server's processes' user + system time over the run divided
# by the connections all clients made.
s_time_run() {
    local clients=$1 pid=$2 i ticks0 ticks1
    shift 2
    ticks0=$(cpu_ticks "$pid")
    for i in $(seq "$clients"); do
        openssl s_time "$@" -time "$SECONDS_EACH" >"$WORK/s_time-$i.txt" 2>/dev/null &
    done
    wait
    ticks1=$(cpu_ticks "$pid")
    for i in $(seq "$clients"); do cat "$WORK/s_time-$i.txt"; done |
        awk -v ticks=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" '
            /connections in [0-9]+ real seconds/ { n += $1; rate += $1 / $4 }
            END { printf "%.0f %.1f\n", rate, (n > 0) ? ticks * 1e6 / hz / n : 0 }'
}
# s_time_rate PID ARGS...  connections per second of one `openssl s_time ARGS`.
s_time_rate() { s_time_run 1 "$@" | cut -d' ' -f1; }

declare -A FULL FULLPAR FULLCPU RESUMED13 RESUMED12 RPS P99 ERRORS
SERVERS=(proxyd nginx caddy)
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
    for name in $(in_turn "$round" "${SERVERS[@]}"); do
        port=$(free_port)
        "start_$name" "$port"
        pid=$LAST_PID
        wait_ready "https://bench.example.test:$port/1k" "$name" "$pid" -k \
            --resolve "bench.example.test:$port:127.0.0.1"
        say "round $round/$ROUNDS: $name (load average $(cut -d' ' -f1-3 /proc/loadavg))"
        FULL[$name,$round]=$(s_time_rate "$pid" -connect "127.0.0.1:$port" -new -www /1k)
        read -r "FULLPAR[$name,$round]" "FULLCPU[$name,$round]" \
            < <(s_time_run "$CLIENTS" "$pid" -connect "127.0.0.1:$port" -new -www /1k)
        RESUMED13[$name,$round]=$(s_time_rate "$pid" -connect "127.0.0.1:$port" -reuse -tls1_3 -www /1k)
        RESUMED12[$name,$round]=$(s_time_rate "$pid" -connect "127.0.0.1:$port" -reuse -tls1_2)
        wrk -t"$THREADS" -c"$CONNECTIONS" -d1s "https://127.0.0.1:$port/1k" >/dev/null 2>&1 || true
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"${SECONDS_EACH}s" --latency "https://127.0.0.1:$port/1k" \
            >"$WORK/wrk-$name-$round.txt" 2>&1 || true
        read -r rps p99 errors < <(awk "$WRK_FIGURES"'
            END { printf "%.0f %.3f %d\n", rps, p99, err }' "$WORK/wrk-$name-$round.txt")
        RPS[$name,$round]=$rps
        P99[$name,$round]=$p99
        ERRORS[$name]=$((${ERRORS[$name]:-0} + errors))
        say "  full handshake + GET/s ${FULL[$name,$round]} (${FULLPAR[$name,$round]} with $CLIENTS clients, ${FULLCPU[$name,$round]} µs CPU each), TLS 1.3 resumed + GET/s ${RESUMED13[$name,$round]}, TLS 1.2 resumed/s ${RESUMED12[$name,$round]}, req/s $rps, p99 $p99 ms"
        stop "$pid"
    done
done

# Every figure is higher-is-better but p99, whose ratio is proxyd's over nginx's (lower
# is better), the one the goal asks to be at most 1.0.
row() { # label array fmt
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$(round_ratio "$2" proxyd nginx)" \
        "$(round_median "$2" proxyd "$3")" "$(round_median "$2" nginx "$3")" "$(round_median "$2" caddy "$3")"
}
mkdir -p "$OUT"
{
    echo "## bench/tls.sh ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), proxyd ${PROXYD_LABEL:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)})"
    echo
    echo "ECDSA P-256 certificate, 1 KiB from an nginx upstream, every access log off; openssl s_time one connection at a time for ${SECONDS_EACH} s (full handshakes also with $CLIENTS clients at once, and the server's CPU time per connection over that run), wrk -t$THREADS -c$CONNECTIONS -d${SECONDS_EACH}s over HTTPS with keep-alive; median of $ROUNDS rounds (ratios: the median of each round's own ratio, lowest-highest in brackets); load average at the start $LOAD_AT_START, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| | proxyd / nginx (rounds) | proxyd | nginx | Caddy |"
    echo "|---|---:|---:|---:|---:|"
    row "HTTPS keep-alive, req/s" RPS %.0f
    row "HTTPS keep-alive, p99 ms (lower is better)" P99 %.2f
    row "full TLS 1.3 handshake + GET, per second" FULL %.0f
    row "full TLS 1.3 handshake + GET, $CLIENTS clients at once, per second" FULLPAR %.0f
    row "CPU µs per full TLS 1.3 handshake + GET (lower is better)" FULLCPU %.1f
    row "TLS 1.3 resumption + GET, per second" RESUMED13 %.0f
    row "TLS 1.2 resumption, per second" RESUMED12 %.0f
    echo "| wrk errors (all rounds) | | ${ERRORS[proxyd]} | ${ERRORS[nginx]} | ${ERRORS[caddy]} |"
} | tee "$OUT/results-tls.md.new"
# goals-tls.tsv: the goals this bench measures, for bench/run (see goal in common.sh).
: >"$OUT/goals-tls.tsv"
goal "$OUT/goals-tls.tsv" "HTTPS keep-alive: req/s" higher RPS proxyd nginx
goal "$OUT/goals-tls.tsv" "full TLS 1.3 handshake + GET: per second" higher FULL proxyd nginx
goal "$OUT/goals-tls.tsv" "full TLS 1.3 handshake + GET, $CLIENTS clients at once: per second" higher FULLPAR proxyd nginx
# Earlier runs stay below the newest.
if [ -f "$OUT/results-tls.md" ]; then
    { echo; cat "$OUT/results-tls.md"; } >>"$OUT/results-tls.md.new"
fi
mv "$OUT/results-tls.md.new" "$OUT/results-tls.md"
