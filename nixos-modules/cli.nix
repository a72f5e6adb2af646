# The `plasmavmc` command lines the units and the switch run against this host's agent: one place
# for the binary and for the run dir that holds the agent's control socket.
{ lib, cfg }:
rec {
  plasmavmc = lib.getExe' cfg.package "plasmavmc";

  # `plasmavmc ARGS... --run-dir RUN_DIR`, as a list: escape it for systemd
  # (`utils.escapeSystemdExecArgs`) or for a shell (`lib.escapeShellArgs`).
  toAgent = args: [ plasmavmc ] ++ args ++ [
    "--run-dir"
    cfg.runDir
  ];
}
