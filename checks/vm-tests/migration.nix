# Two NixOS hypervisors with ChainFire (an etcd on a third node) declare one HA VM whose guest
# counts seconds on its console. It is moved live with `plasmavmc migrate`, then by
# `plasmavmc evacuate --wait` (the host cordoned, nothing comes back to it while it is), then by
# placement (`ha.preferredHosts`) once the host is uncordoned and has settled. Throughout, never
# are two copies alive, the guest never boots a second time, and its count goes on.
{ plasmavmcModule }:
{ lib, ... }:
let
  common = import ./common.nix { inherit plasmavmcModule; };
  settle = 5;
  hypervisor =
    hostId:
    { config, pkgs, ... }:
    {
      imports = [ (common.hypervisor hostId) ];
      services.plasmavmc = {
        migration = {
          address = config.networking.primaryIPAddress;
          openFirewall = true;
          placementSettle = settle;
        };
        # A diskless guest: nothing to copy or share but its memory.
        vms.web = common.tinyVm pkgs { ticks = true; } // {
          ha = {
            enable = true;
            preferredHosts = [ "hv1" ];
          };
        };
      };
    };
in
{
  name = "plasmavmc-migration";

  nodes = common.cluster hypervisor;

  testScript = ''
    import json, re, time

    ${common.clusterScript}
    console = "/run/plasmavmc/vms/web/console.log"

    def runs_on():
        alive = [name for name, node in hosts.items() if qemu_alive(node)]
        assert len(alive) <= 1, f"two copies: {alive}"
        return alive[0] if alive else None

    def boots():
        # The boot marker, on both hosts' console logs: a guest that moved live printed it once.
        return sum(
            int(node.succeed(f"grep -c PLASMAVMC-GUEST-UP {console} || true").strip() or 0)
            for node in hosts.values()
        )

    def last_tick(node):
        ticks = re.findall(r"PLASMAVMC-GUEST-TICK (\d+)", node.succeed(f"cat {console} || true"))
        return int(ticks[-1]) if ticks else 0

    def wait_on(name, timeout):
        # Polls both hosts every 50 ms until the VM runs on `name` only.
        deadline = time.time() + timeout
        while runs_on() != name:
            assert time.time() < deadline, f"web never came to {name}"
            time.sleep(0.05)

    def ticking_on(name, before):
        # The guest goes on counting where it was (a second boot would start over at 1).
        node = hosts[name]
        node.wait_until_succeeds(
            f"grep -q 'PLASMAVMC-GUEST-TICK {before + 3}' {console}", timeout=60
        )
        assert boots() == 1, "the guest booted again"

    start_cluster()

    with subtest("each host publishes its migration address"):
        for name, node in hosts.items():
            node.wait_until_succeeds(
                f"plasmavmc status --cluster --json | jq -e '.hosts[] | select(.hostId == \"{name}\")'",
                timeout=60,
            )

    with subtest("web runs on hv1, its preferred host"):
        hv1.wait_until_succeeds("grep -q PLASMAVMC-GUEST-TICK " + console, timeout=600)
        wait_on("hv1", 120)

    with subtest("plasmavmc migrate moves it live to hv2"):
        before = last_tick(hv1)
        out = json.loads(hv1.succeed("plasmavmc migrate web --to hv2 --json"))
        assert out["mode"] == "live" and out["to"] == "hv2", out
        wait_on("hv2", 30)
        ticking_on("hv2", before)

    with subtest("placement brings it back to hv1 live once hv1 has settled"):
        before = last_tick(hv2)
        wait_on("hv1", 120)
        ticking_on("hv1", before)

    with subtest("evacuate --wait cordons hv1 and moves web to hv2"):
        before = last_tick(hv1)
        hv1.succeed("plasmavmc evacuate --wait")
        wait_on("hv2", 30)
        ticking_on("hv2", before)
        hv1.succeed("plasmavmc status | grep -q CORDONED")
        hv2.succeed("plasmavmc status --cluster | grep -q 'hv1 (cordoned)'")

    with subtest("a cordoned hv1 receives nothing: no placement, no migration"):
        time.sleep(${toString (settle * 3)})
        assert runs_on() == "hv2", "web moved to a cordoned host"
        hv2.fail("plasmavmc migrate web --to hv1")
        assert runs_on() == "hv2"

    with subtest("uncordoned, hv1 gets web back by placement, live"):
        before = last_tick(hv2)
        hv1.succeed("plasmavmc uncordon")
        wait_on("hv1", 120)
        ticking_on("hv1", before)
  '';
}
