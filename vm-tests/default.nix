# Every other .nix file here is a check: a NixOS VM test (pkgs.testers.runNixOSTest) or an
# evaluation check, each taking { pkgs, nixosModule, package }. lib.nix holds what they
# share; local/ is the harness that runs the same scenarios under systemd-nspawn.
{ pkgs, nixosModule, package }:

let
  inherit (pkgs) lib;
  shared = [ "default.nix" "lib.nix" ];
  isCheck = name: type:
    type == "regular" && lib.hasSuffix ".nix" name && !(builtins.elem name shared);
in
lib.mapAttrs'
  (name: _: lib.nameValuePair "vm-${lib.removeSuffix ".nix" name}"
    (import (./. + "/${name}") { inherit pkgs nixosModule package; }))
  (lib.filterAttrs isCheck (builtins.readDir ./.))
