# `services.plasmavmc.metrics`: the agent's Prometheus endpoint (`--metrics-listen`), with the
# option shape of nixpkgs' Prometheus exporters (enable, listenAddress, port, openFirewall). The
# agent serves it itself: no exporter unit, no extra process. What it exports: docs/metrics.md.
{ config, lib, ... }:
let
  inherit (lib) mkOption mkEnableOption types;
  firewall = import ./firewall.nix { inherit lib; };
  cfg = config.services.plasmavmc.metrics;
  # An IPv6 address needs brackets in ADDR:PORT.
  host = if lib.hasInfix ":" cfg.listenAddress then "[${cfg.listenAddress}]" else cfg.listenAddress;
in
{
  options.services.plasmavmc.metrics = {
    enable = mkEnableOption "Prometheus metrics of the VMs and the agent at `http://listenAddress:port/metrics`";

    listenAddress = mkOption {
      type = types.str;
      default = "0.0.0.0";
      example = "127.0.0.1";
      description = "Address the metrics endpoint listens on (IPv4 or IPv6, without brackets).";
    };

    port = mkOption {
      type = types.port;
      default = 9850;
      description = "Port the metrics endpoint listens on.";
    };

    openFirewall = firewall.mkOpenFirewallOption "Open `port` in the firewall for incoming connections (for a Prometheus on another host).";
  };

  config = lib.mkIf (config.services.plasmavmc.enable && cfg.enable) {
    services.plasmavmc.extraAgentArgs = [
      "--metrics-listen"
      "${host}:${toString cfg.port}"
    ];
    networking.firewall = firewall.openTcp cfg.openFirewall { ports = [ cfg.port ]; };
  };
}
