//! What the sampler reads, parsed: `query-blockstats` entries, `/proc/PID/stat`, the taps'
//! counters in `/proc/net/dev`. Pure: the sampler hands in the text and JSON it read.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{DiskCounters, NicCounters, ProcessFigures};
use crate::ids;

/// One `query-blockstats` entry (QEMU 7.2), the fields the metrics need.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockStatsEntry {
    /// The device's QOM path (`/machine/peripheral/disk-data/virtio-backend`).
    #[serde(default)]
    pub qdev: Option<String>,
    /// The backend's root node (`disk-data-fmt`).
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    pub stats: BlockStats,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BlockStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
}

/// The disks' counters by declared disk id; entries that are not a declared disk's (a cdrom,
/// a device the agent did not make) are left out.
pub fn disk_counters(entries: &[BlockStatsEntry]) -> BTreeMap<String, DiskCounters> {
    entries
        .iter()
        .filter_map(|entry| {
            let disk = entry
                .qdev
                .as_deref()
                .and_then(disk_of_qdev)
                .or_else(|| entry.node_name.as_deref().and_then(ids::parse_disk_node))?;
            let s = &entry.stats;
            let counters = DiskCounters {
                read_bytes: s.rd_bytes,
                written_bytes: s.wr_bytes,
                reads: s.rd_operations,
                writes: s.wr_operations,
                flushes: s.flush_operations,
                read_time_ns: s.rd_total_time_ns,
                write_time_ns: s.wr_total_time_ns,
                flush_time_ns: s.flush_total_time_ns,
            };
            Some((disk.to_owned(), counters))
        })
        .collect()
}

/// `/machine/peripheral/disk-ID[/virtio-backend]` → `ID`.
fn disk_of_qdev(qdev: &str) -> Option<&str> {
    let device = qdev.strip_prefix("/machine/peripheral/")?;
    let device = device.split('/').next()?;
    ids::parse_disk_device(device)
}

/// The process's CPU time and resident memory from `/proc/PID/stat`, given the clock ticks per
/// second and the page size.
pub fn process_figures(
    stat: &str,
    ticks_per_second: u64,
    page_size: u64,
) -> Option<ProcessFigures> {
    // Field 2, the command name, is in parentheses and may hold spaces and parentheses itself;
    // the fields after it start with field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let (utime, stime, rss) = (field(14)?, field(15)?, field(24)?);
    Some(ProcessFigures {
        cpu_seconds: (utime + stime) as f64 / ticks_per_second.max(1) as f64,
        resident_bytes: rss * page_size,
    })
}

/// Every interface's counters from `/proc/net/dev` (the reader's network namespace), by name,
/// seen from the guest's side: what a tap transmits, its guest receives.
pub fn interface_counters(net_dev: &str) -> BTreeMap<String, NicCounters> {
    net_dev
        .lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let fields: Vec<u64> = counters
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
            let [rx_bytes, rx_packets, _, _, _, _, _, _, tx_bytes, tx_packets, ..] = fields[..]
            else {
                return None;
            };
            let tap = name.trim().to_owned();
            let counters = NicCounters {
                tap: tap.clone(),
                receive_bytes: tx_bytes,
                transmit_bytes: rx_bytes,
                receive_packets: tx_packets,
                transmit_packets: rx_packets,
            };
            Some((tap, counters))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockstats_map_to_declared_disks() {
        let json = serde_json::json!([
            {"device": "", "qdev": "/machine/peripheral/disk-root/virtio-backend",
             "node-name": "disk-root-fmt",
             "stats": {"rd_bytes": 512, "wr_bytes": 4096, "rd_operations": 1, "wr_operations": 2,
                       "flush_operations": 3, "rd_total_time_ns": 10, "wr_total_time_ns": 20,
                       "flush_total_time_ns": 30, "unmap_bytes": 0}},
            {"device": "", "node-name": "disk-data-fmt",
             "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4,
                       "flush_operations": 0, "rd_total_time_ns": 0, "wr_total_time_ns": 0,
                       "flush_total_time_ns": 0}},
            {"device": "ide1-cd0", "qdev": "/machine/unattached/device[20]",
             "stats": {"rd_bytes": 9, "wr_bytes": 9, "rd_operations": 9, "wr_operations": 9,
                       "flush_operations": 9, "rd_total_time_ns": 9, "wr_total_time_ns": 9,
                       "flush_total_time_ns": 9}}
        ]);
        let entries: Vec<BlockStatsEntry> = serde_json::from_value(json).unwrap();
        let disks = disk_counters(&entries);
        assert_eq!(disks.keys().collect::<Vec<_>>(), ["data", "root"]);
        assert_eq!(
            disks["root"],
            DiskCounters {
                read_bytes: 512,
                written_bytes: 4096,
                reads: 1,
                writes: 2,
                flushes: 3,
                read_time_ns: 10,
                write_time_ns: 20,
                flush_time_ns: 30,
            }
        );
        assert_eq!(disks["data"].writes, 4);
    }

    #[test]
    fn proc_stat_gives_cpu_seconds_and_rss() {
        // A command name with a space and a parenthesis, as /proc shows it.
        let stat = "4242 (qemu (sys) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 3 0 \
                    1000 500000000 12800 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let figures = process_figures(stat, 100, 4096).unwrap();
        assert_eq!(figures.cpu_seconds, 4.0);
        assert_eq!(figures.resident_bytes, 12800 * 4096);
        assert_eq!(process_figures("4242 (qemu) S 1 2", 100, 4096), None);
        assert_eq!(process_figures("", 100, 4096), None);
    }

    #[test]
    fn tap_counters_are_turned_to_the_guest_side() {
        let net_dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     840      10    0    0    0     0          0         0      840      10    0    0    0     0       0          0
pv0123456789ab: 1000 10 0 0 0 0 0 0 2000 20 0 3 0 0 0 0
  br0: garbage
";
        let interfaces = interface_counters(net_dev);
        assert_eq!(
            interfaces.keys().collect::<Vec<_>>(),
            ["lo", "pv0123456789ab"]
        );
        let nic = &interfaces["pv0123456789ab"];
        assert_eq!(nic.tap, "pv0123456789ab");
        assert_eq!(nic.receive_bytes, 2000);
        assert_eq!(nic.transmit_bytes, 1000);
        assert_eq!(nic.receive_packets, 20);
        assert_eq!(nic.transmit_packets, 10);
    }
}
