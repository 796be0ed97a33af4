# The package arguments flake.nix hands buildRustPackage, for each system, evaluated with
# nixpkgs' lib and stand-ins for the packages (rustPlatform.buildRustPackage returns its
# arguments): on x86_64 RUSTFLAGS repeats the setup hook's target flag and names the
# profile pgo/proxyd.profdata (a store path); other systems pass no RUSTFLAGS.
# Run by scripts/nix-lint: nix-instantiate --eval --strict --json --readonly-mode.
{ lib }:
let
  flake = import ../../flake.nix;
  standIn = system: {
    stdenv = {
      hostPlatform = {
        isx86_64 = lib.hasPrefix "x86_64-" system;
        isStatic = false;
      };
      buildPlatform.canExecute = _: true;
    };
    installShellFiles = "installShellFiles";
    rustPlatform.buildRustPackage = args: args;
  };
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] standIn;
  };
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs;
  };
  x86 = outputs.packages.x86_64-linux.proxy;
  arm = outputs.packages.aarch64-linux.proxy;
  check = name: ok: detail: { inherit name ok detail; };
in
{
  checks = [
    (check "x86_64: RUSTFLAGS names the profile"
      (x86 ? RUSTFLAGS && builtins.match ".*-C profile-use=/nix/store/[a-z0-9]+-proxyd\\.profdata.*" x86.RUSTFLAGS != null)
      (x86.RUSTFLAGS or "no RUSTFLAGS"))
    (check "x86_64: RUSTFLAGS repeats the setup hook's -crt-static"
      (lib.hasPrefix "-C target-feature=-crt-static " (x86.RUSTFLAGS or ""))
      (x86.RUSTFLAGS or "no RUSTFLAGS"))
    (check "x86_64: no env.RUSTFLAGS (buildRustPackage sets RUSTFLAGS itself)"
      (!(x86 ? env && x86.env ? RUSTFLAGS))
      "env")
    (check "aarch64: no RUSTFLAGS" (!(arm ? RUSTFLAGS)) (arm.RUSTFLAGS or ""))
    (check "both: the same arguments otherwise"
      (lib.attrNames (removeAttrs x86 [ "RUSTFLAGS" ]) == lib.attrNames arm
        && x86.cargoBuildFlags == arm.cargoBuildFlags && x86.pname == arm.pname)
      "x86_64: ${toString (lib.attrNames x86)}; aarch64: ${toString (lib.attrNames arm)}")
  ];
}
