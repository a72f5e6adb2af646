# Mistakes the build can see, reported by `nixos-rebuild` before anything reaches the host. Each
# message names the option path, as the agent's own validation names the JSON path. Checks on a
# single value are option types (./names.nix); these are the ones that relate several values.
{ config, lib, ... }:
let
  cfg = config.services.plasmavmc;
  names = import ./names.nix { inherit lib; };
  opt = "services.plasmavmc";
  vmOpt = name: "${opt}.vms.${name}";

  # Every disk and NIC of every VM, with the option path it was declared at.
  devicesOf =
    kind:
    lib.concatLists (
      lib.mapAttrsToList (
        vmName: vm: lib.mapAttrsToList (id: d: d // { at = "${vmOpt vmName}.${kind}.${id}"; }) vm.${kind}
      ) cfg.vms
    );
  allNics = devicesOf "nics";
  allDisks = devicesOf "disks";

  # { value = [ declarations ]; } for values declared more than once.
  groupsOfMany =
    key: items:
    lib.filterAttrs (_: group: builtins.length group > 1) (
      lib.foldl' (acc: item: acc // { ${key item} = (acc.${key item} or [ ]) ++ [ item ]; }) { } items
    );
  where = group: lib.concatStringsSep ", " (map (item: item.at) group);

  uniqueAcrossVms = what: key: items: lib.mapAttrsToList (value: group: {
    assertion = false;
    message = "${opt}: ${what} ${value} is declared more than once: ${where group}.";
  }) (groupsOfMany key items);

  # A writable image attached twice gets corrupted; read-only images may be shared.
  exclusiveImages = lib.mapAttrsToList (path: group: {
    assertion = builtins.all (disk: disk.readOnly) group;
    message = "${opt}: image ${path} is attached by ${where group}; a writable image can be attached only once.";
  }) (groupsOfMany (disk: disk.path) allDisks);

  # Bridges this configuration creates; others must be listed in externalBridges.
  networkdBridges = lib.mapAttrsToList (_: netdev: netdev.netdevConfig.Name or null) (
    lib.filterAttrs (_: netdev: (netdev.netdevConfig.Kind or null) == "bridge") (
      config.systemd.network.netdevs or { }
    )
  );
  knownBridges =
    builtins.attrNames (config.networking.bridges or { }) ++ networkdBridges ++ cfg.externalBridges;

  namesMatch =
    what: pattern: isValid: path: attrs:
    map (name: {
      assertion = isValid name;
      message = "${path}.${name}: ${what} must match ^${pattern}$ (it becomes part of paths and QEMU ids).";
    }) (builtins.attrNames attrs);

  vmAssertions =
    name: vm:
    let
      p = vmOpt name;
    in
    [
      {
        assertion = vm.maxVcpus == null || vm.vcpus <= vm.maxVcpus;
        message = "${p}.vcpus (${toString vm.vcpus}) is greater than ${p}.maxVcpus (${toString vm.maxVcpus}).";
      }
      {
        assertion = vm.maxMemoryMiB == null || vm.memoryMiB <= vm.maxMemoryMiB;
        message = "${p}.memoryMiB (${toString vm.memoryMiB}) is greater than ${p}.maxMemoryMiB (${toString vm.maxMemoryMiB}).";
      }
      {
        assertion =
          vm.maxMemoryMiB == null || (lib.mod vm.memoryMiB 2 == 0 && lib.mod vm.maxMemoryMiB 2 == 0);
        message = "${p}.memoryMiB and ${p}.maxMemoryMiB must be multiples of 2 MiB (the virtio-mem block size).";
      }
      {
        assertion =
          vm.limits.memoryMaxMiB == null
          || vm.limits.memoryMaxMiB > lib.max vm.memoryMiB (if vm.maxMemoryMiB == null then 0 else vm.maxMemoryMiB);
        message = "${p}.limits.memoryMaxMiB (${toString vm.limits.memoryMaxMiB}) leaves no room for the guest's RAM plus QEMU's own memory: make it larger than ${p}.memoryMiB and ${p}.maxMemoryMiB.";
      }
      {
        assertion = vm.kernel != null || vm.bootDisk != null;
        message = "${p}: nothing to boot: set ${p}.kernel (direct kernel boot) or ${p}.bootDisk.";
      }
      {
        assertion = vm.kernel == null || vm.bootDisk == null;
        message = "${p}: set either ${p}.kernel or ${p}.bootDisk, not both.";
      }
      {
        assertion = vm.bootDisk == null || vm.disks ? ${vm.bootDisk};
        message = "${p}.bootDisk names disk \"${toString vm.bootDisk}\", which is not in ${p}.disks (declared: ${lib.concatStringsSep ", " (builtins.attrNames vm.disks)}).";
      }
      {
        assertion = vm.kernel != null || (vm.initrd == null && vm.cmdline == null);
        message = "${p}: initrd and cmdline are for direct kernel boot; set ${p}.kernel or remove them.";
      }
      {
        # x86 COMMAND_LINE_SIZE (2048) less the final NUL, as the agent checks it.
        assertion = vm.cmdline == null || builtins.stringLength vm.cmdline <= 2047;
        message = "${p}.cmdline is ${toString (builtins.stringLength vm.cmdline)} bytes; the kernel takes at most 2047 (x86 COMMAND_LINE_SIZE, 2048 with the final NUL).";
      }
      {
        assertion = !vm.ha.enable || cfg.chainfire.endpoints != [ ];
        message = "${p}.ha.enable needs ChainFire: set ${opt}.chainfire.endpoints.";
      }
      {
        assertion = !vm.ha.enable || vm.onHostShutdown != "save";
        message = "${p}.onHostShutdown = \"save\" cannot be used with ${p}.ha.enable: another host may start an HA VM while it is saved here, and restoring it later would run an older copy. Use \"powerdown\" (or \"evacuate\", which moves HA VMs live to another host).";
      }
      {
        assertion = vm.ha.preferredHosts == [ ] || vm.ha.enable;
        message = "${p}.ha.preferredHosts needs ${p}.ha.enable: only an HA VM (declared on several hosts) can be placed, by moving it live.";
      }
      {
        assertion = lib.unique vm.ha.preferredHosts == vm.ha.preferredHosts;
        message = "${p}.ha.preferredHosts lists a host more than once: ${lib.concatStringsSep ", " vm.ha.preferredHosts}.";
      }
    ]
    ++ namesMatch "disk id" names.deviceIdPattern names.isDeviceId "${p}.disks" vm.disks
    ++ namesMatch "NIC id" names.deviceIdPattern names.isDeviceId "${p}.nics" vm.nics
    ++ lib.mapAttrsToList (disk: d: {
      assertion = d.serial == null || names.isSerial d.serial;
      message = "${p}.disks.${disk}.serial must be 1 to 20 printable ASCII characters without ','.";
    }) vm.disks
    ++ serialAssertions p vm.disks
    ++ lib.concatLists (lib.mapAttrsToList (nicAssertions "${p}.nics") vm.nics);

  # The guest finds disks by serial (/dev/disk/by-id/virtio-<serial>): one serial, one disk.
  serialAssertions = p: disks: let
    withSerial = lib.filterAttrs (_: d: d.serial != null) disks;
    holders = serial: builtins.attrNames (lib.filterAttrs (_: d: d.serial == serial) withSerial);
    serials = lib.unique (lib.mapAttrsToList (_: d: d.serial) withSerial);
  in map (serial: {
    assertion = builtins.length (holders serial) == 1;
    message = "${p}.disks: serial \"${serial}\" is given to more than one disk (${lib.concatStringsSep ", " (holders serial)}).";
  }) serials;

  nicAssertions = nicsPath: nic: n: let np = "${nicsPath}.${nic}"; in [
    {
      assertion = n.bridge != null || n.tap != null;
      message = "${np}: set bridge (the agent makes a tap) or tap (an existing one).";
    }
    {
      assertion = n.bridge == null || n.tap == null;
      message = "${np}: set either bridge or tap, not both.";
    }
    {
      assertion = names.isUnicastMac n.mac && !names.isZeroMac n.mac;
      message = "${np}.mac ${n.mac} is not a usable unicast address; the first octet must be even and the address not all zero (e.g. 52:54:00:...).";
    }
    {
      assertion = n.bridge == null || builtins.elem n.bridge knownBridges;
      message = "${np}.bridge \"${toString n.bridge}\" is not declared in networking.bridges or systemd.network.netdevs, nor listed in ${opt}.externalBridges.";
    }
    {
      assertion = n.tap == null || !names.isAgentTap n.tap;
      message = "${np}.tap \"${toString n.tap}\": names of the form pv<12 hex digits> are reserved for the taps the agent makes.";
    }
  ];
in
{
  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.chainfire.endpoints == [ ] || cfg.hostId != null;
        message = "${opt}.chainfire.endpoints is set but ${opt}.hostId is not: every host needs its own id in ChainFire.";
      }
      {
        assertion = (cfg.chainfire.certFile == null) == (cfg.chainfire.keyFile == null);
        message = "${opt}.chainfire.certFile and ${opt}.chainfire.keyFile go together: set both or neither.";
      }
      {
        assertion = (cfg.chainfire.user == null) == (cfg.chainfire.passwordFile == null);
        message = "${opt}.chainfire.user and ${opt}.chainfire.passwordFile go together: set both or neither.";
      }
    ]
    ++ namesMatch "VM name" names.vmNamePattern names.isVmName "${opt}.vms" cfg.vms
    ++ lib.concatLists (lib.mapAttrsToList vmAssertions cfg.vms)
    ++ uniqueAcrossVms "MAC address" (nic: lib.toLower nic.mac) allNics
    ++ uniqueAcrossVms "tap" (nic: nic.tap) (builtins.filter (nic: nic.tap != null) allNics)
    ++ exclusiveImages;
  };
}
