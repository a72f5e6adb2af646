# The desired-state JSON text the module writes for one configuration module, or an evaluation
# error listing its failed assertions. Used by agent/tests/nix_module.rs:
#   nix-instantiate --eval --strict --json -E 'import checks/eval/desired-json.nix { module = ./x.nix; }'
{
  lib ? import ./nixpkgs-lib.nix,
  module,
}:
let
  evaluated = import ./eval-host.nix { inherit lib; } [ module ];
in
if evaluated.failedAssertions != [ ] then
  throw "failed assertions:\n${lib.concatStringsSep "\n" evaluated.failedAssertions}"
else
  evaluated.config.environment.etc."plasmavmc/desired.json".text
