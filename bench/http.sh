#!/usr/bin/env bash
# HTTP throughput and latency of proxyd against nginx, HAProxy and Caddy as reverse proxies.
#
# One static upstream (nginx serving a 1 KiB file) on 127.0.0.1; each proxy in turn in
# front of it on 127.0.0.1, alone, with keep-alive to the upstream; wrk against each proxy
# and against the upstream directly, once with keep-alive and once with a new connection
# per request; all of it twice: with every access log off, and with proxyd's, nginx's and
# HAProxy's access logs written to a file. Prints req/s, p50/p99 latency, peak RSS, CPU
# per request and the ratios proxyd/peer; writes results.tsv, results.md and a chart
# (results.svg, with gnuplot) to BENCH_OUT.
#
# On a small shared machine one run of a scenario moves by 10-20 %, so the whole set runs
# BENCH_ROUNDS times, the proxies taking turns within each round (proxyd, nginx and HAProxy
# each at the front of one round in three), and every figure reported is the median of its
# rounds (peak RSS: the highest); results.tsv keeps each round's line. CPU per request is
# reported whole and split into user space and kernel.
#
# Usage: bench/http.sh            (about 3 minutes per round; loopback only; stops by itself)
# Env:   BENCH_DURATION=10s  BENCH_THREADS=2  BENCH_CONNECTIONS=64  BENCH_ROUNDS=3
#        BENCH_LOGS="off on"     (access log scenarios to run)
#        BENCH_OUT=bench/results (where the table and chart go)
#        PROXYD=/path/to/proxyd  (skip the build and use this binary)
#        PROXYD_LABEL=...        (what to call that binary in the results; default: HEAD)
#        CARGO_TARGET_DIR        (default /var/tmp/proxy-target)
#        BENCH_RAW=dir           (keep every measured run's wrk output there, and how the
#                                 upstream's keep-alive connections from the proxy were
#                                 spread over the upstream's two workers halfway through
#                                 the run: upstream-spread.tsv; the kernel's TCP counters
#                                 that moved during the run, retransmissions, delayed
#                                 acknowledgements and the like: tcp-counters.tsv; the
#                                 proxy's time on a CPU and waiting for one, the time
#                                 the host took this machine's CPUs away (steal) and
#                                 left them idle, and the whole machine's memory stalls:
#                                 sched.tsv)
set -euo pipefail

DURATION=${BENCH_DURATION:-10s}
THREADS=${BENCH_THREADS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ROUNDS=${BENCH_ROUNDS:-3}
read -r -a LOGS <<<"${BENCH_LOGS:-off on}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -z "${BENCH_RAW:-}" ] || mkdir -p "$BENCH_RAW"
OUT=${BENCH_OUT:-$ROOT/bench/results}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/proxy-target}

# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

need_tools wrk:wrk nginx:nginx-light haproxy:haproxy caddy:caddy curl:curl gnuplot:gnuplot-nox
build_proxyd
make_workdir proxy-bench

# Peak RSS in MiB of a process and its children (nginx: master + workers).
peak_rss_mib() { # pid
    awk -v kb="$(family_sum "$1" status '/^VmHWM:/ { print $2 }')" 'BEGIN { printf "%.1f", kb / 1024 }'
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
# Each proxy writes its access log to a file in the log-on scenario: proxyd its JSON
# lines on stdout (redirected to a file by `start`), nginx its default `combined` format
# to access.log (unbuffered, like proxyd), HAProxy its `option httplog` line to stdout.
write_proxyd() { # port log(on|off)
    local format=off
    [ "$2" = on ] && format=json
    mkdir -p "$WORK/proxyd"
    rm -rf "$WORK/proxyd/state"
    cat >"$WORK/proxyd/proxyd.toml" <<EOF
[server]
state_dir = "$WORK/proxyd/state"
mgmt_socket = "$WORK/proxyd/state/mgmt.sock"
admin_listen = ""
log_level = "warn"

[telemetry]
access_log = "$format"

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

write_nginx() { # port log(on|off)
    local log=off
    [ "$2" = on ] && log="$WORK/nginx/access.log"
    mkdir -p "$WORK/nginx"
    {
        nginx_common "$WORK/nginx"
        cat <<EOF
http {
    access_log $log;
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
$(nginx_forwarding)
        }
    }
}
EOF
    } >"$WORK/nginx/nginx.conf"
}

write_haproxy() { # port log(on|off)
    local global_log="" defaults_log=""
    if [ "$2" = on ]; then
        global_log="    log stdout format raw local0 info"
        defaults_log=$'    log global\n    option httplog'
    fi
    mkdir -p "$WORK/haproxy"
    cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 4096
$global_log

defaults
    mode http
$defaults_log
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend web
    bind 127.0.0.1:$1
    default_backend static

backend static
$(haproxy_forwarding)
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
$(caddy_forwarding)
    }
}
EOF
}

start_proxy() { # name port log(on|off)
    case $1 in
    proxyd)
        write_proxyd "$2" "$3"
        start proxyd "$PROXYD" --config "$WORK/proxyd/proxyd.toml"
        ;;
    nginx)
        write_nginx "$2" "$3"
        start nginx nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"
        ;;
    haproxy)
        write_haproxy "$2" "$3"
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
# CPU time in user space and in the kernel (clock ticks) of a process and its children
# (nginx workers).
user_ticks() { family_sum "$1" stat '{ print $14 }'; }
system_ticks() { family_sum "$1" stat '{ print $15 }'; }

# The summed schedstat of every thread of PID and its children: "on-CPU-ns waiting-ns slices".
family_schedstat() { # pid
    local p
    for p in "$1" $(pgrep -P "$1" || true); do cat /proc/"$p"/task/*/schedstat 2>/dev/null; done |
        awk '{ a += $1; b += $2; c += $3 } END { print a + 0, b + 0, c + 0 }'
}

# The machine's memory events a stall of a process could come from (all processes'), as
# "name value ...".
vm_events() {
    awk '$1 ~ /^(allocstall|compact_stall|compact_fail|pgscan_direct|thp_collapse_alloc|thp_fault_alloc|pgmajfault|pgfault)/ { printf "%s %s ", $1, $2 }' /proc/vmstat
}

# The whole machine's idle and steal time so far, in clock ticks, as "idle steal": steal is
# the time a virtual machine's CPUs wanted to run and the host ran something else.
machine_ticks() {
    awk '$1 == "cpu" { print $5, $9 }' /proc/stat
}

# One line for BENCH_RAW: the run's label and mode, then how many established connections
# to the upstream each upstream worker holds (highest first).
upstream_spread() { # label mode
    printf '%s\t%s\t%s\n' "$1" "$2" "$(ss -tnpH state established "( sport = :$UP )" |
        grep -o 'pid=[0-9]*' | sort | uniq -c | sort -rn | awk '{ printf "%s ", $1 }')"
}

# BENCH_RAW, around one measured run: raw_begin, called as the run starts, takes the
# counters it starts from and, halfway through the run, the upstream spread; raw_end, once
# the run is over, writes what moved and keeps wrk's output.
raw_begin() { # label mode pid
    NSTAT_HISTORY="$WORK/nstat.history" nstat -n
    RAW_SCHED=$(family_schedstat "$3")
    RAW_VM=$(vm_events)
    RAW_MACHINE=$(machine_ticks)
    sleep "$(awk -v d="${DURATION%s}" 'BEGIN { print d / 2 }')"
    upstream_spread "$1" "$2" >>"$BENCH_RAW/upstream-spread.tsv"
}
raw_end() { # label mode pid wrk-output
    printf '%s\t%s\t%s\n' "$1" "$2" "$(NSTAT_HISTORY="$WORK/nstat.history" nstat |
        awk '/Retrans|LossProbes|DelayedACK|TCPTimeouts|ListenOverflows|TCPAbort|Reset/ { printf "%s=%s ", $1, $2 }')" \
        >>"$BENCH_RAW/tcp-counters.tsv"
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$(awk -v a="$RAW_SCHED" -v b="$(family_schedstat "$3")" 'BEGIN {
            split(a, x, " "); split(b, y, " ")
            printf "on-CPU %.0f ms, waiting for a CPU %.0f ms, %d slices", (y[1] - x[1]) / 1e6, (y[2] - x[2]) / 1e6, y[3] - x[3]
        }')" "$(awk -v a="$RAW_MACHINE" -v b="$(machine_ticks)" -v hz="$(getconf CLK_TCK)" 'BEGIN {
            split(a, x, " "); split(b, y, " ")
            printf "machine: steal %.0f ms, idle %.0f ms", (y[2] - x[2]) * 1000 / hz, (y[1] - x[1]) * 1000 / hz
        }')" "$(awk -v a="$RAW_VM" -v b="$(vm_events)" 'BEGIN {
            n = split(a, x, " "); split(b, y, " ")
            for (i = 1; i <= n; i += 2) if (y[i + 1] != x[i + 1]) printf "%s=%d ", x[i], y[i + 1] - x[i + 1]
        }')" >>"$BENCH_RAW/sched.tsv"
    cp "$4" "$BENCH_RAW/"
}

# Prints "req/s p50_ms p99_ms errors cpu_us_per_request user_us system_us" for one wrk run
# against the process PID (the last three: CPU time per request, all of it, in user space
# and in the kernel).
run_wrk() { # url mode(keepalive|close) label pid
    local url=$1 mode=$2 out="$WORK/wrk-$3-$2.txt" pid=$4 user0 system0 user1 system1
    local header=()
    [ "$mode" = close ] && header=(-H 'Connection: close')
    # A short warm-up (connections, pools, caches), then the measured run.
    wrk -t"$THREADS" -c"$CONNECTIONS" -d1s "${header[@]}" "$url" >/dev/null 2>&1 || true
    user0=$(user_ticks "$pid")
    system0=$(system_ticks "$pid")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "$url" >"$out" 2>&1 &
    local wrk_pid=$!
    [ -z "${BENCH_RAW:-}" ] || raw_begin "$3" "$2" "$pid"
    wait "$wrk_pid" || true
    [ -z "${BENCH_RAW:-}" ] || raw_end "$3" "$2" "$pid" "$out"
    user1=$(user_ticks "$pid")
    system1=$(system_ticks "$pid")
    awk -v user=$((user1 - user0)) -v kernel=$((system1 - system0)) -v hz="$(getconf CLK_TCK)" "$WRK_FIGURES"'
        function per_request(t) { return (n > 0) ? t * 1e6 / hz / n : 0 }
        END {
            printf "%.0f %.2f %.2f %d %.1f %.1f %.1f\n", rps, p50, p99, err,
                per_request(user + kernel), per_request(user), per_request(kernel)
        }
    ' "$out"
}

declare -A RPS P50 P99 ERR CPU USER SYSTEM RSS
MODES=(keepalive close)
PROXIES=(proxyd nginx haproxy caddy)
# One line per measured run: round, log, mode, target and its figures.
RUNS="$WORK/runs.tsv"
: >"$RUNS"

# Appends one run's figures (from run_wrk) to RUNS.
measure() { # round log mode target url pid
    local figures
    figures=$(run_wrk "$5" "$3" "$4-$2-r$1" "$6")
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${figures// /$'\t'}" >>"$RUNS"
}

# The order the proxies run in within round ROUND: proxyd, nginx and HAProxy take turns
# at the front (`in_turn`), and Caddy comes last. The first proxy of a round follows the
# upstream's own runs, the heaviest. (Measured for one such effect: 14,000 connections
# left in TIME-WAIT by a run with a new connection per request did not move the next
# keep-alive run beyond the noise.)
round_order() { # round
    echo $(in_turn "$1" "${PROXIES[@]:0:3}") "${PROXIES[@]:3}"
}

for round in $(seq "$ROUNDS"); do
    for mode in "${MODES[@]}"; do
        say "round $round/$ROUNDS: upstream direct, $mode"
        measure "$round" none "$mode" upstream "http://127.0.0.1:$UP/1k" "$UP_PID"
    done
    read -r -a ORDER <<<"$(round_order "$round")"
    for log in "${LOGS[@]}"; do
        for name in "${ORDER[@]}"; do
            # Caddy is far behind the others; it is measured with logs off only, to keep the run short.
            [ "$log" = on ] && [ "$name" = caddy ] && continue
            port=$(free_port)
            start_proxy "$name" "$port" "$log"
            pid=$LAST_PID
            wait_ready "http://127.0.0.1:$port/1k" "$name" "$pid"
            for mode in "${MODES[@]}"; do
                say "round $round/$ROUNDS: $name, $mode, access log $log"
                measure "$round" "$log" "$mode" "$name" "http://127.0.0.1:$port/1k" "$pid"
            done
            rss=$(peak_rss_mib "$pid")
            RSS[$name,$log]=$(awk -v a="${RSS[$name,$log]:-0}" -v b="$rss" 'BEGIN { print (a > b) ? a : b }')
            stop "$pid"
        done
    done
done
RSS[upstream]=$(peak_rss_mib "$UP_PID")

# The median over the rounds of column COLUMN of RUNS (5 req/s, 6 p50, 7 p99, 9 CPU per
# request, 10 of it in user space, 11 in the kernel) for one log/mode/target.
median() { # log mode target column printf-format
    awk -F'\t' -v lg="$1" -v mode="$2" -v t="$3" -v c="$4" \
        '$2 == lg && $3 == mode && $4 == t { print $c }' "$RUNS" | median_range "$5" | cut -d' ' -f1
}
# Errors are summed over the rounds: one failed request in any round counts.
errors() { # log mode target
    awk -F'\t' -v lg="$1" -v mode="$2" -v t="$3" '$2 == lg && $3 == mode && $4 == t { n += $8 } END { print n + 0 }' "$RUNS"
}
for mode in "${MODES[@]}"; do
    RPS[upstream,$mode]=$(median none "$mode" upstream 5 %.0f)
    P50[upstream,$mode]=$(median none "$mode" upstream 6 %.2f)
    P99[upstream,$mode]=$(median none "$mode" upstream 7 %.2f)
    ERR[upstream,$mode]=$(errors none "$mode" upstream)
    CPU[upstream,$mode]=$(median none "$mode" upstream 9 %.1f)
    USER[upstream,$mode]=$(median none "$mode" upstream 10 %.1f)
    SYSTEM[upstream,$mode]=$(median none "$mode" upstream 11 %.1f)
done
for log in "${LOGS[@]}"; do
    for mode in "${MODES[@]}"; do
        for name in "${PROXIES[@]}"; do
            [ "$log" = on ] && [ "$name" = caddy ] && continue
            RPS[$name,$log,$mode]=$(median "$log" "$mode" "$name" 5 %.0f)
            P50[$name,$log,$mode]=$(median "$log" "$mode" "$name" 6 %.2f)
            P99[$name,$log,$mode]=$(median "$log" "$mode" "$name" 7 %.2f)
            ERR[$name,$log,$mode]=$(errors "$log" "$mode" "$name")
            CPU[$name,$log,$mode]=$(median "$log" "$mode" "$name" 9 %.1f)
            USER[$name,$log,$mode]=$(median "$log" "$mode" "$name" 10 %.1f)
            SYSTEM[$name,$log,$mode]=$(median "$log" "$mode" "$name" 11 %.1f)
        done
    done
done

# --- report -------------------------------------------------------------------------------
mode_label() { if [ "$1" = keepalive ]; then echo "keep-alive"; else echo "new connection"; fi; }
# Each round's own ratio of proxyd to its peer, then their median and range, as
# "median lo-hi". A ratio is taken within one round, where proxyd and its peers ran a
# minute or two apart, so a slow spell of the machine moves both sides of it. COLUMN is 5
# (req/s, against the better of nginx and HAProxy), 7 (p99, against the lower), 9 (CPU per
# request, against nginx) or 10 (its user-space part, against nginx's). The better peer is
# the one with the better median over the rounds, and every round is compared with that
# one: the better of the two within each round would set proxyd's one figure against the
# higher of two, which the machine's noise raises by itself when the peers are close.
round_ratios() { # log mode column [fmt]
    awk -F'\t' -v lg="$1" -v mode="$2" -v c="$3" '
        function median(list,   n, v, i, j, t) {
            n = split(list, v, " ")
            for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
            return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        $2 != lg || $3 != mode { next }
        $4 == "proxyd" { p[$1] = $c }
        $4 == "nginx" || $4 == "haproxy" { fig[$4, $1] = $c; all[$4] = all[$4] " " $c }
        END {
            peer = "nginx"
            if (c == 5 && median(all["haproxy"]) > median(all["nginx"])) peer = "haproxy"
            if (c == 7 && median(all["haproxy"]) < median(all["nginx"])) peer = "haproxy"
            for (r in p) if (fig[peer, r] > 0) printf "%.4f\n", p[r] / fig[peer, r]
        }' "$RUNS" | median_range "${4:-%.2f}"
}

mkdir -p "$OUT"
HEADER="wrk -t$THREADS -c$CONNECTIONS -d$DURATION, median of $ROUNDS rounds, 1 KiB body from an nginx upstream, all on 127.0.0.1, $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(date -u +%Y-%m-%dT%H:%MZ), proxyd ${PROXYD_LABEL:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"

# results.tsv: one line per measured run (every round).
{
    printf 'round\tlog\tmode\ttarget\treq_s\tp50_ms\tp99_ms\terrors\tcpu_us_per_req\tuser_us_per_req\tsystem_us_per_req\n'
    cat "$RUNS"
} >"$OUT/results.tsv"

# goals-http.tsv: the goals this bench measures, for bench/run (see goal_line in common.sh).
: >"$OUT/goals-http.tsv"
for log in "${LOGS[@]}"; do
    for mode in "${MODES[@]}"; do
        label="HTTP $(mode_label "$mode"), logs $log"
        for figure in "req/s:higher:5:the better of nginx and HAProxy" "p99:lower:7:the better of nginx and HAProxy" \
            "CPU per request:lower:9:nginx"; do
            IFS=: read -r what direction column peer <<<"$figure"
            read -r ratio range < <(round_ratios "$log" "$mode" "$column" %.4f)
            goal_line "$OUT/goals-http.tsv" "$label: $what" "$direction" "$peer" "$ratio" "$range"
        done
    done
done

# results.md: ratios first (against the better of nginx and HAProxy), then the raw figures.
{
    echo "$HEADER"
    echo
    echo "| access log | client connections | proxyd / best peer req/s | rounds | proxyd / best peer p99 | rounds | proxyd / nginx CPU per request | rounds | of it in user space | rounds | proxyd req/s | nginx | HAProxy |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for log in "${LOGS[@]}"; do
        for mode in "${MODES[@]}"; do
            read -r rps_ratio rps_range < <(round_ratios "$log" "$mode" 5)
            read -r p99_ratio p99_range < <(round_ratios "$log" "$mode" 7)
            read -r cpu_ratio cpu_range < <(round_ratios "$log" "$mode" 9)
            read -r user_ratio user_range < <(round_ratios "$log" "$mode" 10)
            echo "| $log | $(mode_label "$mode") | $rps_ratio | $rps_range | $p99_ratio | $p99_range | $cpu_ratio | $cpu_range | $user_ratio | $user_range | ${RPS[proxyd,$log,$mode]} | ${RPS[nginx,$log,$mode]} | ${RPS[haproxy,$log,$mode]} |"
        done
    done
    echo
    echo "| access log | client connections | target | req/s | p50 ms | p99 ms | CPU µs per request | user space | kernel | peak RSS MiB | errors |"
    echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for mode in "${MODES[@]}"; do
        echo "| - | $(mode_label "$mode") | upstream direct | ${RPS[upstream,$mode]} | ${P50[upstream,$mode]} | ${P99[upstream,$mode]} | ${CPU[upstream,$mode]} | ${USER[upstream,$mode]} | ${SYSTEM[upstream,$mode]} | ${RSS[upstream]} | ${ERR[upstream,$mode]} |"
    done
    for log in "${LOGS[@]}"; do
        for mode in "${MODES[@]}"; do
            for t in "${PROXIES[@]}"; do
                [ -n "${RPS[$t,$log,$mode]:-}" ] || continue
                echo "| $log | $(mode_label "$mode") | $t | ${RPS[$t,$log,$mode]} | ${P50[$t,$log,$mode]} | ${P99[$t,$log,$mode]} | ${CPU[$t,$log,$mode]} | ${USER[$t,$log,$mode]} | ${SYSTEM[$t,$log,$mode]} | ${RSS[$t,$log]} | ${ERR[$t,$log,$mode]} |"
            done
        done
    done
    echo
    echo "Ratios: each round's own ratio, the median of the $ROUNDS rounds, and beside it the lowest and highest; req/s and p99 against the better of nginx and HAProxy over the run (the higher median req/s, the lower median p99), in every round against that one; the proxies took turns within each round, proxyd, nginx and HAProxy each first in one round of three."
    echo "Raw figures: the median of the $ROUNDS rounds (errors: the sum)."
    echo "CPU per request: user + system time of the proxy's processes during the measured run / requests; user space and kernel: the two parts (the kernel's part is mostly the loopback TCP path of the four system calls a proxied request takes, much the same for every proxy)."
    echo "Peak RSS: VmHWM over a whole round of that target (nginx: master + workers summed), the highest of the rounds."
} >"$OUT/results.md"

# results.svg: req/s per scenario, one bar per proxy.
{
    printf 'scenario\tproxyd\tnginx\thaproxy\n'
    for log in "${LOGS[@]}"; do
        for mode in "${MODES[@]}"; do
            printf '"log %s, %s"\t%s\t%s\t%s\n' "$log" "$(mode_label "$mode")" \
                "${RPS[proxyd,$log,$mode]}" "${RPS[nginx,$log,$mode]}" "${RPS[haproxy,$log,$mode]}"
        done
    done
} >"$WORK/chart.dat"
gnuplot <<EOF
set terminal svg size 800,420 font "sans,12" background "white"
set output "$OUT/results.svg"
set title "proxyd, nginx and HAProxy as reverse proxies: req/s (higher is better)\n{/*0.8 $(nproc) CPUs, wrk -t$THREADS -c$CONNECTIONS -d$DURATION, 1 KiB}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set yrange [0:*]
set grid ytics
set key top right
set datafile separator "\t"
plot "$WORK/chart.dat" using 2:xtic(1) title "proxyd" linecolor rgb "#1f77b4", \
     "" using 3 title "nginx" linecolor rgb "#2ca02c", \
     "" using 4 title "HAProxy" linecolor rgb "#ff7f0e"
EOF

echo
cat "$OUT/results.md"
echo
say "written: $OUT/results.tsv, $OUT/results.md, $OUT/results.svg"
