# The Python script of every VM test, as the NixOS test driver would run it: each
# testScript with its Nix interpolations filled in (nodes from vm-tests/eval/stub.nix),
# together with the names the driver defines for it (one per node).
#
#   nix-instantiate --eval --strict --json --readonly-mode vm-tests/eval/test-scripts.nix \
#     --arg lib 'import vm-tests/nixpkgs-lib/lib'
#
# gives { "<test>" = { script = "..."; machines = [ "<node>" ... ]; }; }. scripts/nix-lint
# writes each script to a file and runs pyflakes and mypy on it, as the driver does before
# booting anything.
{ lib }:

let
  stub = import ./stub.nix { inherit lib; };

  # The checks of vm-tests/default.nix that boot VMs.
  isVmTest = name: type:
    type == "regular" && lib.hasSuffix ".nix" name
    && !(builtins.elem name [ "default.nix" "lib.nix" ])
    && lib.hasInfix "pkgs.testers.runNixOSTest {" (builtins.readFile (../. + "/${name}"));

  vmTests = map (lib.removeSuffix ".nix")
    (builtins.attrNames (lib.filterAttrs isVmTest (builtins.readDir ../.)));

  scriptOf = name:
    let
      test = import (../. + "/${name}.nix") { inherit (stub) pkgs nixosModule package; };
      nodes = stub.testNodes test;
    in
    {
      script =
        if builtins.isFunction test.testScript then test.testScript { inherit nodes; }
        else test.testScript;
      machines = builtins.attrNames test.nodes;
    };
in
lib.genAttrs vmTests scriptOf
