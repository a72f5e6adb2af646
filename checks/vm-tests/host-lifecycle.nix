# The host's own life, the way an operator lives it: dry-activate shows the plan's own lines; a
# config-only switch reloads the agent (same MainPID) and a new agent package restarts it (new
# MainPID), the QEMUs untouched in both; a switch that restarts the agent fails, naming
# plasmavmc-first-apply.service, when the new agent's first apply fails (a VM whose disk image is
# not there), while the agent (not restarted again) and the QEMUs run on; an invalid desired state is refused by the switch before
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
      # The same agent binary at another store path: a new package to switch-to-configuration.
      relinked =
        name:
        pkgs.symlinkJoin {
          inherit name;
          paths = [ agentPackage ];
          meta.mainProgram = "plasmavmc";
        };
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
        services.plasmavmc.package = lib.mkForce (relinked "plasmavmc-relinked");
      };

      # Another agent package again, plus a VM that passes validation but cannot start: its disk
      # image does not exist.
      specialisation.brokenvm.configuration = {
        services.plasmavmc.vms.plain.vcpus = lib.mkForce 2;
        services.plasmavmc.package = lib.mkForce (relinked "plasmavmc-relinked-again");
        services.plasmavmc.vms.broken = tiny // {
          disks.data = {
            path = "/var/lib/plasmavmc-test/absent.qcow2";
            format = "qcow2";
          };
        };
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
        host.succeed("systemctl is-active plasmavmc-first-apply.service")
        agent = main_pid()

    # `test` rather than `switch`: the units are handled alike; `switch` would also make the
    # broken specialisation the boot default.
    with subtest("a switch that restarts the agent fails when its first apply does"):
        code, out = switch("brokenvm")
        assert code == 4, out
        failed = [line for line in out.splitlines() if "the following units failed:" in line]
        assert failed and "plasmavmc-first-apply.service" in failed[0], out
        restarted = main_pid()
        assert restarted != agent, "the agent was not restarted"
        host.succeed("systemctl is-failed plasmavmc-first-apply.service")
        host.succeed(
            "journalctl -u plasmavmc-first-apply.service | grep 'broken: .*absent.qcow2 does not exist'"
        )
        code, out = host.execute("plasmavmc first-apply")
        assert code == 1 and out.startswith("first apply FAILED for broken"), out

    with subtest("the agent and the VMs run on after it, the agent never restarted again"):
        host.sleep(5)
        host.succeed("systemctl is-active plasmavmc.service")
        assert main_pid() == restarted, "the agent was restarted again"
        assert host.succeed("systemctl show -P NRestarts plasmavmc.service").strip() == "0"
        assert qemu_pids() == qemus, "a VM was restarted"
        for pid in qemus.values():
            host.succeed(f"kill -0 {pid}")

    with subtest("the next switch that restarts the agent checks its first apply anew, and passes"):
        code, out = switch("newagent")
        assert code == 0, out
        assert main_pid() != restarted, "the agent was not restarted"
        assert qemu_pids() == qemus, "a VM was restarted"
        host.succeed("systemctl is-active plasmavmc-first-apply.service")
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
