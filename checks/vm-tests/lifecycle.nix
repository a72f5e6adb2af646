# A NixOS host running services.plasmavmc, driven the way an operator drives it: a declared VM
# boots; `switch-to-configuration` to a specialisation that adds a disk and a NIC hot-plugs them
# into the same QEMU process; restarting the agent leaves that QEMU running; a specialisation
# without the VM stops it.
{ plasmavmcModule }:
{ lib, ... }:
{
  name = "plasmavmc-lifecycle";

  nodes.host =
    { config, pkgs, ... }:
    let
      guest = import ./tiny-guest.nix { inherit pkgs; };
    in
    {
      imports = [ plasmavmcModule ];
      virtualisation.memorySize = 2048;
      virtualisation.cores = 2;

      networking.bridges.br0.interfaces = [ ];
      environment.systemPackages = [
        config.services.plasmavmc.qemuPackage
        pkgs.jq
      ];

      services.plasmavmc = {
        enable = true;
        vms.tiny = {
          vcpus = 1;
          memoryMiB = 128;
          accel = "tcg"; # no nested KVM in the test VM
          inherit (guest) kernel initrd cmdline;
        };
      };

      specialisation.hotplug.configuration.services.plasmavmc.vms.tiny = {
        disks.data = {
          path = "/var/lib/vms/tiny-data.qcow2";
          format = "qcow2";
        };
        nics.eth0 = {
          mac = "52:54:00:00:00:42";
          bridge = "br0";
        };
      };

      specialisation.removed.configuration.services.plasmavmc.vms = lib.mkForce { };
    };

  testScript = ''
    import json

    def vms():
        return json.loads(host.succeed("plasmavmc status --json"))["vms"]

    def qemu_pid():
        return host.succeed("cat /run/plasmavmc/vms/tiny/pid").strip()

    def device_ids():
        return {d["id"] for d in vms()["tiny"]["devices"]}

    def wait_running():
        host.wait_until_succeeds(
            "plasmavmc status --json | jq -e '.vms.tiny.state == \"running\"'", timeout=120
        )

    start_all()
    host.wait_for_unit("plasmavmc.service")
    base = host.succeed("readlink -f /run/current-system").strip()

    with subtest("a declared VM boots"):
        host.wait_until_succeeds(
            "grep -q PLASMAVMC-GUEST-UP /run/plasmavmc/vms/tiny/console.log", timeout=600
        )
        wait_running()
        pid = qemu_pid()
        # QEMU lives in its own scope, not in the agent's cgroup.
        cgroup = host.succeed(f"cat /proc/{pid}/cgroup")
        assert "plasmavmc.service" not in cgroup, cgroup

    with subtest("a switch adding a disk and a NIC hot-plugs them into the same QEMU"):
        host.succeed("mkdir -p /var/lib/vms")
        host.succeed("qemu-img create -f qcow2 /var/lib/vms/tiny-data.qcow2 64M")
        out = host.succeed(f"{base}/specialisation/hotplug/bin/switch-to-configuration test 2>&1")
        assert "plasmavmc: plan for the new configuration" in out, out
        assert {"disk-data", "nic-eth0"} <= device_ids(), device_ids()
        assert qemu_pid() == pid, "the VM was restarted"
        host.succeed(f"kill -0 {pid}")
        host.succeed("ip -o link show master br0 | grep -q ' pv'")
        host.succeed("journalctl -u plasmavmc.service | grep -q 'Reloading'")

    with subtest("dry-activate previews without changing anything"):
        out = host.succeed(f"{base}/bin/switch-to-configuration dry-activate 2>&1")
        assert "plasmavmc" in out, out
        assert {"disk-data", "nic-eth0"} <= device_ids(), device_ids()

    with subtest("restarting the agent keeps the VM and its devices"):
        host.succeed("systemctl restart plasmavmc.service")
        host.wait_for_unit("plasmavmc.service")
        wait_running()
        assert qemu_pid() == pid, "the VM was restarted"
        assert {"disk-data", "nic-eth0"} <= device_ids(), device_ids()

    with subtest("a VM removed from the configuration is stopped"):
        host.succeed(f"{base}/specialisation/removed/bin/switch-to-configuration test")
        host.wait_until_fails(f"kill -0 {pid}", timeout=300)
        assert "tiny" not in vms(), vms()
  '';
}
