#!/usr/bin/env bash
# Installs what plasmavmc's build, demo and tests need on a Debian 12 machine, only if missing.
# Idempotent; needs root (or sudo) for apt-get.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
have qemu-img || need+=(qemu-utils)
have etcd || need+=(etcd-server)
have etcdctl || need+=(etcd-client)
have nix-instantiate || need+=(nix-bin)
have protoc || need+=(protobuf-compiler)
have openssl || need+=(openssl)
have ip || need+=(iproute2)
have cpio || need+=(cpio)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)

# The unprivileged user the tests run confined QEMUs as (agent/tests/support/qemu_harness.rs).
if ! id plasmavmc-test >/dev/null 2>&1; then
  echo "install-deps: adding the system user plasmavmc-test"
  "${sudo[@]}" useradd --system --no-create-home --shell /usr/sbin/nologin plasmavmc-test
fi

if ((${#need[@]} == 0)); then
  echo "install-deps: everything is present"
  exit 0
fi
echo "install-deps: installing ${need[*]}"
"${sudo[@]}" apt-get update -qq
pkgs=("${need[@]}")
# Some images carry a backported qemu-utils that conflicts with Debian 12's qemu-system-x86:
# install the qemu-utils that matches the qemu-system-x86 being installed.
if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
  qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  pkgs=("${pkgs[@]/qemu-utils/}")
  pkgs+=("qemu-utils=${qemu_version}")
fi
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --allow-downgrades "${pkgs[@]}"
