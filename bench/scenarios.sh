#!/usr/bin/env bash
# The scenarios beside bench/http.sh and bench/tls.sh, each side by side with its peer on
# the same machine, ratios first:
#
#   tcp     TCP forwarding: large transfers (MiB/s through the proxy, wrk fetching a 64 MiB
#           file with 4 connections) and connection rate (a new client and upstream
#           connection per 1 KiB request); proxyd `tcp` listener vs HAProxy `mode tcp`,
#           HAProxy run twice: as configured by default (copying through its 16 KiB
#           buffers) and with `option splice-auto` (splice(2) through pipes, as proxyd does
#           between plain TCP sockets); proxyd is compared with the better of the two.
#           CPU time per connection (user + system of the proxy's processes over the
#           connection-rate run, per connection) beside it.
#   h2      HTTP/2 from clients: h2load -c16 -m10, h2c (prior knowledge) and h2 over TLS
#           (TLS 1.3, ALPN); proxyd vs nginx (`http2`), both proxying HTTP/1.1 upstream;
#           req/s and CPU time per request.
#   idle    memory per idle keep-alive client connection: N connections (default 9,000)
#           each make one request and stay open; growth of anonymous resident memory
#           (RssAnon) / N, read 2 s and 20 s after they went idle; proxyd vs nginx vs
#           HAProxy, BENCH_ROUNDS rounds (the whole RSS is reported beside it).
#   routes  proxyd alone with 10 and with 100,000 path routes, wrk spreading its requests
#           over all of them; the ratio of the two req/s. Each process is then loaded a
#           second time the same way (wrk replays the same routes: its script is seeded),
#           when nearly every route it asks for has answered once and made its metric series:
#           the second ratio is the steady state, the first includes each route's first
#           request (at this machine's rates about one request in seven, over 100,000
#           routes in 10 s).
#   grpc    unary gRPC calls (h2load -c16 -m10 posting grpc.health.v1.Health/Check) through
#           proxyd (an `h2c` pool) and through nginx (`grpc_pass`) to the same gRPC server:
#           a second proxyd's management API on 127.0.0.1 (tonic).
#
# The upstream is nginx serving a 1 KiB and a 64 MiB file on 127.0.0.1 with logs off; every
# proxy runs alone, with its access log off. Loopback only; stops by itself.
#
# Every scenario runs BENCH_ROUNDS times, the proxies (in routes the two tables) taking
# turns within each round, each first in one round of N (`in_turn` in common.sh): a ratio
# is taken within one round and reported as the median of the rounds' ratios with the
# lowest and highest beside it; raw figures are the rounds' medians.
# On a shared machine one run's ratio can move by a fifth from one run to the next.
#
# Usage: bench/scenarios.sh [tcp] [h2] [idle] [routes] [grpc]  (all five by default, ~10 min)
# Env:   BENCH_DURATION=10s  BENCH_THREADS=2  BENCH_CONNECTIONS=64  BENCH_ROUNDS=3
#        BENCH_IDLE_CONNECTIONS=9000   (each proxy needs about 2 descriptors per connection;
#                                       this machine's hard limit is 20,000)
#        BENCH_ROUTES=100000
#        BENCH_OUT=bench/results (results-scenarios.md goes there)
#        PROXYD=/path/to/proxyd  (skip the build)   CARGO_TARGET_DIR (default /var/tmp/proxy-target)
#        PROXYD_LABEL=...        (what to call that binary in the report; default: HEAD)
set -euo pipefail

DURATION=${BENCH_DURATION:-10s}
SECS=${DURATION%s}
THREADS=${BENCH_THREADS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
IDLE=${BENCH_IDLE_CONNECTIONS:-9000}
MANY_ROUTES=${BENCH_ROUTES:-100000}
ROUNDS=${BENCH_ROUNDS:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/bench/results}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(tcp h2 idle routes grpc)
for s in "${SCENARIOS[@]}"; do
    case $s in tcp | h2 | idle | routes | grpc) ;; *) echo "unknown scenario: $s (tcp h2 idle routes grpc)" >&2; exit 2 ;; esac
done

# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

# goals-scenarios.tsv: the goals the scenarios run measure, for bench/run (see goal in
# common.sh).
mkdir -p "$OUT"
GOALS=$OUT/goals-scenarios.tsv
: >"$GOALS"

need_tools wrk:wrk h2load:nghttp2-client nginx:nginx-light haproxy:haproxy curl:curl openssl:openssl python3:python3
build_proxyd
make_workdir proxy-scenarios
ulimit -n "$(ulimit -Hn)"

# Resident memory in KiB of a process and its children (nginx: master + workers).
rss_kib() { family_sum "$1" status '/^VmRSS:/ { print $2 }'; }
# Anonymous resident memory in KiB (VmRSS less the mapped files: the binary's code and
# the libraries, shared with the page cache and moved by what code a run happened to
# touch) of a process and its children.
anon_kib() { family_sum "$1" status '/^RssAnon:/ { print $2 }'; }

# per_connection AFTER BEFORE N  KiB per connection of a growth from BEFORE to AFTER KiB
# over N connections (0 when none was held).
per_connection() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { if (n > 0) printf "%.4f", (a - b) / n; else print 0 }'; }

# --- the upstream ---------------------------------------------------------------------------
UP=$(free_port)
mkdir -p "$WORK/www" "$WORK/nginx-up"
head -c 1024 /dev/zero | tr '\0' x >"$WORK/www/1k"
head -c $((64 << 20)) /dev/zero >"$WORK/www/big"
chmod 755 "$WORK/www"
chmod 644 "$WORK/www/1k" "$WORK/www/big"

nginx_head() { # prefix dir
    cat <<EOF
worker_processes auto;
worker_rlimit_nofile 20000;
daemon off;
master_process on;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 10000; }
EOF
}
nginx_http_head() { # prefix dir
    cat <<EOF
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}

{
    nginx_head "$WORK/nginx-up"
    cat <<EOF
http {
$(nginx_http_head "$WORK/nginx-up")
    sendfile on;
    server {
        listen 127.0.0.1:$UP reuseport backlog=4096;
        location / { root $WORK/www; }
    }
}
EOF
} >"$WORK/nginx-up/nginx.conf"
start upstream nginx -p "$WORK/nginx-up" -c "$WORK/nginx-up/nginx.conf" -e "$WORK/nginx-up/error.log"
wait_ready "http://127.0.0.1:$UP/1k" upstream "$LAST_PID"

# A proxyd config: server section, plus whatever the scenario appends.
proxyd_head() { # dir
    mkdir -p "$1"
    rm -rf "$1/state"
    cat <<EOF
[server]
state_dir = "$1/state"
mgmt_socket = "$1/state/mgmt.sock"
admin_listen = ""
log_level = "warn"

[telemetry]
access_log = "off"

[[pools]]
name = "static"
upstreams = ["127.0.0.1:$UP"]
EOF
}

haproxy_head() { # mode(tcp|http) maxconn
    cat <<EOF
global
    nbthread 2
    maxconn $2

defaults
    mode $1
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
EOF
}

declare -a REPORT

# Prints "req/s MiB/s errors cpu_us": cpu_us is the CPU time (user + system) of the process
# CPU_PID and its children per request over the measured run (0 without CPU_PID).
run_wrk() { # url connections out [wrk options...]
    local url=$1 conns=$2 out=$3 ticks0=0 ticks1=0
    shift 3
    wrk -t"$THREADS" -c"$conns" -d1s "$@" "$url" >/dev/null 2>&1 || true
    [ -n "${CPU_PID:-}" ] && ticks0=$(cpu_ticks "$CPU_PID")
    wrk -t"$THREADS" -c"$conns" -d"$DURATION" "$@" "$url" >"$out" 2>&1 || true
    [ -n "${CPU_PID:-}" ] && ticks1=$(cpu_ticks "$CPU_PID")
    awk -v ticks=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" "$WRK_FIGURES"'
        END { printf "%.0f %.1f %d %.1f\n", rps, mbs, err, (n > 0) ? ticks * 1e6 / hz / n : 0 }
    ' "$out"
}

# --- tcp --------------------------------------------------------------------------------------
scenario_tcp() {
    local round name port pid rps mbs err cpu
    declare -A TPUT RATE CPU ERRS
    for round in $(seq "$ROUNDS"); do
        for name in $(in_turn "$round" proxyd haproxy haproxy-splice); do
            port=$(free_port)
            if [ "$name" = proxyd ]; then
                {
                    proxyd_head "$WORK/proxyd-tcp"
                    cat <<EOF

[[listeners]]
name = "tcp"
protocol = "tcp"
address = "127.0.0.1:$port"

[[tcp_routes]]
name = "all"
listener = "tcp"
pool = "static"
EOF
                } >"$WORK/proxyd-tcp.toml"
                start proxyd-tcp "$PROXYD" --config "$WORK/proxyd-tcp.toml"
            else
                {
                    haproxy_head tcp 4096
                    # HAProxy splices only when told to; splice-auto uses it where it guesses a
                    # large transfer (a direction that filled its buffer).
                    if [ "$name" = haproxy-splice ]; then echo "    option splice-auto"; fi
                    cat <<EOF

frontend f
    bind 127.0.0.1:$port
    default_backend b

backend b
    server up 127.0.0.1:$UP
EOF
                } >"$WORK/$name-tcp.cfg"
                start "$name-tcp" haproxy -db -f "$WORK/$name-tcp.cfg"
            fi
            pid=$LAST_PID
            wait_ready "http://127.0.0.1:$port/1k" "$name" "$pid"
            say "tcp: round $round/$ROUNDS: $name, 64 MiB transfers (load average $(cut -d' ' -f1-3 /proc/loadavg))"
            read -r _ mbs err _ < <(run_wrk "http://127.0.0.1:$port/big" 4 "$WORK/tcp-$name-big.txt")
            TPUT[$name,$round]=$mbs
            ERRS[$name]=$((${ERRS[$name]:-0} + err))
            say "tcp: round $round/$ROUNDS: $name, a new connection per request"
            read -r rps _ err cpu < <(CPU_PID=$pid run_wrk "http://127.0.0.1:$port/1k" "$CONNECTIONS" "$WORK/tcp-$name-close.txt" -H 'Connection: close')
            RATE[$name,$round]=$rps
            CPU[$name,$round]=$cpu
            ERRS[$name]=$((ERRS[$name] + err))
            stop "$pid"
        done
    done
    REPORT+=("" "### TCP forwarding (proxyd \`tcp\` listener vs HAProxy \`mode tcp\`, without and with \`option splice-auto\`)" ""
        "| | proxyd / better HAProxy (rounds) | proxyd | HAProxy | HAProxy splice-auto |" "|---|---:|---:|---:|---:|"
        "| large transfers, MiB/s (4 connections, 64 MiB each) | $(round_ratio TPUT proxyd haproxy haproxy-splice) | $(round_median TPUT proxyd %.1f) | $(round_median TPUT haproxy %.1f) | $(round_median TPUT haproxy-splice %.1f) |"
        "| connections/s (new connection per 1 KiB request, $CONNECTIONS at once) | $(round_ratio RATE proxyd haproxy haproxy-splice) | $(round_median RATE proxyd %.0f) | $(round_median RATE haproxy %.0f) | $(round_median RATE haproxy-splice %.0f) |"
        "| CPU µs per connection, the proxy's processes (lower is better) | $(round_ratio -l CPU proxyd haproxy haproxy-splice) | $(round_median CPU proxyd %.1f) | $(round_median CPU haproxy %.1f) | $(round_median CPU haproxy-splice %.1f) |"
        "| errors (all rounds) | | ${ERRS[proxyd]} | ${ERRS[haproxy]} | ${ERRS[haproxy-splice]} |")
    goal "$GOALS" "TCP large transfers: MiB/s" higher TPUT proxyd haproxy haproxy-splice
    goal "$GOALS" "TCP new connection per 1 KiB request: connections/s" higher RATE proxyd haproxy haproxy-splice
}

# --- h2 ---------------------------------------------------------------------------------------
scenario_h2() {
    local round name port tport pid kind url out rps failed ticks0 ticks1
    declare -A H2 H2CPU FAILED
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    chmod 644 "$WORK/key.pem" "$WORK/cert.pem"
    for round in $(seq "$ROUNDS"); do
        for name in $(in_turn "$round" proxyd nginx); do
            port=$(free_port)
            tport=$(free_port)
            if [ "$name" = proxyd ]; then
                {
                    proxyd_head "$WORK/proxyd-h2"
                    cat <<EOF

[[listeners]]
name = "h2c"
protocol = "http"
address = "127.0.0.1:$port"

[[listeners]]
name = "h2"
protocol = "https"
address = "127.0.0.1:$tport"

[[routes]]
name = "plain"
listener = "h2c"
pool = "static"

[[routes]]
name = "tls"
listener = "h2"
pool = "static"

[[tls.certificates]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
EOF
                } >"$WORK/proxyd-h2.toml"
                start proxyd-h2 "$PROXYD" --config "$WORK/proxyd-h2.toml"
            else
                mkdir -p "$WORK/nginx-h2"
                {
                    nginx_head "$WORK/nginx-h2"
                    cat <<EOF
http {
$(nginx_http_head "$WORK/nginx-h2")
    upstream static {
        server 127.0.0.1:$UP;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port http2 backlog=4096;
        listen 127.0.0.1:$tport ssl http2 backlog=4096;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.3;
        http2_max_requests 1000000;
        location / {
            proxy_pass http://static;
$(nginx_forwarding)
        }
    }
}
EOF
                } >"$WORK/nginx-h2/nginx.conf"
                start nginx-h2 nginx -p "$WORK/nginx-h2" -c "$WORK/nginx-h2/nginx.conf" -e "$WORK/nginx-h2/error.log"
            fi
            pid=$LAST_PID
            wait_ready "https://127.0.0.1:$tport/1k" "$name" "$pid" -k
            for kind in h2c h2; do
                if [ "$kind" = h2c ]; then url="http://127.0.0.1:$port/1k"; else url="https://127.0.0.1:$tport/1k"; fi
                say "h2: round $round/$ROUNDS: $name, $kind"
                out="$WORK/h2-$name-$kind.txt"
                h2load -c16 -m10 -t"$THREADS" -D 1 "$url" >/dev/null 2>&1 || true
                ticks0=$(cpu_ticks "$pid")
                h2load -c16 -m10 -t"$THREADS" -D "$SECS" "$url" >"$out" 2>&1 || true
                ticks1=$(cpu_ticks "$pid")
                # "finished in 10.00s, 27012.30 req/s, ..."; failed requests count as lost.
                rps=$(awk '/^finished in/ { gsub(",", ""); print $4 }' "$out")
                H2[$name-$kind,$round]=${rps:-0}
                # "requests: 270123 total, 270123 started, 270123 done, 270123 succeeded, ..."
                H2CPU[$name-$kind,$round]=$(awk -v ticks=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" '
                    /^requests:/ { n = $2 } END { printf "%.1f", (n > 0) ? ticks * 1e6 / hz / n : 0 }' "$out")
                failed=$(awk '/^requests:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^failed/) print $i }' "$out")
                # No "requests:" line (h2load could not run) counts as a failure too.
                FAILED[$name-$kind]=$((${FAILED[$name-$kind]:-0} + ${failed:-1}))
            done
            stop "$pid"
        done
    done
    REPORT+=("" "### HTTP/2 from clients (h2load -c16 -m10, 1 KiB, HTTP/1.1 upstream)" ""
        "| | proxyd / nginx (rounds) | proxyd req/s | nginx req/s | CPU µs per request, proxyd / nginx (rounds) | proxyd | nginx | failed, all rounds (proxyd / nginx) |" "|---|---:|---:|---:|---:|---:|---:|---|")
    for kind in h2c h2; do
        goal "$GOALS" "HTTP/2 from clients, $kind$([ "$kind" = h2 ] && echo ' (TLS 1.3)'): req/s" higher H2 "proxyd-$kind" "nginx-$kind"
        REPORT+=("| $kind$([ "$kind" = h2 ] && echo ' (TLS 1.3)') | $(round_ratio H2 "proxyd-$kind" "nginx-$kind") | $(round_median H2 "proxyd-$kind" %.0f) | $(round_median H2 "nginx-$kind" %.0f) | $(round_ratio H2CPU "proxyd-$kind" "nginx-$kind") | $(round_median H2CPU "proxyd-$kind" %.1f) | $(round_median H2CPU "nginx-$kind" %.1f) | ${FAILED[proxyd-$kind]} / ${FAILED[nginx-$kind]} |")
    done
}

# --- idle -------------------------------------------------------------------------------------
# idle.py PORT N: opens N connections, each sends one GET /1k and reads the whole answer,
# then prints "ready K" (K = connections that got their answer) and holds them until its
# stdin closes.
cat >"$WORK/idle.py" <<'EOF'
import asyncio, sys

async def one(port, held):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    held.append(writer)

async def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    held = []
    gate = asyncio.Semaphore(256)
    async def paced():
        async with gate:
            try:
                await one(port, held)
            except OSError:
                pass
    await asyncio.gather(*(paced() for _ in range(n)))
    print("ready", len(held), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
EOF

scenario_idle() {
    local name port pid before after later held round rss_before
    declare -A AT2 AT20 TOTAL GOT ANON
    for round in $(seq "$ROUNDS"); do
        for name in $(in_turn "$round" proxyd nginx haproxy); do
            port=$(free_port)
            case $name in
            proxyd)
                {
                    proxyd_head "$WORK/proxyd-idle"
                    cat <<EOF

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:$port"
max_connections = 20000
idle_timeout = "300s"
# A keep-alive connection gets header_timeout (10 s by default) for its next request: held
# longer than that (slow client start, many connections), some would be closed before RSS
# is read, and the figure would be too low. nginx keeps them 75 s.
header_timeout = "300s"

[[routes]]
name = "all"
listener = "web"
pool = "static"
EOF
                } >"$WORK/proxyd-idle.toml"
                start proxyd-idle "$PROXYD" --config "$WORK/proxyd-idle.toml"
                ;;
            nginx)
                mkdir -p "$WORK/nginx-idle"
                {
                    nginx_head "$WORK/nginx-idle"
                    cat <<EOF
http {
$(nginx_http_head "$WORK/nginx-idle")
    upstream static {
        server 127.0.0.1:$UP;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://static;
$(nginx_forwarding)
        }
    }
}
EOF
                } >"$WORK/nginx-idle/nginx.conf"
                start nginx-idle nginx -p "$WORK/nginx-idle" -c "$WORK/nginx-idle/nginx.conf" -e "$WORK/nginx-idle/error.log"
                ;;
            haproxy)
                {
                    haproxy_head http $((IDLE + 100))
                    cat <<EOF

frontend f
    bind 127.0.0.1:$port
    default_backend b

backend b
$(haproxy_forwarding)
    server up 127.0.0.1:$UP
EOF
                } >"$WORK/haproxy-idle.cfg"
                start haproxy-idle haproxy -db -f "$WORK/haproxy-idle.cfg"
                ;;
            esac
            pid=$LAST_PID
            wait_ready "http://127.0.0.1:$port/1k" "$name" "$pid"
            # Warm: pools, allocator arenas, per-thread caches.
            wrk -t"$THREADS" -c"$CONNECTIONS" -d1s "http://127.0.0.1:$port/1k" >/dev/null 2>&1 || true
            sleep 1
            before=$(anon_kib "$pid")
            rss_before=$(rss_kib "$pid")
            say "idle: round $round/$ROUNDS: $name, $IDLE connections"
            coproc IDLER { python3 "$WORK/idle.py" "$port" "$IDLE"; }
            read -r _ held <&"${IDLER[0]}"
            # Read twice: memory moves after the connections went idle (the allocator returns
            # freed pages after a delay; with transparent huge pages the kernel also merges
            # pages some seconds later), so one early reading depends on when it is taken.
            sleep 2
            after=$(anon_kib "$pid")
            sleep 18
            later=$(anon_kib "$pid")
            eval "exec ${IDLER[1]}>&-"
            wait "$IDLER_PID" 2>/dev/null || true
            # A round in which the client could not hold every connection says so in the table.
            GOT[$name]="${GOT[$name]:+${GOT[$name]} / }$held"
            AT2[$name,$round]=$(per_connection "$after" "$before" "$held")
            AT20[$name,$round]=$(per_connection "$later" "$before" "$held")
            TOTAL[$name,$round]=$(per_connection "$(rss_kib "$pid")" "$rss_before" "$held")
            ANON[$name]="$((before / 1024)) -> $((later / 1024))"
            stop "$pid"
        done
    done
    REPORT+=("" "### Memory per idle keep-alive client connection ($IDLE connections, one request each, then idle; $ROUNDS rounds)" ""
        "Growth of anonymous resident memory (RssAnon: the heap and stacks; not the binary's code and libraries, which are file pages shared with the page cache) per connection, read 2 s and 20 s after the last connection got its answer; the median of the rounds, and each round's own ratio (median, lowest-highest). Lower is better. The last column is the growth of the whole RSS (file pages included) at 20 s, for reference." ""
        "| | KiB per connection at 2 s | at 20 s | proxyd / peer at 20 s (rounds) | anonymous memory before -> at 20 s (MiB, last round) | connections held (each round) | whole RSS, KiB per connection at 20 s |" "|---|---:|---:|---:|---|---|---:|")
    for name in proxyd nginx haproxy; do
        REPORT+=("| $name | $(round_median AT2 "$name" %.2f) | $(round_median AT20 "$name" %.2f) | $( [ "$name" = proxyd ] && echo "" || round_ratio AT20 proxyd "$name") | ${ANON[$name]} | ${GOT[$name]} | $(round_median TOTAL "$name" %.2f) |")
    done
    goal "$GOALS" "memory per idle keep-alive connection, at 20 s" lower AT20 proxyd nginx
}

# --- routes -----------------------------------------------------------------------------------
scenario_routes() {
    local round n port pid rps err
    declare -A RPS AGAIN ERRS LOAD RSS
    for round in $(seq "$ROUNDS"); do
        for n in $(in_turn "$round" 10 "$MANY_ROUTES"); do
            port=$(free_port)
            {
                proxyd_head "$WORK/proxyd-routes"
                cat <<EOF

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:$port"
EOF
                awk -v n="$n" 'BEGIN {
                    for (i = 0; i < n; i++)
                        printf "\n[[routes]]\nname = \"r%d\"\nlistener = \"web\"\npath_prefix = \"/r%d/\"\nstrip_prefix = true\npool = \"static\"\n", i, i
                }'
            } >"$WORK/proxyd-routes.toml"
            cat >"$WORK/spread.lua" <<EOF
math.randomseed(7)
request = function()
    return wrk.format("GET", "/r" .. math.random(0, $((n - 1))) .. "/1k")
end
EOF
            local t0=$SECONDS
            start proxyd-routes "$PROXYD" --config "$WORK/proxyd-routes.toml"
            pid=$LAST_PID
            wait_ready "http://127.0.0.1:$port/r0/1k" "proxyd" "$pid"
            LOAD[$n,$round]=$((SECONDS - t0))
            say "routes: round $round/$ROUNDS: proxyd with $n routes"
            read -r rps _ err _ < <(run_wrk "http://127.0.0.1:$port/" "$CONNECTIONS" "$WORK/routes-$n.txt" -s "$WORK/spread.lua")
            RPS[$n,$round]=$rps
            ERRS[$n]=$((${ERRS[$n]:-0} + err))
            read -r rps _ err _ < <(run_wrk "http://127.0.0.1:$port/" "$CONNECTIONS" "$WORK/routes-$n-again.txt" -s "$WORK/spread.lua")
            AGAIN[$n,$round]=$rps
            ERRS[$n]=$((ERRS[$n] + err))
            RSS[$n,$round]=$(($(rss_kib "$pid") / 1024))
            stop "$pid"
        done
    done
    REPORT+=("" "### proxyd with 10 and with $MANY_ROUTES routes (wrk spreads requests over every route)" ""
        "| routes | req/s | req/s, the same load again (nearly every route served before) | errors (all rounds) | RSS (MiB) | start until first answer |" "|---:|---:|---:|---:|---:|---:|")
    for n in 10 "$MANY_ROUTES"; do
        REPORT+=("| $n | $(round_median RPS "$n" %.0f) | $(round_median AGAIN "$n" %.0f) | ${ERRS[$n]} | $(round_median RSS "$n" %.0f) | $(round_median LOAD "$n" %.0f) s |")
    done
    goal "$GOALS" "$MANY_ROUTES routes against 10: req/s" higher RPS "$MANY_ROUTES" 10
    goal "$GOALS" "$MANY_ROUTES routes against 10, the same load again: req/s" higher AGAIN "$MANY_ROUTES" 10
    REPORT+=("" "req/s with $MANY_ROUTES routes / with 10, each round's own ratio: **$(round_ratio RPS "$MANY_ROUTES" 10)**; the same load again: **$(round_ratio AGAIN "$MANY_ROUTES" 10)**")
}

# --- grpc -------------------------------------------------------------------------------------
# One unary call's answer through URL as curl sees it: "HTTP-status grpc-status" (the
# grpc-status from the head or the trailers).
grpc_probe() { # url token
    curl -sS --http2-prior-knowledge --max-time 5 -o /dev/null -D - -X POST \
        -H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $2" \
        --data-binary @"$WORK/health-check.bin" "$1" 2>/dev/null | tr -d '\r' |
        awk '/^HTTP\// { status = $2 } tolower($1) == "grpc-status:" { grpc = $2 } END { print status, grpc }'
}

scenario_grpc() {
    local round name port pid out rps probe url gport upid failed
    local token=bench-token-0123456789
    declare -A RPS FAILED
    # An empty HealthCheckRequest as a gRPC message: not compressed, length 0.
    printf '\0\0\0\0\0' >"$WORK/health-check.bin"
    printf '%s\n' "$token" >"$WORK/mgmt-token"
    gport=$(free_port)
    mkdir -p "$WORK/grpc-up"
    cat >"$WORK/grpc-up.toml" <<EOF
[server]
state_dir = "$WORK/grpc-up/state"
mgmt_socket = "$WORK/grpc-up/state/mgmt.sock"
mgmt_listen = "127.0.0.1:$gport"
mgmt_token_file = "$WORK/mgmt-token"
admin_listen = ""
log_level = "warn"

[telemetry]
access_log = "off"
EOF
    start grpc-upstream "$PROXYD" --config "$WORK/grpc-up.toml"
    upid=$LAST_PID
    for _ in $(seq 100); do
        [ "$(grpc_probe "http://127.0.0.1:$gport/grpc.health.v1.Health/Check" "$token")" = "200 0" ] && break
        kill -0 "$upid" 2>/dev/null || { say "the gRPC upstream exited:"; cat "$WORK/grpc-upstream.log" >&2; exit 1; }
        sleep 0.1
    done
    for round in $(seq "$ROUNDS"); do
        for name in $(in_turn "$round" proxyd nginx); do
            port=$(free_port)
            if [ "$name" = proxyd ]; then
                {
                    proxyd_head "$WORK/proxyd-grpc"
                    cat <<EOF

[[pools]]
name = "grpc"
protocol = "h2c"
upstreams = ["127.0.0.1:$gport"]

[[listeners]]
name = "h2c"
protocol = "http"
address = "127.0.0.1:$port"

[[routes]]
name = "grpc"
listener = "h2c"
pool = "grpc"
EOF
                } >"$WORK/proxyd-grpc.toml"
                start proxyd-grpc "$PROXYD" --config "$WORK/proxyd-grpc.toml"
            else
                mkdir -p "$WORK/nginx-grpc"
                {
                    nginx_head "$WORK/nginx-grpc"
                    cat <<EOF
http {
$(nginx_http_head "$WORK/nginx-grpc")
    upstream grpc_up {
        server 127.0.0.1:$gport;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port http2 backlog=4096;
        http2_max_requests 1000000;
        location / { grpc_pass grpc://grpc_up; }
    }
}
EOF
                } >"$WORK/nginx-grpc/nginx.conf"
                start nginx-grpc nginx -p "$WORK/nginx-grpc" -c "$WORK/nginx-grpc/nginx.conf" -e "$WORK/nginx-grpc/error.log"
            fi
            pid=$LAST_PID
            url="http://127.0.0.1:$port/grpc.health.v1.Health/Check"
            probe=""
            for _ in $(seq 100); do
                probe=$(grpc_probe "$url" "$token")
                [ "$probe" = "200 0" ] && break
                kill -0 "$pid" 2>/dev/null || { say "$name exited during start-up:"; cat "$WORK/$name-grpc.log" >&2; exit 1; }
                sleep 0.1
            done
            [ "$probe" = "200 0" ] || { say "grpc: $name does not answer the call with grpc-status 0 (got: $probe)"; exit 1; }
            say "grpc: round $round/$ROUNDS: $name, unary calls"
            out="$WORK/grpc-$name.txt"
            local h2args=(-c16 -m10 -t"$THREADS" -d "$WORK/health-check.bin" -H 'content-type: application/grpc'
                -H 'te: trailers' -H "authorization: Bearer $token")
            h2load "${h2args[@]}" -D 1 "$url" >/dev/null 2>&1 || true
            h2load "${h2args[@]}" -D "$SECS" "$url" >"$out" 2>&1 || true
            rps=$(awk '/^finished in/ { gsub(",", ""); print $4 }' "$out")
            RPS[$name,$round]=${rps:-0}
            failed=$(awk '/^requests:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^failed/) print $i }' "$out")
            FAILED[$name]=$((${FAILED[$name]:-0} + ${failed:-1}))
            # h2load counts a 200 as a success even when its trailers carry an error: one more
            # call after the load must still say grpc-status 0.
            probe=$(grpc_probe "$url" "$token")
            [ "$probe" = "200 0" ] || FAILED[$name,after]="${FAILED[$name,after]:-} (after the load in round $round: $probe)"
            stop "$pid"
        done
    done
    stop "$upid"
    REPORT+=("" "### gRPC unary calls (h2load -c16 -m10, grpc.health.v1.Health/Check answered by tonic)" ""
        "| | proxyd / nginx (rounds) | proxyd (h2c pool) calls/s | nginx (grpc_pass) calls/s | failed, all rounds (proxyd / nginx) |" "|---|---:|---:|---:|---|"
        "| unary | $(round_ratio RPS proxyd nginx) | $(round_median RPS proxyd %.0f) | $(round_median RPS nginx %.0f) | ${FAILED[proxyd]}${FAILED[proxyd,after]:-} / ${FAILED[nginx]}${FAILED[nginx,after]:-} |")
}

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in "${SCENARIOS[@]}"; do "scenario_$s"; done

mkdir -p "$OUT"
{
    echo "## bench/scenarios.sh ($(date -u +%Y-%m-%d), $(nproc) cores, proxyd ${PROXYD_LABEL:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')})"
    echo
    echo "wrk -t$THREADS, $DURATION per run after a 1 s warm-up; every proxy alone on the machine with its access log off; tcp, h2, idle, routes and grpc: median of $ROUNDS rounds (ratios: the median of each round's own ratio, lowest-highest in brackets); load average at the start $LOAD_AT_START, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
    printf '%s\n' "${REPORT[@]}"
} | tee "$OUT/results-scenarios.md"
