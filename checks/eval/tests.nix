# Evaluation tests of services.plasmavmc: options and defaults, the exact generated JSON, the
# unit, the activation snippet, and every assertion firing with its message.
#
# Each test is `{ expr; expected; }` (pass when equal) or `{ throws; }` (pass when evaluating it
# fails, as a type error does). ./run.nix runs them.
{ lib }:
let
  host = import ./eval-host.nix { inherit lib; };
  store = "/nix/store/00000000000000000000000000000000";

  # The smallest VM the schema accepts, on a declared bridge.
  minimalVm = {
    vcpus = 1;
    memoryMiB = 512;
    bootDisk = "root";
    disks.root = {
      path = "/var/lib/vms/a.qcow2";
      format = "qcow2";
    };
  };
  withVms = vms: {
    networking.bridges.br0.interfaces = [ ];
    services.plasmavmc = {
      enable = true;
      inherit vms;
    };
  };
  hostWith = modules: host modules;
  minimal = hostWith [ (withVms { a = minimalVm; }) ];
  everyField = hostWith [ ./fixtures/every-field.nix ];
  example = hostWith [ ../../examples/hypervisor/vms.nix ];
  unit = minimal.config.systemd.services.plasmavmc;

  # Failed assertion messages for one VM that differs from minimalVm by `change`.
  failuresOfVm = change: (hostWith [ (withVms { a = lib.recursiveUpdate minimalVm change; }) ]).failedAssertions;
  failuresOf = modules: (hostWith modules).failedAssertions;
  nic = mac: extra: { inherit mac; bridge = "br0"; } // extra;
  vmA = "services.plasmavmc.vms.a";
  # An Exec line as systemd gets it: each (space-free) argument quoted.
  execLine = line: lib.concatMapStringsSep " " (arg: ''"${arg}"'') (lib.splitString " " line);
in
{
  # ---- desired state -------------------------------------------------------------------------

  minimalJsonHasDefaultsAndNoNulls = {
    expr = minimal.desired;
    expected = {
      version = 1;
      vms.a = {
        vcpus = 1;
        memoryMiB = 512;
        machine = "q35";
        accel = "kvm";
        bootDisk = "root";
        disks.root = {
          path = "/var/lib/vms/a.qcow2";
          format = "qcow2";
          readOnly = false;
          cache = "writeback";
          deleteOnRemove = false;
        };
        credentials = { };
        nics = { };
        hotplugSlots = 8;
        autostart = true;
        restartPolicy = "on-failure";
        onRestartRequired = "pending";
        onHostShutdown = "powerdown";
        orgId = "default";
        projectId = "default";
        consoleLog = true;
        ha.enable = false;
      };
    };
  };

  everyFieldExactJson = {
    expr = everyField.config.environment.etc."plasmavmc/desired.json".text;
    expected = builtins.toJSON {
      version = 1;
      vms.tiny = {
        accel = "tcg";
        autostart = false;
        cmdline = "console=ttyS0 panic=-1";
        consoleLog = false;
        cloudInit = {
          metaData.file = "/run/secrets/tiny-meta-data";
          networkConfig.text = "version: 2\n";
          userData.text = "#cloud-config\n";
        };
        credentials = {
          "passwd.hashed-password.root".file = "/run/agenix/tiny-root-hash";
          "system.hostname".text = "tiny";
        };
        disks.root = {
          cache = "writeback";
          create = {
            backing = true;
            from = "/var/lib/images/base.qcow2";
          };
          deleteOnRemove = true;
          format = "qcow2";
          path = "/var/lib/vms/tiny-root.qcow2";
          readOnly = false;
          sizeMiB = 4096;
        };
        disks.scratch = {
          cache = "directsync";
          deleteOnRemove = false;
          format = "raw";
          path = "/dev/vg0/tiny-scratch";
          readOnly = true;
          serial = "scratch-1";
        };
        firmware = "/usr/share/OVMF/OVMF.fd";
        ha = {
          enable = true;
          preferredHosts = [
            "hv-02"
            "hv-01"
          ];
        };
        hotplugSlots = 4;
        initrd = "/boot/initrd.img";
        kernel = "/boot/vmlinuz";
        limits = {
          cpuQuotaPercent = 150;
          cpuWeight = 50;
          memoryMaxMiB = 1536;
        };
        machine = "pc";
        maxMemoryMiB = 1024;
        maxVcpus = 4;
        memoryMiB = 256;
        nics = {
          lan = {
            bridge = "br-lan";
            mac = "52:54:00:AB:CD:01";
          };
          mgmt = {
            mac = "52:54:00:ab:cd:03";
            tap = "tap-mgmt";
          };
          ovs = {
            bridge = "ovsbr0";
            mac = "52:54:00:ab:cd:02";
          };
        };
        onHostShutdown = "evacuate";
        onRestartRequired = "restart";
        orgId = "acme";
        projectId = "edge";
        restartPolicy = "never";
        vcpus = 2;
      };
    };
  };

  # The bytes the agent reads, written out by hand.
  minimalJsonLiteral = {
    expr = minimal.config.environment.etc."plasmavmc/desired.json".text;
    expected = lib.concatStrings [
      ''{"version":1,"vms":{"a":{"accel":"kvm","autostart":true,"bootDisk":"root","consoleLog":true,''
      ''"credentials":{},''
      ''"disks":{"root":{"cache":"writeback","deleteOnRemove":false,"format":"qcow2","path":"/var/lib/vms/a.qcow2","readOnly":false}},''
      ''"ha":{"enable":false},"hotplugSlots":8,"machine":"q35","memoryMiB":512,"nics":{},''
      ''"onHostShutdown":"powerdown","onRestartRequired":"pending","orgId":"default","projectId":"default","restartPolicy":"on-failure",''
      ''"vcpus":1}}}''
    ];
  };

  noVmsIsAnEmptyDocument = {
    expr = (hostWith [ { services.plasmavmc.enable = true; } ]).desired;
    expected = {
      version = 1;
      vms = { };
    };
  };

  disabledSetsNothing = {
    expr =
      let
        c = (hostWith [ { services.plasmavmc.vms.a = minimalVm; } ]).config;
      in
      [
        (c.systemd.services ? plasmavmc)
        (c.environment.etc ? "plasmavmc/desired.json")
        (c.system.activationScripts ? plasmavmc-plan)
        (c.system.preSwitchChecks ? plasmavmc)
        c.boot.kernelModules
        c.assertions
      ];
    expected = [
      false
      false
      false
      false
      [ ]
      [ ]
    ];
  };

  validExamplesHaveNoFailedAssertions = {
    expr = [
      minimal.failedAssertions
      everyField.failedAssertions
      example.failedAssertions
    ];
    expected = [
      [ ]
      [ ]
      [ ]
    ];
  };

  hostDefaults = {
    expr = with minimal.config.services.plasmavmc; [
      stateDir
      runDir
      chainfire.endpoints
      chainfire.leaseTtl
      hostId
      stopTimeout
      shutdownTimeout
      "${package}"
      "${qemuPackage}"
    ];
    expected = [
      "/var/lib/plasmavmc"
      "/run/plasmavmc"
      [ ]
      10
      null
      60
      300
      "${store}-plasmavmc"
      "${store}-qemu"
    ];
  };

  # ---- the unit ------------------------------------------------------------------------------

  agentCommandLine = {
    expr = unit.serviceConfig.ExecStart;
    expected = execLine (
      lib.concatStringsSep " " [
        "${store}-plasmavmc/bin/plasmavmc agent --config /run/current-system/etc/plasmavmc/desired.json"
        "--state-dir /var/lib/plasmavmc --run-dir /run/plasmavmc --stop-timeout 60"
        "--qemu-user plasmavmc-qemu --qemu-group plasmavmc-qemu"
      ]
    );
  };

  agentCommandLineWithChainfire = {
    expr = everyField.config.systemd.services.plasmavmc.serviceConfig.ExecStart;
    expected = execLine (
      lib.concatStringsSep " " [
        "${store}-plasmavmc/bin/plasmavmc agent --config /run/current-system/etc/plasmavmc/desired.json"
        "--state-dir /srv/plasmavmc/state --run-dir /run/pvmc --stop-timeout 30"
        "--qemu-user vmrunner --qemu-group vmrunners"
        "--chainfire https://10.0.0.1:2379,https://10.0.0.2:2379 --host-id hv-01 --lease-ttl 15"
        "--chainfire-ca /etc/plasmavmc/ca.pem --chainfire-cert /etc/plasmavmc/client.pem"
        "--chainfire-key /run/keys/plasmavmc.key --chainfire-password-file /run/keys/plasmavmc.password"
        "--chainfire-user hv-01"
        "--migration-ports 50000-50015 --placement-settle 60"
        "--migration-address 10.0.0.11 --migration-listen 192.168.1.11"
        "--migration-tls-dir /run/keys/plasmavmc-migration"
      ]
    );
  };

  # ---- moving VMs between hosts --------------------------------------------------------------

  migrationDefaultsNeedOnlyChainfire = {
    expr =
      let
        c = (hostWith [
          (withVms { a = lib.recursiveUpdate minimalVm { ha.enable = true; }; })
          {
            services.plasmavmc.hostId = "hv";
            services.plasmavmc.chainfire.endpoints = [ "http://127.0.0.1:2379" ];
          }
        ]).config;
      in
      [
        (lib.hasInfix (execLine "--migration-ports 49152-49215 --placement-settle 30") c.systemd.services.plasmavmc.serviceConfig.ExecStart)
        (lib.hasInfix "--migration-address" c.systemd.services.plasmavmc.serviceConfig.ExecStart)
        c.networking.firewall.allowedTCPPortRanges
        c.warnings
      ];
    expected = [
      true
      false
      [ ]
      [ "services.plasmavmc.migration.address is not set: HA VMs (a) cannot be migrated to this host from another (the agent listens on 127.0.0.1)." ]
    ];
  };

  migrationFlagsOnlyWithChainfire = {
    expr = lib.hasInfix "--migration" unit.serviceConfig.ExecStart;
    expected = false;
  };

  migrationPortsOpenedInTheFirewallWhenAsked = {
    expr = everyField.config.networking.firewall.allowedTCPPortRanges;
    expected = [
      {
        from = 50000;
        to = 50015;
      }
    ];
  };

  preferredHostsAreWrittenOnlyWhenSet = {
    expr = [
      everyField.desired.vms.tiny.ha
      minimal.desired.vms.a.ha
    ];
    expected = [
      {
        enable = true;
        preferredHosts = [
          "hv-02"
          "hv-01"
        ];
      }
      { enable = false; }
    ];
  };

  assertMigrationPortRangeInOrder = {
    expr = failuresOf [
      (withVms { a = minimalVm; })
      {
        services.plasmavmc.migration.ports = {
          from = 50010;
          to = 50000;
        };
      }
    ];
    expected = [ "services.plasmavmc.migration.ports.from (50010) is greater than services.plasmavmc.migration.ports.to (50000)." ];
  };

  assertPreferredHostsNeedHaAndNoRepeats = {
    expr = failuresOfVm {
      ha.preferredHosts = [
        "hv-01"
        "hv-01"
      ];
    };
    expected = [
      "${vmA}.ha.preferredHosts needs ${vmA}.ha.enable: only an HA VM (declared on several hosts) can be placed, by moving it live."
      "${vmA}.ha.preferredHosts lists a host more than once: hv-01, hv-01."
    ];
  };

  reloadCommandLine = {
    expr = everyField.config.systemd.services.plasmavmc.serviceConfig.ExecReload;
    expected = execLine "${store}-plasmavmc/bin/plasmavmc reload --wait --run-dir /run/pvmc";
  };

  # systemd expands `%` specifiers and `$` variables in Exec lines: paths keep them literally.
  execLinesKeepPercentAndDollar = {
    expr =
      (hostWith [
        (withVms { a = minimalVm; })
        { services.plasmavmc.stateDir = "/srv/50%/$HOME"; }
      ]).config.systemd.services.plasmavmc.serviceConfig.ExecStart;
    expected = lib.concatStringsSep " " [
      ''"${store}-plasmavmc/bin/plasmavmc" "agent" "--config" "/run/current-system/etc/plasmavmc/desired.json"''
      ''"--state-dir" "/srv/50%%/$$HOME" "--run-dir" "/run/plasmavmc" "--stop-timeout" "60"''
      ''"--qemu-user" "plasmavmc-qemu" "--qemu-group" "plasmavmc-qemu"''
    ];
  };

  switchReloadsForConfigRestartsForNewAgent = {
    expr = {
      inherit (unit) reloadIfChanged restartIfChanged stopIfChanged;
      reloadTriggers = unit.reloadTriggers == [ minimal.config.environment.etc."plasmavmc/desired.json".source ];
      triggerIsTheFile = lib.hasSuffix "-desired.json" (toString (builtins.head unit.reloadTriggers));
    };
    expected = {
      reloadIfChanged = false;
      restartIfChanged = true;
      stopIfChanged = false;
      reloadTriggers = true;
      triggerIsTheFile = true;
    };
  };

  agentRestartLeavesVmsRunning = {
    expr = {
      inherit (unit.serviceConfig)
        Type
        KillMode
        Restart
        ;
      wantedBy = unit.wantedBy;
    };
    expected = {
      Type = "notify";
      KillMode = "process";
      Restart = "always";
      wantedBy = [ "multi-user.target" ];
    };
  };

  # A reload that stops (stopTimeout) and starts VMs must not hit systemd's default 90 s.
  reloadTimeoutFollowsStopTimeout = {
    expr = [
      unit.serviceConfig.TimeoutStartSec
      everyField.config.systemd.services.plasmavmc.serviceConfig.TimeoutStartSec
    ];
    expected = [
      240
      210
    ];
  };

  # Stopped before the agent (After=), started at boot, never restarted by a switch; its
  # ExecStop acts only when the host really shuts down.
  hostShutdownUnit = {
    expr =
      let
        u = everyField.config.systemd.services.plasmavmc-host-shutdown;
      in
      {
        inherit (u) after wantedBy restartIfChanged;
        inherit (u.serviceConfig)
          Type
          RemainAfterExit
          ExecStop
          TimeoutStopSec
          ;
      };
    expected = {
      after = [ "plasmavmc.service" ];
      wantedBy = [ "multi-user.target" ];
      restartIfChanged = false;
      Type = "oneshot";
      RemainAfterExit = true;
      ExecStop = execLine "${store}-plasmavmc/bin/plasmavmc shutdown-host --only-when-system-stops --timeout 120 --run-dir /run/pvmc";
      TimeoutStopSec = 240;
    };
  };

  # Started after every agent start (wanted by the agent, restarted and stopped with it) and by
  # multi-user.target, whose start a switch waits for; it waits for the first apply as long as a
  # reload may take, systemd a little longer.
  firstApplyUnit = {
    expr =
      let
        u = everyField.config.systemd.services.plasmavmc-first-apply;
      in
      {
        inherit (u)
          wantedBy
          after
          bindsTo
          partOf
          ;
        inherit (u.serviceConfig)
          Type
          RemainAfterExit
          RuntimeDirectory
          RuntimeDirectoryPreserve
          ExecStart
          TimeoutStartSec
          ;
      };
    expected = {
      wantedBy = [
        "multi-user.target"
        "plasmavmc.service"
      ];
      after = [ "plasmavmc.service" ];
      bindsTo = [ "plasmavmc.service" ];
      partOf = [ "plasmavmc.service" ];
      Type = "oneshot";
      RemainAfterExit = true;
      RuntimeDirectory = "plasmavmc-first-apply";
      RuntimeDirectoryPreserve = true;
      ExecStart = execLine "${store}-plasmavmc/bin/plasmavmc first-apply --timeout 210s --run-dir /run/pvmc";
      TimeoutStartSec = 240;
    };
  };

  # Once per agent start: a later switch (which resets failed units and starts multi-user.target
  # again) skips it for the same agent instead of failing on that agent's old outcome.
  firstApplyIsCheckedOncePerAgentInvocation = {
    expr =
      let
        script = minimal.config.systemd.services.plasmavmc-first-apply.serviceConfig.ExecCondition.text;
      in
      map (line: lib.hasInfix line script) [
        "${store}-systemd/bin/systemctl show --property=InvocationID --value plasmavmc.service"
        ''[ "$agent" = "$checked" ]''
        "exit 1"
      ];
    expected = [
      true
      true
      true
    ];
  };

  hostShutdownDefaultsToPowerdownWithin300s = {
    expr = [
      minimal.config.services.plasmavmc.vms.a.onHostShutdown
      minimal.config.systemd.services.plasmavmc-host-shutdown.serviceConfig.TimeoutStopSec
    ];
    expected = [
      "powerdown"
      420
    ];
  };

  onHostShutdownIsAnEnum = {
    throws = (hostWith [ (withVms { a = minimalVm // { onHostShutdown = "hibernate"; }; }) ]).desired;
  };

  shutdownTimeoutMustBePositive = {
    throws = (hostWith [ (withVms { a = minimalVm; }) { services.plasmavmc.shutdownTimeout = 0; } ]).config.systemd.services.plasmavmc-host-shutdown.serviceConfig.TimeoutStopSec;
  };

  # systemd (systemd-run) is on every unit's PATH already.
  unitPathHasQemuAndIp = {
    expr = map toString unit.path;
    expected = [
      "${store}-qemu"
      "${store}-iproute2"
    ];
  };

  withChainfireStartsAfterNetworkOnlineAndRemoteFs = {
    expr = [
      unit.after
      unit.wants
      everyField.config.systemd.services.plasmavmc.after
      everyField.config.systemd.services.plasmavmc.wants
    ];
    expected = [
      [ "network.target" ]
      [ ]
      [
        "network.target"
        "network-online.target"
        "remote-fs.target"
      ]
      [ "network-online.target" ]
    ];
  };

  hardeningKeepsWhatQemuNeeds = {
    expr = {
      jitAllowed = unit.serviceConfig ? MemoryDenyWriteExecute;
      devicesVisible = unit.serviceConfig ? PrivateDevices;
      hostNetwork = unit.serviceConfig ? PrivateNetwork;
      tmpOutlivesAgent = unit.serviceConfig ? PrivateTmp;
      inherit (unit.serviceConfig) NoNewPrivileges ProtectSystem;
      canMakeTaps = builtins.elem "CAP_NET_ADMIN" unit.serviceConfig.CapabilityBoundingSet;
    };
    expected = {
      jitAllowed = false;
      devicesVisible = false;
      hostNetwork = false;
      tmpOutlivesAgent = false;
      NoNewPrivileges = true;
      ProtectSystem = "full";
      canMakeTaps = true;
    };
  };

  runDirSurvivesTheAgent = {
    expr = {
      rules = everyField.config.systemd.tmpfiles.rules;
      runtimeDirectory = unit.serviceConfig ? RuntimeDirectory;
    };
    expected = {
      rules = [
        "d /srv/plasmavmc/state 0700 root root - -"
        "d /run/pvmc 0710 root vmrunners - -"
      ];
      runtimeDirectory = false;
    };
  };

  # ---- the QEMU user -------------------------------------------------------------------------

  defaultQemuUserIsCreatedInKvm = {
    expr = {
      user = minimal.config.users.users.plasmavmc-qemu;
      groups = builtins.attrNames minimal.config.users.groups;
    };
    expected = {
      user = {
        isSystemUser = true;
        group = "plasmavmc-qemu";
        extraGroups = [ "kvm" ];
        description = "plasmavmc's QEMU processes";
      };
      groups = [ "plasmavmc-qemu" ];
    };
  };

  ownQemuUserIsUsedNotCreated = {
    expr = builtins.attrNames everyField.config.users.users;
    expected = [ "vmrunner" ];
  };

  qemuAsRootWhenNull =
    let
      asRoot = hostWith [
        (withVms { a = minimalVm; })
        { services.plasmavmc.qemuUser = null; }
      ];
    in
    {
      expr = {
        args = lib.hasInfix "--qemu-user" asRoot.config.systemd.services.plasmavmc.serviceConfig.ExecStart;
        users = asRoot.config.users.users;
        runDir = builtins.elemAt asRoot.config.systemd.tmpfiles.rules 1;
      };
      expected = {
        args = false;
        users = { };
        runDir = "d /run/plasmavmc 0700 root root - -";
      };
    };

  # ---- metrics (nixos-modules/metrics.nix) ---------------------------------------------------

  metricsOffByDefault = {
    expr = {
      flag = lib.hasInfix "--metrics-listen" unit.serviceConfig.ExecStart;
      firewall = minimal.config.networking.firewall.allowedTCPPorts;
    };
    expected = {
      flag = false;
      firewall = [ ];
    };
  };

  metricsListenAndOpenFirewall =
    let
      metrics = hostWith [
        (withVms { a = minimalVm; })
        {
          services.plasmavmc.metrics = {
            enable = true;
            openFirewall = true;
          };
        }
      ];
    in
    {
      expr = {
        flag = lib.hasSuffix ''"--metrics-listen" "0.0.0.0:9850"'' metrics.config.systemd.services.plasmavmc.serviceConfig.ExecStart;
        firewall = metrics.config.networking.firewall.allowedTCPPorts;
      };
      expected = {
        flag = true;
        firewall = [ 9850 ];
      };
    };

  metricsIpv6AddressInBracketsFirewallClosed =
    let
      metrics = hostWith [
        (withVms { a = minimalVm; })
        {
          services.plasmavmc.metrics = {
            enable = true;
            listenAddress = "::1";
            port = 9100;
          };
        }
      ];
    in
    {
      expr = {
        flag = lib.hasSuffix ''"--metrics-listen" "[::1]:9100"'' metrics.config.systemd.services.plasmavmc.serviceConfig.ExecStart;
        firewall = metrics.config.networking.firewall.allowedTCPPorts;
      };
      expected = {
        flag = true;
        firewall = [ ];
      };
    };

  typeRejectsMetricsPortOutOfRange.throws =
    (hostWith [
      (withVms { a = minimalVm; })
      {
        services.plasmavmc.metrics = {
          enable = true;
          port = 70000;
        };
      }
    ]).config.systemd.services.plasmavmc.serviceConfig.ExecStart;

  kernelModulesForTapsBridgesVhost = {
    expr = minimal.config.boot.kernelModules;
    expected = [
      "tun"
      "bridge"
      "vhost_net"
    ];
  };

  cliInstalled = {
    expr = map toString minimal.config.environment.systemPackages;
    expected = [ "${store}-plasmavmc" ];
  };

  # ---- the plan during a switch --------------------------------------------------------------

  # The switch validates and previews before anything changes, and refuses on failure.
  preSwitchCheckRefusesAndPreviews =
    let
      plain = builtins.unsafeDiscardStringContext;
      check = plain minimal.config.system.preSwitchChecks.plasmavmc;
      newFile = plain (toString minimal.config.environment.etc."plasmavmc/desired.json".source);
    in
    {
      expr = {
        validatesFirst = lib.hasPrefix "if ! ${store}-coreutils/bin/timeout 30 ${store}-plasmavmc/bin/plasmavmc validate ${newFile}; then" check;
        plansTheNewFile = lib.hasInfix "if ! ${store}-coreutils/bin/timeout 30 ${store}-plasmavmc/bin/plasmavmc plan --config ${newFile} --run-dir /run/plasmavmc; then" check;
        refusals = builtins.length (lib.splitString "refusing the switch" check) - 1;
        exits = builtins.length (lib.splitString "exit 1" check) - 1;
        planOnlyWithAnAgent = lib.hasInfix "if [ -S /run/plasmavmc/control.sock ]; then" check;
        noWarning = minimal.config.warnings;
      };
      expected = {
        validatesFirst = true;
        plansTheNewFile = true;
        refusals = 2;
        exits = 2;
        planOnlyWithAnAgent = true;
        noWarning = [ ];
      };
    };

  # dry-activate keeps the preview; a real switch leaves it to the pre-switch check.
  dryActivateKeepsThePreview =
    let
      plain = builtins.unsafeDiscardStringContext;
      script = minimal.config.system.activationScripts.plasmavmc-plan;
      text = plain script.text;
      newFile = plain (toString minimal.config.environment.etc."plasmavmc/desired.json".source);
    in
    {
      expr = {
        inherit (script) supportsDryActivation;
        onlyOnDryActivate = lib.hasPrefix ''if [ "''${NIXOS_ACTION:-}" = dry-activate ]; then'' text;
        plansTheNewFile = lib.hasInfix "plasmavmc plan --config ${newFile} --run-dir /run/plasmavmc" text;
        # Each command is guarded by `|| echo`: the snippet cannot fail the activation.
        guardedCommands = builtins.length (lib.splitString "|| echo" text) - 1;
      };
      expected = {
        supportsDryActivation = true;
        onlyOnDryActivate = true;
        plansTheNewFile = true;
        guardedCommands = 2;
      };
    };

  # A NixOS without system.preSwitchChecks: the preview on every activation, and a warning.
  withoutPreSwitchChecksFallsBackWithAWarning =
    let
      old = (import ./eval-host.nix { inherit lib; preSwitchChecks = false; }) [ (withVms { a = minimalVm; }) ];
      text = builtins.unsafeDiscardStringContext old.config.system.activationScripts.plasmavmc-plan.text;
    in
    {
      expr = {
        previewsOnEverySwitch = lib.hasPrefix "if [ -S /run/plasmavmc/control.sock ]; then" text;
        guardedCommands = builtins.length (lib.splitString "|| echo" text) - 1;
        warned = map (w: lib.hasInfix "has no system.preSwitchChecks" w) old.config.warnings;
      };
      expected = {
        previewsOnEverySwitch = true;
        guardedCommands = 2;
        warned = [ true ];
      };
    };

  # ---- assertions ----------------------------------------------------------------------------

  assertVcpusAboveMax = {
    expr = failuresOfVm {
      vcpus = 6;
      maxVcpus = 4;
    };
    expected = [ "${vmA}.vcpus (6) is greater than ${vmA}.maxVcpus (4)." ];
  };

  assertMemoryAboveMax = {
    expr = failuresOfVm {
      memoryMiB = 4096;
      maxMemoryMiB = 2048;
    };
    expected = [ "${vmA}.memoryMiB (4096) is greater than ${vmA}.maxMemoryMiB (2048)." ];
  };

  assertVirtioMemBlockSize = {
    expr = failuresOfVm {
      memoryMiB = 513;
      maxMemoryMiB = 2048;
    };
    expected = [ "${vmA}.memoryMiB and ${vmA}.maxMemoryMiB must be multiples of 2 MiB (the virtio-mem block size)." ];
  };

  oddMemoryWithoutMaxIsFine = {
    expr = failuresOfVm { memoryMiB = 513; };
    expected = [ ];
  };

  assertNothingToBoot = {
    expr = failuresOfVm { bootDisk = null; };
    expected = [ "${vmA}: nothing to boot: set ${vmA}.kernel (direct kernel boot) or ${vmA}.bootDisk." ];
  };

  assertKernelAndBootDisk = {
    expr = failuresOfVm { kernel = "/boot/vmlinuz"; };
    expected = [ "${vmA}: set either ${vmA}.kernel or ${vmA}.bootDisk, not both." ];
  };

  assertBootDiskMissing = {
    expr = failuresOfVm { bootDisk = "system"; };
    expected = [ ''${vmA}.bootDisk names disk "system", which is not in ${vmA}.disks (declared: root).'' ];
  };

  assertInitrdWithoutKernel = {
    expr = failuresOfVm { cmdline = "console=ttyS0"; };
    expected = [ "${vmA}: initrd and cmdline are for direct kernel boot; set ${vmA}.kernel or remove them." ];
  };

  assertNicBothBridgeAndTap = {
    expr = failuresOfVm { nics.eth0 = nic "52:54:00:00:00:01" { tap = "tap0"; }; };
    expected = [ "${vmA}.nics.eth0: set either bridge or tap, not both." ];
  };

  assertNicNeitherBridgeNorTap = {
    expr = failuresOfVm { nics.eth0.mac = "52:54:00:00:00:01"; };
    expected = [ "${vmA}.nics.eth0: set bridge (the agent makes a tap) or tap (an existing one)." ];
  };

  assertMulticastMac = {
    expr = failuresOfVm { nics.eth0 = nic "53:54:00:00:00:01" { }; };
    expected = [ "${vmA}.nics.eth0.mac 53:54:00:00:00:01 is not a usable unicast address; the first octet must be even and the address not all zero (e.g. 52:54:00:...)." ];
  };

  assertZeroMac = {
    expr = builtins.length (failuresOfVm { nics.eth0 = nic "00:00:00:00:00:00" { }; });
    expected = 1;
  };

  assertDuplicateMacAcrossVms = {
    expr = failuresOf [
      (withVms {
        a = minimalVm // { nics.eth0 = nic "52:54:00:00:00:01" { }; };
        b = minimalVm // {
          disks.root = minimalVm.disks.root // { path = "/var/lib/vms/b.qcow2"; };
          nics.eth0 = nic "52:54:00:00:00:0A" { };
          nics.eth1 = nic "52:54:00:00:00:0a" { };
        };
      })
    ];
    expected = [ "services.plasmavmc: MAC address 52:54:00:00:00:0a is declared more than once: services.plasmavmc.vms.b.nics.eth0, services.plasmavmc.vms.b.nics.eth1." ];
  };

  assertDuplicateMacBetweenTwoVms = {
    expr = failuresOf [
      (withVms {
        a = minimalVm // { nics.eth0 = nic "52:54:00:00:00:01" { }; };
        b = minimalVm // {
          disks.root = minimalVm.disks.root // { path = "/var/lib/vms/b.qcow2"; };
          nics.eth0 = nic "52:54:00:00:00:01" { };
        };
      })
    ];
    expected = [ "services.plasmavmc: MAC address 52:54:00:00:00:01 is declared more than once: services.plasmavmc.vms.a.nics.eth0, services.plasmavmc.vms.b.nics.eth0." ];
  };

  assertDuplicateTap = {
    expr = failuresOf [
      (withVms {
        a = minimalVm // { nics.eth0 = { mac = "52:54:00:00:00:01"; tap = "tap0"; }; };
        b = minimalVm // {
          disks.root = minimalVm.disks.root // { path = "/var/lib/vms/b.qcow2"; };
          nics.eth0 = { mac = "52:54:00:00:00:02"; tap = "tap0"; };
        };
      })
    ];
    expected = [ "services.plasmavmc: tap tap0 is declared more than once: services.plasmavmc.vms.a.nics.eth0, services.plasmavmc.vms.b.nics.eth0." ];
  };

  assertReservedTapName = {
    expr = failuresOfVm { nics.eth0 = { mac = "52:54:00:00:00:01"; tap = "pv0123456789ab"; }; };
    expected = [ ''${vmA}.nics.eth0.tap "pv0123456789ab": names of the form pv<12 hex digits> are reserved for the taps the agent makes.'' ];
  };

  assertUnknownBridge = {
    expr = failuresOfVm { nics.eth0 = nic "52:54:00:00:00:01" { bridge = "br1"; }; };
    expected = [ ''${vmA}.nics.eth0.bridge "br1" is not declared in networking.bridges or systemd.network.netdevs, nor listed in services.plasmavmc.externalBridges.'' ];
  };

  bridgeKnownFromNetworkdOrExternalList = {
    expr = failuresOf [
      (withVms {
        a = minimalVm // {
          nics.eth0 = nic "52:54:00:00:00:01" { bridge = "br-nd"; };
          nics.eth1 = nic "52:54:00:00:00:02" { bridge = "ovs0"; };
        };
      })
      {
        systemd.network.netdevs.br.netdevConfig = {
          Kind = "bridge";
          Name = "br-nd";
        };
        services.plasmavmc.externalBridges = [ "ovs0" ];
      }
    ];
    expected = [ ];
  };

  assertWritableImageAttachedTwice = {
    expr = failuresOf [
      (withVms {
        a = minimalVm;
        b = minimalVm;
      })
    ];
    expected = [ "services.plasmavmc: image /var/lib/vms/a.qcow2 is attached by services.plasmavmc.vms.a.disks.root, services.plasmavmc.vms.b.disks.root; a writable image can be attached only once." ];
  };

  readOnlyImageMayBeShared =
    let
      iso = {
        path = "/srv/install.iso";
        format = "raw";
        readOnly = true;
      };
    in
    {
    expr = failuresOf [
      (withVms {
        a = lib.recursiveUpdate minimalVm { disks.iso = iso; };
        b = lib.recursiveUpdate minimalVm {
          disks.root.path = "/var/lib/vms/b.qcow2";
          disks.iso = iso;
        };
      })
    ];
    expected = [ ];
  };

  assertSerialTooLong = {
    expr = failuresOfVm { disks.root.serial = "123456789012345678901"; };
    expected = [ "${vmA}.disks.root.serial must be 1 to 20 printable ASCII characters without ','." ];
  };

  assertSerialsUniqueWithinAVm = {
    expr = failuresOfVm {
      disks.root.serial = "same";
      disks.data = { path = "/var/lib/vms/a-data.qcow2"; format = "qcow2"; serial = "same"; };
    };
    expected = [ "${vmA}.disks: serial \"same\" is given to more than one disk (data, root)." ];
  };

  assertCmdlineFitsTheKernel = {
    expr = failuresOfVm {
      bootDisk = null;
      kernel = "/boot/bzImage";
      cmdline = lib.concatStrings (lib.genList (_: "x") 2048);
    };
    expected = [ "${vmA}.cmdline is 2048 bytes; the kernel takes at most 2047 (x86 COMMAND_LINE_SIZE, 2048 with the final NUL)." ];
  };

  assertVmName = {
    expr = failuresOf [ (withVms { Web_1 = minimalVm; }) ];
    expected = [ "services.plasmavmc.vms.Web_1: VM name must match ^[a-z][a-z0-9-]{0,31}$ (it becomes part of paths and QEMU ids)." ];
  };

  assertDeviceIds = {
    expr = failuresOf [
      (withVms {
        a = builtins.removeAttrs minimalVm [ "disks" ] // {
          bootDisk = "Root";
          disks.Root = minimalVm.disks.root;
          nics.a-nic-name-longer-than-20 = nic "52:54:00:00:00:01" { };
        };
      })
    ];
    expected = [
      "${vmA}.disks.Root: disk id must match ^[a-z][a-z0-9-]{0,19}$ (it becomes part of paths and QEMU ids)."
      "${vmA}.nics.a-nic-name-longer-than-20: NIC id must match ^[a-z][a-z0-9-]{0,19}$ (it becomes part of paths and QEMU ids)."
    ];
  };

  assertChainfireWithoutHostId = {
    expr = failuresOf [
      (withVms { a = minimalVm; })
      { services.plasmavmc.chainfire.endpoints = [ "http://127.0.0.1:2379" ]; }
    ];
    expected = [ "services.plasmavmc.chainfire.endpoints is set but services.plasmavmc.hostId is not: every host needs its own id in ChainFire." ];
  };

  assertCertWithoutKey = {
    expr = failuresOf [
      (withVms { a = minimalVm; })
      { services.plasmavmc.chainfire.certFile = "/etc/plasmavmc/client.pem"; }
    ];
    expected = [ "services.plasmavmc.chainfire.certFile and services.plasmavmc.chainfire.keyFile go together: set both or neither." ];
  };

  assertUserWithoutPassword = {
    expr = failuresOf [
      (withVms { a = minimalVm; })
      { services.plasmavmc.chainfire.user = "hv"; }
    ];
    expected = [ "services.plasmavmc.chainfire.user and services.plasmavmc.chainfire.passwordFile go together: set both or neither." ];
  };

  assertHaWithoutChainfire = {
    expr = failuresOfVm { ha.enable = true; };
    expected = [ "${vmA}.ha.enable needs ChainFire: set services.plasmavmc.chainfire.endpoints." ];
  };

  assertQemuUserRoot = {
    expr = failuresOf [
      (withVms { a = minimalVm; })
      { services.plasmavmc.qemuUser = "root"; }
    ];
    expected = [
      "services.plasmavmc.qemuUser = \"root\" is not an unprivileged user; set it to null to run QEMU as root (not recommended)."
    ];
  };

  assertUndeclaredQemuUserAndGroup = {
    expr = failuresOf [
      (withVms { a = minimalVm; })
      {
        services.plasmavmc.qemuUser = "ghost";
        services.plasmavmc.qemuGroup = "ghosts";
      }
    ];
    expected = [
      "services.plasmavmc.qemuUser: user ghost is not declared in users.users (only plasmavmc-qemu is created by this module)."
      "services.plasmavmc.qemuGroup: group ghosts is not declared in users.groups (only plasmavmc-qemu is created by this module)."
    ];
  };

  assertMemoryMaxLeavesRoomForTheGuest = {
    expr = failuresOfVm {
      maxMemoryMiB = 1024;
      limits.memoryMaxMiB = 1024;
    };
    expected = [ "${vmA}.limits.memoryMaxMiB (1024) leaves no room for the guest's RAM plus QEMU's own memory: make it larger than ${vmA}.memoryMiB and ${vmA}.maxMemoryMiB." ];
  };

  limitsAreWrittenOnlyWhenSet = {
    expr = (hostWith [ (withVms { a = minimalVm // { limits.cpuWeight = 300; }; }) ]).desired.vms.a.limits;
    expected = {
      cpuWeight = 300;
    };
  };

  assertHaVmIsNeverSaved = {
    expr = failuresOf [
      (withVms { a = lib.recursiveUpdate minimalVm { ha.enable = true; onHostShutdown = "save"; }; })
      {
        services.plasmavmc.hostId = "hv";
        services.plasmavmc.chainfire.endpoints = [ "http://127.0.0.1:2379" ];
      }
    ];
    expected = [ ''${vmA}.onHostShutdown = "save" cannot be used with ${vmA}.ha.enable: another host may start an HA VM while it is saved here, and restoring it later would run an older copy. Use "powerdown" (or "evacuate", which moves HA VMs live to another host).'' ];
  };

  # ---- option types reject bad values at their definition -------------------------------------

  typeRejectsZeroVcpus.throws = (hostWith [ (withVms { a = minimalVm // { vcpus = 0; }; }) ]).desired;
  typeRejectsTooManyVcpus.throws = (hostWith [ (withVms { a = minimalVm // { maxVcpus = 256; }; }) ]).desired;
  typeRejectsTinyMemory.throws = (hostWith [ (withVms { a = minimalVm // { memoryMiB = 8; }; }) ]).desired;
  typeRejectsUnknownMachine.throws = (hostWith [ (withVms { a = minimalVm // { machine = "virt"; }; }) ]).desired;
  typeRejectsUnknownCache.throws = (hostWith [ (withVms { a = lib.recursiveUpdate minimalVm { disks.root.cache = "fast"; }; }) ]).desired;
  typeRejectsRelativeDiskPath.throws = (hostWith [ (withVms { a = lib.recursiveUpdate minimalVm { disks.root.path = "a.qcow2"; }; }) ]).desired;
  typeRejectsMalformedMac.throws = (hostWith [ (withVms { a = minimalVm // { nics.eth0 = nic "52:54:00:00:01" { }; }; }) ]).desired;
  typeRejectsLongBridgeName.throws = (hostWith [ (withVms { a = minimalVm // { nics.eth0 = nic "52:54:00:00:00:01" { bridge = "a-very-long-bridge"; }; }; }) ]).desired;
  typeRejectsTooManyHotplugSlots.throws = (hostWith [ (withVms { a = minimalVm // { hotplugSlots = 33; }; }) ]).desired;
  typeRejectsSlashInOrgId.throws = (hostWith [ (withVms { a = minimalVm // { orgId = "a/b"; }; }) ]).desired;
  typeRequiresVcpus.throws = (hostWith [ (withVms { a = builtins.removeAttrs minimalVm [ "vcpus" ]; }) ]).desired;
  typeRequiresDiskFormat.throws = (hostWith [ (withVms { a = minimalVm // { disks.root.path = "/a.qcow2"; }; }) ]).desired;
  typeRejectsShortLeaseTtl.throws = (hostWith [ (withVms { a = minimalVm; }) { services.plasmavmc.chainfire.leaseTtl = 2; } ]).config.services.plasmavmc.chainfire.leaseTtl;
  typeRejectsBadPreferredHost.throws = (hostWith [ (withVms { a = minimalVm // { ha.preferredHosts = [ "HV 1" ]; }; }) ]).desired;
  typeRejectsRelativeMigrationTlsDir.throws = (hostWith [ (withVms { a = minimalVm; }) { services.plasmavmc.migration.tlsDir = "keys"; } ]).config.services.plasmavmc.migration.tlsDir;
  typeRejectsZeroCpuWeight.throws = (hostWith [ (withVms { a = minimalVm // { limits.cpuWeight = 0; }; }) ]).desired;
  typeRejectsHugeCpuWeight.throws = (hostWith [ (withVms { a = minimalVm // { limits.cpuWeight = 10001; }; }) ]).desired;
  typeRejectsZeroCpuQuota.throws = (hostWith [ (withVms { a = minimalVm // { limits.cpuQuotaPercent = 0; }; }) ]).desired;
  typeRejectsUnknownOption.throws = (hostWith [ (withVms { a = minimalVm // { cpus = 2; }; }) ]).desired;

  # ---- disk creation, sizes, credentials, cloud-init ------------------------------------------

  diskCreationJson = {
    expr =
      (hostWith [
        (withVms {
          a = lib.recursiveUpdate minimalVm {
            disks.root = {
              sizeMiB = 2048;
              create.from = {
                outPath = "${store}-debian.qcow2";
                sizeMiB = 2048;
              };
              create.backing = true;
            };
            disks.data = {
              path = "/var/lib/vms/a-data.raw";
              format = "raw";
              sizeMiB = 10240;
              create = { };
            };
          };
        })
      ]).desired.vms.a.disks;
    expected = {
      root = {
        path = "/var/lib/vms/a.qcow2";
        format = "qcow2";
        readOnly = false;
        cache = "writeback";
        deleteOnRemove = false;
        sizeMiB = 2048;
        create = {
          from = "${store}-debian.qcow2";
          backing = true;
        };
      };
      data = {
        path = "/var/lib/vms/a-data.raw";
        format = "raw";
        readOnly = false;
        cache = "writeback";
        deleteOnRemove = false;
        sizeMiB = 10240;
        create.backing = false;
      };
    };
  };

  credentialsAndSeedWriteOnlyTheirSource = {
    expr =
      let
        a = (hostWith [
          (withVms {
            a = minimalVm // {
              credentials = {
                "passwd.hashed-password.root".file = "/run/agenix/root-hash";
                "system.hostname".text = "a";
              };
              cloudInit.userData.file = "/run/secrets/a-user-data";
            };
          })
        ]).desired.vms.a;
      in
      { inherit (a) credentials cloudInit; };
    expected = {
      credentials = {
        "passwd.hashed-password.root".file = "/run/agenix/root-hash";
        "system.hostname".text = "a";
      };
      cloudInit.userData.file = "/run/secrets/a-user-data";
    };
  };

  assertBlankImageNeedsSize = {
    expr = failuresOfVm { disks.root.create = { }; };
    expected = [ "${vmA}.disks.root: a blank image (create without from) needs ${vmA}.disks.root.sizeMiB." ];
  };

  assertOverlayNeedsBase = {
    expr = failuresOfVm {
      disks.root.sizeMiB = 10;
      disks.root.create.backing = true;
    };
    expected = [ "${vmA}.disks.root.create.backing: an overlay needs the base image it sits on; set ${vmA}.disks.root.create.from." ];
  };

  assertOverlayIsQcow2 = {
    expr = failuresOfVm {
      disks.root.format = "raw";
      disks.root.create = {
        from = "/var/lib/images/base.raw";
        backing = true;
      };
    };
    expected = [ "${vmA}.disks.root.create.backing: an overlay is a qcow2 image; set ${vmA}.disks.root.format = \"qcow2\"." ];
  };

  assertNoShrinkBelowKnownBaseSize = {
    expr = failuresOfVm {
      disks.root.sizeMiB = 1024;
      disks.root.create.from = {
        outPath = "${store}-base.qcow2";
        sizeMiB = 2048;
      };
    };
    expected = [ "${vmA}.disks.root.sizeMiB (1024) is below the 2048 MiB of its base image ${vmA}.disks.root.create.from: shrinking destroys data." ];
  };

  assertReadOnlyImagesAreNeverDeleted = {
    expr = failuresOfVm {
      disks.root.readOnly = true;
      disks.root.deleteOnRemove = true;
    };
    expected = [ "${vmA}.disks.root.deleteOnRemove: a read-only image may be shared by other disks; it is never deleted." ];
  };

  assertReadOnlyImagesAreNeverResized = {
    expr = failuresOfVm {
      disks.root.readOnly = true;
      disks.root.sizeMiB = 1024;
    };
    expected = [ "${vmA}.disks.root.sizeMiB: a read-only image may be shared by other disks; it is never resized." ];
  };

  assertCredentialHasOneSource = {
    expr = failuresOfVm {
      credentials.pw = {
        text = "x";
        file = "/run/pw";
      };
      credentials.none = { };
    };
    expected = [
      "${vmA}.credentials.\"none\": set exactly one of text (not secret: it lands in the Nix store) and file (read at VM start)."
      "${vmA}.credentials.\"pw\": set exactly one of text (not secret: it lands in the Nix store) and file (read at VM start)."
    ];
  };

  assertCredentialNameFitsFwCfg = {
    expr = failuresOfVm { credentials."a-name-that-is-far-too-long-for-fw-cfg".text = "x"; };
    expected = [ "${vmA}.credentials.\"a-name-that-is-far-too-long-for-fw-cfg\": credential names are 1 to 28 of A-Z a-z 0-9 _ . - (not starting with '.'): fw_cfg names are at most 55 bytes." ];
  };

  assertSecretFileOutsideTheStore = {
    expr = failuresOfVm { cloudInit.userData.file = "${store}-user-data"; };
    expected = [ "${vmA}.cloudInit.userData.file ${store}-user-data is in the Nix store, which every local user can read: give secrets as a path outside it (agenix, sops-nix), or use text for what is not secret." ];
  };

  typeRejectsSecretAsNixPath.throws = (hostWith [ (withVms { a = minimalVm // { credentials.pw.file = ./tests.nix; }; }) ]).desired;
  typeRejectsZeroDiskSize.throws = (hostWith [ (withVms { a = lib.recursiveUpdate minimalVm { disks.root.sizeMiB = 0; }; }) ]).desired;
  typeRejectsRelativeBaseImage.throws = (hostWith [ (withVms { a = lib.recursiveUpdate minimalVm { disks.root.create.from = "base.qcow2"; }; }) ]).desired;
  typeRejectsUnknownCloudInitKey.throws = (hostWith [ (withVms { a = minimalVm // { cloudInit.vendorData.text = ""; }; }) ]).desired;
}
