# A generation switch that changes the package or the settings reloads proxy.service:
# the running proxyd hands its sockets to the new binary. Under load from another node:
# no failed request, no restart, a new MainPID running the new generation's binary, and
# a download started before the switch completes. A switch that moves a listener to
# another address stops its old socket unit, starts a new one and restarts proxy.service,
# which then serves on the new address only.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
in
pkgs.testers.runNixOSTest {
  name = "proxy-upgrade";

  nodes = {
    backend = common.backendNode;
    client = common.clientNode;
    proxy = { lib, ... }: {
      imports = [ common.proxyNode ];

      specialisation.upgraded.configuration = {
        services.proxy.package = lib.mkForce common.nextPackage;
      };

      # The echo listener on another port: a new socket unit.
      specialisation.moved.configuration = {
        services.proxy.settings.listeners = lib.mkForce [
          { name = "web"; protocol = "http"; address = "0.0.0.0:80"; }
          { name = "echo"; protocol = "tcp"; address = "0.0.0.0:6380"; pool = "echo-servers"; }
        ];
      };

      specialisation.reconfigured.configuration = {
        services.proxy.logLevel = "debug";
        services.proxy.settings.routes = lib.mkForce [
          { name = "new-on-v2"; listener = "web"; path_prefix = "/new"; pool = "v2"; }
          { name = "docs-on-v2"; listener = "web"; host = "example.com"; path_prefix = "/docs"; pool = "v2"; }
          { name = "default"; listener = "web"; path_prefix = "/"; pool = "v1"; }
        ];
      };
    };
  };

  testScript = { nodes, ... }:
    let
      base = nodes.proxy.system.build.toplevel;
      echoUnit = nodes.proxy.services.proxy.listenerSocketUnits.echo;
    in
    ''
      ${common.prelude}

      start_all()
      backend.wait_for_open_port(9003)
      backend.wait_for_open_port(9101)
      wait_for_proxy(proxy, client)
      restarts = n_restarts(proxy)


      def upgrade_to(name, toplevel):
          before = main_pid(proxy)
          start_load(client, name)
          size = start_download(client, name)
          client.sleep(1)
          status, output = switch(proxy, toplevel)
          print(output)
          assert status == 0, f"switch to {name} failed ({status})"
          assert_reloaded_not_restarted(output)
          after = main_pid(proxy)
          assert after != before, f"{name}: MainPID still {before}"
          exe = proxy.succeed(f"readlink /proc/{after}/exe").strip()
          want = proxy.succeed("readlink -f /etc/proxy/bin/proxyd").strip()
          assert exe == want, f"{name}: MainPID runs {exe}, want {want}"
          check_download(client, name, size)
          stop_load(client, name)
          assert n_restarts(proxy) == restarts, "proxy.service was restarted"
          proxy.succeed("systemctl is-active proxy.service")
          assert_serves(client)


      with subtest("a new package reloads and hands over"):
          old_exe = proxy.succeed(f"readlink /proc/{main_pid(proxy)}/exe").strip()
          upgrade_to("upgraded", "${base}/specialisation/upgraded")
          new_exe = proxy.succeed(f"readlink /proc/{main_pid(proxy)}/exe").strip()
          assert new_exe != old_exe, "the binary did not change"
          assert new_exe.startswith("${common.nextPackage}"), new_exe

      with subtest("changed settings reload and hand over"):
          upgrade_to("reconfigured", "${base}/specialisation/reconfigured")
          out = client.succeed("curl -sf http://proxy/new/page").strip()
          assert out == "v2 /new/page", out

      with subtest("back to the first generation"):
          upgrade_to("base", "${base}")
          client.fail("curl -sf http://proxy/new/page | grep -q '^v2'")

      with subtest("the journal shows reloads, never a stop"):
          journal = proxy.succeed("journalctl -b -u proxy.service")
          assert journal.count("Reloaded proxy.service") >= 3, journal
          assert "Stopping proxy.service" not in journal, journal
          assert "Stopped proxy.service" not in journal, journal

      with subtest("replaced processes drained and exited"):
          proxy.wait_until_succeeds(
              "test \"$(systemctl show -P MainPID proxy.service)\" = "
              "\"$(cat /sys/fs/cgroup/system.slice/proxy.service/cgroup.procs)\"",
              timeout=60,
          )

      with subtest("a moved listener: old socket unit stopped, new one started, proxy.service restarted"):
          status, output = switch(proxy, "${base}/specialisation/moved")
          print(output)
          assert status == 0, f"switch to moved failed ({status})"
          assert "${echoUnit}" in unit_list(output, "stopping"), output
          assert "proxy.service" in unit_list(output, "restarting"), output
          active = proxy.succeed(
              "systemctl list-units --plain --no-legend --state=active 'proxy-listener@echo-*.socket' | cut -d' ' -f1"
          ).split()
          assert len(active) == 1 and active[0] != "${echoUnit}", active
          listen = proxy.succeed(f"systemctl show -P Listen {active[0]}")
          assert "0.0.0.0:6380 " in listen, listen
          proxy.wait_for_unit("proxy.service")
          client.wait_until_succeeds("proxy-test-tcp proxy:6380 moved | grep -qx moved", timeout=60)
          proxy.wait_for_closed_port(6379)
          client.fail("proxy-test-tcp proxy:6379 old-address")

      with subtest("moved back: the first unit listens again"):
          status, output = switch(proxy, "${base}")
          print(output)
          assert status == 0, f"switch back failed ({status})"
          assert "proxy.service" in unit_list(output, "restarting"), output
          proxy.wait_for_unit("${echoUnit}")
          proxy.wait_for_unit("proxy.service")
          client.wait_until_succeeds("proxy-test-tcp proxy:6379 back | grep -qx back", timeout=60)
          proxy.wait_for_closed_port(6380)
          assert_serves(client)
    '';
}
