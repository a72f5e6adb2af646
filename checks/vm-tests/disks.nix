# A NixOS host declares a VM whose disk the agent creates (a qcow2 overlay on a base image) with
# a systemd credential from a secret file and a cloud-init seed: the image appears with its size,
# the base stays untouched, the secret is in no file the module or the agent wrote; a switch that
# raises sizeMiB grows the disk in the same QEMU, one that lowers it is refused, and one that
# removes the disk keeps the image.
{ plasmavmcModule }:
{ lib, ... }:
let
  common = import ./common.nix { inherit plasmavmcModule; };
  secret = "vm-test-secret-3c1d5e";
  vmWith = disk: {
    disks = disk;
    credentials."passwd.plaintext-password.root".file = "/run/secrets/tiny-root";
    cloudInit.userData.text = "#cloud-config\n";
  };
  root = sizeMiB: {
    root = {
      path = "/var/lib/vms/tiny-root.qcow2";
      format = "qcow2";
      inherit sizeMiB;
      create = {
        from = "/var/lib/images/base.raw";
        backing = true;
      };
    };
  };
in
{
  name = "plasmavmc-disks";

  nodes.host =
    { config, pkgs, ... }:
    {
      imports = [ (common.host 2048) ];
      environment.systemPackages = [ config.services.plasmavmc.qemuPackage ];
      # The base image and the secret, as an image build and agenix would leave them.
      systemd.tmpfiles.rules = [ "d /var/lib/vms 0755 root root -" ];
      system.activationScripts.vm-test-inputs.text = ''
        mkdir -p /var/lib/images /run/secrets
        [ -e /var/lib/images/base.raw ] || ${config.services.plasmavmc.qemuPackage}/bin/qemu-img create -q -f raw /var/lib/images/base.raw 32M
        printf %s ${secret} > /run/secrets/tiny-root
        chmod 0400 /run/secrets/tiny-root
      '';
      services.plasmavmc = {
        enable = true;
        vms.tiny = common.tinyVm pkgs { } // vmWith (root 64);
      };
      specialisation.grown.configuration.services.plasmavmc.vms.tiny.disks = lib.mkForce (root 128);
      specialisation.shrunk.configuration.services.plasmavmc.vms.tiny.disks = lib.mkForce (root 32);
      specialisation.removed.configuration.services.plasmavmc.vms.tiny.disks = lib.mkForce { };
    };

  testScript = ''
    import json

    def tiny():
        return json.loads(host.succeed("plasmavmc status --json"))["vms"]["tiny"]

    def qemu_pid():
        return host.succeed("cat /run/plasmavmc/vms/tiny/pid").strip()

    def virtual_size(path):
        info = json.loads(host.succeed(f"qemu-img info -U --output=json {path}"))
        return info["virtual-size"]

    start_all()
    host.wait_for_unit("plasmavmc.service")
    base = host.succeed("readlink -f /run/current-system").strip()
    base_sum = host.succeed("sha256sum /var/lib/images/base.raw")

    with subtest("the declared image is created as an overlay with its size"):
        host.wait_until_succeeds(
            "grep -q PLASMAVMC-GUEST-UP /run/plasmavmc/vms/tiny/console.log", timeout=600
        )
        assert virtual_size("/var/lib/vms/tiny-root.qcow2") == 64 * 1024 * 1024
        info = host.succeed("qemu-img info -U /var/lib/vms/tiny-root.qcow2")
        assert "/var/lib/images/base.raw" in info, info
        assert tiny()["disks"]["root"]["sizeMiB"] == 64, tiny()
        pid = qemu_pid()

    with subtest("the secret is in no file the module or the agent wrote, nor in QEMU's argv"):
        # -R: /etc/plasmavmc/desired.json is a symlink into the store.
        host.fail("grep -Rq ${secret} /etc/plasmavmc /run/plasmavmc /var/lib/plasmavmc")
        host.fail(f"grep -q ${secret} /proc/{pid}/cmdline")

    with subtest("raising sizeMiB grows the disk in the same QEMU"):
        out = host.succeed(f"{base}/specialisation/grown/bin/switch-to-configuration test 2>&1")
        assert "grow disk root 64 MiB -> 128 MiB" in out, out
        assert qemu_pid() == pid, "the VM was restarted"
        assert virtual_size("/var/lib/vms/tiny-root.qcow2") == 128 * 1024 * 1024

    with subtest("lowering it is refused and changes nothing"):
        out = host.fail(f"{base}/specialisation/shrunk/bin/switch-to-configuration test 2>&1")
        assert "REFUSED" in out, out
        assert qemu_pid() == pid
        assert virtual_size("/var/lib/vms/tiny-root.qcow2") == 128 * 1024 * 1024

    with subtest("removing the disk keeps its image; the base was never written"):
        host.succeed(f"{base}/specialisation/removed/bin/switch-to-configuration test 2>&1")
        host.succeed("test -e /var/lib/vms/tiny-root.qcow2")
        assert host.succeed("sha256sum /var/lib/images/base.raw") == base_sum
  '';
}
