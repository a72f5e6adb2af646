# A switch that restarts the agent (a new agent package, new qemu or iproute2, new flags) fails
# when the restarted agent's first apply does, and the agent and every VM go on running.
#
# The agent tells systemd READY once its first apply has ended (or after 60 s), with the outcome
# as its status text; whether it failed, this unit asks: `plasmavmc first-apply` waits for the
# outcome and exits non-zero naming each VM that failed and why. When it does, the unit fails and
# switch-to-configuration ends with "warning: the following units failed:
# plasmavmc-first-apply.service" and exit 4 (it lists every failed unit after its jobs, and starts
# multi-user.target last, whose start waits for this unit: After= comes with WantedBy=).
#
# Why a unit of its own rather than `ExecStartPost=` on the agent: a failing ExecStartPost fails
# the agent's own start, so systemd kills the agent that just adopted every VM, and Restart=always
# starts another one, whose identical first apply has to go unchecked (skipped on NRestarts > 0)
# or it loops. A separate unit fails alone: the agent is never touched, nothing restarts, and the
# failure carries its own name in the switch's output and in `systemctl --failed`.
#
# Started after every start of the agent (at boot, by a switch, by `systemctl restart plasmavmc`,
# after an automatic restart): wanted by plasmavmc.service and ordered after it, restarted with it
# (PartOf=), stopped with it (BindsTo=). It checks each agent start once: switch-to-configuration
# resets failed units and starts multi-user.target again on every switch, which would re-run a
# failed check against the same agent and fail a later switch (one that fixed the VM by a reload,
# say) with that old outcome. The ExecCondition skips it when the running agent's invocation was
# checked already.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.plasmavmc;
  plasmavmc = lib.getExe' cfg.package "plasmavmc";
  systemctl = "${config.systemd.package}/bin/systemctl";
  # As long as a reload may take: the first apply does what a reload does.
  agentTimeout = config.systemd.services.plasmavmc.serviceConfig.TimeoutStartSec;
  checkedOnce = pkgs.writeShellScript "plasmavmc-first-apply-once" ''
    # Exit 1 (skip) when the running agent's start was checked already; else remember it.
    agent=$(${systemctl} show --property=InvocationID --value plasmavmc.service)
    checked=
    if [ -e "$RUNTIME_DIRECTORY/checked-agent" ]; then
      read -r checked < "$RUNTIME_DIRECTORY/checked-agent"
    fi
    if [ -n "$agent" ] && [ "$agent" = "$checked" ]; then
      echo "the first apply of this agent (invocation $agent) was checked already; plasmavmc first-apply shows it"
      exit 1
    fi
    echo "$agent" > "$RUNTIME_DIRECTORY/checked-agent"
  '';
in
{
  config = lib.mkIf cfg.enable {
    systemd.services.plasmavmc-first-apply = {
      description = "plasmavmc: check the agent's first apply after it started";
      wantedBy = [
        "multi-user.target"
        "plasmavmc.service"
      ];
      after = [ "plasmavmc.service" ];
      bindsTo = [ "plasmavmc.service" ];
      partOf = [ "plasmavmc.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        # Kept while the unit is stopped or failed: it remembers which agent start was checked.
        RuntimeDirectory = "plasmavmc-first-apply";
        RuntimeDirectoryPreserve = true;
        ExecCondition = checkedOnce;
        ExecStart = utils.escapeSystemdExecArgs [
          plasmavmc
          "first-apply"
          "--timeout"
          "${toString agentTimeout}s"
          "--run-dir"
          cfg.runDir
        ];
        # Past the command's own wait, so it reports a first apply still running itself.
        TimeoutStartSec = agentTimeout + 30;
      };
    };
  };
}
