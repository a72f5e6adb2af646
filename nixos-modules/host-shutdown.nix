# What the host's shutdown or reboot does to the VMs: `onHostShutdown`, before systemd kills them.
#
# Every QEMU runs in a transient scope (`plasmavmc-vm-NAME.scope`), which systemd stops at shutdown
# with SIGTERM: the guest would lose power mid-flight. This unit is started at boot and does
# nothing until it is stopped: at shutdown its ExecStop runs `plasmavmc shutdown-host`, which
# powers every VM down (ACPI, in parallel) or saves it, as its `onHostShutdown` says. Ordering:
# - After=plasmavmc.service: stopped in reverse, so the agent still runs during ExecStop.
# - each scope is started with After=plasmavmc-host-shutdown.service (the agent passes it to
#   systemd-run), so systemd stops the scopes only once ExecStop is done.
# It tells a host shutdown from everything else that could stop it (`systemctl stop`, a switch
# that drops it): `--only-when-system-stops` acts only while `systemctl is-system-running` says
# `stopping`, i.e. shutdown.target is being started. `systemctl stop/restart plasmavmc` never
# involves this unit, so they leave the VMs running. A switch never restarts it
# (restartIfChanged = false): a restart would be a stop.
{
  config,
  lib,
  utils,
  ...
}:
let
  cfg = config.services.plasmavmc;
  cli = import ./cli.nix { inherit lib cfg; };
  # Saves are not cut short at shutdownTimeout; this much more is theirs before systemd moves on.
  saveAllowance = 120;
in
{
  config = lib.mkIf cfg.enable {
    systemd.services.plasmavmc-host-shutdown = {
      description = "plasmavmc: power down or save the VMs before the host shuts down";
      wantedBy = [ "multi-user.target" ];
      wants = [ "plasmavmc.service" ];
      after = [ "plasmavmc.service" ];
      restartIfChanged = false;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = utils.escapeSystemdExecArgs [
          cli.plasmavmc
          "--version"
        ];
        ExecStop = utils.escapeSystemdExecArgs (
          cli.toAgent [
            "shutdown-host"
            "--only-when-system-stops"
            "--timeout"
            (toString cfg.shutdownTimeout)
          ]
        );
        TimeoutStopSec = cfg.shutdownTimeout + saveAllowance;
      };
    };
  };
}
