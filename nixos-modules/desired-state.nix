# The desired-state document (`/etc/plasmavmc/desired.json`) as a pure function of the evaluated
# `services.plasmavmc.vms`: `{ version = 1; vms = { NAME = VM; }; }` with spec.rs's keys.
#
# Optional fields that are `null` are left out rather than written as `null`, so the file says only
# what the operator declared and the agent's serde defaults stay the single source of defaults for
# absent fields. Usable standalone:
#   import ./desired-state.nix { inherit lib; } config.services.plasmavmc.vms
{ lib }:
let
  schemaVersion = 1;

  withoutNulls = lib.filterAttrs (_: value: value != null);

  disk = d: withoutNulls {
    inherit (d) path format readOnly cache serial sizeMiB deleteOnRemove;
    # Written only when set: the agent's default is not shared.
    shared = if d.shared then true else null;
    create =
      if d.create == null then
        null
      else
        withoutNulls {
          from = if d.create.from == null then null else toString d.create.from;
          inherit (d.create) backing;
        };
  };

  # Only the source is written: for `file`, the path, never the content.
  content = c: withoutNulls { inherit (c) text file; };

  nic = n: withoutNulls {
    inherit (n) mac bridge tap;
  };

  limits = l: withoutNulls {
    inherit (l) cpuWeight cpuQuotaPercent memoryMaxMiB;
  };

  vm =
    v:
    withoutNulls {
      inherit (v)
        vcpus
        maxVcpus
        memoryMiB
        maxMemoryMiB
        machine
        accel
        kernel
        initrd
        cmdline
        bootDisk
        firmware
        hotplugSlots
        autostart
        restartPolicy
        onRestartRequired
        onHostShutdown
        orgId
        projectId
        consoleLog
        ;
      disks = lib.mapAttrs (_: disk) v.disks;
      credentials = lib.mapAttrs (_: content) v.credentials;
      cloudInit =
        if v.cloudInit == null then
          null
        else
          lib.mapAttrs (_: content) (withoutNulls {
            inherit (v.cloudInit) userData metaData networkConfig;
          });
      nics = lib.mapAttrs (_: nic) v.nics;
      ha = {
        inherit (v.ha) enable;
      }
      // lib.optionalAttrs (v.ha.preferredHosts != [ ]) { inherit (v.ha) preferredHosts; };
    }
    // lib.optionalAttrs (limits v.limits != { }) { limits = limits v.limits; };
in
vms: {
  version = schemaVersion;
  vms = lib.mapAttrs (_: vm) vms;
}
