# A service registers itself over the management API with `proxyctl register` (the open
# Register stream is its lease; the proxy opens the registration's port on demand) and
# then restarts: while it is away its route is held and requests queue, so under load
# from a client no request fails. After `registration.hold` without it, requests get 503.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
  tokenFile = pkgs.writeText "mgmt-token" "registration-test-token";
  port = 20000;
  # The management listener is reached over the network, so it runs TLS: a test CA and a
  # certificate for the name `proxy`, made at build time. Clients that dial the address
  # check that name with --server-name.
  mgmtTls = pkgs.runCommand "mgmt-tls" { nativeBuildInputs = [ pkgs.openssl ]; } ''
    mkdir $out
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -subj /CN=mgmt-test-ca -addext basicConstraints=critical,CA:TRUE \
      -addext keyUsage=critical,keyCertSign -keyout ca-key.pem -out $out/ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=proxy \
      -keyout $out/key.pem -out req.pem
    printf 'subjectAltName=DNS:proxy\n' > ext
    openssl x509 -req -in req.pem -CA $out/ca.pem -CAkey ca-key.pem -CAcreateserial \
      -days 3650 -extfile ext -out $out/cert.pem
  '';
in
pkgs.testers.runNixOSTest {
  name = "proxy-registration";

  nodes = {
    client = common.clientNode;

    backend = { nodes, ... }: {
      imports = [ common.backendNode ];
      # The registering side of upstream-v1a: holds the lease while it runs, releases it
      # when stopped.
      systemd.services.register-app = {
        wantedBy = [ "multi-user.target" ];
        after = [ "upstream-v1a.service" ];
        # It fails until proxyd is up and its port open; with the default start limit
        # (5 starts in 10 s) systemd would give up on it before then.
        startLimitIntervalSec = 0;
        serviceConfig = {
          ExecStart = builtins.concatStringsSep " " [
            "${package}/bin/proxyctl"
            "--addr ${nodes.proxy.networking.primaryIPAddress}:50051"
            "--token-file ${tokenFile}"
            "--ca-file ${mgmtTls}/ca.pem --server-name proxy"
            "register --name app --port ${toString port} --host app.test"
            "--endpoint ${nodes.backend.networking.primaryIPAddress}:9001"
          ];
          Restart = "always";
          RestartSec = "1s";
        };
      };
    };

    proxy = {
      imports = [ common.proxyNode ];
      # The management listener and the port opened for the registration.
      networking.firewall.allowedTCPPorts = [ 50051 port ];
      environment.systemPackages = [ pkgs.grpcurl ];
      services.proxy = {
        credentials.mgmt-token = tokenFile;
        credentials.mgmt-tls-key = "${mgmtTls}/key.pem";
        settings = {
          server.mgmt_listen = "0.0.0.0:50051";
          server.mgmt_token_file = "/run/credentials/proxy.service/mgmt-token";
          server.mgmt_tls = {
            cert = "${mgmtTls}/cert.pem";
            key = "/run/credentials/proxy.service/mgmt-tls-key";
          };
          registration = {
            hold = "30s";
            port_range = "${toString port}-${toString (port + 9)}";
            keepalive = "2s";
            max_wait = "30s";
          };
        };
      };
    };
  };

  testScript = ''
    ${common.prelude}

    url = "http://proxy:${toString port}"

    start_all()
    wait_for_proxy(proxy, client)
    backend.wait_for_unit("register-app.service")

    with subtest("the registration opens its port and serves"):
        client.wait_until_succeeds(f"curl -sf -H 'Host: app.test' {url}/ | grep -q '^v1a /'", timeout=60)
        regs = proxy.succeed(
            "grpcurl -plaintext -authority localhost -unix /run/proxy/mgmt.sock proxy.v1.RegistrationService/ListRegistrations"
        )
        routes = json.loads(regs)["routes"]
        assert [(r["route"], r["instances"]) for r in routes] == [("registered:${toString port}:app.test:/", 1)], regs

    with subtest("a registration with a wrong token is refused"):
        backend.succeed("echo wrong-token > /tmp/wrong-token")
        out = backend.fail(
            "${package}/bin/proxyctl --addr proxy:50051 --token-file /tmp/wrong-token "
            "--ca-file ${mgmtTls}/ca.pem "
            "register --port ${toString port} --endpoint 127.0.0.1:1 2>&1"
        )
        assert "UNAUTHENTICATED" in out, out

    with subtest("the management listener speaks only TLS"):
        out = backend.fail(
            "${package}/bin/proxyctl --addr proxy:50051 --token-file ${tokenFile} status 2>&1"
        )
        assert "UNAUTHENTICATED" not in out, out
        backend.succeed(
            "${package}/bin/proxyctl --addr proxy:50051 --token-file ${tokenFile} "
            "--ca-file ${mgmtTls}/ca.pem status"
        )

    with subtest("the service restarts under load: requests queue, none fails"):
        client.succeed(
            "systemd-run --unit=load-app --property=RemainAfterExit=yes "
            "proxy-test-load --http proxy:${toString port} --host app.test --path /app --keepalive 4 --fresh 4 "
            "--timeout 45 --duration 120 --stop-file /tmp/stop-app --out /tmp/load-app.json"
        )
        client.sleep(2)
        # The lease ends (new requests are held), the service restarts, registers again.
        backend.succeed("systemctl stop register-app.service")
        client.sleep(1)
        backend.succeed("systemctl restart upstream-v1a.service")
        backend.wait_for_open_port(9001)
        client.sleep(2)
        backend.succeed("systemctl start register-app.service")
        client.wait_until_succeeds(f"curl -sf -H 'Host: app.test' {url}/ | grep -q '^v1a /'", timeout=60)
        client.sleep(2)
        stop_load(client, "app")

    with subtest("after the hold the route is gone"):
        backend.succeed("systemctl stop register-app.service")
        client.wait_until_succeeds(
            f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Host: app.test' {url}/ | grep -qxE '503|000'",
            timeout=120,
        )
  '';
}
