# `nix flake check`'s options-doc: docs/options.md matches the option declarations.
{ pkgs, lib }:
let
  rendered = import ./options-md.nix { inherit lib; };
  committed = builtins.readFile ../../docs/options.md;
in
pkgs.runCommand "plasmavmc-options-doc" { } (
  if rendered == committed then
    "touch $out"
  else
    ''
      echo "docs/options.md is stale: run checks/docs/gen-options.sh and commit the result" >&2
      exit 1
    ''
)
