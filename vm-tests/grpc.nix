# The management API: proxyctl and grpcurl (over the unix socket, with server
# reflection) add routes; API-owned routes survive a reboot, and declarative ones cannot
# be changed through the API.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
in
pkgs.testers.runNixOSTest {
  name = "proxy-grpc";

  nodes = {
    backend = common.backendNode;
    client = common.clientNode;
    proxy = {
      imports = [ common.proxyNode ];
      environment.systemPackages = [ pkgs.grpcurl pkgs.jq ];
    };
  };

  testScript = ''
    ${common.prelude}

    # Flags first: grpcurl stops reading flags at the address. `-authority` keeps grpcurl
    # releases before 1.9 from sending the socket path as the HTTP/2 authority.
    grpcurl = "grpcurl -plaintext -authority localhost -unix"
    socket = "/run/proxy/mgmt.sock"

    start_all()
    backend.wait_for_open_port(9003)
    wait_for_proxy(proxy, client)

    with subtest("grpcurl finds the services through reflection"):
        services = proxy.succeed(f"{grpcurl} {socket} list").split()
        for service in ("proxy.v1.RouteService", "proxy.v1.PoolService", "proxy.v1.AdminService",
                        "proxy.v1.RegistrationService", "proxy.v1.DiscoveryService", "proxy.v1.TlsService",
                        "grpc.health.v1.Health"):
            assert service in services, services
        proxy.succeed(f"{grpcurl} {socket} grpc.health.v1.Health/Check | grep -q SERVING")

    with subtest("proxyctl adds a route"):
        proxy.succeed("proxyctl routes add api-on-v2 --listener web --path-prefix /api --pool v2")
        out = client.succeed("curl -sf http://proxy/api/users").strip()
        assert out == "v2 /api/users", out

    with subtest("grpcurl adds a route"):
        proxy.succeed(
            f"{grpcurl} -d '{{\"route\": {{\"name\": \"shop-on-v2\", \"listener\": \"web\", "
            f"\"host\": \"shop.test\", \"pathPrefix\": \"/\", \"pool\": \"v2\"}}}}' "
            f"{socket} proxy.v1.RouteService/CreateRoute"
        )
        out = client.succeed("curl -sf -H 'Host: shop.test' http://proxy/cart").strip()
        assert out == "v2 /cart", out

    with subtest("declarative routes are read-only through the API"):
        err = proxy.fail("proxyctl routes rm default 2>&1")
        assert "FAILED_PRECONDITION" in err, err
        err = proxy.fail(f"{grpcurl} -d '{{\"name\": \"default\"}}' {socket} proxy.v1.RouteService/DeleteRoute 2>&1")
        assert "FailedPrecondition" in err or "FAILED_PRECONDITION" in err, err

    with subtest("API routes survive a reboot"):
        proxy.shutdown()
        proxy.start()
        wait_for_proxy(proxy, client)
        names = proxy.succeed("proxyctl -o json routes list | jq -r '.. | .name? // empty'").split()
        assert "api-on-v2" in names and "shop-on-v2" in names, names
        assert client.succeed("curl -sf http://proxy/api/users").strip() == "v2 /api/users"
        assert client.succeed("curl -sf -H 'Host: shop.test' http://proxy/x").strip() == "v2 /x"
  '';
}
