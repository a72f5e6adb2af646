//! Rules for what a VM is given beyond its devices: how disk images are created and sized,
//! systemd credentials, the cloud-init seed.

use std::path::Path;

use super::rules::Report;
use crate::spec::{CloudInitSpec, Content, DiskFormat, DiskSpec, VmSpec};

/// 64 TiB: QEMU's qcow2 limit with the default cluster size is far beyond; this keeps size
/// arithmetic in bytes far from overflowing.
pub const MAX_DISK_MIB: u64 = 64 * 1024 * 1024;
/// fw_cfg file names hold at most 55 bytes; `opt/io.systemd.credentials/` takes 27 of them.
pub const MAX_CREDENTIAL_NAME: usize = 28;

/// `disks.<id>`'s `sizeMiB`, `create` and `deleteOnRemove`.
pub(super) fn check_disk(report: &mut Report, vm: &str, id: &str, disk: &DiskSpec) {
    let at = |field: &'static str| ["vms", vm, "disks", id, field];
    if let Some(size) = disk.size_mib {
        if !(1..=MAX_DISK_MIB).contains(&size) {
            report.at(
                &at("sizeMiB"),
                format!("must be between 1 and {MAX_DISK_MIB}"),
            );
        }
    }
    if disk.size_mib.is_some() && disk.read_only {
        report.at(
            &at("sizeMiB"),
            "a read-only image may be shared by other disks; it is never resized",
        );
    }
    if disk.delete_on_remove && disk.read_only {
        report.at(
            &at("deleteOnRemove"),
            "a read-only image may be shared by other disks; it is never deleted",
        );
    }
    let Some(create) = &disk.create else {
        return;
    };
    let at_create = |field: &'static str| ["vms", vm, "disks", id, "create", field];
    match &create.from {
        None if disk.size_mib.is_none() => report.at(
            &at("sizeMiB"),
            "a blank image (create without `from`) needs a size",
        ),
        None if create.backing => report.at(
            &at_create("backing"),
            "an overlay needs the base image it sits on: set `from`",
        ),
        Some(from) => {
            super::rules::check_host_path(report, &at_create("from"), from);
            if from == &disk.path {
                report.at(&at_create("from"), "is the disk's own path");
            }
            if create.backing && disk.format != DiskFormat::Qcow2 {
                report.at(
                    &at_create("backing"),
                    "an overlay is a qcow2 image: set format = \"qcow2\"",
                );
            }
        }
        None => {}
    }
}

/// `credentials.<NAME>`: names systemd and fw_cfg accept, one source each.
pub(super) fn check_credentials(report: &mut Report, vm: &str, spec: &VmSpec) {
    for (name, content) in &spec.credentials {
        let at = ["vms", vm, "credentials", name.as_str()];
        let valid_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if name.is_empty()
            || name.len() > MAX_CREDENTIAL_NAME
            || !valid_chars
            || name.starts_with('.')
        {
            report.at(
                &at,
                format!(
                    "credential name must be 1 to {MAX_CREDENTIAL_NAME} of A-Z a-z 0-9 _ . - \
                     (not starting with '.'): fw_cfg names are at most 55 bytes"
                ),
            );
        }
        check_content(report, &at, content);
    }
}

pub(super) fn check_cloud_init(report: &mut Report, vm: &str, cloud_init: &CloudInitSpec) {
    for (key, content) in [
        ("userData", &cloud_init.user_data),
        ("metaData", &cloud_init.meta_data),
        ("networkConfig", &cloud_init.network_config),
    ] {
        if let Some(content) = content {
            check_content(report, &["vms", vm, "cloudInit", key], content);
        }
    }
}

fn check_content(report: &mut Report, at: &[&str], content: &Content) {
    match (&content.text, &content.file) {
        (Some(_), Some(_)) | (None, None) => report.at(
            at,
            "set exactly one of `text` (not secret) and `file` (read at VM start)",
        ),
        (None, Some(file)) => {
            let mut path = at.to_vec();
            path.push("file");
            super::rules::check_host_path(report, &path, file);
            if file.starts_with(Path::new("/nix/store")) {
                report.at(
                    &path,
                    "is in the Nix store, which every local user can read: give secrets as a \
                     path outside it (agenix, sops-nix), or use `text` for what is not secret",
                );
            }
        }
        (Some(_), None) => {}
    }
}
