# Routes from `settings`: HTTP and TCP through the proxy to upstreams on another node,
# with the listening sockets owned by systemd (port 80 without any capability) and
# proxyctl usable by members of the group proxy only.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
in
pkgs.testers.runNixOSTest {
  name = "proxy-basic";

  nodes = {
    backend = common.backendNode;
    proxy = {
      imports = [ common.proxyNode ];
      users.users.operator = { isNormalUser = true; extraGroups = [ "proxy" ]; };
      users.users.outsider.isNormalUser = true;
    };
    client = common.clientNode;
  };

  testScript = { nodes, ... }:
    let
      units = nodes.proxy.services.proxy.listenerSocketUnits;
    in
    ''
      ${common.prelude}

      start_all()
      backend.wait_for_unit("upstream-v1a.service")
      backend.wait_for_open_port(9003)
      backend.wait_for_open_port(9101)

      with subtest("the sockets belong to systemd; the daemon has no capabilities"):
          proxy.wait_for_unit("${units.web}")
          proxy.wait_for_unit("${units.echo}")
          wait_for_proxy(proxy, client)
          pid = main_pid(proxy)
          caps = proxy.succeed(f"grep -E '^Cap(Eff|Amb|Bnd):' /proc/{pid}/status")
          assert all(line.split()[1] == "0000000000000000" for line in caps.splitlines()), caps
          proxy.succeed(f"test \"$(stat -c %U /proc/{pid})\" = proxy")

      with subtest("HTTP: the default route balances over v1"):
          seen = {client.succeed("curl -sf http://proxy/rr").strip() for _ in range(6)}
          assert seen == {"v1a /rr", "v1b /rr"}, seen

      with subtest("HTTP: host + path prefix route to v2"):
          out = client.succeed("curl -sf -H 'Host: example.com' http://proxy/docs/intro").strip()
          assert out == "v2 /docs/intro", out
          out = client.succeed("curl -sf -H 'Host: other.test' http://proxy/docs/intro").strip()
          assert out.startswith("v1"), out

      with subtest("TCP: the echo listener reaches the echo pool"):
          assert client.succeed("proxy-test-tcp proxy:6379 name").strip() == "echo"
          assert client.succeed("proxy-test-tcp proxy:6379 'hello, proxy'").strip() == "hello, proxy"

      with subtest("the admin listener stays on loopback"):
          proxy.succeed("curl -sf http://127.0.0.1:4208/healthz")
          client.fail("curl -sf --max-time 3 http://proxy:4208/healthz")

      with subtest("proxyctl: on PATH, root and the group proxy may use it, others not"):
          proxy.succeed("proxyctl status")
          proxy.succeed("su -l operator -c 'proxyctl status'")
          proxy.fail("su -l outsider -c 'proxyctl status'")
          proxy.succeed("test \"$(stat -c '%a %G' /run/proxy/mgmt.sock)\" = '660 proxy'")

      with subtest("the checked config and the stable paths are in /etc"):
          proxy.succeed("proxyd check-config /etc/proxy/proxy.toml")
          proxy.succeed("systemctl cat proxy.service | grep -qx 'ExecStart=/etc/proxy/bin/proxyd --config /etc/proxy/proxy.toml'")
    '';
}
