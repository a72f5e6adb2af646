# Evaluate services.plasmavmc with the real nixpkgs module system, on the stub NixOS options.
#   (import ./eval-host.nix { inherit lib; }) [ { services.plasmavmc = ...; } ]
# returns the evaluated configuration plus what nixos-rebuild would report.
# With `preSwitchChecks = false`, the stub NixOS is one from before system.preSwitchChecks.
{
  lib,
  preSwitchChecks ? true,
}:
modules:
let
  evaluated = lib.evalModules {
    modules = [
      ./stub-nixos.nix
      (lib.optionalAttrs preSwitchChecks {
        options.system.preSwitchChecks = lib.mkOption {
          type = lib.types.attrsOf lib.types.str;
          default = { };
        };
      })
      ../../nixos-modules
      {
        _module.args.pkgs = import ./stub-pkgs.nix;
        _module.args.utils = import ./stub-utils.nix { inherit lib; };
      }
    ]
    ++ modules;
  };
  inherit (evaluated) config;
in
{
  inherit config;
  inherit (evaluated) options;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  # The document the agent reads, parsed back: what the JSON says, not what Nix meant.
  desired = builtins.fromJSON config.environment.etc."plasmavmc/desired.json".text;
}
