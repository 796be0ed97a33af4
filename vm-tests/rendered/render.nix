# The proxy.toml that services.proxy generates for each VM test's proxy node (and each of
# its specialisations) and for the module's example settings, evaluated with nixpkgs' lib
# alone (the stand-ins of vm-tests/eval/stub.nix): no nixpkgs, no Nix store, nothing built.
#
#   nix-instantiate --eval --strict --json --readonly-mode vm-tests/rendered/render.nix \
#     --arg lib 'import vm-tests/nixpkgs-lib/lib'
#
# gives { "<test>[.<specialisation>]" = <settings as the module hands them to
# pkgs.formats.toml>; }. scripts/nix-lint turns them into TOML and runs
# `proxyd check-config` on each.
{ lib }:

let
  stub = import ../eval/stub.nix { inherit lib; };
  inherit (stub) nixosModule package;

  # The stand-in for the build-time check: scripts/nix-lint runs it for real.
  noBuildCheck = { services.proxy.checkConfig = lib.mkForce false; };

  settingsOf = config:
    let failed = stub.failedAssertions config;
    in
    if failed != [ ] then throw (lib.concatStringsSep "\n" failed)
    else config.environment.etc."proxy/proxy.toml".source.value;

  # The proxy node of a test, and one host per specialisation of it.
  renderTest = name:
    let
      test = import (../. + "/${name}.nix") { inherit (stub) pkgs nixosModule package; };
      nodes = stub.testNodes test;
      base = [
        test.nodes.proxy
        noBuildCheck
        { _module.args.nodes = nodes; networking.primaryIPAddress = stub.nodeAddresses.proxy; }
      ];
      config = stub.evalHost base;
    in
    { ${name} = settingsOf config; }
    // lib.mapAttrs'
      (special: value: lib.nameValuePair "${name}.${special}"
        (settingsOf (stub.evalHost (base ++ [ value.configuration ]))))
      config.specialisation;

  # The checks of vm-tests/default.nix that boot VMs.
  isVmTest = name: type:
    type == "regular" && lib.hasSuffix ".nix" name
    && !(builtins.elem name [ "default.nix" "lib.nix" ])
    && lib.hasInfix "pkgs.testers.runNixOSTest {" (builtins.readFile (../. + "/${name}"));

  vmTests = map (lib.removeSuffix ".nix") (builtins.attrNames (lib.filterAttrs isVmTest (builtins.readDir ../.)));

  moduleExample =
    let
      inherit (lib.evalModules { modules = [ stub.nixosStub nixosModule ]; }) options;
    in
    settingsOf (stub.evalHost [
      nixosModule
      noBuildCheck
      { services.proxy = { enable = true; inherit package; settings = options.services.proxy.settings.example; }; }
    ]);
in
lib.foldl' (acc: name: acc // renderTest name) { module-example = moduleExample; } vmTests
