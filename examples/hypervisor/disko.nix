# Disk layout nixos-anywhere creates: GPT with a BIOS boot partition, an ESP, the system, and the
# rest of the disk for VM images on XFS (reflinks make `cp --reflink` image clones instant).
{
  disko.devices.disk.main = {
    type = "disk";
    # The install target: the host's disk by a stable name (`ls -l /dev/disk/by-id/` on the
    # target; /dev/sda or /dev/nvme0n1 can change between boots and kernels).
    device = "/dev/disk/by-id/nvme-EXAMPLE_SERIAL_REPLACE_ME";
    content = {
      type = "gpt";
      partitions = {
        bios = {
          size = "1M";
          type = "EF02";
        };
        esp = {
          size = "512M";
          type = "EF00";
          content = {
            type = "filesystem";
            format = "vfat";
            mountpoint = "/boot";
            mountOptions = [ "umask=0077" ];
          };
        };
        root = {
          size = "64G";
          content = {
            type = "filesystem";
            format = "ext4";
            mountpoint = "/";
          };
        };
        vms = {
          size = "100%";
          content = {
            type = "filesystem";
            format = "xfs";
            mountpoint = "/var/lib/vms";
          };
        };
      };
    };
  };
}
