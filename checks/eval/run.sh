#!/usr/bin/env bash
# Evaluation tests of the NixOS module with the real nixpkgs module system.
# Usage: checks/eval/run.sh   (PLASMAVMC_NIXPKGS_LIB=/abs/path/to/nixpkgs/lib to use another lib)
# Prints one line per test and `N passed, N failed`; exits non-zero on any failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

results="$(nix-instantiate --eval --strict --json -E "import $here/run.nix { }")"

jq -r '.[] | if .ok then "PASS \(.name)" else "FAIL \(.name)\n     \(.detail)" end' <<<"$results"
passed="$(jq '[.[] | select(.ok)] | length' <<<"$results")"
failed="$(jq '[.[] | select(.ok | not)] | length' <<<"$results")"
echo "module-eval: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
