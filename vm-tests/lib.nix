# What the VM tests share: the test tools (the same Python scripts the local harness
# uses), package variants for upgrade tests, and the node configurations.
{ pkgs, nixosModule, package }:

let
  inherit (pkgs) lib;

  pythonTool = name: file: pkgs.writeShellScriptBin name ''
    exec ${lib.getExe pkgs.python3} ${file} "$@"
  '';

  # A proxyd that passes `check-config` (so the system builds) but misbehaves when run.
  misbehavingPackage = name: behaviour: pkgs.runCommand "proxy-${name}-${package.version}"
    {
      meta.mainProgram = "proxyd";
    } ''
    mkdir -p $out/bin
    ln -s ${package}/bin/proxyctl $out/bin/proxyctl
    cat > $out/bin/proxyd <<'EOF'
    #!${pkgs.runtimeShell}
    case "$1" in
      check-config | --version) exec ${package}/bin/proxyd "$@" ;;
    esac
    ${behaviour}
    EOF
    chmod +x $out/bin/proxyd
  '';
in
rec {
  tools = {
    upstream = pythonTool "proxy-test-upstream" ./local/upstream.py;
    load = pythonTool "proxy-test-load" ./local/load.py;
    tcpRoundtrip = pythonTool "proxy-test-tcp" ./local/tcp_roundtrip.py;
  };

  # The same source under another version: another store path, so switching to it is an
  # upgrade of the running proxy.
  nextPackage = package.overrideAttrs (old: { version = "${old.version}-next"; });

  # Exits at once when started as a daemon.
  brokenPackage = misbehavingPackage "broken" ''
    echo "broken proxyd: exiting" >&2
    exit 1
  '';

  # Never reports ready: the upgrade must give up after upgrade_timeout.
  hangingPackage = misbehavingPackage "hanging" ''
    echo "hanging proxyd: never ready" >&2
    exec sleep 3600
  '';

  # Upstreams: v1a/v1b/v2 answer HTTP with "<name> <path>", echo is a TCP echo server.
  backendNode = {
    networking.firewall.allowedTCPPorts = [ 9001 9002 9003 9101 ];
    systemd.services = lib.mapAttrs'
      (name: args: lib.nameValuePair "upstream-${name}" {
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          ExecStart = "${tools.upstream}/bin/proxy-test-upstream --name ${name} ${args}";
          DynamicUser = true;
        };
      })
      {
        v1a = "--http 0.0.0.0:9001";
        v1b = "--http 0.0.0.0:9002";
        v2 = "--http 0.0.0.0:9003";
        echo = "--tcp 0.0.0.0:9101";
      };
  };

  # Routes of the tests: everything to v1 except example.com/docs, which goes to v2;
  # port 6379 forwards TCP to the echo server.
  settingsFor = backendAddress: {
    listeners = [
      { name = "web"; protocol = "http"; address = "0.0.0.0:80"; }
      { name = "echo"; protocol = "tcp"; address = "0.0.0.0:6379"; pool = "echo-servers"; }
    ];
    pools = [
      {
        name = "v1";
        upstreams = [ "${backendAddress}:9001" "${backendAddress}:9002" ];
        health = { path = "/healthz"; interval = "1s"; };
      }
      { name = "v2"; upstreams = [ "${backendAddress}:9003" ]; }
      { name = "echo-servers"; balance = "ordered"; upstreams = [ "${backendAddress}:9101" ]; }
    ];
    routes = [
      { name = "docs-on-v2"; listener = "web"; host = "example.com"; path_prefix = "/docs"; pool = "v2"; }
      { name = "default"; listener = "web"; path_prefix = "/"; pool = "v1"; }
    ];
  };

  proxyNode = { nodes, ... }: {
    imports = [ nixosModule ];
    services.proxy = {
      enable = true;
      inherit package;
      openFirewall = true;
      settings = settingsFor nodes.backend.networking.primaryIPAddress;
    };
    environment.systemPackages = [ tools.tcpRoundtrip pkgs.curl ];
  };

  # The configuration of a host with services.proxy, evaluated without building or
  # booting it (for checks on the generated units and config).
  evalProxyHost = extraModule: (import "${pkgs.path}/nixos/lib/eval-config.nix" {
    inherit (pkgs.stdenv.hostPlatform) system;
    inherit pkgs;
    modules = [
      nixosModule
      {
        boot.isContainer = true;
        system.stateVersion = lib.trivial.release;
        services.proxy = {
          enable = true;
          inherit package;
          settings = settingsFor "192.0.2.10";
        };
      }
      extraModule
    ];
  }).config;

  clientNode = {
    environment.systemPackages = [ pkgs.curl tools.load tools.tcpRoundtrip ];
  };

  # Python helpers for the test scripts.
  prelude = ''
    import json
    import re


    def main_pid(machine):
        return int(machine.succeed("systemctl show -P MainPID proxy.service").strip())


    def n_restarts(machine):
        return int(machine.succeed("systemctl show -P NRestarts proxy.service").strip())


    def wait_for_proxy(proxy, client):
        # The listener sockets are wanted by sockets.target.
        proxy.wait_for_unit("sockets.target")
        proxy.wait_for_unit("proxy.service")
        client.wait_until_succeeds("curl -sf --max-time 5 http://proxy/ready-check", timeout=60)


    def start_load(client, name, seconds=120):
        """Bounded load (keep-alive, new connections, TCP, one held TCP stream) until stop_load."""
        client.succeed(
            f"systemd-run --unit=load-{name} --property=RemainAfterExit=yes "
            f"proxy-test-load --http proxy:80 --path /load --keepalive 4 --fresh 4 "
            f"--tcp-addr proxy:6379 --tcp 2 --hold-tcp --duration {seconds} "
            f"--stop-file /tmp/stop-{name} --out /tmp/load-{name}.json"
        )
        client.sleep(1)


    def stop_load(client, name):
        """Stops the load and asserts that no request failed."""
        client.succeed(f"touch /tmp/stop-{name}")
        client.wait_until_succeeds(f"test -e /tmp/load-{name}.json", timeout=60)
        result = json.loads(client.succeed(f"cat /tmp/load-{name}.json"))
        print(f"load {name}: {result}")
        assert result["ok"] > 0, f"load {name}: no request succeeded"
        assert result["failed"] == 0, f"load {name}: {result['failed']} failed: {result['errors']}"


    def start_download(client, name, seconds=6):
        """A streamed response that is still running when the switch happens."""
        client.succeed(
            f"systemd-run --unit=download-{name} --property=RemainAfterExit=yes "
            f"curl -sS --fail --max-time 120 -o /tmp/download-{name} "
            f"'http://proxy/stream?seconds={seconds}'"
        )
        return seconds * 10 * 64


    def check_download(client, name, expected_bytes):
        client.wait_until_succeeds(
            f"systemctl show -P SubState download-{name} | grep -qE '^(exited|failed)$'", timeout=120
        )
        client.succeed(f"systemctl show -P Result download-{name} | grep -qx success")
        size = int(client.succeed(f"stat -c %s /tmp/download-{name}").strip())
        assert size == expected_bytes, f"download {name}: {size} bytes, want {expected_bytes}"


    def switch(machine, toplevel):
        """switch-to-configuration test; returns (exit status, output)."""
        return machine.execute(f"{toplevel}/bin/switch-to-configuration test 2>&1")


    def unit_list(output, verb):
        """Units a switch-to-configuration run reported as `verb` (reloading, restarting, ...)."""
        units = []
        for m in re.finditer(rf"^{verb} the following units: (.*)$", output, re.M):
            units += [u.strip() for u in m.group(1).split(",")]
        return units


    def assert_reloaded_not_restarted(output):
        assert "proxy.service" in unit_list(output, "reloading"), output
        for verb in ("restarting", "stopping", "starting"):
            assert "proxy.service" not in unit_list(output, verb), f"proxy.service was {verb}: {output}"


    def assert_serves(client):
        body = client.succeed("curl -sf --max-time 5 http://proxy/probe").strip()
        assert body in ("v1a /probe", "v1b /probe"), body
        assert client.succeed("proxy-test-tcp proxy:6379 probe").strip() == "probe"
  '';
}
