# Two NixOS hypervisors with services.plasmavmc and ChainFire (an etcd on a third node) declare
# one HA VM. Exactly one runs it, under a fence guard; restarting the holder's agent keeps the VM
# (same QEMU, the lease resumed); killing the holder's agent for good makes its guard kill the VM
# before the other host starts it, and never are both copies alive.
{ plasmavmcModule }:
{ lib, ... }:
let
  common = import ./common.nix { inherit plasmavmcModule; };
  hypervisor =
    hostId:
    { pkgs, ... }:
    {
      imports = [ (common.hypervisor hostId) ];
      # A diskless guest: nothing to share between the hosts but the declaration.
      services.plasmavmc.vms.web = common.tinyVm pkgs { } // {
        ha.enable = true;
      };
    };
in
{
  name = "plasmavmc-ha-failover";

  nodes = common.cluster hypervisor;

  testScript = ''
    import json, time

    ${common.clusterScript}

    def status(node):
        return json.loads(node.succeed("plasmavmc status --json"))["vms"]["web"]

    def holder_and_standby():
        for name, node in hosts.items():
            if status(node)["state"] == "running":
                other = hv2 if node is hv1 else hv1
                return node, other
        raise Exception("nobody runs web")

    start_cluster()

    with subtest("exactly one host runs the HA VM, under a fence guard"):
        hv1.wait_until_succeeds(
            "plasmavmc status --cluster --json | jq -e '.vms[] | select(.key == \"default/default/web\") | .vm.state == \"running\"'",
            timeout=600,
        )
        holder, standby = holder_and_standby()
        assert not qemu_alive(standby), "two copies"
        standby.wait_until_succeeds(
            "plasmavmc status --json | jq -e '.vms.web.heldDown | startswith(\"HA: another host holds it\")'",
            timeout=60,
        )
        guard = status(holder)["fenceGuard"]
        pid = status(holder)["pid"]
        parent = holder.succeed(f"ps -o ppid= -p {pid}").strip()
        assert parent == str(guard), f"QEMU {pid} is not the child of its guard {guard}"
        holder.succeed(f"grep -qa fence-guard /proc/{guard}/cmdline")

    with subtest("restarting the holder's agent keeps the VM and the lease"):
        lease = json.loads(holder.succeed("cat /run/plasmavmc/lease.json"))["lease"]
        holder.succeed("systemctl restart plasmavmc.service")
        holder.wait_for_unit("plasmavmc.service")
        deadline = time.time() + 2 * ${toString common.leaseTtl}
        while time.time() < deadline:
            assert qemu_alive(holder), "the holder's VM died with its agent's restart"
            assert not qemu_alive(standby), "two copies"
            time.sleep(0.2)
        assert status(holder)["pid"] == pid, "the VM was restarted"
        assert json.loads(holder.succeed("cat /run/plasmavmc/lease.json"))["lease"] == lease

    with subtest("the holder's agent killed for good: its guard fences, the other host takes over"):
        holder.succeed("systemctl kill --signal=KILL plasmavmc.service")
        holder.succeed("systemctl stop plasmavmc.service")  # and no restart
        deadline = time.time() + 120
        while True:
            on_holder, on_standby = qemu_alive(holder), qemu_alive(standby)
            assert not (on_holder and on_standby), "two copies"
            if on_standby:
                break
            assert time.time() < deadline, "the standby never took over"
            time.sleep(0.05)
        holder.succeed("grep -q 'fenced by its guard' /run/plasmavmc/vms/web/fenced")

    with subtest("the old holder's agent comes back, explains, and stays out"):
        holder.succeed("systemctl start plasmavmc.service")
        holder.wait_until_succeeds(
            "plasmavmc status --json | jq -e '.vms.web.lastError | startswith(\"fenced by its guard\")'",
            timeout=60,
        )
        holder.wait_until_succeeds(
            "plasmavmc status --json | jq -e '.vms.web.heldDown | startswith(\"HA: another host holds it\")'",
            timeout=60,
        )
        assert qemu_alive(standby) and not qemu_alive(holder)
  '';
}
