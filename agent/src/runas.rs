//! The unprivileged identity QEMU runs as (`--qemu-user`), and what it may open: the classic
//! owner/group/other permission check, as plain data.
//!
//! The agent drops to this identity itself between fork and exec (and a fence guard does for
//! its QEMU), as libvirt and Firecracker's jailer do, rather than through QEMU's `-runas` (7.2)
//! or `-run-with user=` (9.1 and later): the same on every QEMU version, and QEMU never holds
//! root, not even while it opens its command line's files.

use std::fmt;
use std::str::FromStr;

/// uid, primary gid and supplementary groups (e.g. `kvm` for `/dev/kvm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Rendered `UID:GID[:G1,G2...]` on a fence guard's command line.
impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)?;
        if !self.groups.is_empty() {
            let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            write!(f, ":{}", groups.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for RunAs {
    type Err = String;

    fn from_str(text: &str) -> Result<RunAs, String> {
        let bad = || format!("{text:?} is not UID:GID[:GROUP,...]");
        let mut parts = text.split(':');
        let number = |part: Option<&str>| part.and_then(|p| p.parse::<u32>().ok());
        let uid = number(parts.next()).ok_or_else(bad)?;
        let gid = number(parts.next()).ok_or_else(bad)?;
        let groups = match parts.next() {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|g| g.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        if parts.next().is_some() || uid == 0 {
            return Err(format!("{} (and not uid 0)", bad()));
        }
        Ok(RunAs { uid, gid, groups })
    }
}

/// What QEMU needs of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Read,
    ReadWrite,
    /// Of a directory on the way: enter it.
    Search,
}

/// A file's owner and permission bits (`stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFacts {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl RunAs {
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether this identity may do `want` on a file with `facts`, by the owner, group or other
    /// bits (whichever class applies first, as the kernel decides; ACLs aside).
    pub fn may(&self, facts: FileFacts, want: Want) -> bool {
        let shift = if facts.uid == self.uid {
            6
        } else if self.in_group(facts.gid) {
            3
        } else {
            0
        };
        let needed = match want {
            Want::Read => 0o4,
            Want::ReadWrite => 0o6,
            Want::Search => 0o1,
        };
        (facts.mode >> shift) & needed == needed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu() -> RunAs {
        RunAs {
            uid: 990,
            gid: 990,
            groups: vec![78],
        }
    }

    fn file(uid: u32, gid: u32, mode: u32) -> FileFacts {
        FileFacts { uid, gid, mode }
    }

    #[test]
    fn renders_and_parses_for_the_guard() {
        let user = qemu();
        assert_eq!(user.to_string(), "990:990:78");
        assert_eq!("990:990:78".parse::<RunAs>(), Ok(user));
        let plain: RunAs = "5:6".parse().unwrap();
        assert_eq!(plain.groups, Vec::<u32>::new());
        for bad in ["", "5", "a:b", "5:6:x", "5:6:7:8", "0:0"] {
            assert!(bad.parse::<RunAs>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_first_matching_class_decides() {
        let user = qemu();
        assert!(user.may(file(990, 0, 0o600), Want::ReadWrite));
        assert!(!user.may(file(990, 0, 0o066), Want::Read), "owner bits win");
        assert!(
            user.may(file(0, 78, 0o640), Want::Read),
            "supplementary group"
        );
        assert!(!user.may(file(0, 78, 0o640), Want::ReadWrite));
        assert!(user.may(file(0, 0, 0o644), Want::Read));
        assert!(!user.may(file(0, 0, 0o600), Want::Read));
        assert!(user.may(file(0, 0, 0o711), Want::Search));
        assert!(!user.may(file(0, 0, 0o700), Want::Search));
    }
}
