# `openFirewall` as nixpkgs' services declare it, and the TCP rule it stands for: one shape for
# every listener of the module set (metrics, migration).
{ lib }:
{
  # A boolean, off by default; `description` says what it opens and when that is wise.
  mkOpenFirewallOption =
    description:
    lib.mkOption {
      type = lib.types.bool;
      default = false;
      inherit description;
    };

  # `networking.firewall` opening `ports` and `ranges` ({ from, to }), TCP, when `open`.
  openTcp =
    open:
    {
      ports ? [ ],
      ranges ? [ ],
    }:
    {
      allowedTCPPorts = lib.mkIf open ports;
      allowedTCPPortRanges = lib.mkIf open ranges;
    };
}
