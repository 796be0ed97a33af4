# Fleet mode (`[cluster]`): two proxy hosts share their API-owned objects through one
# etcd node. A pool and a route created with proxyctl on one host are served by the other;
# `proxyctl cluster status` lists both; with etcd stopped both keep serving, say they are
# stale, and refuse writes; when etcd is back they follow it again without a restart.
# With pebble (nixpkgs' ACME test server): a certificate ordered once, by the host that got
# the first handshake, is served by both; the CA validates at the other host, which answers
# the HTTP-01 challenge from the tokens the fleet shares in etcd.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
  acmeServer = "${pkgs.path}/nixos/tests/common/acme/server";

  fleetNode = name: { nodes, lib, ... }: {
    imports = [ common.proxyNode ];
    networking.extraHosts = ''
      ${nodes.acme.networking.primaryIPAddress} ${nodes.acme.test-support.acme.caDomain}
    '';
    networking.firewall.allowedTCPPorts = [ 443 ];
    services.proxy.settings = {
      # The hosts' own objects: none, so every route comes from the fleet.
      pools = lib.mkForce [ ];
      routes = lib.mkForce [ ];
      listeners = lib.mkForce [
        { name = "web"; protocol = "http"; address = "0.0.0.0:80"; }
        { name = "websecure"; protocol = "https"; address = "0.0.0.0:443"; }
      ];
      tls = {
        acme = {
          directory = "https://${nodes.acme.test-support.acme.caDomain}/dir";
          contact = [ "mailto:hostmaster@example.test" ];
          # pebble's own HTTPS certificate is signed by the test CA.
          ca_file = "${nodes.acme.test-support.acme.caCert}";
          challenges = [ "http-01" ];
        };
        on_demand = {
          enabled = true;
          allow = [ "*.fleet.test" ];
        };
      };
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

    client = { nodes, ... }: {
      imports = [ common.clientNode ];
      networking.extraHosts = ''
        ${nodes.acme.networking.primaryIPAddress} ${nodes.acme.test-support.acme.caDomain}
      '';
      security.pki.certificateFiles = [ nodes.acme.test-support.acme.caCert ];
      environment.systemPackages = [ pkgs.openssl ];
    };

    # pebble on :443 (directory https://acme.test/dir, management :15000). Its resolver
    # serves every node's extraHosts: the fleet's names resolve to edge-1 only, so the CA
    # validates every order at edge-1 whichever host made it.
    acme = { nodes, ... }: {
      imports = [ acmeServer ];
      networking.extraHosts = ''
        ${nodes.proxy.networking.primaryIPAddress} shop.fleet.test
      '';
    };

    etcd = { nodes, ... }: {
      services.etcd = {
        enable = true;
        listenClientUrls = [ "http://0.0.0.0:2379" ];
        advertiseClientUrls = [ "http://${nodes.etcd.networking.primaryIPAddress}:2379" ];
      };
      networking.firewall.allowedTCPPorts = [ 2379 ];
      environment.systemPackages = [ pkgs.etcd ];
    };

    proxy = fleetNode "edge-1";
    proxy2 = fleetNode "edge-2";
  };

  testScript = { nodes, ... }:
    let
      backend = nodes.backend.networking.primaryIPAddress;
      edge1 = nodes.proxy.networking.primaryIPAddress;
      edge2 = nodes.proxy2.networking.primaryIPAddress;
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
          proxy2.succeed("curl -sf http://127.0.0.1:4208/metrics | grep -q '^proxy_cluster_applied_revision '")

      with subtest("without etcd both hosts serve, are stale and refuse writes"):
          etcd.systemctl("stop etcd.service")
          for host in (proxy, proxy2):
              host.wait_until_succeeds("proxyctl -o json status | grep -q '\"stale\": true'", timeout=60)
              host.succeed("curl -sf http://127.0.0.1:4208/readyz | grep -q '^ready (stale'")
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

      def leaf(address):
          # The certificate a host presents for shop.fleet.test, as its SHA-256 fingerprint.
          return client.succeed(
              f"openssl s_client -connect {address}:443 -servername shop.fleet.test"
              " -CAfile /tmp/pebble-root.pem -verify_return_error </dev/null 2>/dev/null"
              " | openssl x509 -noout -fingerprint -sha256"
          ).strip()

      def orders(host):
          return json.loads(host.succeed("proxyctl -o json tls status"))["orders"]

      with subtest("a certificate ordered once (by edge-2, validated at edge-1) is served by both"):
          acme.wait_for_unit("pebble.service")
          acme.wait_for_open_port(443)
          for host in (proxy, proxy2):
              host.wait_for_unit("${nodes.proxy.services.proxy.listenerSocketUnits.websecure}")
          client.succeed("curl -sf https://acme.test:15000/roots/0 > /tmp/pebble-root.pem")
          orders_before = orders(proxy) + orders(proxy2)
          # The first handshake for the name reaches edge-2 only.
          # (No route serves HTTPS: the answer is a 404, the handshake is what counts.)
          client.succeed(
              "curl -s -o /dev/null --max-time 120 --cacert /tmp/pebble-root.pem"
              " --resolve shop.fleet.test:443:${edge2} https://shop.fleet.test/"
          )
          first = leaf("${edge2}")
          assert "Fingerprint" in first, first
          client.wait_until_succeeds(
              "openssl s_client -connect ${edge1}:443 -servername shop.fleet.test"
              " -CAfile /tmp/pebble-root.pem -verify_return_error </dev/null >/dev/null 2>&1",
              timeout=60,
          )
          assert leaf("${edge1}") == first, (leaf("${edge1}"), first)
          assert orders(proxy2) + orders(proxy) == orders_before + 1, (orders(proxy), orders(proxy2))
          assert orders(proxy) == 0, "edge-1 only answered the challenge"
          ordered = int(acme.succeed("journalctl -u pebble.service | grep -c 'POST /order-plz' || true").strip())
          assert ordered == 1, ordered
          # The order's lock and tokens went with it.
          for keys in ("locks", "tokens"):
              etcd.succeed(f"test -z \"$(ETCDCTL_API=3 etcdctl get --prefix /proxy/vmtest/acme/{keys}/ --keys-only)\"")
    '';
}
