{ config, lib, pkgs, utils, ... }:

let
  inherit (lib)
    concatStringsSep
    filterAttrs
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

  mgmtSocket = cfg.settings.server.mgmt_socket;

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
          nativeBuildInputs = [ cfg.package ];
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
    (map (l: portOf l.address) cfg.settings.listeners));

  # First port of a registration port range: [ 20000 20999 ] or "20000-20999".
  rangeStart = range:
    if isList range && range != [ ] then builtins.head range
    else if builtins.isString range then
      let m = builtins.match "([0-9]+)-[0-9]+" range;
      in if m == null then null else lib.toInt (builtins.head m)
    else null;

  # Listeners are passed by systemd socket units; the daemon binds only the admin listener
  # and ports opened for registrations itself.
  selfBoundPorts = builtins.filter (p: p != null) (
    optional (cfg.settings.server.admin_listen != null) (portOf cfg.settings.server.admin_listen)
    ++ optional (cfg.settings.registration != null && cfg.settings.registration ? port_range)
      (rangeStart cfg.settings.registration.port_range)
  );

  # One socket unit per listener: systemd allows one FileDescriptorName per socket unit,
  # and proxyd matches the passed fds to [[listeners]] by that name.
  listenerSocketName = listener: "proxy-listener@${listener.name}";

  # Only what the socket units pass decides whether a restart is needed: a new or moved
  # listener reaches the daemon only when systemd starts it again.
  listenerFingerprint = concatStringsSep " "
    (map (l: "${l.name}=${l.address}") cfg.settings.listeners);

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

  listenerModule = types.submodule {
    freeformType = settingsFormat.type;
    options = {
      name = mkOption {
        type = types.strMatching "[A-Za-z0-9_.-]+";
        description = "Unique name; also the `FileDescriptorName` of its socket unit.";
      };
      protocol = mkOption {
        type = types.enum [ "http" "https" "tcp" "tls" "tls-passthrough" ];
        default = "http";
        description = "What the listener speaks.";
      };
      address = mkOption {
        type = types.str;
        example = "0.0.0.0:443";
        description = "Address of the listener's socket unit (`ListenStream=`).";
      };
      pool = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "For `tcp`, `tls` and `tls-passthrough`: the pool that receives the connections.";
      };
    };
  };

  poolModule = types.submodule {
    freeformType = settingsFormat.type;
    options = {
      name = mkOption {
        type = types.str;
        description = "Unique name.";
      };
      balance = mkOption {
        type = types.enum [ "round_robin" "ordered" "least_conn" ];
        default = "round_robin";
        description = "How an upstream is picked.";
      };
      upstreams = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "10.0.0.1:8080" "unix:/run/app.sock" ];
        description = "Static upstreams (`host:port` or `unix:/path`).";
      };
      health = mkOption {
        type = types.nullOr (types.submodule {
          freeformType = settingsFormat.type;
          options = {
            path = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = "HTTP path fetched with GET; unset: TCP connect only.";
            };
            interval = mkOption {
              type = types.str;
              default = "2s";
              description = "Time between checks.";
            };
          };
        });
        default = null;
        description = "Active health check.";
      };
    };
  };

  routeModule = types.submodule {
    freeformType = settingsFormat.type;
    options = {
      name = mkOption {
        type = types.str;
        description = "Unique name.";
      };
      listener = mkOption {
        type = types.str;
        description = "The HTTP listener the route applies to.";
      };
      host = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "*.example.com";
        description = "Exact host or `*.suffix`; unset matches any host.";
      };
      path_prefix = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The request path starts with this.";
      };
      pool = mkOption {
        type = types.str;
        description = "The pool that serves matching requests.";
      };
    };
  };

  # Sections filled in by later features: declared so they are documented and checked as
  # TOML, with their keys left to `proxyd check-config`.
  sectionOption = description: mkOption {
    type = types.nullOr (types.submodule { freeformType = settingsFormat.type; });
    default = null;
    inherit description;
  };
in
{
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
      example = literalExpression ''
        {
          listeners = [{ name = "web"; protocol = "http"; address = "0.0.0.0:80"; }];
          pools = [{ name = "app"; upstreams = [ "127.0.0.1:9001" ]; health.path = "/healthz"; }];
          routes = [{ name = "all"; listener = "web"; path_prefix = "/"; pool = "app"; }];
        }
      '';
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
                  description = "Where the SQLite store lives (the unit's `StateDirectory`).";
                };
                mgmt_socket = mkOption {
                  type = types.str;
                  default = "/run/proxy/mgmt.sock";
                  description = "Unix socket of the management API, used by proxyctl.";
                };
                admin_listen = mkOption {
                  type = types.nullOr types.str;
                  default = "127.0.0.1:42008";
                  description = "Address of /healthz, /readyz and /metrics; null disables it.";
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
              {file}`proxy-listener@<name>.socket` owned by systemd, so ports below 1024
              need no capability and the sockets outlive the process.
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
          tls = sectionOption "`[tls]`: certificates, ACME and the on-demand allowlist.";
          registration = sectionOption ''
            `[registration]`: services that register over the API. A `port_range`
            starting below 1024 grants `CAP_NET_BIND_SERVICE`.
          '';
          telemetry = sectionOption "`[telemetry]`: OTLP export.";
        };
      };
    };

    configFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/proxy/site.toml";
      description = ''
        A config file to use instead of {option}`services.proxy.settings`. Its
        `server.executable` should be `/etc/proxy/bin/proxyd` for upgrades to pick up new
        generations. The socket units still come from
        {option}`services.proxy.settings.listeners`: keep those equal to the file's
        `[[listeners]]` (name and address).
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Validate the config with `proxyd check-config` at build time. Turn off only for a
        {option}`services.proxy.configFile` that refers to files outside the Nix store.
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
        assertion = cfg.configFile != null || cfg.settings.listeners != [ ];
        message = "services.proxy.settings.listeners is empty: the proxy would listen nowhere.";
      }
      {
        assertion = builtins.all (l: portOf l.address != null) cfg.settings.listeners;
        message = "services.proxy.settings.listeners: every address needs a port.";
      }
      {
        assertion = builtins.length (unique (map (l: l.name) cfg.settings.listeners))
          == builtins.length cfg.settings.listeners;
        message = "services.proxy.settings.listeners: names must be unique.";
      }
      {
        assertion = builtins.all
          (t: let s = durationSeconds t; in s == null || s < unitTimeoutSeconds)
          [ cfg.settings.server.upgrade_timeout cfg.settings.server.shutdown_timeout ];
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
        home = cfg.settings.server.state_dir;
      };
    };
    users.groups = optionalAttrs (cfg.group == "proxy") { proxy = { }; };

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
            NoDelay = true;
            Backlog = 4096;
          };
        };
      })
      cfg.settings.listeners);

    systemd.services.proxy = {
      description = "proxy reverse proxy";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      wants = map (l: "${listenerSocketName l}.socket") cfg.settings.listeners;

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
        StateDirectory = "proxy";
        StateDirectoryMode = "0750";
        RuntimeDirectory = "proxy";
        RuntimeDirectoryMode = "0750";
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
