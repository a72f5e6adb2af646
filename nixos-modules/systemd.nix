# The agent's unit and its desired-state file.
#
# A config change reloads the agent: the desired-state file is a reload trigger and ExecReload
# applies it (`plasmavmc reload --wait` exits non-zero when any of it failed, which makes the switch
# fail loudly). Any other change to the unit (a new agent package, new flags) restarts the agent,
# which is safe: QEMU lives outside the agent's cgroup and the restarted agent adopts every VM
# without touching it, then applies the (possibly new) desired state; whether that first apply
# failed, plasmavmc-first-apply.service (./first-apply.nix) tells the switch.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.plasmavmc;
  # Read through /run/current-system, not /etc: a switch's activation swaps that symlink (on /run,
  # which the agent's mount namespace shares) before it reloads the agent, while with
  # system.etc.overlay a unit with its own mount namespace can keep seeing the old /etc
  # (nixpkgs PR 556436) and would re-read a stale file. /etc/plasmavmc/desired.json stays, for people.
  configPath = "/run/current-system/etc/plasmavmc/desired.json";
  desiredFile = config.environment.etc."plasmavmc/desired.json".source;
  cli = import ./cli.nix { inherit lib cfg; };

  chainfire = cfg.chainfire.endpoints != [ ];
  chainfireArgs = lib.optionals chainfire (
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
    "--stop-timeout"
    (toString cfg.stopTimeout)
  ]
  ++ qemuUserArgs
  ++ chainfireArgs
  ++ cfg.extraAgentArgs;

  # A reload stops and starts VMs, each on its own: a stop (stopTimeout, then 10 s for `quit`),
  # a wait for a VM busy with something else (up to 120 s), a launch (up to 30 s), and margin.
  # Systemd's default (90 s) would fail a switch whose reload is still working.
  reloadTimeout = cfg.stopTimeout + 10 + 120 + 30 + 20;
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
      # With ChainFire the agent needs the network up to reach the store, and HA VMs' shared
      # storage mounted before it starts them.
      after = [ "network.target" ] ++ lib.optionals chainfire [
        "network-online.target"
        "remote-fs.target"
      ];
      wants = lib.optional chainfire "network-online.target";
      # qemu-system-*, qemu-img; ip for taps and bridges. systemd-run (each QEMU in a scope of its
      # own) is on every unit's PATH already.
      path = [
        cfg.qemuPackage
        pkgs.iproute2
      ];

      reloadTriggers = [ desiredFile ];
      # `systemctl restart` rather than stop-then-start, so the agent is away for one restart only.
      stopIfChanged = false;

      serviceConfig = {
        Type = "notify";
        # systemd's own quoting: a `%` or `$` in a path stays literal.
        ExecStart = utils.escapeSystemdExecArgs ([ cli.plasmavmc ] ++ agentArgs);
        ExecReload = utils.escapeSystemdExecArgs (
          cli.toAgent [
            "reload"
            "--wait"
          ]
        );
        # Bounds ExecReload too (systemd has no separate reload timeout).
        TimeoutStartSec = reloadTimeout;
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
