# Replaced on install: `nixos-anywhere --generate-hardware-config nixos-generate-config
# ./examples/hypervisor/hardware-configuration.nix` runs nixos-generate-config on the target
# (without filesystems: ./disko.nix owns those) and writes this file before it builds the system,
# so the first install already uses the target's own modules. Commit the generated file.
#
# Until then, a generic list of storage modules that boots most x86 servers.
{ modulesPath, ... }:
{
  imports = [ (modulesPath + "/installer/scan/not-detected.nix") ];
  boot.initrd.availableKernelModules = [
    "ahci"
    "nvme"
    "sd_mod"
    "xhci_pci"
    "virtio_pci"
    "virtio_blk"
    "virtio_scsi"
  ];
  boot.kernelModules = [
    "kvm-intel"
    "kvm-amd"
  ];
  nixpkgs.hostPlatform = "x86_64-linux";
}
