# The host's own life, the way an operator lives it: dry-activate shows the plan's own lines; a
# config-only switch reloads the agent (same MainPID) and a new agent package restarts it (new
# MainPID), the QEMUs untouched in both; an invalid desired state is refused by the switch before
# anything changes; `systemctl stop plasmavmc` leaves the VMs running; a reboot saves the VM that
# says `onHostShutdown = "save"` and powers the other down, and after the boot both come back,
# the saved one restored (no second boot on its console).
{ plasmavmcModule }:
{ lib, ... }:
let
  common = import ./common.nix { inherit plasmavmcModule; };
in
{
  name = "plasmavmc-host-lifecycle";

  nodes.host =
    { config, pkgs, ... }:
    let
      tiny = common.tinyVm pkgs { } // {
        maxVcpus = 2;
      };
      agentPackage = config.services.plasmavmc.package;
    in
    {
      imports = [ (common.host 2048) ];

      services.plasmavmc = {
        enable = true;
        # The tiny guest ignores ACPI: keep the powerdown wait short.
        stopTimeout = 10;
        vms.kept = tiny // {
          onHostShutdown = "save";
        };
        vms.plain = tiny;
      };

      # Config only: one more vCPU for `plain`, live.
      specialisation.morecpu.configuration.services.plasmavmc.vms.plain.vcpus = lib.mkForce 2;

      # The same change plus a new agent package (the same binary at another store path).
      specialisation.newagent.configuration = {
        services.plasmavmc.vms.plain.vcpus = lib.mkForce 2;
        services.plasmavmc.package = lib.mkForce (
          pkgs.symlinkJoin {
            name = "plasmavmc-relinked";
            paths = [ agentPackage ];
            meta.mainProgram = "plasmavmc";
          }
        );
      };

      # A desired state the agent refuses (a schema version it does not know).
      specialisation.invalid.configuration.environment.etc."plasmavmc/desired.json".text =
        lib.mkForce (builtins.toJSON {
          version = 99;
          vms = { };
        });
    };

  testScript = ''
    import json

    def vms():
        return json.loads(host.succeed("plasmavmc status --json"))["vms"]

    def main_pid():
        return host.succeed("systemctl show -P MainPID plasmavmc.service").strip()

    def qemu_pids():
        return {vm: host.succeed(f"cat /run/plasmavmc/vms/{vm}/pid").strip() for vm in ["kept", "plain"]}

    def wait_running(vm):
        host.wait_until_succeeds(
            f"plasmavmc status --json | jq -e '.vms.{vm}.state == \"running\"'", timeout=300
        )

    def wait_booted(vm):
        host.wait_until_succeeds(
            f"grep -q PLASMAVMC-GUEST-UP /run/plasmavmc/vms/{vm}/console.log", timeout=600
        )

    def switch(specialisation, action="test"):
        return host.execute(
            f"{base}/specialisation/{specialisation}/bin/switch-to-configuration {action} 2>&1"
        )

    start_all()
    host.wait_for_unit("plasmavmc.service")
    host.wait_for_unit("plasmavmc-host-shutdown.service")
    base = host.succeed("readlink -f /run/current-system").strip()
    for vm in ["kept", "plain"]:
        wait_booted(vm)
        wait_running(vm)
    agent, qemus = main_pid(), qemu_pids()

    with subtest("dry-activate shows the plan's own lines and changes nothing"):
        code, out = switch("morecpu", "dry-activate")
        assert code == 0, out
        assert "plasmavmc: plan for the new configuration:" in out, out
        assert "plain: vCPUs 1 -> 2" in out, out
        assert main_pid() == agent and qemu_pids() == qemus

    with subtest("a config-only switch reloads the agent: same MainPID, same QEMUs"):
        code, out = switch("morecpu")
        assert code == 0, out
        assert "plain: vCPUs 1 -> 2" in out, out
        assert main_pid() == agent, "the agent was restarted"
        assert qemu_pids() == qemus, "a VM was restarted"

    with subtest("a new agent package restarts the agent, not the VMs"):
        code, out = switch("newagent")
        assert code == 0, out
        host.wait_for_unit("plasmavmc.service")
        assert main_pid() != agent, "the agent was not restarted"
        assert qemu_pids() == qemus, "a VM was restarted"
        host.succeed("systemctl status plasmavmc.service | grep -q 'first apply done'")
        agent = main_pid()

    with subtest("an invalid desired state is refused before anything changes"):
        current = host.succeed("readlink -f /run/current-system").strip()
        code, out = switch("invalid")
        assert code != 0, out
        assert "refusing the switch" in out, out
        assert host.succeed("readlink -f /run/current-system").strip() == current
        assert main_pid() == agent and qemu_pids() == qemus

    with subtest("systemctl stop plasmavmc leaves the VMs running"):
        host.succeed("systemctl stop plasmavmc.service")
        for pid in qemus.values():
            host.succeed(f"kill -0 {pid}")
        host.succeed("systemctl is-active plasmavmc-host-shutdown.service")
        host.succeed("systemctl start plasmavmc.service")
        wait_running("kept")
        assert qemu_pids() == qemus, "the new agent adopts the same QEMUs"

    with subtest("a reboot saves `kept`, powers `plain` down, and brings both back"):
        host.succeed(f"{base}/bin/switch-to-configuration test")
        host.shutdown()
        host.start()
        host.wait_for_unit("plasmavmc.service")
        out = host.succeed("journalctl -b -1 -u plasmavmc-host-shutdown.service")
        assert "kept: saved" in out, out
        assert "plain: stopped" in out, out
        for vm in ["kept", "plain"]:
            wait_running(vm)
        wait_booted("plain")
        # Restored, not booted: the guest never prints its boot marker again.
        host.sleep(20)
        host.fail("grep -q PLASMAVMC-GUEST-UP /run/plasmavmc/vms/kept/console.log")
        assert vms()["kept"]["unrestorableSaves"] == [], vms()["kept"]
  '';
}
