//! vCPU hotplug: fill the lowest free slots of `query-hotpluggable-cpus`, unplug from the
//! highest occupied one down (never the last CPU).

use std::time::Duration;

use qapi::qmp::HotpluggableCPU;
use serde_json::{Map, Value};

use super::unplug::{unplug, GoneWhen, Unplugged};
use super::{LiveError, LiveOutcome};
use crate::ids;
use crate::qemu::qmp::Qmp;

pub(super) async fn set_vcpus(
    qmp: &Qmp,
    to: u32,
    unplug_timeout: Duration,
) -> Result<LiveOutcome, LiveError> {
    let mut slots = qmp.query_hotpluggable_cpus().await?;
    slots.sort_by_key(position);
    let present = slots.iter().filter(|cpu| cpu.qom_path.is_some()).count() as u32;
    if to > present {
        let free = slots.iter().filter(|cpu| cpu.qom_path.is_none());
        for cpu in free.take((to - present) as usize) {
            let (socket, core, thread) = position(cpu);
            let id = ids::vcpu_device(socket, core, thread);
            qmp.device_add(&cpu.type_, &id, None, props(cpu)).await?;
        }
    }
    let occupied = slots.iter().rev().filter_map(|cpu| cpu.qom_path.as_deref());
    for qom_path in occupied.take(present.saturating_sub(to.max(1)) as usize) {
        // Hotplugged vCPUs have an id; boot vCPUs only their QOM path, which device_del takes too.
        let device = qom_path
            .strip_prefix("/machine/peripheral/")
            .unwrap_or(qom_path);
        if let Unplugged::Pending = unplug(
            qmp,
            device,
            qom_path,
            unplug_timeout,
            GoneWhen::DeletedOrAbsent,
        )
        .await?
        {
            return Ok(LiveOutcome::Unplugging {
                device: device.to_owned(),
            });
        }
    }
    Ok(LiveOutcome::Done)
}

fn position(cpu: &HotpluggableCPU) -> (i64, i64, i64) {
    let p = &cpu.props;
    (
        p.socket_id.unwrap_or(0),
        p.core_id.unwrap_or(0),
        p.thread_id.unwrap_or(0),
    )
}

/// The slot's properties exactly as QEMU listed them (`socket-id`, `core-id`, ...).
fn props(cpu: &HotpluggableCPU) -> Map<String, Value> {
    match serde_json::to_value(&cpu.props) {
        Ok(Value::Object(map)) => map.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => Map::new(),
    }
}
