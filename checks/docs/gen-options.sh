#!/usr/bin/env bash
# Regenerates docs/options.md from the module's option declarations (real nixpkgs lib).
# --check: exit non-zero, with a diff, when the committed docs/options.md is stale.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
target="$repo/docs/options.md"
rendered="$(mktemp)"
trap 'rm -f "$rendered"' EXIT

nix-instantiate --eval --strict --json -E "import $repo/checks/docs/options-md.nix { }" | jq -j . >"$rendered"

if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$target" "$rendered"; then
    echo "docs/options.md is stale: run checks/docs/gen-options.sh and commit the result" >&2
    exit 1
  fi
  echo "docs/options.md is up to date"
else
  cp "$rendered" "$target"
  echo "wrote $target"
fi
