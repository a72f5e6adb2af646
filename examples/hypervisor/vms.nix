# The VMs of the example hypervisor, and the bridge they sit on. Also evaluated by the repository's
# checks and passed through the agent's validator (agent/tests/nix_module.rs).
{
  networking.bridges.br0.interfaces = [ ];

  services.plasmavmc = {
    enable = true;
    vms = {
      web = {
        vcpus = 2;
        maxVcpus = 8;
        memoryMiB = 2048;
        maxMemoryMiB = 8192;
        bootDisk = "root";
        disks.root = {
          path = "/var/lib/vms/web/root.qcow2";
          format = "qcow2";
        };
        nics.eth0 = {
          mac = "52:54:00:12:34:01";
          bridge = "br0";
        };
      };
      db = {
        vcpus = 4;
        memoryMiB = 4096;
        bootDisk = "root";
        restartPolicy = "always";
        onRestartRequired = "restart";
        disks = {
          root = {
            path = "/var/lib/vms/db/root.qcow2";
            format = "qcow2";
          };
          data = {
            path = "/var/lib/vms/db/data.raw";
            format = "raw";
            cache = "none";
            serial = "db-data";
          };
        };
        nics.eth0 = {
          mac = "52:54:00:12:34:02";
          bridge = "br0";
        };
      };
    };
  };
}
