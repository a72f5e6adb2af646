# `nix flake check`'s module-eval: the same tests as ./run.sh, with the flake's nixpkgs lib.
{ pkgs, lib }:
let
  results = import ./run.nix { inherit lib; };
  failed = builtins.filter (r: !r.ok) results;
  report = lib.concatMapStrings (
    r: if r.ok then "PASS ${r.name}\n" else "FAIL ${r.name}\n     ${r.detail}\n"
  ) results;
  summary = "module-eval: ${toString (builtins.length results - builtins.length failed)} passed, ${toString (builtins.length failed)} failed";
in
pkgs.runCommand "plasmavmc-module-eval"
  {
    inherit report summary;
    passAsFile = [ "report" ];
  }
  ''
    cat "$reportPath"
    echo "$summary"
    ${if failed == [ ] then "cp \"$reportPath\" $out" else "exit 1"}
  ''
