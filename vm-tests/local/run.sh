#!/usr/bin/env bash
# Boots a real systemd (systemd-nspawn --boot on a Debian bookworm rootfs), installs the
# built proxyd/proxyctl with the units from contrib/systemd, and runs the scenarios of
# scenarios.sh in the container's own network namespace. The NixOS VM tests (vm-tests/*.nix)
# check the same behaviour through the NixOS module on hosts with Nix and KVM.
#
# usage: vm-tests/local/run.sh [--bin-dir DIR] [--scenarios "1 3 4 5 6"] [--reloads N]
#                              [--timeout SECONDS] [--cache DIR] [--keep]
#
#   --bin-dir DIR   where proxyd and proxyctl are (default: $CARGO_TARGET_DIR/release,
#                   else target/release of this repository)
#   --scenarios     which scenarios to run (default "1 3 4 5 6")
#   --reloads N     reloads in scenario 3 (default 5)
#   --config FILE   proxyd config to test with (default: proxy.toml next to this script;
#                   the scenarios expect its listeners, pools and routes)
#   --timeout S     upper bound of the container run (default 600)
#   --cache DIR     where the rootfs is cached (default /var/cache/proxy-nspawn); it is
#                   rebuilt when missing or when rootfs.sh changes
#   --keep          keep the payload and result directories
#
# Needs root. Installs mmdebstrap and systemd-container with apt-get when missing.
# Exits 0 only if every check passed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin_dir=""
scenarios="1 3 4 5 6"
reloads=5
run_timeout=600
config=""
cache=/var/cache/proxy-nspawn
keep=0

while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --reloads) reloads=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --timeout) run_timeout=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

say() { echo "run.sh: $*"; }
die() {
  echo "FAIL run.sh: $*"
  exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (systemd-nspawn, mmdebstrap)"

ensure_host_packages() {
  local missing=()
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
      die "apt-get install ${missing[*]} failed"
  fi
}

# The cached rootfs is keyed by the hash of its recipe: an edited rootfs.sh gets a new
# rootfs, an unchanged one is reused across runs and clones.
ensure_rootfs() {
  local key
  key=$(sha256sum "$here/rootfs.sh" | cut -c1-16)
  rootfs="$cache/rootfs-$key"
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock -w 900 9 || die "could not lock $cache"
  if [ ! -e "$rootfs/.complete" ]; then
    say "building the rootfs $rootfs (once)"
    local tmp="$cache/.build-$key-$$"
    rm -rf "$tmp"
    if ! timeout 900 bash "$here/rootfs.sh" "$tmp" >"$cache/build-$key.log" 2>&1; then
      rm -rf "$tmp"
      tail -n 20 "$cache/build-$key.log"
      die "rootfs build failed (log: $cache/build-$key.log)"
    fi
    touch "$tmp/.complete"
    rm -rf "$rootfs"
    mv "$tmp" "$rootfs"
    # Recipes that no longer exist: their rootfs are dead weight.
    find "$cache" -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$key" -exec rm -rf {} +
  fi
  flock -u 9
}

find_binaries() {
  if [ -z "$bin_dir" ]; then
    bin_dir=${CARGO_TARGET_DIR:-$repo/target}/release
  fi
  for b in proxyd proxyctl; do
    [ -x "$bin_dir/$b" ] || die "no executable $bin_dir/$b (build with: cargo build --release -p proxy -p proxyctl, or pass --bin-dir)"
  done
}

make_payload() {
  work=$(mktemp -d /var/tmp/proxy-nspawn-run.XXXXXX)
  payload=$work/payload
  results=$work/results
  mkdir -p "$payload/bin" "$payload/units" "$results"
  install -m 0755 "$bin_dir/proxyd" "$bin_dir/proxyctl" "$payload/bin/"
  install -m 0644 "$repo"/contrib/systemd/proxy.service "$repo"/contrib/systemd/proxy.socket \
    "$repo"/contrib/systemd/proxy-listener@.socket "$repo"/contrib/systemd/proxy.sysusers \
    "$payload/units/"
  install -m 0755 "$here/scenarios.sh" "$payload/entry"
  install -m 0644 "$here/load.py" "$here/upstream.py" "$here/tcp_roundtrip.py" \
    "$here/connect_loop.py" "$payload/"
  install -m 0644 "${config:-$here/proxy.toml}" "$payload/proxy.toml"
  printf 'SCENARIOS="%s"\nRELOADS=%s\n' "$scenarios" "$reloads" >"$payload/params"
  chmod 0755 "$work" "$payload" "$results"
}

cleanup() {
  if [ "$keep" = 1 ]; then
    say "kept $work"
  elif [ -n "${work:-}" ]; then
    rm -rf "$work"
  fi
}

ensure_host_packages
ensure_rootfs
find_binaries
make_payload
trap cleanup EXIT

say "binaries: $bin_dir ($("$bin_dir/proxyd" --version 2>&1 | head -n 1))"
say "rootfs: $rootfs; scenarios: $scenarios; timeout ${run_timeout}s"

rc=0
timeout --kill-after=15 "$run_timeout" \
  systemd-nspawn --quiet --boot --register=no --keep-unit --private-network \
  --volatile=overlay --directory="$rootfs" --machine="proxy-test-$$" \
  --bind-ro="$payload:/payload" --bind="$results:/results" \
  -- proxy.test=1 systemd.show_status=false >"$results/console.txt" 2>&1 || rc=$?

# The console carries the boot noise too; the scenarios' own output is in harness.log.
log=$results/harness.log
[ -e "$log" ] && cat "$log"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "FAIL run.sh: the container run exceeded ${run_timeout}s; console tail:"
  tail -n 40 "$results/console.txt"
elif ! grep -q '^RESULT: ' "$log" 2>/dev/null; then
  echo "FAIL run.sh: the scenarios did not finish (exit $rc); console tail:"
  tail -n 40 "$results/console.txt"
fi
[ "$rc" = 0 ] && ! grep -q '^RESULT: PASS' "$log" 2>/dev/null && rc=1
if [ "$rc" != 0 ]; then
  keep=1
  say "exit $rc; logs in $results"
fi
exit "$rc"
