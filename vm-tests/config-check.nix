# A mistake in services.proxy.settings fails the build of the system (proxyd check-config
# runs at build time), with the file, line and field in the message.
{ pkgs, nixosModule, package }:

let
  inherit (pkgs) lib;
  common = import ./lib.nix { inherit pkgs nixosModule package; };

  configOf = extraModule:
    (common.evalProxyHost extraModule).environment.etc."proxy/proxy.toml".source;

  good = configOf { };

  # A route to a pool that does not exist.
  danglingPool = pkgs.testers.testBuildFailure (configOf {
    services.proxy.settings.routes = lib.mkAfter [
      { name = "lost"; listener = "web"; path_prefix = "/lost"; pool = "no-such-pool"; }
    ];
  });

  # A misspelt key in a freeform section.
  unknownKey = pkgs.testers.testBuildFailure (configOf {
    services.proxy.settings.server.stat_dir = "/var/lib/proxy";
  });
in
pkgs.runCommand "proxy-config-check" { } ''
  set -eu
  test -s ${good}

  log=$(cat ${danglingPool}/testBuildFailure.log)
  echo "$log"
  grep -q 'proxy.toml:[0-9]*: routes' <<<"$log"
  grep -q 'no-such-pool' <<<"$log"

  log=$(cat ${unknownKey}/testBuildFailure.log)
  echo "$log"
  grep -q 'stat_dir' <<<"$log"

  touch $out
''
