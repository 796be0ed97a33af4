# Fleet mode (`[cluster]`): two proxy hosts share their API-owned objects through one
# etcd node. A pool and a route created with proxyctl on one host are served by the other;
# `proxyctl cluster status` lists both; with etcd stopped both keep serving, say they are
# stale, and refuse writes; when etcd is back they follow it again without a restart.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };

  fleetNode = name: { nodes, lib, ... }: {
    imports = [ common.proxyNode ];
    services.proxy.settings = {
      # The hosts' own objects: none, so every route comes from the fleet.
      pools = lib.mkForce [ ];
      routes = lib.mkForce [ ];
      listeners = lib.mkForce [
        { name = "web"; protocol = "http"; address = "0.0.0.0:80"; }
      ];
      cluster = {
        node_name = name;
        etcd = {
          endpoints = [ "http://${nodes.etcd.networking.primaryIPAddress}:2379" ];
          prefix = "/proxy/vmtest";
        };
      };
    };
  };
in
pkgs.testers.runNixOSTest {
  name = "proxy-fleet";

  nodes = {
    backend = common.backendNode;
    client = common.clientNode;

    etcd = { nodes, ... }: {
      services.etcd = {
        enable = true;
        listenClientUrls = [ "http://0.0.0.0:2379" ];
        advertiseClientUrls = [ "http://${nodes.etcd.networking.primaryIPAddress}:2379" ];
      };
      networking.firewall.allowedTCPPorts = [ 2379 ];
    };

    proxy = fleetNode "edge-1";
    proxy2 = fleetNode "edge-2";
  };

  testScript = { nodes, ... }:
    let
      backend = nodes.backend.networking.primaryIPAddress;
    in
    ''
      ${common.prelude}

      start_all()
      etcd.wait_for_unit("etcd.service")
      backend.wait_for_open_port(9001)
      for host in (proxy, proxy2):
          host.wait_for_unit("proxy.service")

      with subtest("no route yet on either host"):
          for name in ("proxy", "proxy2"):
              client.wait_until_succeeds(
                  f"curl -s -o /dev/null -w '%{{http_code}}' http://{name}/who | grep -qx 404"
              )

      with subtest("a route created on one host is served by the other"):
          proxy.succeed("proxyctl pools add app --upstream ${backend}:9001")
          proxy.succeed("proxyctl routes add site --listener web --pool app")
          client.succeed("curl -sf --max-time 5 http://proxy/who | grep -q '^v1a '")
          client.wait_until_succeeds("curl -sf --max-time 5 http://proxy2/who | grep -q '^v1a '", timeout=60)

      with subtest("both hosts are listed with their lag"):
          proxy2.wait_until_succeeds(
              "proxyctl -o json cluster status | grep -q edge-1 && proxyctl -o json cluster status | grep -q edge-2",
              timeout=60,
          )
          fleet = json.loads(proxy2.succeed("proxyctl -o json cluster status"))
          assert [n["name"] for n in fleet["nodes"]] == ["edge-1", "edge-2"], fleet
          assert all(n["lag"] >= 0 for n in fleet["nodes"]), fleet
          proxy2.succeed("curl -sf http://127.0.0.1:42008/metrics | grep -q '^proxy_cluster_applied_revision '")

      with subtest("without etcd both hosts serve, are stale and refuse writes"):
          etcd.systemctl("stop etcd.service")
          for host in (proxy, proxy2):
              host.wait_until_succeeds("proxyctl -o json status | grep -q '\"stale\": true'", timeout=60)
              host.succeed("curl -sf http://127.0.0.1:42008/readyz | grep -q '^ready (stale'")
          client.succeed("curl -sf --max-time 5 http://proxy2/who | grep -q '^v1a '")
          out = proxy2.fail("proxyctl routes add other --listener web --host other.example --pool app 2>&1")
          assert "UNAVAILABLE" in out, out

      with subtest("a host restarted meanwhile serves from its database"):
          proxy2.systemctl("restart proxy.service")
          proxy2.wait_for_unit("proxy.service")
          client.wait_until_succeeds("curl -sf --max-time 5 http://proxy2/who | grep -q '^v1a '", timeout=60)

      with subtest("etcd is back: writes work again and reach both hosts"):
          etcd.systemctl("start etcd.service")
          etcd.wait_for_unit("etcd.service")
          for host in (proxy, proxy2):
              host.wait_until_succeeds("proxyctl -o json status | grep -q '\"stale\": false'", timeout=60)
          proxy2.succeed("proxyctl pools add docs --upstream ${backend}:9003")
          proxy2.succeed("proxyctl routes add docs --listener web --path-prefix /docs --pool docs")
          client.wait_until_succeeds("curl -sf --max-time 5 http://proxy/docs/x | grep -q '^v2 '", timeout=60)
    '';
}
