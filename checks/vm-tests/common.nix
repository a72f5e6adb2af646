# What the NixOS VM tests share: the host node running services.plasmavmc, the tiny guest VM they
# declare on it, and for the cluster tests the ChainFire node (one etcd), the two hypervisors
# and the start of their test script.
{ plasmavmcModule }:
rec {
  # A node with the module, 2 cores, `memorySize` MiB and jq for the test script.
  host =
    memorySize:
    { pkgs, ... }:
    {
      imports = [ plasmavmcModule ];
      virtualisation.memorySize = memorySize;
      virtualisation.cores = 2;
      environment.systemPackages = [ pkgs.jq ];
    };

  # One vCPU, 128 MiB, booting tiny-guest.nix (called with `guestArgs`, e.g. `{ ticks = true; }`).
  tinyVm =
    pkgs: guestArgs:
    let
      guest = import ./tiny-guest.nix ({ inherit pkgs; } // guestArgs);
    in
    {
      vcpus = 1;
      memoryMiB = 128;
      accel = "tcg"; # no nested KVM in the test VMs
      inherit (guest) kernel initrd cmdline;
    };

  # ChainFire for the hypervisors: an etcd at http://store:2379.
  store =
    { ... }:
    {
      networking.firewall.allowedTCPPorts = [ 2379 ];
      services.etcd = {
        enable = true;
        listenClientUrls = [ "http://0.0.0.0:2379" ];
        advertiseClientUrls = [ "http://store:2379" ];
      };
    };

  # The hypervisors' lease TTL, in seconds.
  leaseTtl = 5;

  # A host of the cluster: 1536 MiB, the agent publishing to the store as `hostId`.
  hypervisor = hostId: {
    imports = [ (host 1536) ];
    services.plasmavmc = {
      enable = true;
      inherit hostId;
      chainfire = {
        endpoints = [ "http://store:2379" ];
        inherit leaseTtl;
      };
    };
  };

  # The store and two hypervisors, `hypervisor "hv1"` and `hypervisor "hv2"` (the test's own,
  # which imports the one above and declares its VMs).
  cluster = hypervisor: {
    inherit store;
    hv1 = hypervisor "hv1";
    hv2 = hypervisor "hv2";
  };

  # Python for the start of a cluster test's script: `hosts`, `qemu_alive(node)` for the VM `web`,
  # and `start_cluster()`, which returns once the store and both agents are up.
  clusterScript = ''
    hosts = {"hv1": hv1, "hv2": hv2}

    def qemu_alive(node):
        # The pidfile names a live QEMU of this VM (the agent checks the same way).
        return node.execute(
            "pid=$(cat /run/plasmavmc/vms/web/pid) && grep -qa qemu-system /proc/$pid/cmdline"
        )[0] == 0

    def start_cluster():
        start_all()
        store.wait_for_unit("etcd.service")
        for node in hosts.values():
            node.wait_for_unit("plasmavmc.service")
  '';
}
