# services.plasmavmc: VMs, disks and NICs declared in NixOS configuration, run by the plasmavmc
# agent, changed live by `nixos-rebuild switch`.
{
  imports = [
    ./options.nix
    ./systemd.nix
    ./first-apply.nix
    ./host-shutdown.nix
    ./activation.nix
    ./assertions.nix
    ./provisioning-assertions.nix
    ./host.nix
    ./migration.nix
    ./qemu-user.nix
    ./metrics.nix
  ];
}
