//! Memory resizing through the virtio-mem device: the part above boot memory is its
//! `requested-size`. The guest plugs or unplugs memory blocks in its own time; observation
//! reports what it actually reached (`size`).

use super::LiveError;
use crate::devices::MIB;
use crate::ids;
use crate::qemu::observe::device_path;
use crate::qemu::qmp::Qmp;

pub(super) async fn set_memory(qmp: &Qmp, to_mib: u64) -> Result<(), LiveError> {
    let boot_mib = qmp.query_memory_size_summary().await?.base_memory / MIB;
    let requested = to_mib.checked_sub(boot_mib).ok_or_else(|| {
        anyhow::anyhow!("{to_mib} MiB is below the boot memory ({boot_mib} MiB); needs a restart")
    })?;
    qmp.qom_set(
        &device_path(ids::VIRTIO_MEM_DEVICE),
        "requested-size",
        requested * MIB,
    )
    .await?;
    Ok(())
}
