#!/bin/bash
# Runs inside the booted container (as /payload/entry): installs proxyd the way
# contrib/systemd/ describes, then runs the scenarios named in /payload/params.
#
#   1  HTTP and TCP routing through the socket-activated proxy.service
#   3  repeated binary swaps behind /etc/proxy/bin/proxyd + `systemctl reload` under load:
#      0 failed requests, NRestarts=0, a new MainPID running the new binary each time, a
#      download and a TCP stream started before the reloads complete intact
#   4  a new binary that exits at once, then one that never becomes ready: the reload
#      fails, the old MainPID keeps serving; restoring the good binary and reloading works
#   5  proxy-fdstore.service: the contrib unit without socket units (proxyd binds its own
#      listeners) and FileDescriptorStoreMax=16: systemd holds the sockets; `systemctl
#      restart` and a SIGKILL (Restart=on-failure) keep the same sockets with no refused
#      connection; stop + start binds new ones; without the fd store a restart rebinds
#   6  a listener moved by a NixOS switch: the module names each socket unit after the
#      listener and a hash of its address, so the move is a removed unit and a new one.
#      Replayed the way switch-to-configuration does it (stop the removed unit, swap the
#      files, daemon-reload, restart proxy.service, which wants the new unit): the new
#      address serves, the old one is closed. Control: the same edit under an unchanged
#      unit name leaves the socket on the old address.
#
# Prints one PASS/FAIL line per check and exits non-zero if any failed.
set -uo pipefail

payload=/payload
results=/results
# shellcheck source=/dev/null
. "$payload/params"
: "${SCENARIOS:=1 3 4 5 6}"
: "${RELOADS:=5}"

export PROXY_MGMT_SOCKET=/run/proxy/mgmt.sock
failures=0
passes=0

log() { echo "harness: $*"; }
pass() {
  passes=$((passes + 1))
  echo "PASS $*"
}
fail() {
  failures=$((failures + 1))
  echo "FAIL $*"
}
# check NAME COMMAND...: PASS if the command succeeds.
check() {
  local name=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    pass "$name"
  else
    fail "$name: $(echo "$out" | tail -n 5)"
  fi
}
# expect NAME ACTUAL WANTED
expect() {
  if [ "$2" = "$3" ]; then pass "$1 ($2)"; else fail "$1: got '$2', want '$3'"; fi
}

main_pid() { systemctl show -P MainPID proxy.service; }
n_restarts() { systemctl show -P NRestarts proxy.service; }
active_state() { systemctl show -P ActiveState proxy.service; }
unit_is_active() { [ "$(active_state)" = active ]; }
# The program a process runs ("script" for an interpreted stand-in, whose /proc/PID/exe
# is the interpreter).
exe_of() {
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || {
    echo "?"
    return
  }
  case $exe in
    */python3* | */bash | */dash | */sh) echo script ;;
    *) echo "$exe" ;;
  esac
}

# The pids in proxy.service's cgroup, sorted, on one line (from /proc: this works with
# the unified and with the legacy cgroup hierarchy).
unit_pids() {
  grep -lE '^(0|[0-9]+:name=systemd):.*/proxy\.service$' /proc/[0-9]*/cgroup 2>/dev/null |
    cut -d/ -f3 | sort -n | tr '\n' ' ' | sed 's/ $//'
}
only_main_pid_left() { [ "$(unit_pids)" = "$(main_pid)" ]; }

http_get() { curl -sS --max-time 5 "$@"; }

# tcp_roundtrip LINE: the echo of LINE through the TCP listener.
tcp_roundtrip() { python3 "$payload/tcp_roundtrip.py" 127.0.0.1:16379 "$1"; }

wait_for() {
  local tries=$1
  shift
  for _ in $(seq "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  return 1
}

dump_journal() {
  journalctl --no-pager -o short-monotonic -u proxy.service -u proxy.socket \
    -u proxy-listener@echo.socket >"$results/journal-proxy.txt" 2>&1
  journalctl --no-pager -o short-monotonic >"$results/journal-all.txt" 2>&1
}

install_proxy() {
  log "installing proxyd from contrib/systemd"
  install -D -m 0644 "$payload/units/proxy.sysusers" /etc/sysusers.d/proxy.conf
  systemd-sysusers /etc/sysusers.d/proxy.conf

  # Two copies of the same build under different paths: each reload swaps the stable
  # symlink to the other one, so the new MainPID's /proc/PID/exe proves which ran.
  for slot in a b; do
    install -D -m 0755 "$payload/bin/proxyd" "/opt/proxy/$slot/proxyd"
    install -D -m 0755 "$payload/bin/proxyctl" "/opt/proxy/$slot/proxyctl"
  done
  install -D -m 0755 /dev/stdin /opt/proxy/broken/proxyd <<'EOF'
#!/bin/sh
echo "broken proxyd: exiting" >&2
exit 1
EOF
  install -D -m 0755 /dev/stdin /opt/proxy/hang/proxyd <<'EOF'
#!/bin/sh
echo "hanging proxyd: never ready" >&2
exec sleep 3600
EOF
  mkdir -p /etc/proxy/bin
  ln -sfn /opt/proxy/a/proxyd /etc/proxy/bin/proxyd
  ln -sfn /opt/proxy/a/proxyctl /etc/proxy/bin/proxyctl
  install -m 0644 "$payload/proxy.toml" /etc/proxy/proxy.toml

  install -m 0644 "$payload"/units/proxy.service "$payload"/units/proxy.socket \
    "$payload"/units/proxy-listener@.socket /etc/systemd/system/
  mkdir -p /etc/systemd/system/proxy.socket.d /etc/systemd/system/proxy-listener@echo.socket.d
  printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:8080\n' \
    >/etc/systemd/system/proxy.socket.d/listen.conf
  printf '[Socket]\nListenStream=127.0.0.1:16379\n' \
    >/etc/systemd/system/proxy-listener@echo.socket.d/listen.conf

  for spec in "v1a --http 127.0.0.1:9001" "v1b --http 127.0.0.1:9002" \
    "v2 --http 127.0.0.1:9003" "echo --tcp 127.0.0.1:9101"; do
    set -- $spec
    systemd-run --quiet --unit="upstream-$1" python3 "$payload/upstream.py" --name "$@"
  done
  wait_for 50 curl -sf http://127.0.0.1:9001/healthz
  wait_for 50 curl -sf http://127.0.0.1:9002/healthz
  wait_for 50 curl -sf http://127.0.0.1:9003/healthz

  check "proxyd --version runs" /etc/proxy/bin/proxyd --version
  check "proxyd check-config accepts the test config" \
    /etc/proxy/bin/proxyd check-config /etc/proxy/proxy.toml

  systemctl daemon-reload
  check "systemd-analyze verify contrib units" \
    systemd-analyze verify --man=no proxy.service proxy.socket proxy-listener@echo.socket
  check "enable the socket units" \
    systemctl enable --now proxy.socket proxy-listener@echo.socket
  systemctl enable proxy.service 2>/dev/null
}

scenario_1() {
  log "scenario 1: routing through the socket-activated service"
  expect "s1 proxy.service waits for its first connection" "$(active_state)" "inactive"

  local body seen
  body=$(http_get http://127.0.0.1:8080/hello)
  case "$body" in
    "v1a /hello" | "v1b /hello") pass "s1 first request activates proxy.service and routes to v1 ($body)" ;;
    *) fail "s1 first request: got '$body'" ;;
  esac
  # READY=1 reaches systemd asynchronously: the first request can be answered while the
  # unit still reads "activating".
  wait_for 100 unit_is_active || true
  expect "s1 proxy.service active after activation" "$(active_state)" "active"

  seen=$(for _ in 1 2 3 4; do http_get http://127.0.0.1:8080/rr; done | sort -u | tr '\n' ' ')
  expect "s1 round robin reaches both v1 upstreams" "$seen" "v1a /rr v1b /rr "
  expect "s1 host + path route to v2" \
    "$(http_get -H 'Host: example.com' http://127.0.0.1:8080/docs/intro)" "v2 /docs/intro"
  expect "s1 path route needs its host" \
    "$(http_get -H 'Host: other.test' http://127.0.0.1:8080/docs/intro | cut -c1-2)" "v1"
  expect "s1 TCP listener reaches the echo pool" "$(tcp_roundtrip name)" "echo"
  expect "s1 TCP echo is byte-exact" "$(tcp_roundtrip 'hello through the proxy')" \
    "hello through the proxy"
  check "s1 admin /healthz" curl -sf --max-time 5 http://127.0.0.1:4208/healthz
  check "s1 proxyctl status over the management socket" /etc/proxy/bin/proxyctl status
  expect "s1 management socket is 0660 proxy:proxy" \
    "$(stat -c '%a %U:%G' /run/proxy/mgmt.sock 2>&1)" "660 proxy:proxy"
  expect "s1 proxy.service runs as user proxy" \
    "$(ps -o user= -p "$(main_pid)" | tr -d ' ')" "proxy"
}

# start_load NAME: bounded mixed load in the background (stopped by stop_load).
start_load() {
  rm -f "/run/load-$1.stop" "/run/load-$1.json"
  timeout 300 python3 "$payload/load.py" --http 127.0.0.1:8080 --path /load \
    --keepalive 4 --fresh 4 --tcp-addr 127.0.0.1:16379 --tcp 2 --hold-tcp \
    --duration 240 --stop-file "/run/load-$1.stop" --out "/run/load-$1.json" \
    >"$results/load-$1.txt" 2>&1 &
  load_pid=$!
  sleep 1
}

# stop_load NAME: stops the load and checks that nothing failed.
stop_load() {
  touch "/run/load-$1.stop"
  if wait "$load_pid"; then
    pass "$1 load: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%(ok)d ok, %(failed)d failed, %(stale_retries)d stale keep-alive retries in %(seconds)ss" % d)' "/run/load-$1.json")"
  else
    fail "$1 load: $(tr '\n' ' ' <"$results/load-$1.txt" | cut -c1-1500)"
  fi
}

# reload_to SLOT: points the stable path at SLOT and reloads; PASS if a new process from
# that slot took over.
reload_to() {
  local name=$1 slot=$2 before after
  before=$(main_pid)
  ln -sfn "/opt/proxy/$slot/proxyd" /etc/proxy/bin/proxyd
  if ! out=$(timeout 100 systemctl reload proxy.service 2>&1); then
    fail "$name systemctl reload failed: $out"
    return 1
  fi
  after=$(main_pid)
  local exe
  exe=$(exe_of "$after")
  if [ "$after" != "$before" ] && { [ "$exe" = "/opt/proxy/$slot/proxyd" ] || [ "$exe" = script ]; }; then
    pass "$name reload: MainPID $before -> $after ($exe)"
  else
    fail "$name reload: MainPID $before -> $after, exe $exe, want /opt/proxy/$slot/proxyd"
    return 1
  fi
}

scenario_3() {
  log "scenario 3: $RELOADS binary swaps + systemctl reload under load"
  systemctl start proxy.service
  local restarts0 pids=() slot=a i stream_bytes
  restarts0=$(n_restarts)
  pids+=("$(main_pid)")

  # Started before the first reload; 8 s of streamed lines must arrive whole.
  timeout 120 curl -sS --max-time 100 -o /run/stream.out \
    'http://127.0.0.1:8080/stream?seconds=8' 2>"$results/stream-err.txt" &
  local stream_pid=$!
  start_load s3
  for i in $(seq "$RELOADS"); do
    if [ "$slot" = a ]; then slot=b; else slot=a; fi
    reload_to "s3 #$i" "$slot"
    pids+=("$(main_pid)")
    sleep 1
  done
  stop_load s3

  if wait "$stream_pid"; then
    stream_bytes=$(stat -c %s /run/stream.out)
    expect "s3 download started before the reloads arrives whole (bytes)" "$stream_bytes" 5120
  else
    fail "s3 download started before the reloads: $(cat "$results/stream-err.txt")"
  fi
  expect "s3 NRestarts unchanged" "$(n_restarts)" "$restarts0"
  expect "s3 proxy.service still active" "$(active_state)" "active"
  expect "s3 ${RELOADS} reloads gave $((RELOADS + 1)) distinct pids" \
    "$(printf '%s\n' "${pids[@]}" | sort -u | wc -l)" "$((RELOADS + 1))"
  # Old processes drain and exit (drain_timeout is 20 s).
  if wait_for 150 only_main_pid_left; then
    pass "s3 every replaced process has exited"
  else
    fail "s3 processes besides MainPID $(main_pid) still in the unit: $(unit_pids)"
  fi
  expect "s3 serves after the reloads" "$(http_get -H 'Host: example.com' http://127.0.0.1:8080/docs/x)" "v2 /docs/x"
}

# failed_reload NAME SLOT: the reload to SLOT must fail and leave the old process serving.
failed_reload() {
  local name=$1 slot=$2 before after t0 t1
  before=$(main_pid)
  ln -sfn "/opt/proxy/$slot/proxyd" /etc/proxy/bin/proxyd
  t0=$(date +%s)
  if timeout 100 systemctl reload proxy.service >/dev/null 2>&1; then
    fail "$name: systemctl reload succeeded with the $slot binary"
  else
    t1=$(date +%s)
    pass "$name: systemctl reload fails ($((t1 - t0)) s)"
  fi
  after=$(main_pid)
  expect "$name: MainPID unchanged" "$after" "$before"
  expect "$name: proxy.service still active" "$(active_state)" "active"
  case "$(http_get http://127.0.0.1:8080/after-failure)" in
    "v1a /after-failure" | "v1b /after-failure") pass "$name: old process still serves HTTP" ;;
    *) fail "$name: HTTP after the failed reload" ;;
  esac
  expect "$name: old process still serves TCP" "$(tcp_roundtrip still-here)" "still-here"
  if wait_for 50 only_main_pid_left; then
    pass "$name: the failed new process is gone"
  else
    fail "$name: processes besides MainPID $(main_pid) left in the unit: $(unit_pids)"
  fi
}

scenario_4() {
  log "scenario 4: a broken new binary must not take over"
  systemctl start proxy.service
  local restarts0 good
  restarts0=$(n_restarts)
  good=$(basename "$(dirname "$(readlink /etc/proxy/bin/proxyd)")")
  start_load s4
  failed_reload "s4 exits at once" broken
  failed_reload "s4 never ready" hang
  if [ "$good" = a ]; then good=b; else good=a; fi
  reload_to "s4 restored binary" "$good"
  stop_load s4
  expect "s4 NRestarts unchanged" "$(n_restarts)" "$restarts0"
  expect "s4 serves after recovery" "$(http_get -H 'Host: example.com' http://127.0.0.1:8080/docs/y)" "v2 /docs/y"
}

# The inodes of the sockets listening on 127.0.0.1:PORT, sorted, on one line ("" if none).
listen_inodes() {
  ss -Hltne "sport = :$1" 2>/dev/null | grep -o 'ino:[0-9]*' | cut -d: -f2 | sort -n |
    tr '\n' ' ' | sed 's/ $//'
}
# Whether PID 1 (systemd) has the socket with inode $1 open: its fd store does.
pid1_holds() { [ -n "$1" ] && ls -l /proc/1/fd 2>/dev/null | grep -q "socket:\[$1\]"; }

fdstore_unit=proxy-fdstore.service
fd_main_pid() { systemctl show -P MainPID "$fdstore_unit"; }
fd_restarts() { systemctl show -P NRestarts "$fdstore_unit"; }
fd_active() { [ "$(systemctl show -P ActiveState "$fdstore_unit")" = active ]; }
fd_serves() {
  case "$(http_get http://127.0.0.1:8080/fdstore)" in
    "v1a /fdstore" | "v1b /fdstore") ;;
    *) return 1 ;;
  esac
  [ "$(tcp_roundtrip fdstore)" = fdstore ]
}
fd_new_main_pid() {
  local pid
  pid=$(fd_main_pid)
  [ "$pid" != 0 ] && [ "$pid" != "$1" ] && fd_active
}

# start_loop NAME: new HTTP and TCP connections back to back, in the background.
start_loop() {
  rm -f "/run/loop-$1.stop" "/run/loop-$1.json"
  timeout 200 python3 "$payload/connect_loop.py" --http 127.0.0.1:8080 --path /fdstore \
    --tcp 127.0.0.1:16379 --workers 2 --timeout 30 --duration 150 \
    --stop-file "/run/loop-$1.stop" --out "/run/loop-$1.json" >"$results/loop-$1.txt" 2>&1 &
  loop_pid=$!
  sleep 1
}
# stop_loop NAME: stops the loop; sets loop_ok, loop_refused, loop_other, loop_summary.
stop_loop() {
  # Some connections after the event, to the new process.
  sleep 1
  touch "/run/loop-$1.stop"
  wait "$loop_pid"
  read -r loop_ok loop_refused loop_other loop_summary < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["ok"], d["refused"], d["other_failures"],
      "%(ok)d ok, %(refused)d refused, %(other_failures)d other failures, slowest %(slowest_seconds)s s" % d,
      "; ".join(d["errors"][:3]))
' "/run/loop-$1.json" 2>/dev/null || echo "0 -1 -1 no-summary")
}

# check_loop NAME [refused-only]: PASS when the loop had successes and no refused
# connection, and (unless refused-only) no other failure either.
check_loop() {
  if [ "$loop_ok" -gt 0 ] && [ "$loop_refused" = 0 ] &&
    { [ "${2:-}" = refused-only ] || [ "$loop_other" = 0 ]; }; then
    pass "$1 client loop: $loop_summary"
  else
    fail "$1 client loop: $loop_summary"
  fi
}
fd_stored() { systemctl show -P NFileDescriptorStore "$fdstore_unit"; }

scenario_5() {
  log "scenario 5: proxyd binds its own listeners and keeps them in systemd's fd store"
  # The socket units would hold the same addresses.
  systemctl stop proxy.service proxy.socket proxy-listener@echo.socket
  if wait_for 100 test -z "$(listen_inodes 8080)$(listen_inodes 16379)"; then
    pass "s5 ports free after stopping the socket units"
  else
    fail "s5 ports still bound: 8080 [$(listen_inodes 8080)] 16379 [$(listen_inodes 16379)]"
  fi
  # The contrib unit without socket units, with a small fd store.
  sed -e 's/^Description=.*/Description=proxy reverse proxy (own listeners, fd store)/' \
    -e 's/^FileDescriptorStoreMax=.*/FileDescriptorStoreMax=16/' \
    "$payload/units/proxy.service" >"/etc/systemd/system/$fdstore_unit"
  systemctl daemon-reload
  expect "s5 unit: Type, NotifyAccess, FileDescriptorStoreMax, sockets" \
    "$(systemctl show -P Type "$fdstore_unit") $(systemctl show -P NotifyAccess "$fdstore_unit") $(systemctl show -P FileDescriptorStoreMax "$fdstore_unit") [$(systemctl show -P Sockets "$fdstore_unit")]" \
    "notify all 16 []"
  check "s5 systemd-analyze verify $fdstore_unit" systemd-analyze verify --man=no "$fdstore_unit"
  check "s5 start $fdstore_unit" timeout 100 systemctl start "$fdstore_unit"
  check "s5 serves HTTP and TCP" fd_serves

  local web0 echo0 pid0 pid1 restarts0 web1 echo1
  web0=$(listen_inodes 8080)
  echo0=$(listen_inodes 16379)
  expect "s5 NFileDescriptorStore after start" "$(fd_stored)" 2
  if pid1_holds "$web0" && pid1_holds "$echo0"; then
    pass "s5 systemd (PID 1) holds both listening sockets (inodes $web0, $echo0)"
  else
    fail "s5 PID 1 does not hold the listening sockets (8080 [$web0], 16379 [$echo0]); $(ss -Hltnp 'sport = :8080' | tr -s ' ')"
  fi

  # systemctl restart: stop (SIGTERM, the old process exits) then start.
  pid0=$(fd_main_pid)
  start_loop s5-restart
  check "s5 systemctl restart" timeout 100 systemctl restart "$fdstore_unit"
  stop_loop s5-restart
  check_loop "s5 restart"
  pid1=$(fd_main_pid)
  if [ "$pid1" != "$pid0" ] && fd_active; then pass "s5 restart: MainPID $pid0 -> $pid1"; else fail "s5 restart: MainPID $pid0 -> $pid1, $(systemctl show -P ActiveState "$fdstore_unit")"; fi
  expect "s5 restart keeps the listening sockets (inodes 8080, 16379)" \
    "$(listen_inodes 8080), $(listen_inodes 16379)" "$web0, $echo0"
  check "s5 serves after the restart" fd_serves
  expect "s5 NFileDescriptorStore after the restart" "$(fd_stored)" 2

  # A crash: SIGKILL, Restart=on-failure starts a new process after RestartSec=1s.
  restarts0=$(fd_restarts)
  start_loop s5-crash
  kill -9 "$pid1"
  if wait_for 300 fd_new_main_pid "$pid1"; then
    pass "s5 crash: restarted by Restart=on-failure, MainPID $pid1 -> $(fd_main_pid)"
  else
    fail "s5 crash: no new MainPID (still $(fd_main_pid), $(systemctl show -P ActiveState "$fdstore_unit"))"
  fi
  stop_loop s5-crash
  # Connections the killed process had accepted die with it; new ones must not be refused.
  check_loop "s5 crash" refused-only
  expect "s5 crash: NRestarts +1" "$(fd_restarts)" "$((restarts0 + 1))"
  expect "s5 crash keeps the listening sockets (inodes 8080, 16379)" \
    "$(listen_inodes 8080), $(listen_inodes 16379)" "$web0, $echo0"
  check "s5 serves after the crash" fd_serves
  expect "s5 NFileDescriptorStore after the crash" "$(fd_stored)" 2

  # stop, then start: the unit is fully stopped with no job queued, and systemd 252
  # empties the fd store (254+ keeps it with FileDescriptorStorePreserve=yes).
  check "s5 systemctl stop" timeout 100 systemctl stop "$fdstore_unit"
  expect "s5 after stop: nothing listens on 8080 and 16379" \
    "$(listen_inodes 8080)$(listen_inodes 16379)" ""
  expect "s5 NFileDescriptorStore after stop" "$(fd_stored)" 0
  check "s5 start after stop" timeout 100 systemctl start "$fdstore_unit"
  web1=$(listen_inodes 8080)
  echo1=$(listen_inodes 16379)
  if [ -n "$web1" ] && [ "$web1" != "$web0" ] && [ -n "$echo1" ] && [ "$echo1" != "$echo0" ]; then
    pass "s5 stop + start binds new sockets (8080: $web0 -> $web1, 16379: $echo0 -> $echo1)"
  else
    fail "s5 stop + start: 8080 $web0 -> [$web1], 16379 $echo0 -> [$echo1]"
  fi
  if pid1_holds "$web1" && pid1_holds "$echo1"; then
    pass "s5 the new sockets are stored again (NFileDescriptorStore $(fd_stored))"
  else
    fail "s5 PID 1 does not hold the new sockets (8080 [$web1], 16379 [$echo1])"
  fi

  # A listener whose address changed in the config: the stored socket on the old address
  # is dropped from the store and closed, the new address is bound and stored.
  sed -i 's/127.0.0.1:8080/127.0.0.1:8081/' /etc/proxy/proxy.toml
  check "s5 moved listener: systemctl restart" timeout 100 systemctl restart "$fdstore_unit"
  wait_for 20 sh -c 'curl -fsS --max-time 2 http://127.0.0.1:8081/fdstore >/dev/null' || true
  case "$(http_get http://127.0.0.1:8081/fdstore)" in
    "v1a /fdstore" | "v1b /fdstore") pass "s5 moved listener: served on the new address 8081" ;;
    *) fail "s5 moved listener: nothing served on 8081" ;;
  esac
  expect "s5 moved listener: nothing listens on the old address 8080" "$(listen_inodes 8080)" ""
  expect "s5 moved listener: NFileDescriptorStore" "$(fd_stored)" 2
  sed -i 's/127.0.0.1:8081/127.0.0.1:8080/' /etc/proxy/proxy.toml
  check "s5 moved back: systemctl restart" timeout 100 systemctl restart "$fdstore_unit"
  wait_for 20 fd_serves || true
  check "s5 moved back: serves on 8080" fd_serves

  # Control: the same restart without an fd store closes the sockets, so the inode
  # comparison above can tell the two apart.
  mkdir -p "/etc/systemd/system/$fdstore_unit.d"
  printf '[Service]\nFileDescriptorStoreMax=0\n' >"/etc/systemd/system/$fdstore_unit.d/no-store.conf"
  systemctl stop "$fdstore_unit"
  systemctl daemon-reload
  check "s5 control: start without an fd store" timeout 100 systemctl start "$fdstore_unit"
  web0=$(listen_inodes 8080)
  start_loop s5-control
  check "s5 control: systemctl restart" timeout 100 systemctl restart "$fdstore_unit"
  stop_loop s5-control
  web1=$(listen_inodes 8080)
  if [ -n "$web1" ] && [ "$web1" != "$web0" ]; then
    pass "s5 control: without the fd store a restart rebinds (8080: $web0 -> $web1)"
  else
    fail "s5 control: 8080 $web0 -> [$web1] without the fd store"
  fi
  log "s5 control client loop (no fd store, not a check): $loop_summary"

  systemctl stop "$fdstore_unit"
  rm -rf "/etc/systemd/system/$fdstore_unit.d"
  systemctl daemon-reload
  # Back to socket activation for whatever runs next.
  systemctl start proxy.socket proxy-listener@echo.socket
}

# The NixOS module's socket unit for a listener: proxy-listener@NAME-HASH, HASH the first
# 8 hex digits of the sha256 of the address (nixos-module/default.nix, listenerSocketName).
module_socket_unit() {
  echo "proxy-listener@$1-$(printf %s "$2" | sha256sum | cut -c1-8).socket"
}

# write_module_socket NAME ADDRESS: the unit file the module writes for a listener.
write_module_socket() {
  cat >"/etc/systemd/system/$(module_socket_unit "$1" "$2")" <<EOF
[Unit]
Description=proxy listener $1

[Socket]
ListenStream=$2
FileDescriptorName=$1
Service=proxy.service
FreeBind=yes
NoDelay=yes
Backlog=4096
EOF
}

# wants_socket UNIT: proxy.service wants the listener's unit, as the module's unit does.
wants_socket() {
  mkdir -p /etc/systemd/system/proxy.service.d
  printf '[Unit]\nWants=%s\n' "$1" >/etc/systemd/system/proxy.service.d/listeners.conf
}

tcp_roundtrip_on() { python3 "$payload/tcp_roundtrip.py" "127.0.0.1:$1" "$2"; }
echo_back_on_16379() { systemctl start proxy.service && [ "$(tcp_roundtrip_on 16379 back)" = back ]; }

scenario_6() {
  log "scenario 6: a listener moved by a switch (new socket unit name)"
  local old_addr=127.0.0.1:16379 new_addr=127.0.0.1:16380 old_unit new_unit pid0 pid1 bound
  old_unit=$(module_socket_unit echo "$old_addr")
  new_unit=$(module_socket_unit echo "$new_addr")

  # The echo listener as the module makes it (instead of contrib's template instance).
  systemctl stop proxy.service proxy-listener@echo.socket
  write_module_socket echo "$old_addr"
  wants_socket "$old_unit"
  systemctl daemon-reload
  check "s6 start proxy.service with the module's socket unit $old_unit" timeout 100 systemctl start proxy.service
  expect "s6 $old_unit is active" "$(systemctl show -P ActiveState "$old_unit")" active
  expect "s6 TCP through $old_addr" "$(tcp_roundtrip_on 16379 before)" before

  # The switch to a generation with echo on $new_addr, step by step as
  # switch-to-configuration does it.
  pid0=$(main_pid)
  sed -i "s/$old_addr/$new_addr/" /etc/proxy/proxy.toml
  check "s6 switch: stop the removed unit $old_unit" timeout 100 systemctl stop "$old_unit"
  rm "/etc/systemd/system/$old_unit"
  write_module_socket echo "$new_addr"
  wants_socket "$new_unit"
  systemctl daemon-reload
  check "s6 switch: restart proxy.service" timeout 100 systemctl restart proxy.service
  pid1=$(main_pid)
  if [ "$pid1" != "$pid0" ] && unit_is_active; then
    pass "s6 restarted: MainPID $pid0 -> $pid1"
  else
    fail "s6 restart: MainPID $pid0 -> $pid1, $(active_state)"
  fi
  expect "s6 the new unit $new_unit is active" "$(systemctl show -P ActiveState "$new_unit")" active
  expect "s6 the new unit listens on the new address" "$(systemctl show -P Listen "$new_unit")" "$new_addr (Stream)"
  expect "s6 TCP through the new address $new_addr" "$(tcp_roundtrip_on 16380 moved)" moved
  expect "s6 nothing listens on the old address $old_addr" "$(listen_inodes 16379)" ""
  expect "s6 HTTP still served" "$(http_get -H 'Host: example.com' http://127.0.0.1:8080/docs/z)" "v2 /docs/z"

  # Control: the same move under an unchanged unit name. A socket unit stays bound to its
  # old address until it is itself restarted, which switch-to-configuration does not do,
  # so proxy.service would keep getting the old socket.
  sed -i "s/^ListenStream=$new_addr/ListenStream=127.0.0.1:16381/" "/etc/systemd/system/$new_unit"
  systemctl daemon-reload
  check "s6 control: restart proxy.service" timeout 100 systemctl restart proxy.service
  bound="16380:$([ -n "$(listen_inodes 16380)" ] && echo bound) 16381:$([ -n "$(listen_inodes 16381)" ] && echo bound)"
  expect "s6 control: an edited socket unit keeps its old address" "$bound" "16380:bound 16381:"

  # Back to contrib's units for whatever runs next.
  systemctl stop proxy.service "$new_unit"
  rm -f "/etc/systemd/system/$new_unit" /etc/systemd/system/proxy.service.d/listeners.conf
  sed -i "s/$new_addr/$old_addr/" /etc/proxy/proxy.toml
  systemctl daemon-reload
  systemctl start proxy-listener@echo.socket
  check "s6 back to contrib's units: TCP on $old_addr" echo_back_on_16379
}

exec > >(tee -a "$results/harness.log") 2>&1
install_proxy
for s in $SCENARIOS; do
  if [ "$(type -t "scenario_$s")" != function ]; then
    fail "unknown scenario $s"
    continue
  fi
  "scenario_$s"
done

dump_journal
if [ "$failures" -gt 0 ]; then
  echo "RESULT: FAIL ($failures failed, $passes passed; scenarios: $SCENARIOS)"
  echo "---- last lines of the proxy journal ----"
  tail -n 60 "$results/journal-proxy.txt"
  exit 1
fi
echo "RESULT: PASS ($passes checks; scenarios: $SCENARIOS)"
