# The module evaluation checks of vm-tests/eval/module.nix (which scripts/nix-lint runs
# with the copy of nixpkgs' lib in vm-tests/nixpkgs-lib), here with the lib of the pinned
# nixpkgs itself. Pure evaluation: nothing is built but the result file.
{ pkgs, ... }:

let
  inherit (pkgs) lib;
  inherit (import ./eval/module.nix { inherit lib; }) checks;
  failed = builtins.filter (c: !c.ok) checks;
in
assert lib.assertMsg (failed == [ ])
  "module evaluation checks failed:\n${lib.concatMapStringsSep "\n" (c: "${c.name}: ${c.detail}") failed}";
pkgs.writeText "proxy-module-eval" ''
  ${toString (builtins.length checks)} module evaluation checks hold
''
