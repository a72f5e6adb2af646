//! What a move reports: progress while it runs (for `status` and the terminal) and the outcome
//! (one line, or JSON) when it ends.

use serde::{Deserialize, Serialize};

use super::record::Mode;

/// A move in flight, as `status` shows it under the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationProgress {
    /// `out` on the source, `in` on the target.
    pub direction: String,
    /// The other host.
    pub peer: String,
    /// `preparing`, `copying disks`, `transferring memory`, `switchover`, `completing`.
    pub stage: String,
    pub ram_transferred_bytes: u64,
    pub ram_remaining_bytes: u64,
    pub ram_total_bytes: u64,
    pub disk_transferred_bytes: u64,
    pub disk_total_bytes: u64,
    /// Mbit/s as QEMU measures it.
    pub throughput_mbps: u64,
    /// QEMU's expected downtime for the switchover, ms.
    pub expected_downtime_ms: Option<u64>,
    /// Disks this move copies (not declared shared).
    pub copied_disks: Vec<String>,
}

/// How a completed move went: `plasmavmc migrate --json` prints exactly this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationOutcome {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub mode: Mode,
    /// From the source's pause to the target running.
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub transferred_bytes: u64,
}

impl MigrationOutcome {
    /// The one line a person reads at the end.
    pub fn render(&self) -> String {
        format!(
            "{}: moved {} from {} to {} in {} (downtime {} ms, {} sent)",
            self.vm,
            self.mode.as_str(),
            self.from,
            self.to,
            seconds(self.total_ms),
            self.downtime_ms,
            bytes(self.transferred_bytes)
        )
    }
}

impl MigrationProgress {
    /// One terminal line.
    pub fn render(&self, vm: &str) -> String {
        let mut line = format!("{vm} -> {}: {}", self.peer, self.stage);
        if self.disk_total_bytes > 0 {
            line.push_str(&format!(
                ", disks {}/{}",
                bytes(self.disk_transferred_bytes),
                bytes(self.disk_total_bytes)
            ));
        }
        if self.ram_total_bytes > 0 {
            line.push_str(&format!(
                ", memory {} sent, {} remaining",
                bytes(self.ram_transferred_bytes),
                bytes(self.ram_remaining_bytes)
            ));
        }
        if self.throughput_mbps > 0 {
            line.push_str(&format!(", {} Mbit/s", self.throughput_mbps));
        }
        if let Some(ms) = self.expected_downtime_ms {
            line.push_str(&format!(", expected downtime {ms} ms"));
        }
        line
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

/// Bytes in the largest binary unit that keeps a number >= 1.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_and_json_say_downtime_total_and_bytes() {
        let outcome = MigrationOutcome {
            vm: "web".into(),
            from: "h1".into(),
            to: "h2".into(),
            mode: Mode::Live,
            downtime_ms: 23,
            total_ms: 1840,
            transferred_bytes: 300 << 20,
        };
        assert_eq!(
            outcome.render(),
            "web: moved live from h1 to h2 in 1.84 s (downtime 23 ms, 300.0 MiB sent)"
        );
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"vm": "web", "from": "h1", "to": "h2", "mode": "live",
                "downtimeMs": 23, "totalMs": 1840, "transferredBytes": 300u64 << 20})
        );
    }

    #[test]
    fn progress_line_shows_what_is_known() {
        let progress = MigrationProgress {
            peer: "h2".into(),
            stage: "transferring memory".into(),
            ram_transferred_bytes: 100 << 20,
            ram_remaining_bytes: 50 << 20,
            ram_total_bytes: 256 << 20,
            throughput_mbps: 812,
            expected_downtime_ms: Some(12),
            ..Default::default()
        };
        assert_eq!(
            progress.render("web"),
            "web -> h2: transferring memory, memory 100.0 MiB sent, 50.0 MiB remaining, 812 Mbit/s, expected downtime 12 ms"
        );
        assert_eq!(bytes(512), "512 B");
    }
}
