# What the host kernel must offer the VMs.
{ config, lib, ... }:
let
  cfg = config.services.plasmavmc;
in
{
  config = lib.mkIf cfg.enable {
    # tun: taps; bridge: the agent attaches taps to bridges; vhost_net: in-kernel virtio-net.
    # The agent (root, CAP_NET_ADMIN) creates each tap owned by qemuUser, which may then open it
    # through /dev/net/tun; KVM itself comes from the hardware profile (kvm-intel / kvm-amd).
    boot.kernelModules = [
      "tun"
      "bridge"
      "vhost_net"
    ];
  };
}
