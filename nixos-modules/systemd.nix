# The agent's unit and its desired-state file.
#
# A config change reloads the agent: the desired-state file is a reload trigger and ExecReload
# applies it (`plasmavmc reload --wait` exits non-zero when any of it failed, which makes the switch
# fail loudly). Any other change to the unit (a new agent package, new flags) restarts the agent,
# which is safe: QEMU lives outside the agent's cgroup and the restarted agent adopts every VM
# without touching it, then applies the (possibly new) desired state.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.plasmavmc;
  configPath = "/etc/plasmavmc/desired.json";
  desiredFile = config.environment.etc."plasmavmc/desired.json".source;
  plasmavmc = lib.getExe' cfg.package "plasmavmc";

  chainfireArgs = lib.optionals (cfg.chainfire.endpoints != [ ]) (
    [
      "--chainfire"
      (lib.concatStringsSep "," cfg.chainfire.endpoints)
      "--host-id"
      cfg.hostId
      "--lease-ttl"
      (toString cfg.chainfire.leaseTtl)
    ]
    ++ lib.concatLists (
      lib.mapAttrsToList (flag: value: lib.optionals (value != null) [ flag value ]) {
        "--chainfire-ca" = cfg.chainfire.caFile;
        "--chainfire-cert" = cfg.chainfire.certFile;
        "--chainfire-key" = cfg.chainfire.keyFile;
        "--chainfire-user" = cfg.chainfire.user;
        "--chainfire-password-file" = cfg.chainfire.passwordFile;
      }
    )
  );

  qemuUserArgs = lib.optionals (cfg.qemuUser != null) [
    "--qemu-user"
    cfg.qemuUser
    "--qemu-group"
    cfg.qemuGroup
  ];

  agentArgs = [
    "agent"
    "--config"
    configPath
    "--state-dir"
    cfg.stateDir
    "--run-dir"
    cfg.runDir
  ]
  ++ qemuUserArgs
  ++ chainfireArgs;
in
{
  config = lib.mkIf cfg.enable {
    environment.etc."plasmavmc/desired.json".text = builtins.toJSON cfg.desiredState;

    environment.systemPackages = [ cfg.package ];

    # tmpfiles rather than StateDirectory/RuntimeDirectory: systemd removes a RuntimeDirectory
    # when the agent stops, and the sockets and pidfiles in it belong to the VMs, which go on.
    # With an unprivileged QEMU its group may enter the run dir (to its VM directories), not list it.
    systemd.tmpfiles.rules = [
      "d ${cfg.stateDir} 0700 root root - -"
      (
        if cfg.qemuUser == null then
          "d ${cfg.runDir} 0700 root root - -"
        else
          "d ${cfg.runDir} 0710 root ${cfg.qemuGroup} - -"
      )
    ];

    systemd.services.plasmavmc = {
      description = "plasmavmc agent: runs the VMs declared in services.plasmavmc.vms";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      # qemu-system-*, qemu-img; ip for taps and bridges; systemd-run to put each QEMU in its own
      # scope, outside this unit's cgroup.
      path = [
        cfg.qemuPackage
        pkgs.iproute2
        config.systemd.package
      ];

      reloadTriggers = [ desiredFile ];
      # `systemctl restart` rather than stop-then-start, so the agent is away for one restart only.
      stopIfChanged = false;

      serviceConfig = {
        Type = "notify";
        ExecStart = lib.escapeShellArgs ([ plasmavmc ] ++ agentArgs);
        ExecReload = lib.escapeShellArgs [
          plasmavmc
          "reload"
          "--wait"
          "--run-dir"
          cfg.runDir
        ];
        Restart = "always";
        RestartSec = "2s";
        # QEMU runs in its own transient scope; should one ever be left in this cgroup, stopping
        # the agent must still not kill it.
        KillMode = "process";
      }
      // import ./hardening.nix;
    };
  };
}
