#!/bin/sh
# Builds the plasmavmc test guest into OUT_DIR:
#   OUT_DIR/vmlinuz            the host's newest Debian kernel (linux-image-amd64)
#   OUT_DIR/initramfs.cpio.gz  busybox-static + ./init + the virtio modules it loads
# Cached: does nothing when OUT_DIR/stamp matches the kernel release and the content of this
# script and ./init. Callers that may run concurrently must serialize (guest.rs holds a flock).
#
# Kernel command line (agent/tests/support/guest.rs `guest_cmdline`):
#   console=ttyS0 quiet panic=-1
# The guest powers off on the ACPI power button (modules button + evdev). For a guest that IGNORES
# ACPI powerdown (a stop that runs into its timeout, a soft reset that falls back), add:
#   plasmavmc.ignore_powerdown
# For a guest that prints its uptime every 0.2 s (`HB:<seconds>`: two copies would interleave), add:
#   plasmavmc.heartbeat
# Memory: the init sets auto_online_blocks=online_movable before virtio_mem loads, so virtio-mem
# memory is online (and unpluggable again) as soon as it is plugged; no cmdline flag needed.
# For a guest that IGNORES PCI unplug requests, add:
#   acpiphp.disable=1 pcie_ports=compat
# Why (QEMU 7.2, q35, devices on pcie-root-ports, Debian 6.1 kernel):
# - By default q35 hotplugs through ACPI (acpi-pci-hotplug-with-bridge-support=on since 6.1) and
#   its _OSC keeps native hotplug from the OS, so pciehp never binds; acpiphp (built in) answers
#   the eject request. acpiphp.disable=1: device_del never gets DEVICE_DELETED, the device stays
#   usable; a system_reset completes the pending unplug.
# - With -global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off (native PCIe hotplug) pciehp
#   answers instead (DEVICE_DELETED ~6 s after device_del: the attention-button delay);
#   pcie_ports=compat keeps pciehp off, so that unplug is ignored too.
# - Without a hotplug driver nothing reports hot-ADDED devices either, so the init rescans the PCI
#   bus on every poll when acpiphp.disable=1 is on its cmdline. That finds hot-added devices under
#   ACPI hotplug; under native hotplug they stay invisible (their slot stays powered off).
# Verified by agent/tests/guest_smoke.rs (ACPI mode) and by hand (native mode).
set -eu

die() { echo "tests/guest/build.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: build.sh OUT_DIR"
out=$1
here=$(cd "$(dirname "$0")" && pwd)

kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1) || true
[ -n "$kernel" ] || die "no /boot/vmlinuz-*: install the Debian package linux-image-amd64"
release=${kernel#/boot/vmlinuz-}
modules=/lib/modules/$release
[ -f "$modules/modules.dep" ] || die "no $modules/modules.dep: reinstall linux-image-$release"
[ -x /bin/busybox ] || die "no /bin/busybox: install the Debian package busybox-static"
if ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is dynamically linked (package busybox): install the Debian package busybox-static"
fi
command -v cpio >/dev/null || die "no cpio: install the Debian package cpio"
command -v gzip >/dev/null || die "no gzip: install the Debian package gzip"

stamp=$(cat "$0" "$here/init" | sha256sum | cut -d' ' -f1)-$release
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
    exit 0
fi

mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/lib/modules"
cp /bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 0755 "$root/init"

# Modules with their dependencies (modules.dep: "path: dep dep ..."), dependencies first, each
# once. Kernels that compress modules get them decompressed here: busybox insmod reads plain .ko.
loaded=" "
add_module() { # $1: path relative to $modules
    case "$loaded" in *" $1 "*) return ;; esac
    deps=$(grep "^$1:" "$modules/modules.dep" | cut -d: -f2-)
    for dep in $deps; do add_module "$dep"; done
    loaded="$loaded$1 "
    name=$(basename "$1"); name=${name%%.ko*}.ko
    case "$1" in
        *.ko) cp "$modules/$1" "$root/lib/modules/$name" ;;
        *.ko.xz) xz -dc "$modules/$1" > "$root/lib/modules/$name" ;;
        *.ko.zst) zstd -qdc "$modules/$1" > "$root/lib/modules/$name" ;;
        *.ko.gz) gzip -dc "$modules/$1" > "$root/lib/modules/$name" ;;
        *) die "unknown module format: $1" ;;
    esac
    echo "$name" >> "$root/lib/modules/load-order"
}
: > "$root/lib/modules/load-order"
# button, evdev: the ACPI power button; qemu_fw_cfg: systemd credentials; vfat, its codepage
# (cp437) and the kernel's default iocharset: the cloud-init seed. Without that iocharset's
# module every vfat mount fails ("FAT-fs (vda): IO charset ascii not found", EINVAL).
fat_iocharset=$(sed -n 's/^CONFIG_FAT_DEFAULT_IOCHARSET="\(.*\)"$/\1/p' "/boot/config-$release" 2>/dev/null) || true
for wanted in virtio_pci virtio_blk virtio_net virtio_mem button evdev qemu_fw_cfg vfat nls_cp437 \
    "nls_${fat_iocharset:-ascii}"; do
    path=$(grep -E "(^|/)$wanted\.ko(\.[a-z]+)?:" "$modules/modules.dep" | cut -d: -f1)
    if [ -z "$path" ]; then
        # Built into this kernel: nothing to load.
        grep -qE "/$wanted\.ko" "$modules/modules.builtin" 2>/dev/null \
            || die "kernel $release has no $wanted module"
        continue
    fi
    add_module "$path"
done

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 > "$work/initramfs.cpio.gz"
cp "$kernel" "$work/vmlinuz"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$stamp" > "$out/stamp"
