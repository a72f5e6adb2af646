#!/usr/bin/env bash
# The Nix checks that run without nixpkgs (what CI runs): every .nix file parses, the module
# evaluates with the real nixpkgs module system and passes its tests, and docs/options.md matches
# the option declarations. The NixOS VM tests (checks/vm-tests) need nixpkgs: `nix flake check`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

command -v nix-instantiate >/dev/null || { echo "run-nix-checks: nix-instantiate is missing (apt-get install nix-bin)" >&2; exit 1; }
if ! command -v jq >/dev/null; then
  echo "run-nix-checks: installing jq"
  sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq jq
fi

status=0
step() { echo "== $*"; }

step "parse every .nix file"
parsed=0 unparsed=0
while IFS= read -r -d '' file; do
  if nix-instantiate --parse "$file" >/dev/null; then
    parsed=$((parsed + 1))
  else
    echo "FAIL parse $file"
    unparsed=$((unparsed + 1))
  fi
done < <(git ls-files -z --cached --others --exclude-standard -- '*.nix')
echo "nix-parse: ${parsed} passed, ${unparsed} failed"
[ "$unparsed" -eq 0 ] && [ "$parsed" -gt 0 ] || status=1

step "module evaluation tests"
checks/eval/run.sh || status=1

step "options reference is up to date"
checks/docs/gen-options.sh --check || status=1

exit "$status"
