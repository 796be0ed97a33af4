{ config, lib, pkgs, utils, ... }:

let
  inherit (lib)
    concatStringsSep
    filterAttrs
    hasPrefix
    isAttrs
    isDerivation
    isList
    literalExpression
    mapAttrs
    mapAttrsToList
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    optional
    optionalAttrs
    removePrefix
    types
    unique
    ;

  cfg = config.services.proxy;
  settingsFormat = pkgs.formats.toml { };

  # The unit names only these paths. They stay the same across generations, so a new
  # package or config changes the unit's reload trigger and nothing else: switching
  # reloads proxy.service (a handoff to the new binary) instead of restarting it.
  etcDir = "/etc/proxy";
  stableProxyd = "${etcDir}/bin/proxyd";
  stableProxyctl = "${etcDir}/bin/proxyctl";
  stableConfig = "${etcDir}/proxy.toml";

  # What the daemon will read: the settings, or the file of services.proxy.configFile (read
  # at evaluation: its listeners become socket units, its paths the unit's directories).
  fileSettings = lib.importTOML cfg.configFile;
  fileServer = fileSettings.server or { };
  effective =
    if cfg.configFile == null then {
      inherit (cfg.settings) listeners;
      inherit (cfg.settings.server) state_dir mgmt_socket admin_listen upgrade_timeout shutdown_timeout;
      port_range = cfg.settings.registration.port_range;
    }
    else rec {
      listeners = fileSettings.listeners or [ ];
      # proxyd's own defaults for keys the file leaves out.
      state_dir = fileServer.state_dir or "./state";
      mgmt_socket = fileServer.mgmt_socket or "${state_dir}/mgmt.sock";
      admin_listen = fileServer.admin_listen or "127.0.0.1:4208";
      upgrade_timeout = fileServer.upgrade_timeout or "30s";
      shutdown_timeout = fileServer.shutdown_timeout or "30s";
      port_range = fileSettings.registration.port_range or null;
    };

  mgmtSocket = effective.mgmt_socket;
  listenersSource =
    if cfg.configFile == null then "services.proxy.settings.listeners"
    else "the [[listeners]] of services.proxy.configFile";

  # "/var/lib/proxy/" -> "/var/lib/proxy"
  trimSlash = path: if path != "/" && lib.hasSuffix "/" path then trimSlash (lib.removeSuffix "/" path) else path;
  stateDir = trimSlash effective.state_dir;
  mgmtDir = dirOf mgmtSocket;

  # ProtectSystem=strict leaves only the unit's own directories writable: paths under
  # /var/lib and /run become StateDirectory= and RuntimeDirectory= (systemd creates and
  # owns them), others are made writable (ReadWritePaths=) and created by tmpfiles.
  under = prefix: path: hasPrefix "${prefix}/" path;
  stateDirectory = if under "/var/lib" stateDir then removePrefix "/var/lib/" stateDir else null;
  runtimeDirectory = if under "/run" mgmtDir then removePrefix "/run/" mgmtDir else null;
  mgmtDirWritable = runtimeDirectory != null || mgmtDir == stateDir || under stateDir mgmtDir;
  extraWritable = optional (stateDirectory == null) stateDir ++ optional (!mgmtDirWritable) mgmtDir;
  # Paths the unit's sandbox hides or makes private: the daemon could not use them (or
  # proxyctl could not reach the socket there).
  hiddenPrefixes = [ "/home" "/root" "/run/user" "/tmp" "/var/tmp" ];
  isHidden = path: builtins.any (p: path == p || under p path) hiddenPrefixes;

  # TOML has no null: unset optional keys are left out of the file.
  dropNulls = value:
    if isDerivation value then value
    else if isAttrs value then mapAttrs (_: dropNulls) (filterAttrs (_: v: v != null) value)
    else if isList value then map dropNulls (builtins.filter (v: v != null) value)
    else value;

  generatedConfig = settingsFormat.generate "proxy.toml" (dropNulls cfg.settings);
  configSource = if cfg.configFile != null then cfg.configFile else generatedConfig;

  # A typo in the settings fails the build of the system, not the running host.
  checkedConfig =
    if !cfg.checkConfig then configSource
    else
      pkgs.runCommand "proxy-checked.toml"
        {
          # Runs where the system is built: the build platform's proxyd.
          nativeBuildInputs = [ cfg.checkConfigPackage ];
          preferLocalBuild = true;
        } ''
        proxyd check-config ${configSource}
        cp ${configSource} $out
      '';

  # "127.0.0.1:8080", "[::]:443", ":80", "80" -> the port as an integer.
  portOf = address:
    let m = builtins.match "(.*:)?([0-9]+)" address;
    in if m == null then null else lib.toInt (builtins.elemAt m 1);

  listenerPorts = unique (builtins.filter (p: p != null)
    (map (l: portOf l.address) effective.listeners));

  # First port of a registration port range "LOW-HIGH" (proxyd's default starts at 20000).
  rangeStart = range:
    let m = builtins.match "([0-9]+)-[0-9]+" range;
    in if m == null then null else lib.toInt (builtins.head m);

  # Listeners are passed by systemd socket units; the daemon binds only the admin listener
  # and ports opened for registrations itself.
  selfBoundPorts = builtins.filter (p: p != null) (
    [ (portOf effective.admin_listen) ]
    ++ optional (effective.port_range != null) (rangeStart effective.port_range)
  );

  # One socket unit per listener: systemd allows one FileDescriptorName per socket unit,
  # and proxyd matches the passed fds to [[listeners]] by that name. The name carries a
  # hash of the address: switch-to-configuration never restarts a changed socket unit, so
  # a moved listener must be a removed unit (stopped, its socket closed) and a new one
  # (started, bound to the new address).
  addressHash = address: builtins.substring 0 8 (builtins.hashString "sha256" address);
  listenerSocketName = listener: "proxy-listener@${listener.name}-${addressHash listener.address}";

  # Only what the socket units pass decides whether a restart is needed: a new or moved
  # listener reaches the daemon only when systemd starts it again.
  listenerFingerprint = concatStringsSep " "
    (map (l: "${l.name}=${l.address}") effective.listeners);

  durationSeconds = text:
    let m = builtins.match "([0-9]+)(ms|s|m|min|h)?" text;
    in
    if m == null then null
    else
      let
        n = lib.toInt (builtins.elemAt m 0);
        unit = builtins.elemAt m 1;
      in
      if unit == "ms" then n / 1000
      else if unit == "m" || unit == "min" then n * 60
      else if unit == "h" then n * 3600
      else n;

  # Bounds ExecStart= and ExecReload= (an upgrade waits up to upgrade_timeout) and
  # ExecStop= (shutdown_timeout). Fixed, so the unit text does not follow the settings.
  unitTimeoutSeconds = 90;

  # An optional key: left out of the file when unset, so the daemon's default applies.
  optionalKey = type: description: mkOption {
    type = types.nullOr type;
    default = null;
    inherit description;
  };

  # A submodule typed for the keys proxyd knows, freeform for keys of newer versions
  # (`proxyd check-config` refuses unknown ones at build time).
  section = options: types.submodule {
    freeformType = settingsFormat.type;
    inherit options;
  };

  # Durations are strings such as "500ms", "30s", "2m" (proxyd checks them).
  duration = types.str;

  listenerModule = section {
    name = mkOption {
      type = types.strMatching "[A-Za-z0-9_.-]+";
      description = "Unique name; also the `FileDescriptorName` of its socket unit.";
    };
    protocol = mkOption {
      type = types.enum [ "http" "https" "tcp" "tls" "tls-passthrough" ];
      default = "http";
      description = ''
        `http` and `https` are routed by `[[routes]]`; `tcp` and `tls` forward to
        {option}`pool`; `tls-passthrough` picks a pool by SNI (`[[tcp_routes]]`).
      '';
    };
    address = mkOption {
      type = types.str;
      example = "0.0.0.0:443";
      description = "`IP:PORT` of the listener's socket unit (`ListenStream=`).";
    };
    pool = optionalKey types.str "For `tcp`, `tls` and `tls-passthrough`: the pool that receives the connections.";
    max_connections = optionalKey types.ints.positive "Most connections open at once; on `http`/`https` more are closed right after accept (default 10000).";
    max_connections_per_ip = optionalKey types.ints.positive "`http`/`https`: connections open at once from one client address (an IPv6 /64); more are closed right after accept (default: no limit).";
    rate_limit = optionalKey
      (section {
        requests_per_second = mkOption {
          type = types.numbers.between 0.001 1000000000;
          example = 20;
          description = "Tokens added to a client address's bucket per second; a request takes one.";
        };
        burst = optionalKey types.ints.positive "Tokens a bucket holds: requests an address may send at once (default: requests_per_second rounded up).";
        max_clients = optionalKey types.ints.positive "Client addresses tracked at once (default 100000).";
      }) "`http`/`https`: a token bucket per client address; requests over it get 429 with `Retry-After` (default: no limit).";
    header_timeout = optionalKey duration "Time to receive a request head, from accept for the first one (default 10s).";
    idle_timeout = optionalKey duration "Close a connection with no bytes moving for this long (default 60s).";
    max_header_bytes = optionalKey (types.ints.between 8192 1073741824) "Largest request head (default 65536).";
    max_body_bytes = optionalKey types.ints.unsigned "Largest request body; 0 = unlimited (the default).";
  };

  upstreamType = types.either types.str (section {
    address = mkOption {
      type = types.str;
      description = "`host:port` or `unix:/path`.";
    };
    weight = optionalKey types.ints.positive "Relative share for balancing (default 1).";
  });

  discoveryModule = section {
    etcd = optionalKey
      (section {
        endpoints = mkOption {
          type = types.nonEmptyListOf types.str;
          example = [ "http://10.0.0.2:2379" ];
          description = "etcd client URLs (`http://` or `https://`).";
        };
        prefix = mkOption {
          type = types.str;
          example = "/srv/web/prod";
          description = "Keys `<prefix>/<host:port>` are the members; the value is empty or `{\"weight\": N}`.";
        };
      }) "Members from etcd keys under a prefix.";
    dns = optionalKey
      (section {
        name = mkOption {
          type = types.str;
          description = "A/AAAA name (with {option}`port`) or SRV name (without).";
        };
        port = optionalKey types.port "Port of the A/AAAA records; unset: SRV records.";
        interval = optionalKey duration "Re-resolve interval (default 30s).";
        resolver = optionalKey types.str "`IP:PORT` of the DNS server; unset: the system's.";
      }) "Members from DNS records.";
    exec = optionalKey
      (section {
        command = mkOption {
          type = types.nonEmptyListOf types.str;
          description = "Program and arguments (no shell); prints a JSON list of `{address, weight}`.";
        };
        interval = optionalKey duration "Run interval (default 10s).";
        timeout = optionalKey duration "Longest run (default 5s, at most the interval).";
      }) "Members from a program's output.";
    file = optionalKey
      (section {
        path = mkOption {
          type = types.str;
          description = "JSON list of `{address, weight}`, reloaded when it changes.";
        };
      }) "Members from a JSON file.";
  };

  poolModule = section {
    name = mkOption {
      type = types.str;
      description = "Unique name.";
    };
    balance = optionalKey (types.enum [ "round_robin" "ordered" "least_conn" ]) "How an upstream is picked (default `round_robin`).";
    protocol = optionalKey (types.enum [ "http1" "h2c" "h2" "auto" ]) ''
      HTTP version towards the upstreams (default `http1`): `h2c` is HTTP/2 without TLS,
      `h2` HTTP/2 over the pool's `tls` (ALPN `h2`), `auto` lets ALPN choose when the pool
      has `tls`. gRPC upstreams need `h2c` or `h2`.
    '';
    h2_connections = optionalKey types.ints.positive "HTTP/2 connections per upstream and worker thread that requests are spread over (default 1).";
    h2_keepalive = optionalKey
      (section {
        interval = mkOption {
          type = duration;
          example = "30s";
          description = "Time without a frame from the upstream after which an HTTP/2 connection is PINGed, idle or not (positive, at most 24h).";
        };
        timeout = optionalKey duration "Time a PING's answer may take before the connection is closed (default 5s).";
      }) "PING liveness of the HTTP/2 connections (`h2c`, `h2`, `auto`); unset: a PING after 10s, closed after 5s unanswered.";
    h2_idle_timeout = optionalKey duration "Close an HTTP/2 connection that carried no request for this long (default 60s).";
    upstreams = mkOption {
      type = types.listOf upstreamType;
      default = [ ];
      example = [ "10.0.0.1:8080" { address = "10.0.0.2:8080"; weight = 2; } "unix:/run/app.sock" ];
      description = "Static upstreams: `host:port`, `unix:/path`, or `{ address, weight }`.";
    };
    health = optionalKey
      (section {
        path = optionalKey types.str "HTTP path fetched with GET; unset or empty: TCP connect only.";
        grpc = optionalKey
          (section {
            service = optionalKey types.str "Service asked about; unset or empty: the whole server.";
          }) "Check with `grpc.health.v1.Health/Check` (SERVING is healthy) instead of {option}`path`.";
        interval = optionalKey duration "Time between checks (default 5s).";
        timeout = optionalKey duration "Time allowed per check (default 2s).";
      }) "Active health check.";
    connect_timeout = optionalKey duration "Upstream connect timeout (default 5s).";
    response_timeout = optionalKey duration "Request (body included) fully sent to response head (default 60s).";
    body_timeout = optionalKey duration "Longest pause between two pieces of a request body; then 408 (default 60s).";
    connect_deadline = optionalKey duration "One deadline for all connection attempts of a request (default 10s).";
    max_attempts = optionalKey types.ints.positive "Connection attempts (upstreams tried) per request (default 3).";
    idle_timeout = optionalKey duration "Idle keep-alive connections older than this are closed, not reused (default 1.5s).";
    max_connections_per_upstream = optionalKey types.ints.unsigned "Connections (busy and idle) per upstream; 0: no limit (default 0).";
    outlier = optionalKey
      (section {
        consecutive_failures = optionalKey types.ints.positive "Failures in a row that eject an upstream (default 1).";
        on_5xx = optionalKey types.bool "Count 5xx answers as failures (default false).";
        base_ejection = optionalKey duration "First ejection time, doubled per repeat (default 10s).";
        max_ejection = optionalKey duration "Longest ejection (default 300s).";
        max_ejection_percent = optionalKey (types.ints.between 0 100) "Most of a pool ejected at once, in percent (default 50).";
      }) "Outlier ejection.";
    on_change = optionalKey (types.enum [ "keep" "reset" ]) ''
      With {option}`discovery`: `reset` closes TCP streams to upstreams that left the pool
      (default `keep`).
    '';
    discovery = optionalKey discoveryModule "`[pools.discovery]`: exactly one of `etcd`, `dns`, `exec`, `file`.";
  };

  routeModule = section {
    name = mkOption {
      type = types.str;
      description = "Unique name.";
    };
    listener = mkOption {
      type = types.str;
      description = "The `http` or `https` listener the route applies to.";
    };
    host = optionalKey types.str "Exact host or `*.suffix`; unset matches any host.";
    path_prefix = optionalKey types.str "The request path starts with this (the default is `/`).";
    path = optionalKey types.str "The request path (without query) equals this; instead of {option}`path_prefix`.";
    pool = mkOption {
      type = types.str;
      description = "The pool that serves matching requests.";
    };
    strip_prefix = optionalKey types.bool "Remove the matched prefix from the forwarded path (default false).";
    priority = optionalKey types.int "Higher wins among routes with the same host and path (default 0).";
  };

  tcpRouteModule = section {
    name = mkOption {
      type = types.str;
      description = "Unique name.";
    };
    listener = mkOption {
      type = types.str;
      description = "A `tcp`, `tls` or `tls-passthrough` listener.";
    };
    pool = mkOption {
      type = types.str;
      description = "The pool that receives the connections.";
    };
    sni = optionalKey types.str "`tls-passthrough`: the server name (exact or `*.suffix`) this route takes.";
  };

  tlsModule = section {
    certificates = mkOption {
      type = types.listOf (section {
        cert = mkOption {
          type = types.str;
          description = "PEM chain, leaf first.";
        };
        key = mkOption {
          type = types.str;
          description = "PEM private key.";
        };
      });
      default = [ ];
      description = "`[[tls.certificates]]`: static certificates; the first is the default for clients without SNI.";
    };
    acme = optionalKey
      (section {
        directory = mkOption {
          type = types.strMatching "https://.*";
          example = "https://acme-v02.api.letsencrypt.org/directory";
          description = "Directory URL of the ACME server.";
        };
        contact = mkOption {
          type = types.listOf (types.strMatching "mailto:.+");
          default = [ ];
          description = "Account contacts.";
        };
        ca_file = optionalKey types.str "Extra root (PEM) trusted for the ACME server itself; unset: the system roots.";
        challenges = optionalKey (types.nonEmptyListOf (types.enum [ "http-01" "tls-alpn-01" ])) "Challenge types in order of preference (default both, `http-01` first).";
        renew_check_interval = optionalKey duration "How often renewal looks for certificates past two thirds of their life (default 1h).";
      }) "`[tls.acme]`: where certificates are ordered.";
    on_demand = optionalKey
      (section {
        enabled = mkOption {
          type = types.bool;
          default = false;
          description = "Whether names without a certificate may get one on their first handshake (needs {option}`acme`).";
        };
        allow = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "example.com" "*.customers.example.com" ];
          description = "Allowed names (route hosts are allowed too).";
        };
        ask = optionalKey types.str "`http://` URL asked `GET ask?domain=NAME` for other names; 200 allows.";
        max_orders_per_hour = optionalKey types.ints.positive "New orders per hour, all names together (default 30).";
        max_orders_per_name_per_hour = optionalKey types.ints.positive "New orders per hour for one name (default 3).";
      }) "`[tls.on_demand]`: which names may get a certificate on their first handshake.";
  };

  registrationModule = section {
    hold = optionalKey duration "How long a route waits for its service to come back (default 30s).";
    port_range = optionalKey (types.strMatching "[0-9]+-[0-9]+") ''
      Ports a registration may use, `LOW-HIGH` (default `20000-20999`). Ports no listener
      has are bound by proxyd itself: one below 1024 grants `CAP_NET_BIND_SERVICE`.
    '';
    address = optionalKey types.str "IP address ports opened for registrations bind to (default `0.0.0.0`).";
    queue_limit = optionalKey types.ints.unsigned "Requests or connections waiting on one held route (default 1000).";
    max_wait = optionalKey duration "Longest wait of one held request or connection (default 30s).";
    keepalive = optionalKey duration "Ping interval of the lease stream (default 10s).";
  };

  telemetryModule = section {
    access_log = optionalKey (types.enum [ "json" "logfmt" "off" ]) "Access log format (default `json`).";
    include_query = optionalKey types.bool "Log the query string (default false).";
    log_headers = optionalKey (types.listOf types.str) "Request headers added to the access log.";
    redact_headers = optionalKey (types.listOf types.str) "Logged headers whose values are replaced.";
    otlp = optionalKey
      (section {
        endpoint = mkOption {
          type = types.str;
          example = "http://127.0.0.1:4317";
          description = "OTLP/gRPC collector URL.";
        };
        interval = optionalKey duration "Metrics export interval (default 5s).";
        timeout = optionalKey duration "Export timeout (default 10s).";
        service_name = optionalKey types.str "`service.name` of the exported resource (default `proxyd`).";
      }) "`[telemetry.otlp]`: traces and metrics export.";
  };

  clusterModule = section {
    node_name = optionalKey (types.strMatching "[A-Za-z0-9_.-]{1,128}") "This node's name in the fleet (default: the host name).";
    etcd = mkOption {
      description = "The etcd cluster the fleet shares its API-owned objects through.";
      type = section {
        endpoints = mkOption {
          type = types.nonEmptyListOf (types.strMatching "https?://[^/]+/?");
          example = [ "http://10.0.0.5:2379" "http://10.0.0.6:2379" "http://10.0.0.7:2379" ];
          description = "Client URLs of the etcd members (all `http://` or all `https://`).";
        };
        prefix = mkOption {
          type = types.strMatching "/.*[^/].*";
          example = "/proxy/prod";
          description = "Key prefix of this fleet in etcd; hosts with the same prefix share their objects.";
        };
        ca_file = optionalKey types.str "PEM CA of etcd's server certificates (needed for `https://` endpoints).";
        cert = optionalKey types.str "PEM client certificate, when etcd asks for one (with {option}`key`).";
        key = optionalKey types.str "PEM key of the client certificate.";
      };
    };
  };
in
{
  imports = [ ./prometheus.nix ];

  options.services.proxy = {
    enable = mkEnableOption "proxyd, the routing reverse proxy";

    package = mkPackageOption pkgs "proxy" { };

    settings = mkOption {
      default = { };
      description = ''
        Contents of {file}`/etc/proxy/proxy.toml`; see the project's README for every key.
        Validated at build time with `proxyd check-config`. Ignored when
        {option}`services.proxy.configFile` is set.
      '';
      example = {
        listeners = [
          { name = "web"; protocol = "http"; address = "0.0.0.0:80"; }
          { name = "secure"; protocol = "https"; address = "0.0.0.0:443"; }
          { name = "redis"; protocol = "tcp"; address = "0.0.0.0:6379"; pool = "redis"; }
        ];
        pools = [
          { name = "app"; upstreams = [ "127.0.0.1:9001" { address = "127.0.0.1:9002"; weight = 2; } ]; health.path = "/healthz"; }
          { name = "orders"; protocol = "h2c"; h2_connections = 2; h2_keepalive.interval = "30s"; upstreams = [ "127.0.0.1:50051" ]; health.grpc.service = "orders.v1.Orders"; }
          {
            name = "redis";
            balance = "ordered";
            on_change = "reset";
            discovery.etcd = { endpoints = [ "http://127.0.0.1:2379" ]; prefix = "/srv/redis"; };
          }
        ];
        routes = [
          { name = "site"; listener = "web"; pool = "app"; }
          { name = "site-tls"; listener = "secure"; host = "example.com"; path_prefix = "/"; pool = "app"; }
          { name = "orders"; listener = "web"; path_prefix = "/orders.v1.Orders/"; pool = "orders"; }
        ];
        tls = {
          acme = {
            directory = "https://acme-v02.api.letsencrypt.org/directory";
            contact = [ "mailto:ops@example.com" ];
          };
          on_demand = { enabled = true; allow = [ "example.com" "*.customers.example.com" ]; };
        };
        registration = { hold = "30s"; port_range = "20000-20099"; };
        telemetry.access_log = "logfmt";
      };
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          server = mkOption {
            default = { };
            description = "The `[server]` section.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                state_dir = mkOption {
                  type = types.str;
                  default = "/var/lib/proxy";
                  description = ''
                    Where the SQLite store lives. Under {file}`/var/lib` it is the unit's
                    `StateDirectory=`; elsewhere it is created by tmpfiles and made writable
                    (`ReadWritePaths=`). Not under {file}`/home`, {file}`/root` or a tmp
                    directory (hidden or private in the unit's sandbox).
                  '';
                };
                mgmt_socket = mkOption {
                  type = types.str;
                  default = "/run/proxy/mgmt.sock";
                  description = ''
                    Unix socket of the management API, used by proxyctl. A directory under
                    {file}`/run` is the unit's `RuntimeDirectory=`; elsewhere it is created by
                    tmpfiles and made writable.
                  '';
                };
                mgmt_listen = optionalKey types.str ''
                  `IP:PORT` of a TCP management listener (bearer token calls only; needs
                  {option}`mgmt_token_file`, e.g. from {option}`services.proxy.credentials`).
                  Anything but a loopback address also needs {option}`mgmt_tls`.
                '';
                mgmt_token_file = optionalKey types.str "File holding the token the TCP management listener requires.";
                mgmt_tls = optionalKey
                  (section {
                    cert = mkOption {
                      type = types.str;
                      description = "PEM certificate chain (leaf first) the TCP management listener presents.";
                    };
                    key = mkOption {
                      type = types.str;
                      description = ''
                        PEM private key of {option}`cert`; best a credential
                        ({option}`services.proxy.credentials`), so it stays out of the Nix store.
                      '';
                    };
                    client_ca = optionalKey types.str ''
                      PEM roots that client certificates must chain to. Set: every client must
                      present one (`proxyctl --cert --key`). Unset: no client certificate is asked for.
                    '';
                  }) ''
                  TLS of the TCP management listener (the bearer token stays required). Required
                  when {option}`mgmt_listen` is not a loopback address (127.0.0.0/8, ::1).
                '';
                admin_listen = mkOption {
                  type = types.str;
                  default = "127.0.0.1:4208";
                  description = "`IP:PORT` of /healthz, /readyz and /metrics; `\"\"` disables it.";
                };
                shutdown_timeout = mkOption {
                  type = types.str;
                  default = "30s";
                  description = "How long a stop waits for in-flight work.";
                };
                drain_timeout = mkOption {
                  type = types.str;
                  default = cfg.drainTimeout;
                  defaultText = literalExpression "config.services.proxy.drainTimeout";
                  description = "See {option}`services.proxy.drainTimeout`.";
                };
                upgrade_timeout = mkOption {
                  type = types.str;
                  default = cfg.upgradeTimeout;
                  defaultText = literalExpression "config.services.proxy.upgradeTimeout";
                  description = "See {option}`services.proxy.upgradeTimeout`.";
                };
                executable = mkOption {
                  type = types.str;
                  default = stableProxyd;
                  readOnly = true;
                  description = ''
                    The binary an upgrade starts: a symlink switched by each generation,
                    so a reload runs the new generation's proxyd.
                  '';
                };
                log_level = mkOption {
                  type = types.str;
                  default = cfg.logLevel;
                  defaultText = literalExpression "config.services.proxy.logLevel";
                  description = "See {option}`services.proxy.logLevel`.";
                };
              };
            };
          };
          listeners = mkOption {
            type = types.listOf listenerModule;
            default = [ ];
            description = ''
              `[[listeners]]`. Each becomes a socket unit
              {file}`proxy-listener@<name>-<hash of the address>.socket` owned by systemd
              (see {option}`services.proxy.listenerSocketUnits`), so ports below 1024 need
              no capability and the sockets outlive the process.
            '';
          };
          pools = mkOption {
            type = types.listOf poolModule;
            default = [ ];
            description = "`[[pools]]`.";
          };
          routes = mkOption {
            type = types.listOf routeModule;
            default = [ ];
            description = "`[[routes]]`: HTTP routing rules.";
          };
          tcp_routes = mkOption {
            type = types.listOf tcpRouteModule;
            default = [ ];
            description = "`[[tcp_routes]]`: more routes for stream listeners (by SNI on `tls-passthrough`).";
          };
          tls = mkOption {
            type = tlsModule;
            default = { };
            description = "`[tls]`: static certificates, ACME and the on-demand policy.";
          };
          registration = mkOption {
            type = registrationModule;
            default = { };
            description = "`[registration]`: services that register over the management API.";
          };
          telemetry = mkOption {
            type = telemetryModule;
            default = { };
            description = "`[telemetry]`: access log and OTLP export.";
          };
          cluster = optionalKey clusterModule ''
            `[cluster]`: fleet mode. Hosts with the same `etcd.prefix` share their
            API-owned pools, routes and TCP routes through etcd; this host's own settings
            stay per host and win on it.
          '';
        };
      };
    };

    configFile = mkOption {
      # A Nix path value (./proxy.toml), not a string: it is read at evaluation (its
      # listeners become the socket units) and copied to the store, where
      # `proxyd check-config` can read it at build time.
      type = types.nullOr (types.addCheck types.path builtins.isPath // {
        description = "path (a Nix path value such as ./proxy.toml, not a string)";
      });
      default = null;
      example = literalExpression "./proxy.toml";
      description = ''
        A config file to use instead of {option}`services.proxy.settings` (which must
        then be left unset). Its `[[listeners]]` become the socket units, and its
        `server.state_dir` and `server.mgmt_socket` the unit's writable directories. Its
        `server.executable` should be `/etc/proxy/bin/proxyd` for upgrades to pick up new
        generations. Secrets it refers to should live outside the store (see
        {option}`services.proxy.credentials`).
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Validate the config with `proxyd check-config` at build time. Turn off only for a
        config that refers to files outside the Nix store (e.g. certificates), which the
        build cannot read.
      '';
    };

    checkConfigPackage = mkOption {
      type = types.package;
      default =
        if pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then cfg.package
        else pkgs.buildPackages.proxy or (throw ''
          services.proxy.checkConfigPackage: cross-compiling, and no proxy package for the
          build platform (pkgs.buildPackages.proxy); set this option or checkConfig = false.
        '');
      defaultText = literalExpression ''
        services.proxy.package, or pkgs.buildPackages.proxy when the build platform cannot
        run the host's binaries (the flake's module sets the flake's package for the build
        platform)
      '';
      description = ''
        The proxy package whose `proxyd check-config` validates the config at build time:
        it runs on the build platform.
      '';
    };

    listenerSocketUnits = mkOption {
      type = types.attrsOf types.str;
      readOnly = true;
      default = builtins.listToAttrs (map
        (l: { inherit (l) name; value = "${listenerSocketName l}.socket"; })
        effective.listeners);
      defaultText = literalExpression ''{ <listener name> = "proxy-listener@<name>-<hash of the address>.socket"; }'';
      description = ''
        The socket unit of each listener, by listener name. The name changes with the
        listener's address, so a moved listener is a new unit (started on `switch`) and the
        old one is stopped.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the TCP ports of all listeners.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/proxy.env";
      description = "File of `NAME=value` lines added to the daemon's environment (kept out of the Nix store).";
    };

    credentials = mkOption {
      type = types.attrsOf types.path;
      default = { };
      example = { acme-eab-hmac = "/run/secrets/eab-hmac"; mgmt-token = "/run/secrets/proxy-token"; };
      description = ''
        Secrets passed with `LoadCredential=`: each is readable by the daemon as
        {file}`$CREDENTIALS_DIRECTORY/<name>`, e.g. the ACME EAB key or the management
        token.
      '';
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      example = "info,proxy::http=debug";
      description = "`server.log_level`: a tracing filter.";
    };

    drainTimeout = mkOption {
      type = types.str;
      default = "30s";
      description = "`server.drain_timeout`: how long an old process serves in-flight work after an upgrade.";
    };

    upgradeTimeout = mkOption {
      type = types.str;
      default = "30s";
      description = "`server.upgrade_timeout`: how long a new process may take to become ready.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra arguments of `proxyd`.";
    };

    bindPrivilegedPorts = mkOption {
      type = types.bool;
      default = builtins.any (p: p < 1024) selfBoundPorts;
      defaultText = literalExpression "true if the admin listener or the registration port range is below 1024";
      description = ''
        Grant `CAP_NET_BIND_SERVICE`. Listeners never need it: their sockets come from
        systemd.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "proxy";
      description = "User the daemon runs as (created when left at the default).";
    };

    group = mkOption {
      type = types.str;
      default = "proxy";
      description = "Group of the daemon; its members may use proxyctl.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.configFile == null || cfg.settings.listeners == [ ];
        message = "services.proxy: configFile is set, so settings are ignored; move settings.listeners into the file's [[listeners]].";
      }
      {
        assertion = effective.listeners != [ ];
        message = "${listenersSource} is empty: the proxy would listen nowhere.";
      }
      {
        assertion = builtins.all (l: l ? name && l ? address && portOf l.address != null) effective.listeners;
        message = "${listenersSource}: every listener needs a name and an address with a port.";
      }
      {
        assertion = builtins.length (unique (map (l: l.name or "") effective.listeners))
          == builtins.length effective.listeners;
        message = "${listenersSource}: names must be unique.";
      }
      {
        assertion = hasPrefix "/" stateDir && hasPrefix "/" mgmtSocket;
        message = "services.proxy: server.state_dir (${effective.state_dir}) and server.mgmt_socket (${mgmtSocket}) must be absolute paths.";
      }
      {
        assertion = !(isHidden stateDir) && !(isHidden mgmtDir);
        message = "services.proxy: server.state_dir (${stateDir}) and the directory of server.mgmt_socket (${mgmtDir}) must not be under ${concatStringsSep ", " hiddenPrefixes}: the unit's sandbox (ProtectHome=, PrivateTmp=) hides them.";
      }
      {
        assertion = builtins.all
          (t: let s = durationSeconds t; in s == null || s < unitTimeoutSeconds)
          [ effective.upgrade_timeout effective.shutdown_timeout ];
        message = "services.proxy: upgrade_timeout and shutdown_timeout must stay below ${toString unitTimeoutSeconds}s, the unit's start/reload/stop timeout.";
      }
    ];

    environment.etc = {
      "proxy/proxy.toml".source = checkedConfig;
      "proxy/bin/proxyd".source = "${cfg.package}/bin/proxyd";
      "proxy/bin/proxyctl".source = "${cfg.package}/bin/proxyctl";
    };

    environment.systemPackages = [ cfg.package ];
    environment.variables.PROXY_MGMT_SOCKET = mgmtSocket;

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall listenerPorts;

    users.users = optionalAttrs (cfg.user == "proxy") {
      proxy = {
        isSystemUser = true;
        inherit (cfg) group;
        home = stateDir;
      };
    };
    users.groups = optionalAttrs (cfg.group == "proxy") { proxy = { }; };

    # Directories outside /var/lib and /run: made here, owned by the daemon's user.
    systemd.tmpfiles.rules = map (dir: "d ${dir} 0750 ${cfg.user} ${cfg.group} - -") extraWritable;

    systemd.sockets = builtins.listToAttrs (map
      (listener: {
        name = listenerSocketName listener;
        value = {
          description = "proxy listener ${listener.name}";
          wantedBy = [ "sockets.target" ];
          socketConfig = {
            ListenStream = listener.address;
            FileDescriptorName = listener.name;
            Service = "proxy.service";
            # Bind even when the address is not (yet) on the host: sockets.target starts
            # before the network is configured, and a specific IP would fail with
            # EADDRNOTAVAIL.
            FreeBind = true;
            NoDelay = true;
            Backlog = 4096;
          };
        };
      })
      effective.listeners);

    systemd.services.proxy = {
      description = "proxy reverse proxy";
      wantedBy = [ "multi-user.target" ];
      # ACME orders, etcd discovery and OTLP export at start need the network up.
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ] ++ map (l: "${listenerSocketName l}.socket") effective.listeners;

      # A new package or config only reloads: ExecReload hands the sockets to the new
      # binary. Anything else that changes the unit restarts it in place (never
      # stop-then-start, which would leave a gap), keeping the sockets.
      reloadTriggers = [ cfg.package checkedConfig ];
      restartTriggers = [ listenerFingerprint ];
      stopIfChanged = false;

      serviceConfig = {
        Type = "notify";
        # The new process reports READY=1 before systemd knows it as the main process;
        # the old one then sends MAINPID= for it.
        NotifyAccess = "all";
        ExecStart = concatStringsSep " "
          ([ stableProxyd "--config" stableConfig ] ++ map utils.escapeSystemdExecArg cfg.extraArgs);
        ExecReload = "${stableProxyctl} --socket ${mgmtSocket} upgrade --wait";
        # Stopping signals every process of the unit: a draining old process finishes too.
        KillMode = "control-group";
        KillSignal = "SIGTERM";
        Restart = "on-failure";
        RestartSec = "1s";
        TimeoutStartSec = "${toString unitTimeoutSeconds}s";
        TimeoutStopSec = "${toString unitTimeoutSeconds}s";
        # Listening sockets are kept here too, so a plain restart keeps them open.
        FileDescriptorStoreMax = 128;
        FileDescriptorStorePreserve = "restart";
        LimitNOFILE = 1048576;

        User = cfg.user;
        Group = cfg.group;
        StateDirectory = mkIf (stateDirectory != null) stateDirectory;
        StateDirectoryMode = "0750";
        RuntimeDirectory = mkIf (runtimeDirectory != null) runtimeDirectory;
        RuntimeDirectoryMode = "0750";
        ReadWritePaths = mkIf (extraWritable != [ ]) extraWritable;
        # The management socket must outlive a restart of the unit.
        RuntimeDirectoryPreserve = "restart";
        # The management socket is 0660: members of the group may use proxyctl.
        UMask = "0007";
        LoadCredential = mapAttrsToList (name: path: "${name}:${path}") cfg.credentials;
        EnvironmentFile = mkIf (cfg.environmentFile != null) cfg.environmentFile;

        AmbientCapabilities = if cfg.bindPrivilegedPorts then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        CapabilityBoundingSet = if cfg.bindPrivilegedPorts then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];

        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
