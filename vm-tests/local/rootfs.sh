#!/usr/bin/env bash
# Builds the Debian bookworm root file system the local harness boots with systemd-nspawn.
#
# usage: rootfs.sh DEST
#
# run.sh keys its cache by the hash of this file, so any edit here rebuilds the rootfs on
# the next run. Everything that changes per run (binaries, units, scenarios) comes in
# through the /payload bind mount instead, so it does not belong here.
set -euo pipefail

dest=${1:?usage: rootfs.sh DEST}
extra=$(mktemp -d)
trap 'rm -rf "$extra"' EXIT

# Runs the payload once the container has booted; its exit status becomes the
# container's, and so systemd-nspawn's.
cat >"$extra/proxy-test-runner" <<'EOF'
#!/bin/bash
rc=0
/bin/bash /payload/entry || rc=$?
systemctl --no-block exit "$rc"
EOF

# Gated on a flag on systemd's command line, so booting the rootfs by hand gives a plain
# system.
cat >"$extra/proxy-test-runner.service" <<'EOF'
[Unit]
Description=Run the proxy test payload
ConditionKernelCommandLine=proxy.test=1
After=multi-user.target

[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/usr/local/sbin/proxy-test-runner

[Install]
WantedBy=multi-user.target
EOF

masked="console-getty.service getty@.service serial-getty@.service container-getty@.service
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer
  systemd-timesyncd.service"

mmdebstrap \
  --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,iproute2,procps,python3,curl \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='systemctl --root="$1" set-default multi-user.target' \
  --customize-hook="for u in $(echo $masked); do ln -sf /dev/null \"\$1/etc/systemd/system/\$u\"; done" \
  --customize-hook="install -m 0755 '$extra/proxy-test-runner' \"\$1/usr/local/sbin/proxy-test-runner\"" \
  --customize-hook="install -m 0644 '$extra/proxy-test-runner.service' \"\$1/etc/systemd/system/proxy-test-runner.service\"" \
  --customize-hook='systemctl --root="$1" enable proxy-test-runner.service' \
  --customize-hook='rm -f "$1/etc/machine-id" && touch "$1/etc/machine-id"' \
  bookworm "$dest"
