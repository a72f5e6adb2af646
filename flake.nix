{
  description = "plasmavmc: declarative QEMU VMs on NixOS hosts, changed live by nixos-rebuild switch";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    disko = {
      url = "github:nix-community/disko";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      disko,
    }:
    let
      inherit (nixpkgs) lib;
      # x86_64 only: the agent runs qemu-system-x86_64 and offers x86 machines (q35, pc). aarch64
      # would need qemu-system-aarch64, the `virt` machine, UEFI firmware and its hotplug rules.
      systems = [ "x86_64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      plasmavmcPackage =
        {
          lib,
          rustPlatform,
          protobuf,
          installShellFiles,
          makeWrapper,
          qemu_kvm,
          iproute2,
        }:
        rustPlatform.buildRustPackage {
          pname = "plasmavmc";
          version = (lib.importTOML ./agent/Cargo.toml).package.version;
          # Only what the build reads: docs or Nix changes do not rebuild the agent.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./agent
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;
          # The agent only; plasmavmc-bench (docs/benchmarks.md) is a developer tool.
          cargoBuildFlags = [
            "--package"
            "plasmavmc-agent"
            "--bin"
            "plasmavmc"
          ];
          # etcd-client compiles etcd's protobuf definitions with protoc at build time.
          nativeBuildInputs = [
            protobuf
            installShellFiles
            makeWrapper
          ];
          # Completions and man pages come from the clap definitions (`plasmavmc completions`,
          # `plasmavmc manpages`), so they always match the binary.
          postInstall = ''
            installShellCompletion --cmd plasmavmc \
              --bash <($out/bin/plasmavmc completions bash) \
              --zsh <($out/bin/plasmavmc completions zsh) \
              --fish <($out/bin/plasmavmc completions fish)
            $out/bin/plasmavmc manpages man
            installManPage man/*.1
            # `nix run` finds QEMU and ip; appended, so the NixOS unit's PATH (qemuPackage) wins.
            wrapProgram $out/bin/plasmavmc --suffix PATH : ${
              lib.makeBinPath [
                qemu_kvm
                iproute2
              ]
            }
          '';
          # The agent's tests boot real QEMU guests and start a real etcd: they cannot run in the
          # build sandbox. They run in CI (scripts/test.sh) and in the NixOS VM tests (checks).
          doCheck = false;
          meta = {
            description = "Agent that runs declared QEMU VMs and applies config changes live over QMP";
            license = lib.licenses.mit;
            mainProgram = "plasmavmc";
            platforms = lib.platforms.linux;
          };
        };
    in
    {
      overlays.default = final: _prev: { plasmavmc = final.callPackage plasmavmcPackage { }; };

      packages = forAllSystems (
        pkgs:
        let
          plasmavmc = pkgs.callPackage plasmavmcPackage { };
        in
        {
          inherit plasmavmc;
          default = plasmavmc;
        }
      );

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          meta.description = "The plasmavmc command line (agent, plan, reload, status, ...)";
        };
      });

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos-modules ];
          # The overlay's package when the host uses the overlay, else this flake's.
          services.plasmavmc.package = lib.mkDefault (
            pkgs.plasmavmc or self.packages.${pkgs.stdenv.hostPlatform.system}.default
          );
        };

      # nixfmt is the RFC 166 style formatter (formerly packaged as nixfmt-rfc-style).
      formatter = forAllSystems (pkgs: pkgs.nixfmt);

      checks = forAllSystems (
        pkgs:
        {
          module-eval = import ./checks/eval/flake-check.nix { inherit pkgs lib; };
          options-doc = import ./checks/docs/flake-check.nix { inherit pkgs lib; };
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          vm-lifecycle = pkgs.testers.runNixOSTest (
            import ./checks/vm-tests/lifecycle.nix { plasmavmcModule = self.nixosModules.default; }
          );
          vm-host-lifecycle = pkgs.testers.runNixOSTest (
            import ./checks/vm-tests/host-lifecycle.nix { plasmavmcModule = self.nixosModules.default; }
          );
          vm-ha-failover = pkgs.testers.runNixOSTest (
            import ./checks/vm-tests/ha-failover.nix { plasmavmcModule = self.nixosModules.default; }
          );
          vm-disks = pkgs.testers.runNixOSTest (
            import ./checks/vm-tests/disks.nix { plasmavmcModule = self.nixosModules.default; }
          );
          vm-migration = pkgs.testers.runNixOSTest (
            import ./checks/vm-tests/migration.nix { plasmavmcModule = self.nixosModules.default; }
          );
          example-hypervisor = self.nixosConfigurations.example-hypervisor.config.system.build.toplevel;
        }
      );

      nixosConfigurations.example-hypervisor = lib.nixosSystem {
        modules = [
          disko.nixosModules.disko
          self.nixosModules.default
          ./examples/hypervisor/configuration.nix
        ];
      };
    };
}
