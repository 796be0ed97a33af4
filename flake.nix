{
  description = "proxy: a routing reverse proxy (proxyd) with zero-downtime upgrades, and its CLI (proxyctl)";

  # nixos-25.11 by revision (no flake.lock): its rustc is 1.91.1. nix/nixpkgs-pin.toml
  # records both, and scripts/rust-version-check keeps them, Cargo.lock and the README in
  # agreement.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/8fd9daa3db09ced9700431c5b7ad0e8ba199b575";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      version = (lib.importTOML ./Cargo.toml).workspace.package.version;

      # Only what the Rust build reads: editing the Nix files, the tests or the docs does
      # not rebuild the package.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./proxy
          ./proto
          ./mgmt-cli
        ];
      };

      # Our own .nix files: not the copy of nixpkgs' lib the evaluation checks use.
      nixFiles = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.difference
          (lib.fileset.fileFilter (file: file.hasExt "nix") ./.)
          ./vm-tests/nixpkgs-lib;
      };

      # Profile-guided optimisation with pgo/proxyd.profdata (scripts/pgo-profile, made
      # with this nixpkgs' rustc on x86_64, so only there). A top-level RUSTFLAGS, which
      # buildRustPackage passes on (in `env` it would clash with the RUSTFLAGS attribute
      # buildRustPackage sets itself). It takes the place of the rustflags the setup
      # hook's Cargo configuration gives the target, so that one flag is repeated.
      profileFlags = pkgs: lib.optionalAttrs pkgs.stdenv.hostPlatform.isx86_64 {
        RUSTFLAGS = lib.concatStringsSep " " [
          "-C target-feature=${if pkgs.stdenv.hostPlatform.isStatic then "+" else "-"}crt-static"
          "-C profile-use=${./pgo/proxyd.profdata}"
        ];
      };

      mkProxy = pkgs: pkgs.rustPlatform.buildRustPackage ({
        pname = "proxy";
        inherit version src;

        cargoLock.lockFile = ./Cargo.lock;

        nativeBuildInputs = [ pkgs.installShellFiles ];

        cargoBuildFlags = [ "--package" "proxy" "--package" "proxyctl" ];
        # Unit tests only: the integration tests start pebble, etcd and real daemons,
        # and the VM tests (checks) cover the system.
        cargoTestFlags = [ "--workspace" "--lib" "--bins" ];

        # Completions and manual pages come from the binaries' own flag definitions.
        postInstall = lib.optionalString (pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform) ''
          for bin in proxyd proxyctl; do
            installShellCompletion --cmd $bin \
              --bash <($out/bin/$bin completions bash) \
              --zsh <($out/bin/$bin completions zsh) \
              --fish <($out/bin/$bin completions fish)
            $out/bin/$bin man --dir man
          done
          installManPage man/*.1
        '';

        meta = {
          description = "Routing reverse proxy with on-demand TLS, a gRPC management API and zero-downtime upgrades";
          license = lib.licenses.asl20;
          mainProgram = "proxyd";
          platforms = lib.platforms.linux;
        };
      } // profileFlags pkgs);
    in
    {
      overlays.default = final: _prev: {
        proxy = mkProxy final;
      };

      packages = forAllSystems (pkgs: rec {
        proxy = mkProxy pkgs;
        default = proxy;
      });

      # The module, with the package of this flake as the default of services.proxy.package.
      nixosModules.default = { pkgs, ... }: {
        imports = [ ./nixos-module ];
        services.proxy.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        # `proxyd check-config` runs where the system is built.
        services.proxy.checkConfigPackage = lib.mkDefault self.packages.${pkgs.stdenv.buildPlatform.system}.default;
      };

      checks = forAllSystems (pkgs:
        let
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        in
        {
          inherit package;

          nix-lint = pkgs.runCommand "proxy-nix-lint"
            { nativeBuildInputs = [ pkgs.nixpkgs-fmt pkgs.deadnix ]; } ''
            cd ${nixFiles}
            nixpkgs-fmt --check .
            deadnix --fail .
            touch $out
          '';
        }
        // import ./vm-tests {
          inherit pkgs package;
          nixosModule = self.nixosModules.default;
        });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = with pkgs; [
            clippy
            rustfmt
            rust-analyzer
            grpcurl
            pebble
            etcd
            nixpkgs-fmt
            deadnix
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
