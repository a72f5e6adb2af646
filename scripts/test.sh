#!/usr/bin/env bash
# The whole test suite: what `.ci/run` runs. Unit tests of the pure core, integration tests
# against a real QEMU guest and a real etcd, and the Nix checks (parse, module evaluation with the
# real nixpkgs lib, options reference freshness).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --locked --all-targets
# QEMU-booting tests serialize themselves (tests/support); TCG guests are slow on 2 cores.
cargo test --locked --workspace --no-fail-fast
bash checks/run-nix-checks.sh
