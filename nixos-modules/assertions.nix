# Mistakes the build can see, reported by `nixos-rebuild` before anything reaches the host. Each
# message names the option path, like the agent's own validation names the JSON path.
{ config, lib, ... }:
let
  cfg = config.services.plasmavmc;
  names = import ./names.nix { inherit lib; };
  opt = "services.plasmavmc";
  vmOpt = name: "${opt}.vms.${name}";

  allNics = lib.concatLists (
    lib.mapAttrsToList (
      vmName: vm:
      lib.mapAttrsToList (nicName: nic: nic // { path = "${vmOpt vmName}.nics.${nicName}"; }) vm.nics
    ) cfg.vms
  );

  # Values declared more than once, with where each was declared.
  duplicates =
    key: items:
    lib.filterAttrs (_: paths: builtins.length paths > 1) (
      lib.foldl' (
        acc: item: acc // { ${key item} = (acc.${key item} or [ ]) ++ [ item.path ]; }
      ) { } items
    );

  duplicateAssertions =
    what: dups:
    lib.mapAttrsToList (value: paths: {
      assertion = false;
      message = "${opt}: ${what} ${value} is declared more than once: ${lib.concatStringsSep ", " paths}.";
    }) dups;

  # Bridges this configuration creates; others must be listed in externalBridges.
  networkdBridges = lib.mapAttrsToList (_: netdev: netdev.netdevConfig.Name or null) (
    lib.filterAttrs (_: netdev: (netdev.netdevConfig.Kind or null) == "bridge") (
      config.systemd.network.netdevs or { }
    )
  );
  knownBridges =
    builtins.attrNames (config.networking.bridges or { }) ++ networkdBridges ++ cfg.externalBridges;

  nameAssertions =
    what: path: attrs:
    map (name: {
      assertion = names.isSafeName name;
      message = "${path}.${name}: ${what} name must match ${names.namePattern} (it becomes a path component and a QEMU id).";
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
        assertion = (vm.kernel != null) != (vm.bootDisk != null);
        message =
          if vm.kernel == null then
            "${p}: nothing to boot: set ${p}.kernel (direct kernel boot) or ${p}.bootDisk."
          else
            "${p}: set either ${p}.kernel or ${p}.bootDisk, not both.";
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
        assertion = !vm.ha.enable || cfg.chainfire.endpoints != [ ];
        message = "${p}.ha.enable needs ChainFire: set ${opt}.chainfire.endpoints.";
      }
    ]
    ++ nameAssertions "disk" "${p}.disks" vm.disks
    ++ nameAssertions "NIC" "${p}.nics" vm.nics
    ++ lib.mapAttrsToList (disk: d: {
      assertion = d.serial == null || builtins.stringLength d.serial <= 20;
      message = "${p}.disks.${disk}.serial is longer than 20 bytes (virtio-blk's limit).";
    }) vm.disks
    ++ lib.concatLists (
      lib.mapAttrsToList (
        nic: n:
        let
          np = "${p}.nics.${nic}";
        in
        [
          {
            assertion = (n.bridge == null) != (n.tap == null);
            message =
              if n.bridge == null then
                "${np}: set either bridge (the agent makes a tap) or tap (an existing one)."
              else
                "${np}: set either bridge or tap, not both.";
          }
          {
            assertion = names.isUnicastMac n.mac;
            message = "${np}.mac ${n.mac} is a multicast address; the first octet must be even (e.g. 52:54:00:...).";
          }
          {
            assertion = n.bridge == null || builtins.elem n.bridge knownBridges;
            message = "${np}.bridge \"${toString n.bridge}\" is not a bridge this configuration declares (networking.bridges, systemd.network.netdevs) nor listed in ${opt}.externalBridges.";
          }
        ]
      ) vm.nics
    );
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
    ++ nameAssertions "VM" "${opt}.vms" cfg.vms
    ++ lib.concatLists (lib.mapAttrsToList vmAssertions cfg.vms)
    ++ duplicateAssertions "MAC address" (duplicates (nic: lib.toLower nic.mac) allNics)
    ++ duplicateAssertions "tap" (duplicates (nic: nic.tap) (builtins.filter (nic: nic.tap != null) allNics));
  };
}
