# Disk layout nixos-anywhere creates: GPT with a BIOS boot partition, an ESP, the system, and the
# rest of the disk for VM images on XFS (reflinks make `cp --reflink` image clones instant).
{
  disko.devices.disk.main = {
    type = "disk";
    # The install target: set it to the host's disk (`lsblk` on the target), e.g. /dev/nvme0n1.
    device = "/dev/sda";
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
