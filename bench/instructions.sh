#!/usr/bin/env bash
# Instructions per proxied request (user space, counted by valgrind's callgrind) of proxyd
# and nginx, each in front of the same upstream (nginx serving a 1 KiB file), for:
#
#   h1      HTTP/1.1 keep-alive, plain           (h2load --h1 -c8)
#   h1new   HTTP/1.1, a new connection per request, plain (h2load --h1 -c50 -n50, run
#           until the count is reached): the accept path, the connection's setup and
#           teardown, and one request; counted per connection+request
#   h1tls   HTTP/1.1 keep-alive over TLS 1.3     (h2load --h1 -c8, ECDSA P-256 certificate)
#   h2c     HTTP/2 prior knowledge, plain        (h2load -c8 -m10)
#   h2      HTTP/2 over TLS 1.3 (ALPN h2)        (h2load -c8 -m10)
#   tlsfull a full TLS 1.3 handshake per connection, no request (openssl s_time -new, one
#           connection at a time, for BENCH_HANDSHAKE_SECONDS): counted per handshake
#   tcpnew  TCP forwarding, a new connection per small exchange: h2load --h1 -c50 -n50 (as
#           h1new) through a `tcp` listener, so each connection is accepted, a new upstream
#           connection opened, one request and its 1 KiB answer forwarded both ways and
#           both connections closed; counted per connection. The peer here is HAProxy
#           (`mode tcp`, one thread), not nginx (Debian's nginx-light has no stream module)
#
# Under valgrind the CPU lacks ADX, so X25519 runs ring's and OpenSSL's generic code rather
# than their ADX code: the tlsfull counts overstate the key exchange for both alike.
#
# Unlike req/s or CPU time, an instruction count does not depend on what else the machine
# is doing, so two binaries can be compared on a busy machine, and a change to the request
# path can be measured on its own. It counts user-space work only (the system calls are
# the same for both: see the notes in bench/results/profile-h2-tls.md) and weighs every
# instruction alike (a cache miss or a divide costs one). Each proxy runs under callgrind
# with one worker (proxyd `workers = 1`, nginx one worker process); after a warm-up of
# 500 requests per scenario the counters are zeroed, N requests are made, and the count is
# read. Heap allocations per request (calls to malloc, realloc and friends, whichever
# allocator is in use) are counted from the same profile. Loopback only; stops by itself;
# about 2 minutes.
#
# Usage: bench/instructions.sh            (proxyd, nginx and HAProxy)
#        bench/instructions.sh h2c tlsfull (only these scenarios)
# Env:   BENCH_REQUESTS=3000   BENCH_HANDSHAKE_SECONDS=20   PROXYD=/path/to/proxyd (skip the build)
#        BENCH_ACCESS_LOG=on  proxyd writes its JSON access lines (stdout, to a file) and
#                             nginx its `combined` lines to a file; off by default. The
#                             count includes proxyd's writer thread.
#        CARGO_TARGET_DIR (default /var/tmp/proxy-target)
#        BENCH_PROFILE_DIR=/dir  keep each scenario's callgrind dump there as NAME.SCENARIO
#                                (read with callgrind_annotate --inclusive=yes FILE)
#        BENCH_CACHE_SIM=on  also simulate the caches (callgrind --cache-sim=yes, about twice
#                            as slow) and report first-level instruction and data cache
#                            misses per request beside the instructions: a move into
#                            memory no recent request touched costs misses an
#                            instruction count does not show
set -euo pipefail

REQUESTS=${BENCH_REQUESTS:-3000}
case ${BENCH_ACCESS_LOG:-off} in
    on) PROXYD_LOG=json ;;
    off) PROXYD_LOG=off ;;
    *) echo "BENCH_ACCESS_LOG is on or off, not ${BENCH_ACCESS_LOG}" >&2; exit 2 ;;
esac
HANDSHAKE_SECONDS=${BENCH_HANDSHAKE_SECONDS:-20}
case ${BENCH_CACHE_SIM:-off} in
    on) CALLGRIND=(valgrind --tool=callgrind --cache-sim=yes) ;;
    off) CALLGRIND=(valgrind --tool=callgrind) ;;
    *) echo "BENCH_CACHE_SIM is on or off, not ${BENCH_CACHE_SIM}" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

need_tools valgrind:valgrind h2load:nghttp2-client nginx:nginx-light curl:curl openssl:openssl haproxy:haproxy
build_proxyd
make_workdir proxy-instructions

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 644 "$WORK/key.pem" "$WORK/cert.pem"
mkdir -p "$WORK/www"
head -c 1024 /dev/zero | tr '\0' x >"$WORK/www/1k"
chmod -R 755 "$WORK/www"

temp_paths() { printf 'client_body_temp_path %s/b; proxy_temp_path %s/p; fastcgi_temp_path %s/f; uwsgi_temp_path %s/u; scgi_temp_path %s/s;\n' "$1" "$1" "$1" "$1" "$1"; }

# --- upstream (not measured) ------------------------------------------------------------------
UP=$(free_port)
mkdir -p "$WORK/up"
cat >"$WORK/up/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $WORK/up/nginx.pid; error_log $WORK/up/error.log warn;
events { worker_connections 4096; }
http { access_log off; $(temp_paths "$WORK/up") keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP backlog=4096; location / { root $WORK/www; } } }
EOF
start upstream nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log"
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$UP/1k" && break; sleep 0.1; done

# --- the proxies, each started under callgrind ---------------------------------------------
# Sets PLAIN (h1 and h2c), SECURE (h1 and h2 over TLS) and TCP (tcpnew) to the proxy's
# ports, and READY to a URL that answers once the proxy serves.
start_proxyd() {
    PLAIN=$(free_port)
    SECURE=$(free_port)
    TCP=$(free_port)
    READY="https://127.0.0.1:$SECURE/1k"
    mkdir -p "$WORK/proxyd"
    cat >"$WORK/proxyd/proxyd.toml" <<EOF
[server]
state_dir = "$WORK/proxyd/state"
mgmt_socket = "$WORK/proxyd/state/mgmt.sock"
admin_listen = ""
log_level = "warn"
workers = 1

[telemetry]
access_log = "$PROXYD_LOG"

[[pools]]
name = "static"
upstreams = ["127.0.0.1:$UP"]

[[listeners]]
name = "plain"
protocol = "http"
address = "127.0.0.1:$PLAIN"

[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:$SECURE"

[[listeners]]
name = "tcp"
protocol = "tcp"
address = "127.0.0.1:$TCP"

[[tcp_routes]]
name = "tcp"
listener = "tcp"
pool = "static"

[[routes]]
name = "plain"
listener = "plain"
pool = "static"

[[routes]]
name = "secure"
listener = "secure"
pool = "static"

[[tls.certificates]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
EOF
    start proxyd "${CALLGRIND[@]}" --callgrind-out-file="$WORK/proxyd/callgrind.%p" \
        "$PROXYD" --config "$WORK/proxyd/proxyd.toml"
}
start_nginx() {
    PLAIN=$(free_port)
    SECURE=$(free_port)
    local h2c
    h2c=$(free_port)
    H2C=$h2c
    READY="https://127.0.0.1:$SECURE/1k"
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1; master_process off; daemon off;
pid $WORK/nginx/nginx.pid; error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log $( [ "$PROXYD_LOG" = json ] && echo "$WORK/nginx/access.log" || echo off ); $(temp_paths "$WORK/nginx")
    keepalive_requests 1000000;
    ssl_protocols TLSv1.3;
    upstream static { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$PLAIN backlog=4096;
        listen 127.0.0.1:$h2c http2 backlog=4096;
        listen 127.0.0.1:$SECURE ssl http2 backlog=4096;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        http2_max_requests 1000000;
        location / {
            proxy_pass http://static;
$(nginx_forwarding)
        }
    }
}
EOF
    start nginx "${CALLGRIND[@]}" --callgrind-out-file="$WORK/nginx/callgrind.%p" \
        nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"
}

# HAProxy forwards TCP only (tcpnew): one thread, `mode tcp`, no splicing (a 1 KiB answer
# is below what splice-auto would splice), logs off.
start_haproxy() {
    TCP=$(free_port)
    READY="http://127.0.0.1:$TCP/1k"
    mkdir -p "$WORK/haproxy"
    cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend f
    bind 127.0.0.1:$TCP
    default_backend b

backend b
    server up 127.0.0.1:$UP
EOF
    start haproxy "${CALLGRIND[@]}" --callgrind-out-file="$WORK/haproxy/callgrind.%p" \
        haproxy -db -f "$WORK/haproxy/haproxy.cfg"
}

# Whether a proxy takes part in a scenario: proxyd in all, HAProxy in tcpnew only, nginx
# in all but tcpnew.
serves() { # name scenario
    case $1,$2 in
        proxyd,* | haproxy,tcpnew) return 0 ;;
        haproxy,* | nginx,tcpnew) return 1 ;;
        *) return 0 ;;
    esac
}

# The proxy a scenario compares proxyd with.
peer() { # scenario
    case $1 in tcpnew) echo haproxy ;; *) echo nginx ;; esac
}

# One request per connection to URL, in batches of 50: h2load opens each connection once,
# so as many requests as connections make one request per connection; batches keep the
# backlog short.
one_per_connection() { # requests url
    local left=$1 ok=0 n got
    while [ "$left" -gt 0 ]; do
        n=$((left < 50 ? left : 50))
        got=$(h2load --h1 -n "$n" -c "$n" -t1 "$2" 2>&1 | completed || true)
        ok=$((ok + ${got:-0}))
        left=$((left - n))
    done
    echo "requests: $1 total, $1 started, $1 done, $ok succeeded"
}

load() { # scenario requests
    case $1 in
        h1) h2load --h1 -n "$2" -c8 -t1 "http://127.0.0.1:$PLAIN/1k" ;;
        h1tls) h2load --h1 -n "$2" -c8 -t1 "https://127.0.0.1:$SECURE/1k" ;;
        h1new) one_per_connection "$2" "http://127.0.0.1:$PLAIN/1k" ;;
        tcpnew) one_per_connection "$2" "http://127.0.0.1:$TCP/1k" ;;
        # nginx 1.22 serves h2c on a listener of its own; proxyd on its HTTP listener.
        h2c) h2load -n "$2" -c8 -m10 -t1 "http://127.0.0.1:${H2C:-$PLAIN}/1k" ;;
        h2) h2load -n "$2" -c8 -m10 -t1 "https://127.0.0.1:$SECURE/1k" ;;
        # A fixed time rather than a count: s_time has no count option.
        tlsfull)
            local seconds=$HANDSHAKE_SECONDS
            [ "$2" -gt 500 ] || seconds=3
            openssl s_time -connect "127.0.0.1:$SECURE" -new -time "$seconds"
            ;;
    esac
}

# heap_allocations DUMP  prints how many calls the dump counts to the C allocation entry
# points (glibc's, and mimalloc's when it is the global allocator): allocations and
# reallocations, whatever the allocator underneath. Function names are compressed in a
# callgrind file ("(id) name" the first time, "(id)" after), so ids are resolved first.
heap_allocations() {
    awk '
        function resolve(spec,    id, rest) {
            if (match(spec, /^\([0-9]+\)/)) {
                id = substr(spec, RSTART, RLENGTH)
                rest = substr(spec, RLENGTH + 2)
                if (rest != "") name[id] = rest
                return name[id]
            }
            return spec
        }
        /^fn=/ { resolve(substr($0, 4)); next }
        /^cfn=/ { callee = resolve(substr($0, 5)); next }
        /^calls=/ {
            if (callee ~ /^(malloc|calloc|realloc|posix_memalign|aligned_alloc|memalign|mi_malloc|mi_zalloc|mi_realloc|mi_malloc_aligned|mi_zalloc_aligned|mi_realloc_aligned)$/) {
                split(substr($0, 7), c, " ")
                total += c[1]
            }
        }
        END { print total + 0 }' "$1"
}

# What `load` reports as done: h2load's succeeded requests, s_time's connections.
completed() {
    awk '/^requests:/ {print $8; exit} / connections in [0-9.]+s;/ {print $1; exit}'
}

declare -A IR ALLOC MISSES
SCENARIOS=(h1 h1new h1tls h2c h2 tlsfull tcpnew)
[ $# -eq 0 ] || SCENARIOS=("$@")
for s in "${SCENARIOS[@]}"; do
    case $s in
        h1 | h1new | h1tls | h2c | h2 | tlsfull | tcpnew) ;;
        *) say "unknown scenario $s (h1 h1new h1tls h2c h2 tlsfull tcpnew)"; exit 2 ;;
    esac
done
for name in proxyd nginx haproxy; do
    wanted=()
    for s in "${SCENARIOS[@]}"; do
        if serves "$name" "$s"; then wanted+=("$s"); fi
    done
    [ ${#wanted[@]} -gt 0 ] || continue
    H2C=""
    "start_$name"
    pid=$LAST_PID
    for _ in $(seq 600); do
        curl -skf -o /dev/null --max-time 5 "$READY" && break
        kill -0 "$pid" 2>/dev/null || { say "$name exited:"; cat "$WORK/$name.log" >&2; exit 1; }
        sleep 0.2
    done
    for s in "${wanted[@]}"; do
        say "instructions: $name, $s"
        load "$s" 500 >/dev/null 2>&1 || true
        callgrind_control --zero "$pid" >/dev/null 2>&1
        out=$(load "$s" "$REQUESTS" 2>&1 || true)
        ok=$(completed <<<"$out")
        callgrind_control --dump="$s" "$pid" >/dev/null 2>&1
        dump=""
        for _ in $(seq 50); do
            dump=$(grep -l "^desc: Trigger: dump $s\$" "$WORK/$name"/callgrind.* 2>/dev/null | head -1 || true)
            [ -n "$dump" ] && break
            sleep 0.2
        done
        ir=$(awk '/^summary:/ {print $2; exit}' "$dump" 2>/dev/null || true)
        # With the cache simulation the summary reads Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
        misses=$(awk '/^summary:/ && NF >= 10 {print $5, $6 + $7; exit}' "$dump" 2>/dev/null || true)
        if [ -n "${BENCH_PROFILE_DIR:-}" ] && [ -n "$dump" ]; then
            mkdir -p "$BENCH_PROFILE_DIR"
            cp "$dump" "$BENCH_PROFILE_DIR/$name.$s"
        fi
        allocs=$(heap_allocations "$dump")
        if [ -n "$ir" ] && [ "${ok:-0}" -gt 0 ]; then
            IR[$name,$s]=$((ir / ok))
            ALLOC[$name,$s]=$(awk -v a="$allocs" -v n="$ok" 'BEGIN { printf "%.1f", a / n }')
            say "  ${IR[$name,$s]} instructions, ${ALLOC[$name,$s]} allocations per request"
            if [ -n "$misses" ]; then
                MISSES[$name,$s]=$(awk -v m="$misses" -v n="$ok" 'BEGIN { split(m, x, " "); printf "%.0f/%.0f", x[1] / n, x[2] / n }')
                say "  ${MISSES[$name,$s]} first-level instruction/data cache misses per request"
            fi
        else
            IR[$name,$s]="?"
            ALLOC[$name,$s]="?"
            say "  $name $s: no count (requests succeeded: ${ok:-none})"
        fi
    done
    stop "$pid"
done

printf '%-7s %8s %14s %14s %12s %18s %16s' scenario peer "proxyd Ir/req" "peer Ir/req" "proxyd/peer" "proxyd allocs/req" "peer allocs/req"
[ "${BENCH_CACHE_SIM:-off}" = on ] && printf ' %20s %20s' "proxyd I1/D1 misses" "peer I1/D1 misses"
printf '\n'
# (h1new and tcpnew: per connection and its request; tlsfull: per handshake)
for s in "${SCENARIOS[@]}"; do
    p=$(peer "$s")
    ratio=$(awk -v a="${IR[proxyd,$s]}" -v b="${IR[$p,$s]}" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.2f", a / b; else print "n/a" }')
    printf '%-7s %8s %14s %14s %12s %18s %16s' "$s" "$p" "${IR[proxyd,$s]}" "${IR[$p,$s]}" "$ratio" "${ALLOC[proxyd,$s]}" "${ALLOC[$p,$s]}"
    [ "${BENCH_CACHE_SIM:-off}" = on ] && printf ' %20s %20s' "${MISSES[proxyd,$s]:-?}" "${MISSES[$p,$s]:-?}"
    printf '\n'
done
