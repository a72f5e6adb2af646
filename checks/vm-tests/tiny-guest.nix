# The smallest guest that proves a VM runs: nixpkgs' kernel and an initramfs whose /init is a
# static busybox script printing a marker on the serial console. No virtio drivers are needed:
# hotplug is observed from QEMU (query-pci, query-block), which does not wait for the guest.
# With `ticks`, the guest also prints `PLASMAVMC-GUEST-TICK <n>` every second, counting from its
# boot: a guest that moved live goes on counting on its new host, a rebooted one starts over.
{
  pkgs,
  ticks ? false,
}:
let
  busybox = pkgs.pkgsStatic.busybox;
  init = pkgs.writeScript "tiny-guest-init" ''
    #!${busybox}/bin/sh
    export PATH=${busybox}/bin
    mkdir -p /proc /sys /dev
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    echo PLASMAVMC-GUEST-UP
    ${
      if ticks then
        "i=0; while true; do i=$((i + 1)); echo PLASMAVMC-GUEST-TICK $i; sleep 1; done"
      else
        "while true; do sleep 3600; done"
    }
  '';
in
{
  kernel = "${pkgs.linux}/${pkgs.stdenv.hostPlatform.linux-kernel.target}";
  initrd = "${pkgs.makeInitrd {
    contents = [
      {
        object = init;
        symlink = "/init";
      }
    ];
  }}/initrd";
  cmdline = "console=ttyS0 panic=-1";
  marker = "PLASMAVMC-GUEST-UP";
}
