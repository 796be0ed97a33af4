# switch-to-configuration restarts a unit whose text changed and only reloads one whose
# reload triggers changed. So proxy.service must read the same for any package and any
# settings, apart from X-Reload-Triggers: evaluate the module for two packages and two
# sets of settings and compare. Pure evaluation: nothing is built but the comparison.
{ pkgs, nixosModule, package }:

let
  inherit (pkgs) lib;
  common = import ./lib.nix { inherit pkgs nixosModule package; };

  base = common.evalProxyHost { };
  otherPackage = common.evalProxyHost {
    services.proxy.package = lib.mkForce common.nextPackage;
  };
  otherSettings = common.evalProxyHost {
    services.proxy = {
      logLevel = "debug";
      drainTimeout = "45s";
      upgradeTimeout = "20s";
      settings.pools = lib.mkAfter [{ name = "v3"; upstreams = [ "192.0.2.20:9000" ]; }];
      settings.routes = lib.mkBefore [{ name = "v3"; listener = "web"; path_prefix = "/v3"; pool = "v3"; }];
    };
  };
  # A new listener needs a new socket passed at start: that one must restart.
  otherListeners = common.evalProxyHost {
    services.proxy.settings.listeners = lib.mkAfter [
      { name = "extra"; protocol = "http"; address = "0.0.0.0:8081"; }
    ];
  };

  unitText = config: name:
    builtins.unsafeDiscardStringContext config.systemd.units.${name}.text;

  unitFiles = label: config: pkgs.runCommand "proxy-units-${label}" { } ''
    mkdir $out
    cp ${pkgs.writeText "proxy.service" (unitText config "proxy.service")} $out/proxy.service
    cp ${pkgs.writeText "web.socket" (unitText config config.services.proxy.listenerSocketUnits.web)} $out/web.socket
    cp ${pkgs.writeText "echo.socket" (unitText config config.services.proxy.listenerSocketUnits.echo)} $out/echo.socket
  '';

  packagePath = builtins.unsafeDiscardStringContext "${package}";

  stableBinary = config: builtins.unsafeDiscardStringContext
    config.environment.etc."proxy/bin/proxyd".source;
in
assert lib.assertMsg (stableBinary base != stableBinary otherPackage)
  "/etc/proxy/bin/proxyd must follow services.proxy.package";
pkgs.runCommand "proxy-unit-stability" { } ''
  set -eu
  base=${unitFiles "base" base}
  strip() { grep -v '^X-Reload-Triggers=' "$1"; }

  for variant in ${unitFiles "other-package" otherPackage} ${unitFiles "other-settings" otherSettings}; do
    for unit in proxy.service web.socket echo.socket; do
      if ! diff -u <(strip $base/$unit) <(strip $variant/$unit); then
        echo "FAIL: $unit changes with $variant beyond X-Reload-Triggers" >&2
        exit 1
      fi
    done
    if diff -q $base/proxy.service $variant/proxy.service >/dev/null; then
      echo "FAIL: X-Reload-Triggers of proxy.service does not follow $variant" >&2
      exit 1
    fi
  done

  listeners=${unitFiles "other-listeners" otherListeners}
  if diff -q <(strip $base/proxy.service) <(strip $listeners/proxy.service) >/dev/null; then
    echo "FAIL: a new listener must restart proxy.service (its sockets come at start)" >&2
    exit 1
  fi

  if grep -F '${packagePath}' $base/proxy.service; then
    echo "FAIL: proxy.service names the package's store path" >&2
    exit 1
  fi
  grep -qx 'X-StopIfChanged=false' $base/proxy.service
  grep -qx 'Type=notify' $base/proxy.service
  grep -qx 'NotifyAccess=all' $base/proxy.service
  grep -qx 'ExecStart=/etc/proxy/bin/proxyd --config /etc/proxy/proxy.toml' $base/proxy.service
  grep -qx 'ExecReload=/etc/proxy/bin/proxyctl --socket /run/proxy/mgmt.sock upgrade --wait' $base/proxy.service
  grep -qx 'FileDescriptorName=web' $base/web.socket
  grep -qx 'Service=proxy.service' $base/web.socket
  grep -qx 'FreeBind=true' $base/web.socket

  echo "proxy.service is stable across packages and settings" > $out
''
