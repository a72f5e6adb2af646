//! Desired-state validation: from the file's text to a `DesiredState` the rest of the agent can
//! trust, or to the complete list of what is wrong with it, each problem with its JSON path
//! (`vms.web.nics.eth0.mac: not a unicast MAC address`).
//!
//! Two passes. `structure` runs serde and keeps going after an error, so typos, wrong types,
//! unknown keys, keys given twice and a byte order mark are all reported at once. `rules` checks
//! what serde cannot express (names, ranges, references, uniqueness across VMs). A VM with
//! structural errors is reported with those only: its semantic checks would be guesses about a
//! VM that did not parse.
//!
//! Whether two disk paths reach one image is a question for the host's filesystem: the caller
//! answers it through `ResolvePaths` (`HostPaths` in the agent and the CLI), so the checks stay pure.

mod duplicates;
mod names;
mod provisioning;
mod rules;
mod structure;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::spec::DesiredState;

pub use names::{is_valid_device_id, is_valid_ifname, is_valid_vm_name};
pub use provisioning::{MAX_CREDENTIAL_NAME, MAX_DISK_MIB};
pub use rules::{
    MAX_CMDLINE_BYTES, MAX_DEVICES_PC, MAX_DEVICES_Q35, MAX_HOTPLUG_SLOTS, MAX_MEMORY_MIB,
    MAX_VCPUS, MIN_MEMORY_MIB, VIRTIO_MEM_BLOCK_MIB,
};

/// One thing wrong with the file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted JSON path (`vms.web.disks.root.path`); empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a desired-state document (never empty). Displays one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors {
    problems: Vec<Problem>,
}

impl ValidationErrors {
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Where a declared host path really leads, so that two spellings of one image are caught.
pub trait ResolvePaths {
    /// The path with symlinks, `.` and `..` resolved; None when that cannot be known (the file
    /// does not exist yet): the path is then compared as written.
    fn canonical(&self, path: &Path) -> Option<PathBuf>;
}

/// Paths compared as written: for documents that are not about this host's files.
pub struct AsWritten;

impl ResolvePaths for AsWritten {
    fn canonical(&self, _: &Path) -> Option<PathBuf> {
        None
    }
}

/// This host's filesystem.
pub struct HostPaths;

impl ResolvePaths for HostPaths {
    fn canonical(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
    }
}

/// Parses and validates a desired-state document, comparing disk paths as written.
pub fn parse_desired_state(json: &str) -> Result<DesiredState, ValidationErrors> {
    parse_desired_state_on(json, &AsWritten)
}

/// Parses and validates a desired-state document for a host whose paths `paths` resolves.
pub fn parse_desired_state_on(
    json: &str,
    paths: &dyn ResolvePaths,
) -> Result<DesiredState, ValidationErrors> {
    let parsed = structure::deserialize(json);
    let mut problems = parsed.problems;
    if let Some(state) = &parsed.state {
        rules::check(state, &parsed.broken_vms, paths, &mut problems);
    }
    match parsed.state {
        Some(state) if problems.is_empty() => Ok(state),
        _ => Err(ValidationErrors { problems }),
    }
}

/// Why a desired-state file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The inner errors are part of the message (not `#[source]`) so a plain `{}` tells the
    // whole story and `{:#}` does not repeat it.
    #[error("cannot read desired state {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid desired state {}:\n{errors}", path.display())]
    Invalid {
        path: PathBuf,
        errors: ValidationErrors,
    },
}

/// Reads and validates the desired-state file at `path`, for this host.
pub fn load_desired_state(path: &Path) -> Result<DesiredState, LoadError> {
    let text = crate::files::read_regular(path).map_err(|error| LoadError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_desired_state_on(&text, &HostPaths).map_err(|errors| LoadError::Invalid {
        path: path.to_owned(),
        errors,
    })
}

#[cfg(test)]
mod tests;
