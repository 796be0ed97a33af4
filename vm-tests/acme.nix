# On-demand TLS against pebble (nixpkgs' ACME test server, nixos/tests/common/acme): the
# first handshake for an allowlisted name orders a certificate (HTTP-01, answered on the
# http listener) and is served with it; a name off the allowlist is refused without any
# ACME request; the certificate is kept across a restart.
{ pkgs, nixosModule, package }:

let
  common = import ./lib.nix { inherit pkgs nixosModule package; };
  acmeServer = "${pkgs.path}/nixos/tests/common/acme/server";
in
pkgs.testers.runNixOSTest {
  name = "proxy-acme";

  nodes = {
    backend = common.backendNode;

    # pebble on :443 (directory https://acme.test/dir, management :15000). Its resolver
    # serves every node's extraHosts, so it validates the names at the proxy.
    acme = { nodes, ... }: {
      imports = [ acmeServer ];
      networking.extraHosts = ''
        ${nodes.proxy.networking.primaryIPAddress} allowed.test app.apps.test denied.test
      '';
    };

    proxy = { nodes, lib, ... }: {
      imports = [ common.proxyNode ];
      networking.extraHosts = ''
        ${nodes.acme.networking.primaryIPAddress} ${nodes.acme.test-support.acme.caDomain}
      '';
      services.proxy.settings = {
        listeners = lib.mkAfter [
          { name = "websecure"; protocol = "https"; address = "0.0.0.0:443"; }
        ];
        routes = lib.mkForce [
          { name = "tls-default"; listener = "websecure"; pool = "v1"; }
          { name = "default"; listener = "web"; pool = "v1"; }
        ];
        tls = {
          acme = {
            directory = "https://${nodes.acme.test-support.acme.caDomain}/dir";
            contact = [ "mailto:hostmaster@example.test" ];
            # pebble's own HTTPS certificate is signed by the test CA.
            ca_file = "${nodes.acme.test-support.acme.caCert}";
            challenges = [ "http-01" "tls-alpn-01" ];
          };
          on_demand = {
            enabled = true;
            allow = [ "allowed.test" "*.apps.test" ];
          };
        };
      };
    };

    client = { nodes, ... }: {
      imports = [ common.clientNode ];
      networking.extraHosts = ''
        ${nodes.proxy.networking.primaryIPAddress} allowed.test app.apps.test denied.test
        ${nodes.acme.networking.primaryIPAddress} ${nodes.acme.test-support.acme.caDomain}
      '';
      security.pki.certificateFiles = [ nodes.acme.test-support.acme.caCert ];
      environment.systemPackages = [ pkgs.openssl pkgs.jq ];
    };
  };

  testScript = { nodes, ... }: ''
    ${common.prelude}

    start_all()
    acme.wait_for_unit("pebble.service")
    acme.wait_for_open_port(443)
    backend.wait_for_open_port(9002)
    wait_for_proxy(proxy, client)
    proxy.wait_for_unit("${nodes.proxy.services.proxy.listenerSocketUnits.websecure}")

    def tls_status():
        return json.loads(proxy.succeed("proxyctl -o json tls status"))

    with subtest("ACME is configured and on-demand issuance is on"):
        status = tls_status()
        assert status["configured"] and status["on_demand_enabled"], status

    # pebble issues from a root it generates at start; the client trusts it from here on.
    client.succeed("curl -sf https://acme.test:15000/roots/0 > /tmp/pebble-root.pem")

    with subtest("an allowlisted name gets a certificate on its first handshake"):
        body = client.succeed("curl -sf --max-time 60 --cacert /tmp/pebble-root.pem https://allowed.test/hello").strip()
        assert body in ("v1a /hello", "v1b /hello"), body
        subject = client.succeed(
            "openssl s_client -connect allowed.test:443 -servername allowed.test </dev/null 2>/dev/null"
            " | openssl x509 -noout -ext subjectAltName"
        )
        assert "DNS:allowed.test" in subject, subject
        certs = json.loads(proxy.succeed("proxyctl -o json tls certs list"))
        assert any("allowed.test" in c["names"] and c["source"] == "acme" for c in certs), certs

    with subtest("a wildcard allowlist entry covers its subdomains"):
        client.succeed("curl -sf --max-time 60 --cacert /tmp/pebble-root.pem https://app.apps.test/")

    with subtest("a name off the allowlist is refused without an ACME order"):
        orders = tls_status()["orders"]
        client.fail("curl -s --max-time 30 --cacert /tmp/pebble-root.pem https://denied.test/")
        client.fail("curl -sk --max-time 30 https://denied.test/")
        status = tls_status()
        assert status["orders"] == orders, status
        assert status["refused_handshakes"] >= 2, status
        acme.fail("journalctl -u pebble.service | grep -q denied.test")

    with subtest("the certificate is kept across a restart (no new order)"):
        proxy.systemctl("restart proxy.service")
        wait_for_proxy(proxy, client)
        client.succeed("curl -sf --max-time 30 --cacert /tmp/pebble-root.pem https://allowed.test/")
        status = tls_status()
        assert status["orders"] == 0, status
  '';
}
