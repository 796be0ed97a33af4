# A generation whose proxyd fails (exits at once, or never becomes ready): the switch
# reports the failure, and the old process keeps serving without a failed request.
# Switching back to a good generation then upgrades normally.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
in
pkgs.testers.runNixOSTest {
  name = "proxy-failed-upgrade";

  nodes = {
    backend = common.backendNode;
    client = common.clientNode;
    proxy = { lib, ... }: {
      imports = [ common.proxyNode ];
      # The default is 30s; the hanging binary is given up on sooner.
      services.proxy.upgradeTimeout = "10s";
      specialisation.broken.configuration.services.proxy.package = lib.mkForce common.brokenPackage;
      specialisation.hanging.configuration.services.proxy.package = lib.mkForce common.hangingPackage;
    };
  };

  testScript = { nodes, ... }:
    let
      base = nodes.proxy.system.build.toplevel;
    in
    ''
      ${common.prelude}

      start_all()
      backend.wait_for_open_port(9003)
      backend.wait_for_open_port(9101)
      wait_for_proxy(proxy, client)
      restarts = n_restarts(proxy)
      serving = main_pid(proxy)

      for name in ("broken", "hanging"):
          with subtest(f"a {name} binary: the switch fails, the old process serves"):
              start_load(client, name)
              status, output = switch(proxy, f"${base}/specialisation/{name}")
              print(output)
              assert status != 0, f"switch to {name} succeeded"
              assert "proxy.service" in unit_list(output, "reloading"), output
              assert main_pid(proxy) == serving, "MainPID changed"
              proxy.succeed("systemctl is-active proxy.service")
              assert n_restarts(proxy) == restarts, "proxy.service was restarted"
              proxy.wait_until_succeeds(
                  f"test \"$(cat /sys/fs/cgroup/system.slice/proxy.service/cgroup.procs)\" = {serving}",
                  timeout=30,
              )
              assert_serves(client)
              stop_load(client, name)

      with subtest("switching back to a good generation upgrades"):
          start_load(client, "recovery")
          status, output = switch(proxy, "${base}")
          print(output)
          assert status == 0, output
          assert_reloaded_not_restarted(output)
          assert main_pid(proxy) != serving
          assert n_restarts(proxy) == restarts
          stop_load(client, "recovery")
          assert_serves(client)
    '';
}
