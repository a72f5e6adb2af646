# Show the operator what a switch will do to the VMs, in the switch's own output.
#
# The unit's ExecReload applies the change, but its output goes to the journal; this snippet runs
# first and prints `plasmavmc plan` for the new desired state against the running agent. With
# supportsDryActivation, `nixos-rebuild dry-activate` prints the same preview and changes nothing.
# It never fails the activation: no agent yet (first install, agent stopped) only means there is
# nothing to diff against, and a broken config is refused by the reload, loudly.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.plasmavmc;
  plasmavmc = lib.getExe' cfg.package "plasmavmc";
  timeout = lib.getExe' pkgs.coreutils "timeout";
  newDesired = config.environment.etc."plasmavmc/desired.json".source;
  controlSocket = "${cfg.runDir}/control.sock";
in
{
  config = lib.mkIf cfg.enable {
    system.activationScripts.plasmavmc-plan = {
      supportsDryActivation = true;
      text = ''
        if [ -S ${lib.escapeShellArg controlSocket} ]; then
          echo "plasmavmc: plan for the new configuration:"
          ${timeout} 30 ${plasmavmc} plan --config ${newDesired} --run-dir ${lib.escapeShellArg cfg.runDir} \
            || echo "plasmavmc: no plan (exit $?); the reload will report what it applied" >&2
        else
          echo "plasmavmc: agent not running; it applies the configuration when it starts"
          ${timeout} 30 ${plasmavmc} validate ${newDesired} \
            || echo "plasmavmc: the new desired state is invalid (see above); the agent will refuse it" >&2
        fi
      '';
    };
  };
}
