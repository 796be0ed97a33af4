# The proxy.toml of every VM test's proxy node and of the module's example settings
# (vm-tests/rendered/render.nix), generated with pkgs.formats.toml and accepted by this
# package's `proxyd check-config`. scripts/nix-lint runs the same check without Nix
# builds on the committed vm-tests/rendered/*.toml.
{ pkgs, package, ... }:

let
  inherit (pkgs) lib;
  rendered = import ./rendered/render.nix { inherit lib; };
  toml = pkgs.formats.toml { };
in
pkgs.runCommand "proxy-rendered-configs" { nativeBuildInputs = [ package ]; } ''
  set -eu
  ${lib.concatStrings (lib.mapAttrsToList
    (name: settings: "proxyd check-config ${toml.generate "${name}.toml" settings}\n")
    rendered)}
  touch $out
''
