//! What QEMU cannot change on a running VM: the difference between the declared spec and the
//! spec the VM was booted with, in the settings fixed at boot.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;

use super::cpu_memory::{memory_live_range, vcpus_live_range};
use crate::action::PendingChange;
use crate::ids;
use crate::spec::{CloudInitSpec, Content, VmSpec};

/// The declared changes of VM `vm` that wait for its next boot (`boot` is the spec it was booted
/// with). Pure; `status` uses it too. Disks and NICs are live (except when hotplug slots run
/// out, which only the planner can tell).
pub fn pending_changes(vm: &str, desired: &VmSpec, boot: &VmSpec) -> Vec<PendingChange> {
    let mut out = Pending {
        vm,
        out: Vec::new(),
    };
    let boot_time = "boot-time setting";
    out.compare(
        "machine",
        &boot.machine,
        &desired.machine,
        boot_time,
        debug_lower,
    );
    out.compare("accel", &boot.accel, &desired.accel, boot_time, debug_lower);
    out.compare("kernel", &boot.kernel, &desired.kernel, boot_time, path);
    out.compare("initrd", &boot.initrd, &desired.initrd, boot_time, path);
    out.compare("cmdline", &boot.cmdline, &desired.cmdline, boot_time, text);
    out.compare(
        "firmware",
        &boot.firmware,
        &desired.firmware,
        boot_time,
        path,
    );
    out.compare(
        "bootDisk",
        &boot.boot_disk,
        &desired.boot_disk,
        boot_time,
        text,
    );
    out.compare(
        "hotplugSlots",
        &boot.hotplug_slots,
        &desired.hotplug_slots,
        boot_time,
        plain,
    );
    out.compare(
        "consoleLog",
        &boot.console_log,
        &desired.console_log,
        boot_time,
        plain,
    );
    out.compare(
        "maxVcpus",
        &boot.effective_max_vcpus(),
        &desired.effective_max_vcpus(),
        "ceiling fixed at boot",
        plain,
    );
    out.compare(
        "maxMemoryMiB",
        &boot.max_memory_mib,
        &desired.max_memory_mib,
        "ceiling fixed at boot",
        |max: &Option<u64>| max.map_or("none".into(), |m| m.to_string()),
    );

    out.compare(
        "credentials",
        &boot.credentials,
        &desired.credentials,
        "given to the guest at boot (fw_cfg)",
        |credentials: &BTreeMap<String, Content>| {
            let list: Vec<String> = credentials
                .iter()
                .map(|(name, content)| format!("{name}={}", content_label(content)))
                .collect();
            if list.is_empty() {
                "none".into()
            } else {
                list.join(",")
            }
        },
    );
    out.compare(
        "cloudInit",
        &boot.cloud_init,
        &desired.cloud_init,
        "the seed disk is built at boot",
        |cloud_init: &Option<CloudInitSpec>| {
            let Some(seed) = cloud_init else {
                return "none".into();
            };
            [
                ("userData", &seed.user_data),
                ("metaData", &seed.meta_data),
                ("networkConfig", &seed.network_config),
            ]
            .iter()
            .filter_map(|(key, content)| {
                Some(format!("{key}={}", content_label(content.as_ref()?)))
            })
            .collect::<Vec<_>>()
            .join(",")
        },
    );

    let vcpus = vcpus_live_range(boot);
    if desired.vcpus != boot.vcpus && !vcpus.contains(&desired.vcpus) {
        let reason = if desired.vcpus < *vcpus.start() {
            format!(
                "below the {} vCPUs booted with (only hotplugged vCPUs can be removed)",
                vcpus.start()
            )
        } else {
            format!("above maxVcpus at boot ({})", vcpus.end())
        };
        out.push(
            "vcpus",
            boot.vcpus.to_string(),
            desired.vcpus.to_string(),
            reason,
        );
    }
    let memory_live = memory_live_range(boot);
    if desired.memory_mib != boot.memory_mib
        && !memory_live
            .as_ref()
            .is_some_and(|live| live.contains(&desired.memory_mib))
    {
        let reason = match memory_live {
            None => "no virtio-mem device at boot (maxMemoryMiB above memoryMiB)".to_owned(),
            Some(live) if desired.memory_mib < *live.start() => {
                format!("below the {} MiB booted with", live.start())
            }
            Some(live) => format!("above maxMemoryMiB at boot ({})", live.end()),
        };
        out.push(
            "memoryMiB",
            boot.memory_mib.to_string(),
            desired.memory_mib.to_string(),
            reason,
        );
    }
    out.out
}

struct Pending<'a> {
    vm: &'a str,
    out: Vec<PendingChange>,
}

impl Pending<'_> {
    /// Records `field` if it differs; values are only rendered then (the no-op plan allocates
    /// nothing).
    fn compare<T: PartialEq>(
        &mut self,
        field: &str,
        boot: &T,
        desired: &T,
        reason: &str,
        render: impl Fn(&T) -> String,
    ) {
        if boot != desired {
            self.push(field, render(boot), render(desired), reason.to_owned());
        }
    }

    fn push(&mut self, field: &str, from: String, to: String, reason: String) {
        self.out.push(PendingChange {
            vm: self.vm.to_owned(),
            field: field.to_owned(),
            from,
            to,
            reason,
        });
    }
}

fn plain<T: Display>(value: &T) -> String {
    value.to_string()
}

fn debug_lower<T: std::fmt::Debug>(value: &T) -> String {
    format!("{value:?}").to_ascii_lowercase()
}

fn path(value: &Option<PathBuf>) -> String {
    value
        .as_ref()
        .map_or("none".into(), |p| p.display().to_string())
}

/// How a credential or seed file is given, without its value: `file:/run/agenix/pw`, or for
/// inline text a fingerprint (`text#1a2b3c4d`) that changes with it.
fn content_label(content: &Content) -> String {
    match (&content.file, &content.text) {
        (Some(file), _) => format!("file:{}", file.display()),
        (None, Some(text)) => format!("text#{}", ids::fingerprint(text.as_bytes())),
        (None, None) => "none".into(),
    }
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "none".into())
}
