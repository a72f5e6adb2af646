# A bare-metal hypervisor, ready for
#   nixos-anywhere --flake .#example-hypervisor root@HOST
# Replace the SSH key, the uplink interface and the disk (./disko.nix) with the host's own; see
# docs/provisioning.md.
{ ... }:
{
  imports = [
    ./hardware-configuration.nix
    ./disko.nix
    ./vms.nix
  ];

  system.stateVersion = "25.11";

  # GRUB installed as the removable EFI loader also boots machines whose NVRAM nixos-anywhere
  # cannot write; the BIOS boot partition in ./disko.nix covers legacy boot.
  boot.loader.grub = {
    enable = true;
    efiSupport = true;
    efiInstallAsRemovable = true;
  };
  networking.hostName = "hypervisor";
  networking.useDHCP = false;
  # The uplink is enslaved to br0, which the VMs' NICs join (./vms.nix).
  networking.bridges.br0.interfaces = [ "eno1" ];
  networking.interfaces.br0.useDHCP = true;

  services.openssh.enable = true;
  users.users.root.openssh.authorizedKeys.keys = [
    # Replace with your own key before provisioning.
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlasmavmcExampleKeyReplaceMeBeforeInstalling operator@example"
  ];

  # The VMs' images live on their own filesystem (./disko.nix); the agent only opens them.
  systemd.tmpfiles.rules = [
    "d /var/lib/vms/web 0700 root root - -"
    "d /var/lib/vms/db 0700 root root - -"
  ];
}
