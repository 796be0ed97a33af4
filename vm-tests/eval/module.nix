# services.proxy evaluated for several settings with nixpkgs' lib alone (stand-ins from
# stub.nix), and what it makes of them checked value by value: socket unit names, socket
# and service directives, writable directories, assertions, the config check's inputs.
#
#   nix-instantiate --eval --strict --json --readonly-mode vm-tests/eval/module.nix \
#     --arg lib 'import vm-tests/nixpkgs-lib/lib'
#
# gives { checks = [ { name; ok; detail; } ]; units = <the default host's proxy.service and
# one socket, for the comparison with contrib/systemd>; }. scripts/nix-lint fails on any
# check that is not ok.
{ lib }:

let
  stub = import ./stub.nix { inherit lib; };
  inherit (stub) nixosModule package;

  listeners = [
    { name = "web"; protocol = "http"; address = "0.0.0.0:80"; }
    { name = "echo"; protocol = "tcp"; address = "0.0.0.0:6379"; pool = "echo"; }
  ];
  settings = {
    inherit listeners;
    pools = [
      { name = "app"; upstreams = [ "192.0.2.10:9001" ]; }
      { name = "echo"; upstreams = [ "192.0.2.10:9101" ]; }
    ];
    routes = [{ name = "all"; listener = "web"; pool = "app"; }];
  };

  host = extra: stub.evalHost [
    nixosModule
    { services.proxy = { enable = true; inherit package settings; }; }
    extra
  ];

  # Unit names computed outside Nix (sha256 of the address, first 8 hex digits), so a
  # change of the naming scheme shows here.
  webUnit = "proxy-listener@web-355f3d70";
  echoUnit = "proxy-listener@echo-5b7b1278";
  echoMovedUnit = "proxy-listener@echo-07050243";

  base = host { };
  moved = host {
    services.proxy.settings.listeners = lib.mkForce [
      (builtins.head listeners)
      { name = "echo"; protocol = "tcp"; address = "0.0.0.0:6380"; pool = "echo"; }
    ];
  };
  customState = host {
    services.proxy.settings.server = { state_dir = "/srv/proxy/"; mgmt_socket = "/srv/proxy/mgmt.sock"; };
  };
  otherVarLib = host {
    services.proxy.settings.server = { state_dir = "/var/lib/edge/proxy"; mgmt_socket = "/run/edge-proxy/api.sock"; };
  };
  separateSocketDir = host {
    services.proxy.settings.server = { state_dir = "/var/lib/proxy"; mgmt_socket = "/srv/sockets/proxy.sock"; };
  };
  homeState = host { services.proxy.settings.server.state_dir = "/home/proxy"; };
  tmpSocket = host { services.proxy.settings.server.mgmt_socket = "/tmp/proxy.sock"; };
  relativeState = host { services.proxy.settings.server.state_dir = "state"; };

  fileHost = extra: stub.evalHost [
    nixosModule
    { services.proxy = { enable = true; inherit package; configFile = ./site.toml; }; }
    extra
  ];
  withFile = fileHost { };
  fileAndListeners = fileHost { services.proxy.settings.listeners = [ (builtins.head listeners) ]; };
  fileAsString = fileHost { services.proxy.configFile = lib.mkForce "/etc/proxy/site.toml"; };

  crossPkgs = stub.mkPkgs { buildSystem = "x86_64-linux"; hostSystem = "aarch64-linux"; };
  cross = host { _module.args.pkgs = crossPkgs; services.proxy.package = lib.mkForce crossPkgs.proxy; };

  registrationTest = import ../registration.nix { inherit (stub) pkgs nixosModule package; };
  registrationNodes = stub.testNodes registrationTest;

  # The first listener with per-client limits added.
  limitedHost = limits: host {
    services.proxy.settings.listeners = lib.mkForce [ ((builtins.head listeners) // limits) ];
  };
  limited = limitedHost { max_connections_per_ip = 32; rate_limit = { requests_per_second = 0.5; burst = 10; }; };
  limitedListener = config: builtins.head config.services.proxy.settings.listeners;

  # The first pool with PING settings added.
  keepaliveHost = keepalive: host {
    services.proxy.settings.pools = lib.mkForce [ ((builtins.head settings.pools) // { protocol = "h2c"; h2_keepalive = keepalive; }) ];
  };
  keepalivePool = config: builtins.head config.services.proxy.settings.pools;
  idleTimeoutHost = timeout: host {
    services.proxy.settings.pools = lib.mkForce [ ((builtins.head settings.pools) // { protocol = "h2c"; h2_idle_timeout = timeout; }) ];
  };

  prometheusHost = host { services.proxy.prometheus = { rules = true; scrape = true; }; };
  noAdminScrape = host {
    services.proxy.prometheus.scrape = true;
    services.proxy.settings.server.admin_listen = "";
  };

  clusterHost = cluster: host { services.proxy.settings.cluster = cluster; };
  clustered = clusterHost {
    node_name = "edge-1";
    etcd = { endpoints = [ "http://10.0.0.5:2379" "http://10.0.0.6:2379" ]; prefix = "/proxy/prod"; };
  };
  clusterOf = config: config.services.proxy.settings.cluster;

  svc = config: config.systemd.services.proxy;
  serviceConfig = config: (svc config).serviceConfig;
  sockets = config: config.systemd.sockets;
  checkedConfig = config: config.environment.etc."proxy/proxy.toml".source;
  failed = stub.failedAssertions;
  # Whether evaluating `value` fully throws (a type error, an undefined value).
  throws = value: !(builtins.tryEval (builtins.deepSeq value value)).success;
  mentions = needle: messages: builtins.any (lib.hasInfix needle) messages;
  show = value: builtins.toJSON value;
  # StateDirectory, RuntimeDirectory, ReadWritePaths (null when unset), then tmpfiles rules.
  directories = config:
    map (key: (serviceConfig config).${key} or null) [ "StateDirectory" "RuntimeDirectory" "ReadWritePaths" ]
    ++ config.systemd.tmpfiles.rules;

  check = name: ok: detail: { inherit name ok; detail = if ok then "" else detail; };
  expectEq = name: actual: wanted:
    check name (actual == wanted) "got ${show actual}, want ${show wanted}";

  checks = [
    # Item: a moved listener is a removed socket unit and a new one.
    (expectEq "socket unit names carry the address hash" (lib.attrNames (sockets base)) [ echoUnit webUnit ])
    (expectEq "listenerSocketUnits names them" base.services.proxy.listenerSocketUnits
      { web = "${webUnit}.socket"; echo = "${echoUnit}.socket"; })
    (expectEq "a moved listener gets a new unit, the other keeps its own" (lib.attrNames (sockets moved))
      [ echoMovedUnit webUnit ])
    (expectEq "the moved listener's unit listens on the new address"
      (sockets moved).${echoMovedUnit}.socketConfig.ListenStream "0.0.0.0:6380")
    (check "a moved listener changes proxy.service's restart triggers (it restarts)"
      ((svc base).restartTriggers != (svc moved).restartTriggers) "restartTriggers unchanged")
    (expectEq "proxy.service wants the moved listener's new unit" (svc moved).wants
      [ "network-online.target" "${webUnit}.socket" "${echoMovedUnit}.socket" ])
    (expectEq "the socket keeps the listener name as FileDescriptorName"
      (sockets base).${echoUnit}.socketConfig.FileDescriptorName "echo")

    # Item: FreeBind.
    (expectEq "every socket unit sets FreeBind=true"
      (lib.mapAttrsToList (_: s: s.socketConfig.FreeBind or null) (sockets base)) [ true true ])

    # Item: network-online.target.
    (expectEq "proxy.service is after network-online.target" (svc base).after [ "network-online.target" ])
    (check "proxy.service wants network-online.target"
      (builtins.elem "network-online.target" (svc base).wants)
      (show (svc base).wants))

    # Item: directories under ProtectSystem=strict.
    (expectEq "defaults: StateDirectory and RuntimeDirectory proxy, nothing else writable"
      (directories base)
      [ "proxy" "proxy" null ])
    (expectEq "state_dir outside /var/lib: ReadWritePaths and a tmpfiles rule, no StateDirectory"
      (directories customState)
      [ null null [ "/srv/proxy" ] "d /srv/proxy 0750 proxy proxy - -" ])
    (expectEq "state_dir outside /var/lib: the user's home follows it" customState.users.users.proxy.home "/srv/proxy")
    (expectEq "state_dir and socket elsewhere under /var/lib and /run: StateDirectory and RuntimeDirectory follow"
      (directories otherVarLib)
      [ "edge/proxy" "edge-proxy" null ])
    (expectEq "mgmt_socket outside /run: its directory is writable and made by tmpfiles"
      (directories separateSocketDir)
      [ "proxy" null [ "/srv/sockets" ] "d /srv/sockets 0750 proxy proxy - -" ])
    (check "state_dir under /home is refused (ProtectHome)" (mentions "ProtectHome" (failed homeState)) (show (failed homeState)))
    (check "mgmt_socket under /tmp is refused (PrivateTmp)" (mentions "PrivateTmp" (failed tmpSocket)) (show (failed tmpSocket)))
    (check "a relative state_dir is refused" (mentions "absolute paths" (failed relativeState)) (show (failed relativeState)))
    (expectEq "the default host passes every assertion" (failed base) [ ])

    # Item: configFile.
    (expectEq "configFile: socket units from the file's listeners" (lib.attrNames (sockets withFile))
      [ "proxy-listener@secure-17f18883" "proxy-listener@web-b678fa77" ])
    (expectEq "configFile: the sockets listen on the file's addresses"
      (lib.mapAttrsToList (_: s: s.socketConfig.ListenStream) (sockets withFile)) [ "192.0.2.7:443" "127.0.0.1:8080" ])
    (expectEq "configFile: directories from the file's state_dir and mgmt_socket"
      (directories withFile) [ "site-proxy" "site-proxy" null ])
    (expectEq "configFile: the management socket the unit and proxyctl use comes from the file"
      withFile.environment.variables.PROXY_MGMT_SOCKET "/run/site-proxy/mgmt.sock")
    (expectEq "configFile: an admin port below 1024 in the file grants CAP_NET_BIND_SERVICE"
      (serviceConfig withFile).AmbientCapabilities [ "CAP_NET_BIND_SERVICE" ])
    (check "configFile: the file is checked at build time by proxyd check-config"
      (lib.hasInfix "proxyd check-config /nix/store/" (checkedConfig withFile).script) (checkedConfig withFile).script or "no script")
    (expectEq "configFile: passes every assertion" (failed withFile) [ ])
    (check "configFile with settings.listeners is refused"
      (mentions "configFile is set" (failed fileAndListeners))
      (show (failed fileAndListeners)))
    (check "configFile as a string is a type error" (throws fileAsString.services.proxy.configFile) "accepted")

    # Item: the checked config runs the build platform's proxyd.
    (expectEq "native: check-config runs services.proxy.package"
      (map (p: p.name) (checkedConfig base).env.nativeBuildInputs) [ "proxy" ])
    (expectEq "cross: check-config runs the build platform's proxyd"
      (map (p: p.name) (checkedConfig cross).env.nativeBuildInputs) [ "proxy-x86_64-linux" ])

    # Item: the registration VM test's client survives the wait for the proxy.
    (expectEq "registration test: register-app has no start limit"
      registrationNodes.backend.systemd.services.register-app.startLimitIntervalSec 0)

    # Item: services.proxy.prometheus (nixos-module/prometheus.nix).
    (expectEq "prometheus: nothing added by default"
      [ base.services.prometheus.ruleFiles base.services.prometheus.scrapeConfigs ] [ [ ] [ ] ])
    (expectEq "prometheus.rules adds contrib/prometheus/alerts.yml to ruleFiles"
      (map toString prometheusHost.services.prometheus.ruleFiles)
      [ (toString ../../contrib/prometheus/alerts.yml) ])
    (expectEq "prometheus.scrape adds the job the rules expect, on admin_listen"
      prometheusHost.services.prometheus.scrapeConfigs
      [{ job_name = "proxy"; static_configs = [{ targets = [ "127.0.0.1:4208" ]; }]; }])
    (expectEq "per-client limits: typed options, unset keys null (left out of the file)"
      { inherit (limitedListener limited) max_connections_per_ip rate_limit; }
      { max_connections_per_ip = 32; rate_limit = { requests_per_second = 0.5; burst = 10; max_clients = null; }; })
    (check "per-client limits: off unless set"
      ((limitedListener base).rate_limit == null
        && (limitedListener base).max_connections_per_ip == null) "set by default")
    (check "per-client limits: a rate of 0 requests per second is a type error"
      (throws (limitedListener (limitedHost { rate_limit.requests_per_second = 0; })).rate_limit) "accepted")
    (check "per-client limits: max_connections_per_ip = 0 is a type error"
      (throws (limitedListener (limitedHost { max_connections_per_ip = 0; })).max_connections_per_ip) "accepted")
    (expectEq "h2_keepalive: typed option, an unset timeout null (left out of the file)"
      (keepalivePool (keepaliveHost { interval = "30s"; })).h2_keepalive
      { interval = "30s"; timeout = null; })
    (check "h2_keepalive: unset by default" ((keepalivePool base).h2_keepalive == null) "set by default")
    (check "h2_keepalive: a timeout without an interval is an error"
      (throws (keepalivePool (keepaliveHost { timeout = "5s"; })).h2_keepalive) "accepted")
    (check "h2_keepalive: an interval that is not a string is a type error"
      (throws (keepalivePool (keepaliveHost { interval = 10; })).h2_keepalive) "accepted")
    (expectEq "h2_idle_timeout: unset by default (left out of the file)" (keepalivePool base).h2_idle_timeout null)
    (expectEq "h2_idle_timeout: a duration string"
      (keepalivePool (idleTimeoutHost "5m")).h2_idle_timeout "5m")
    (check "h2_idle_timeout: a number is a type error"
      (throws (keepalivePool (idleTimeoutHost 300)).h2_idle_timeout) "accepted")
    # Item: [cluster] (fleet mode).
    (expectEq "cluster: off unless set" (clusterOf base) null)
    (expectEq "cluster: typed options, unset TLS keys null (left out of the file)"
      (clusterOf clustered)
      {
        node_name = "edge-1";
        etcd = { endpoints = [ "http://10.0.0.5:2379" "http://10.0.0.6:2379" ]; prefix = "/proxy/prod"; ca_file = null; cert = null; key = null; };
      })
    (expectEq "cluster: passes every assertion" (failed clustered) [ ])
    (check "cluster: no etcd endpoint is a type error"
      (throws (clusterOf (clusterHost { etcd = { endpoints = [ ]; prefix = "/p"; }; }))) "accepted")
    (check "cluster: an endpoint without a scheme is a type error"
      (throws (clusterOf (clusterHost { etcd = { endpoints = [ "10.0.0.5:2379" ]; prefix = "/p"; }; }))) "accepted")
    (check "cluster: a relative prefix is a type error"
      (throws (clusterOf (clusterHost { etcd = { endpoints = [ "http://a:2379" ]; prefix = "proxy"; }; }))) "accepted")
    (check "cluster: a node name with a space is a type error"
      (throws (clusterOf (clusterHost { node_name = "edge 1"; etcd = { endpoints = [ "http://a:2379" ]; prefix = "/p"; }; }))) "accepted")
    (check "prometheus.scrape without an admin listener is refused"
      (mentions "admin_listen" (failed noAdminScrape))
      (show (failed noAdminScrape)))
  ];

  # The default host's units, as the contrib comparison in scripts/nix-lint reads them.
  units = {
    service = serviceConfig base;
    unit = { inherit (svc base) after wants; };
    socket = (sockets base).${webUnit}.socketConfig;
    listenerUnits = lib.attrValues base.services.proxy.listenerSocketUnits;
  };
in
{ inherit checks units; }
