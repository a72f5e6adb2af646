# The few NixOS options services.plasmavmc sets or reads, declared with NixOS's own names and
# types, so the real module system can evaluate the module without all of nixpkgs. Every option is
# declared strictly (submodules, not `anything`): a misspelt option in the module is an error here,
# as it would be on NixOS.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;
  listOf = t: mkOption {
    type = types.listOf t;
    default = [ ];
  };
  bool = default: mkOption {
    type = types.bool;
    inherit default;
  };
  unitOption = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
    types.package
    (types.listOf (types.oneOf [ types.bool types.int types.str types.path types.package ]))
  ];

  etcFile =
    { name, config, ... }:
    {
      options = {
        text = mkOption {
          type = types.nullOr types.lines;
          default = null;
        };
        source = mkOption { type = types.path; };
        mode = mkOption {
          type = types.str;
          default = "symlink";
        };
      };
      # As NixOS does: a `text` file is a store file, and `source` points at it.
      config.source = lib.mkIf (config.text != null) (
        pkgs.writeText (baseNameOf name) config.text
      );
    };

  service = {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = listOf types.str;
      wants = listOf types.str;
      after = listOf types.str;
      before = listOf types.str;
      requires = listOf types.str;
      bindsTo = listOf types.str;
      partOf = listOf types.str;
      path = listOf (types.either types.package types.str);
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.either types.str types.package));
        default = { };
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      reloadTriggers = listOf unitOption;
      restartTriggers = listOf unitOption;
      reloadIfChanged = bool false;
      restartIfChanged = bool true;
      stopIfChanged = bool true;
    };
  };

  user = {
    options = {
      isSystemUser = bool false;
      group = mkOption {
        type = types.str;
        default = "";
      };
      extraGroups = listOf types.str;
      description = mkOption {
        type = types.str;
        default = "";
      };
    };
  };

  activationScript = {
    options = {
      text = mkOption { type = types.lines; };
      deps = listOf types.str;
      supportsDryActivation = bool false;
    };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = listOf types.str;

    environment.etc = mkOption {
      type = types.attrsOf (types.submodule etcFile);
      default = { };
    };
    environment.systemPackages = listOf types.package;

    boot.kernelModules = listOf types.str;

    networking.firewall.allowedTCPPorts = listOf types.port;
    networking.firewall.allowedTCPPortRanges = listOf (types.attrsOf types.port);

    networking.bridges = mkOption {
      type = types.attrsOf (types.submodule { options.interfaces = listOf types.str; });
      default = { };
    };

    systemd.package = mkOption {
      type = types.package;
      default = pkgs.systemd;
    };
    systemd.services = mkOption {
      type = types.attrsOf (types.submodule service);
      default = { };
    };
    systemd.tmpfiles.rules = listOf types.str;
    systemd.network.netdevs = mkOption {
      type = types.attrsOf (
        types.submodule {
          options.netdevConfig = mkOption {
            type = types.attrsOf unitOption;
            default = { };
          };
        }
      );
      default = { };
    };

    users.users = mkOption {
      type = types.attrsOf (types.submodule user);
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule { });
      default = { };
    };

    system.activationScripts = mkOption {
      type = types.attrsOf (types.submodule activationScript);
      default = { };
    };
  };
}
