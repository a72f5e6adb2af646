# Shapes of names and addresses, as option types and predicates, shared by the option
# declarations and the assertions.
{ lib }:
let
  inherit (lib) types;
  macPattern = "([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}";
  # VM, disk and NIC names become path components (`<runDir>/vms/<name>`) and QEMU ids.
  namePattern = "[A-Za-z0-9][A-Za-z0-9_-]{0,62}";
in
{
  inherit namePattern;

  isSafeName = name: builtins.match namePattern name != null;

  mac = types.strMatching macPattern // {
    description = "MAC address (six colon-separated hex octets)";
  };

  # The group bit (least significant bit of the first octet) marks multicast addresses.
  isUnicastMac = mac: lib.mod (lib.fromHexString (builtins.substring 0 2 mac)) 2 == 0;

  # Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no slash, no whitespace.
  ifname = types.strMatching "[^/[:space:]]{1,15}" // {
    description = "network interface name (at most 15 characters, no '/' or whitespace)";
  };

  absolutePath = types.strMatching "/.*" // {
    description = "absolute path";
  };
}
