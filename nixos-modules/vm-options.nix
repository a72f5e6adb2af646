# One VM under `services.plasmavmc.vms.<name>`: every field of the agent's desired-state schema
# (agent/src/spec.rs). Option names are the JSON keys; defaults are spec.rs's serde defaults, and an
# option without a default is one the schema requires.
{ lib, ... }:
let
  inherit (lib) mkOption mkEnableOption types;
  names = import ./names.nix { inherit lib; };

  diskOptions = {
    options = {
      path = mkOption {
        type = names.absolutePath;
        example = "/var/lib/vms/web.qcow2";
        description = ''
          Image file or block device. A string, not a Nix path: a writable image must not be
          copied into the read-only Nix store.
        '';
      };
      format = mkOption {
        type = types.enum [
          "qcow2"
          "raw"
        ];
        example = "qcow2";
        description = "Image format.";
      };
      readOnly = mkOption {
        type = types.bool;
        default = false;
        description = "Attach the disk read-only.";
      };
      cache = mkOption {
        type = types.enum [
          "none"
          "writeback"
          "writethrough"
          "directsync"
          "unsafe"
        ];
        default = "writeback";
        description = "QEMU cache mode; `writeback` is QEMU's own default.";
      };
      serial = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "web-data";
        description = "Serial number the guest sees: 1 to 20 printable ASCII characters, no ','.";
      };
      sizeMiB = mkOption {
        type = types.nullOr (types.ints.between 1 67108864);
        default = null;
        example = 20480;
        description = ''
          The image's size in MiB. With `create`, the size it is created at. Raising it grows the
          image: live on a running VM (the guest sees the new size at once), before the start
          otherwise. Lowering it below the image's size is refused (it destroys data) and never
          applied. `null`: whatever size the image has. Not for read-only disks (a shared image is
          never resized).
        '';
      };
      create = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              from = mkOption {
                type = types.nullOr (types.either names.absolutePath types.package);
                default = null;
                example = lib.literalExpression ''"''${nixosImage}/nixos.qcow2"'';
                description = ''
                  A base image: copied into `path` (converted to `format`), or with `backing`
                  used read-only under a qcow2 overlay. It must exist when the image is created.
                  A derivation with a `sizeMiB` attribute lets the build refuse a `sizeMiB`
                  below it. `null`: a blank image of `sizeMiB`.
                '';
              };
              backing = mkOption {
                type = types.bool;
                default = false;
                description = ''
                  Create a qcow2 overlay on `from` instead of a copy: instant, and the base is
                  never written (it may be a Nix store path shared by many VMs). Needs
                  `format = "qcow2"`.
                '';
              };
            };
          }
        );
        default = null;
        example = lib.literalExpression ''{ from = "''${nixosImage}/nixos.qcow2"; backing = true; }'';
        description = ''
          How to create the image when `path` does not exist (before the VM starts, or before
          the disk is hotplugged). `{ }` makes a blank image of `sizeMiB`. An existing file is
          never overwritten. `null`: the image must exist.
        '';
      };
      shared = mkOption {
        type = types.bool;
        default = false;
        description = ''
          The image is on storage every host of an HA VM sees under the same path (NFS, Ceph,
          a SAN): a live migration leaves it where it is. A disk that is not shared is copied
          to the target while the VM runs (the target's image is created with the same size
          and format).
        '';
      };
      deleteOnRemove = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Delete the image when this disk is removed from a running VM's declaration. By
          default the image is kept: removing a disk only unplugs it. Images of a VM removed as a
          whole are always kept.
        '';
      };
    };
  };

  nicOptions = {
    options = {
      mac = mkOption {
        type = names.mac;
        example = "52:54:00:12:34:56";
        description = "Unicast MAC address of the guest's NIC; unique across every VM of the host.";
      };
      bridge = mkOption {
        type = types.nullOr names.ifname;
        default = null;
        example = "br0";
        description = ''
          Host bridge to attach the NIC to. The agent creates the tap, attaches it and removes it
          with the NIC. Exactly one of `bridge` and `tap`.
        '';
      };
      tap = mkOption {
        type = types.nullOr names.ifname;
        default = null;
        example = "tap-web0";
        description = ''
          Existing tap interface the operator manages. Exactly one of `bridge` and `tap`.
          Names of the form `pv<12 hex digits>` are reserved for the taps the agent makes.
        '';
      };
    };
  };
in
{
  imports = [ ./vm-first-boot.nix ];

  options = {
    vcpus = mkOption {
      type = types.ints.between 1 255;
      example = 2;
      description = "vCPUs online now. Changes live between 1 and `maxVcpus`.";
    };
    maxVcpus = mkOption {
      type = types.nullOr (types.ints.between 1 255);
      default = null;
      example = 8;
      description = ''
        Ceiling for live vCPU changes, fixed at boot (`-smp maxcpus=`). `null` means `vcpus`:
        no live vCPU changes. A change is pending until the next start.
      '';
    };
    memoryMiB = mkOption {
      type = types.ints.between 16 16777216;
      example = 2048;
      description = ''
        Guest memory in MiB. With `maxMemoryMiB`, the part above the boot memory is a virtio-mem
        device and changes live; without it, a change waits for the next start. With
        `maxMemoryMiB`, both must be multiples of 2 MiB (the virtio-mem block size).
      '';
    };
    maxMemoryMiB = mkOption {
      type = types.nullOr (types.ints.between 16 16777216);
      default = null;
      example = 8192;
      description = ''
        Ceiling for live memory changes, fixed at boot. `null`: memory is fixed for the boot.
        A change is pending until the next start.
      '';
    };
    machine = mkOption {
      type = types.enum [
        "q35"
        "pc"
      ];
      default = "q35";
      description = "QEMU machine type. Pending until the next start when changed.";
    };
    accel = mkOption {
      type = types.enum [
        "kvm"
        "tcg"
      ];
      default = "kvm";
      description = ''
        Accelerator: `kvm` (hardware virtualisation) or `tcg` (software emulation, for hosts
        without usable KVM and for tests). Pending until the next start when changed.
      '';
    };
    kernel = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = lib.literalExpression ''"''${pkgs.linux}/bzImage"'';
      description = "Direct kernel boot: the kernel image. Exactly one of `kernel` and `bootDisk`.";
    };
    initrd = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = lib.literalExpression ''"''${myInitrd}/initrd"'';
      description = "Direct kernel boot: the initramfs (only with `kernel`).";
    };
    cmdline = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "console=ttyS0 panic=-1";
      description = "Direct kernel boot: the kernel command line (only with `kernel`).";
    };
    bootDisk = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "root";
      description = "Boot from this disk (a name in `disks`) instead of a kernel.";
    };
    firmware = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = lib.literalExpression ''"''${pkgs.OVMF.fd}/FV/OVMF.fd"'';
      description = "UEFI firmware image; `null` means SeaBIOS (or direct kernel boot).";
    };
    disks = mkOption {
      type = types.attrsOf (types.submodule diskOptions);
      default = { };
      example = lib.literalExpression ''
        {
          root = { path = "/var/lib/vms/web.qcow2"; format = "qcow2"; };
          data = { path = "/dev/vg0/web-data"; format = "raw"; cache = "none"; };
        }
      '';
      description = ''
        Disks by name. Adding, removing or replacing a disk is applied live (hotplug) to a
        running VM, and so is growing one (`sizeMiB`).
      '';
    };
    nics = mkOption {
      type = types.attrsOf (types.submodule nicOptions);
      default = { };
      example = lib.literalExpression ''
        { eth0 = { mac = "52:54:00:12:34:56"; bridge = "br0"; }; }
      '';
      description = ''
        Network interfaces by name. Adding, removing or replacing a NIC is applied live (hotplug)
        to a running VM.
      '';
    };
    hotplugSlots = mkOption {
      type = types.ints.between 0 32;
      default = 8;
      description = ''
        PCIe root ports reserved at boot for hotplugged disks and NICs (`q35` only; `pc`
        hotplugs onto the root bus). Pending until the next start when changed.
      '';
    };
    autostart = mkOption {
      type = types.bool;
      default = true;
      description = "Start the VM when the agent starts or when the VM is declared.";
    };
    restartPolicy = mkOption {
      type = types.enum [
        "always"
        "on-failure"
        "never"
      ];
      default = "on-failure";
      description = "When the agent restarts the VM after QEMU exits (with backoff).";
    };
    onRestartRequired = mkOption {
      type = types.enum [
        "pending"
        "restart"
      ];
      default = "pending";
      description = ''
        What to do with a change that cannot be applied live: `pending` records it and applies
        it at the VM's next start; `restart` restarts the VM now to apply it.
      '';
    };
    onHostShutdown = mkOption {
      type = types.enum [
        "powerdown"
        "save"
        "evacuate"
      ];
      default = "powerdown";
      description = ''
        What a host shutdown or reboot does to the VM while it runs (`plasmavmc shutdown-host`,
        run before systemd stops the VMs' scopes). `powerdown`: ACPI powerdown, QEMU is quit
        after `services.plasmavmc.stopTimeout` (all VMs in parallel). `save`: a managed save
        (`plasmavmc save`): the VM's state is written to `stateDir` and restored, not booted,
        when the host is back. `evacuate`: an HA VM is moved live to another host (as
        `plasmavmc evacuate` picks it; powered down if no host takes it); a VM declared on this
        host only is saved like `save`. HA VMs are never saved.
      '';
    };
    orgId = mkOption {
      type = names.scopeId;
      default = "default";
      description = "Organisation the VM belongs to (published to ChainFire).";
    };
    projectId = mkOption {
      type = names.scopeId;
      default = "default";
      description = "Project the VM belongs to (published to ChainFire).";
    };
    consoleLog = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Give the VM a serial console: `plasmavmc console <name>` attaches to it, and QEMU logs
        everything the guest prints to `<runDir>/vms/<name>/console.log`. False: no serial
        console at all.
      '';
    };
    ha.enable = mkEnableOption ''
      high availability across hosts: the VM fails over to another host when this one stops
      renewing its ChainFire lease. Needs `services.plasmavmc.chainfire` and shared storage
    '';
    ha.preferredHosts = mkOption {
      type = types.listOf (types.strMatching names.vmNamePattern);
      default = [ ];
      example = [
        "hv-01"
        "hv-02"
      ];
      description = ''
        Host ids (`services.plasmavmc.hostId`) in order of preference. The VM runs on the first
        of them that is live in ChainFire, not cordoned and declares it; when that changes (a
        switch reorders this list, a preferred host comes back) the VM is moved there live,
        never restarted, once that host has been live for
        `services.plasmavmc.migration.placementSettle` seconds. Declare the same list on every
        host. Empty: the VM stays wherever it runs. Needs `ha.enable`.
      '';
    };
    limits = {
      cpuWeight = mkOption {
        type = types.nullOr (types.ints.between 1 10000);
        default = null;
        example = 200;
        description = ''
          The VM's share of host CPU against other VMs when the host is busy (cgroup
          `cpu.weight`; the kernel's default is 100). Changed live.
        '';
      };
      cpuQuotaPercent = mkOption {
        type = types.nullOr (types.ints.between 1 102400);
        default = null;
        example = 150;
        description = ''
          Host CPU time the VM may use, in percent of one CPU (150 = one and a half CPUs),
          busy host or not (cgroup `cpu.max`). Changed live.
        '';
      };
      memoryMaxMiB = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 4608;
        description = ''
          Host memory QEMU may use, guest RAM and QEMU's own overhead together (cgroup
          `memory.max`; beyond it the kernel reclaims, then kills QEMU). Must exceed
          `maxMemoryMiB` (or `memoryMiB`); leave room for QEMU itself. Changed live.
        '';
      };
    };
  };
}
