# How VMs move between hosts: the live-migration channel (the address and ports this host takes
# incoming migrations on, published in ChainFire; TLS) and the placement settle time: the
# options, the agent flags they become, the firewall, and the checks that relate several values.
#
# Left out on purpose: the certificates themselves. `tlsDir` is a path string, never a Nix path,
# so private keys are not copied into the world-readable store; provision them with agenix,
# sops-nix or by hand.
{ config, lib, ... }:
let
  inherit (lib) mkOption types;
  names = import ./names.nix { inherit lib; };
  firewall = import ./firewall.nix { inherit lib; };
  cfg = config.services.plasmavmc;
  opt = "services.plasmavmc.migration";
  haVms = lib.attrNames (lib.filterAttrs (_: vm: vm.ha.enable) cfg.vms);
in
{
  options.services.plasmavmc.migration = {
    address = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "10.0.0.11";
      description = ''
        The address this host takes incoming live migrations on (QEMU listens there, one port
        per move), published in ChainFire for the other hosts. `null`: the agent's default,
        127.0.0.1, which no other host can reach: set it on every host of a cluster.
      '';
    };
    listenAddress = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "192.168.1.11";
      description = ''
        Where incoming QEMUs listen, when that is not `address` (the host is reached through NAT
        or a proxy). `null`: `address`.
      '';
    };
    ports = {
      from = mkOption {
        type = types.port;
        default = 49152;
        description = "First port of the range incoming migrations listen on (one per move in flight).";
      };
      to = mkOption {
        type = types.port;
        default = 49215;
        description = "Last port of that range.";
      };
    };
    openFirewall = firewall.mkOpenFirewallOption ''
      Open `ports.from`..`ports.to` (TCP) in the firewall. Without TLS the migration stream
      (guest memory and disks) is plaintext on the network: open them only on a network the
      hypervisors alone share, or set `tlsDir`.
    '';
    tlsDir = mkOption {
      type = types.nullOr names.absolutePath;
      default = null;
      example = "/run/keys/plasmavmc-migration";
      description = ''
        Directory with the migration TLS files in QEMU's `tls-creds-x509` layout: `ca-cert.pem`,
        `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem` (each host's
        certificate for both ends, signed by a CA every host trusts). Every host of the cluster
        must use TLS or none. `null`: the stream is plaintext. A string, not a Nix path: the
        keys must not be copied into the Nix store.
      '';
    };
    placementSettle = mkOption {
      type = types.ints.between 0 86400;
      default = 30;
      description = ''
        Seconds a host must have been live and uncordoned, without a break, before a VM is moved
        to it because it comes first in the VM's `ha.preferredHosts`: a host that flaps or has
        just rebooted is not chased at once.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    # Moving VMs needs ChainFire (the target is found there, the HA lock moves there).
    services.plasmavmc.extraAgentArgs = lib.optionals (cfg.chainfire.endpoints != [ ]) (
      [
        "--migration-ports"
        "${toString cfg.migration.ports.from}-${toString cfg.migration.ports.to}"
        "--placement-settle"
        (toString cfg.migration.placementSettle)
      ]
      ++ lib.optionals (cfg.migration.address != null) [
        "--migration-address"
        cfg.migration.address
      ]
      ++ lib.optionals (cfg.migration.listenAddress != null) [
        "--migration-listen"
        cfg.migration.listenAddress
      ]
      ++ lib.optionals (cfg.migration.tlsDir != null) [
        "--migration-tls-dir"
        cfg.migration.tlsDir
      ]
    );

    networking.firewall = firewall.openTcp cfg.migration.openFirewall {
      ranges = [ { inherit (cfg.migration.ports) from to; } ];
    };

    assertions = [
      {
        assertion = cfg.migration.ports.from <= cfg.migration.ports.to;
        message = "${opt}.ports.from (${toString cfg.migration.ports.from}) is greater than ${opt}.ports.to (${toString cfg.migration.ports.to}).";
      }
    ];

    warnings = lib.optional (haVms != [ ] && cfg.chainfire.endpoints != [ ] && cfg.migration.address == null) "${opt}.address is not set: HA VMs (${lib.concatStringsSep ", " haVms}) cannot be migrated to this host from another (the agent listens on 127.0.0.1).";
  };
}
