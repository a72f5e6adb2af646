# A NixOS host running services.plasmavmc, driven the way an operator drives it: a declared VM
# boots, its QEMU confined (the module's unprivileged user, seccomp, its own scope with the
# declared limits); `switch-to-configuration` to a specialisation that adds a disk and a NIC
# hot-plugs them into the same QEMU process and changes its limits live; restarting the agent
# leaves that QEMU running; a specialisation without the VM stops it.
{ plasmavmcModule }:
{ lib, ... }:
let
  common = import ./common.nix { inherit plasmavmcModule; };
in
{
  name = "plasmavmc-lifecycle";

  nodes.host =
    { config, pkgs, ... }:
    {
      imports = [ (common.host 2048) ];

      networking.bridges.br0.interfaces = [ ];
      environment.systemPackages = [ config.services.plasmavmc.qemuPackage ];

      services.plasmavmc = {
        enable = true;
        vms.tiny = common.tinyVm pkgs { } // {
          limits = {
            cpuWeight = 200;
            memoryMaxMiB = 1536;
          };
        };
      };

      specialisation.hotplug.configuration.services.plasmavmc.vms.tiny = {
        limits.cpuWeight = lib.mkForce 300;
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

    with subtest("QEMU runs confined: unprivileged, seccomp on, its own scope with the limits"):
        status = host.succeed(f"cat /proc/{pid}/status")
        uid = host.succeed("id -u plasmavmc-qemu").strip()
        assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status, status
        assert "Seccomp:\t2" in status, status
        assert "CapEff:\t0000000000000000" in status, status
        scope = host.succeed(f"cat /proc/{pid}/cgroup").strip().split("::")[-1]
        assert scope.endswith("/plasmavmc-vm-tiny.scope"), scope
        assert host.succeed(f"cat /sys/fs/cgroup{scope}/cpu.weight").strip() == "200"
        assert host.succeed(f"cat /sys/fs/cgroup{scope}/memory.max").strip() == str(1536 << 20)
        # The agent's control socket stays root's; QEMU's files are QEMU's.
        assert host.succeed("stat -c '%U %a' /run/plasmavmc/control.sock").strip() == "root 600"
        assert host.succeed("stat -c '%U %a' /run/plasmavmc/vms/tiny/qmp.sock").strip() == "plasmavmc-qemu 600"
        assert host.succeed("stat -c '%U %G %a' /run/plasmavmc/vms/tiny").strip() == "root plasmavmc-qemu 710"

    with subtest("a switch adding a disk and a NIC hot-plugs them into the same QEMU"):
        host.succeed("mkdir -p /var/lib/vms")
        host.succeed("qemu-img create -f qcow2 /var/lib/vms/tiny-data.qcow2 64M")
        out = host.succeed(f"{base}/specialisation/hotplug/bin/switch-to-configuration test 2>&1")
        assert "plasmavmc: plan for the new configuration" in out, out
        assert {"disk-data", "nic-eth0"} <= device_ids(), device_ids()
        assert qemu_pid() == pid, "the VM was restarted"
        host.succeed(f"kill -0 {pid}")
        host.succeed("ip -o link show master br0 | grep -q ' pv'")
        # The hot-plugged disk and tap are the QEMU user's; the new limit is live.
        assert host.succeed("stat -c '%U' /var/lib/vms/tiny-data.qcow2").strip() == "plasmavmc-qemu"
        assert "plasmavmc-qemu" in host.succeed("ip -d -j link show master br0")
        scope = host.succeed(f"cat /proc/{pid}/cgroup").strip().split("::")[-1]
        assert host.succeed(f"cat /sys/fs/cgroup{scope}/cpu.weight").strip() == "300"
        host.succeed("journalctl -u plasmavmc.service | grep -q 'Reloading'")

    with subtest("dry-activate previews without changing anything"):
        out = host.succeed(f"{base}/bin/switch-to-configuration dry-activate 2>&1")
        # The preview's own line (switch-to-configuration names the unit itself anyway).
        assert "plasmavmc: plan for the new configuration:" in out, out
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
