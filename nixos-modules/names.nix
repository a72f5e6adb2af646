# Shapes of names and addresses, as option types and predicates, shared by the option
# declarations and the assertions. They mirror the agent's validation
# (agent/src/validate/names.rs, rules.rs), so the build rejects what the agent would.
{ lib }:
let
  inherit (lib) types;
  described = description: type: type // { inherit description; };
in
rec {
  # VM names become directory names, systemd unit names and QEMU ids.
  vmNamePattern = "[a-z][a-z0-9-]{0,31}";
  # Disk and NIC ids become parts of QEMU ids; `disk-<id>-file` must fit QEMU's 31 bytes.
  deviceIdPattern = "[a-z][a-z0-9-]{0,19}";

  isVmName = name: builtins.match vmNamePattern name != null;
  isDeviceId = id: builtins.match deviceIdPattern id != null;

  mac = described "MAC address (xx:xx:xx:xx:xx:xx)" (
    types.strMatching "([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}"
  );

  # The group bit (least significant bit of the first octet) marks multicast addresses.
  isUnicastMac = mac: lib.mod (lib.fromHexString (builtins.substring 0 2 mac)) 2 == 0;
  isZeroMac = mac: builtins.match "(00:){5}00" mac != null;

  # Linux interface names (IFNAMSIZ - 1 = 15 bytes), restricted to bytes safe inside QEMU's
  # key=value options.
  ifname = described "interface name (1 to 15 of A-Z a-z 0-9 _ . -, not . or ..)" (
    types.addCheck (types.strMatching "[A-Za-z0-9_.-]{1,15}") (name: name != "." && name != "..")
  );

  # Taps named pv<12 hex digits> are the ones the agent makes for bridged NICs.
  isAgentTap = name: builtins.match "pv[0-9a-f]{12}" name != null;

  absolutePath = described "absolute path" (types.strMatching "/[^[:cntrl:]]*");

  # orgId / projectId become parts of ChainFire keys.
  scopeId = described "non-empty string without '/', whitespace or control characters" (
    types.strMatching "[^/[:space:][:cntrl:]]+"
  );

  # virtio-blk serials.
  isSerial = serial: builtins.match "[[:print:]]{1,20}" serial != null && !lib.hasInfix "," serial;
}
