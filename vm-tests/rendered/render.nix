# The proxy.toml that services.proxy generates for each VM test's proxy node (and each of
# its specialisations) and for the module's example settings, evaluated with nixpkgs' lib
# alone: no nixpkgs, no Nix store, nothing built. The NixOS options the module writes to
# besides its own are declared loosely here; everything else a node sets is ignored.
#
#   nix-instantiate --eval --strict --json --readonly-mode vm-tests/rendered/render.nix \
#     --arg lib 'import /path/to/nixpkgs/lib'
#
# gives { "<test>[.<specialisation>]" = <settings as the module hands them to
# pkgs.formats.toml>; }. scripts/nix-lint turns them into TOML and runs
# `proxyd check-config` on each.
{ lib }:

let
  inherit (lib) types mkOption;

  # Stand-ins for the store paths and packages the tests name. Only their names matter:
  # the settings never look inside them.
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

  pkgs = {
    inherit lib;
    path = storePath "nixpkgs";
    runtimeShell = "/bin/sh";
    stdenv.hostPlatform.system = "x86_64-linux";
    formats.toml = _: {
      type = tomlValue;
      generate = name: value: { outPath = storePath name; inherit value; };
    };
    testers.runNixOSTest = test: test;
    writeText = name: _: storePath name;
    writeShellScript = name: _: storePath name;
    writeShellScriptBin = name: _: fakeDerivation name;
    runCommand = name: _: _: fakeDerivation name;
  } // lib.genAttrs [ "proxy" "curl" "etcd" "grpcurl" "jq" "openssl" "pebble" "python3" ] fakeDerivation;

  package = fakeDerivation "proxy";
  nixosModule = ../../nixos-module;

  # The test network: fixed addresses for the node names the tests use.
  nodes = lib.recursiveUpdate
    (lib.mapAttrs
      (_: address: { networking.primaryIPAddress = address; })
      { acme = "192.168.1.1"; backend = "192.168.1.2"; client = "192.168.1.3"; etcd = "192.168.1.4"; proxy = "192.168.1.5"; })
    { acme.test-support.acme = { caDomain = "acme.test"; caCert = storePath "ca.cert.pem"; }; };

  # The options outside services.proxy that the module and the tests' proxy nodes define
  # and that matter here; `_module.check = false` ignores the rest.
  nixosStub = {
    options = {
      assertions = mkOption { type = types.listOf types.raw; default = [ ]; };
      environment.etc = mkOption { type = types.lazyAttrsOf types.raw; default = { }; };
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
        inherit pkgs nodes;
        utils.escapeSystemdExecArg = builtins.toJSON;
      };
      # The stand-in for the build-time check: scripts/nix-lint runs it for real.
      services.proxy.checkConfig = lib.mkForce false;
    };
  };

  evalHost = modules: (lib.evalModules { modules = [ nixosStub ] ++ modules; }).config;

  settingsOf = config:
    let failed = builtins.filter (a: !a.assertion) config.assertions;
    in
    if failed != [ ] then throw (lib.concatMapStringsSep "\n" (a: a.message) failed)
    else config.environment.etc."proxy/proxy.toml".source.value;

  # The proxy node of a test, and one host per specialisation of it.
  renderTest = name:
    let
      test = import (../. + "/${name}.nix") { inherit pkgs nixosModule package; };
      base = [ test.nodes.proxy ];
      config = evalHost base;
    in
    { ${name} = settingsOf config; }
    // lib.mapAttrs'
      (special: value: lib.nameValuePair "${name}.${special}"
        (settingsOf (evalHost (base ++ [ value.configuration ]))))
      config.specialisation;

  # The checks of vm-tests/default.nix that boot VMs.
  isVmTest = name: type:
    type == "regular" && lib.hasSuffix ".nix" name
    && !(builtins.elem name [ "default.nix" "lib.nix" ])
    && lib.hasInfix "pkgs.testers.runNixOSTest {" (builtins.readFile (../. + "/${name}"));

  vmTests = map (lib.removeSuffix ".nix") (builtins.attrNames (lib.filterAttrs isVmTest (builtins.readDir ../.)));

  moduleExample =
    let
      inherit (lib.evalModules { modules = [ nixosStub nixosModule ]; }) options;
    in
    settingsOf (evalHost [
      nixosModule
      { services.proxy = { enable = true; inherit package; settings = options.services.proxy.settings.example; }; }
    ]);
in
lib.foldl' (acc: name: acc // renderTest name) { module-example = moduleExample; } vmTests
