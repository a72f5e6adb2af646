# The unprivileged user QEMU runs as (`qemuUser`, `qemuGroup`), like nixpkgs' `qemu-libvirtd`:
# created when it is the default, in `kvm` for /dev/kvm. What the agent hands it (disk images,
# block devices, taps, the VM directories) is in docs/security.md.
{ config, lib, ... }:
let
  cfg = config.services.plasmavmc;
  opt = "services.plasmavmc";
  defaultName = "plasmavmc-qemu";
in
{
  config = lib.mkIf cfg.enable {
    users.users = lib.mkIf (cfg.qemuUser == defaultName) {
      ${defaultName} = {
        isSystemUser = true;
        group = cfg.qemuGroup;
        extraGroups = [ "kvm" ];
        description = "plasmavmc's QEMU processes";
      };
    };
    users.groups = lib.mkIf (cfg.qemuGroup == defaultName) { ${defaultName} = { }; };

    assertions = [
      {
        assertion = cfg.qemuUser != "root";
        message = "${opt}.qemuUser = \"root\" is not an unprivileged user; set it to null to run QEMU as root (not recommended).";
      }
      {
        assertion =
          builtins.elem cfg.qemuUser [
            null
            "root" # the assertion above says what is wrong with it
            defaultName
          ]
          || config.users.users ? ${cfg.qemuUser};
        message = "${opt}.qemuUser: user ${toString cfg.qemuUser} is not declared in users.users (only ${defaultName} is created by this module).";
      }
      {
        assertion =
          cfg.qemuUser == null || cfg.qemuGroup == defaultName || config.users.groups ? ${cfg.qemuGroup};
        message = "${opt}.qemuGroup: group ${cfg.qemuGroup} is not declared in users.groups (only ${defaultName} is created by this module).";
      }
    ];
  };
}
