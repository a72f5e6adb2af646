//! What a disk's path is on this host (a `stat`), for `devices::DiskBacking` to decide the driver.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::devices::DiskBacking;
use crate::spec::VmSpec;

/// A block device (through symlinks, as `/dev/vg0/web-data` is one) or anything else; a path
/// that cannot be read counts as a file, and QEMU then says why it cannot open it.
pub fn disk_backing(path: &Path) -> DiskBacking {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => DiskBacking::BlockDevice,
        _ => DiskBacking::File,
    }
}

/// The disk paths of `spec` that are block devices.
pub fn block_devices(spec: &VmSpec) -> BTreeSet<PathBuf> {
    spec.disks
        .values()
        .filter(|disk| disk_backing(&disk.path) == DiskBacking::BlockDevice)
        .map(|disk| disk.path.clone())
        .collect()
}
