# Shared preamble of the benchmark scripts (sourced, not run): messages, tool installation,
# the proxyd binary, a scratch dir cleaned up on exit, and free loopback ports.
# Expects ROOT (the repository) and CARGO_TARGET_DIR to be set by the caller.

say() { printf '%s\n' "$*" >&2; }

# family_sum PID FILE AWK  the sum of what the awk program AWK prints for /proc/P/FILE,
# over the process PID and its children (nginx: the master and its workers).
family_sum() { # pid file awk
    local pid=$1 file=$2 program=$3 total=0 p v
    for p in $pid $(pgrep -P "$pid" || true); do
        v=$(awk "$program" "/proc/$p/$file" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# cpu_ticks PID  user + system clock ticks of the process PID and its children so far.
cpu_ticks() { family_sum "$1" stat '{ print $14 + $15 }'; }

# in_turn ROUND ITEM...  the items in the order they run in within round ROUND when they
# take turns: round 1 as given, round 2 from the second, and so on, so that each comes
# first in one round of N. Each run follows another that left the machine in its own state
# (a heavier load, a process that just built 100,000 routes); in a fixed order one target
# would always take the same place.
in_turn() { # round item...
    local round=$1 i
    shift
    local items=("$@")
    for i in "${!items[@]}"; do
        printf '%s\n' "${items[$(((i + round - 1) % ${#items[@]}))]}"
    done
}

# need_tools COMMAND:PACKAGE...  installs (idempotently, with apt-get) the packages whose
# command is neither on PATH nor in /usr/sbin, then adds the sbin directories to PATH.
need_tools() {
    local spec missing=() sudo=""
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null || [ -x "/usr/sbin/${spec%%:*}" ] || missing+=("${spec#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        say "installing: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    export PATH="$PATH:/usr/sbin:/sbin"
}

# pinned_rustc  prints the rustc version of the pinned nixpkgs (nix/nixpkgs-pin.toml), the
# one the Nix package builds with, after installing that toolchain with rustup if missing.
pinned_rustc() {
    local rustc
    rustc=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["rustc"])' "$ROOT/nix/nixpkgs-pin.toml")
    rustup toolchain list | grep -q "^$rustc-" || rustup toolchain install "$rustc" --profile minimal >&2
    echo "$rustc"
}

# Sets PROXYD: the given binary, else a release build of it as the Nix package makes it:
# with the rustc of the pinned nixpkgs (pinned_rustc) and optimised with the profile
# pgo/proxyd.profdata (scripts/pgo-profile). The build goes through scripts/pgo-check,
# which stops the bench when the code moved away from the profile (a stale profile leaves
# the changed functions compiled as code that never runs, and the figures would measure
# that): set BENCH_STALE_PROFILE=ok to measure such a build anyway.
build_proxyd() {
    if [ -z "${PROXYD:-}" ]; then
        local built
        pinned_rustc >/dev/null
        [ -x /usr/lib/llvm-19/bin/llvm-profdata ] || need_tools llvm-profdata-19:llvm-19
        if built=$(python3 "$ROOT/scripts/pgo-check"); then
            PROXYD=$built
        elif [ "${BENCH_STALE_PROFILE:-}" = ok ] && [ -n "$built" ]; then
            say "measuring a build with a stale profile (BENCH_STALE_PROFILE=ok)"
            PROXYD=$built
        else
            exit 1
        fi
    fi
    [ -x "$PROXYD" ] || { say "no proxyd binary at $PROXYD"; exit 1; }
}

# wait_ready URL NAME PID [curl options...]  waits (at most 60 s: a table of 100,000 routes
# takes a while to load) until URL answers 2xx;
# exits with NAME's log ($WORK/NAME.log) when process PID ends first or time runs out.
wait_ready() {
    local url=$1 name=$2 pid=$3 i
    shift 3
    for i in $(seq 600); do
        if curl -fsS -o /dev/null --max-time 1 "$@" "$url" 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || { say "$name exited during start-up:"; cat "$WORK/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    say "$name did not answer on $url within 60 s:"
    cat "$WORK/$name.log" >&2
    exit 1
}

# make_workdir NAME  sets WORK to a new scratch dir (readable by nginx workers that drop to
# an unprivileged user when started as root) and PIDS to an empty list; on exit every PID
# in PIDS is stopped and WORK removed.
make_workdir() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    chmod 755 "$WORK"
    PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# start NAME COMMAND...  runs COMMAND in the background with its output in $WORK/NAME.log,
# adds it to PIDS (stopped on exit) and sets LAST_PID.
start() { # name, command...
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
}

# stop PID  stops a process started by `start` and waits for it.
stop() { # pid
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}

# median_range FMT  reads numbers, one per line, and prints their median and their lowest and
# highest as "MEDIAN LO-HI", each with printf format FMT; "n/a n/a" when it reads none.
median_range() { # fmt
    sort -g | awk -v f="$1" '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf f " " f "-" f "\n", m, v[1], v[NR] }'
}

# Figures measured in rounds (ROUNDS of them) are kept in an associative array keyed
# "NAME,ROUND".
# round_ratio [-l] ARRAY SUBJECT PEER...  each round's ratio of SUBJECT's figure to the best
# PEER's in that round, as "MEDIAN (LO-HI)" over the rounds; with one PEER, the ratio to it
# (also for figures where lower is better, such as memory). With several, the best PEER is
# the one with the highest median over the rounds (with -l, for a figure where lower is
# better such as CPU time, the lowest), named after the range, and every round is
# compared with that one: the best of them within each round would set SUBJECT's one
# figure against the best of several, which the machine's noise improves by itself when
# they are close (two HAProxy configurations that copy a 1 KiB exchange alike, say).
round_ratio() { # [-l] array subject peer...
    local lower=0
    if [ "$1" = -l ]; then
        lower=1
        shift
    fi
    local -n figures=$1
    local subject=$2 round peer best="" best_median="" median
    shift 2
    for peer in "$@"; do
        median=$(for round in $(seq "$ROUNDS"); do echo "${figures[$peer,$round]:-0}"; done | median_range %.6f | cut -d' ' -f1)
        if [ -z "$best" ] || awk -v a="$median" -v b="$best_median" -v lower="$lower" \
            'BEGIN { exit !(lower ? a < b : a > b) }'; then
            best=$peer
            best_median=$median
        fi
    done
    for round in $(seq "$ROUNDS"); do
        awk -v a="${figures[$subject,$round]:-0}" -v b="${figures[$best,$round]:-0}" 'BEGIN { if (b > 0) printf "%.4f\n", a / b }'
    done | median_range "${RATIO_FORMAT:-%.2f}" | awk -v best="$best" -v several="$(($# > 1))" '{
        printf "%s (%s)", $1, $2; if (several) printf " against %s", best }'
}
# goal_line FILE NAME higher|lower PEER MEDIAN LO-HI  appends one goal to FILE (a
# goals-*.tsv that bench/run gathers): the goal, whether proxyd's figure must be at least
# (higher) or at most (lower) its peer's, the peer, and the median of the rounds' ratios
# with the lowest and highest, all tab-separated.
goal_line() { # file name direction peer median range
    # The range is "LO-HI", either of which may be negative ("-0.38--0.21"); "n/a" when
    # no round could be compared.
    local lo=n/a hi=n/a
    if [[ $6 =~ ^(-?[0-9.]+)-(-?[0-9.]+)$ ]]; then
        lo=${BASH_REMATCH[1]}
        hi=${BASH_REMATCH[2]}
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$2" "$3" "$4" "$5" "$lo" "$hi" >>"$1"
}

# goal FILE NAME higher|lower [-l] ARRAY SUBJECT PEER...  the goal NAME, measured as
# round_ratio measures it (the same arguments), to FILE with four decimals.
goal() { # file name direction round_ratio-args...
    local file=$1 goal_name=$2 direction=$3 measured median range against peer
    shift 3
    measured=$(RATIO_FORMAT=%.4f round_ratio "$@")
    read -r median range against peer <<<"$measured"
    range=${range#(}
    range=${range%)}
    [ -n "$peer" ] || peer=${*: -1}
    goal_line "$file" "$goal_name" "$direction" "$peer" "$median" "$range"
}

# round_median ARRAY NAME FMT  the median of NAME's figure over the rounds.
round_median() { # array name fmt
    local -n figures=$1
    local round
    for round in $(seq "$ROUNDS"); do echo "${figures[$2,$round]:-0}"; done | median_range "$3" | cut -d' ' -f1
}

# WRK_FIGURES  awk rules that read wrk's output (with --latency for the percentiles) into
# rps, p50 and p99 (ms), n (requests), mbs (MiB/s transferred) and err (non-2xx answers
# and socket errors); a script's awk program adds its own END.
WRK_FIGURES='
    function ms(v) {
        if (v ~ /us$/) return v / 1000
        if (v ~ /ms$/) return v + 0
        if (v ~ /m$/)  return v * 60000
        if (v ~ /s$/)  return v * 1000
        return v
    }
    function mib(v) {
        if (v ~ /GB$/) return v * 1024
        if (v ~ /MB$/) return v + 0
        if (v ~ /KB$/) return v / 1024
        if (v ~ /B$/)  return v / 1048576
        return v
    }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /^Requests\/sec:/ { rps = $2 }
    /^Transfer\/sec:/ { mbs = mib($2) }
    / requests in / { n = $1 }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
'

# A free loopback port in 20000-29999 (below the ephemeral range that wrk and tests use),
# never the same twice in one run.
used_ports=""
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 10000))
        case " $used_ports " in *" $port "*) continue ;; esac
        if ! ss -Htln "sport = :$port" | grep -q .; then
            used_ports="$used_ports $port"
            echo "$port"
            return
        fi
    done
}

# The fields proxyd adds to every request it forwards (X-Forwarded-For, -Proto and -Host,
# Forwarded, Via, and the client's own Host passed on) and to every response (Via), as the
# peers' directives: each peer does the same work on every request, as an operator who
# wants those fields configures it (without them nginx and HAProxy add none, and the
# upstream would parse about 170 bytes fewer per request from them than from proxyd).
# nginx_forwarding: the `location` directives (they replace inherited proxy_set_header,
# so the keep-alive `Connection ""` is among them).
nginx_forwarding() {
    cat <<'NGINX'
proxy_http_version 1.1;
proxy_set_header Connection "";
proxy_set_header Host $http_host;
proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
proxy_set_header X-Forwarded-Proto $scheme;
proxy_set_header X-Forwarded-Host $host;
proxy_set_header Forwarded "for=$remote_addr;host=\"$host\";proto=$scheme";
proxy_set_header Via "1.1 nginx";
add_header Via "1.1 nginx";
NGINX
}
# haproxy_forwarding: the `backend` directives (HAProxy 2.6 has no `option forwarded`).
haproxy_forwarding() {
    cat <<'HAPROXY'
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host),field(1,:)]
    http-request set-header Forwarded 'for=%[src];host="%[req.hdr(host),field(1,:)]";proto=http'
    http-request add-header Via "1.1 haproxy"
    http-response add-header Via "1.1 haproxy"
HAPROXY
}
# caddy_forwarding: inside `reverse_proxy { }` (Caddy sends X-Forwarded-* by itself).
caddy_forwarding() {
    cat <<'CADDY'
        header_up Forwarded "for={remote_host};host=\"{host}\";proto={scheme}"
        header_up Via "1.1 caddy"
        header_down Via "1.1 caddy"
CADDY
}
