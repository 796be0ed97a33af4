# A service registers itself over the management API (a Register stream that is its
# lease) and then restarts: while it is away its route is held and requests queue, so
# under load from a client no request fails.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
  tokenFile = pkgs.writeText "mgmt-token" "registration-test-token";

  # The registration: the service at BACKEND:9001 serves app.test on the listener web.
  # It keeps the stream open (a keepalive every 2 s) until it is stopped.
  registerScript = backend: proxy: pkgs.writeShellScript "register-app" ''
    {
      echo '{"announce": {"service": "app", "endpoint": "${backend}:9001", "listener": "web", "host": "app.test", "pathPrefix": "/"}}'
      while sleep 2; do echo '{"keepalive": {}}'; done
    } | ${pkgs.grpcurl}/bin/grpcurl -plaintext -max-time 0 \
        -H "authorization: Bearer $(cat ${tokenFile})" -d @ \
        ${proxy}:50051 proxy.v1.RegistrationService/Register
  '';
in
pkgs.testers.runNixOSTest {
  name = "proxy-registration";

  nodes = {
    client = common.clientNode;

    backend = { nodes, ... }: {
      imports = [ common.backendNode ];
      # The registering side of upstream-v1a: registers once the upstream is up.
      systemd.services.register-app = {
        wantedBy = [ "multi-user.target" ];
        after = [ "upstream-v1a.service" ];
        serviceConfig = {
          ExecStart = registerScript nodes.backend.networking.primaryIPAddress
            nodes.proxy.networking.primaryIPAddress;
          Restart = "always";
          RestartSec = "1s";
        };
      };
    };

    proxy = {
      imports = [ common.proxyNode ];
      networking.firewall.allowedTCPPorts = [ 50051 ];
      services.proxy = {
        credentials.mgmt-token = tokenFile;
        settings = {
          server.mgmt_listen = "0.0.0.0:50051";
          server.mgmt_token_file = "/run/credentials/proxy.service/mgmt-token";
          registration.hold = "30s";
        };
      };
    };
  };

  testScript = ''
    ${common.prelude}

    start_all()
    wait_for_proxy(proxy, client)
    backend.wait_for_unit("register-app.service")

    with subtest("the registered route serves"):
        client.wait_until_succeeds("curl -sf -H 'Host: app.test' http://proxy/ | grep -q '^v1a /'", timeout=60)
        proxy.succeed("proxyctl routes list | grep -q app.test")

    with subtest("the service restarts under load: requests queue, none fails"):
        client.succeed(
            "systemd-run --unit=load-app --property=RemainAfterExit=yes "
            "proxy-test-load --http proxy:80 --host app.test --path /app --keepalive 4 --fresh 4 "
            "--duration 120 --stop-file /tmp/stop-app --out /tmp/load-app.json"
        )
        client.sleep(2)
        # Deregister first (the lease ends, new requests queue), then restart the service.
        backend.succeed("systemctl stop register-app.service")
        client.sleep(1)
        backend.succeed("systemctl restart upstream-v1a.service")
        backend.wait_for_open_port(9001)
        client.sleep(2)
        backend.succeed("systemctl start register-app.service")
        backend.wait_for_unit("register-app.service")
        client.wait_until_succeeds("curl -sf -H 'Host: app.test' http://proxy/ | grep -q '^v1a /'", timeout=60)
        client.sleep(2)
        stop_load(client, "app")

    with subtest("after the hold the route is gone"):
        backend.succeed("systemctl stop register-app.service")
        client.wait_until_succeeds(
            "curl -s -o /dev/null -w '%{http_code}' -H 'Host: app.test' http://proxy/ | grep -qx 503",
            timeout=90,
        )
  '';
}
