# `services.plasmavmc`: the host-level options. Per-VM options are in ./vm-options.nix.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkOption
    mkEnableOption
    mkPackageOption
    types
    ;
  names = import ./names.nix { inherit lib; };
  cfg = config.services.plasmavmc;
in
{
  options.services.plasmavmc = {
    enable = mkEnableOption "the plasmavmc agent, which runs the VMs declared in `services.plasmavmc.vms`";

    package = mkPackageOption pkgs "plasmavmc" { };

    qemuPackage = mkPackageOption pkgs "QEMU" { default = [ "qemu_kvm" ]; };

    qemuUser = mkOption {
      type = types.nullOr types.str;
      default = "plasmavmc-qemu";
      example = null;
      description = ''
        The unprivileged user every QEMU runs as. The default user is created (a system user in
        `qemuGroup` and `kvm`); another must exist. The agent gives it the VMs' writable disk
        images and block devices and their taps; read-only disks, kernels and initrds must be
        readable by it. `null` runs QEMU as root: a guest that breaks out of QEMU then owns the
        host (see docs/security.md).
      '';
    };

    qemuGroup = mkOption {
      type = types.str;
      default = "plasmavmc-qemu";
      description = ''
        The group QEMU runs as; it may enter the run directory. The default group is created.
      '';
    };

    hostId = mkOption {
      type = types.nullOr (types.strMatching names.vmNamePattern);
      default = null;
      example = "hv-01";
      description = ''
        This host's identity in ChainFire (keys, leases, HA locks). Required with
        `chainfire.endpoints`; must be unique in the cluster.
      '';
    };

    stateDir = mkOption {
      type = names.absolutePath;
      default = "/var/lib/plasmavmc";
      description = "What must survive a host reboot.";
    };

    runDir = mkOption {
      type = names.absolutePath;
      default = "/run/plasmavmc";
      description = ''
        Sockets, pidfiles and the spec each VM was started with; lives as long as the QEMU
        processes. Not a systemd `RuntimeDirectory`: that is removed when the agent stops, and
        the running VMs need it to be adopted by the next agent.
      '';
    };

    stopTimeout = mkOption {
      type = types.ints.between 1 3600;
      default = 60;
      description = ''
        Seconds a guest gets to shut down after an ACPI powerdown (a stop, a restart, a host
        shutdown) before QEMU is told to quit. Also sizes the unit's `TimeoutStartSec`, which
        bounds a reload (`nixos-rebuild switch`) that stops and starts VMs.
      '';
    };

    shutdownTimeout = mkOption {
      type = types.ints.between 1 86400;
      default = 300;
      description = ''
        Upper bound, in seconds, for powering the VMs down when the host shuts down or reboots
        (each VM also waits at most `stopTimeout`; all VMs are powered down in parallel). Saves
        (`onHostShutdown = "save"`) run to completion within a further 120 s; after that systemd
        stops whatever still runs.
      '';
    };

    externalBridges = mkOption {
      type = types.listOf names.ifname;
      default = [ ];
      example = [ "ovsbr0" ];
      description = ''
        Bridges created outside this NixOS configuration (Open vSwitch, scripts). A NIC's
        `bridge` must be declared in `networking.bridges`, as a `systemd.network.netdevs` bridge,
        or listed here, so a misspelt bridge fails the build instead of the VM.
      '';
    };

    chainfire = {
      endpoints = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "https://10.0.0.1:2379"
          "https://10.0.0.2:2379"
        ];
        description = ''
          ChainFire (etcd v3 API) endpoints. Empty: standalone mode, nothing is published.
        '';
      };
      leaseTtl = mkOption {
        type = types.ints.between 3 3600;
        default = 10;
        description = ''
          Seconds within which a host that stops (crash, power loss, partition, its agent killed)
          is seen failed by the others and its HA VMs are free to start elsewhere. Each HA VM is
          fenced on its own host before that: by the agent, or by the VM's fence guard when the
          agent is gone. An agent restart (an upgrade, a crash) keeps the HA VMs running when the
          new agent is up within `leaseTtl - 1 - max(1, (leaseTtl - 1) / 3)` seconds of the last
          keep-alive: 6 s at the default, so systemd's restart after 2 s is in time.
        '';
      };
      caFile = mkOption {
        type = types.nullOr names.absolutePath;
        default = null;
        example = "/etc/plasmavmc/chainfire-ca.pem";
        description = "CA certificate that signed the ChainFire servers' certificates.";
      };
      certFile = mkOption {
        type = types.nullOr names.absolutePath;
        default = null;
        description = "Client certificate for mutual TLS (with `keyFile`).";
      };
      keyFile = mkOption {
        type = types.nullOr names.absolutePath;
        default = null;
        example = "/run/keys/plasmavmc-chainfire.key";
        description = ''
          Client key for mutual TLS (with `certFile`). A string, so the secret is not copied
          into the world-readable Nix store.
        '';
      };
      user = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "ChainFire user name (with `passwordFile`).";
      };
      passwordFile = mkOption {
        type = types.nullOr names.absolutePath;
        default = null;
        example = "/run/keys/plasmavmc-chainfire-password";
        description = "File holding the ChainFire password (not copied into the Nix store).";
      };
    };

    vms = mkOption {
      type = types.attrsOf (types.submodule ./vm-options.nix);
      default = { };
      example = lib.literalExpression ''
        {
          web = {
            vcpus = 2; maxVcpus = 8;
            memoryMiB = 2048; maxMemoryMiB = 8192;
            bootDisk = "root";
            disks.root = { path = "/var/lib/vms/web.qcow2"; format = "qcow2"; };
            nics.eth0 = { mac = "52:54:00:12:34:56"; bridge = "br0"; };
          };
        }
      '';
      description = ''
        The VMs this host runs, by name. `nixos-rebuild switch` applies changes to running VMs
        live where QEMU can (disks, NICs, vCPUs, memory) and marks the rest pending.
      '';
    };

    extraAgentArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      internal = true;
      description = "Arguments other files of this module add to the agent's command line.";
    };

    desiredState = mkOption {
      type = types.attrsOf types.anything;
      readOnly = true;
      internal = true;
      description = "The desired-state document written to `/etc/plasmavmc/desired.json`.";
    };
  };

  config.services.plasmavmc.desiredState = import ./desired-state.nix { inherit lib; } cfg.vms;
}
