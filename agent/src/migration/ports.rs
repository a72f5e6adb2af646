//! The migration port range (`--migration-ports FIRST-LAST`) and which port an incoming QEMU
//! listens on.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// `--migration-ports` when not given.
pub const DEFAULT_PORTS: PortRange = PortRange {
    first: 49152,
    last: 49215,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (first, last) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?}: expected FIRST-LAST, e.g. 49152-49215"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{text:?}: {p:?} is not a port (1-65535)"))
        };
        let range = PortRange {
            first: port(first)?,
            last: port(last)?,
        };
        if range.first > range.last {
            return Err(format!("{text:?}: the first port is above the last"));
        }
        Ok(range)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl PortRange {
    /// The ports to try for the next incoming QEMU, lowest first, skipping those in use by
    /// moves in flight here (a port another program holds is found when QEMU fails to bind).
    pub fn candidates(&self, in_use: &BTreeSet<u16>) -> Vec<u16> {
        (self.first..=self.last)
            .filter(|p| !in_use.contains(p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_print() {
        assert_eq!("49152-49215".parse(), Ok(DEFAULT_PORTS));
        assert_eq!(DEFAULT_PORTS.to_string(), "49152-49215");
        for bad in ["49152", "5-1", "0-10", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn candidates_skip_ports_in_use() {
        let range: PortRange = "10-13".parse().unwrap();
        assert_eq!(range.candidates(&[11, 12].into()), [10, 13]);
        assert!(range.candidates(&(10..=13).collect()).is_empty());
    }
}
