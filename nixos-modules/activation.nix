# The switch shows the operator what it will do to the VMs, and refuses a desired state the agent
# would refuse, before anything on the host changes.
#
# `system.preSwitchChecks` (nixpkgs 24.11 and later; activation scripts are being retired,
# nixpkgs #475305, and do not run under nixos-init) runs before the bootloader or any unit is
# touched: it validates the new desired state and prints `plasmavmc plan` for it against the
# running agent; an invalid state, or a plan the agent cannot make (a VM it cannot read), fails
# the switch. With no agent running there is nothing to diff against: validation only.
# `nixos-rebuild dry-activate` keeps the same preview through an activation script that acts
# only on dry activation. On a NixOS without preSwitchChecks the activation script previews on
# every switch, as before, and cannot refuse; evaluation warns about it.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:
let
  cfg = config.services.plasmavmc;
  cli = import ./cli.nix { inherit lib cfg; };
  inherit (cli) plasmavmc;
  timeout = lib.getExe' pkgs.coreutils "timeout";
  newDesired = config.environment.etc."plasmavmc/desired.json".source;
  controlSocket = "${cfg.runDir}/control.sock";
  hasPreSwitchChecks = options.system ? preSwitchChecks;
  agentRunning = "[ -S ${lib.escapeShellArg controlSocket} ]";
  planCommand = "${timeout} 30 ${
    lib.escapeShellArgs (cli.toAgent [
      "plan"
      "--config"
      newDesired
    ])
  }";

  # Refuses (non-zero) what the agent would refuse; prints the plan.
  check = ''
    if ! ${timeout} 30 ${plasmavmc} validate ${newDesired}; then
      echo "plasmavmc: the new desired state is invalid (see above); refusing the switch" >&2
      exit 1
    fi
    if ${agentRunning}; then
      echo "plasmavmc: plan for the new configuration:"
      if ! ${planCommand}; then
        echo "plasmavmc: the agent could not plan the new configuration (see above); refusing the switch" >&2
        exit 1
      fi
    else
      echo "plasmavmc: agent not running; it applies the configuration when it starts"
    fi
  '';

  # Shows the plan, never fails (an activation script must not).
  preview = ''
    if ${agentRunning}; then
      echo "plasmavmc: plan for the new configuration:"
      ${planCommand} \
        || echo "plasmavmc: no plan (exit $?); the reload will report what it applied" >&2
    else
      echo "plasmavmc: agent not running; it applies the configuration when it starts"
      ${timeout} 30 ${plasmavmc} validate ${newDesired} \
        || echo "plasmavmc: the new desired state is invalid (see above); the agent will refuse it" >&2
    fi
  '';
in
{
  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (lib.optionalAttrs hasPreSwitchChecks { system.preSwitchChecks.plasmavmc = check; })
      {
        system.activationScripts.plasmavmc-plan = {
          supportsDryActivation = true;
          text =
            if hasPreSwitchChecks then
              ''
                if [ "''${NIXOS_ACTION:-}" = dry-activate ]; then
                ${preview}
                fi
              ''
            else
              preview;
        };
        warnings = lib.optional (!hasPreSwitchChecks) ''
          services.plasmavmc: this NixOS has no system.preSwitchChecks (nixpkgs 24.11 and later), so a
          switch cannot refuse an invalid desired state before it changes the host: the plan is shown
          by an activation script and an invalid state is refused by the agent's reload instead.
        '';
      }
    ]
  );
}
