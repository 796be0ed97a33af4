# Pool membership from etcd (`[pools.discovery] etcd`): keys <prefix>/<host:port> add and
# remove upstreams while the proxy runs; keys under other prefixes and malformed values
# are ignored, and `proxyctl discovery list` reports the source.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
in
pkgs.testers.runNixOSTest {
  name = "proxy-discovery";

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
      environment.systemPackages = [ pkgs.etcd ];
    };

    proxy = { nodes, lib, ... }: {
      imports = [ common.proxyNode ];
      services.proxy.settings.pools = lib.mkForce [
        # Pool v1 follows the keys under /srv/web/prod.
        {
          name = "v1";
          discovery.etcd = {
            endpoints = [ "http://${nodes.etcd.networking.primaryIPAddress}:2379" ];
            prefix = "/srv/web/prod";
          };
        }
        { name = "v2"; upstreams = [ "${nodes.backend.networking.primaryIPAddress}:9003" ]; }
        { name = "echo-servers"; upstreams = [ "${nodes.backend.networking.primaryIPAddress}:9101" ]; }
      ];
    };
  };

  testScript = { nodes, ... }:
    let
      backend = nodes.backend.networking.primaryIPAddress;
    in
    ''
      ${common.prelude}

      def served_by():
          return {client.succeed("curl -sf --max-time 5 http://proxy/who").split()[0] for _ in range(6)}


      def wait_served_by(expected):
          proxy.wait_until_succeeds(
              "for i in 1 2 3 4 5 6; do curl -sf --max-time 5 http://127.0.0.1/who; done "
              f"| cut -d' ' -f1 | sort -u | tr '\\n' ' ' | grep -qx '{' '.join(sorted(expected))} '",
              timeout=90,
          )
          assert served_by() == expected


      start_all()
      etcd.wait_for_unit("etcd.service")
      backend.wait_for_open_port(9002)
      proxy.wait_for_unit("proxy.service")

      with subtest("an empty pool answers 503"):
          client.wait_until_succeeds("curl -s -o /dev/null -w '%{http_code}' http://proxy/who | grep -qx 503")

      with subtest("a key adds an upstream"):
          etcd.succeed("etcdctl put /srv/web/prod/${backend}:9001 '{}'")
          wait_served_by({"v1a"})

      with subtest("a second key: both are used"):
          etcd.succeed("etcdctl put /srv/web/prod/${backend}:9002 '{\"weight\": 1}'")
          wait_served_by({"v1a", "v1b"})

      with subtest("keys of another service or environment are ignored"):
          etcd.succeed("etcdctl put /srv/web/staging/${backend}:9003 '{}'")
          etcd.succeed("etcdctl put /srv/api/prod/${backend}:9003 '{}'")
          etcd.succeed("etcdctl put /srv/web/prod/${backend}:9003 not-json")
          assert served_by() == {"v1a", "v1b"}

      with subtest("deleting a key removes the upstream"):
          etcd.succeed("etcdctl del /srv/web/prod/${backend}:9001")
          wait_served_by({"v1b"})

      with subtest("membership is reported by the API"):
          out = proxy.succeed("proxyctl -o json upstreams list v1")
          assert "${backend}:9002" in out and "${backend}:9001" not in out, out
          sources = json.loads(proxy.succeed("proxyctl -o json discovery list"))
          assert [(s["pool"], s["kind"], s["members"]) for s in sources] == [("v1", "etcd", 1)], sources
    '';
}
