# What a VM is given at boot beyond its devices: systemd credentials (NixOS-native guests) and a
# cloud-init NoCloud seed (other guests). Both are read by the agent when the VM starts and handed
# to QEMU in memory (sealed memfds), so a secret given as `file` never reaches the Nix store, the
# desired-state file, QEMU's command line or any file the agent writes. Changing either is
# pending until the VM's next start.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  names = import ./names.nix { inherit lib; };

  # A value inline (`text`) or from a host file read at VM start (`file`); exactly one.
  content = what: {
    options = {
      text = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = ''
          The ${what} inline. It is written to the Nix store and the desired-state file, which
          every local user can read: never a secret.
        '';
      };
      file = mkOption {
        type = types.nullOr names.absolutePath;
        default = null;
        example = lib.literalExpression "config.age.secrets.web-root-password.path";
        description = ''
          A host file holding the ${what}, read by the agent each time the VM starts. A string,
          not a Nix path (a Nix path would copy the secret into the world-readable store): give
          the path agenix or sops-nix decrypts to, e.g. `config.age.secrets.NAME.path` or
          `config.sops.secrets.NAME.path`.
        '';
      };
    };
  };
  contentOf = what: types.submodule (content what);
in
{
  options = {
    credentials = mkOption {
      type = types.attrsOf (contentOf "credential");
      default = { };
      example = lib.literalExpression ''
        {
          "passwd.hashed-password.root".file = config.age.secrets.web-root-hash.path;
          "ssh.authorized_keys.root".text = "ssh-ed25519 AAAA... admin@example.org";
          "system.hostname".text = "web";
        }
      '';
      description = ''
        systemd credentials for the guest, passed through QEMU's fw_cfg as
        `opt/io.systemd.credentials/NAME`; systemd (252 or later) in the guest imports them at
        boot (`/run/credentials/@system`), and units use them with `ImportCredential=` or
        `LoadCredential=`. Names: 1 to 28 of `A-Z a-z 0-9 _ . -`. A `file` is read when the VM
        starts (a rotated secret reaches the guest at its next start); changing the set of
        credentials or their sources is pending until the next start.
      '';
    };

    cloudInit = mkOption {
      type = types.nullOr (
        types.submodule {
          options = {
            userData = mkOption {
              type = types.nullOr (contentOf "cloud-init user-data");
              default = null;
              example = lib.literalExpression ''
                {
                  text = '''
                    #cloud-config
                    ssh_authorized_keys:
                      - ssh-ed25519 AAAA... admin@example.org
                  ''';
                }
              '';
              description = "cloud-init `user-data` (`#cloud-config` YAML, a script, ...). Empty when `null`.";
            };
            metaData = mkOption {
              type = types.nullOr (contentOf "cloud-init meta-data");
              default = null;
              description = ''
                cloud-init `meta-data`. `null`: `instance-id: NAME-<fingerprint of user-data and
                network-config>` and `local-hostname: NAME`, so a changed seed counts as a new
                instance (cloud-init runs its per-instance modules again) at the next boot.
              '';
            };
            networkConfig = mkOption {
              type = types.nullOr (contentOf "cloud-init network-config");
              default = null;
              description = "cloud-init `network-config` (version 1 or 2). Left out when `null`.";
            };
          };
        }
      );
      default = null;
      description = ''
        A cloud-init NoCloud seed for guests that are not NixOS (cloud images): the agent builds a
        vfat volume labelled `cidata` with `meta-data`, `user-data` and `network-config` when the
        VM starts and attaches it read-only (a virtio disk with serial `cidata`). A change is
        pending until the next start.
      '';
    };
  };
}
