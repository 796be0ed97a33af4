# Stand-ins that let the module and the VM tests be evaluated with nixpkgs' lib alone: no
# nixpkgs, no Nix store, nothing built. The NixOS options the module and the tests' nodes
# write to are declared loosely (`_module.check = false` drops the rest), and the few
# parts of `pkgs` they use return plain values that keep their arguments, so the checks
# can look at what the module asked for (a derivation's inputs, a generated file's value).
#
# Used by vm-tests/rendered/render.nix (the proxy.toml of every test),
# vm-tests/eval/module.nix (the module's units for several settings) and
# vm-tests/eval/test-scripts.nix (every VM test's Python script).
{ lib }:

let
  inherit (lib) types mkOption;

  storePath = name: "/nix/store/00000000000000000000000000000000-${name}";
  fakeDerivation = name: {
    type = "derivation";
    inherit name;
    outPath = storePath name;
    version = "0";
    overrideAttrs = _: fakeDerivation "${name}-next";
    meta.mainProgram = name;
  };

  # pkgs.formats.toml: the same value type; `generate` keeps the value it is given.
  tomlValue = types.nullOr (types.oneOf [
    types.bool
    types.int
    types.float
    types.str
    types.path
    (types.attrsOf tomlValue)
    (types.listOf tomlValue)
  ]);

  # A platform as lib.systems.elaborate describes it, reduced to what the module uses.
  platform = system: {
    inherit system;
    canExecute = other: other.system == system;
  };

  # `buildPlatform` / `hostPlatform`: a native host unless told otherwise.
  mkPkgs = { buildSystem ? "x86_64-linux", hostSystem ? "x86_64-linux" }:
    let
      self = {
        inherit lib;
        # What the tests import from nixpkgs, as stand-ins. A plain string outside pure
        # evaluation: `nix-instantiate --readonly-mode` cannot copy the directory to the
        # store, which interpolating a path value would do. Flakes evaluate purely and
        # copy it.
        path = if lib.inPureEvalMode then ./nixpkgs-stand-in else toString ./nixpkgs-stand-in;
        runtimeShell = "/bin/sh";
        stdenv = {
          buildPlatform = platform buildSystem;
          hostPlatform = platform hostSystem;
        };
        formats.toml = _: {
          type = tomlValue;
          generate = name: value: { outPath = storePath name; inherit name value; };
        };
        testers.runNixOSTest = test: test;
        writeText = name: text: { outPath = storePath name; inherit name text; };
        writeShellScript = name: _: storePath name;
        writeShellScriptBin = name: _: fakeDerivation name;
        runCommand = name: env: script: fakeDerivation name // { inherit env script; };
        # The packages of the build platform: the same names, marked so a check can tell.
        buildPackages =
          if buildSystem == hostSystem then self
          else mkPkgs { inherit buildSystem; hostSystem = buildSystem; } // { isBuildPackages = true; };
      } // lib.genAttrs [ "proxy" "curl" "etcd" "grpcurl" "jq" "openssl" "pebble" "python3" ]
        (name: fakeDerivation "${name}-${hostSystem}");
    in
    self;

  pkgs = mkPkgs { };
  package = fakeDerivation "proxy";

  # Fixed addresses and test-support values for the node names the tests use.
  nodeAddresses = {
    acme = "192.168.1.1";
    backend = "192.168.1.2";
    client = "192.168.1.3";
    etcd = "192.168.1.4";
    proxy = "192.168.1.5";
    proxy2 = "192.168.1.6";
  };

  loose = mkOption { type = types.lazyAttrsOf types.anything; default = { }; };

  # The options outside services.proxy that the module and the tests' nodes define and
  # that the checks read.
  nixosStub = { config, ... }: {
    options = {
      assertions = mkOption { type = types.listOf types.raw; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      environment.etc = mkOption { type = types.lazyAttrsOf types.raw; default = { }; };
      environment.systemPackages = mkOption { type = types.listOf types.raw; default = [ ]; };
      environment.variables = mkOption { type = types.attrsOf types.str; default = { }; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      networking.primaryIPAddress = mkOption { type = types.str; default = ""; };
      services.prometheus.ruleFiles = mkOption { type = types.listOf types.raw; default = [ ]; };
      services.prometheus.scrapeConfigs = mkOption { type = types.listOf types.raw; default = [ ]; };
      users.users = loose;
      users.groups = loose;
      systemd.services = loose;
      systemd.sockets = loose;
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      system.build.toplevel = mkOption { type = types.str; default = storePath "nixos-system"; };
      test-support.acme = {
        caDomain = mkOption { type = types.str; default = "acme.test"; };
        caCert = mkOption { type = types.str; default = storePath "ca.cert.pem"; };
      };
      specialisation = mkOption {
        type = types.attrsOf (types.submodule {
          options.configuration = mkOption { type = types.deferredModule; default = { }; };
        });
        default = { };
      };
    };
    config = {
      _module.check = false;
      _module.args = {
        pkgs = lib.mkDefault pkgs;
        utils.escapeSystemdExecArg = builtins.toJSON;
      };
      # The specialisations' top levels, as the tests interpolate them.
      system.build.toplevel = lib.mkDefault (storePath "nixos-system-${config.networking.primaryIPAddress}");
    };
  };

  # A host's configuration from modules (the stub first).
  evalHost = modules: (lib.evalModules { modules = [ nixosStub ] ++ modules; }).config;

  # The assertions that failed, as their messages.
  failedAssertions = config: map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);

  # Every node of a test evaluated, with its address: what `nodes` is in a test script.
  testNodes = test:
    let
      nodes = lib.mapAttrs
        (name: node: evalHost [
          node
          {
            _module.args.nodes = nodes;
            networking.primaryIPAddress = nodeAddresses.${name};
          }
        ])
        test.nodes;
    in
    nodes;
in
{
  inherit storePath fakeDerivation mkPkgs pkgs package nodeAddresses nixosStub evalHost
    failedAssertions testNodes;
  nixosModule = ../../nixos-module;
}
